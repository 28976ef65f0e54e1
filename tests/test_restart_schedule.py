"""When RESTART runs, the loss it reads, resuming, and faults.

A tiny MLP with AC-LoRA attached is trained on a fixed low-rank regression task
by ``sd_scripts_loop``, which calls the network's hooks in sd-scripts' order
(train_network.py): ``on_epoch_start`` per epoch; per micro-batch, after the
batches a resume skips, ``on_step_start``, forward, ``backward``, optimizer
step. The loss reaches the network through a real ``accelerate.Accelerator.backward``
or through ``record_loss``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from safetensors import safe_open
from torch import nn

from aclora_ext import functional as F
from aclora_ext.network.factory import attach
from aclora_ext.options import OptionError

WIDTH = 16
MAX_RANK = 8


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, 32), nn.Tanh(), nn.Linear(32, WIDTH))


def make_network(seed: int = 0, **options):
    """(model, network): AC-LoRA at maximum rank 8 on both Linear layers of a tiny MLP (paper mode unless told)."""
    model = tiny_model(seed)
    options.setdefault("restart_mode", "paper")  # these tests pin the schedule and the paper's p = 1 - L^alpha
    return model, attach(model, max_rank=MAX_RANK, alpha=4.0, **options)


def sd_args(epochs: Optional[int], batches: int, accumulation: int = 1, steps: Optional[int] = None) -> argparse.Namespace:
    """What the network reads of sd-scripts' args once the loop starts: with --max_train_epochs,
    sd-scripts sets max_train_steps = epochs * optimizer steps per epoch."""
    per_epoch = math.ceil(batches / accumulation)
    return argparse.Namespace(max_train_epochs=epochs, max_train_steps=steps if steps else epochs * per_epoch,
                              gradient_accumulation_steps=accumulation)


@dataclass
class Trace:
    """What the loop saw: every loss fed (epoch, micro-batch, value), where RESTARTs ran (epoch, micro-batch)
    and the gradient held by the LoRA parameters at that moment."""

    losses: list = field(default_factory=list)
    restarts: list = field(default_factory=list)
    grads_at_restart: list = field(default_factory=list)


def batch(epoch: int, step: int) -> torch.Tensor:
    return torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(1000 * epoch + step))


@functools.lru_cache(maxsize=None)
def base_model(seed: int = 0) -> nn.Module:
    return tiny_model(seed).requires_grad_(False)


def target(x: torch.Tensor) -> torch.Tensor:
    """The task: the base model plus a fixed rank-2 correction (what the LoRA has to learn)."""
    g = torch.Generator().manual_seed(42)
    correction = torch.randn(WIDTH, 2, generator=g) @ torch.randn(2, WIDTH, generator=g) * 0.05
    return base_model()(x) + x @ correction


def sd_scripts_loop(model, network, args, batches: int, trace: Trace, *, epochs: Optional[range] = None,
                    skip: int = 0, stop_after: Optional[tuple[int, int]] = None,
                    accelerator: Optional[Accelerator] = None, lr: float = 0.05,
                    loss_value=None) -> Trace:
    """train_network.py's loop. ``skip``: micro-batches of the first epoch already done (a resume
    with --skip_until_initial_step; skipped *before* on_step_start). ``stop_after=(epoch, batch)``:
    return after that micro-batch (where --save_state would write the state). ``loss_value(epoch,
    step)``, when given, is the loss fed instead of the task's (gradients still flow)."""
    total = math.ceil(args.max_train_steps / math.ceil(batches / args.gradient_accumulation_steps))
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)  # no state: a resume needs only the network's
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    for epoch in epochs if epochs is not None else range(total):
        restarts = network.clock.restarts
        network.on_epoch_start(None, None)
        if network.clock.restarts != restarts:
            trace.restarts.append((epoch, 0))
        for step in range(batches):
            if skip:
                skip -= 1
                continue
            context = accelerator.accumulate(model) if accelerator is not None else contextlib.nullcontext()
            with context:
                restarts = network.clock.restarts
                network.on_step_start(None, None)
                if network.clock.restarts != restarts:
                    trace.restarts.append((epoch, step))
                    trace.grads_at_restart.append(sum(float(p.grad.abs().sum()) for p in network.parameters()
                                                      if p.grad is not None))
                x = batch(epoch, step)
                loss = nn.functional.mse_loss(model(x), target(x))
                if loss_value is not None:
                    loss = loss * 0 + loss_value(epoch, step)
                trace.losses.append((epoch, step, float(loss.detach())))
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                    network.record_loss(loss.detach())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if stop_after == (epoch, step):
                return trace
    return trace


def restart_points(network) -> list[tuple[int, int]]:
    return [(h["epoch"], h["step"]) for h in network.history]


# --- the epoch schedule ----------------------------------------------------------------------

def test_by_default_restarts_run_every_tenth_of_the_run_and_not_after_the_last_epoch():
    """20 epochs of 3 steps: E = 2, so RESTARTs follow epochs 2, 4, ..., 18 (at the start of 3, 5, ..., 19)."""
    model, network = make_network()
    args = sd_args(epochs=20, batches=3)
    network.prepare_network(args)
    sd_scripts_loop(model, network, args, 3, Trace())
    assert restart_points(network) == [(e, 3 * e) for e in range(2, 20, 2)]
    network.on_epoch_start(None, None)  # a stray call after the last epoch (20 = a multiple of E)
    assert len(network.history) == 9


def test_a_run_counted_in_steps_gets_the_same_default_schedule():
    """--max_train_steps 60 with 3 steps per epoch is 20 epochs; the epoch length is observed in the first epoch."""
    model, network = make_network()
    args = sd_args(epochs=None, batches=3, steps=60)
    network.prepare_network(args)
    sd_scripts_loop(model, network, args, 3, Trace())
    assert restart_points(network) == [(e, 3 * e) for e in range(2, 20, 2)]


def test_restart_every_three_epochs():
    model, network = make_network(restart_every=3)
    args = sd_args(epochs=10, batches=2)
    network.prepare_network(args)
    sd_scripts_loop(model, network, args, 2, Trace())
    assert restart_points(network) == [(3, 6), (6, 12), (9, 18)]


def test_restart_mode_off_never_restarts_but_still_counts():
    model, network = make_network(restart_mode="off")
    args = sd_args(epochs=20, batches=3)
    network.prepare_network(args)
    sd_scripts_loop(model, network, args, 3, Trace())
    assert network.history == [] and network.clock.restarts == 0
    assert network.clock.optimizer_steps == 60
    assert set(network.ranks().values()) == {MAX_RANK}


@pytest.mark.parametrize("options, what", [({"restart_every": 30}, "restart_every=30"),
                                           ({"restart_every_steps": 100}, "restart_every_steps=100")])
def test_an_interval_longer_than_the_run_warns_once_and_never_restarts(options, what, caplog):
    model, network = make_network(**options)
    args = sd_args(epochs=20, batches=3)
    network.prepare_network(args)
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        sd_scripts_loop(model, network, args, 3, Trace())
    assert network.history == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and what in warnings[0] and "no RESTART" in warnings[0]


def test_p_follows_one_minus_the_mean_loss_to_the_power_one_plus_progress_over_a_run():
    """Eq. 5-6 / Algorithm 1: at each RESTART L = mean loss since the previous one, alpha = 1 + epoch / total."""
    model, network = make_network(restart_every=2)
    args = sd_args(epochs=10, batches=3)
    network.prepare_network(args)
    trace = sd_scripts_loop(model, network, args, 3, Trace(), loss_value=lambda e, s: 0.6 - 0.05 * e + 0.01 * s)
    assert len(network.history) == 4
    previous = 0
    for h in network.history:
        window = [v for e, _, v in trace.losses if previous <= e < h["epoch"]]
        previous = h["epoch"]
        mean = sum(window) / len(window)
        assert h["loss"] == pytest.approx(mean, rel=1e-6)
        assert h["alpha"] == pytest.approx(1 + h["epoch"] / 10)
        assert h["p"] == pytest.approx(1 - mean ** (1 + h["epoch"] / 10), rel=1e-6)
    assert [h["p"] for h in network.history] == sorted(h["p"] for h in network.history)


# --- the step schedule -----------------------------------------------------------------------------

def test_restart_every_steps_counts_optimizer_steps_not_micro_batches():
    """restart_every_steps=5 with gradient accumulation 2 through a real Accelerator: 6 micro-batches
    (3 optimizer steps) per epoch, 4 epochs; RESTARTs after optimizer steps 5 and 10, each at the first
    micro-batch of an accumulation window, when no gradient is being accumulated."""
    model, network = make_network(restart_every_steps=5)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    args = sd_args(epochs=4, batches=6, accumulation=2)
    network.prepare_network(args)
    trace = sd_scripts_loop(model, network, args, 6, Trace(), accelerator=accelerator)
    assert network.clock.optimizer_steps == 12
    assert restart_points(network) == [(1, 5), (3, 10)]
    assert trace.restarts == [(1, 4), (3, 2)]
    assert all(micro % 2 == 0 for _, micro in trace.restarts)
    assert trace.grads_at_restart == [0.0, 0.0]
    # L is the mean of the (undivided) losses handed to backward since the previous RESTART
    first_window = [v for e, s, v in trace.losses if (e, s) < (1, 4)]
    assert network.history[0]["loss"] == pytest.approx(sum(first_window) / len(first_window), rel=1e-6)


def test_restart_every_steps_with_plain_record_loss():
    model, network = make_network(restart_every_steps=4)
    args = sd_args(epochs=3, batches=5)
    network.prepare_network(args)
    sd_scripts_loop(model, network, args, 5, Trace())
    assert restart_points(network) == [(0, 4), (1, 8), (2, 12)]


# --- resume -------------------------------------------------------------------------------------------

def run_with_resume(save_at: Optional[tuple[int, int]], epochs=10, batches=3, **options):
    """Train ``epochs``; with ``save_at=(epoch, batch)`` save the state after that micro-batch, load it into a
    fresh network and finish the run as sd-scripts' --resume --skip_until_initial_step does."""
    args = sd_args(epochs=epochs, batches=batches)
    model, network = make_network(**options)
    network.prepare_network(args)
    trace = sd_scripts_loop(model, network, args, batches, Trace(), stop_after=save_at)
    if save_at is None:
        return network
    state = {k: v.clone() for k, v in network.state_dict().items()}  # what accelerate's save_state writes
    model, network = make_network(**options)
    network.prepare_network(args)
    network.load_state_dict(state)
    done = save_at[0] * batches + save_at[1] + 1  # sd-scripts' global step in the state
    first_epoch, into_epoch = divmod(done, batches)
    sd_scripts_loop(model, network, args, batches, trace, epochs=range(first_epoch, epochs), skip=into_epoch)
    return network


@pytest.mark.parametrize("save_at", [(3, 2), (0, 2), (5, 0), (4, 1)],
                         ids=["end of epoch 4 (a RESTART is due next)", "end of the first epoch",
                              "mid-epoch 6", "mid-epoch 5"])
@pytest.mark.parametrize("options", [{"restart_every": 2}, {"restart_every_steps": 4}], ids=["epochs", "steps"])
def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(save_at, options):
    straight = run_with_resume(None, **options)
    resumed = run_with_resume(save_at, **options)
    assert len(straight.history) >= 4
    assert restart_points(resumed) == restart_points(straight)
    assert resumed.ranks() == straight.ranks()
    assert resumed.clock.as_list() == straight.clock.as_list()
    for a, b in zip(resumed.history, straight.history):
        assert a["ranks"] == b["ranks"] and a["index"] == b["index"]
        assert a["p"] == pytest.approx(b["p"], abs=1e-8) and a["loss"] == pytest.approx(b["loss"], abs=1e-8)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_run_counted_in_steps_resumed_inside_its_first_epoch_continues_exactly():
    """Before the first epoch ends the epoch length is unknown; a state from inside it is re-entered."""
    def run(save_at):
        args = sd_args(epochs=None, batches=4, steps=24)
        model, network = make_network(restart_every_steps=3)
        network.prepare_network(args)
        trace = sd_scripts_loop(model, network, args, 4, Trace(), stop_after=save_at)
        if save_at is not None:
            state = network.state_dict()
            model, network = make_network(restart_every_steps=3)
            network.prepare_network(args)
            network.load_state_dict(state)
            sd_scripts_loop(model, network, args, 4, trace, skip=save_at[1] + 1)
        return network

    straight, resumed = run(None), run((0, 1))
    assert restart_points(resumed) == restart_points(straight) == [(0, 3), (1, 6), (2, 9), (3, 12), (3, 15), (4, 18), (5, 21)]
    assert resumed.ranks() == straight.ranks()
    assert resumed.clock.as_list() == straight.clock.as_list()


def test_the_restart_state_is_in_the_state_dict_but_never_in_an_exported_file(tmp_path):
    network = run_with_resume(None, restart_every=2)
    assert {"aclora_clock", "aclora_ranks", "aclora_history_ranks", "aclora_history_stats"} <= set(network.state_dict())
    path = str(tmp_path / "lora.safetensors")
    assert network.save_weights(path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "aclora" in k]


# --- loss capture ------------------------------------------------------------------------------------------

def test_the_loss_given_to_accelerator_backward_is_captured_and_non_finite_values_are_left_out(caplog):
    model, network = make_network(restart_every=1)
    accelerator = Accelerator()
    args = sd_args(epochs=2, batches=6)
    network.prepare_network(args)
    fed = {0: 0.3, 1: float("nan"), 2: 0.5, 3: float("inf"), 4: 0.1, 5: 0.7}
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        sd_scripts_loop(model, network, args, 6, Trace(), accelerator=accelerator, epochs=range(2), lr=0.0,
                        loss_value=lambda e, s: fed[s])
    report = network.history[0]
    assert report["loss"] == pytest.approx((0.3 + 0.5 + 0.1 + 0.7) / 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 non-finite loss value(s)" in w for w in warnings)
    assert all(torch.isfinite(p).all() for p in network.parameters())


def test_record_loss_feeds_the_mean_loss_of_a_plain_loop():
    _, network = make_network()
    network.set_training_length(total_steps=10)
    for value in (0.2, 0.4, 0.9):
        network.record_loss(torch.tensor(value))
    report = network.restart()
    assert report.loss == pytest.approx(0.5)
    assert report.alpha == pytest.approx(1.3)  # 3 of 10 steps done
    assert report.p == pytest.approx(1 - 0.5**1.3)


def test_a_due_restart_without_any_loss_is_skipped_with_one_warning(caplog):
    _, network = make_network(restart_every=1)
    network.set_training_length(total_epochs=4)
    before = [p.detach().clone() for p in network.parameters()]
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        for _ in range(4):
            network.on_epoch_start(None, None)
    assert network.clock.restarts == 3 and network.history == []
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no training loss" in warnings[0] and "fixed_p" in warnings[0]
    assert not network.restart().applied


def test_without_any_loss_fixed_p_is_used():
    _, network = make_network(restart_every=1, fixed_p=0.8)
    network.set_training_length(total_epochs=3)
    for _ in range(3):
        network.on_epoch_start(None, None)
    assert [h["p"] for h in network.history] == [0.8, 0.8]


def test_fixed_p_replaces_the_loss_rule():
    _, network = make_network(fixed_p=0.7)
    network.record_loss(0.2)
    report = network.restart()
    assert report.p == 0.7 and report.p_source == "fixed_p" and report.loss == pytest.approx(0.2)


def test_restart_with_an_explicit_p_uses_it_and_rejects_one_outside_zero_one():
    _, network = make_network()
    network.record_loss(0.2)
    report = network.restart(p=0.33)
    assert report.p == 0.33 and report.p_source == "given"
    with pytest.raises(OptionError, match="p=1.5"):
        network.restart(p=1.5)


def test_the_report_and_ranks_describe_the_restart():
    model, network = make_network(restart_every=2)
    args = sd_args(epochs=6, batches=3)
    network.prepare_network(args)
    sd_scripts_loop(model, network, args, 3, Trace(), epochs=range(2))
    report = network.restart(progress=0.25)
    names = [m.lora_name for m in network.loras]
    assert list(report.ranks) == names and report.ranks == network.ranks()
    assert all(1 <= k <= MAX_RANK for k in report.ranks.values())
    # called inside the second epoch: one epoch completed, 6 optimizer steps done
    assert (report.index, report.epoch, report.step, report.max_rank, report.mode) == (1, 1, 6, MAX_RANK, "paper")
    assert report.applied and report.skipped == [] and not report.p_clamped
    assert report.alpha == pytest.approx(1.25) and report.p == pytest.approx(1 - report.loss**1.25)
    assert report.seconds > 0
    assert network.history[-1]["ranks"] == [report.ranks[n] for n in names]


def test_each_restart_logs_one_readable_info_line(caplog):
    model, network = make_network(restart_every=1)
    args = sd_args(epochs=4, batches=3)
    network.prepare_network(args)
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        sd_scripts_loop(model, network, args, 3, Trace())
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "RESTART" in r.getMessage()]
    assert len(lines) == len(network.history) == 3
    for line, h in zip(lines, network.history):
        lo, mid, hi = min(h["ranks"]), F.median(h["ranks"]), max(h["ranks"])
        assert f"p={h['p']:.4f}" in line
        assert f"mean loss {h['loss']:.4f}" in line
        assert f"ranks min/median/max {lo}/{mid:g}/{hi}" in line
        assert re.search(r"in \d+\.\d\ds", line)


class MemoryTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given."""

    name = "memory"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[Optional[int], dict]] = []

    @property
    def tracker(self):
        return self

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


def test_restarts_go_to_accelerate_trackers():
    tracker = MemoryTracker()
    accelerator = Accelerator(log_with=[tracker])
    accelerator.init_trackers("aclora-test")
    model, network = make_network(restart_every=1)
    args = sd_args(epochs=3, batches=3)
    network.prepare_network(args)
    sd_scripts_loop(model, network, args, 3, Trace(), accelerator=accelerator)
    logged = [(step, values) for step, values in tracker.logged if "aclora/p" in values]
    assert len(logged) == len(network.history) == 2
    for (step, values), h in zip(logged, network.history):
        assert step == h["step"]
        assert values["aclora/p"] == pytest.approx(h["p"])
        assert values["aclora/loss"] == pytest.approx(h["loss"])
        assert (values["aclora/rank_min"], values["aclora/rank_median"], values["aclora/rank_max"]) == (
            min(h["ranks"]), F.median(h["ranks"]), max(h["ranks"]))
    accelerator.end_training()


# --- faults ----------------------------------------------------------------------------------------------------

def planted_network(**options):
    """Three same-shaped modules (one batch) with learned-looking factors: a rank-2 signal plus noise."""
    torch.manual_seed(0)
    network = attach(nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(3))), max_rank=MAX_RANK, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in network.loras:
            for w in (m.lora_down.weight, m.lora_up.weight):
                rows, cols = w.shape
                w.copy_(torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
                        + 0.01 * torch.randn(rows, cols, generator=g))
    return network


@pytest.mark.parametrize("mode", ["paper", "product"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_module_with_non_finite_weights_is_skipped_and_nothing_spreads(bad, mode, caplog):
    network = planted_network(restart_mode=mode)
    broken = network.loras[1]
    with torch.no_grad():
        broken.lora_up.weight[3, 1] = bad
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        report = network.restart(p=0.9)
    assert report.skipped == [broken.lora_name]
    ranks = [report.ranks[m.lora_name] for m in network.loras]
    # each factor holds a rank-2 signal: the paper's per-factor count finds 2; their product (the
    # update) is dominated by one component at p = 0.9; the broken module keeps its rank
    assert ranks == ([2, MAX_RANK, 2] if mode == "paper" else [1, MAX_RANK, 1])
    assert any(broken.lora_name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name, p in network.named_parameters():
        if name.startswith(broken.lora_name):
            torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True)
        else:
            assert torch.isfinite(p).all() and not torch.equal(p, before[name])


def failing(name: str, fail_in: tuple[torch.dtype, ...]):
    """torch.linalg.<name> that fails to converge on inputs of the given dtypes."""
    original = getattr(torch.linalg, name)

    def decomposition(matrix, *args, **kwargs):
        if matrix.dtype in fail_in:
            raise torch.linalg.LinAlgError(f"linalg.{name}: The algorithm failed to converge (simulated)")
        return original(matrix, *args, **kwargs)

    return decomposition


DECOMPOSITION = {"paper": "eigh", "product": "svd"}  # what each mode decomposes


@pytest.mark.parametrize("mode", ["paper", "product"])
def test_a_decomposition_failing_in_float32_is_retried_in_float64(mode, monkeypatch, caplog):
    expected = planted_network(restart_mode=mode).restart(p=0.9).ranks  # what float32 decides when it works
    network = planted_network(restart_mode=mode)
    before = [p.detach().clone() for p in network.parameters()]
    monkeypatch.setattr(torch.linalg, DECOMPOSITION[mode], failing(DECOMPOSITION[mode], (torch.float32,)))
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        report = network.restart(p=0.9)
    assert report.skipped == [] and report.ranks == expected and max(expected.values()) < MAX_RANK
    assert any("float64" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for p, old in zip(network.parameters(), before):
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and not torch.equal(p, old)


@pytest.mark.parametrize("mode", ["paper", "product"])
def test_a_decomposition_failing_in_float64_too_leaves_the_module_unchanged(mode, monkeypatch, caplog):
    network = planted_network(restart_mode=mode)
    before = [p.detach().clone() for p in network.parameters()]
    monkeypatch.setattr(torch.linalg, DECOMPOSITION[mode],
                        failing(DECOMPOSITION[mode], (torch.float32, torch.float64)))
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        report = network.restart(p=0.9)
    assert report.skipped == [m.lora_name for m in network.loras]
    assert set(report.ranks.values()) == {MAX_RANK}
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters()))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("left unchanged" in m for m in messages) == 3


@pytest.mark.parametrize("options, names", [
    ({"restart_every": 2, "restart_every_steps": 5}, ("restart_every=2", "restart_every_steps=5")),
    ({"restart_mode": "off", "fixed_p": 0.5}, ("fixed_p=0.5", "restart_mode=off")),
    ({"min_rank": 9}, ("min_rank=9",)),
])
def test_contradictory_options_are_refused_by_name(options, names):
    with pytest.raises(OptionError) as error:
        make_network(**options)
    assert all(n in str(error.value) for n in names)


def test_the_resumable_state_uses_only_dtypes_nccl_can_broadcast():
    """DDP broadcasts every buffer at start-up; NCCL has no int16 (or other exotic) type."""
    nccl_types = {torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64,
                  torch.bfloat16, torch.bool}
    _, network = make_network()
    assert {buffer.dtype for buffer in network.buffers()} <= nccl_types


def test_the_restart_line_says_the_maximum_rank_even_after_every_module_was_cut_below_it(caplog):
    # "of N" is the network's maximum rank (what a module may hold), not the largest rank left by the last
    # RESTART: after every module is cut to 1, the next line must still say "of MAX_RANK", as its history does
    _, network = make_network()
    network.record_loss(0.2)
    first = network.restart(p=0.01)  # keeps the first component of every module
    assert set(first.ranks.values()) == {1} and first.max_rank == MAX_RANK
    network.record_loss(0.2)
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        second = network.restart(p=0.01)
    assert second.max_rank == MAX_RANK
    line = [r.getMessage() for r in caplog.records if "RESTART #2" in r.getMessage()][0]
    assert f"ranks min/median/max 1/1/1 of {MAX_RANK} over" in line
