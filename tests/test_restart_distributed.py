"""Several processes (DDP, accelerate multi-GPU) end every RESTART with bit-identical weights.

Two CPU processes join a gloo process group, build the same tiny model and
network, and then deliberately disagree: each feeds different losses and adds a
different perturbation to its LoRA weights before the RESTART. Afterwards both
must hold the same weights and ranks and have used the same threshold: paper
mode's p computed from the loss averaged over both processes, product mode's
fixed_p.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from aclora_ext.network.factory import attach

WORLD = 2
LOSSES = {0: [0.1, 0.3], 1: [0.5, 0.7]}  # per process; the mean over both is 0.4
TOTAL_STEPS = 10  # two losses recorded (= two optimizer steps) of ten: progress 0.2, alpha 1.2
SIGNAL_RANK = {0: 2, 1: 5}  # each process plants a different signal in its weights
MODES = ("paper", "product")
#: product mode's energy share: without a held-out loss a product RESTART leaves training whole, so an explicit
#: share makes it cut (each process from its own weights) and broadcast
PRODUCT_P = 0.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        for mode in MODES:
            restart_once(rank, mode, out_dir)
        hold_differently(rank, out_dir)
    finally:
        dist.destroy_process_group()


def restart_once(rank: int, mode: str, out_dir: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 16))
    network = attach(model, max_rank=8, restart_mode=mode, seed=7,
                     **({"fixed_p": PRODUCT_P} if mode == "product" else {}))
    network.set_training_length(total_steps=TOTAL_STEPS)
    g = torch.Generator().manual_seed(100 + rank)
    k = SIGNAL_RANK[rank]
    with torch.no_grad():
        for m in network.loras:
            for w in (m.lora_down.weight, m.lora_up.weight):
                rows, cols = w.shape
                w.add_(torch.randn(rows, k, generator=g) @ torch.randn(k, cols, generator=g))
    for value in LOSSES[rank]:
        network.record_loss(torch.tensor(value))
    report = network.restart()
    torch.save({"params": {n: p.detach().clone() for n, p in network.named_parameters()},
                "ranks": network.ranks(), "p": report.p, "level": report.level, "loss": report.loss,
                "alpha": report.alpha},
               os.path.join(out_dir, f"{mode}-rank{rank}.pt"))


#: the slots each process holds before the broadcast, per module: (rank 0's, rank 1's); None: none held
HELD_FROM = ((None, 4), (3, 6), (5, None))


def hold_differently(rank: int, out_dir: str) -> None:
    """Each process held other slots (its own held-out share decided): after the broadcast, rank 0's."""
    from aclora_ext.network.restart_runner import broadcast_from_rank0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 16))
    network = attach(model, max_rank=8)
    for m, starts in zip(network.loras, HELD_FROM):
        if starts[rank] is not None:
            m.hold_slots(torch.arange(m.rank) >= starts[rank])
    broadcast_from_rank0(network.loras, list(network.ranks().values()), list(network.parameters()))
    torch.save({"held": [m.held for m in network.loras],
                "params": {n: p.detach().clone() for n, p in network.named_parameters()}},
               os.path.join(out_dir, f"held-rank{rank}.pt"))


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """Both processes' results of one RESTART in each mode (one process group for all: it costs seconds)."""
    out = tmp_path_factory.mktemp("two-processes")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return {mode: [torch.load(out / f"{mode}-rank{r}.pt") for r in range(WORLD)] for mode in (*MODES, "held")}


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_end_a_restart_with_identical_weights_ranks_and_p(mode, restarted):
    first, second = restarted[mode]
    mean = sum(LOSSES[0] + LOSSES[1]) / 4
    for result in (first, second):
        assert result["loss"] == pytest.approx(mean)
        assert result["alpha"] == pytest.approx(1 + 2 / TOTAL_STEPS)
        if mode == "paper":  # p from the loss averaged over both processes
            assert result["p"] == pytest.approx(1 - mean ** (1 + 2 / TOTAL_STEPS))
        else:  # the energy share fixed_p, whatever the loss
            assert result["p"] == PRODUCT_P and result["level"] is None
    assert first["p"] == second["p"] or (first["p"] != first["p"] and second["p"] != second["p"])
    assert first["level"] == second["level"]
    assert first["ranks"] == second["ranks"]
    assert first["params"].keys() == second["params"].keys()
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name


def test_the_held_slots_follow_rank_0_so_every_process_trains_the_same_ranks(restarted):
    first, second = restarted["held"]
    for i, starts in enumerate(HELD_FROM):
        expected = None if starts[0] is None else torch.arange(8) >= starts[0]
        for result in (first, second):
            held = result["held"][i]
            assert (held is None) if expected is None else torch.equal(held, expected), (i, held)
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name
