"""Lumina 2 against sd-scripts' own code, in process: its ``NextDiT`` (narrow widths) and a tiny ``Gemma2Model``,
its ``networks.lora_lumina``, and the function lumina_train_network makes its prediction with.

Needs sd-scripts (``../shared/sd-scripts``) and its pinned stack, like tests/test_flux_sd3_sd_scripts.py:
skipped without them, a failure with ``CI=true`` (``ACLORA_SD_SCRIPTS_E2E=0`` turns them off).
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import sd_scripts_fixtures as e2e
from aclora_ext import create_network, create_network_from_weights
from aclora_ext.files.storage import LoRAFileError
from aclora_ext.options import OptionError
from helpers import assert_the_replay_is_the_validation_pass, pretend_trained

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only


@pytest.fixture(scope="module")
def sd():
    """sd-scripts' modules: library.lumina_* and networks.lora_lumina, imported from its folder."""
    e2e.import_sd_scripts_in_process()
    import networks.lora_lumina as lora_lumina
    from library import lumina_models, lumina_train_util, train_util

    return argparse.Namespace(lora_lumina=lora_lumina, lumina_models=lumina_models,
                              lumina_train_util=lumina_train_util, train_util=train_util)


def narrow_nextdit(sd, layers=2, refiners=1, seed=0):
    torch.manual_seed(seed)
    return sd.lumina_models.NextDiT(patch_size=2, in_channels=16, dim=64, n_layers=layers, n_refiner_layers=refiners,
                                    n_heads=4, n_kv_heads=2, multiple_of=16, qk_norm=True, cap_feat_dim=32,
                                    axes_dims=[4, 6, 6], axes_lens=[300, 512, 512])


def tiny_gemma2(seed=0):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    return Gemma2Model(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, vocab_size=64))


def theirs(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.lora_dim, float(m.alpha)) for m in network.text_encoder_loras + network.unet_loras}


def ours(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.rank, float(m.alpha)) for m in network.loras}


# --- the same layers, names, ranks and alphas as lora_lumina ------------------------------------------------
CASES = {
    "defaults": {},
    "transformer": {"train_blocks": "transformer"},
    "refiners": {"train_blocks": "refiners"},
    "noise_refiner": {"train_blocks": "noise_refiner"},
    "context_refiner": {"train_blocks": "context_refiner"},
    "per-type": {"attn_dim": "2", "mod_dim": "0", "refiner_dim": "3"},
    "refiner-only-rank": {"refiner_dim": "0", "mlp_dim": "2"},
    "embedder_dims": {"embedder_dims": "[1,2,3]"},
    "embedder_dims-and-types": {"embedder_dims": "[1,0,3]", "mlp_dim": "5", "attn_dim": "0"},
    "embedders-with-train_blocks": {"embedder_dims": "2,2,2", "train_blocks": "context_refiner", "mod_dim": "1"},
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_lumina_modules_are_lora_lumina_modules(sd, args):
    model, text_encoders = narrow_nextdit(sd), [tiny_gemma2()]
    expected = theirs(sd.lora_lumina.create_network(1.0, 4, 2.0, None, text_encoders, model, **args))
    network = create_network(1.0, 4, 2.0, None, text_encoders, model, **args)
    assert ours(network) == expected
    assert any(n.startswith("lora_te_layers_") for n in expected)  # Gemma2's LoRA, unless apply_to drops it


def test_network_train_unet_only_drops_the_gemma2_modules_as_lora_lumina_does(sd):
    model, text_encoders = narrow_nextdit(sd), [tiny_gemma2()]
    kohya = sd.lora_lumina.create_network(1.0, 4, 2.0, None, text_encoders, model)
    kohya.apply_to(text_encoders, model, apply_text_encoder=False, apply_unet=True)
    network = create_network(1.0, 4, 2.0, None, text_encoders, model)
    network.apply_to(text_encoders, model, False, True)
    assert ours(network) == theirs(kohya) and not network.text_encoder_loras


def test_network_reg_dims_gives_the_matching_modules_their_rank(sd):
    """lora_lumina has no network_reg_dims: ours applies its every-family rule (re.search on the LoRA name,
    before the per-type ranks and the default) to lora_lumina's own modules."""
    model, text_encoders = narrow_nextdit(sd), [tiny_gemma2()]
    reg = {"layers_0_attention": 2, "noise_refiner": 0, "self_attn_q": 3}
    base = theirs(sd.lora_lumina.create_network(1.0, 4, 2.0, None, text_encoders, model, attn_dim="1"))
    expected = {}
    for name, (rank, alpha) in base.items():
        rank = next((r for p, r in reg.items() if re.search(p, name)), rank)
        if rank:
            expected[name] = (rank, alpha)
    args = {"attn_dim": "1", "network_reg_dims": ",".join(f"{p}={r}" for p, r in reg.items())}
    assert ours(create_network(1.0, 4, 2.0, None, text_encoders, model, **args)) == expected


def test_our_files_and_theirs_load_both_ways_at_every_modules_rank(sd, tmp_path):
    """Our variable-rank file: lora_lumina's create_network_from_weights builds each module at its rank and
    loads it strictly. Their file (embedders included): ours builds the same modules, the same update."""
    model, text_encoders = narrow_nextdit(sd), [tiny_gemma2()]
    ours_file = str(tmp_path / "ours.safetensors")
    source = pretend_trained(create_network(1.0, 4, 2.0, None, text_encoders, model, embedder_dims="1,2,3",
                                            network_reg_dims="layers_1_=2,final_layer=3,self_attn_v=1",
                                            restart_mode="off"))
    source.save_weights(ours_file, torch.float32, {})
    network, weights = sd.lora_lumina.create_network_from_weights(1.0, ours_file, None, text_encoders, model)
    assert theirs(network) == ours(source)
    network.apply_to(text_encoders, model, True, True)
    info = network.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    their_file = str(tmp_path / "theirs.safetensors")
    kohya = sd.lora_lumina.create_network(1.0, 4, 2.0, None, text_encoders, model, embedder_dims="[2,1,3]")
    kohya.apply_to(text_encoders, model, True, True)
    with torch.no_grad():
        for m in kohya.text_encoder_loras + kohya.unet_loras:
            m.lora_up.weight.normal_()
    kohya.save_weights(their_file, torch.float32, {})
    loaded, _ = create_network_from_weights(1.0, their_file, None, text_encoders, model)
    loaded.load_weights(their_file)
    assert ours(loaded) == theirs(kohya)
    for m in loaded.loras:
        k = getattr(kohya, m.lora_name)
        expected = (k.lora_up.weight @ k.lora_down.weight) * (float(k.alpha) / k.lora_dim)
        torch.testing.assert_close(m.delta_weight(), expected, rtol=1e-5, atol=1e-6)


# --- bad input ------------------------------------------------------------------------------------------------
def test_split_qkv_is_refused_and_lora_luminas_own_cannot_save(sd):
    """The reason our message gives: lora_lumina never splits its modules, and its state_dict then looks for the
    split factors (with Lumina 2B's q/k/v widths hard-coded), so the save fails."""
    model, text_encoders = narrow_nextdit(sd), [tiny_gemma2()]
    kohya = sd.lora_lumina.create_network(1.0, 4, 2.0, None, text_encoders, model, split_qkv="True")
    kohya.apply_to(text_encoders, model, True, True)
    assert all(m.split_dims is None for m in kohya.unet_loras)
    with pytest.raises(KeyError, match="lora_down.0.weight"):
        kohya.state_dict()
    with pytest.raises(OptionError, match=r"split_qkv=True is refused; allowed: false.*Lumina 2.*2304/768/768"):
        create_network(1.0, 4, 2.0, None, text_encoders, model, split_qkv="True")


@pytest.mark.parametrize("key, value, message", [
    ("img_attn_dim", "8", "is an option for FLUX.1 models, and this model is Lumina 2; the layer options allowed "
                          "for Lumina 2: attn_dim, mlp_dim, mod_dim, refiner_dim, embedder_dims, train_blocks"),
    ("emb_dims", "1,1,1,1,1,1", "is an option for SD3/SD3.5 models, and this model is Lumina 2"),
    ("train_t5xxl", "True", "is an option for FLUX.1 and SD3/SD3.5 models, and this model is Lumina 2"),
])
def test_an_option_of_another_family_is_refused_on_lumina(sd, key, value, message):
    with pytest.raises(OptionError) as error:
        create_network(1.0, 4, 2.0, None, [tiny_gemma2()], narrow_nextdit(sd), **{key: value})
    assert f"network_args: {key}='{value}' " in str(error.value)
    for part in message.split("; "):
        assert part.split(": ")[0] in str(error.value)


def test_a_flux_train_blocks_choice_is_refused_on_lumina_and_lumina_options_on_flux(sd):
    with pytest.raises(OptionError, match="train_blocks=single is not a choice for Lumina 2 models; allowed: all, "
                                          "transformer, refiners, noise_refiner, context_refiner"):
        create_network(1.0, 4, 2.0, None, [tiny_gemma2()], narrow_nextdit(sd), train_blocks="single")
    from dit_stand_ins import flux

    with pytest.raises(OptionError, match="train_blocks=refiners is not a choice for FLUX.1 models; allowed: all, "
                                          "double, single"):
        create_network(1.0, 4, 2.0, None, [None, None], flux(1, 1), train_blocks="refiners")
    with pytest.raises(OptionError, match="attn_dim='4' is an option for Lumina 2 models, and this model is FLUX.1"):
        create_network(1.0, 4, 2.0, None, [None, None], flux(1, 1), attn_dim="4")


def test_a_file_of_another_family_is_refused_by_name(sd, tmp_path):
    from dit_stand_ins import flux

    model, text_encoders = narrow_nextdit(sd), [tiny_gemma2()]
    lumina_file = str(tmp_path / "lumina.safetensors")
    create_network(1.0, 4, 2.0, None, text_encoders, model, restart_mode="off").save_weights(lumina_file, None, {})
    with pytest.raises(LoRAFileError, match="this LoRA is for a Lumina 2 model, but the model given is FLUX.1"):
        create_network_from_weights(1.0, lumina_file, None, [None, None], flux(1, 1))
    flux_file = str(tmp_path / "flux.safetensors")
    create_network(1.0, 4, 2.0, None, [None, None], flux(1, 1), restart_mode="off").save_weights(flux_file, None, {})
    with pytest.raises(LoRAFileError, match="this LoRA is for a FLUX.1 model, but the model given is Lumina 2"):
        create_network_from_weights(1.0, flux_file, None, text_encoders, model)


# --- the held-out replay of lumina_train_network's validation pass ------------------------------------------
@pytest.mark.parametrize("prediction_type, weighting_scheme", [("raw", "uniform"), ("additive", "uniform"),
                                                               ("sigma_scaled", "uniform"),
                                                               ("sigma_scaled", "sigma_sqrt")])
def test_the_lumina_replay_is_the_trainers_validation_loss(sd, prediction_type, weighting_scheme):
    """lumina_train_network's get_noise_pred_and_target for validation batches: the DiT with keywords and
    t = 1 - timesteps / 1000, apply_model_prediction_type, conditional_loss against latents - noise, weighted."""
    model = narrow_nextdit(sd)
    network = create_network(1.0, 4, 2.0, None, [None], model)
    network.prepare_network(argparse.Namespace(validation_split=0.5, max_train_steps=10))
    network.apply_to([None], model, False, True)
    pretend_trained(network)
    args = argparse.Namespace(model_prediction_type=prediction_type, weighting_scheme=weighting_scheme)

    def validation_pass():
        losses = []
        network.eval()
        with torch.no_grad():
            for seed in range(2):
                g = torch.Generator().manual_seed(seed)
                latents, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
                sigmas = torch.rand(1, generator=g).view(-1, 1, 1, 1)
                timesteps = sigmas.flatten() * 1000
                noisy = (1 - sigmas) * latents + sigmas * noise
                cap_feats, cap_mask = torch.randn(1, 5, 32, generator=g), torch.ones(1, 5, dtype=torch.int32)
                out = model(x=noisy, t=1 - timesteps / 1000, cap_feats=cap_feats, cap_mask=cap_mask)
                pred, weighting = sd.lumina_train_util.apply_model_prediction_type(args, out, noisy, sigmas)
                loss = sd.train_util.conditional_loss(pred.float(), (latents - noise).float(), "l2", "none", None)
                loss = loss * weighting if weighting is not None else loss
                losses.append(loss.mean(dim=(1, 2, 3)))
        network.train()
        return torch.cat(losses)

    assert_the_replay_is_the_validation_pass(network, validation_pass, calls=2)
