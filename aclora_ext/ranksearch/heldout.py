"""The held-out loss of sd-scripts' validation passes, for the product mode's rank search.

With a validation split (``--validation_split``, or ``validation_split`` in
the dataset config), sd-scripts keeps a share of the training images
out of training and, every epoch (or every ``--validate_every_n_steps``), runs
them through the model between ``network.eval()`` and ``network.train()``, with
a fixed seed: the same images, timesteps and noise every time. It computes that
loss itself and never hands it to the network. So we record the pass once: a
forward pre-hook on the U-Net keeps each call's inputs, and a wrapper around
``library.train_util.conditional_loss`` (the function sd-scripts compares the
prediction with its target through) keeps the target, the loss type and
huber_c of the same call. Replaying those calls with the network's candidate
configurations gives the held-out loss of each, on the same images, timesteps
and noise. The text conditioning is replayed as recorded: text-encoder modules
are judged by their importance against the U-Net's threshold, not by a replay.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: validation calls kept (each holds one batch of latents, timesteps, conditioning and target)
MAX_CALLS = 16

_listeners: "weakref.WeakSet[SdScriptsValidation]" = weakref.WeakSet()


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    autocast: Optional[tuple[str, torch.dtype]]
    target: torch.Tensor
    loss_type: Any
    huber_c: Any


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _autocast_state(args: tuple) -> Optional[tuple[str, torch.dtype]]:
    """The autocast sd-scripts runs the U-Net under (accelerator.autocast()), for the replay."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device_type = tensor.device.type if tensor is not None else "cpu"
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    elif device_type == "cuda":
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    else:
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return (device_type, dtype) if enabled else None


def _install_loss_wrapper() -> Optional[Any]:
    """Wrap sd-scripts' conditional_loss once (module level) so that recorders see validation calls.

    Returns the original function, or None when sd-scripts' library is not loaded.
    """
    module = sys.modules.get("library.train_util")
    original = getattr(module, "conditional_loss", None)
    if original is None:
        return None
    if getattr(original, "_aclora_wrapped", False):
        return original.__wrapped__

    @functools.wraps(original)
    def conditional_loss(model_pred, target, loss_type, reduction, huber_c=None):
        for listener in list(_listeners):
            listener.on_loss(target, loss_type, huber_c)
        return original(model_pred, target, loss_type, reduction, huber_c)

    conditional_loss._aclora_wrapped = True  # type: ignore[attr-defined]
    module.conditional_loss = conditional_loss
    return original


class SdScriptsValidation:
    """Records the calls of sd-scripts' validation pass and replays them as a held-out loss (callable)."""

    def __init__(self, recording: Callable[[], bool], unet: nn.Module, loss_fn: Any) -> None:
        """``recording()``: True while the network is in sd-scripts' validation pass (eval mode) and the
        rank search is not replaying it."""
        self._network_recording = recording
        self.unet = unet
        self.loss_fn = loss_fn
        self.calls: list[_Call] = []
        self.complete = False  # one pass recorded: later passes repeat its images, timesteps and noise
        self._pending: Optional[tuple] = None
        self._handle = unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        _listeners.add(self)

    @classmethod
    def attach(cls, recording: Callable[[], bool], unet: Optional[nn.Module], expected: bool = False
               ) -> Optional["SdScriptsValidation"]:
        """A recorder for this network's U-Net, or None outside sd-scripts (its loss function is not
        loaded; said in the log when ``expected``, i.e. sd-scripts' args asked for a validation split)."""
        if unet is None:
            return None
        original = _install_loss_wrapper()
        if original is None:
            if expected:
                logger.info("AC-LoRA: validation_split is set but sd-scripts' library.train_util.conditional_loss "
                            "is not loaded; the rank search runs without a held-out loss")
            return None
        return cls(recording, unet, original)

    def _recording(self) -> bool:
        return self._network_recording() and not self.complete and len(self.calls) < MAX_CALLS

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending = (_detached(args), _detached(kwargs), _autocast_state(args)) if self._recording() else None

    def on_loss(self, target: torch.Tensor, loss_type: Any, huber_c: Any) -> None:
        """Pair the pending U-Net call with the target sd-scripts compares its prediction with."""
        pending, self._pending = self._pending, None
        if pending is None or not self._recording():
            return
        self.calls.append(_Call(pending[0], pending[1], pending[2], target.detach(), loss_type, _detached(huber_c)))
        if len(self.calls) == 1:
            logger.info("AC-LoRA: recording sd-scripts' validation calls; the product mode chooses ranks on them")

    def end_pass(self) -> None:
        """sd-scripts set the network back to training: the pass recorded so far is the held-out set."""
        self._pending = None
        self.complete = self.complete or bool(self.calls)

    @property
    def ready(self) -> bool:
        return bool(self.calls)

    def __call__(self) -> torch.Tensor:
        """The loss of every recorded validation sample (1-D; its mean is the held-out loss), the calls
        replayed through the U-Net as it is now."""
        losses = []
        for call in self.calls:
            context = torch.autocast(call.autocast[0], dtype=call.autocast[1]) if call.autocast \
                else contextlib.nullcontext()
            with context:
                output = self.unet(*call.args, **call.kwargs)
            prediction = getattr(output, "sample", output)
            if isinstance(prediction, (tuple, list)):
                prediction = prediction[0]
            loss = self.loss_fn(prediction.float(), call.target.float(), call.loss_type, "none", call.huber_c)
            losses.append(loss.reshape(loss.shape[0], -1).mean(dim=1) if loss.dim() > 0 else loss.reshape(1))
        return torch.cat(losses)

    def remove(self) -> None:
        self._handle.remove()
        _listeners.discard(self)
