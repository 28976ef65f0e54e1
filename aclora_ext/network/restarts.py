"""Running a RESTART on a network: the threshold (paper mode's p, or the product mode's rank search),
the batched RESTART itself, rank 0's weights broadcast to every process, the history entry, the log
line and the trackers."""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import torch

from .. import functional as F
from ..lora.batching import held_slots, hold_from
from ..lora.report import RestartReport
from ..lora.paper_restart import restart_modules
from ..options import OptionError
from . import schedule

logger = logging.getLogger(__name__)


def run_restart(network, p: Optional[float] = None, loss: Optional[float] = None,
                progress: Optional[float] = None) -> RestartReport:
    """Run one RESTART now on every module and return its report.

    Paper mode (and an explicit call with ``restart_mode=off``): p is the
    energy share; given, or ``fixed_p``, or p = 1 - L^alpha (Eq. 5-6) from
    ``loss`` or the mean training loss since the previous RESTART, with
    alpha = 1 + progress. Product mode: ``p`` or ``fixed_p`` keep that energy
    share of each module's update; otherwise one importance threshold over
    every module, chosen on the held-out loss (``set_validation``) or the
    default level (see ``RankSearch.decide``).
    """
    start = time.perf_counter()
    clock = network.clock
    mean_loss, count, bad = network.loss_meter.read() if loss is None else (float(loss), 1, 0)
    if bad:
        logger.warning("AC-LoRA: %d non-finite loss value(s) since the last RESTART were left out of L", bad)
    prog = network._progress() if progress is None else progress
    mode = "paper" if network.config.restart_mode == "off" else network.config.restart_mode
    index = clock.restarts + 1
    seed = network.config.seed * 100_003 + index
    if mode == "paper":
        p_used, alpha, clamped = threshold(network, p, mean_loss, prog)
        p_source = "given" if p is not None else "fixed_p" if network.config.fixed_p is not None else "loss"
    else:
        explicit = p if p is not None else network.config.fixed_p
        if explicit is not None and not 0.0 <= float(explicit) <= 1.0:
            raise OptionError(f"restart: p={explicit!r} is not valid; allowed: a number in [0, 1]")
        p_used, alpha, clamped = (float("nan") if explicit is None else float(explicit)), 1.0 + min(max(prog, 0.0), 1.0), False
        p_source = "given" if p is not None else "fixed_p" if network.config.fixed_p is not None else "prior"
    report = RestartReport(index=index, epoch=clock.epochs_completed, step=clock.optimizer_steps,
                           p=p_used if p_used is not None else float("nan"), loss=mean_loss, alpha=alpha,
                           mode=mode, ranks=network.ranks(), max_rank=network.max_rank,
                           p_clamped=clamped, p_source=p_source)
    if p_used is None:
        report.applied = False
        report.reason = ("no training loss was seen since the last RESTART (is the loop calling accelerator.backward or network.record_loss?); set fixed_p to restart without a loss")
        network._warn_once("no-loss", "AC-LoRA: %s", report.reason)
    elif (mode == "product" and explicit is None and not network.config.cut_without_heldout
          and not network.rank_search.validation_active() and network.rank_search.frozen_level is None):
        # no held-out evidence (yet): nothing tells overfitting from learning, so training is left alone (a
        # plain LoRA at the maximum rank, its factors untouched); the file's ranks are decided at save time
        report.level, report.p_source = math.inf, "deferred"
        network.rank_search.reset_stats()
    elif mode == "paper":
        new_ranks, report.skipped = restart_modules(network.loras, p=p_used, energy=network.config.energy,
                                                    min_rank=network.config.min_rank, seed=seed)
        network._signal.update({m.lora_name: k for m, k in zip(network.loras, new_ranks)})
    else:
        new_ranks, report.skipped, decision = network.rank_search.restart(
            network.loras, None if explicit is None else float(explicit), seed)
        network._signal.update({network.loras[i].lora_name: k for i, k in new_ranks.items()})
        report.level = decision["level"]
        report.p_source = decision.get("source", p_source)
        report.validation_loss = decision.get("validation_loss")
        report.candidates = decision.get("candidates", 0)
    if report.applied and report.p_source != "deferred":
        broadcast_from_rank0(network)
        report.ranks = network.ranks()
    clock.restarts = index
    clock.last_restart_step = clock.optimizer_steps
    clock.last_restart_epoch = clock.epochs_completed
    network.loss_meter.reset()
    report.seconds = time.perf_counter() - start
    if report.applied:
        network.history.append({"index": index, "epoch": report.epoch, "step": report.step, "p": report.p,
                                "loss": report.loss, "alpha": report.alpha, "seconds": report.seconds,
                                "ranks": [network._signal[m.lora_name] for m in network.loras],
                                "source": report.p_source,
                                **({"level": report.level, "validation_loss": report.validation_loss}
                                   if report.level is not None else {})})
    logger.info(report.line())
    log_to_trackers(network, report)
    return report


def threshold(network, p: Optional[float], mean_loss: Optional[float], progress: float):
    """(p, alpha, clamped) for this RESTART; p None when there is nothing to decide from."""
    alpha = 1.0 + min(max(progress, 0.0), 1.0)
    if p is not None:
        if not 0.0 <= float(p) <= 1.0:
            raise OptionError(f"restart: p={p!r} is not valid; allowed: a number in [0, 1]")
        return float(p), alpha, False
    if network.config.fixed_p is not None:
        return network.config.fixed_p, alpha, False
    if mean_loss is None:
        return None, alpha, False
    p_used, alpha = F.threshold_p(mean_loss, progress)
    raw = 1.0 - max(mean_loss, 0.0) ** alpha
    clamped = raw < 0.0 or raw > 1.0
    if clamped:
        logger.warning("AC-LoRA: mean loss %.4g gives p = 1 - L^%.2f = %.4g outside [0, 1]; clamped to %.4g",
                       mean_loss, alpha, raw, p_used)
    return p_used, alpha, clamped


def broadcast_from_rank0(network) -> None:
    """Make every process hold rank 0's weights and ranks after a RESTART (bit-identical, whatever the hardware)."""
    if not schedule.distributed():
        return
    ranks = torch.tensor([network._signal[m.lora_name] for m in network.loras], dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        ranks = ranks.cuda()
    torch.distributed.broadcast(ranks, src=0)  # each process decided them from its own copy
    for m, k in zip(network.loras, ranks.tolist()):
        network._signal[m.lora_name] = int(k)
    params = [p.data for p in network.parameters()]
    budget = 64 * 1024 * 1024 // 4
    start = 0
    while start < len(params):
        end, size = start, 0
        while end < len(params) and (size == 0 or size + params[end].numel() <= budget):
            size += params[end].numel()
            end += 1
        group = params[start:end]
        flat = torch.cat([t.reshape(-1).float() for t in group])
        device = flat.device
        if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
            flat = flat.cuda()
        torch.distributed.broadcast(flat, src=0)
        flat = flat.to(device)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        start = end
    # the held slots (freed_slots=hold) follow rank 0's decision too: each process judged its own held-out share
    held = held_slots(network.loras)
    if torch.distributed.get_backend() == "nccl":
        held = held.cuda()
    torch.distributed.broadcast(held, src=0)
    hold_from(network.loras, held)


def log_to_trackers(network, report: RestartReport) -> None:
    accelerator = network._accelerator() if network._accelerator is not None else None
    if accelerator is None or not getattr(accelerator, "trackers", None) or not report.applied:
        return
    lo, mid, hi = report.rank_stats()
    values = {"aclora/rank_min": lo, "aclora/rank_median": mid, "aclora/rank_max": hi,
              "aclora/rank_mean": sum(report.ranks.values()) / len(report.ranks), "aclora/restart_seconds": report.seconds}
    optional = {"aclora/p": report.p, "aclora/loss": report.loss, "aclora/level": report.level,
                "aclora/validation_loss": report.validation_loss}
    values.update({k: v for k, v in optional.items() if v is not None and math.isfinite(v)})
    try:
        accelerator.log(values, step=report.step)
    except Exception as err:  # a tracker failing must not stop training
        network._warn_once("tracker", "AC-LoRA: could not log the RESTART to the trackers: %s", err)
