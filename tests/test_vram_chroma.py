"""``aclora vram`` on Chroma (``flux_train_network.py --model_type chroma``): counted as the FLUX.1 trainer's
other model.

What is pinned: the Chroma layout is sd-scripts' own (every weight's name and shape, 8,899,983,424 parameters,
checked against ``library.chroma_models.Chroma`` built on the meta device) and computes what it computes (a
tiny one with the same weights gives sd-scripts' modulation vectors and prediction); its LoRA modules are
lora_flux's on Chroma's blocks (no modulation Linears: 228 at full size); no CLIP-L sits on the device, T5-XXL
only while its outputs are not cached; the frozen weights, LoRA, gradients and AdamW state are exactly their
sizes; block swap takes the swapped blocks' weights off the device; the activation peak of a tiny Chroma step
agrees with the CPU's real allocations; sd-scripts' Chroma arguments are read, or refused with the key, the
value and what is allowed.
"""

from __future__ import annotations


import pytest
import torch

from aclora_ext.harness import dit as D
from aclora_ext.harness.chroma_dit import Chroma
from aclora_ext.tools import vram
from aclora_ext.tools.vram.dit import build_dit_models, dit_targets, offloaded_weights, swapped_blocks
from helpers import import_or_fail
from vram_checks import assert_the_profiler_agrees

import_or_fail("transformers", "the DiT text encoders are transformers models")

TINY_T5 = {**D.T5XXL_CONFIG, "vocab_size": 1000, "d_model": 48, "d_kv": 8, "d_ff": 96, "num_layers": 2, "num_heads": 6}
TINY_CHROMA = D.ChromaConfig(hidden_size=128, num_heads=4, depth=3, depth_single_blocks=6, context_in_dim=48,
                             axes_dim=(8, 12, 12), approximator_hidden_size=64, approximator_depth=2)


def rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def storage_bytes(tensors) -> int:
    return sum(rounded(t.numel() * t.element_size()) for t in tensors)


def chroma_setup(**changes) -> vram.Setup:
    settings = dict(family="flux", variant="chroma", width=128, height=128, batch_size=2, rank=8, alpha=4.0,
                    mixed_precision="no", gradient_checkpointing=False, train_text_encoder=False,
                    cache_text_encoder_outputs=True, t5_tokens=16, apply_t5_attn_mask=True)
    settings.update(changes)
    return vram.Setup(**settings)


def tiny_models(setup: vram.Setup, device: str = "meta") -> vram.Models:
    return build_dit_models(setup, device, TINY_CHROMA, {"t5xxl": TINY_T5})


def tiny_estimate(setup: vram.Setup, block_bytes: int = vram.BLOCK_BYTES):
    models = tiny_models(setup)
    return vram.estimate(setup, models=models, measure_restart=False, block_bytes=block_bytes), models


# --- against sd-scripts' own Chroma -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chroma_models():
    """sd-scripts' library.chroma_models, imported from its folder."""
    import sd_scripts_fixtures as e2e

    e2e.import_sd_scripts_in_process()
    from library import chroma_models

    return chroma_models


@pytest.mark.sd_scripts
def test_the_full_chroma_layout_is_sd_scripts_own_weight_for_weight(chroma_models):
    with torch.device("meta"):
        theirs = chroma_models.Chroma(chroma_models.chroma_params)
        ours = Chroma(D.CHROMA)
    shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    assert list(shapes) == list(theirs.state_dict())  # the same order: the LoRA modules come in sd-scripts' order
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 8_899_983_424
    assert ours.mod_index.shape == theirs.mod_index.shape == (D.CHROMA.modulation_vectors,) == (344,)


@pytest.mark.sd_scripts
def test_a_tiny_chroma_with_sd_scripts_weights_computes_its_modulation_vectors_and_prediction(chroma_models):
    """The same weights in both; every caption fills the T5 length (the mask all ones), as the count assumes."""
    import dataclasses

    c = TINY_CHROMA
    params = dataclasses.replace(
        chroma_models.chroma_params, hidden_size=c.hidden_size, num_heads=c.num_heads, depth=c.depth,
        depth_single_blocks=c.depth_single_blocks, context_in_dim=c.context_in_dim, axes_dim=list(c.axes_dim),
        approximator_hidden_size=c.approximator_hidden_size, approximator_depth=c.approximator_depth)
    torch.manual_seed(0)
    theirs = chroma_models.Chroma(params).eval()
    ours = Chroma(c).eval()
    ours.load_state_dict(theirs.state_dict())
    b, h, w, t = 2, 4, 4, 5
    img, txt = torch.randn(b, h * w, c.in_channels), torch.randn(b, t, c.context_in_dim)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] += torch.arange(h)[:, None]
    img_ids[..., 2] += torch.arange(w)[None, :]
    img_ids = img_ids.reshape(1, h * w, 3).repeat(b, 1, 1)
    txt_ids, mask = torch.zeros(b, t, 3), torch.ones(b, t, dtype=torch.long)
    timesteps, guidance = torch.tensor([0.3, 0.8]), torch.zeros(b)
    with torch.no_grad():
        vectors = theirs.get_mod_vectors(timesteps=timesteps, guidance=guidance, batch_size=b)
        torch.testing.assert_close(ours.get_mod_vectors(timesteps, guidance, b), vectors)
        expected = theirs(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=None,
                          guidance=guidance, txt_attention_mask=mask, mod_vectors=vectors)
        got = ours(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, guidance=guidance,
                   txt_attention_mask=mask, mod_vectors=vectors)
    assert got.shape == (b, h * w, c.in_channels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --- the layout and what sits on the device ---------------------------------------------------------------------------
def test_chromas_lora_modules_are_lora_fluxs_on_its_blocks_without_modulation_linears():
    setup = vram.Setup(family="flux", variant="chroma", apply_t5_attn_mask=True, cache_text_encoder_outputs=True,
                       rank=32)
    models = build_dit_models(setup)
    names = {t.lora_name: (t.layer.out_features, t.layer.in_features) for t in dit_targets(models, setup)}
    assert len(names) == 19 * 8 + 38 * 2 == 228
    assert names["lora_unet_double_blocks_0_img_attn_qkv"] == (9216, 3072)
    assert names["lora_unet_double_blocks_18_txt_mlp_2"] == (3072, 12288)
    assert names["lora_unet_single_blocks_37_linear1"] == (21504, 3072)
    assert not [n for n in names if "mod" in n or "distilled" in n]
    assert models.text_encoders == [] and "text_encoders" not in models.on_device
    assert sum(p.numel() for p in models.unet.parameters()) == 8_899_983_424


def test_only_t5_sits_on_the_device_for_chroma_and_only_while_its_outputs_are_not_cached():
    uncached = tiny_models(chroma_setup(cache_text_encoder_outputs=False))
    assert [type(te).__name__ for te in uncached.text_encoders] == ["T5EncoderModel"]
    assert tiny_models(chroma_setup()).text_encoders == []


@pytest.mark.parametrize("case", ["bf16, text cached", "fp8, T5 on the device, checkpointing"])
def test_chromas_weights_gradients_and_adam_state_are_exactly_their_sizes(case):
    if case.startswith("bf16"):
        setup = chroma_setup(mixed_precision="bf16")
    else:
        setup = chroma_setup(mixed_precision="bf16", fp8_base=True, cache_text_encoder_outputs=False,
                             gradient_checkpointing=True)
    result, models = tiny_estimate(setup)
    dit = models.unet
    assert result.largest[vram.FROZEN_UNET] == storage_bytes([*dit.parameters(), *dit.buffers()])
    assert all(p.dtype == setup.unet_dtype for p in dit.parameters())
    text = [t for te in models.text_encoders for t in [*te.parameters(), *te.buffers()]]
    assert result.largest.get(vram.FROZEN_TE, 0) == storage_bytes(text)
    assert len(models.text_encoders) == (0 if setup.cache_text_encoder_outputs else 1)
    targets = dit_targets(models, setup)
    lora = sum(rounded(4 * setup.rank * t.layer.in_features) + rounded(4 * setup.rank * t.layer.out_features)
               for t in targets)  # lora_down and lora_up in fp32
    assert result.modules == len(targets) == 3 * 8 + 6 * 2
    assert result.lora_parameters == setup.rank * sum(t.layer.in_features + t.layer.out_features for t in targets)
    run = vram.DitTrainingStep(models, setup, "meta")
    run.close()
    assert result.largest[vram.LORA] == storage_bytes([*run.network.parameters(), *run.network.buffers()])
    assert result.largest[vram.GRADIENTS] == lora
    assert result.largest[vram.OPTIMIZER_STATE] == 2 * lora  # AdamW: two fp32 moments per LoRA parameter


def test_block_swap_takes_chromas_swapped_blocks_weights_off_the_device():
    plain, _ = tiny_estimate(chroma_setup(mixed_precision="bf16", fp8_base=True))
    setup = chroma_setup(mixed_precision="bf16", fp8_base=True, blocks_to_swap=2)
    swapped, models = tiny_estimate(setup)
    assert swapped_blocks(models.unet, setup) == [models.unet.double_blocks[2], *models.unet.single_blocks[4:]]
    weights = offloaded_weights(models.unet, setup)
    assert len(weights) == 8 + 2 * 2  # a double block's 8 Linears, a single block's 2 (no modulation)
    assert plain.largest[vram.FROZEN_UNET] - swapped.largest[vram.FROZEN_UNET] == storage_bytes(weights)
    assert plain.largest[vram.LORA] == swapped.largest[vram.LORA]
    with pytest.raises(vram.VramError, match="blocks_to_swap=36 is not valid; allowed: an integer from 0 to 35 for "
                                             "Chroma"):
        vram.Setup(family="flux", variant="chroma", apply_t5_attn_mask=True, blocks_to_swap=36)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_chroma_activation_peak_agrees_with_real_cpu_allocations_measured_by_the_profiler(checkpointing):
    """The same tiny Chroma step (T5 run) counted on meta and run on the CPU under torch.profiler: the memory
    the step adds at its peak agrees within 5% (fp32, so that the CPU runs the operators the count sees)."""
    setup = chroma_setup(gradient_checkpointing=checkpointing, cache_text_encoder_outputs=False)
    result, _ = tiny_estimate(setup, block_bytes=1)
    counted = result.peak_bytes - result.before_step_bytes

    torch.manual_seed(0)
    run = vram.DitTrainingStep(tiny_models(setup, "cpu"), setup, "cpu")
    assert_the_profiler_agrees(counted, run)


# --- reading sd-scripts' Chroma arguments -------------------------------------------------------------------------------
def setup_of(arguments: dict, variant=None):
    return vram.setup_from_arguments({k: (v, "test.toml") for k, v in arguments.items()}, None, None, variant)


CHROMA_RUN = {"pretrained_model_name_or_path": "/m/Chroma.safetensors", "model_type": "chroma",
              "t5xxl": "/m/t5xxl.sft", "ae": "/m/ae.sft", "apply_t5_attn_mask": True,
              "network_train_unet_only": True, "cache_text_encoder_outputs": True}


def test_model_type_chroma_is_read_as_chroma_with_sd_scripts_defaults():
    setup, notes = setup_of(CHROMA_RUN)
    assert (setup.family, setup.variant, setup.model_name, setup.t5_tokens) == ("flux", "chroma", "Chroma", 512)
    assert setup.is_chroma and not setup.train_text_encoder
    assert "model chroma (model_type = chroma)" in notes
    unet_only_missing, notes = setup_of({**CHROMA_RUN, "network_train_unet_only": False,
                                         "cache_text_encoder_outputs": False})
    assert not unet_only_missing.train_text_encoder
    assert any(n.startswith("Chroma without network_train_unet_only: no text-encoder LoRA") for n in notes)
    flux, _ = setup_of({**CHROMA_RUN, "pretrained_model_name_or_path": "/m/flux1-dev.sft", "model_type": "flux"})
    assert flux.variant == "dev"


@pytest.mark.parametrize("changes, variant, message", [
    ({"apply_t5_attn_mask": False}, None,
     "model_type='chroma' needs apply_t5_attn_mask=true (flux_train_network.py asserts it)"),
    ({"network_train_unet_only": False}, None,
     "train_text_encoder=True (no network_train_unet_only) is not valid for Chroma"),
    ({}, "dev", "--variant 'dev' and model_type='chroma' disagree"),
    ({"clip_l": "/m/clip_l.sft", "clip_g": "/m/clip_g.sft"}, None,
     "clip_g='/m/clip_g.sft' is an argument of sd3_train_network.py, not of flux_train_network.py"),
])
def test_bad_chroma_arguments_are_refused_naming_key_value_and_what_is_allowed(changes, variant, message):
    with pytest.raises(vram.VramError) as error:
        setup_of({**CHROMA_RUN, **changes}, variant)
    assert message in str(error.value)
