"""FLUX.1 and SD3 against sd-scripts' own code, in process: its ``Flux`` and ``MMDiT`` (narrow widths), its
``networks.lora_flux`` / ``networks.lora_sd3``, its block swap, fp8 weights, and the functions its
trainers make their prediction with.

Needs sd-scripts (``../shared/sd-scripts``) and its pinned stack, like tests/test_sd_scripts_e2e.py:
skipped without them, a failure with ``CI=true`` (``ACLORA_SD_SCRIPTS_E2E=0`` turns them off).
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

import dit_stand_ins as st
import sd_scripts_fixtures as e2e
from aclora_ext import create_network, create_network_from_weights
from helpers import assert_the_replay_is_the_validation_pass, named_groups, pretend_trained

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only


@pytest.fixture(scope="module")
def sd(request):
    """sd-scripts' modules: library.* and networks.lora_flux / lora_sd3, imported from its folder."""
    e2e.import_sd_scripts_in_process()
    import networks.lora_flux as lora_flux
    import networks.lora_sd3 as lora_sd3
    from library import flux_models, flux_train_utils, flux_utils, sd3_models, sd3_train_utils, train_util

    return argparse.Namespace(lora_flux=lora_flux, lora_sd3=lora_sd3, flux_models=flux_models, flux_utils=flux_utils,
                              flux_train_utils=flux_train_utils, sd3_models=sd3_models,
                              sd3_train_utils=sd3_train_utils, train_util=train_util)


def narrow_flux(sd, double=2, single=3, seed=0):
    torch.manual_seed(seed)
    params = dataclasses.replace(sd.flux_models.configs["dev"].params, hidden_size=64, num_heads=2,
                                 axes_dim=[8, 12, 12], depth=double, depth_single_blocks=single, context_in_dim=32,
                                 vec_in_dim=16)
    return sd.flux_models.Flux(params)


def narrow_mmdit(sd, depth=3, self_attention=(0,), seed=0):
    torch.manual_seed(seed)
    params = sd.sd3_models.SD3Params(
        patch_size=2, depth=depth, num_patches=64, pos_embed_max_size=8, adm_in_channels=32, qk_norm=None,
        x_block_self_attn_layers=list(self_attention), context_embedder_in_features=32,
        context_embedder_out_features=64 * depth, model_type="medium")
    model = sd.sd3_models.create_sd3_mmdit(params)
    with torch.no_grad():
        model.pos_embed.normal_()
    return model


def tiny_text_encoders(kind: str):
    from test_families import clip, t5

    return [clip(), t5()] if kind == "flux" else [clip(projection=True), clip(24, projection=True), t5()]


def theirs(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.lora_dim, float(m.alpha)) for m in network.text_encoder_loras + network.unet_loras}


def ours(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.rank, float(m.alpha)) for m in network.loras}


# --- the stand-ins are sd-scripts' models, layer for layer --------------------------------------------
def _layers(model):
    return {p: (type(m).__name__, tuple(m.weight.shape)) for p, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def test_the_stand_ins_have_the_layers_of_sd_scripts_models(sd):
    with torch.device("meta"):
        flux = sd.flux_models.Flux(dataclasses.replace(sd.flux_models.configs["dev"].params, depth=2,
                                                       depth_single_blocks=1))
        mmdit = sd.sd3_models.create_sd3_mmdit(sd.sd3_models.SD3Params(
            patch_size=2, depth=3, num_patches=64, pos_embed_max_size=8, adm_in_channels=2048, qk_norm=None,
            x_block_self_attn_layers=[1], context_embedder_in_features=4096, context_embedder_out_features=192,
            model_type="medium"))
    assert _layers(flux) == _layers(st.flux(2, 1))
    assert _layers(mmdit) == _layers(st.mmdit(3, (1,)))


# --- the same layers, names, ranks and alphas as sd-scripts' own modules --------------------------------
FLUX_CASES = {
    "defaults": {},
    "train_t5xxl": {"train_t5xxl": "True"},
    "per-type": {"img_attn_dim": "2", "txt_mlp_dim": "0", "single_dim": "3", "single_mod_dim": "0",
                 "img_mod_dim": "5"},
    "single-only": {"train_blocks": "single"},
    "double-only": {"train_blocks": "double"},
    "block-indices": {"train_double_block_indices": "1", "train_single_block_indices": "0,2"},
    "no-double-block": {"train_double_block_indices": "none"},
    "in_dims": {"in_dims": "[1,2,0,3,4]"},
    "reg-dims": {"network_reg_dims": "double_blocks_0_img=6,single_blocks_1_=0", "img_attn_dim": "2",
                 "train_double_block_indices": "1"},
}
SD3_CASES = {
    "defaults": {},
    "train_t5xxl": {"train_t5xxl": "True"},
    "per-type": {"context_attn_dim": "2", "context_mlp_dim": "0", "x_attn_dim": "3", "x_mod_dim": "0"},
    "block-indices": {"train_block_indices": "0,2"},
    "emb_dims": {"emb_dims": "[1,2,3,4,5,6]"},
    "emb_dims-conv": {"emb_dims": "[0,2,0,0,0,1]", "conv_dim": "5", "conv_alpha": "1.5"},
}


@pytest.mark.parametrize("args", FLUX_CASES.values(), ids=FLUX_CASES.keys())
def test_flux_modules_are_lora_flux_modules(sd, args):
    model, text_encoders = narrow_flux(sd), tiny_text_encoders("flux")
    expected = theirs(sd.lora_flux.create_network(1.0, 4, 2.0, None, text_encoders, model, **args))
    network = create_network(1.0, 4, 2.0, None, text_encoders, model, **args)
    assert ours(network) == expected
    assert network.train_t5xxl == any(n.startswith("lora_te3_") for n in expected)


@pytest.mark.parametrize("args", SD3_CASES.values(), ids=SD3_CASES.keys())
def test_sd3_modules_are_lora_sd3_modules(sd, args):
    model, text_encoders = narrow_mmdit(sd), tiny_text_encoders("sd3")
    expected = theirs(sd.lora_sd3.create_network(1.0, 4, 2.0, None, text_encoders, model, **args))
    assert ours(create_network(1.0, 4, 2.0, None, text_encoders, model, **args)) == expected


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_our_files_and_theirs_load_both_ways_at_every_modules_rank(sd, kind, tmp_path):
    """Our variable-rank file: sd-scripts' create_network_from_weights builds each module at its rank and
    loads it strictly. Their file: ours builds the same modules and applies the same update."""
    model = narrow_flux(sd) if kind == "flux" else narrow_mmdit(sd)
    text_encoders = tiny_text_encoders(kind)
    module = sd.lora_flux if kind == "flux" else sd.lora_sd3
    reg = "double_blocks_0_img_attn=2,single_blocks_1_=3" if kind == "flux" else "joint_blocks_0_x_block_attn=2,mlp=3"
    ours_file = str(tmp_path / "ours.safetensors")
    source = pretend_trained(create_network(1.0, 4, 2.0, None, text_encoders, model, train_t5xxl="True",
                                            network_reg_dims=reg, restart_mode="off"))
    source.save_weights(ours_file, torch.float32, {})
    network, weights = module.create_network_from_weights(1.0, ours_file, None, text_encoders, model)
    assert theirs(network) == ours(source)
    assert not network.load_state_dict(weights, strict=False).missing_keys
    # their file, read by ours
    their_file = str(tmp_path / "theirs.safetensors")
    kohya = module.create_network(1.0, 4, 2.0, None, text_encoders, model, train_t5xxl="True")
    kohya.apply_to(text_encoders, model, True, True)  # registers its modules (its state dict is empty before)
    with torch.no_grad():
        for m in kohya.text_encoder_loras + kohya.unet_loras:
            m.lora_up.weight.normal_()
    kohya.save_weights(their_file, torch.float32, {})
    loaded, _ = create_network_from_weights(1.0, their_file, None, text_encoders, model)
    loaded.load_weights(their_file)
    assert ours(loaded) == theirs(kohya)
    for m in loaded.loras:
        k = getattr(kohya, m.lora_name)
        expected = (k.lora_up.weight.flatten(1) @ k.lora_down.weight.flatten(1)) * (float(k.alpha) / k.lora_dim)
        torch.testing.assert_close(m.delta_weight().flatten(1), expected, rtol=1e-5, atol=1e-6)


# --- block swap, fp8 ---------------------------------------------------------------------------------------
def flux_inputs(batch=1, tokens=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, 16, 64, generator=g), img_ids=torch.zeros(batch, 16, 3),
                txt=torch.randn(batch, tokens, 32, generator=g), txt_ids=torch.zeros(batch, tokens, 3),
                y=torch.randn(batch, 16, generator=g), timesteps=torch.rand(batch, generator=g),
                guidance=torch.full((batch,), 3.5))


def test_block_swap_never_moves_or_aliases_a_lora_factor(sd):
    """sd-scripts' block swap copies .weight.data of every submodule of a swapped block. On a CPU it aliases
    the blocks' own weights (a bug of its CPU path, not ours); the LoRA factors are no submodule of a block,
    so they stay where and what they are, and every LoRA keeps the layer Parameter the model uses."""
    model = narrow_flux(sd, double=2, single=4)
    network = create_network(1.0, 4, 2.0, None, [None, None], model)
    network.apply_to(None, model, False, True)
    pretend_trained(network)
    in_blocks = {id(p) for block in [*model.double_blocks, *model.single_blocks] for p in block.parameters()}
    assert not any(id(p) in in_blocks for p in network.parameters())
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in network.named_parameters()}
    model.enable_block_swap(1, torch.device("cpu"))
    model.prepare_block_swap_before_forward()
    model.requires_grad_(False)
    model(**flux_inputs()).float().pow(2).mean().backward()
    model.prepare_block_swap_before_forward()
    for name, p in network.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p.detach(), before[name][1]), name
        assert p.grad is not None, name
    parameters = dict(model.named_parameters())
    for m in network.loras:
        path = next(p for p, layer in model.named_modules() if layer is m.org_module)
        assert m.org_module.weight is parameters[f"{path}.weight"]


def test_fp8_base_weights_are_upcast_by_everything_that_reads_them(sd):
    model = narrow_flux(sd).to(torch.float8_e4m3fn)
    network = create_network(1.0, 4, 2.0, None, [None, None], model)
    network.apply_to(None, model, False, True)
    pretend_trained(network)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**flux_inputs())
    out.float().pow(2).mean().backward()
    assert all(m.lora_down.weight.grad is not None for m in network.loras)
    m = network.loras[0]
    base = m.org_module.weight.detach().float().clone()
    network.merge_to(None, model, None, torch.float32, "cpu")
    torch.testing.assert_close(m.org_module.weight.float(), base + m.delta_weight(), rtol=1e-5, atol=1e-6)


# --- the held-out replay of the trainers' validation pass ----------------------------------------------------
def validation_network(model, text_encoders):
    network = create_network(1.0, 4, 2.0, None, text_encoders, model)
    network.prepare_network(argparse.Namespace(validation_split=0.5, max_train_steps=10))
    network.apply_to(text_encoders, model, False, True)
    return pretend_trained(network, scale=0.5)  # large enough that the multiplier moves every prediction type


@pytest.mark.parametrize("prediction_type, weighting_scheme", [("sigma_scaled", "uniform"), ("raw", "uniform"),
                                                               ("additive", "uniform"),
                                                               ("sigma_scaled", "sigma_sqrt")])
def test_the_flux_replay_is_the_trainers_validation_loss(sd, prediction_type, weighting_scheme):
    """flux_train_network's get_noise_pred_and_target and process_batch for validation batches: the DiT with
    keywords only, unpack_latents, apply_model_prediction_type, conditional_loss times the weighting."""
    model = narrow_flux(sd)
    network = validation_network(model, [None, None])
    args = argparse.Namespace(model_prediction_type=prediction_type, weighting_scheme=weighting_scheme)

    def validation_pass():
        losses = []
        network.eval()
        with torch.no_grad():
            for seed in range(2):
                g = torch.Generator().manual_seed(seed)
                latents, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
                sigmas = torch.rand(1, generator=g).view(-1, 1, 1, 1)
                noisy = (1 - sigmas) * latents + sigmas * noise
                inputs = {**flux_inputs(seed=seed), "img": sd.flux_utils.pack_latents(noisy),
                          "timesteps": sigmas.flatten()}
                pred = sd.flux_utils.unpack_latents(model(**inputs), 4, 4)
                pred, weighting = sd.flux_train_utils.apply_model_prediction_type(args, pred, noisy, sigmas)
                loss = sd.train_util.conditional_loss(pred.float(), (noise - latents).float(), "l2", "none", None)
                loss = loss * weighting if weighting is not None else loss
                losses.append(loss.mean(dim=(1, 2, 3)))
        network.train()
        return torch.cat(losses)

    assert_the_replay_is_the_validation_pass(network, validation_pass, calls=2)


def test_the_sd3_replay_is_the_trainers_validation_loss(sd):
    """sd3_train_network: mmdit(noisy, t, context=, y=), out * (-t/1000) + noisy, weighted, against latents."""
    model = narrow_mmdit(sd)
    network = validation_network(model, [None, None, None])
    losses = []
    network.eval()
    with torch.no_grad():
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            latents, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
            timesteps = torch.randint(1, 1000, (1,), generator=g).float()
            sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
            noisy = sigmas * noise + (1.0 - sigmas) * latents
            out = model(noisy, timesteps, context=torch.randn(1, 4, 32, generator=g), y=torch.randn(1, 32, generator=g))
            pred = out * (-sigmas) + noisy
            weighting = sd.sd3_train_utils.compute_loss_weighting_for_sd3(weighting_scheme="sigma_sqrt", sigmas=sigmas)
            loss = sd.train_util.conditional_loss(pred.float(), latents.float(), "l2", "none", None) * weighting
            losses.append(loss.mean(dim=(1, 2, 3)))
    network.train()
    recorder = network.rank_search.loss_fn
    assert recorder.ready and torch.allclose(recorder(), torch.cat(losses), rtol=1e-6, atol=1e-8)


# --- no host read in a training step --------------------------------------------------------------------------
def test_a_flux_training_step_with_the_replay_recorder_reads_nothing_back_to_the_host(sd):
    """The step of flux_train_network on the meta device (shapes, no data), with the network's validation
    recorder and the wrapped prediction functions in place: nothing of ours reads a device tensor back to
    the host (test_meta_step's guard, counting the reads made under an aclora_ext frame: sd-scripts' own
    FLUX.1 forward moves a few host tensors to the device, which is not ours to change)."""
    import traceback

    from test_meta_step import HostReadGuard

    class OursOnly(HostReadGuard):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if self._reads(func, args, kwargs):
                stack = traceback.extract_stack()
                self.reads.append((str(func), any("/aclora_ext/" in f.filename for f in stack)))
            return func(*args, **kwargs)

    with torch.device("meta"):
        model = narrow_flux(sd)
    network = validation_network(model, [None, None]).to("meta")
    assert network.rank_search.loss_fn is not None  # the recorder and its function wrappers are on
    args = argparse.Namespace(model_prediction_type="sigma_scaled", weighting_scheme="uniform")
    with torch.device("meta"):
        inputs = {k: v.to("meta") for k, v in flux_inputs().items()}
        latents, noise, sigmas = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.rand(1, 1, 1, 1)
    network.train()
    with OursOnly() as guard:
        network.on_step_start(None, model)
        pred = sd.flux_utils.unpack_latents(model(**inputs), 4, 4)
        pred, weighting = sd.flux_train_utils.apply_model_prediction_type(args, pred, (1 - sigmas) * latents, sigmas)
        loss = sd.train_util.conditional_loss(pred.float(), (noise - latents).float(), "l2", "none", None) * weighting
        loss.mean().backward()
    assert [op for op, ours in guard.reads if ours] == []
    assert all(m.lora_down.weight.grad is not None for m in network.loras)


# --- network_reg_lrs: lora_flux's optimizer groups ------------------------------------------------------
@pytest.mark.parametrize("args", [
    {"network_reg_lrs": "double_blocks_0_img=1e-5,single_blocks=0,txt_attn=3e-6,self_attn_q_proj=1e-6"},
    {"network_reg_lrs": "single_blocks_1_=2e-5,img_mlp=7e-6", "loraplus_lr_ratio": "4", "train_t5xxl": "True"},
])
def test_network_reg_lrs_makes_lora_flux_groups(sd, args):
    """The same groups (description, lr, parameters) as lora_flux's, text-encoder groups included."""
    model, text_encoders = narrow_flux(sd), tiny_text_encoders("flux")
    theirs_ = sd.lora_flux.create_network(1.0, 4, 2.0, None, text_encoders, model, **args)
    theirs_.apply_to(text_encoders, model, True, True)  # as the trainer does first (it drops org_module)
    ours_ = create_network(1.0, 4, 2.0, None, text_encoders, model, **args)
    expected = named_groups(theirs_, *theirs_.prepare_optimizer_params_with_multiple_te_lrs([5e-5, 4e-5], 1e-4, 1e-3))
    got = named_groups(ours_, *ours_.prepare_optimizer_params([5e-5, 4e-5], 1e-4, 1e-3))
    unet = [g for g in expected if g[0].startswith("unet")]
    assert [g for g in got if g[0].startswith("unet")] == unet and any("reg_lr" in g[0] for g in unet)
    # text-encoder groups: lora_flux writes "textencoder 1  reg_lr_2"; the same lrs and parameters
    assert sorted((lr, names) for d, lr, names in got if d.startswith("text")) == sorted(
        (lr, names) for d, lr, names in expected if d.startswith("text"))
