"""``aclora vram``: the memory of a training step, counted on the meta device.

What is pinned: the counter counts each storage once while it lives; the
CUDA policy reproduced on the meta device (autocast's casts and cache, fused
attention, checkpoint recomputation under the policy); the estimate's weights,
gradients and AdamW state equal sizes computed by hand from the parameter
shapes; its activation peak agrees with the real allocations of the same step
on the CPU measured by torch.profiler; sd-scripts configs and flags are read
with clear errors for bad keys and values; the SDXL sample configs get the
numbers their comments and the README quote.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aclora_ext.harness import tiny
from aclora_ext.tools import vram
from aclora_ext.options import OptionError
from aclora_ext.lora.batching import CHUNK_BYTES
from helpers import import_or_fail
from vram_checks import assert_the_profiler_agrees

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_configs"


def rounded(nbytes: int) -> int:
    """What the CUDA caching allocator hands out for ``nbytes``: multiples of 512 bytes."""
    return -(-nbytes // 512) * 512


# --- the counter ------------------------------------------------------------------------------------------------------------
def test_a_storage_counts_once_for_all_its_views_and_in_place_results_and_leaves_when_it_dies():
    counter = vram.StorageCounter("meta")
    with counter:
        a = torch.empty(1000, device="meta")  # 4000 bytes -> 4096
        view = a.view(10, 100)
        view.add_(1.0)
        b = a * 2
        del b
        c = torch.empty(10, device="meta")  # 40 bytes -> 512
    summary = counter.replay()
    assert counter.live_bytes()[vram.ACTIVATIONS] == 4096 + 512
    assert summary.peak == 4096 + 4096 and summary.largest[vram.ACTIVATIONS] == 8192
    del a, view, c
    assert counter.live_bytes()[vram.ACTIVATIONS] == 0


def test_relabelled_blocks_change_the_breakdown_of_the_whole_replay():
    counter = vram.StorageCounter("meta", block_bytes=1)
    weight = nn.Parameter(torch.empty(100, device="meta"))
    counter.label([weight], vram.LORA)
    with counter:
        counter.phase = "backward"
        grad = torch.empty(100, device="meta")
        activation = torch.empty(50, device="meta")
        del activation
    counter.label([grad], vram.GRADIENTS)
    summary = counter.replay()
    assert summary.peak == 400 + 400 + 200 and summary.phase == "backward" and summary.before == 400
    assert summary.at_peak[vram.GRADIENTS] == 400 and summary.at_peak[vram.ACTIVATIONS] == 200


# --- CUDA's policy on the meta device ----------------------------------------------------------------------------------------------
def meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad)


def test_under_autocast_matmuls_run_in_bf16_norms_in_fp32_and_softmax_returns_fp32():
    policy = vram.CudaPolicy()
    x, w = meta(4, 8, dtype=torch.bfloat16), meta(8, 8)
    with policy, policy.autocast(torch.bfloat16):
        assert F.linear(x, w).dtype == torch.bfloat16
        assert F.layer_norm(x, (8,)).dtype == torch.float32
        assert F.group_norm(meta(1, 8, 4, 4, dtype=torch.bfloat16), 2).dtype == torch.float32
        assert x.softmax(-1).dtype == torch.float32
        assert (x + x).dtype == torch.bfloat16  # not on autocast's lists: unchanged
    with policy:  # autocast off: nothing changes
        assert F.linear(meta(4, 8), w).dtype == torch.float32


def test_the_bf16_cast_of_a_trainable_fp32_weight_is_made_once_per_autocast_region():
    policy, counter = vram.CudaPolicy(), vram.StorageCounter("meta", block_bytes=1)
    weight = meta(256, 256, grad=True)
    x = meta(4, 256, dtype=torch.bfloat16)
    with counter, policy, policy.autocast(torch.bfloat16):
        outputs = [F.linear(x, weight) for _ in range(3)]
    casts = [b for b, sign in counter.events if sign > 0 and b.nbytes == 256 * 256 * 2]
    assert len(casts) == 1 and len(outputs) == 3


def test_fused_attention_holds_no_tokens_by_tokens_matrix_and_eager_attention_does():
    tokens, heads, dim = 4096, 10, 64
    q = meta(1, heads, tokens, dim, dtype=torch.bfloat16, grad=True)
    policy = vram.CudaPolicy()
    fused, eager = vram.StorageCounter("meta", 1), vram.StorageCounter("meta", 1)
    with fused, policy:
        F.scaled_dot_product_attention(q, q, q)
    with eager, policy:
        (q @ q.transpose(-1, -2)).softmax(-1) @ q  # what attention without sdpa/xformers computes
    assert max(b.nbytes for b, _ in fused.events) <= q.numel() * 2  # nothing larger than the output
    assert max(b.nbytes for b, _ in eager.events) >= heads * tokens * tokens * 2


def test_checkpointed_blocks_are_recomputed_under_the_policy_during_backward():
    block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)).to("meta", torch.bfloat16)
    x = meta(2, 8, dtype=torch.bfloat16, grad=True)
    policy = vram.CudaPolicy()

    def step():
        with policy, policy.autocast(torch.bfloat16):
            out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        out.float().sum().backward()

    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        step()  # backward runs without the forward's modes: the layer norm recomputes in bf16, not fp32
    with policy.through_recomputation([block]):
        step()
    assert x.grad is not None


# --- the estimate against sizes computed by hand ------------------------------------------------------------------------
def tiny_sd1_on(device: str) -> vram.Models:
    models = tiny.sd1_models(seed=0)
    return vram.Models("sd1", models["unet"].to(device), [models["text_encoder"].to(device)])


def tiny_setup(**changes) -> vram.Setup:
    settings = dict(family="sd1", width=128, height=128, batch_size=2, rank=8, alpha=4.0, mixed_precision="no",
                    gradient_checkpointing=False, train_text_encoder=True, attention="none")
    settings.update(changes)
    return vram.Setup(**settings)


def tiny_estimate(setup: vram.Setup, block_bytes: int = vram.BLOCK_BYTES) -> tuple[vram.Estimate, vram.Models]:
    models = tiny_sd1_on("meta")
    vram.prepare_models(models, setup)
    return vram.estimate(setup, models=models, measure_restart=False, block_bytes=block_bytes), models


def storage_bytes(tensors) -> int:
    return sum(rounded(t.numel() * t.element_size()) for t in tensors)


@pytest.mark.parametrize("case", ["unet only, bf16 autocast", "unet and text encoder, checkpointing"])
def test_weights_gradients_and_adam_state_are_exactly_their_sizes(case):
    if case.startswith("unet only"):
        setup = tiny_setup(train_text_encoder=False, mixed_precision="bf16", attention="sdpa")
    else:
        setup = tiny_setup(gradient_checkpointing=True)
    result, models = tiny_estimate(setup)
    unet, te = models.unet, models.text_encoders[0]
    network = tiny_lora_network(setup)
    trained = list(network.parameters())  # every module of the tiny SD1 model gets a gradient
    grads = storage_bytes(trained)
    if setup.train_text_encoder and setup.gradient_checkpointing:
        # sd-scripts makes the text encoder's embeddings require grad for checkpointing: they get gradients too
        grads += storage_bytes(getattr(te, "text_model", te).embeddings.parameters())
    assert result.largest[vram.FROZEN_UNET] == storage_bytes([*unet.parameters(), *unet.buffers()])
    assert result.largest[vram.FROZEN_TE] == storage_bytes([*te.parameters(), *te.buffers()])
    assert result.largest[vram.LORA] == storage_bytes([*network.parameters(), *network.buffers()])
    assert result.largest[vram.GRADIENTS] == grads
    # AdamW: exp_avg and exp_avg_sq in fp32 per trained parameter; its step counters stay on the CPU
    assert result.largest[vram.OPTIMIZER_STATE] == 2 * storage_bytes(trained)


def test_sdxl_te1_last_layer_gets_no_gradient_and_so_no_adam_state():
    """SDXL reads te1's penultimate hidden state: its last layer's LoRA gets no gradient, and AdamW no state for it."""
    models = tiny.sdxl_models(seed=0)
    meta = vram.Models("sdxl", models["unet"].to("meta"), [te.to("meta") for te in models["text_encoders"]])
    setup = vram.Setup(family="sdxl", width=64, height=64, rank=8, alpha=4, train_text_encoder=True,
                       mixed_precision="no", attention="none")
    vram.prepare_models(meta, setup)
    result = vram.estimate(setup, models=meta, measure_restart=False)
    network = lora_network_on(meta, setup)
    layers = len(getattr(meta.text_encoders[0], "text_model", meta.text_encoders[0]).encoder.layers)
    unused = [p for name, p in network.named_parameters()
              if name.startswith(f"lora_te1_text_model_encoder_layers_{layers - 1}_")]
    assert unused  # the last layer of te1 has LoRA modules ...
    trained = [p for p in network.parameters() if all(p is not u for u in unused)]
    assert result.largest[vram.GRADIENTS] >= storage_bytes(trained)
    assert result.largest[vram.OPTIMIZER_STATE] == 2 * storage_bytes(trained)  # ... and no AdamW state


def lora_network_on(models: vram.Models, setup: vram.Setup):
    """The network create_network and apply_to make for ``setup`` on ``models`` (detached again)."""
    from aclora_ext import create_network

    with torch.device("meta"):
        network = create_network(1.0, setup.rank, setup.alpha, None, models.text_encoder_argument, models.unet)
    network.apply_to(models.text_encoder_argument, models.unet, setup.train_text_encoder, True)
    network.remove_from()
    return network


def tiny_lora_network(setup: vram.Setup):
    return lora_network_on(tiny_sd1_on("meta"), setup)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_peak_agrees_with_real_cpu_allocations_measured_by_the_profiler(checkpointing):
    """The same step on the same tiny model, once counted on meta and once run on the CPU under torch.profiler
    (profile_memory): the memory the step adds at its peak agrees within 5% (fp32, eager attention, so that
    the CPU runs the operators the count sees; the rest is what CPU kernels allocate inside themselves)."""
    setup = tiny_setup(gradient_checkpointing=checkpointing)
    result, _ = tiny_estimate(setup, block_bytes=1)
    counted = result.peak_bytes - result.before_step_bytes

    cpu = tiny_sd1_on("cpu")
    vram.prepare_models(cpu, setup)
    run = vram.TrainingStep(cpu, setup, "cpu")
    assert_the_profiler_agrees(counted, run)


def test_a_restart_between_steps_allocates_a_bounded_transient_and_none_when_restarts_are_off():
    from aclora_ext import create_network

    models = tiny_sd1_on("meta")
    transients = {}
    for mode in ("paper", "off"):
        network = create_network(1.0, 8, 4.0, None, models.text_encoders[0], models.unet, restart_mode=mode)
        transients[mode] = vram.restart_transient(network)
    assert transients["off"] == 0
    assert 0 < transients["paper"] < 2 * CHUNK_BYTES


# --- reading sd-scripts' arguments --------------------------------------------------------------------------------------------
def setup_of(arguments: dict, family=None):
    return vram.setup_from_arguments({k: (v, "test.toml") for k, v in arguments.items()}, family)


@pytest.mark.parametrize("arguments, message", [
    ({"mixed_precision": "fp32"}, "test.toml: mixed_precision='fp32' is not valid; allowed: no, fp16, bf16"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing='yes' is not valid; allowed: true or false"),
    ({"resolution": "1024x1024"}, "resolution='1024x1024' is not valid; allowed: 'W,H' or one size"),
    ({"resolution": "1020,1024"}, "resolution='1020,1024' is not valid"),
    ({"train_batch_size": 0}, "train_batch_size=0 is not valid; allowed: an integer >= 1"),
    ({"network_dim": 12.5}, "network_dim=12.5 is not valid; allowed: an integer >= 1"),
    ({"optimizer_type": "Lion"}, "optimizer_type='Lion' is not valid; allowed: AdamW, AdamW8bit, Adafactor"),
    ({"network_module": "networks.lora"}, "network_module='networks.lora' is not valid; allowed: networks.aclora"),
    ({"max_token_length": 300}, "max_token_length=300 is not valid; allowed: 75, 150, 225"),
    ({"network_args": "restart_mode"}, "network_args='restart_mode' is not valid; allowed: a list of 'key=value'"),
    ({"gradient_checkpoint": True}, "unknown key 'gradient_checkpoint' (value True); did you mean "
                                    "'gradient_checkpointing'?"),
    ({"deepspeed": True}, "deepspeed=True is not modelled by aclora vram"),
    ({"mixed_precision": "no", "full_bf16": True}, "full_bf16/full_fp16 must match mixed_precision='no'"),
    ({"cache_text_encoder_outputs": True, "pretrained_model_name_or_path": "sd_xl.safetensors"},
     "cache_text_encoder_outputs=True needs network_train_unet_only=True"),
    ({"cache_text_encoder_outputs": True}, "cache_text_encoder_outputs=True is an sdxl_train_network.py option"),
])
def test_bad_keys_and_values_are_refused_naming_the_key_the_value_and_what_is_allowed(arguments, message):
    with pytest.raises(vram.VramError) as error:
        setup_of(arguments)
    assert message in str(error.value)


def test_bad_network_args_are_refused_by_the_option_declarations():
    with pytest.raises(OptionError, match="restart_mode='sometimes' is not valid"):
        setup_of({"network_args": ["restart_mode=sometimes"]})


def test_adamw8bit_without_bitsandbytes_says_what_is_missing(monkeypatch):
    diffusers = import_or_fail("diffusers", "the tiny set-up builds diffusers models")
    # diffusers' models import bitsandbytes where it is installed: load them first, then hide bitsandbytes
    assert diffusers.UNet2DConditionModel and diffusers.AutoencoderKL and tiny_sd1_on("meta")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # "import bitsandbytes" now fails, installed or not
    from aclora_ext.network import schedule

    setup = tiny_setup(optimizer="AdamW8bit", mixed_precision="bf16")
    with pytest.raises(vram.VramError, match="AdamW8bit' needs bitsandbytes"):
        tiny_estimate(setup)
    # the half-built network let go of accelerator.backward: later training loops do not reach it
    assert not any(p.device.type == "meta" for network in list(schedule._listeners) for p in network.parameters())


@pytest.mark.sd_scripts  # bitsandbytes comes with sd-scripts' requirements (CI: its pinned venv), not with ours
def test_adamw8bit_keeps_bitsandbytes_own_state_one_byte_per_moment_for_large_tensors():
    import_or_fail("bitsandbytes", "sd-scripts' requirements install it")
    setup = tiny_setup(optimizer="AdamW8bit", mixed_precision="bf16", train_text_encoder=False)
    result, _ = tiny_estimate(setup, block_bytes=1)
    expected = 2 * 256 * 4  # the two shared quantisation maps
    for p in tiny_lora_network(setup).parameters():
        n = p.numel()  # bitsandbytes: 8-bit moments with a float32 scale per 256 values from 4096 values up
        expected += 2 * (n + 4 * -(-n // 256)) if n >= 4096 else 2 * 4 * n
    assert result.largest[vram.OPTIMIZER_STATE] == expected


def test_keys_that_do_not_change_memory_are_listed_not_refused():
    setup, notes = setup_of({"output_dir": "/x", "learning_rate": 1e-4, "network_dim": 32,
                             "pretrained_model_name_or_path": "/m/v1-5.safetensors"})
    assert setup.rank == 32 and setup.family == "sd1"
    assert "arguments that do not change the estimate: learning_rate, output_dir" in notes


def test_a_nested_section_and_a_missing_file_are_refused(tmp_path):
    nested = tmp_path / "nested.toml"
    nested.write_text("[training]\n[training.inner]\nx = 1\n")
    with pytest.raises(vram.VramError, match=r"\[training.inner\] is nested two levels deep"):
        vram.read_config(str(nested))
    with pytest.raises(vram.VramError, match="no such file"):
        vram.read_config(str(tmp_path / "missing.toml"))


def test_the_sample_configs_read_as_the_runs_they_describe():
    big, _ = vram.setup_from_arguments(*config_arguments("sdxl_style_24gb.toml"))
    assert (big.family, big.width, big.height, big.batch_size, big.rank) == ("sdxl", 1024, 1024, 1, 128)
    assert (big.mixed_precision, big.lora_dtype, big.optimizer, big.attention) == ("bf16", torch.float32, "AdamW", "sdpa")
    assert big.gradient_checkpointing and big.cache_latents and not big.train_text_encoder
    assert not big.cache_text_encoder_outputs and not big.fp8_base
    small, _ = vram.setup_from_arguments(*config_arguments("sdxl_style_12gb.toml"))
    assert (small.rank, small.optimizer, small.unet_dtype) == (64, "Adafactor", torch.float8_e4m3fn)
    assert small.cache_text_encoder_outputs and small.cache_latents and small.gradient_checkpointing
    sd15, _ = vram.setup_from_arguments(*config_arguments("sd15_style.toml"))
    assert (sd15.family, sd15.width, sd15.batch_size, sd15.mixed_precision) == ("sd1", 512, 2, "fp16")
    assert sd15.train_text_encoder and not sd15.gradient_checkpointing


def config_arguments(name: str):
    path = SAMPLES / name
    return {k: (v, name) for k, v in vram.read_config(str(path)).items()}, None, path.parent


def test_command_line_flags_override_the_file_and_bad_ones_exit_with_a_message(capsys):
    from aclora_ext.tools.cli import main

    args = vram.build_parser().parse_args(["--config_file", str(SAMPLES / "sdxl_style_24gb.toml"),
                                           "--network_dim", "32", "--no-gradient_checkpointing"])
    arguments, base = vram.arguments_from(args)
    setup, _ = vram.setup_from_arguments(arguments, None, base)
    assert setup.rank == 32 and not setup.gradient_checkpointing and setup.family == "sdxl"
    assert main(["vram", "--family", "sd1", "--mixed_precision", "fp32"]) == 2
    assert "command line: mixed_precision='fp32' is not valid; allowed: no, fp16, bf16" in capsys.readouterr().err


def test_the_command_prints_an_estimate_as_json(capsys):
    from aclora_ext.tools.cli import main

    assert main(["vram", "--family", "sd1", "--resolution", "256", "--mixed_precision", "fp16",
                 "--gradient_checkpointing", "--network_train_unet_only", "--cache_latents", "--sdpa",
                 "--network_dim", "16", "--no-restart", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["family"] == "sd1" and report["setup"]["rank"] == 16
    parts = report["breakdown_gib"]
    assert abs(sum(parts.values()) - report["peak_gib"]) < 0.01
    assert 1.5 < parts[vram.FROZEN_UNET] < 1.7  # SD1.5's 860 M U-Net parameters in fp16
    assert report["with_margin_gib"] > report["peak_gib"] and report["not_counted"] == vram.NOT_COUNTED


# --- the numbers the documentation quotes ------------------------------------------------------------------------------------------
QUOTED = re.compile(r"aclora vram: peak ([\d.]+) GiB, ([\d.]+) GiB with the margin")


@pytest.mark.parametrize("name", ["sdxl_style_12gb.toml", "sdxl_style_24gb.toml", "sd15_style.toml", "flux_style_24gb.toml",
                                  "flux_style_16gb.toml", "sd35_medium_style.toml"])
def test_the_sample_configs_quote_their_estimate_and_the_12gb_one_fits_12_gib(name):
    quoted = QUOTED.search((SAMPLES / name).read_text())
    assert quoted, f"{name} does not quote its 'aclora vram' estimate"
    setup, _ = vram.setup_from_arguments(*config_arguments(name))
    result = vram.estimate(setup, measure_restart=False)  # a RESTART peaks far below the step (restart test above)
    assert result.persistent_bytes + 2 * CHUNK_BYTES < result.peak_bytes
    assert float(quoted.group(1)) == pytest.approx(result.peak_bytes / vram.GiB, abs=0.015)
    assert float(quoted.group(2)) == pytest.approx(result.with_margin_bytes / vram.GiB, abs=0.015)
    row = rf"`{re.escape(name)}`[^|]* \| {re.escape(quoted.group(1))} \| {re.escape(quoted.group(2))} \|"
    for page in ("README.md", "docs/vram.md"):  # the headline table and the full one
        assert re.search(row, (ROOT / page).read_text()), f"{page}'s memory table does not quote {name}'s estimate"
    if name == "sdxl_style_12gb.toml":
        assert result.fits(12)


def test_the_sdxl_benchmark_records_the_estimates_error_against_the_measured_peaks():
    from bench.sdxl_24gb import estimate_errors

    rows = [{"setup": "unet", "variant": "aclora", "peak_allocated_gb": 10.0, "peak_reserved_gb": 12.0},
            {"setup": "unet", "variant": "peft", "peak_allocated_gb": 9.0, "peak_reserved_gb": 11.0}]
    table = estimate_errors(rows, {"unet": {"peak_gb": 11.0, "with_margin_gb": 13.2}})
    assert len(table) == 1 and table[0]["variant"] == "aclora"
    assert table[0]["estimate_error"] == pytest.approx(0.10)
    assert table[0]["estimate_with_margin_error"] == pytest.approx(0.10)
    assert "estimate_gb" not in rows[1]  # peft is another module: no estimate is claimed for it
