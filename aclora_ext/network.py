"""The AC-LoRA network: kohya's network-module contract plus RESTART.

sd-scripts calls, in order: ``create_network`` → ``prepare_network(args)`` →
``apply_to`` → ``load_weights`` (optional) → ``prepare_optimizer_params`` →
``prepare_grad_etc`` → per epoch ``on_epoch_start`` → per micro-batch
``on_step_start`` → ``save_weights``. RESTARTs run from the two hooks, between
epochs (every ``restart_every`` epochs) or between optimizer steps
(``restart_every_steps``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import functional as F
from . import schedule
from .export import export_modules, raw_modules
from .files import LoRAFileError, load_state_dict, metadata_ranks, read_metadata, save_state_dict
from .module import ACLoRAModule
from .options import ACLoRAConfig, OptionError
from .ranksearch import RankSearch
from .restart import RestartReport, restart_modules, shape_groups
from .targets import Target
from .weights import check_model_family, check_shapes, group_modules

logger = logging.getLogger(__name__)

__version__ = "0.1.0"
HISTORY_CAPACITY = 128  # restarts kept in the resumable state (the oldest are dropped beyond it)
FIXED_POINT = 1_000_000_000  # p and L are stored in integer buffers (float buffers would follow .to(dtype))
#: how a product-mode threshold was decided, as stored in the resumable history
SOURCES = ("loss", "fixed_p", "given", "validation", "prior", "frozen")


@dataclass
class LoadInfo:
    """What ``load_weights`` did (sd-scripts prints it)."""

    loaded: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        text = f"<AC-LoRA: {len(self.loaded)} modules loaded ({len(self.padded)} padded to the maximum rank)"
        if self.unexpected:
            text += f", {len(self.unexpected)} unknown modules ignored"
        if self.missing:
            text += f", {len(self.missing)} modules not in the file"
        return text + ">"


class ACLoRANetwork(nn.Module):
    """LoRA modules on a set of layers, with per-module signal ranks decided by RESTART."""

    def __init__(self, targets: Sequence[Target], ranks: dict[str, int], alphas: dict[str, float],
                 multiplier: float = 1.0, config: ACLoRAConfig = ACLoRAConfig(), is_sdxl: bool = False,
                 signal_ranks: Optional[dict[str, int]] = None) -> None:
        super().__init__()
        if not targets:
            raise ValueError("AC-LoRA: the model has no layers to adapt (no Linear/Conv2d inside the target blocks)")
        self.config = config
        self.multiplier = multiplier
        self.is_sdxl = is_sdxl
        self.text_encoder_loras: list[ACLoRAModule] = []
        self.unet_loras: list[ACLoRAModule] = []
        for t in targets:
            m = ACLoRAModule(t.lora_name, t.layer, ranks[t.lora_name], alphas[t.lora_name], multiplier,
                             config.dropout, config.rank_dropout, config.module_dropout)
            (self.text_encoder_loras if t.is_text_encoder else self.unet_loras).append(m)
            self.add_module(t.lora_name, m)
        self._parts = {t.lora_name: t.part for t in targets}
        self.clock = schedule.Clock()
        self.length = schedule.TrainingLength()
        self.loss_meter = schedule.LossMeter()
        self._args: Any = None
        self._accelerator: Optional[weakref.ref] = None
        self._warned: set[str] = set()
        self._signal = {m.lora_name: m.rank for m in self.loras}
        if signal_ranks:
            self._signal.update({k: min(v, self._module(k).rank) for k, v in signal_ranks.items() if k in self._signal})
        self.history: list[dict] = []
        self.rank_search = RankSearch(self)
        self.rank_search.watch(self.loras)
        self._register_state()

    # --- bookkeeping --------------------------------------------------------------
    @property
    def loras(self) -> list[ACLoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.loras)

    def _module(self, name: str) -> ACLoRAModule:
        return self._modules[name]  # type: ignore[return-value]

    def _register_state(self) -> None:
        """Resumable state as integer buffers: saved by --save_state, never exported."""
        n = len(self.loras)
        self.register_buffer("aclora_clock", torch.zeros(schedule.Clock.size(), dtype=torch.int64))
        self.register_buffer("aclora_ranks", torch.zeros(n, dtype=torch.int64))
        # int32, not int16: NCCL (DDP broadcasts buffers at start-up) has no 16-bit integer type
        self.register_buffer("aclora_history_ranks", torch.zeros(HISTORY_CAPACITY, n, dtype=torch.int32))
        self.register_buffer("aclora_history_stats", torch.zeros(HISTORY_CAPACITY, 11, dtype=torch.int64))
        # the loss sums since the last RESTART (float64 bit patterns), so a resumed run's next L is the same
        self.register_buffer("aclora_loss", torch.zeros(3, dtype=torch.int64))
        # product mode: the running held-out score of every candidate level, then the level last chosen
        # (float64 bit patterns; NaN: none yet)
        self.register_buffer("aclora_levels", torch.zeros(len(F.LEVELS) + 1, dtype=torch.int64))
        # product mode: the activation statistics since the last RESTART (RankSearch.stats_state); empty
        # between saves, so no device memory is held for it
        self.register_buffer("aclora_input_stats", torch.zeros(0, dtype=torch.int64))

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 - torch hook
        self.aclora_clock.copy_(torch.tensor(self.clock.as_list()))
        self.aclora_ranks.copy_(torch.tensor([self._signal[m.lora_name] for m in self.loras]))
        self.aclora_history_ranks.zero_()
        self.aclora_history_stats.zero_()
        for row, entry in enumerate(self.history[-HISTORY_CAPACITY:]):
            self.aclora_history_ranks[row] = torch.tensor(entry["ranks"], dtype=torch.int32)
            level, val = entry.get("level"), entry.get("validation_loss")
            self.aclora_history_stats[row] = torch.tensor([
                entry["index"], entry["epoch"], entry["step"], _fixed(entry["p"]), _fixed(entry["loss"]),
                round(entry["alpha"] * FIXED_POINT), round(entry["seconds"] * 1e6), 1,
                _fixed(None if level is None else min(level, 1e6)), SOURCES.index(entry.get("source", "loss")),
                _fixed(val)])
        self.aclora_loss.copy_(self.loss_meter.state().to(self.aclora_loss.device).view(torch.int64))
        self.aclora_levels.copy_(self.rank_search.state().view(torch.int64))
        self.aclora_input_stats = self.rank_search.stats_state(self.loras).view(torch.int64)
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self.aclora_input_stats = torch.zeros(0, dtype=torch.int64, device=self.aclora_levels.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: D401 - torch hook
        input_stats = state_dict.get(prefix + "aclora_input_stats")
        if prefix + "aclora_clock" in state_dict:  # also a state saved before the activation statistics were kept
            state_dict[prefix + "aclora_input_stats"] = torch.zeros(0, dtype=torch.int64)
        old = state_dict.get(prefix + "aclora_history_stats")
        if isinstance(old, torch.Tensor) and old.dim() == 2 and old.shape[1] == 8:  # saved by version 0.1
            pad = torch.tensor([-1, 0, -1], dtype=old.dtype).expand(old.shape[0], 3)
            state_dict[prefix + "aclora_history_stats"] = torch.cat([old, pad], dim=1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "aclora_clock" not in state_dict:
            return
        self.clock.load_list(self.aclora_clock.tolist())
        if self.clock.optimizer_steps > self.clock.steps_at_epoch_start:
            self.clock.resumed_mid_epoch = 1  # the next on_epoch_start may re-enter this epoch (see there)
        if prefix + "aclora_loss" in state_dict and (not schedule.distributed() or torch.distributed.get_rank() == 0):
            # every process loads rank 0's sums: only one keeps them, or the all-reduce would count them twice
            self.loss_meter.load(self.aclora_loss.view(torch.float64))
        for m, k in zip(self.loras, self.aclora_ranks.tolist()):
            self._signal[m.lora_name] = int(k) if k > 0 else m.rank
        if prefix + "aclora_levels" in state_dict:
            self.rank_search.load_state(self.aclora_levels.cpu().view(torch.float64))
        if isinstance(input_stats, torch.Tensor):
            self.rank_search.load_stats_state(self.loras, input_stats.cpu().view(torch.float64))
        self.history = []
        stats_rows = self.aclora_history_stats.tolist()
        for ranks, stats in zip(self.aclora_history_ranks.tolist(), stats_rows):
            if stats[7] != 1:
                continue
            stats = stats + [-1, 0, -1][len(stats) - 8:]  # a state saved before the product-mode columns
            entry = {"index": stats[0], "epoch": stats[1], "step": stats[2], "p": _unfixed(stats[3]),
                     "loss": _unfixed(stats[4]), "alpha": stats[5] / FIXED_POINT, "seconds": stats[6] / 1e6,
                     "ranks": ranks, "source": SOURCES[stats[9]]}
            level = _unfixed(stats[8])
            if level is not None:
                entry["level"] = math.inf if level >= 1e6 else level
                entry["validation_loss"] = _unfixed(stats[10])
            self.history.append(entry)

    # --- kohya contract: set-up ---------------------------------------------------------
    def prepare_network(self, args: Any) -> None:
        """Keep sd-scripts' args (the run length is final only before the loop, so read later)."""
        self._args = args
        schedule.listen(self)

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        if not self.loras:
            raise ValueError("AC-LoRA: apply_to left no modules (neither the text encoder nor the U-Net is trained)")
        for m in self.loras:
            m.apply_to()
        self._register_state()
        schedule.listen(self)
        split = getattr(self._args, "validation_split", None)
        self.rank_search.record_sd_scripts_validation(unet, expected=isinstance(split, (int, float)) and split > 0)
        logger.info("AC-LoRA: %d text-encoder and %d U-Net modules, maximum rank %d, restart_mode=%s",
                    len(self.text_encoder_loras), len(self.unet_loras), self.max_rank, self.config.restart_mode)

    def _drop(self, modules: Sequence[ACLoRAModule]) -> None:
        for m in modules:
            m.remove()
            delattr(self, m.lora_name)
            self._signal.pop(m.lora_name, None)
        self.rank_search.forget(modules)

    def remove_from(self) -> None:
        """Give every adapted layer its own forward back (undo ``apply_to``)."""
        for m in self.loras:
            m.remove()
        self.rank_search.forget(self.loras, validation=True)
        schedule.forget(self)

    def train(self, mode: bool = True) -> "ACLoRANetwork":
        """nn.Module.train; back to training after sd-scripts' validation pass also ends its recording."""
        super().train(mode)
        if mode and hasattr(self, "rank_search"):
            self.rank_search.training_resumed()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA modules run inside the checkpointed blocks."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def get_trainable_params(self):
        return self.parameters()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for m in self.loras:
            m.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for m in self.loras:
            m.enabled = is_enabled

    def is_mergeable(self) -> bool:
        return True

    # --- optimizer groups ----------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """Param groups per part (each text encoder, U-Net), LoRA+ groups for lora_up.

        ``text_encoder_lr`` may be a number, None, or a list (one per text
        encoder; a single value applies to both). Returns ``(groups, descriptions)``.
        """
        self.requires_grad_(True)
        te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        groups: list[dict] = []
        descriptions: list[str] = []
        te_parts = sorted({self._parts[m.lora_name] for m in self.text_encoder_loras})
        for i, part in enumerate(te_parts):
            lr = te_lrs[min(i, len(te_lrs) - 1)] if te_lrs else None
            lr = default_lr if lr is None else lr
            ratio = self.config.loraplus_text_encoder_lr_ratio or self.config.loraplus_lr_ratio
            label = "textencoder" if len(te_parts) == 1 else f"textencoder {i + 1}"
            self._add_groups(groups, descriptions, [m for m in self.text_encoder_loras if self._parts[m.lora_name] == part],
                             lr, ratio, label)
        if self.unet_loras:
            lr = default_lr if unet_lr is None else unet_lr
            ratio = self.config.loraplus_unet_lr_ratio or self.config.loraplus_lr_ratio
            self._add_groups(groups, descriptions, self.unet_loras, lr, ratio, "unet")
        return groups, descriptions

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    @staticmethod
    def _add_groups(groups: list, descriptions: list, modules: list[ACLoRAModule], lr, ratio, label: str) -> None:
        plain = [p for m in modules for name, p in m.named_parameters() if not (ratio and "lora_up" in name)]
        plus = [p for m in modules for p in m.lora_up.parameters()] if ratio else []
        for params, factor, suffix in ((plain, 1.0, ""), (plus, ratio, " plus")):
            if not params:
                continue
            group: dict = {"params": params}
            if lr is not None:
                if float(lr) == 0:
                    logger.info("AC-LoRA: lr 0 for %s%s, its parameters are not trained", label, suffix)
                    continue
                group["lr"] = float(lr) * factor
            groups.append(group)
            descriptions.append(label + suffix)

    # --- the product mode's held-out loss ----------------------------------------------------
    def set_validation(self, loss_fn: Optional[Callable[[], Any]], until: Optional[float] = None) -> None:
        """Give the product mode a held-out loss to choose ranks with (``None`` removes it).

        ``loss_fn()`` returns the loss of the current model on data the training
        does not see (lower is better), e.g. the same loss as training on a
        held-out share of the training images with fixed noise: best as a 1-D
        tensor of per-item losses (per image and timestep, say), whose mean is the
        loss; a float or a 0-dim tensor works too. Per-item losses let the search
        cut a component only where the held-out loss improves by more than its
        noise (one standard error of the paired difference from keeping
        everything); with a single number it takes the lowest loss as it is.
        It is called under ``torch.no_grad()`` with this network in eval mode,
        about fifteen times per RESTART and per save (once per candidate
        threshold). ``until``: a fraction of training after which the held-out
        loss is no longer used and the last threshold it chose is kept, so that a
        loop may then train on the held-out share too (see ``validation_active``).
        """
        self.rank_search.set_validation(loss_fn, until)

    @property
    def validation_active(self) -> bool:
        """True while the held-out loss decides the ranks: until then the loop must keep its held-out
        share out of training; afterwards it may train on it."""
        return self.rank_search.validation_active()

    # --- training hooks --------------------------------------------------------------------
    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        """Called by sd-scripts before each epoch: count it and RESTART when one is due."""
        self.train()
        clock = self.clock
        if clock.resumed_mid_epoch:
            clock.resumed_mid_epoch = 0
            if not self._saved_epoch_was_complete():
                return  # sd-scripts re-enters the epoch the state was saved in, and calls this hook again
        if clock.epochs_started >= 1 and clock.steps_per_epoch == 0:
            clock.steps_per_epoch = clock.optimizer_steps - clock.steps_at_epoch_start
        clock.epochs_started += 1
        clock.steps_at_epoch_start = clock.optimizer_steps
        if self._epoch_restart_due() or self._step_restart_due():
            self.restart()

    def _saved_epoch_was_complete(self) -> bool:
        """After a resume: was the state saved at the end of an epoch (sd-scripts then starts the next one)?

        Needs the epoch length: observed after the first epoch, or from sd-scripts' args
        (max_train_steps / max_train_epochs). A state saved during the first epoch of a run
        counted in steps only is taken as saved mid-epoch.
        """
        per_epoch = self.clock.steps_per_epoch or self._length().steps_per_epoch()
        return per_epoch > 0 and self.clock.optimizer_steps - self.clock.steps_at_epoch_start >= per_epoch

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        """Called by sd-scripts before each micro-batch: RESTART at an optimizer-step boundary when due."""
        if self._step_restart_due():
            self.restart()

    def _on_backward(self, loss: Any, accelerator: Any) -> None:
        """Seen in ``accelerator.backward(loss)``: accumulate the loss, count optimizer steps."""
        if not self.training:
            return
        if isinstance(loss, torch.Tensor) or isinstance(loss, (int, float)):
            self.loss_meter.add(loss)
        self._accelerator = weakref.ref(accelerator)
        if getattr(accelerator, "sync_gradients", True):
            self.clock.optimizer_steps += 1

    def record_loss(self, loss: torch.Tensor | float, optimizer_step: bool = True) -> None:
        """For training loops that do not call ``accelerate.Accelerator.backward``: feed the loss here."""
        self.loss_meter.add(loss)
        if optimizer_step:
            self.clock.optimizer_steps += 1

    def set_training_length(self, total_steps: Optional[int] = None, total_epochs: Optional[int] = None) -> None:
        """Tell a non-sd-scripts loop's length (sd-scripts' args provide it otherwise)."""
        self.length = schedule.TrainingLength(total_steps, total_epochs, 1)
        self._args = None

    def _length(self) -> schedule.TrainingLength:
        if self._args is not None:
            self.length = schedule.TrainingLength.from_args(self._args)
        return self.length

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def restart_interval_epochs(self) -> Optional[int]:
        """E: ``restart_every``, or a tenth of the run (at least 1) once the run length is known."""
        if self.config.restart_every is not None:
            return self.config.restart_every
        total = self._length().total_epochs(self.clock.steps_per_epoch)
        return max(1, round(total / 10)) if total else None

    def _epoch_restart_due(self) -> bool:
        if self.config.restart_mode == "off" or self.config.restart_every_steps is not None:
            return False
        done = self.clock.epochs_completed
        if done == 0:
            return False
        every = self.restart_interval_epochs()
        total = self._length().total_epochs(self.clock.steps_per_epoch)
        if every is None:
            self._warn_once("length", "AC-LoRA: the run length is unknown (no max_train_steps/max_train_epochs); "
                            "no RESTART runs. Set restart_every, or call set_training_length().")
            return False
        if total is not None and every >= total:
            self._warn_once("too-long", "AC-LoRA: restart_every=%d epochs is not shorter than the run (%d epochs); "
                            "no RESTART will run. Lower restart_every or use restart_every_steps.", every, total)
        return done % every == 0 and (total is None or done < total)

    def _step_restart_due(self) -> bool:
        every = self.config.restart_every_steps
        if self.config.restart_mode == "off" or every is None:
            return False
        total = self._length().max_train_steps
        if total is not None and every >= total:  # checked before the step count: the interval is never reached
            self._warn_once("too-long", "AC-LoRA: restart_every_steps=%d is not shorter than the run (%d steps); "
                            "no RESTART will run.", every, total)
            return False
        steps = self.clock.optimizer_steps
        if steps == 0 or steps % every or steps == self.clock.last_restart_step:
            return False
        return total is None or steps < total

    def _progress(self) -> float:
        """Fraction of training done (Eq. 6's Epoch / TotalEpoch, in optimizer steps when known)."""
        length = self._length()
        if length.max_train_steps:
            return self.clock.optimizer_steps / length.max_train_steps
        total = length.total_epochs(self.clock.steps_per_epoch)
        return self.clock.epochs_completed / total if total else 0.0

    # --- RESTART --------------------------------------------------------------------------
    def restart(self, p: Optional[float] = None, loss: Optional[float] = None,
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
        clock = self.clock
        mean_loss, count, bad = self.loss_meter.read() if loss is None else (float(loss), 1, 0)
        if bad:
            logger.warning("AC-LoRA: %d non-finite loss value(s) since the last RESTART were left out of L", bad)
        prog = self._progress() if progress is None else progress
        mode = "paper" if self.config.restart_mode == "off" else self.config.restart_mode
        index = clock.restarts + 1
        seed = self.config.seed * 100_003 + index
        if mode == "paper":
            p_used, alpha, clamped = self._threshold(p, mean_loss, prog)
            p_source = "given" if p is not None else "fixed_p" if self.config.fixed_p is not None else "loss"
        else:
            explicit = p if p is not None else self.config.fixed_p
            if explicit is not None and not 0.0 <= float(explicit) <= 1.0:
                raise OptionError(f"restart: p={explicit!r} is not valid; allowed: a number in [0, 1]")
            p_used, alpha, clamped = (float("nan") if explicit is None else float(explicit)), 1.0 + min(max(prog, 0.0), 1.0), False
            p_source = "given" if p is not None else "fixed_p" if self.config.fixed_p is not None else "prior"
        report = RestartReport(index=index, epoch=clock.epochs_completed, step=clock.optimizer_steps,
                               p=p_used if p_used is not None else float("nan"), loss=mean_loss, alpha=alpha,
                               mode=mode, ranks=self.ranks(), max_rank=self.max_rank,
                               p_clamped=clamped, p_source=p_source)
        if p_used is None:
            report.applied = False
            report.reason = ("no training loss was seen since the last RESTART (is the loop calling accelerator.backward or network.record_loss?); set fixed_p to restart without a loss")
            self._warn_once("no-loss", "AC-LoRA: %s", report.reason)
        elif mode == "paper":
            new_ranks, report.skipped = restart_modules(self.loras, p=p_used, energy=self.config.energy,
                                                        min_rank=self.config.min_rank, seed=seed)
            self._signal.update({m.lora_name: k for m, k in zip(self.loras, new_ranks)})
        else:
            new_ranks, report.skipped, decision = self.rank_search.restart(
                self.loras, None if explicit is None else float(explicit), seed)
            self._signal.update({self.loras[i].lora_name: k for i, k in new_ranks.items()})
            report.level = decision["level"]
            report.p_source = decision.get("source", p_source)
            report.validation_loss = decision.get("validation_loss")
            report.candidates = decision.get("candidates", 0)
        if report.applied:
            self._broadcast_from_rank0()
            report.ranks = self.ranks()
        clock.restarts = index
        clock.last_restart_step = clock.optimizer_steps
        clock.last_restart_epoch = clock.epochs_completed
        self.loss_meter.reset()
        report.seconds = time.perf_counter() - start
        if report.applied:
            self.history.append({"index": index, "epoch": report.epoch, "step": report.step, "p": report.p,
                                 "loss": report.loss, "alpha": report.alpha, "seconds": report.seconds,
                                 "ranks": [self._signal[m.lora_name] for m in self.loras], "source": report.p_source,
                                 **({"level": report.level, "validation_loss": report.validation_loss}
                                    if report.level is not None else {})})
        logger.info(report.line())
        self._log_to_trackers(report)
        return report

    def _threshold(self, p: Optional[float], mean_loss: Optional[float], progress: float):
        """(p, alpha, clamped) for this RESTART; p None when there is nothing to decide from."""
        alpha = 1.0 + min(max(progress, 0.0), 1.0)
        if p is not None:
            if not 0.0 <= float(p) <= 1.0:
                raise OptionError(f"restart: p={p!r} is not valid; allowed: a number in [0, 1]")
            return float(p), alpha, False
        if self.config.fixed_p is not None:
            return self.config.fixed_p, alpha, False
        if mean_loss is None:
            return None, alpha, False
        p_used, alpha = F.threshold_p(mean_loss, progress)
        raw = 1.0 - max(mean_loss, 0.0) ** alpha
        clamped = raw < 0.0 or raw > 1.0
        if clamped:
            logger.warning("AC-LoRA: mean loss %.4g gives p = 1 - L^%.2f = %.4g outside [0, 1]; clamped to %.4g",
                           mean_loss, alpha, raw, p_used)
        return p_used, alpha, clamped

    def _broadcast_from_rank0(self) -> None:
        """Make every process hold rank 0's weights and ranks after a RESTART (bit-identical, whatever the hardware)."""
        if not schedule.distributed():
            return
        ranks = torch.tensor([self._signal[m.lora_name] for m in self.loras], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            ranks = ranks.cuda()
        torch.distributed.broadcast(ranks, src=0)  # each process decided them from its own copy
        for m, k in zip(self.loras, ranks.tolist()):
            self._signal[m.lora_name] = int(k)
        params = [p.data for p in self.parameters()]
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

    def _log_to_trackers(self, report: RestartReport) -> None:
        accelerator = self._accelerator() if self._accelerator is not None else None
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
            self._warn_once("tracker", "AC-LoRA: could not log the RESTART to the trackers: %s", err)

    def ranks(self) -> dict[str, int]:
        """Current signal rank of every module (its maximum rank before the first RESTART)."""
        return {m.lora_name: self._signal[m.lora_name] for m in self.loras}

    # --- files -----------------------------------------------------------------------------
    def metadata(self, ranks: dict[str, int], errors: Optional[dict[str, float]] = None) -> dict[str, str]:
        """Our own metadata keys: enough for a file to explain how its ranks came about."""
        last = self.history[-1] if self.history else None
        conv3x3 = [m.rank for m in self.loras if m.lora_down.weight.shape[2:] not in ((), (1, 1))]
        others = [m.rank for m in self.loras if m.lora_down.weight.shape[2:] in ((), (1, 1))]
        meta = {
            "aclora_version": __version__,
            "aclora_mode": self.config.restart_mode,
            "aclora_energy": self.config.energy,
            "aclora_max_rank": str(max(others) if others else self.max_rank),
            "aclora_restarts": str(len(self.history)),
            "aclora_ranks": json.dumps(ranks, separators=(",", ":")),
            "aclora_history": json.dumps([{k: _json_number(v) for k, v in h.items()} for h in self.history],
                                         separators=(",", ":")),
            "aclora_modules": json.dumps([m.lora_name for m in self.loras], separators=(",", ":")),
        }
        if self.rank_search.file_decision is not None:  # product mode: how the file's own ranks were decided
            meta["aclora_file_decision"] = json.dumps(
                {k: _json_number(v) for k, v in self.rank_search.file_decision.items()}, separators=(",", ":"))
        if conv3x3:
            meta["aclora_conv_max_rank"] = str(max(conv3x3))  # conv_dim: the 3x3 modules' own maximum rank
        if last is not None:
            meta["aclora_last_p"] = "" if last["p"] is None or last["p"] != last["p"] else f"{last['p']:.6f}"
            meta["aclora_last_loss"] = "" if last["loss"] is None else f"{last['loss']:.6f}"
        if errors:
            values = list(errors.values())
            meta["aclora_truncation_error_mean"] = f"{sum(values) / len(values):.6g}"
            meta["aclora_truncation_error_max"] = f"{max(values):.6g}"
        return meta

    def state_for_export(self, dtype: Optional[torch.dtype] = None):
        """(tensors, metadata, truncation errors) of the variable-rank export.

        Raises ValueError naming the modules whose weights are NaN/Inf, checked
        after the cast to ``dtype`` so that an fp16 overflow counts too.
        """
        signal: list = [self._signal[m.lora_name] for m in self.loras]
        self.rank_search.file_decision = None
        if self.config.restart_mode == "product":
            signal = self.rank_search.file_keeps(self.loras, signal)
        if all(isinstance(k, int) and k == m.rank for k, m in zip(signal, self.loras)):
            # nothing truncated yet (or restarts off): the training factors are the file, exactly
            ranks = {m.lora_name: m.rank for m in self.loras}
            tensors, errors, bad = raw_modules(self.loras, dtype), {}, []
        else:
            result = export_modules(self.loras, signal, dtype)
            tensors, ranks, errors, bad = result.tensors, result.ranks, result.errors, result.non_finite
        bad = bad or sorted({key.rsplit(".", 2)[0] for key, t in tensors.items() if not bool(torch.isfinite(t).all())})
        if bad:
            raise ValueError(f"non-finite weights in {len(bad)} module(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        return tensors, self.metadata(ranks, errors), errors

    def save_weights(self, file: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> bool:
        """Write the variable-rank LoRA file (atomically). Returns False, keeping any old file, on NaN/Inf weights."""
        try:
            tensors, ours, errors = self.state_for_export(dtype)
        except ValueError as err:
            logger.error("AC-LoRA: NOT saving %s: %s. The previous file (if any) is kept.", file, err)
            return False
        meta = dict(metadata or {})
        meta.update(ours)
        ranks = json.loads(ours["aclora_ranks"])
        # sd-scripts wrote the training dim/alpha; they no longer describe a file whose ranks vary or
        # were all cut below the maximum (e.g. every module at min_rank after a p = 0 RESTART)
        if len(set(ranks.values())) > 1 or any(ranks[m.lora_name] != m.rank for m in self.loras):
            meta["ss_network_dim"] = "Dynamic"
            meta["ss_network_alpha"] = "Dynamic"
        save_state_dict(file, tensors, meta)
        if errors:
            logger.info("AC-LoRA: saved %s (%d modules, ranks %d..%d, truncation error mean %.3g max %.3g)", file,
                        len(ranks), min(ranks.values()), max(ranks.values()),
                        sum(errors.values()) / len(errors), max(errors.values()))
        if self.config.save_full_rank:
            stem, ext = os.path.splitext(file)
            full_meta = dict(metadata or {})
            full_meta.update(self.metadata({m.lora_name: self._signal[m.lora_name] for m in self.loras}))
            full_meta["aclora_full_rank"] = "true"
            save_state_dict(f"{stem}-fullrank{ext}", raw_modules(self.loras, dtype), full_meta)
        return True

    def load_weights(self, file: str) -> LoadInfo:
        """Load a LoRA file into this network; smaller per-module ranks are padded to this network's rank.

        Modules in the file that this network does not have are ignored with a
        warning (sd-scripts' non-strict contract); shapes that cannot fit raise.
        """
        weights = load_state_dict(file)
        meta = read_metadata(file) if str(file).endswith(".safetensors") else {}
        return self.load_state(weights, meta, source=str(file))

    def load_state(self, weights: dict[str, torch.Tensor], meta: Optional[dict] = None, source: str = "weights") -> LoadInfo:
        modules = group_modules(weights, source)
        by_name = {m.lora_name: m for m in self.loras}
        check_model_family(modules, by_name, source)
        info = LoadInfo()
        info.unexpected = sorted(set(modules) - set(by_name))
        info.missing = sorted(set(by_name) - set(modules))
        if not set(modules) & set(by_name):
            raise LoRAFileError(f"{source}: none of its {len(modules)} LoRA modules exists in this model "
                                f"(e.g. {next(iter(modules), '?')}); is it for another model (SD1.x vs SDXL)?")
        check_shapes({n: modules[n] for n in modules if n in by_name}, by_name, source, allow_smaller_rank=True)
        saved_ranks = metadata_ranks(meta or {}, source)
        with torch.no_grad():
            for name, parts in modules.items():
                m = by_name.get(name)
                if m is None:
                    continue
                down, up = parts["lora_down.weight"], parts["lora_up.weight"]
                k = down.shape[0]
                alpha = float(parts["alpha"]) if "alpha" in parts else float(k)
                factor = (alpha / k) / m.scale  # keep alpha/k * up @ down under this module's scale
                m.lora_down.weight[:k].copy_(down.to(m.lora_down.weight.dtype))
                m.lora_up.weight.zero_()
                m.lora_up.weight[:, :k].copy_((up.float() * factor).to(m.lora_up.weight.dtype))
                self._signal[name] = min(int(saved_ranks.get(name, k)), k) if k == m.rank else k
                (info.padded if k < m.rank else info.loaded).append(name)
        info.loaded += info.padded
        if info.unexpected:
            logger.warning("AC-LoRA: %d module(s) of %s do not exist in this model and were ignored: %s",
                           len(info.unexpected), source, ", ".join(info.unexpected[:10]))
        return info

    def merge_to(self, text_encoder=None, unet=None, weights_sd: Optional[dict] = None, dtype=None, device=None) -> None:
        """Add multiplier * alpha/rank * up @ down of ``weights_sd`` into the base layers; without
        ``weights_sd``, exactly what this network adds now (its training factors, nothing truncated)."""
        if weights_sd is None:
            weights_sd = raw_modules(self.loras, torch.float32)
        modules = group_modules(weights_sd, "weights_sd")
        unknown = sorted(set(modules) - {m.lora_name for m in self.loras})
        if unknown:
            logger.warning("AC-LoRA merge: %d module(s) not in this model were ignored: %s", len(unknown),
                           ", ".join(unknown[:10]))
        with torch.no_grad():
            for m in self.loras:
                parts = modules.get(m.lora_name)
                if parts is None:
                    continue
                weight = m.org_module.weight
                target = torch.device(device) if device is not None else weight.device
                down = parts["lora_down.weight"].to(target, torch.float32)
                up = parts["lora_up.weight"].to(target, torch.float32)
                k = down.shape[0]
                alpha = float(parts["alpha"]) if "alpha" in parts else float(k)
                delta = (up.reshape(up.shape[0], k) @ down.reshape(k, -1)).reshape(weight.shape) * (alpha / k)
                merged = weight.to(target, torch.float32) + delta * self.multiplier
                weight.data = merged.to(weight.device, dtype or weight.dtype)
        logger.info("AC-LoRA: merged %d modules", sum(1 for m in self.loras if m.lora_name in modules))

    # --- max-norm regularisation -----------------------------------------------------------------
    def apply_max_norm_regularization(self, max_norm_value: float, device=None):
        """sd-scripts' --scale_weight_norms: scale modules whose update norm exceeds ``max_norm_value``.

        ||up @ down||_F is computed from the two R x R Gram matrices, batched by
        shape; one host sync per call. Returns (keys_scaled, mean_norm, max_norm).
        """
        norms = []
        scaled = []
        with torch.no_grad():
            for _, indices in shape_groups(self.loras).items():
                batch = [self.loras[i] for i in indices]
                down = torch.stack([m.down_matrix().float() for m in batch])
                up = torch.stack([m.up_matrix().float() for m in batch])
                scale = torch.tensor([m.scale for m in batch], device=down.device)
                gram_up = up.transpose(1, 2) @ up
                gram_down = down @ down.transpose(1, 2)
                norm = (gram_up * gram_down).sum(dim=(1, 2)).clamp(min=0).sqrt() * scale
                clamped = norm.clamp(min=max_norm_value / 2)
                ratio = clamped.clamp(max=max_norm_value) / clamped
                root = ratio.sqrt()
                for m, r in zip(batch, root):
                    m.lora_down.weight.mul_(r.to(m.lora_down.weight.dtype))
                    m.lora_up.weight.mul_(r.to(m.lora_up.weight.dtype))
                norms.append(norm * ratio)
                scaled.append((ratio < 1).sum())
        all_norms = torch.cat([n.to("cpu") for n in norms])
        keys_scaled = int(sum(int(s) for s in scaled))
        return keys_scaled, float(all_norms.mean()), float(all_norms.max())


def _json_number(value: Any) -> Any:
    """NaN and infinity as null (what JSON readers other than Python's accept): p is NaN in product mode,
    a level is infinite when every component is kept."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fixed(value: Optional[float]) -> int:
    """A float (None: -1) as the integer the history buffers store (p, L, levels and losses are >= 0)."""
    return -1 if value is None or value != value else round(value * FIXED_POINT)


def _unfixed(value: int) -> Optional[float]:
    return None if value < 0 else value / FIXED_POINT


__all__ = ["ACLoRANetwork", "LoadInfo"]
