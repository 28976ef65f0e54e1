"""The product mode's rank search: what it records in training, the held-out loss, and each decision.

One ``RankSearch`` serves one network, which passes in what it needs: the
options and a warning logger when it builds it, its modules and the fraction of
training done with each call (no reference back to the network; the network
puts itself in eval mode around a decision that evaluates the held-out loss). In
training, forward hooks record what every module's components act on
(``InputStats``: the LoRA activations' h h^T and the layer output's mean
square, on the device, no host read). At a RESTART or a save,
``lora.product_restart.analyse_modules`` turns each module's update into
a spectrum and component importances (``F.component_importance``), and
``decide`` picks one threshold for every module: from an explicit energy share
when there is one, else on the held-out loss (the loop's ``set_validation`` or
sd-scripts' recorded validation pass, ``heldout.SdScriptsValidation``), else
the frozen last choice, else ``min_importance``. Candidates are evaluated by
masking the slots of the factors, rebased on their update's SVD.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .. import functional as F
from ..lora.module import ACLoRAModule
from ..lora.product_restart import InputStats, Spectrum, analyse_modules, keeps_at_level, restart_product
from ..options import ACLoRAConfig, OptionError
from .heldout import SdScriptsValidation

logger = logging.getLogger(__name__)

Keeps = dict[int, torch.Tensor]


class RankSearch:
    """The product mode's state between RESTARTs and its decisions (see the module docstring)."""

    def __init__(self, config: ACLoRAConfig, warn_once: Callable[..., None]) -> None:
        """``warn_once(key, message, *args)``: a warning logged once per key. The methods that decide take
        the network's modules in order (keep masks are indexed by position) and the fraction of training done."""
        self.config = config
        self._warn_once = warn_once
        self.training = True  # the network's mode, kept up to date by the network (``set_mode``)
        self.stats: dict[str, InputStats] = {}
        self.masks: dict[str, torch.Tensor] = {}  # candidate being evaluated: module name -> slot mask
        self.recording = True  # False while the held-out loss is evaluated
        self.loss_fn: Optional[Callable[[], Any]] = None
        self.until: Optional[float] = None
        self.groups: Optional[torch.Tensor] = None  # the held-out unit (image) of each item loss_fn returns
        # a running held-out score per coarse level: kept in the resumable state (``state``); the rule of
        # version 0.1 (bench/rule_before.py) fills it
        self.scores: dict[float, float] = {}
        self.frozen_level: Optional[float] = None  # the last level the held-out loss chose
        self.explicit_p: Optional[float] = None  # the energy share of the last RESTART, when one was given
        self.file_decision: Optional[dict] = None  # how the last saved file's ranks were chosen
        self.file_spectra: dict[int, Spectrum] = {}  # what it was chosen from (max_file_size cuts further)
        self._hooks: dict[str, tuple] = {}

    # --- what training records ------------------------------------------------------------------
    def watch(self, modules: Sequence[ACLoRAModule]) -> None:
        for m in modules:
            self._hooks[m.lora_name] = (
                m.lora_down.register_forward_hook(self._activation_hook(m.lora_name)),
                m.org_module.register_forward_hook(self._output_hook(m.lora_name)),
            )

    def forget(self, modules: Sequence[ACLoRAModule], validation: bool = False) -> None:
        """Take the hooks off these modules (and the sd-scripts recorder off the U-Net with ``validation``)."""
        for m in modules:
            self.stats.pop(m.lora_name, None)
            for handle in self._hooks.pop(m.lora_name, ()):
                handle.remove()
        if validation and isinstance(self.loss_fn, SdScriptsValidation):
            self.loss_fn.remove()

    def _recording_now(self, training: bool) -> bool:
        """Whether a hook records now: in product mode, in a training forward (``training``: the mode of what
        the hook sits on) with gradients, outside the held-out evaluation."""
        return self.recording and training and torch.is_grad_enabled() and self.config.restart_mode == "product"

    def _activation_hook(self, name: str):
        """On lora_down: adds h h^T of its activations while training (the inputs' energy along each
        component), and applies the slot mask of a candidate while one is evaluated."""

        def hook(layer: nn.Module, inputs: Any, output: torch.Tensor):
            mask = self.masks.get(name)
            if mask is not None:
                return output * mask.to(output.dtype)
            if not self._recording_now(layer.training):
                return None
            hidden = output.detach()
            if hidden.dim() == 4:  # conv: (batch, rank, height, width)
                hidden = hidden.movedim(1, -1)
            hidden = hidden.reshape(-1, hidden.shape[-1]).float()
            stats = self.stats.get(name)
            if stats is None or stats.gram.device != hidden.device:
                stats = self.stats[name] = InputStats(
                    torch.zeros(hidden.shape[1], hidden.shape[1], device=hidden.device)
                )
            # under gradient checkpointing the forward runs twice: both sums double, their ratio does not
            stats.gram.addmm_(hidden.T, hidden)
            stats.count += hidden.shape[0]
            return None

        return hook

    def _output_hook(self, name: str):
        """On the adapted layer: the sum of squares of its outputs while training (the scale a component's
        importance is measured against), on the first of every ``F.OUTPUT_SAMPLE_EVERY`` training
        forwards: one number per module and RESTART, estimated from hundreds of steps, needs no pass over
        every output (each pass reads the whole output: taken on every forward, the hooks made a step of
        bench/step_overhead.py 1.07x peft's; sampled, 1.00x)."""

        def hook(layer: nn.Module, inputs: Any, output: Any):
            stats = self.stats.get(name)
            # the network's mode, not the adapted layer's (a frozen model's layers may be in eval mode)
            if stats is None or not isinstance(output, torch.Tensor) or not self._recording_now(self.training):
                return None
            stats.out_calls += 1
            if (stats.out_calls - 1) % F.OUTPUT_SAMPLE_EVERY:
                return None
            if stats.out_sq is None or stats.out_sq.device != output.device:
                stats.out_sq = torch.zeros((), device=output.device)
            stats.out_sq.add_(torch.linalg.vector_norm(output.detach(), dtype=torch.float32).square())
            stats.out_numel += output.numel()
            return None

        return hook

    # --- the held-out loss ------------------------------------------------------------------------
    def set_validation(
        self, loss_fn: Optional[Callable[[], Any]], until: Optional[float], groups: Optional[Any] = None
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise OptionError(
                f"set_validation: loss_fn={loss_fn!r} is not valid; allowed: a callable returning "
                "the held-out loss, or None"
            )
        if until is not None and not (isinstance(until, (int, float)) and 0 < until <= 1):
            raise OptionError(
                f"set_validation: until={until!r} is not valid; allowed: a fraction of training > 0 and <= 1, or None"
            )
        if loss_fn is not None and self.config.restart_mode != "product":
            raise OptionError(
                f"set_validation: restart_mode={self.config.restart_mode} does not use a held-out "
                "loss (paper mode chooses from the training loss, off never restarts); "
                "use restart_mode=product"
            )
        if loss_fn is not None and self.config.fixed_p is not None:
            raise OptionError(
                f"set_validation: fixed_p={self.config.fixed_p} fixes every module's energy share, so "
                "a held-out loss would choose nothing; remove fixed_p to let it choose"
            )
        self.loss_fn = loss_fn
        self.until = None if until is None else float(until)
        self.groups = None if groups is None else _as_groups(groups)

    def record_sd_scripts_validation(
        self, unet: Optional[nn.Module], expected: bool, prediction: Optional[Any] = None
    ) -> None:
        """Under sd-scripts, record its validation pass as the held-out loss (``heldout``), unless the loop
        gave one or the mode would not use it. ``prediction``: the model family's (``families.base.Prediction``)."""
        if self.loss_fn is None and self.config.restart_mode == "product" and self.config.fixed_p is None:
            recorder = SdScriptsValidation.attach(
                lambda: not self.training and self.recording, unet, expected, prediction
            )
            if recorder is not None:
                self.set_validation(recorder, None)

    def set_mode(self, training: bool) -> None:
        """The network was switched to training or eval mode; back to training, sd-scripts' validation pass
        (if one was being recorded) ended."""
        self.training = training
        if training and isinstance(self.loss_fn, SdScriptsValidation) and self.recording:
            self.loss_fn.end_pass()

    @staticmethod
    def holding(modules: Sequence[ACLoRAModule]) -> bool:
        """True once a held-out cut has taken slots out of the forward (the run trains at the kept rank)."""
        return any(m.slot_mask is not None for m in modules)

    def item_groups(self) -> Optional[torch.Tensor]:
        """The held-out unit of each item: the loop's (``set_validation(groups=...)``), else the recorder's."""
        return self.groups if self.groups is not None else getattr(self.loss_fn, "groups", None)

    def validation_active(self, progress: float) -> bool:
        """True while the held-out loss decides (``progress``: the fraction of training done)."""
        if self.loss_fn is None or self.config.fixed_p is not None or not getattr(self.loss_fn, "ready", True):
            return False
        return self.until is None or progress < self.until

    def defers(self, p: Optional[float], progress: float) -> bool:
        """True when a RESTART leaves training alone: no energy share ``p`` and no held-out evidence (yet)
        nor an earlier held-out choice, so nothing tells overfitting from learning; the file's ranks are
        then decided at save time."""
        return p is None and not self.validation_active(progress) and self.frozen_level is None

    def held_out_losses(self) -> torch.Tensor:
        """The held-out loss of the network as it is now (with the candidate's masks), no grad, nothing
        recorded: the items ``loss_fn`` returned (a 1-D float64 tensor on the CPU; one item for a scalar).
        The network is in eval mode around the decision that calls it."""
        assert self.loss_fn is not None  # validation_active() said so
        self.recording = False
        try:
            with torch.no_grad():
                value = self.loss_fn()
            if isinstance(value, torch.Tensor):
                return value.detach().double().flatten().cpu()
            return torch.tensor([float(value)], dtype=torch.float64)
        finally:
            self.recording = True

    def _set_masks(self, modules: Sequence[ACLoRAModule], keeps: Optional[Keeps]) -> None:
        """Route module forwards through the kept slots only (None: every slot again)."""
        self.masks.clear()
        for i, keep in (keeps or {}).items():
            m = modules[i]
            mask = keep.to(m.lora_down.weight.device, torch.float32)
            self.masks[m.lora_name] = mask.view(-1, 1, 1) if m.is_conv else mask

    # --- decisions ----------------------------------------------------------------------------------
    def decide(
        self,
        modules: Sequence[ACLoRAModule],
        spectra: dict[int, Spectrum],
        p: Optional[float],
        progress: float,
        final: bool = False,
    ) -> tuple[Keeps, dict]:
        """Which components each module keeps: (keep masks, how it was decided).

        An explicit energy share ``p`` (``restart(p=...)``, ``fixed_p``) keeps, per
        module, the leading components carrying that share of the update's energy.
        Otherwise one threshold on the component importance applies to every
        module: chosen on the held-out loss when there is one (the modules must be
        in their SVD basis, see ``analyse_modules(rebase=True)``), else every component
        once the run trains at ranks already chosen (held slots after a held-out cut, or
        ``ranks_from``), else the level it last chose when it was frozen, else
        ``min_importance`` of the largest.
        ``final``: the file's own ranks at save time (see ``F.parsimonious_choice``).
        """
        min_rank = self.config.min_rank
        if p is not None:
            keeps = {
                i: F.as_keep(F.signal_rank(sp.s[None], p, self.config.energy, min_rank), sp.s.shape[0])[0]
                for i, sp in spectra.items()
            }
            return keeps, {"level": None}
        unmeasured = sum(not sp.measured for sp in spectra.values())
        if unmeasured:
            logger.info(
                "AC-LoRA: %d module(s) saw no training step since the last RESTART or resume; they keep "
                "their components until the next decision",
                unmeasured,
            )
        if self.validation_active(progress):
            choice = self._choose_on_heldout(modules, spectra, final)
            if choice is not None:
                return choice
            self._warn_once(
                "validation-nan", "AC-LoRA: the held-out loss was never finite; ranks use the default level"
            )
        if self.holding(modules) and (self.frozen_level is not None or self.config.ranks_from is not None):
            # the run trains at ranks already chosen (a held-out cut, or ranks_from's file): no further cut
            # without held-out evidence
            return keeps_at_level(spectra, math.inf, min_rank), {"level": math.inf, "source": "frozen"}
        if self.loss_fn is not None and self.frozen_level is not None:
            level, source = self.frozen_level, "frozen"
        else:
            level = -math.log10(self.config.min_importance) if self.config.min_importance > 0 else math.inf
            source = "prior"
        return keeps_at_level(spectra, level, min_rank), {"level": level, "source": source}

    def _choose_on_heldout(
        self, modules: Sequence[ACLoRAModule], spectra: dict[int, Spectrum], final: bool
    ) -> Optional[tuple[Keeps, dict]]:
        """The threshold by the one-standard-error rule (``F.parsimonious_choice``; None if no loss was finite).

        Every coarse candidate around the last choice (``F.window_levels``), then the cuts between the best
        one's neighbours (``F.refine_levels``), is evaluated once per distinct kept set. The run then trains
        at the chosen rank (``restart``).
        """
        seen: dict[tuple, tuple[float, torch.Tensor]] = {}  # kept ranks -> (level, items)

        def evaluate(level: float) -> None:
            keeps = keeps_at_level(spectra, level, self.config.min_rank)
            signature = tuple(int(k.sum()) for k in keeps.values())
            if signature not in seen:
                self._set_masks(modules, keeps)
                seen[signature] = (level, self.held_out_losses())

        def mean(signature: tuple) -> float:
            return float(seen[signature][1].mean())

        try:
            for level in F.window_levels(self.frozen_level):
                evaluate(level)
            finite = [sig for sig in seen if math.isfinite(mean(sig))]
            if not finite:
                return None
            importances = [sp.importance for sp in spectra.values() if sp.measured]
            for fine in F.refine_levels(importances, seen[min(finite, key=mean)][0]):
                evaluate(fine)
        finally:
            self._set_masks(modules, None)
        chosen = F.parsimonious_choice({sig: items for sig, (_, items) in seen.items()}, self.item_groups(), final)
        level = seen[chosen][0]
        if not final:
            self.frozen_level = level
        return keeps_at_level(spectra, level, self.config.min_rank), {
            "level": level,
            "source": "validation",
            "validation_loss": mean(chosen),
            "candidates": len(seen),
        }

    def reset_stats(self) -> None:
        """Start the activation statistics anew (a RESTART that changed nothing: the next importances come
        from the steps that follow, like after any RESTART)."""
        for stats in self.stats.values():
            stats.reset()

    def restart(
        self, modules: Sequence[ACLoRAModule], p: Optional[float], seed: int, progress: float
    ) -> tuple[dict[int, int], list[str], dict]:
        """A product-mode RESTART of ``modules``: (new rank per module index, skipped names, the decision)."""
        decision: dict = {}

        def choose(spectra: dict[int, Spectrum]) -> Keeps:
            keeps, made = self.decide(modules, spectra, p, progress)
            decision.update(made, keeps=keeps)
            return keeps

        for m in modules:
            m.clear_held()
        new_ranks, skipped = restart_product(modules, self.stats, choose, seed)
        keeps = decision.pop("keeps", {})
        if self._holds_after(modules, decision):
            for i, keep in keeps.items():  # the run trains at the kept rank from now on
                modules[i].hold_slots(~keep.cpu())
        self.explicit_p = p
        self.reset_stats()  # the factors changed basis: the next importances come from what follows
        return new_ranks, skipped, decision

    def _holds_after(self, modules: Sequence[ACLoRAModule], decision: dict) -> bool:
        """Whether the slots this RESTART freed stay out of the forward: after a held-out cut, and once held."""
        return decision.get("source") == "validation" or self.holding(modules)

    def file_keeps(self, modules: Sequence[ACLoRAModule], ranks: list, progress: float) -> list:
        """The file's ranks, decided on the final update with the same rule as a RESTART (so nothing learned
        since the last one is dropped) without changing the training state. A module that keeps every
        component is written as it is (its rank: exactly the training factors); one whose analysis
        fails keeps ``ranks[i]``. Records ``file_decision``."""
        for m in modules:
            m.clear_held()
        validating = self.validation_active(progress) and self.explicit_p is None
        saved = (
            [(m.lora_down.weight.detach().clone(), m.lora_up.weight.detach().clone()) for m in modules]
            if validating
            else None
        )
        try:
            spectra, _ = analyse_modules(modules, self.stats, rebase=validating)
            self.file_spectra = spectra
            keeps, self.file_decision = self.decide(modules, spectra, self.explicit_p, progress, final=True)
        finally:
            if saved is not None:
                with torch.no_grad():
                    for m, (down, up) in zip(modules, saved):
                        m.lora_down.weight.copy_(down)
                        m.lora_up.weight.copy_(up)
        return [
            k if i not in keeps else (m.rank if bool(keeps[i].all()) else keeps[i])
            for i, (m, k) in enumerate(zip(modules, ranks))
        ]

    # --- resumable state -------------------------------------------------------------------------------
    def state(self) -> torch.Tensor:
        """The running score of every coarse level, then the frozen level (float64; NaN: none)."""
        values = [self.scores.get(level, math.nan) for level in F.LEVELS]
        values.append(math.nan if self.frozen_level is None else self.frozen_level)
        return torch.tensor(values, dtype=torch.float64)

    def load_state(self, values: torch.Tensor) -> None:
        *scores, frozen = values.tolist()
        self.scores = {level: s for level, s in zip(F.LEVELS, scores) if s == s}
        self.frozen_level = None if frozen != frozen else frozen

    def stats_state(self, modules: Sequence[ACLoRAModule]) -> torch.Tensor:
        """The activation statistics since the last RESTART, for --save_state (float64): per module, in
        ``modules`` order, its rank x rank Gram sum, then count, output sum of squares, output count (zeros
        where nothing was recorded; empty when no module recorded anything). Without them the first
        RESTART or save after --resume would decide from the resumed steps alone."""
        recorded = {name: s for name, s in self.stats.items() if s.measured}
        if not recorded:
            return torch.zeros(0, dtype=torch.float64)
        parts = []
        for m in modules:
            stats = recorded.get(m.lora_name)
            if stats is None or stats.gram.shape != (m.rank, m.rank):
                parts.append(torch.zeros(m.rank * m.rank + 3, dtype=torch.float64))
                continue
            totals = torch.tensor(
                [stats.count, 0.0 if stats.out_sq is None else float(stats.out_sq), stats.out_numel],
                dtype=torch.float64,
            )
            parts.append(torch.cat([stats.gram.detach().double().cpu().flatten(), totals]))
        return torch.cat(parts)

    def load_stats_state(self, modules: Sequence[ACLoRAModule], state: torch.Tensor) -> None:
        sizes = [m.rank * m.rank + 3 for m in modules]
        if state.numel() != sum(sizes):  # a state saved without them (or for other modules): nothing to restore
            return
        for m, part in zip(modules, state.double().cpu().split(sizes)):
            count, out_sq, out_numel = part[-3:].tolist()
            if count > 0 and out_numel > 0:
                device = m.lora_down.weight.device
                self.stats[m.lora_name] = InputStats(
                    part[:-3].view(m.rank, m.rank).float().to(device),
                    int(count),
                    torch.tensor(out_sq, dtype=torch.float32, device=device),
                    int(out_numel),
                )


def _as_groups(groups: Any) -> torch.Tensor:
    """``set_validation(groups=...)``: the held-out unit of each item, as a 1-D int64 tensor on the CPU."""
    try:
        tensor = torch.as_tensor(groups)
    except (TypeError, ValueError, RuntimeError):
        tensor = None
    if tensor is None or tensor.dim() != 1 or tensor.is_floating_point() or tensor.is_complex():
        raise OptionError(
            f"set_validation: groups={groups!r} is not valid; allowed: a 1-D sequence of integers, "
            "the held-out unit (e.g. image) of each item the loss returns"
        )
    return tensor.long().cpu()
