"""One RESTART of a network's modules, from what the network passes in: the threshold (paper mode's p, or
the product mode's rank search), the RESTART itself, and rank 0's weights broadcast to every process. The
network keeps the clock, the history and the log line; ``log_to_trackers`` writes the report to
accelerate's trackers."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .. import functional as F
from ..lora.batching import held_slots, hold_from
from ..lora.module import ACLoRAModule
from ..lora.paper_restart import restart_modules
from ..lora.report import RestartReport
from ..options import ACLoRAConfig, OptionError
from ..ranksearch.rank_search import RankSearch
from . import schedule

logger = logging.getLogger(__name__)

WarnOnce = Callable[..., None]  # (key, message, *args): a warning logged once per key

NO_LOSS = (
    "no training loss was seen since the last RESTART (is the loop calling accelerator.backward or "
    "network.record_loss?); set fixed_p to restart without a loss"
)


@dataclass(frozen=True)
class RestartInputs:
    """What a RESTART needs from the network: its modules in order, options, where training is, the ranks."""

    modules: Sequence[ACLoRAModule]
    config: ACLoRAConfig
    index: int  # this RESTART's number (1 for the first)
    epoch: int  # epochs completed
    step: int  # optimizer steps done
    progress: float  # fraction of training done for alpha (Eq. 6's Epoch / TotalEpoch; restart(progress=) sets it)
    done: float  # the network's own fraction of training done (the held-out loss's ``until``)
    ranks: dict[str, int]  # every module's signal rank now, in module order
    parameters: Sequence[torch.Tensor]  # what rank 0 broadcasts after the RESTART (the network's parameters)

    @property
    def mode(self) -> str:
        return "paper" if self.config.restart_mode == "off" else self.config.restart_mode

    @property
    def seed(self) -> int:
        return self.config.seed * 100_003 + self.index


@dataclass(frozen=True)
class Threshold:
    """The decision's input: paper mode's p (None: nothing to decide from), or product mode's explicit energy
    share (None: the rank search chooses)."""

    p: Optional[float]
    alpha: float
    clamped: bool
    source: str


def run(
    inputs: RestartInputs, p: Optional[float], mean_loss: Optional[float], rank_search: RankSearch, warn_once: WarnOnce
) -> RestartReport:
    """Run one RESTART on ``inputs.modules`` and return its report (``report.ranks``: the new signal ranks).

    Paper mode (and an explicit call with ``restart_mode=off``): p is the energy share; given, or
    ``fixed_p``, or p = 1 - L^alpha (Eq. 5-6) from the mean loss, with alpha = 1 + progress. Product mode:
    ``p`` or ``fixed_p`` keep that energy share of each module's update; otherwise one importance threshold
    over every module, chosen on the held-out loss or the default level (``RankSearch.decide``), or, with
    no held-out evidence, no change to training (``RankSearch.defers``).
    """
    config = inputs.config
    chosen = (
        paper_threshold(config, p, mean_loss, inputs.progress)
        if inputs.mode == "paper"
        else product_threshold(config, p, inputs.progress)
    )
    report = RestartReport(
        index=inputs.index,
        epoch=inputs.epoch,
        step=inputs.step,
        p=math.nan if chosen.p is None else chosen.p,
        loss=mean_loss,
        alpha=chosen.alpha,
        mode=inputs.mode,
        ranks=dict(inputs.ranks),
        max_rank=max(m.rank for m in inputs.modules),  # what a module may hold, not what the last cut left
        p_clamped=chosen.clamped,
        p_source=chosen.source,
    )
    if inputs.mode == "paper" and chosen.p is None:
        report.applied, report.reason = False, NO_LOSS
        warn_once("no-loss", "AC-LoRA: %s", report.reason)
    elif inputs.mode == "product" and rank_search.defers(chosen.p, inputs.done):
        # no held-out evidence (yet): nothing tells overfitting from learning, so training is left alone (a
        # plain LoRA at the maximum rank, its factors untouched); the file's ranks are decided at save time
        report.level, report.p_source = math.inf, "deferred"
        rank_search.reset_stats()
    else:
        new_ranks = (
            _restart_paper(inputs, chosen, report)
            if inputs.mode == "paper"
            else _restart_product(inputs, chosen, report, rank_search)
        )
        report.ranks = broadcast_from_rank0(inputs.modules, new_ranks, inputs.parameters)
    return report


def paper_threshold(config: ACLoRAConfig, p: Optional[float], mean_loss: Optional[float], progress: float) -> Threshold:
    """Paper mode's p for this RESTART: given, else ``fixed_p``, else 1 - L^alpha (None without a loss)."""
    alpha = 1.0 + min(max(progress, 0.0), 1.0)
    if p is not None:
        return Threshold(_share(p), alpha, False, "given")
    if config.fixed_p is not None:
        return Threshold(config.fixed_p, alpha, False, "fixed_p")
    if mean_loss is None:
        return Threshold(None, alpha, False, "loss")
    p_used, alpha = F.threshold_p(mean_loss, progress)
    raw = 1.0 - max(mean_loss, 0.0) ** alpha
    clamped = raw < 0.0 or raw > 1.0
    if clamped:
        logger.warning(
            "AC-LoRA: mean loss %.4g gives p = 1 - L^%.2f = %.4g outside [0, 1]; clamped to %.4g",
            mean_loss,
            alpha,
            raw,
            p_used,
        )
    return Threshold(p_used, alpha, clamped, "loss")


def product_threshold(config: ACLoRAConfig, p: Optional[float], progress: float) -> Threshold:
    """Product mode's explicit energy share (given, or ``fixed_p``), or None: the rank search chooses."""
    alpha = 1.0 + min(max(progress, 0.0), 1.0)
    if p is not None:
        return Threshold(_share(p), alpha, False, "given")
    if config.fixed_p is not None:
        return Threshold(_share(config.fixed_p), alpha, False, "fixed_p")
    return Threshold(None, alpha, False, "prior")


def _share(p: Any) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise OptionError(f"restart: p={p!r} is not valid; allowed: a number in [0, 1]")
    return float(p)


def _restart_paper(inputs: RestartInputs, chosen: Threshold, report: RestartReport) -> list[int]:
    assert chosen.p is not None
    new_ranks, report.skipped = restart_modules(
        inputs.modules, p=chosen.p, energy=inputs.config.energy, min_rank=inputs.config.min_rank, seed=inputs.seed
    )
    return list(new_ranks)


def _restart_product(
    inputs: RestartInputs, chosen: Threshold, report: RestartReport, rank_search: RankSearch
) -> list[int]:
    new_ranks, report.skipped, decision = rank_search.restart(inputs.modules, chosen.p, inputs.seed, inputs.done)
    report.level = decision["level"]
    report.p_source = decision.get("source", chosen.source)
    report.validation_loss = decision.get("validation_loss")
    report.candidates = decision.get("candidates", 0)
    ranks = list(inputs.ranks.values())
    for i, k in new_ranks.items():
        ranks[i] = k
    return ranks


def broadcast_from_rank0(
    modules: Sequence[ACLoRAModule], ranks: Sequence[int], parameters: Sequence[torch.Tensor]
) -> dict[str, int]:
    """Make every process hold rank 0's weights, held slots and ranks after a RESTART (bit-identical, whatever
    the hardware); returns rank 0's ranks by module name (``ranks`` themselves outside distributed training)."""
    if not schedule.distributed():
        return {m.lora_name: int(k) for m, k in zip(modules, ranks)}
    nccl = torch.distributed.get_backend() == "nccl"
    decided = torch.tensor(list(ranks), dtype=torch.int64)
    decided = decided.cuda() if nccl else decided
    torch.distributed.broadcast(decided, src=0)  # each process decided them from its own copy
    _broadcast_tensors([p.data for p in parameters], nccl)
    # the held slots follow rank 0's decision too: each process judged its own held-out share
    held = held_slots(modules)
    held = held.cuda() if nccl else held
    torch.distributed.broadcast(held, src=0)
    hold_from(modules, held)
    return {m.lora_name: int(k) for m, k in zip(modules, decided.tolist())}


def _broadcast_tensors(params: list[torch.Tensor], nccl: bool, budget: int = 64 * 1024 * 1024 // 4) -> None:
    """Broadcast rank 0's values of ``params`` in flat float32 chunks of at most ``budget`` elements."""
    start = 0
    while start < len(params):
        end, size = start, 0
        while end < len(params) and (size == 0 or size + params[end].numel() <= budget):
            size += params[end].numel()
            end += 1
        group = params[start:end]
        flat = torch.cat([t.reshape(-1).float() for t in group])
        device = flat.device
        if nccl and device.type != "cuda":
            flat = flat.cuda()
        torch.distributed.broadcast(flat, src=0)
        flat = flat.to(device)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        start = end


def log_to_trackers(accelerator: Any, report: RestartReport, warn_once: WarnOnce) -> None:
    """The report's numbers to accelerate's trackers (``accelerator``: the one that ran backward, or None)."""
    if accelerator is None or not getattr(accelerator, "trackers", None) or not report.applied:
        return
    lo, mid, hi = report.rank_stats()
    values: dict[str, float] = {
        "aclora/rank_min": lo,
        "aclora/rank_median": mid,
        "aclora/rank_max": hi,
        "aclora/rank_mean": sum(report.ranks.values()) / len(report.ranks),
        "aclora/restart_seconds": report.seconds,
    }
    optional = {
        "aclora/p": report.p,
        "aclora/loss": report.loss,
        "aclora/level": report.level,
        "aclora/validation_loss": report.validation_loss,
    }
    values.update({k: v for k, v in optional.items() if v is not None and math.isfinite(v)})
    try:
        accelerator.log(values, step=report.step)
    except Exception as err:  # a tracker failing must not stop training
        warn_once("tracker", "AC-LoRA: could not log the RESTART to the trackers: %s", err)
