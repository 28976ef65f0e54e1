"""``aclora vram`` on FLUX.1 and SD3/SD3.5: the DiT trainers' step counted on the meta device.

What is pinned: the DiT layouts carry sd-scripts' LoRA targets with their fused shapes and names
(lora_flux / lora_sd3), so a rank-R module has R*(in+out) parameters as sd-scripts' has; the frozen
weights, LoRA, gradients and AdamW state are exactly their sizes; block swap takes exactly the swapped
blocks' weights (not their biases) off the device, refusing what sd-scripts refuses; the activation peak
of a tiny FLUX/SD3 step agrees with the CPU's real allocations (torch.profiler); sd-scripts' FLUX/SD3
arguments are read, listed or refused with the key, the value and what is allowed; the family and model
are told from the arguments; the full-size numbers docs/vram.md quotes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from aclora_ext.harness import dit as D
from aclora_ext.harness.architectures import flux_module_shapes, sd3_module_shapes
from aclora_ext.tools import vram
from aclora_ext.tools.vram.dit import build_dit_models, dit_targets, offloaded_weights, swapped_blocks
from helpers import import_or_fail
from vram_checks import assert_the_profiler_agrees

import_or_fail("transformers", "the DiT text encoders are transformers models")
ROOT = Path(__file__).resolve().parents[1]

TINY_CLIP_L = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "quick_gelu"}
TINY_CLIP_G = {**TINY_CLIP_L, "hidden_size": 48, "projection_dim": 48, "num_attention_heads": 3, "hidden_act": "gelu"}
TINY_T5 = {**D.T5XXL_CONFIG, "vocab_size": 1000, "d_model": 48, "d_kv": 8, "d_ff": 96, "num_layers": 2, "num_heads": 6}
TINY_TEXT = {"clip_l": TINY_CLIP_L, "clip_g": TINY_CLIP_G, "t5xxl": TINY_T5}
TINY_FLUX = D.small(D.FLUX_DEV, hidden_size=128, num_heads=4, depth=3, depth_single_blocks=6, vec_in_dim=32,
                    context_in_dim=48, axes_dim=(8, 12, 12))
TINY_SD3 = D.small(D.SD35_MEDIUM, depth=4, pos_embed_max_size=16, adm_in_channels=32 + 48, context_in_features=48,
                   x_block_self_attn_layers=(0, 1))
TINY = {"flux": TINY_FLUX, "sd3": TINY_SD3}


def rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def storage_bytes(tensors) -> int:
    return sum(rounded(t.numel() * t.element_size()) for t in tensors)


def tiny_setup(family: str, **changes) -> vram.Setup:
    settings = dict(family=family, width=128, height=128, batch_size=2, rank=8, alpha=4.0, mixed_precision="no",
                    gradient_checkpointing=False, train_text_encoder=False, cache_text_encoder_outputs=True,
                    t5_tokens=16)
    settings.update(changes)
    return vram.Setup(**settings)


def tiny_models(setup: vram.Setup, device: str = "meta") -> vram.Models:
    return build_dit_models(setup, device, TINY[setup.family], TINY_TEXT)


def tiny_estimate(setup: vram.Setup, block_bytes: int = vram.BLOCK_BYTES):
    models = tiny_models(setup)
    return vram.estimate(setup, models=models, measure_restart=False, block_bytes=block_bytes), models


# --- the layouts: sd-scripts' targets, names and shapes ---------------------------------------------------------------
def test_the_full_flux_layout_has_lora_fluxs_304_modules_with_their_fused_shapes_and_names():
    shapes = flux_module_shapes()
    by_name = {s.lora_name: (s.out_features, s.in_features) for s in shapes}
    assert len(shapes) == 304 + 72 + 168
    assert by_name["lora_unet_double_blocks_0_img_attn_qkv"] == (9216, 3072)
    assert by_name["lora_unet_double_blocks_18_txt_attn_proj"] == (3072, 3072)
    assert by_name["lora_unet_double_blocks_5_img_mlp_0"] == (12288, 3072)
    assert by_name["lora_unet_double_blocks_5_txt_mlp_2"] == (3072, 12288)
    assert by_name["lora_unet_double_blocks_3_img_mod_lin"] == (18432, 3072)
    assert by_name["lora_unet_single_blocks_37_linear1"] == (21504, 3072)
    assert by_name["lora_unet_single_blocks_0_linear2"] == (3072, 15360)
    assert by_name["lora_unet_single_blocks_0_modulation_lin"] == (9216, 3072)
    assert by_name["lora_te1_text_model_encoder_layers_11_mlp_fc2"] == (768, 3072)
    assert by_name["lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1"] == (10240, 4096)
    assert sum(n.startswith("lora_unet_double_blocks_") for n in by_name) == 190
    assert sum(n.startswith("lora_unet_single_blocks_") for n in by_name) == 114


def test_the_sd35_medium_layout_has_lora_sd3s_modules_with_the_pre_only_last_block_and_attn2():
    names = {s.lora_name: (s.out_features, s.in_features) for s in sd3_module_shapes()}
    assert len(names) == 263 + 72 + 192 + 168
    assert names["lora_unet_joint_blocks_0_context_block_attn_qkv"] == (4608, 1536)
    assert names["lora_unet_joint_blocks_12_x_block_attn2_qkv"] == (4608, 1536)
    assert "lora_unet_joint_blocks_13_x_block_attn2_qkv" not in names
    assert names["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1"] == (9 * 1536, 1536)  # with attn2: 9 mods
    assert names["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"] == (2 * 1536, 1536)  # pre-only
    assert "lora_unet_joint_blocks_23_context_block_attn_proj" not in names
    assert names["lora_te2_text_model_encoder_layers_31_self_attn_q_proj"] == (1280, 1280)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_estimates_lora_modules_are_sd_scripts_own_and_have_their_parameter_count(family):
    """The network vram attaches has exactly lora_flux's / lora_sd3's DiT modules (names and fused shapes), so a
    rank-R module holds R*(in+out) parameters, as sd-scripts' LoRAModule on the fused layer does."""
    setup = vram.Setup(family=family, cache_text_encoder_outputs=True, rank=32)
    models = build_dit_models(setup)
    targets = dit_targets(models, setup)
    expected = flux_module_shapes(False) if family == "flux" else sd3_module_shapes(False)
    assert [t.lora_name for t in targets] == [s.lora_name for s in expected]
    assert [(t.layer.out_features, t.layer.in_features) for t in targets] == \
        [(s.out_features, s.in_features) for s in expected]
    assert vram.dit.lora_parameter_count(targets, 32) == 32 * sum(s.in_features + s.out_features for s in expected)
    if family == "flux":
        assert vram.dit.lora_parameter_count(targets, 32) == 153_157_632


# --- the count against sizes computed by hand --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("case", ["dit only, bf16", "text encoders trained, checkpointing, fp8"])
def test_weights_gradients_and_adam_state_are_exactly_their_sizes(family, case):
    if case.startswith("dit only"):
        setup = tiny_setup(family, mixed_precision="bf16")
    else:
        setup = tiny_setup(family, mixed_precision="bf16", fp8_base=True, gradient_checkpointing=True,
                           train_text_encoder=True, cache_text_encoder_outputs=False)
    result, models = tiny_estimate(setup)
    dit = models.unet
    assert result.largest[vram.FROZEN_UNET] == storage_bytes([*dit.parameters(), *dit.buffers()])
    te_bytes = storage_bytes([t for te in models.text_encoders for t in [*te.parameters(), *te.buffers()]])
    assert result.largest.get(vram.FROZEN_TE, 0) == te_bytes
    if case.startswith("dit only"):
        assert not models.text_encoders  # cached outputs: CLIP and T5 stay on the CPU
    else:
        assert len(models.text_encoders) == (2 if family == "flux" else 3)
        assert all(p.dtype in (torch.float8_e4m3fn, torch.bfloat16) for te in models.text_encoders
                   for p in te.parameters())
        assert all(p.dtype == torch.float8_e4m3fn for p in dit.parameters())
    targets = dit_targets(models, setup)
    lora = sum(rounded(4 * setup.rank * t.layer.in_features) + rounded(4 * setup.rank * t.layer.out_features)
               for t in targets)  # lora_down and lora_up in fp32
    assert result.lora_parameters == vram.dit.lora_parameter_count(targets, setup.rank)
    assert result.modules == len(targets) == (len([t for t in targets if t.part == "unet"])
                                              + 12 * len(vram.dit.trained_clips(models, setup)))
    network = lora_network(models, setup)
    assert result.largest[vram.LORA] == storage_bytes([*network.parameters(), *network.buffers()])
    grads = lora
    if setup.train_text_encoder and setup.gradient_checkpointing:  # sd-scripts' checkpointing workaround
        grads += storage_bytes(p for te in vram.dit.trained_clips(models, setup)
                               for p in getattr(te, "text_model", te).embeddings.parameters())
    assert result.largest[vram.GRADIENTS] == grads
    assert result.largest[vram.OPTIMIZER_STATE] == 2 * lora  # AdamW: two fp32 moments per LoRA parameter


def lora_network(models: vram.Models, setup: vram.Setup):
    """The network the estimate attaches (built again on the meta device, detached)."""
    run = vram.DitTrainingStep(models, setup, "meta")
    run.close()
    return run.network


def test_block_swap_takes_exactly_the_swapped_blocks_weights_off_the_device():
    """blocks_to_swap 2 on FLUX: the last 1 double and 2 single blocks; each submodule's weight leaves the device
    (the Linears'; the RMSNorm scales are not ``weight``s), biases stay. Fewer frozen bytes, nothing else."""
    plain, models = tiny_estimate(tiny_setup("flux", mixed_precision="bf16", fp8_base=True))
    swapped_setup = tiny_setup("flux", mixed_precision="bf16", fp8_base=True, blocks_to_swap=2)
    swapped, models = tiny_estimate(swapped_setup)
    blocks = swapped_blocks(models.unet, swapped_setup)
    assert blocks == [models.unet.double_blocks[2], models.unet.single_blocks[4], models.unet.single_blocks[5]]
    weights = offloaded_weights(models.unet, swapped_setup)
    assert len(weights) == 10 + 2 * 3  # the Linears of one double and two single blocks
    assert all(w.dtype == torch.float8_e4m3fn and w.dim() == 2 for w in weights)
    assert plain.largest[vram.FROZEN_UNET] - swapped.largest[vram.FROZEN_UNET] == storage_bytes(weights)
    for category in (vram.LORA, vram.GRADIENTS, vram.OPTIMIZER_STATE):
        assert plain.largest[category] == swapped.largest[category]
    sd3_setup = tiny_setup("sd3", blocks_to_swap=2)
    sd3 = tiny_models(sd3_setup)
    assert swapped_blocks(sd3.unet, sd3_setup) == list(sd3.unet.joint_blocks[2:])
    # SD3's q/k RMSNorms have a weight: the offloader moves it too
    assert any(w.dim() == 1 for w in offloaded_weights(sd3.unet, sd3_setup))


@pytest.mark.parametrize("family, swap, message", [
    ("flux", 36, "blocks_to_swap=36 is not valid; allowed: an integer from 0 to 35 for FLUX.1 dev (it swaps N//2 "
                 "double and (N - N//2)*2 single blocks"),
    ("sd3", 23, "blocks_to_swap=23 is not valid; allowed: an integer from 0 to 22 for SD3.5 medium"),
])
def test_a_blocks_to_swap_sd_scripts_would_refuse_is_refused(family, swap, message):
    with pytest.raises(vram.VramError) as error:
        vram.Setup(family=family, blocks_to_swap=swap)
    assert message in str(error.value)
    with pytest.raises(vram.VramError, match="blocks_to_swap=4 swaps 2 double blocks, but this model has 3"):
        tiny_models(tiny_setup("flux", blocks_to_swap=4))  # a model smaller than the variant's


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_peak_agrees_with_real_cpu_allocations_measured_by_the_profiler(family, checkpointing):
    """The same tiny FLUX/SD3 step (text encoders run, CLIP trained) counted on meta and run on the CPU under
    torch.profiler: the memory the step adds at its peak agrees within 5% (fp32, so that the CPU runs the
    operators the count sees)."""
    setup = tiny_setup(family, gradient_checkpointing=checkpointing, train_text_encoder=True,
                       cache_text_encoder_outputs=False)
    result, _ = tiny_estimate(setup, block_bytes=1)
    counted = result.peak_bytes - result.before_step_bytes

    torch.manual_seed(0)
    cpu = tiny_models(setup, "cpu")
    run = vram.DitTrainingStep(cpu, setup, "cpu")
    assert_the_profiler_agrees(counted, run)


# --- reading sd-scripts' FLUX/SD3 arguments ----------------------------------------------------------------------------
def setup_of(arguments: dict, family=None, variant=None):
    return vram.setup_from_arguments({k: (v, "test.toml") for k, v in arguments.items()}, family, None, variant)


@pytest.mark.parametrize("arguments, family, variant", [
    ({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors"}, "flux", "dev"),
    ({"pretrained_model_name_or_path": "/m/flux1-schnell-fp8.safetensors"}, "flux", "schnell"),
    ({"pretrained_model_name_or_path": "/m/model.safetensors", "ae": "/m/ae.safetensors"}, "flux", "dev"),
    ({"pretrained_model_name_or_path": "/m/sd3.5_medium.safetensors"}, "sd3", "5-medium"),
    ({"pretrained_model_name_or_path": "/m/sd3.5_large.safetensors"}, "sd3", "5-large"),
    ({"pretrained_model_name_or_path": "/m/sd3_medium_incl_clips.safetensors"}, "sd3", "medium"),
    ({"pretrained_model_name_or_path": "/m/model.safetensors", "clip_g": "/m/clip_g.safetensors"}, "sd3", "5-medium"),
    ({"pretrained_model_name_or_path": "/m/sd_xl_base_1.0.safetensors"}, "sdxl", ""),
])
def test_the_family_and_model_are_told_from_the_arguments(arguments, family, variant):
    setup, notes = setup_of(arguments)
    assert (setup.family, setup.variant) == (family, variant)
    assert any(n.startswith(f"family {family}") for n in notes)


def test_flux_arguments_are_read_or_listed_as_not_changing_the_estimate():
    setup, notes = setup_of({
        "pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "ae": "/m/ae.sft", "clip_l": "/m/clip_l.sft",
        "t5xxl": "/m/t5xxl_fp8_e4m3fn.sft", "fp8_base": True, "blocks_to_swap": 8, "t5xxl_max_token_length": 256,
        "apply_t5_attn_mask": True, "model_prediction_type": "raw", "timestep_sampling": "shift",
        "guidance_scale": 1.0, "discrete_flow_shift": 3.1582, "mixed_precision": "bf16", "sdpa": True,
        "max_token_length": 225, "cache_text_encoder_outputs": True, "network_train_unet_only": True})
    assert (setup.family, setup.variant, setup.blocks_to_swap, setup.t5_tokens) == ("flux", "dev", 8, 256)
    assert setup.fp8_base and setup.apply_t5_attn_mask and setup.unet_dtype == torch.float8_e4m3fn
    assert setup.attention == "sdpa" and setup.max_token_length == 75
    listed = next(n for n in notes if n.startswith("DiT trainer arguments that do not change the estimate"))
    for key in ("ae", "clip_l", "t5xxl", "model_prediction_type", "timestep_sampling", "guidance_scale",
                "discrete_flow_shift"):
        assert key in listed
    assert any("max_token_length is not used" in n for n in notes)
    schnell, _ = setup_of({"pretrained_model_name_or_path": "/m/flux1-schnell.safetensors"})
    dev, _ = setup_of({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors"})
    sd3, _ = setup_of({"pretrained_model_name_or_path": "/m/sd3.5_medium.safetensors"})
    assert (schnell.t5_tokens, dev.t5_tokens, sd3.t5_tokens) == (256, 512, 256)  # sd-scripts' defaults
    split, notes = setup_of({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "split_mode": True})
    assert split.blocks_to_swap == 18 and any("split_mode" in n for n in notes)


@pytest.mark.parametrize("arguments, family, message", [
    ({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "clip_g": "/m/clip_g.sft"}, None,
     "test.toml: clip_g='/m/clip_g.sft' is an argument of sd3_train_network.py, not of flux_train_network.py "
     "(family 'flux')"),
    ({"pretrained_model_name_or_path": "/m/sd_xl_base.safetensors", "blocks_to_swap": 6}, None,
     "blocks_to_swap=6 is an argument of anima_train_network.py, flux_train_network.py, "
     "hunyuan_image_train_network.py, lumina_train_network.py and sd3_train_network.py, not of sdxl_train_network.py"),
    ({"v2": True, "t5xxl": "/m/t5.sft"}, None, "t5xxl='/m/t5.sft' is an argument of flux_train_network.py and "
                                               "sd3_train_network.py, not of train_network.py (family 'sd2')"),
    ({"ae": "/m/ae.sft"}, "sd3", "ae='/m/ae.sft' is an argument of flux_train_network.py and "
                                 "lumina_train_network.py, not of sd3_train_network.py"),
    ({"pretrained_model_name_or_path": "/m/model.safetensors", "t5xxl": "/m/t5.sft"}, None,
     "t5xxl='/m/t5.sft' belongs to flux_train_network.py and sd3_train_network.py, and nothing tells which: "
     "allowed: --family flux or --family sd3"),
    ({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "model_type": "flux2"}, None,
     "model_type='flux2' is not valid; allowed: flux, chroma"),
    ({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "blocks_to_swap": -1}, None,
     "blocks_to_swap=-1 is not valid; allowed: an integer >= 0"),
    ({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "t5xxl_max_token_length": 0}, None,
     "t5xxl_max_token_length=0 is not valid; allowed: an integer >= 1"),
    ({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "fp8_base_unet": True}, None,
     "fp8_base_unet=True is not modelled by aclora vram"),
    ({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "cpu_offload_checkpointing": True}, None,
     "cpu_offload_checkpointing=True is not modelled by aclora vram"),
])
def test_family_inconsistent_and_bad_arguments_are_refused_naming_key_value_and_what_is_allowed(arguments, family,
                                                                                                 message):
    with pytest.raises(vram.VramError) as error:
        setup_of(arguments, family)
    assert message in str(error.value)


def test_a_variant_of_another_family_or_an_unknown_one_is_refused():
    with pytest.raises(vram.VramError, match=r"--variant 'dev' is for family flux or sd3; family 'sdxl' has none"):
        setup_of({"pretrained_model_name_or_path": "/m/sd_xl.safetensors"}, variant="dev")
    with pytest.raises(vram.VramError,
                       match=r"variant='5-large' is not valid; allowed: dev, schnell, chroma \(family flux\)"):
        setup_of({"pretrained_model_name_or_path": "/m/flux1-dev.safetensors"}, variant="5-large")
    with pytest.raises(vram.VramError, match="family='sdxl' .allowed: family flux or sd3."):
        vram.Setup(family="sdxl", blocks_to_swap=2)


# --- full size: the numbers docs/vram.md quotes --------------------------------------------------------------------------
#: the FLUX.1/SD3/Chroma configurations docs/vram.md tabulates (the arguments of the sample configs)
DOC_RUNS = {
    "FLUX.1 dev, 24 GB": ["--pretrained_model_name_or_path", "flux1-dev.safetensors", "--resolution", "1024",
                          "--mixed_precision", "bf16", "--fp8_base", "--gradient_checkpointing", "--cache_latents",
                          "--cache_text_encoder_outputs", "--network_train_unet_only", "--network_dim", "32",
                          "--network_alpha", "16", "--optimizer_type", "Adafactor",
                          "--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False"],
    "FLUX.1 dev, 16 GB": ["--pretrained_model_name_or_path", "flux1-dev.safetensors", "--resolution", "1024",
                          "--mixed_precision", "bf16", "--fp8_base", "--blocks_to_swap", "8",
                          "--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs",
                          "--network_train_unet_only", "--network_dim", "32", "--network_alpha", "16",
                          "--optimizer_type", "Adafactor",
                          "--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False"],
    "Chroma, 24 GB": ["--pretrained_model_name_or_path", "Chroma.safetensors", "--model_type", "chroma",
                      "--apply_t5_attn_mask", "--resolution", "1024", "--mixed_precision", "bf16", "--fp8_base",
                      "--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs",
                      "--network_train_unet_only", "--network_dim", "32", "--network_alpha", "16",
                      "--optimizer_type", "AdamW"],
    "SD3.5 medium": ["--pretrained_model_name_or_path", "sd3.5_medium.safetensors", "--resolution", "1024",
                     "--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_latents",
                     "--cache_text_encoder_outputs", "--network_train_unet_only", "--network_dim", "32",
                     "--network_alpha", "16", "--optimizer_type", "AdamW"],
}


@pytest.mark.parametrize("name", list(DOC_RUNS))
def test_docs_quote_the_full_size_estimates_of_the_dit_sample_runs(name, capsys):
    from aclora_ext.tools.cli import main

    assert main(["vram", *DOC_RUNS[name], "--no-restart", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = rf"\| {re.escape(name)} \| ([\d.]+) \| ([\d.]+) \|"
    quoted = re.search(row, (ROOT / "docs" / "vram.md").read_text())
    assert quoted, f"docs/vram.md does not tabulate {name!r}"
    assert float(quoted.group(1)) == pytest.approx(report["peak_gib"], abs=0.015)
    assert float(quoted.group(2)) == pytest.approx(report["with_margin_gib"], abs=0.015)
    expected_fit = 24 if "24 GB" in name else 16 if "16 GB" in name else 12
    assert report["fits_gib"][str(expected_fit)], (name, report["with_margin_gib"])
    if name.startswith("FLUX"):
        assert report["lora_parameters"] == 153_157_632 and report["modules"] == 304
    if name.startswith("Chroma"):
        assert report["modules"] == 228
