"""When RESTART runs, and the training loss it reads.

sd-scripts never hands the loss to the network: the only place the scalar is
visible is ``accelerator.backward(loss)``. We wrap ``accelerate.Accelerator.backward``
once (class level) and let every registered network see the loss: it is
accumulated on the device (no host sync per step) and read once per RESTART,
averaged over processes. The same wrapper tells us when an optimizer step
happens (``accelerator.sync_gradients``), which gives optimizer-step counts that
respect gradient accumulation.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


class LossMeter:
    """Device-side running sum of finite loss values (NaN/Inf counted, not summed)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._totals: Optional[torch.Tensor] = None  # (sum of finite values, their count, non-finite count)

    def add(self, loss: torch.Tensor | float) -> None:
        value = torch.as_tensor(loss).detach().float().mean()
        finite = torch.isfinite(value)
        if self._totals is None:
            self._totals = torch.zeros(3, dtype=torch.float64, device=value.device)
        elif self._totals.device != value.device:  # e.g. sums restored on another device: keep them
            self._totals = self._totals.to(value.device)
        self._totals += torch.stack([torch.where(finite, value, torch.zeros_like(value)), finite, ~finite]).double()

    def state(self) -> torch.Tensor:
        """(sum, count, non-finite count) as a float64 tensor (on the loss's device; CPU zeros before any loss)."""
        if self._totals is None:
            return torch.zeros(3, dtype=torch.float64)
        return self._totals.clone()

    def load(self, values: torch.Tensor) -> None:
        """Continue from ``state()``'s values."""
        self.reset()
        if bool((values != 0).any()):
            self._totals = values.to(torch.float64).clone()

    def read(self) -> tuple[Optional[float], int, int]:
        """(mean of the finite values, how many, how many non-finite), summed over processes.

        This is the one host sync of a RESTART's loss bookkeeping.
        """
        totals = all_reduce_sum(self.state())
        total, count, bad = totals.tolist()
        return (total / count if count > 0 else None), int(count), int(bad)


def distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes; a copy on the backend's device when the tensor is elsewhere."""
    if not distributed():
        return t
    backend = torch.distributed.get_backend()
    work = t.clone()
    if backend == "nccl" and work.device.type != "cuda":
        work = work.cuda()
    if backend == "gloo" and work.device.type != "cpu":
        work = work.cpu()
    torch.distributed.all_reduce(work)
    return work.to(t.device)


class OnceWarnings:
    """Warnings logged once per key (a run would repeat them at every RESTART or save)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.seen: set[str] = set()

    def warn(self, key: str, message: str, *args: Any) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.log.warning(message, *args)


@dataclass
class Clock:
    """The network's own count of training progress (persisted through --save_state/--resume)."""

    epochs_started: int = 0
    optimizer_steps: int = 0
    steps_at_epoch_start: int = 0
    steps_per_epoch: int = 0  # observed over the first complete epoch
    restarts: int = 0
    last_restart_step: int = 0
    last_restart_epoch: int = 0
    resumed_mid_epoch: int = 0

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def size(cls) -> int:
        return len(fields(cls))

    def load_list(self, values: list[int]) -> None:
        for f, v in zip(fields(self), values):
            setattr(self, f.name, int(v))

    def mark_restart(self, index: int) -> None:
        """RESTART number ``index`` ran now."""
        self.restarts = index
        self.last_restart_step = self.optimizer_steps
        self.last_restart_epoch = self.epochs_completed

    @property
    def epochs_completed(self) -> int:
        return max(self.epochs_started - 1, 0)


@dataclass
class TrainingLength:
    """How long the run is, as far as sd-scripts' args tell (read lazily: final only before the loop)."""

    max_train_steps: Optional[int] = None
    max_train_epochs: Optional[int] = None
    gradient_accumulation_steps: int = 1

    @classmethod
    def from_args(cls, args: Any) -> "TrainingLength":
        def number(name: str) -> Optional[int]:
            value = getattr(args, name, None)
            return int(value) if isinstance(value, (int, float)) and value and value > 0 else None

        return cls(number("max_train_steps"), number("max_train_epochs"), number("gradient_accumulation_steps") or 1)

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch when the args give both lengths (sd-scripts sets
        max_train_steps = max_train_epochs * steps per epoch), else 0."""
        if self.max_train_steps and self.max_train_epochs:
            return self.max_train_steps // self.max_train_epochs
        return 0

    def total_epochs(self, steps_per_epoch: int) -> Optional[int]:
        """sd-scripts' num_train_epochs = ceil(max_train_steps / steps per epoch)."""
        if self.max_train_steps and steps_per_epoch > 0:
            return math.ceil(self.max_train_steps / steps_per_epoch)
        return self.max_train_epochs


# --- when a RESTART is due ------------------------------------------------------------
def interval_epochs(config: Any, clock: Clock, length: TrainingLength) -> Optional[int]:
    """E: ``restart_every``, or a tenth of the run (at least 1) once the run length is known."""
    if config.restart_every is not None:
        return config.restart_every
    total = length.total_epochs(clock.steps_per_epoch)
    return max(1, round(total / 10)) if total else None


def epoch_restart_due(config: Any, clock: Clock, length: TrainingLength, warnings: OnceWarnings) -> bool:
    """At an epoch's start: whether the epochs completed call for a RESTART (``restart_every``)."""
    if config.restart_mode == "off" or config.restart_every_steps is not None:
        return False
    done = clock.epochs_completed
    if done == 0:
        return False
    every = interval_epochs(config, clock, length)
    total = length.total_epochs(clock.steps_per_epoch)
    if every is None:
        warnings.warn(
            "length",
            "AC-LoRA: the run length is unknown (no max_train_steps/max_train_epochs); no "
            "RESTART runs. Set restart_every, or call set_training_length().",
        )
        return False
    if total is not None and every >= total:
        warnings.warn(
            "too-long",
            "AC-LoRA: restart_every=%d epochs is not shorter than the run (%d epochs); no "
            "RESTART will run. Lower restart_every or use restart_every_steps.",
            every,
            total,
        )
    return done % every == 0 and (total is None or done < total)


def step_restart_due(config: Any, clock: Clock, length: TrainingLength, warnings: OnceWarnings) -> bool:
    """At a micro-batch's start: whether the optimizer steps done call for a RESTART (``restart_every_steps``)."""
    every = config.restart_every_steps
    if config.restart_mode == "off" or every is None:
        return False
    total = length.max_train_steps
    if total is not None and every >= total:  # checked before the step count: the interval is never reached
        warnings.warn(
            "too-long",
            "AC-LoRA: restart_every_steps=%d is not shorter than the run (%d steps); no RESTART will run.",
            every,
            total,
        )
        return False
    steps = clock.optimizer_steps
    if steps == 0 or steps % every or steps == clock.last_restart_step:
        return False
    return total is None or steps < total


def progress(clock: Clock, length: TrainingLength) -> float:
    """Fraction of training done (Eq. 6's Epoch / TotalEpoch, in optimizer steps when known)."""
    if length.max_train_steps:
        return clock.optimizer_steps / length.max_train_steps
    total = length.total_epochs(clock.steps_per_epoch)
    return clock.epochs_completed / total if total else 0.0


# --- capture of accelerator.backward --------------------------------------------------
_listeners: "weakref.WeakSet[Any]" = weakref.WeakSet()
_installed = False


def install_backward_capture() -> bool:
    """Wrap ``accelerate.Accelerator.backward`` once so registered networks see each loss.

    Returns False when accelerate is not installed (then use ``record_loss``).
    """
    global _installed
    if _installed:
        return True
    try:
        from accelerate import Accelerator
    except ImportError:
        return False
    original = Accelerator.backward
    if getattr(original, "_aclora_wrapped", False):
        _installed = True
        return True

    @functools.wraps(original)
    def backward(self: Any, loss: Any, **kwargs: Any) -> Any:
        for listener in list(_listeners):
            listener._on_backward(loss, self)
        return original(self, loss, **kwargs)

    backward._aclora_wrapped = True  # type: ignore[attr-defined]
    Accelerator.backward = backward
    _installed = True
    return True


def listen(network: Any) -> bool:
    """Register ``network`` for loss capture (its ``_on_backward(loss, accelerator)`` is called)."""
    ok = install_backward_capture()
    if ok:
        _listeners.add(network)
    return ok


def forget(network: Any) -> None:
    _listeners.discard(network)
