"""``aclora vram`` on Anima (``anima_train_network.py``).

What is pinned: the Anima DiT layout is sd-scripts' own (every weight's name, shape and order, 2,091,068,928
parameters, LLM adapter included, checked against ``library.anima_models.Anima`` built on the meta device) and
computes what it computes (a tiny one with the same weights gives sd-scripts' prediction); its LoRA modules are
lora_anima's (280 at full size); the Qwen3 text encoder sits on the device only while its outputs are not cached;
the frozen weights, LoRA, gradients and AdamW state are exactly their sizes; block swap takes the last blocks'
weights off the device; the activation peak of a tiny Anima step agrees with the CPU's real allocations; the
sample config is read as sd-scripts reads it, and what is not counted is refused with the key, the value and
what is allowed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aclora_ext.harness import anima_dit as A
from aclora_ext.tools import vram
from aclora_ext.tools.vram.anima import build_anima_models, offloaded_weights, swapped_blocks
from aclora_ext.tools.vram.anima_step import AnimaTrainingStep
from helpers import import_or_fail
from vram_checks import assert_the_profiler_agrees

import_or_fail("transformers", "Anima's text encoder is transformers' Qwen3Model")
ROOT = Path(__file__).resolve().parents[1]
TINY = A.small(
    A.ANIMA,
    model_channels=64,
    num_blocks=3,
    num_heads=2,
    crossattn_emb_channels=48,
    adaln_lora_dim=8,
    adapter_source_dim=48,
    adapter_dim=48,
    adapter_layers=2,
    adapter_heads=2,
    adapter_vocab=100,
)
TINY_QWEN3 = {
    **A.QWEN3_06B_CONFIG,
    "vocab_size": 100,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 24,
}


def rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def storage_bytes(tensors) -> int:
    return sum(rounded(t.numel() * t.element_size()) for t in tensors)


def anima_setup(**changes) -> vram.Setup:
    settings = dict(
        family="anima",
        width=128,
        height=128,
        batch_size=2,
        rank=8,
        alpha=4.0,
        mixed_precision="no",
        gradient_checkpointing=False,
        train_text_encoder=False,
        cache_text_encoder_outputs=True,
        t5_tokens=16,
        qwen3_tokens=12,
    )
    settings.update(changes)
    return vram.Setup(**settings)


def tiny_models(setup: vram.Setup, device: str = "meta") -> vram.Models:
    return build_anima_models(setup, device, TINY, TINY_QWEN3)


def tiny_estimate(setup: vram.Setup, block_bytes: int = vram.BLOCK_BYTES):
    models = tiny_models(setup)
    return vram.estimate(setup, models=models, measure_restart=False, block_bytes=block_bytes), models


# --- against sd-scripts' own Anima ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_anima():
    import sd_scripts_fixtures as e2e

    e2e.import_sd_scripts_in_process()
    import anima_fixtures
    from library import anima_models

    return anima_models, anima_fixtures


@pytest.mark.sd_scripts
def test_the_full_anima_layout_is_sd_scripts_own_weight_for_weight(sd_anima):
    anima_models, fixtures = sd_anima
    full = {
        **fixtures.DIT_CONFIG,
        "model_channels": 2048,
        "num_blocks": 28,
        "num_heads": 16,
        "crossattn_emb_channels": 1024,
        "adaln_lora_dim": 256,
    }  # load_anima_model's config
    with torch.device("meta"):
        theirs = anima_models.Anima(**full)
        ours = A.Anima()
    shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert list(shapes.items()) == [(name, tuple(t.shape)) for name, t in theirs.state_dict().items()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 2_091_068_928


@pytest.mark.sd_scripts
def test_a_tiny_anima_with_sd_scripts_weights_computes_its_prediction(sd_anima):
    """The same weights in both; partly padded T5 and Qwen3 masks."""
    _, fixtures = sd_anima
    theirs = fixtures.anima(seed=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # sd-scripts zero-initialises the modulation: random weights exercise it
            p.normal_(0, 0.3)
    c = A.small(
        TINY,
        model_channels=32,
        num_blocks=2,
        crossattn_emb_channels=32,
        adapter_source_dim=32,
        adapter_dim=32,
        adapter_vocab=32128,
    )
    ours = A.Anima(c).eval()
    ours.load_state_dict(theirs.state_dict())
    b, h, w = 2, 8, 6
    torch.manual_seed(1)
    x, context = torch.randn(b, 16, 1, h, w), torch.randn(b, 7, 32)
    ids, t5_mask, qwen3_mask = torch.randint(0, 100, (b, 5)), torch.ones(b, 5, dtype=torch.long), torch.ones(b, 7)
    t5_mask[1, 3:], qwen3_mask[0, 5:] = 0, 0
    kwargs = dict(
        padding_mask=torch.zeros(b, 1, h, w),
        target_input_ids=ids,
        target_attention_mask=t5_mask,
        source_attention_mask=qwen3_mask,
    )
    with torch.no_grad():
        expected = theirs(x, torch.tensor([0.3, 0.7]), context, **kwargs)
        got = ours(x, torch.tensor([0.3, 0.7]), context, **kwargs)
    assert got.shape == (b, 16, 1, h, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- the layout and what sits on the device ---------------------------------------------------------------------
def test_animas_lora_modules_are_lora_animas_and_the_text_encoder_leaves_the_device_when_cached():
    setup = vram.Setup(family="anima", rank=32, cache_text_encoder_outputs=True)
    models = build_anima_models(setup)
    run = AnimaTrainingStep(models, setup)
    try:
        names = {m.lora_name: tuple(m.org_module.weight.shape) for m in run.network.loras}
    finally:
        run.close()
    assert len(names) == 28 * 10 == 280
    assert names["lora_unet_blocks_0_self_attn_q_proj"] == (2048, 2048)
    assert names["lora_unet_blocks_27_cross_attn_k_proj"] == (2048, 1024)
    assert names["lora_unet_blocks_5_mlp_layer1"] == (8192, 2048)
    assert not [n for n in names if "adaln" in n or "llm_adapter" in n or n.startswith("lora_te")]
    assert "text_encoders" not in models.on_device and "vae" not in models.on_device
    assert sum(p.numel() for p in models.text_encoders[0].parameters()) == 596_049_920  # Qwen3-0.6B, tied embedding
    assert "text_encoders" in tiny_models(anima_setup(cache_text_encoder_outputs=False)).on_device


@pytest.mark.parametrize("case", ["bf16, text cached", "bf16, Qwen3 LoRA trained, checkpointing"])
def test_animas_weights_gradients_and_adam_state_are_exactly_their_sizes(case):
    if case.startswith("bf16, text"):
        setup = anima_setup(mixed_precision="bf16")
    else:
        setup = anima_setup(
            mixed_precision="bf16",
            cache_text_encoder_outputs=False,
            train_text_encoder=True,
            gradient_checkpointing=True,
        )
    result, models = tiny_estimate(setup)
    dit, qwen3 = models.unet, models.text_encoders[0]
    assert result.largest[vram.FROZEN_UNET] == storage_bytes([*dit.parameters(), *dit.buffers()])
    assert all(p.dtype == torch.bfloat16 for p in [*dit.parameters(), *qwen3.parameters()])
    on_device = not setup.cache_text_encoder_outputs
    assert result.largest.get(vram.FROZEN_TE, 0) == (
        storage_bytes([*qwen3.parameters(), *qwen3.buffers()]) if on_device else 0
    )
    run = AnimaTrainingStep(models, setup)
    run.close()
    loras = run.network.loras
    lora = sum(
        rounded(4 * setup.rank * m.org_module.in_features) + rounded(4 * setup.rank * m.org_module.out_features)
        for m in loras
    )  # lora_down and lora_up in fp32
    qwen3_modules = 2 * 7  # q, k, v, o, gate, up, down per layer
    assert result.modules == len(loras) == 3 * 10 + (qwen3_modules if setup.train_text_encoder else 0)
    assert result.largest[vram.LORA] == storage_bytes([*run.network.parameters(), *run.network.buffers()])
    embedding = qwen3.get_submodule("embed_tokens").weight  # sd-scripts' checkpointing workaround gives it a gradient
    extra = rounded(embedding.numel() * 2) if setup.train_text_encoder else 0
    assert result.largest[vram.GRADIENTS] == lora + extra
    assert result.largest[vram.OPTIMIZER_STATE] == 2 * lora  # AdamW: two fp32 moments per LoRA parameter


def test_block_swap_takes_the_last_blocks_weights_off_the_device():
    plain, _ = tiny_estimate(anima_setup(mixed_precision="bf16"))
    setup = anima_setup(mixed_precision="bf16", blocks_to_swap=1)
    swapped, models = tiny_estimate(setup)
    assert swapped_blocks(models.unet, setup) == [models.unet.blocks[2]]
    weights = offloaded_weights(models.unet, setup)
    assert len(weights) == 2 * (4 + 2) + 2 + 3 * 2  # 2 attentions' Linears and q/k norms, the MLP, the modulations
    assert plain.largest[vram.FROZEN_UNET] - swapped.largest[vram.FROZEN_UNET] == storage_bytes(weights)
    with pytest.raises(
        vram.VramError, match="blocks_to_swap=27 is not valid; allowed: an integer from 0 to 26 for Anima"
    ):
        vram.Setup(family="anima", blocks_to_swap=27)


@pytest.mark.parametrize(
    "changes",
    [dict(), dict(gradient_checkpointing=True, cache_text_encoder_outputs=False, train_text_encoder=True)],
    ids=["cached text", "Qwen3 trained"],
)
def test_the_anima_activation_peak_agrees_with_real_cpu_allocations_measured_by_the_profiler(changes):
    """The same tiny Anima step counted on meta and run on the CPU under torch.profiler: the memory the step adds
    at its peak agrees within 5% (fp32, so that the CPU runs the operators the count sees)."""
    setup = anima_setup(**changes)
    result, _ = tiny_estimate(setup, block_bytes=1)
    counted = result.peak_bytes - result.before_step_bytes

    torch.manual_seed(0)
    run = AnimaTrainingStep(tiny_models(setup, "cpu"), setup, "cpu")
    assert_the_profiler_agrees(counted, run)


def test_checkpointing_batch_and_resolution_change_the_activations_and_the_qwen3_adds_its_weights():
    base, _ = tiny_estimate(anima_setup(mixed_precision="bf16"))
    checkpointed, _ = tiny_estimate(anima_setup(mixed_precision="bf16", gradient_checkpointing=True))
    bigger, _ = tiny_estimate(anima_setup(mixed_precision="bf16", width=256, batch_size=3))
    uncached, models = tiny_estimate(anima_setup(mixed_precision="bf16", cache_text_encoder_outputs=False))
    act = vram.ACTIVATIONS
    assert checkpointed.largest[act] < base.largest[act] < bigger.largest[act]
    qwen3 = models.text_encoders[0]
    assert uncached.largest[vram.FROZEN_TE] == storage_bytes([*qwen3.parameters(), *qwen3.buffers()]) > 0
    assert uncached.breakdown[vram.FROZEN_TE] > 0 == base.largest.get(vram.FROZEN_TE, 0)
    assert uncached.phase_peaks["text encoders"] > 0 and "text encoders" not in base.phase_peaks


# --- reading sd-scripts' Anima arguments ---------------------------------------------------------------------------
def setup_of(arguments: dict):
    return vram.setup_from_arguments({k: (v, "test.toml") for k, v in arguments.items()})


ANIMA_RUN = {
    "pretrained_model_name_or_path": "/m/anima.safetensors",
    "qwen3": "/m/qwen3.safetensors",
    "vae": "/m/vae.safetensors",
    "network_train_unet_only": True,
    "cache_text_encoder_outputs": True,
    "cache_latents": True,
    "mixed_precision": "bf16",
    "resolution": "1024,1024",
}


def test_the_anima_sample_config_is_read_as_anima_with_sd_scripts_defaults():
    config = vram.read_config(str(ROOT / "sample_configs" / "anima_style_24gb.toml"))
    setup, notes = vram.setup_from_arguments({k: (v, "toml") for k, v in config.items()}, base=ROOT / "sample_configs")
    assert (setup.family, setup.model_name, setup.denoiser) == ("anima", "Anima", "DiT")
    assert (setup.qwen3_tokens, setup.t5_tokens, setup.blocks_to_swap) == (512, 512, 0)
    assert setup.cache_text_encoder_outputs and setup.cache_latents and not setup.train_text_encoder
    assert (setup.width, setup.height, setup.rank, setup.gradient_checkpointing) == (1024, 1024, 32, True)
    assert any(n.startswith("family anima (qwen3 is given") for n in notes)
    assert any("timestep_sampling" in n and "vae_chunk_size" in n for n in notes)
    read, _ = setup_of(
        {
            **ANIMA_RUN,
            "qwen3_max_token_length": 256,
            "t5_max_token_length": 128,
            "blocks_to_swap": 8,
            "attn_mode": "sdpa",
        }
    )
    assert (read.qwen3_tokens, read.t5_tokens, read.blocks_to_swap, read.attention) == (256, 128, 8, "sdpa")


def test_fp8_base_is_turned_off_for_anima_with_a_note_as_the_trainer_does():
    setup, notes = setup_of({**ANIMA_RUN, "fp8_base": True})
    assert not setup.fp8_base and setup.unet_dtype == torch.bfloat16
    assert any(n.startswith("fp8_base is not supported for Anima: anima_train_network.py turns it off") for n in notes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"cache_latents": False}, "cache_latents=False is not counted for Anima (its Qwen-Image VAE is not modelled"),
        ({"network_train_unet_only": False}, "cache_text_encoder_outputs=True needs network_train_unet_only=True"),
        ({"attn_mode": "flash"}, "attn_mode='flash': Anima's flash attention is not counted by aclora vram; allowed"),
        ({"xformers": True}, "xformers=True: Anima's xformers attention is not counted"),
        ({"split_attn": True}, "split_attn=True is not counted for Anima"),
        ({"unsloth_offload_checkpointing": True}, "unsloth_offload_checkpointing=True is not modelled by aclora vram"),
        ({"cpu_offload_checkpointing": True}, "cpu_offload_checkpointing=True is not modelled by aclora vram"),
        ({"blocks_to_swap": 27}, "blocks_to_swap=27 is not valid; allowed: an integer from 0 to 26 for Anima"),
        ({"resolution": "1000,1024"}, "width=1000 is not valid for Anima; allowed: a multiple of 16"),
        ({"t5_max_token_length": 0}, "t5_max_token_length=0 is not valid; allowed: an integer >= 1"),
        (
            {"clip_l": "/m/clip_l.sft"},
            "clip_l='/m/clip_l.sft' is an argument of flux_train_network.py and "
            "sd3_train_network.py, not of anima_train_network.py",
        ),
        (
            {"model_type": "chroma"},
            "model_type='chroma' is an argument of flux_train_network.py, not of anima_train_network.py",
        ),
    ],
)
def test_what_is_not_counted_for_anima_is_refused_naming_key_value_and_what_is_allowed(changes, message):
    with pytest.raises(vram.VramError) as error:
        setup_of({**ANIMA_RUN, **changes})
    assert message in str(error.value)


def test_anima_only_arguments_are_refused_for_another_family():
    with pytest.raises(
        vram.VramError,
        match="qwen3_max_token_length=256 is an argument of anima_train_network.py, not of sdxl_train_network.py",
    ):
        vram.setup_from_arguments(
            {"pretrained_model_name_or_path": ("/m/sdxl.safetensors", "t"), "qwen3_max_token_length": (256, "t")}
        )


def test_lora_animas_train_llm_adapter_adds_the_adapters_lora_to_the_count():
    plain, _ = tiny_estimate(anima_setup())
    setup = anima_setup(network_args=(("train_llm_adapter", "true"),))
    adapter, models = tiny_estimate(setup)
    run = AnimaTrainingStep(models, setup)
    run.close()
    added = [m for m in run.network.loras if m.lora_name.startswith("lora_unet_llm_adapter_blocks_")]
    assert adapter.modules - plain.modules == len(added) == 2 * 10  # per adapter block: 2 attentions x 4, the MLP's 2
    lora = sum(rounded(4 * setup.rank * m.org_module.in_features) + rounded(4 * setup.rank * m.org_module.out_features)
               for m in added)
    assert adapter.largest[vram.LORA] == storage_bytes([*run.network.parameters(), *run.network.buffers()])
    assert adapter.largest[vram.LORA] - plain.largest[vram.LORA] > lora  # and the network's per-module state
    assert adapter.largest[vram.GRADIENTS] - plain.largest[vram.GRADIENTS] == lora
