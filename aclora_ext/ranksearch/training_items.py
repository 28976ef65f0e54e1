"""The image each training item is, per training batch, as the network records it (docs/identities.md).

Inside sd-scripts, a wrapper around the function a family's trainer hands the clean latents to
(``Family.clean_latents``; installed at module level, as the held-out recorder wraps
``conditional_loss``: the trainers look it up through its module at call time) computes each item's
fingerprint and descriptor on the device, and keeps them there. Nothing is read back in the step:
:meth:`TrainingItems.resolve` copies them to the host in one transfer and resolves them to image ids,
at the epoch boundary (``on_epoch_start``) or when the ids are asked for. Validation batches are not
recorded: sd-scripts runs them with the network in eval mode. A loop of one's own passes each batch's
ids itself (:meth:`TrainingItems.record`). Nothing here changes the training.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..families.base import CleanLatents
from .identities import Recogniser, descriptor, fingerprint

logger = logging.getLogger(__name__)

_listeners: "dict[tuple[str, str], weakref.WeakSet[TrainingItems]]" = {}


def install(where: CleanLatents) -> bool:
    """Wrap sd-scripts' function once (module level) so that recorders see its calls' latents; False when
    its module is not loaded (outside sd-scripts)."""
    module = sys.modules.get(where.module)
    original = getattr(module, where.name, None)
    if original is None:
        return False
    if getattr(original, "_aclora_items", False):
        return True

    @functools.wraps(original)
    def noised(*args, **kwargs):
        latents = where.latents(args, kwargs)
        if isinstance(latents, torch.Tensor):
            for listener in list(_listeners.get((where.module, where.name), ())):
                listener.observe(latents)
        return original(*args, **kwargs)

    noised._aclora_items = True  # type: ignore[attr-defined]
    setattr(module, where.name, noised)
    return True


@dataclass
class _Pending:
    """One training batch, as the step left it (on the device)."""

    shape: Optional[tuple[int, ...]] = None  # one item's latent shape (sd-scripts' path)
    fingerprints: Optional[torch.Tensor] = None
    descriptors: Optional[torch.Tensor] = None
    ids: Any = None  # the ids a loop of one's own passed
    losses: Optional[torch.Tensor] = None


class TrainingItems:
    """Per-item image ids of every training batch (item order kept), and distinct images per epoch.

    ``recording()``: True while the network trains (sd-scripts' validation pass runs it in eval mode).
    """

    def __init__(self, recording: Callable[[], bool]) -> None:
        self._recording = recording
        self.recogniser: Optional[Recogniser] = None
        self.watching: Optional[CleanLatents] = None
        self._pending: list[_Pending] = []
        self._batches: list[list[Any]] = []
        self._losses: list[Optional[list[float]]] = []
        self._epoch: list[Any] = []
        self.per_epoch: list[int] = []  # distinct images of each finished epoch
        # the network's own held-out split (``holdout``): told each batch's fingerprints in the step (on the
        # device) and, after each resolution, every cached view's image
        self.on_batch: Optional[Callable[[torch.Tensor, tuple], None]] = None
        self.on_resolved: Optional[Callable[[dict], None]] = None

    # --- sd-scripts: the clean latents ------------------------------------------------------------
    def watch(self, where: Optional[CleanLatents], args: Any) -> bool:
        """Record the clean latents sd-scripts hands ``where`` (exact identities when ``args`` cache them)."""
        self.remove()
        if where is None or not install(where):
            return False
        cached = bool(getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False))
        self.recogniser = Recogniser(exact=cached)
        self.watching = where
        _listeners.setdefault((where.module, where.name), weakref.WeakSet()).add(self)
        return True

    def observe(self, latents: torch.Tensor) -> None:
        """In the training step: the batch's clean latents, summarised on their device (no host read)."""
        if self._recording():
            shape, prints = tuple(latents.shape[1:]), fingerprint(latents)
            self._pending.append(_Pending(shape, prints, descriptor(latents)))
            if self.on_batch is not None:
                self.on_batch(prints, shape)

    # --- a loop of one's own ----------------------------------------------------------------------
    def record(self, ids: Any, losses: Optional[torch.Tensor] = None) -> None:
        """A training batch's per-item image ids (a sequence or a 1-D integer tensor, any device) and, if
        given, per-item losses (1-D, one per id); kept on their device until :meth:`resolve`."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
                raise ValueError(
                    f"ids: a tensor of shape {tuple(ids.shape)} and dtype {ids.dtype}; allowed: 1-D integers"
                )
            count = ids.shape[0]
            ids = ids.detach()
        elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
            count = len(ids)
            ids = list(ids)
        else:
            raise ValueError(f"ids={ids!r}; allowed: a sequence or a 1-D integer tensor of image ids, one per item")
        if losses is not None and (not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (count,)):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses: {shape}; allowed: a 1-D tensor with one loss per id ({count})")
        if self._recording():
            self._pending.append(_Pending(ids=ids, losses=None if losses is None else losses.detach()))

    # --- outside the step -------------------------------------------------------------------------
    def resolve(self) -> None:
        """Copy what the steps left on the device to the host (one transfer) and resolve it to image ids."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        traced = [p for p in pending if p.fingerprints is not None]
        fingerprints = iter(torch.cat([p.fingerprints for p in traced]).cpu().tolist() if traced else [])  # type: ignore[misc]
        descriptors = [p.descriptors.cpu() for p in traced]  # type: ignore[union-attr]
        traced_index = 0
        for p in pending:
            losses = None if p.losses is None else [float(v) for v in p.losses.float().cpu()]
            if p.fingerprints is not None and self.recogniser is not None and p.shape is not None:
                d = descriptors[traced_index]
                traced_index += 1
                ids: list[Any] = self.recogniser.resolve(p.shape, [next(fingerprints) for _ in range(d.shape[0])], d)
            else:
                ids = p.ids.cpu().tolist() if isinstance(p.ids, torch.Tensor) else list(p.ids)
            self._batches.append(ids)
            self._losses.append(losses)
            self._epoch.extend(ids)
        if self.on_resolved is not None and self.recogniser is not None:
            self.on_resolved(self.recogniser.known)

    @property
    def batches(self) -> list[list[Any]]:
        """The image id of each item, per training batch (micro-batch), in the order they were trained."""
        self.resolve()
        return self._batches

    @property
    def losses(self) -> list[Optional[list[float]]]:
        """Per batch, the per-item losses a loop of one's own passed (None where it passed none)."""
        self.resolve()
        return self._losses

    @property
    def images(self) -> int:
        """Distinct images trained so far."""
        self.resolve()
        return len({i for batch in self._batches for i in batch})

    def end_epoch(self) -> None:
        """At the epoch boundary: resolve, count the epoch's distinct images and say so."""
        self.resolve()
        if not self._epoch:
            return
        self.per_epoch.append(len(set(self._epoch)))
        views = f", {self.recogniser.views} cached views" if self.recogniser and self.recogniser.exact else ""
        logger.info(
            "AC-LoRA: epoch %d: %d training items of %d distinct images (%d images so far%s)",
            len(self.per_epoch),
            len(self._epoch),
            self.per_epoch[-1],
            self.images,
            views,
        )
        self._epoch = []

    def remove(self) -> None:
        """Stop recording sd-scripts' latents (the wrapper stays, inert)."""
        if self.watching is not None:
            _listeners.get((self.watching.module, self.watching.name), weakref.WeakSet()).discard(self)
        self.watching = None
