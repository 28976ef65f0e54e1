"""On a CUDA device: the training hot path never synchronises, RESTART decides as on the CPU, and
``aclora vram``'s count matches the memory a step takes.

These tests skip cleanly on machines without CUDA (CI has none); run them
where a GPU is available. Without one, tests/test_meta_step.py checks the same
step for host reads on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aclora_ext import attach

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48)).to(device)


def plant_rank(network, rank: int) -> None:
    """Give every module an update up @ down of exactly ``rank`` (plus nothing else)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in network.loras:
            up = torch.zeros(m.out_dim, m.rank)
            up[:, :rank] = torch.randn(m.out_dim, rank, generator=generator)
            m.lora_up.weight.copy_(up.to(m.lora_up.weight.device))


def test_attach_puts_the_factors_on_the_model_device_and_the_forward_runs():
    model = small_model("cuda")
    network = attach(model, max_rank=8, alpha=4)
    assert {p.device.type for p in network.parameters()} == {"cuda"}
    assert model(torch.randn(4, 64, device="cuda")).shape == (4, 48)


def test_loss_capture_and_the_step_hook_never_synchronise_the_gpu():
    model = small_model("cuda")
    network = attach(model, max_rank=8, alpha=4, restart_every_steps=1000)
    network.set_training_length(total_steps=10_000)
    loss = model(torch.randn(4, 64, device="cuda")).pow(2).mean().detach()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            network.on_step_start()
            network.record_loss(loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert network.clock.optimizer_steps == 5


def test_a_product_mode_restart_on_the_gpu_keeps_the_planted_rank_as_on_the_cpu():
    ranks = {}
    for device in ("cpu", "cuda"):
        network = attach(small_model(device), max_rank=16, alpha=16, restart_mode="product")
        torch.manual_seed(2)
        with torch.no_grad():
            for m in network.loras:
                m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape).to(device))
        plant_rank(network, 5)
        report = network.restart(p=0.95)
        ranks[device] = report.ranks
        assert all(p.device.type == device and bool(torch.isfinite(p).all()) for p in network.parameters())
    assert ranks["cuda"] == ranks["cpu"] and set(ranks["cuda"].values()) == {5}


def test_a_paper_mode_restart_runs_on_the_gpu_without_leaving_it():
    network = attach(small_model("cuda"), max_rank=16, alpha=16)
    plant_rank(network, 5)
    report = network.restart(p=0.9)
    assert all(1 <= k <= 16 for k in report.ranks.values())
    assert all(p.device.type == "cuda" and bool(torch.isfinite(p).all()) for p in network.parameters())


# --- the training step: no synchronisation, and the memory aclora vram predicts -------------------------------------------
def tiny_sdxl_step_on_cuda(**setup_changes):
    from aclora_ext.harness import tiny
    from aclora_ext.tools import vram

    models = tiny.sdxl_models(seed=0)
    cuda = vram.Models("sdxl", models["unet"].to("cuda"), [te.to("cuda") for te in models["text_encoders"]])
    setup = vram.Setup(family="sdxl", width=64, height=64, rank=8, alpha=4, train_text_encoder=True, **setup_changes)
    vram.prepare_models(cuda, setup)
    return vram.TrainingStep(cuda, setup, "cuda")


@pytest.mark.parametrize("mode", ["paper", "product"])
def test_training_steps_on_the_gpu_never_synchronise(mode):
    """sd-scripts' step (bf16 autocast, checkpointing, both text encoders trained, accelerate's backward, clipping,
    AdamW as --optimizer_type AdamW builds it), with dropouts on, under CUDA's sync debug mode."""
    run = tiny_sdxl_step_on_cuda(network_args=(("restart_mode", mode), ("dropout", "0.1"), ("rank_dropout", "0.1"),
                                               ("module_dropout", "0.1")))
    try:
        run.step()  # the first step's one-time set-up (cuBLAS handles, lazy module loading) is not checked
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                run.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        run.close()
    assert run.network.clock.optimizer_steps == 4


def test_the_estimate_is_within_ten_percent_of_the_measured_peak_on_sd1_at_512():
    """The real SD1.x architecture (random weights) on the GPU: aclora vram's count against
    torch.cuda.max_memory_allocated over one step (the difference: cuDNN/cuBLAS workspaces, allocator rounding)."""
    from aclora_ext.tools import vram

    setup = vram.Setup(family="sd1", width=512, height=512, batch_size=1, rank=32, alpha=16, mixed_precision="bf16",
                       gradient_checkpointing=False, train_text_encoder=False, optimizer="AdamW", cache_latents=True)
    estimate = vram.estimate(setup, measure_restart=False)
    run = vram.TrainingStep(vram.build_models(setup, device="cuda"), setup, "cuda")
    try:
        run.warm_optimizer()
        run.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run.step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    finally:
        run.close()
    assert abs(estimate.peak_bytes - measured) <= 0.10 * measured, (estimate.peak_bytes, measured)
