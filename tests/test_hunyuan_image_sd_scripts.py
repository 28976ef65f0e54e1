"""HunyuanImage-2.1 and Chroma against sd-scripts' own code, in process: its ``HYImageDiffusionTransformer``
(tiny widths, tests/hunyuan_image_fixtures.py) with its ``networks.lora_hunyuan_image``, its ``Chroma`` with
``networks.lora_flux``, and the function the HunyuanImage trainer makes its prediction with.

Needs sd-scripts (``../shared/sd-scripts``) and its pinned stack, like tests/test_flux_sd3_sd_scripts.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import hunyuan_image_fixtures as hy
import pytest
import sd_scripts_fixtures as e2e
import torch
from helpers import assert_the_replay_is_the_validation_pass, named_groups, pretend_trained
from safetensors.torch import load_file

from aclora_ext import OptionError, create_network, create_network_from_weights
from aclora_ext.families import check_model_family, detect, model_family
from aclora_ext.files.storage import LoRAFileError, read_metadata

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only


@pytest.fixture(scope="module")
def sd():
    """sd-scripts' modules, imported from its folder."""
    e2e.import_sd_scripts_in_process()
    import networks.lora_flux as lora_flux
    import networks.lora_hunyuan_image as lora_hunyuan_image
    from library import chroma_models, flux_models, flux_train_utils, hunyuan_image_models, train_util

    return argparse.Namespace(lora_flux=lora_flux, lora_hunyuan_image=lora_hunyuan_image, models=hunyuan_image_models,
                              chroma_models=chroma_models, flux_models=flux_models,
                              flux_train_utils=flux_train_utils, train_util=train_util)


@pytest.fixture(scope="module")
def dit(sd):
    return hy.tiny_dit(sd.models)


def theirs(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.lora_dim, float(m.alpha)) for m in network.text_encoder_loras + network.unet_loras}


def ours(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.rank, float(m.alpha)) for m in network.loras}


def narrow_flux(sd):
    params = dataclasses.replace(sd.flux_models.configs["dev"].params, hidden_size=64, num_heads=2,
                                 axes_dim=[8, 12, 12], depth=1, depth_single_blocks=2, context_in_dim=32, vec_in_dim=16)
    return sd.flux_models.Flux(params)


def narrow_chroma(sd):
    params = dataclasses.replace(sd.chroma_models.chroma_params, hidden_size=64, num_heads=2, axes_dim=[8, 12, 12],
                                 depth=2, depth_single_blocks=2, context_in_dim=32, approximator_hidden_size=32,
                                 approximator_depth=2)
    torch.manual_seed(0)
    return sd.chroma_models.Chroma(params)


# --- recognised by its own classes, named as lora_hunyuan_image names it --------------------------------
def test_hunyuan_image_is_its_own_family_not_flux(sd, dit):
    assert detect(dit, [None, None]).key == "hunyuan_image"
    assert detect(narrow_flux(sd), [None, None]).key == "flux"
    network = create_network(1.0, 4, 2.0, None, [None, None], dit)
    names = {m.lora_name for m in network.loras}
    assert {"lora_unet_double_blocks_1_img_mod_linear", "lora_unet_double_blocks_0_txt_mlp_fc2",
            "lora_unet_single_blocks_2_modulation_linear", "lora_unet_single_blocks_0_linear1"} <= names
    assert not any("final_layer" in n or "txt_in" in n or "byt5_in" in n or "img_in" in n for n in names)


HUNYUAN_CASES = {
    "defaults": {},
    "reg-dims": {"network_reg_dims": "double_blocks_0_img=6,single_blocks_1_=0,mlp_fc1=3"},
    "conv_dim": {"conv_dim": "5", "conv_alpha": "1.5"},  # no conv inside the blocks: nothing changes
}


@pytest.mark.parametrize("args", HUNYUAN_CASES.values(), ids=HUNYUAN_CASES.keys())
def test_hunyuan_image_modules_are_lora_hunyuan_image_modules(sd, dit, args):
    expected = theirs(sd.lora_hunyuan_image.create_network(1.0, 4, 2.0, None, [None, None], dit, **args))
    assert ours(create_network(1.0, 4, 2.0, None, [None, None], dit, **args)) == expected


@pytest.mark.parametrize("key, value, needs", [("img_attn_dim", "2", "FLUX.1"), ("train_blocks", "single", "FLUX.1 and Lumina 2"),
                                               ("train_t5xxl", "true", "FLUX.1 and SD3/SD3.5"),
                                               ("emb_dims", "1,1,1,1,1,1", "SD3/SD3.5")])
def test_an_option_of_another_family_is_refused_for_hunyuan_image(dit, key, value, needs):
    with pytest.raises(OptionError, match=rf"{key}={value!r} is an option for {needs} models, and this model is "
                                          r"HunyuanImage-2\.1; the layer options allowed for HunyuanImage-2\.1: "):
        create_network(1.0, 4, 2.0, None, [None, None], dit, **{key: value})


def test_split_qkv_is_refused_for_hunyuan_image_saying_why(dit):
    with pytest.raises(OptionError, match="split_qkv=True.*a third"):
        create_network(1.0, 4, 2.0, None, [None, None], dit, split_qkv="True")


def test_our_hunyuan_image_files_and_theirs_load_both_ways_at_every_modules_rank(sd, dit, tmp_path):
    ours_file = str(tmp_path / "ours.safetensors")
    source = pretend_trained(create_network(1.0, 4, 2.0, None, [None, None], dit, restart_mode="off",
                                            network_reg_dims="double_blocks_0_img_attn=2,single_blocks_1_=3"))
    source.save_weights(ours_file, torch.float32, {"ss_base_model_version": "hunyuan-image-2.1"})
    assert len({r for r, _ in ours(source).values()}) == 3
    network, weights = sd.lora_hunyuan_image.create_network_from_weights(1.0, ours_file, None, [None, None], dit)
    assert theirs(network) == ours(source)
    assert not network.load_state_dict(weights, strict=False).missing_keys
    assert model_family(load_file(ours_file)) == "HunyuanImage-2.1"
    assert read_metadata(ours_file)["aclora_model"] == "HunyuanImage-2.1"
    their_file = str(tmp_path / "theirs.safetensors")
    kohya = sd.lora_hunyuan_image.create_network(1.0, 4, 2.0, None, [None, None], dit,
                                                 network_reg_dims="single_blocks_=2")
    kohya.apply_to([None, None], dit, False, True)
    with torch.no_grad():
        for m in kohya.unet_loras:
            m.lora_up.weight.normal_()
    kohya.save_weights(their_file, torch.float32, {})
    loaded, _ = create_network_from_weights(1.0, their_file, None, [None, None], dit)
    loaded.load_weights(their_file)
    assert ours(loaded) == theirs(kohya)
    for m in loaded.loras:
        k = getattr(kohya, m.lora_name)
        expected = (k.lora_up.weight @ k.lora_down.weight) * (float(k.alpha) / k.lora_dim)
        torch.testing.assert_close(m.delta_weight(), expected, rtol=1e-5, atol=1e-6)


def test_sd_scripts_comfy_converter_keeps_every_module_of_our_file_at_its_own_rank(sd, dit, tmp_path):
    """networks/convert_hunyuan_image_lora_to_comfy.py renames double/single-block layers to ComfyUI's
    (FLUX) names; run in process on our variable-rank file, and back with --reverse."""
    import networks.convert_hunyuan_image_lora_to_comfy as convert

    source = pretend_trained(create_network(1.0, 6, 2.0, None, [None, None], dit, restart_mode="off",
                                            network_reg_dims="img_mod=1,mlp_fc2=2,single_blocks_0_=3,linear2=5"))
    ours_file, comfy, back = (str(tmp_path / f"{n}.safetensors") for n in ("ours", "comfy", "back"))
    source.save_weights(ours_file, torch.float32, {"ss_base_model_version": "hunyuan-image-2.1"})
    convert.main(argparse.Namespace(src_path=ours_file, dst_path=comfy, reverse=False))
    renamed = {"img_mlp_fc1": "img_mlp_0", "img_mlp_fc2": "img_mlp_2", "img_mod_linear": "img_mod_lin",
               "txt_mlp_fc1": "txt_mlp_0", "txt_mlp_fc2": "txt_mlp_2", "txt_mod_linear": "txt_mod_lin",
               "modulation_linear": "modulation_lin"}

    def comfy_name(name):
        return next((name.replace(a, b) for a, b in renamed.items() if name.endswith(a)), name)

    converted = load_file(comfy)
    expected = {comfy_name(m.lora_name): m.rank for m in source.loras}
    assert {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in converted.items()
            if k.endswith(".lora_down.weight")} == expected
    assert len(set(expected.values())) == 5
    original = load_file(ours_file)
    for m in source.loras:
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert torch.equal(converted[f"{comfy_name(m.lora_name)}.{part}"], original[f"{m.lora_name}.{part}"])
    convert.main(argparse.Namespace(src_path=comfy, dst_path=back, reverse=True))
    network, weights = sd.lora_hunyuan_image.create_network_from_weights(1.0, back, None, [None, None], dit)
    assert theirs(network) == ours(source)


def test_a_hunyuan_image_file_and_a_flux_file_refuse_each_others_model(sd, dit, tmp_path):
    flux = narrow_flux(sd)
    hunyuan_file, flux_file = str(tmp_path / "hunyuan.safetensors"), str(tmp_path / "flux.safetensors")
    create_network(1.0, 4, 2.0, None, [None, None], dit, restart_mode="off").save_weights(hunyuan_file)
    create_network(1.0, 4, 2.0, None, [None, None], flux, restart_mode="off").save_weights(flux_file)
    with pytest.raises(LoRAFileError, match="for a HunyuanImage-2.1 model, but the model given is FLUX.1"):
        create_network_from_weights(1.0, hunyuan_file, None, [None, None], flux)
    with pytest.raises(LoRAFileError, match="for a FLUX.1 model, but the model given is HunyuanImage-2.1"):
        create_network(1.0, 4, 2.0, None, [None, None], dit).load_weights(flux_file)
    with pytest.raises(LoRAFileError, match="for a HunyuanImage-2.1 model"):
        check_model_family(load_file(hunyuan_file), [m.lora_name for m in
                                                     create_network(1.0, 4, 2.0, None, [None, None], flux).loras], "x")


# --- the held-out replay of hunyuan_image_train_network's validation pass -----------------------------------
@pytest.mark.parametrize("prediction_type, weighting_scheme", [("raw", "uniform"), ("sigma_scaled", "sigma_sqrt")])
def test_the_hunyuan_image_replay_is_the_trainers_validation_loss(sd, dit, prediction_type, weighting_scheme):
    """get_noise_pred_and_target for validation batches: the DiT called positionally, int64 timesteps of
    sigmas * 1000, apply_model_prediction_type, conditional_loss against noise - latents, times the weighting."""
    network = create_network(1.0, 4, 2.0, None, [None, None], dit)
    network.prepare_network(argparse.Namespace(validation_split=0.5, max_train_steps=10))
    network.apply_to([None, None], dit, False, True)
    pretend_trained(network)
    args = argparse.Namespace(model_prediction_type=prediction_type, weighting_scheme=weighting_scheme)

    def validation_pass():
        losses = []
        network.eval()
        with torch.no_grad():
            for seed in range(2):
                latents, _, text, text_mask, byt5, byt5_mask = hy.dit_inputs(seed=seed)
                g = torch.Generator().manual_seed(seed)
                noise, sigmas = torch.randn(latents.shape, generator=g), torch.rand(1, generator=g).view(-1, 1, 1, 1)
                noisy = (1 - sigmas) * latents + sigmas * noise
                timesteps = (sigmas[:, 0, 0, 0] * 1000).to(torch.int64)
                pred = dit(noisy, timesteps, text, text_mask, byt5, byt5_mask)
                pred, weighting = sd.flux_train_utils.apply_model_prediction_type(args, pred, noisy, sigmas)
                loss = sd.train_util.conditional_loss(pred.float(), (noise - latents).float(), "l2", "none", None)
                loss = loss * weighting if weighting is not None else loss
                losses.append(loss.mean(dim=(1, 2, 3)))
        network.train()
        return torch.cat(losses)

    assert_the_replay_is_the_validation_pass(network, validation_pass, calls=2)
    network.rank_search.loss_fn.remove()


# --- Chroma: the FLUX family's layers, told as Chroma ---------------------------------------------------------
def test_chroma_is_told_as_chroma_with_lora_flux_modules(sd, tmp_path, caplog):
    model = narrow_chroma(sd)
    expected = theirs(sd.lora_flux.create_network(1.0, 4, 2.0, None, [None, None], model))
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        network = create_network(1.0, 4, 2.0, None, [None, None], model, restart_mode="off")
    assert ours(network) == expected
    assert any(r.getMessage().startswith("AC-LoRA: Chroma, maximum rank 4") for r in caplog.records)
    path = str(tmp_path / "chroma.safetensors")
    network.save_weights(path, torch.float32, {})
    assert read_metadata(path)["aclora_model"] == "Chroma"
    flux_path = str(tmp_path / "flux.safetensors")
    create_network(1.0, 4, 2.0, None, [None, None], narrow_flux(sd), restart_mode="off").save_weights(flux_path)
    assert read_metadata(flux_path)["aclora_model"] == "FLUX.1"


@pytest.mark.parametrize("args", [{"network_reg_lrs": "double_blocks_0_=1e-5,single_blocks=0,img_mlp=3e-6"},
                                  {"network_reg_lrs": "modulation_linear=2e-5", "loraplus_lr_ratio": "4"}])
def test_network_reg_lrs_makes_lora_hunyuan_images_groups(sd, args):
    """The same optimizer groups (description, lr, parameters) as lora_hunyuan_image's (lora_flux's rule)."""
    model = hy.tiny_dit(sd.models)  # fresh: apply_to patches the layers' forward
    theirs_ = sd.lora_hunyuan_image.create_network(1.0, 4, 2.0, None, [None, None], model, **args)
    theirs_.apply_to([None, None], model, False, True)  # as the trainer does first (it drops org_module)
    ours_ = create_network(1.0, 4, 2.0, None, [None, None], model, **args)
    expected = named_groups(theirs_, *theirs_.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-3))
    assert named_groups(ours_, *ours_.prepare_optimizer_params(None, 1e-4, 1e-3)) == expected
    assert any("reg_lr" in d for d, _, _ in expected)
