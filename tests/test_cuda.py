"""On a CUDA device: the training hot path never synchronises, and RESTART decides as on the CPU.

These tests skip cleanly on machines without CUDA (CI has none); run them
where a GPU is available.
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
