"""The network's resumable state: what ``--save_state`` keeps and ``--resume`` restores.

Integer buffers of the network (``aclora_*``), never exported to LoRA files: the
epoch/step clock, the current ranks, the RESTART history, the loss sums since the
last RESTART, the rank search's running scores and activation statistics. Floats
are stored as integers (fixed point or float64 bit patterns) so that a network
cast with ``.to(dtype)`` keeps them exact.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from .. import functional as F
from ..lora.batching import held_slots, hold_from
from ..lora.report import RestartReport
from . import schedule

logger = logging.getLogger(__name__)

HISTORY_CAPACITY = 128  # restarts kept in the resumable state (the oldest are dropped beyond it)
FIXED_POINT = 1_000_000_000  # p and L are stored in integer buffers (float buffers would follow .to(dtype))
#: how a product-mode threshold was decided, as stored in the resumable history
SOURCES = ("loss", "fixed_p", "given", "validation", "prior", "frozen", "deferred")


def register_buffers(network) -> None:
    """Resumable state as integer buffers: saved by --save_state, never exported."""
    n = len(network.loras)
    network.register_buffer("aclora_clock", torch.zeros(schedule.Clock.size(), dtype=torch.int64))
    network.register_buffer("aclora_ranks", torch.zeros(n, dtype=torch.int64))
    # int32, not int16: NCCL (DDP broadcasts buffers at start-up) has no 16-bit integer type
    network.register_buffer("aclora_history_ranks", torch.zeros(HISTORY_CAPACITY, n, dtype=torch.int32))
    network.register_buffer("aclora_history_stats", torch.zeros(HISTORY_CAPACITY, 11, dtype=torch.int64))
    # the loss sums since the last RESTART (float64 bit patterns), so a resumed run's next L is the same
    network.register_buffer("aclora_loss", torch.zeros(3, dtype=torch.int64))
    # product mode: the running held-out score of every candidate level, then the level last chosen
    # (float64 bit patterns; NaN: none yet)
    network.register_buffer("aclora_levels", torch.zeros(len(F.LEVELS) + 1, dtype=torch.int64))
    # product mode: the activation statistics since the last RESTART (RankSearch.stats_state); empty
    # between saves, so no device memory is held for it
    network.register_buffer("aclora_input_stats", torch.zeros(0, dtype=torch.int64))
    # product mode: every module's held slots (1 = held), concatenated; empty when none is held
    network.register_buffer("aclora_held", torch.zeros(0, dtype=torch.int64))
    # holdout=: the held set, whether it was decided, and the identities it rests on (Holdout.state); empty
    # between saves and without holdout
    network.register_buffer("aclora_holdout", torch.zeros(0, dtype=torch.int64))


def write_buffers(network) -> None:
    """Fill the buffers from the network's Python-side state, just before torch saves them."""
    network.aclora_clock.copy_(torch.tensor(network.clock.as_list()))
    network.aclora_ranks.copy_(torch.tensor([network._signal[m.lora_name] for m in network.loras]))
    network.aclora_history_ranks.zero_()
    network.aclora_history_stats.zero_()
    for row, report in enumerate(network.history[-HISTORY_CAPACITY:]):
        network.aclora_history_ranks[row] = torch.tensor(list(report.ranks.values()), dtype=torch.int32)
        network.aclora_history_stats[row] = torch.tensor(history_row(report))
    network.aclora_loss.copy_(network.loss_meter.state().to(network.aclora_loss.device).view(torch.int64))
    network.aclora_levels.copy_(network.rank_search.state().view(torch.int64))
    network.aclora_input_stats = network.rank_search.stats_state(network.loras).view(torch.int64)
    if network.rank_search.holding(network.loras):
        network.aclora_held = held_slots(network.loras)
    if network.holdout is not None:
        network.items.resolve()  # the views the steps left on the device: a resumed run must know them too
        network.aclora_holdout = network.holdout.state(network.items.recogniser).to(network.aclora_levels.device)


def clear_transient(network) -> None:
    """After a save: the activation statistics' buffer holds no device memory between saves."""
    network.aclora_input_stats = torch.zeros(0, dtype=torch.int64, device=network.aclora_levels.device)
    network.aclora_held = torch.zeros(0, dtype=torch.int64, device=network.aclora_levels.device)
    network.aclora_holdout = torch.zeros(0, dtype=torch.int64, device=network.aclora_levels.device)


Variable = tuple[Optional[torch.Tensor], ...]


def upgrade(state_dict: dict, prefix: str) -> Variable:
    """Before torch loads the buffers: make a state saved by an older version loadable (in place), and
    return the activation statistics, held slots and held set it holds (None: a state saved before that
    buffer existed; their sizes vary, so torch does not load them)."""
    names = ("aclora_input_stats", "aclora_held", "aclora_holdout")
    variable = tuple(state_dict.get(prefix + name) for name in names)
    if prefix + "aclora_clock" in state_dict:  # also a state saved before one of them was kept
        for name in names:
            state_dict[prefix + name] = torch.zeros(0, dtype=torch.int64)
    old = state_dict.get(prefix + "aclora_history_stats")
    if isinstance(old, torch.Tensor) and old.dim() == 2 and old.shape[1] == 8:  # saved by version 0.1
        pad = torch.tensor([-1, 0, -1], dtype=old.dtype).expand(old.shape[0], 3)
        state_dict[prefix + "aclora_history_stats"] = torch.cat([old, pad], dim=1)
    return variable


def read_buffers(network, state_dict: dict, prefix: str, variable: Variable) -> None:
    """After torch loaded the buffers: rebuild the network's Python-side state from them (``variable``:
    what ``upgrade`` took out)."""
    input_stats, held, held_set = variable
    if prefix + "aclora_clock" not in state_dict:
        return
    network.clock.load_list(network.aclora_clock.tolist())
    if network.clock.optimizer_steps > network.clock.steps_at_epoch_start:
        network.clock.resumed_mid_epoch = 1  # the next on_epoch_start may re-enter this epoch (see there)
    if prefix + "aclora_loss" in state_dict and (not schedule.distributed() or torch.distributed.get_rank() == 0):
        # every process loads rank 0's sums: only one keeps them, or the all-reduce would count them twice
        network.loss_meter.load(network.aclora_loss.view(torch.float64))
    for m, k in zip(network.loras, network.aclora_ranks.tolist()):
        network._signal[m.lora_name] = int(k) if k > 0 else m.rank
    if prefix + "aclora_levels" in state_dict:
        network.rank_search.load_state(network.aclora_levels.cpu().view(torch.float64))
    if isinstance(input_stats, torch.Tensor):
        network.rank_search.load_stats_state(network.loras, input_stats.cpu().view(torch.float64))
    if isinstance(held, torch.Tensor) and held.numel() == sum(m.rank for m in network.loras):
        hold_from(network.loras, held)
    if network.holdout is not None:
        read_holdout(network, held_set)
    names = [m.lora_name for m in network.loras]
    network.history = [
        history_record(stats, ranks, names, network.config.restart_mode, network.max_rank)
        for ranks, stats in zip(network.aclora_history_ranks.tolist(), network.aclora_history_stats.tolist())
        if stats[7] == 1
    ]


def read_holdout(network, held_set: Optional[torch.Tensor]) -> None:
    """holdout=: the held set as the saved run had it, or (a state without one) say that it is drawn afresh."""
    if isinstance(held_set, torch.Tensor) and held_set.numel() > 0:
        network.holdout.load_state(held_set, network.items.recogniser, network.aclora_levels.device)
        return
    logger.warning(
        "AC-LoRA: holdout: the saved state has no held set (saved without holdout, or by an older version): the "
        "held set restarts with the first epoch's rule, so images trained before the resume may now be held"
    )


def history_row(report: RestartReport) -> list[int]:
    """A RESTART as the 11 integers of its row in ``aclora_history_stats``: index, epoch, step, p, L, alpha,
    microseconds, 1 (the row is used), level (capped at 1e6: keep everything), source, held-out loss."""
    return [
        report.index,
        report.epoch,
        report.step,
        _fixed(report.p),
        _fixed(report.loss),
        round(report.alpha * FIXED_POINT),
        round(report.seconds * 1e6),
        1,
        _fixed(None if report.level is None else min(report.level, 1e6)),
        SOURCES.index(report.p_source),
        _fixed(report.validation_loss),
    ]


def history_record(stats: list[int], ranks: list[int], names: list[str], mode: str, max_rank: int) -> RestartReport:
    """A used row back as the RESTART it stores (``stats`` of 8 columns: saved by version 0.1)."""
    stats = stats + [-1, 0, -1][len(stats) - 8 :]  # a state saved before the product-mode columns
    level = _unfixed(stats[8])
    entry: dict[str, Any] = {
        "index": stats[0],
        "epoch": stats[1],
        "step": stats[2],
        "p": _unfixed(stats[3]),
        "loss": _unfixed(stats[4]),
        "alpha": stats[5] / FIXED_POINT,
        "seconds": stats[6] / 1e6,
        "ranks": ranks,
        "source": SOURCES[stats[9]],
    }
    if level is not None:
        entry["level"] = math.inf if level >= 1e6 else level
        entry["validation_loss"] = _unfixed(stats[10])
    return RestartReport.from_entry(entry, names, mode, max_rank)


def _fixed(value: Optional[float]) -> int:
    """A float (None: -1) as the integer the history buffers store (p, L, levels and losses are >= 0)."""
    return -1 if value is None or value != value else round(value * FIXED_POINT)


def _unfixed(value: int) -> Optional[float]:
    return None if value < 0 else value / FIXED_POINT
