"""The training calls of the held items (``holdout=``): recorded on the device in the step, sorted at the
epoch's end, replayed through the denoiser as it is now for the rank search (see ``holdout``)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..families.base import Prediction
from .heldout import PREDICTION_TOLERANCE, SdScriptsValidation, _Call

logger = logging.getLogger(__name__)

#: training calls with held items kept for the replay (the newest; older epochs' noise makes way for newer)
MAX_CALLS = 16
#: training calls recorded per epoch before the epoch's end sorts out those with held items
PENDING_CALLS = 64


class HeldCalls(SdScriptsValidation):
    """The training calls of held items, recorded on the device in the step and sorted at the epoch's end;
    called, the loss of every held item of them, replayed through the denoiser as it is now."""

    def __init__(
        self,
        holdout: Any,  # holdout.Holdout (not imported: that module imports this one)
        recording: Callable[[], bool],
        unet: nn.Module,
        loss_fn: Any,
        prediction: Optional[Prediction] = None,
    ) -> None:
        super().__init__(recording, unet, loss_fn, prediction)
        self.holdout = holdout
        self._fresh: list[tuple[_Call, torch.Tensor, tuple, torch.Tensor]] = []  # call, fingerprints, shape, check
        self.kept: list[tuple[_Call, list[int], list[int]]] = []  # call, held item positions, their images
        self.resolve_items: Callable[[], None] = lambda: None
        self._forward_seen = False

    def _recording(self) -> bool:
        return (
            self._network_recording()
            and self.holdout.active
            and self.failed is None
            and self.holdout.fingerprints is not None
            and len(self._fresh) < PENDING_CALLS
        )

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._forward_seen = True  # this U-Net's step: its loss is the one to mask
        super()._pre_hook(module, args, kwargs)

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._pending is not None and self._pending.output is None and self._recording():
            self._pending.output = output  # dropped at this step's loss

    def adjust_loss(self, loss: Any) -> Any:
        seen, self._forward_seen = self._forward_seen, False
        return self.holdout.adjust_loss(loss) if seen else loss

    def on_loss(self, target: torch.Tensor, loss_type: Any, huber_c: Any, model_pred: Any = None) -> None:
        pending, self._pending = self._pending, None
        fingerprints = self.holdout.fingerprints
        if pending is None or pending.output is None or not self._recording() or fingerprints is None:
            return
        if target.dim() == 0 or target.shape[0] != fingerprints.shape[0]:
            return
        call = _Call(pending.args, pending.kwargs, pending.autocast, target.detach(), loss_type, huber_c,
                     pending.functions)  # fmt: skip
        with torch.no_grad():  # the family's rebuilt prediction against sd-scripts', checked at the epoch's end
            rebuilt, _ = self.prediction.predict(pending.output, call.args, call.kwargs, call.functions)
            expected = model_pred.detach().float() if isinstance(model_pred, torch.Tensor) else rebuilt.float()
            check = (rebuilt.detach().float() - expected).norm() / expected.norm().clamp_min(1e-30)
        self._fresh.append((call, fingerprints.detach(), self.holdout.shape, check))

    def sort(self, known: dict[tuple, int]) -> None:
        """At the epoch's end (host): keep the recorded calls that hold held items, the newest ``MAX_CALLS``."""
        fresh, self._fresh = self._fresh, []
        if not fresh or self.failed is not None:
            return
        checks = torch.stack([c.reshape(()) for *_, c in fresh]).cpu().tolist()
        prints = torch.cat([fp for _, fp, _, _ in fresh]).cpu().tolist()
        worst = max(checks)
        if not worst <= PREDICTION_TOLERANCE:
            self.failed = f"the rebuilt prediction differs from sd-scripts' by {worst:.3g} (relative)"
            self.kept.clear()
            logger.warning("AC-LoRA: holdout: cannot replay the training calls (%s); no held-out loss", self.failed)
            return
        start = 0
        for call, fp, shape, _ in fresh:
            batch = prints[start : start + fp.shape[0]]
            start += fp.shape[0]
            images = self.holdout.held_images(known, shape, batch)
            positions = [i for i, image in enumerate(images) if image is not None]
            if positions:
                self.kept.append((call, positions, [images[i] for i in positions]))
        del self.kept[:-MAX_CALLS]
        self.calls = [call for call, _, _ in self.kept]

    @property
    def ready(self) -> bool:
        if not self.holdout.active:  # the held images train again: the search no longer judges on them
            self.kept, self.calls = [], []
            return False
        self.resolve_items()
        return bool(self.kept) and self.failed is None

    @property
    def groups(self) -> Optional[torch.Tensor]:
        """The image of each held item ``__call__`` returns (the standard error counts images)."""
        return torch.tensor([image for _, _, images in self.kept for image in images], dtype=torch.long)

    def __call__(self) -> torch.Tensor:
        losses = super().__call__()
        index, start = [], 0
        for call, positions, _ in self.kept:
            index += [start + p for p in positions]
            start += int(call.target.shape[0])
        return losses[torch.tensor(index, dtype=torch.long, device=losses.device)]
