"""``aclora vram`` on HunyuanImage-2.1 (``hunyuan_image_train_network.py``).

What is pinned: the DiT layout is sd-scripts' own (every weight's name, shape and order, 17,425,795,520
parameters, against ``library.hunyuan_image_models.HYImageDiffusionTransformer`` on the meta device) and computes
what it computes (a tiny one with the same weights gives sd-scripts' prediction, in float32 and under
``--fp8_scaled`` with sd-scripts' own quantized weights); ``--fp8_scaled`` stores what sd-scripts' loader stores;
the LoRA modules are lora_hunyuan_image's (320 at full size); the frozen weights, LoRA, gradients and AdamW
state are exactly their sizes; block swap takes the swapped blocks' weights off the device; the activation peak
of a tiny step agrees with the CPU's real allocations; the trainer's arguments are read, or refused with the
key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aclora_ext.harness import hunyuan_image_dit as H
from aclora_ext.tools import vram
from aclora_ext.tools.vram.hunyuan_image import (
    HunyuanImageTrainingStep,
    build_hunyuan_image_models,
    fp8_linears,
    offloaded_weights,
    swapped_blocks,
)
from vram_checks import assert_the_profiler_agrees

SAMPLE = Path(__file__).resolve().parents[1] / "sample_configs" / "hunyuan_image_style_24gb.toml"
# tests/hunyuan_image_fixtures.py's narrowed sd-scripts DiT (hidden 128 = one head of 128, 2 double, 3 single)
TINY = H.small(H.HUNYUAN_IMAGE_21, hidden_size=128, num_heads=1, depth_double=2, depth_single=3, text_dim=128,
               byt5_dim=32, byt5_hidden=64)
# for the counts: more blocks (block swap) and two heads (of 64: RoPE on 32 + 32 channels)
TINY_COUNT = H.small(TINY, num_heads=2, rope_dims=(32, 32), text_dim=64, depth_double=3, depth_single=4)


def rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def storage_bytes(tensors) -> int:
    return sum(rounded(t.numel() * t.element_size()) for t in tensors)


def hy_setup(**changes) -> vram.Setup:
    settings = dict(family="hunyuan_image", width=512, height=512, batch_size=2, rank=8, alpha=4.0,
                    mixed_precision="bf16", gradient_checkpointing=False, train_text_encoder=False,
                    cache_text_encoder_outputs=True, cache_latents=True)
    settings.update(changes)
    return vram.Setup(**settings)


def tiny_estimate(setup: vram.Setup, block_bytes: int = vram.BLOCK_BYTES):
    models = build_hunyuan_image_models(setup, "meta", TINY_COUNT)
    return vram.estimate(setup, models=models, measure_restart=False, block_bytes=block_bytes), models


# --- against sd-scripts' own DiT ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd():
    import sd_scripts_fixtures as e2e

    e2e.import_sd_scripts_in_process()
    from library import fp8_optimization_utils, hunyuan_image_models

    return hunyuan_image_models, fp8_optimization_utils


@pytest.mark.sd_scripts
def test_the_full_dit_layout_is_sd_scripts_own_weight_for_weight(sd):
    models, _ = sd
    with torch.device("meta"):
        theirs = models.HYImageDiffusionTransformer(attn_mode="torch")
        ours = H.HYImageDiffusionTransformer()
    shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert list(shapes) == list(theirs.state_dict())  # the same order: the LoRA modules come in sd-scripts' order
    assert shapes == {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 17_425_795_520


def _inputs(batch=2, size=4, tokens=5, glyphs=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, TINY.in_channels, size, size, generator=g), torch.tensor([300, 800])[:batch],
            torch.randn(batch, tokens, TINY.text_dim, generator=g), torch.ones(batch, tokens, dtype=torch.long),
            torch.randn(batch, glyphs, TINY.byt5_dim, generator=g), torch.ones(batch, glyphs, dtype=torch.long))


@pytest.mark.sd_scripts
@pytest.mark.parametrize("split_attn", [False, True])
def test_a_tiny_dit_with_sd_scripts_weights_computes_its_prediction(sd, split_attn):
    """Every caption token valid (the masks all ones), as the count assumes; sizes of the narrowed sd-scripts DiT."""
    import hunyuan_image_fixtures as hy

    models, _ = sd
    theirs = hy.tiny_dit(models).eval()
    theirs.split_attn = split_attn
    ours = H.HYImageDiffusionTransformer(TINY, split_attn=split_attn).eval()
    ours.load_state_dict(theirs.state_dict())
    inputs = _inputs()
    with torch.no_grad():
        expected, got = theirs(*inputs), ours(*inputs)
    assert got.shape == inputs[0].shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.sd_scripts
def test_fp8_scaled_stores_what_sd_scripts_stores_and_computes_what_it_computes(sd):
    """sd-scripts' own quantizer on a tiny DiT's bf16 weights: the same keys, shapes and dtypes as our fp8 layout;
    its quantized weights loaded into both give the same prediction in bf16."""
    import hunyuan_image_fixtures as hy

    models, fp8 = sd
    theirs = hy.tiny_dit(models).eval().to(torch.bfloat16)
    state = fp8.optimize_state_dict_with_fp8(
        dict(theirs.state_dict()), "cpu", models.FP8_OPTIMIZATION_TARGET_KEYS, models.FP8_OPTIMIZATION_EXCLUDE_KEYS)
    fp8.apply_fp8_monkey_patch(theirs, state)
    theirs.load_state_dict(state, strict=True, assign=True)
    setup = hy_setup(mixed_precision="bf16", fp8_scaled=True, batch_size=1)
    ours = build_hunyuan_image_models(setup, "cpu", TINY).unet.eval()
    layout = {k: (tuple(t.shape), t.dtype) for k, t in ours.state_dict().items()}
    assert layout == {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    assert len(fp8_linears(ours)) == 2 * 10 + 3 * 3  # every Linear of the blocks
    ours.load_state_dict(state)
    inputs = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in _inputs(batch=1)]
    with torch.no_grad():  # bf16 inputs: the CPU's autocast has no mixed-dtype LayerNorm
        expected, got = theirs(*inputs), ours(*inputs)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


# --- the layout, the LoRA and what sits on the device ---------------------------------------------------------------
def test_the_lora_modules_are_lora_hunyuan_images_every_block_linear():
    setup = vram.Setup(family="hunyuan_image", width=2048, height=2048, rank=32, cache_text_encoder_outputs=True,
                       train_text_encoder=False)
    models = build_hunyuan_image_models(setup)
    run = HunyuanImageTrainingStep(models, setup, "meta")
    run.close()
    names = {m.lora_name: tuple(m.org_module.weight.shape) for m in run.network.loras}
    assert len(names) == 20 * 10 + 40 * 3 == 320
    assert names["lora_unet_double_blocks_0_img_mod_linear"] == (6 * 3584, 3584)
    assert names["lora_unet_double_blocks_19_txt_mlp_fc2"] == (3584, 4 * 3584)
    assert names["lora_unet_single_blocks_39_linear1"] == (3 * 3584 + 4 * 3584, 3584)
    assert names["lora_unet_single_blocks_0_modulation_linear"] == (3 * 3584, 3584)
    assert models.text_encoders == [] and models.on_device == {"unet"}


@pytest.mark.parametrize("case", ["bf16", "bf16 fp8_scaled, checkpointing"])
def test_the_weights_gradients_and_adam_state_are_exactly_their_sizes(case):
    if case == "bf16":
        setup = hy_setup()
    else:
        setup = hy_setup(mixed_precision="bf16", fp8_scaled=True, gradient_checkpointing=True)
    result, models = tiny_estimate(setup)
    dit = models.unet
    assert result.largest[vram.FROZEN_UNET] == storage_bytes([*dit.parameters(), *dit.buffers()])
    fp8 = [layer.weight for _, layer in fp8_linears(dit)]
    if setup.fp8_scaled:  # the blocks' Linear weights in fp8, with a bf16 scale per 64 inputs; the rest bf16
        assert {w.dtype for w in fp8} == {torch.float8_e4m3fn}
        assert all(layer.scale_weight.shape == (layer.out_features, layer.in_features // 64, 1)
                   for _, layer in fp8_linears(dit))
        others = {p.dtype for p in dit.parameters() if all(p is not w for w in fp8)}
        assert others == {torch.bfloat16}
    else:
        assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
    run = HunyuanImageTrainingStep(models, setup, "meta")
    run.close()
    lora = sum(rounded(4 * setup.rank * m.org_module.in_features) + rounded(4 * setup.rank * m.org_module.out_features)
               for m in run.network.loras)
    assert result.modules == 3 * 10 + 4 * 3
    assert result.largest[vram.LORA] == storage_bytes([*run.network.parameters(), *run.network.buffers()])
    assert result.largest[vram.GRADIENTS] == lora
    assert result.largest[vram.OPTIMIZER_STATE] == 2 * lora  # AdamW: two fp32 moments per LoRA parameter


def test_block_swap_takes_the_swapped_blocks_weights_off_the_device():
    plain, _ = tiny_estimate(hy_setup(mixed_precision="bf16", fp8_scaled=True))
    setup = hy_setup(mixed_precision="bf16", fp8_scaled=True, blocks_to_swap=2)
    swapped, models = tiny_estimate(setup)
    dit = models.unet
    assert swapped_blocks(dit, 2) == [dit.double_blocks[2], dit.single_blocks[2], dit.single_blocks[3]]
    weights = offloaded_weights(dit, 2)
    assert len(weights) == (10 + 4) + 2 * (3 + 2)  # Linears and RMSNorms: a double block's 14, a single block's 5
    assert plain.largest[vram.FROZEN_UNET] - swapped.largest[vram.FROZEN_UNET] == storage_bytes(weights)
    assert plain.largest[vram.LORA] == swapped.largest[vram.LORA]


def test_checkpointing_and_fp8_scaled_change_the_activations_as_sd_scripts_would():
    """fp8_scaled keeps each block Linear's dequantized bf16 weight for backward: without checkpointing the
    activations grow by at least those copies; checkpointing keeps only the blocks' inputs."""
    plain, models = tiny_estimate(hy_setup(mixed_precision="bf16"))
    scaled, _ = tiny_estimate(hy_setup(mixed_precision="bf16", fp8_scaled=True))
    dit = build_hunyuan_image_models(hy_setup(mixed_precision="bf16", fp8_scaled=True), "meta", TINY_COUNT).unet
    # those of the Linears whose input needs a gradient: all but the modulations (of the timestep alone)
    copies = storage_bytes(layer.weight.to(torch.bfloat16) for name, layer in fp8_linears(dit) if "mod" not in name)
    act = vram.ACTIVATIONS
    assert scaled.largest[act] - plain.largest[act] >= copies
    checkpointed, _ = tiny_estimate(hy_setup(mixed_precision="bf16", fp8_scaled=True, gradient_checkpointing=True))
    assert checkpointed.largest[act] < scaled.largest[act] - copies


@pytest.mark.parametrize("checkpointing, split_attn", [(False, False), (True, True)])
def test_the_activation_peak_agrees_with_real_cpu_allocations_measured_by_the_profiler(
    checkpointing, split_attn, monkeypatch
):
    """The same tiny step counted on meta and run on the CPU under torch.profiler: the memory the step adds at its
    peak agrees within 5%. In float32 without autocast, so that the CPU runs the operators the count sees: the
    set-up's precision set past its check, the byT5 cache in float32 (sd-scripts' float16 one needs autocast)."""
    setup = hy_setup(gradient_checkpointing=checkpointing, split_attn=split_attn)
    object.__setattr__(setup, "mixed_precision", "no")
    cached = HunyuanImageTrainingStep._text_conditioning
    monkeypatch.setattr(HunyuanImageTrainingStep, "_text_conditioning",
                        lambda self: [t.float() if t.is_floating_point() else t for t in cached(self)])
    result, _ = tiny_estimate(setup, block_bytes=1)
    counted = result.peak_bytes - result.before_step_bytes

    torch.manual_seed(0)
    run = HunyuanImageTrainingStep(build_hunyuan_image_models(setup, "cpu", TINY_COUNT), setup, "cpu")
    assert_the_profiler_agrees(counted, run)


# --- reading hunyuan_image_train_network.py's arguments ----------------------------------------------------------
def setup_of(arguments: dict):
    return vram.setup_from_arguments({k: (v, "test.toml") for k, v in arguments.items()}, None, None, None)


RUN = {"pretrained_model_name_or_path": "/m/hunyuanimage2.1.safetensors", "text_encoder": "/m/qwen_2.5_vl_7b.sft",
       "byt5": "/m/byt5.sft", "vae": "/m/vae.sft", "network_module": "networks.aclora", "network_dim": 32,
       "network_train_unet_only": True, "cache_text_encoder_outputs": True, "cache_latents": True,
       "mixed_precision": "bf16", "resolution": "2048,2048"}


def test_the_sample_config_is_read_as_sd_scripts_would_run_it():
    args = vram.build_parser().parse_args(["--config_file", str(SAMPLE)])
    arguments, base = vram.arguments_from(args)
    setup, notes = vram.setup_from_arguments(arguments, None, base)
    assert (setup.family, setup.model_name, setup.width, setup.height) == ("hunyuan_image", "HunyuanImage-2.1",
                                                                          2048, 2048)
    assert (setup.fp8_scaled, setup.blocks_to_swap, setup.split_attn, setup.rank) == (True, 9, True, 32)
    assert setup.cache_text_encoder_outputs and setup.cache_latents and setup.gradient_checkpointing
    assert not setup.train_text_encoder and not setup.fp8_base
    assert any(n.startswith("family hunyuan_image (byt5 is given") for n in notes)


def test_fp8_base_is_ignored_under_fp8_scaled_and_the_native_size_is_2048():
    setup, notes = setup_of({**{k: v for k, v in RUN.items() if k != "resolution"}, "fp8_scaled": True,
                             "fp8_base": True})
    assert setup.fp8_scaled and not setup.fp8_base and (setup.width, setup.height) == (2048, 2048)
    assert "fp8_base is ignored under fp8_scaled (hunyuan_image_train_network.py turns it off)" in notes


@pytest.mark.parametrize("changes, message", [
    ({"fp8_base": True}, "fp8_base=True without fp8_scaled: hunyuan_image_train_network.py warns"),
    ({"cache_text_encoder_outputs": False},
     "cache_text_encoder_outputs=False: aclora vram does not count Qwen2.5-VL-7B and byT5 on the device yet"),
    ({"cache_latents": False}, "cache_latents=False: aclora vram does not count the HunyuanImage-2.1 VAE"),
    ({"network_train_unet_only": False}, "never trains Qwen2.5-VL or byT5; allowed: network_train_unet_only=true"),
    ({"attn_mode": "flash"}, "attn_mode='flash': aclora vram counts HunyuanImage-2.1's attention through"),
    ({"xformers": True}, "xformers=True: aclora vram counts HunyuanImage-2.1's attention"),
    ({"blocks_to_swap": 38}, "blocks_to_swap=38 is not valid; allowed: an integer from 0 to 37 for HunyuanImage-2.1"),
    ({"resolution": "1000,1000"}, "width=1000 is not valid for hunyuan_image_train_network.py; allowed: a multiple of 32"),
    ({"mixed_precision": "no"}, "mixed_precision='no' is not valid for hunyuan_image_train_network.py: the cached"),
    ({"clip_g": "/m/clip_g.sft"}, "clip_g='/m/clip_g.sft' is an argument of sd3_train_network.py, not of "
                                  "hunyuan_image_train_network.py"),
])
def test_what_is_not_counted_or_not_valid_is_refused_naming_key_value_and_what_is_allowed(changes, message):
    with pytest.raises(vram.VramError) as error:
        setup_of({**RUN, **changes})
    assert message in str(error.value)


def test_hunyuan_image_options_are_refused_for_another_family():
    with pytest.raises(vram.VramError, match="fp8_scaled=True is an argument of hunyuan_image_train_network.py, "
                                             "not of flux_train_network.py"):
        setup_of({"pretrained_model_name_or_path": "/m/flux1-dev.sft", "fp8_scaled": True})
    with pytest.raises(vram.VramError, match="options of hunyuan_image_train_network.py; family='flux'"):
        vram.Setup(family="flux", split_attn=True)


def test_the_sample_config_quotes_its_full_size_estimate_and_docs_vram_tabulates_it(capsys):
    """``aclora vram --config_file hunyuan_image_style_24gb.toml`` counts the 17.4 B DiT (the one full-size count
    of this file, about 40 s); the config and docs/vram.md quote what it prints."""
    import json
    import re

    from aclora_ext.tools.cli import main
    from aclora_ext.tools.vram.counter import FROZEN_UNET

    assert main(["vram", "--config_file", str(SAMPLE), "--no-restart", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 320 and report["lora_parameters"] == 32 * 5_877_760
    assert 13.5 < report["breakdown_gib"][FROZEN_UNET] < 13.8  # fp8 blocks less the 14 swapped, bf16 rest, scales
    quoted = re.search(r"aclora vram: peak ([\d.]+) GiB, ([\d.]+) GiB with the margin", SAMPLE.read_text())
    assert quoted, "the sample config does not quote its estimate"
    assert float(quoted.group(1)) == pytest.approx(report["peak_gib"], abs=0.015)
    assert float(quoted.group(2)) == pytest.approx(report["with_margin_gib"], abs=0.015)
    row = rf"`{SAMPLE.name}`[^|]* \| {re.escape(quoted.group(1))} \| {re.escape(quoted.group(2))} \|"
    assert re.search(row, (SAMPLE.parents[1] / "docs" / "vram.md").read_text())
    assert report["fits_gib"]["24"] and not report["fits_gib"]["16"]
