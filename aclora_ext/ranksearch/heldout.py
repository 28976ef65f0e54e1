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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..families.base import Prediction, RecordedCall

logger = logging.getLogger(__name__)

#: validation calls kept (each holds one batch of latents, timesteps, conditioning and target)
MAX_CALLS = 16
#: sd-scripts' validation pass calls the model this many times per batch, one per fixed timestep
#: (train_network.py: linspace(min_timestep, max_timestep, 6)[1:-1]); the items of those calls share the batch's images
CALLS_PER_BATCH = 4
#: the rebuilt prediction may differ from the one sd-scripts compared by this much (relative, Frobenius)
PREDICTION_TOLERANCE = 1e-4

_listeners: "weakref.WeakSet[SdScriptsValidation]" = weakref.WeakSet()


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    autocast: Optional[tuple[str, torch.dtype]]
    target: torch.Tensor
    loss_type: Any
    huber_c: Any
    functions: dict[str, RecordedCall] = field(default_factory=dict)


@dataclass
class _Pending:
    """A denoiser call of the validation pass waiting for its loss."""

    args: tuple
    kwargs: dict
    autocast: Optional[tuple[str, torch.dtype]]
    output: Any = None
    functions: dict[str, RecordedCall] = field(default_factory=dict)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _autocast_state(args: tuple, kwargs: dict) -> Optional[tuple[str, torch.dtype]]:
    """The autocast sd-scripts runs the U-Net under (accelerator.autocast()), for the replay (FLUX.1's
    DiT is called with keywords only)."""
    tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    device_type = tensor.device.type if tensor is not None else "cpu"
    if device_type == "meta":  # no autocast there (the step checked on the meta device, tests/test_meta_step.py)
        return None
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
    if module is None or original is None:
        return None
    if getattr(original, "_aclora_wrapped", False):
        return original.__wrapped__

    @functools.wraps(original)
    def conditional_loss(model_pred, target, loss_type, reduction, huber_c=None):
        for listener in list(_listeners):
            listener.on_loss(target, loss_type, huber_c, model_pred)
        loss = original(model_pred, target, loss_type, reduction, huber_c)
        for listener in list(_listeners):
            loss = listener.adjust_loss(loss)
        return loss

    conditional_loss._aclora_wrapped = True  # type: ignore[attr-defined]
    module.conditional_loss = conditional_loss  # type: ignore[attr-defined]  # sd-scripts' library.train_util
    return original


def _install_function_wrapper(module_name: str, name: str) -> bool:
    """Wrap an sd-scripts function once (module level, looked up at call time like conditional_loss) so that
    recorders see its calls; False when that module is not loaded."""
    module = sys.modules.get(module_name)
    original = getattr(module, name, None)
    if original is None:
        return False
    if getattr(original, "_aclora_wrapped", False):
        return True

    @functools.wraps(original)
    def recorded(*args, **kwargs):
        result = original(*args, **kwargs)
        for listener in list(_listeners):
            listener.on_function(name, original, args, kwargs, result)
        return result

    recorded._aclora_wrapped = True  # type: ignore[attr-defined]
    setattr(module, name, recorded)
    return True


class SdScriptsValidation:
    """Records the calls of sd-scripts' validation pass and replays them as a held-out loss (callable)."""

    def __init__(
        self, recording: Callable[[], bool], unet: nn.Module, loss_fn: Any, prediction: Optional[Prediction] = None
    ) -> None:
        """``recording()``: True while the network is in sd-scripts' validation pass (eval mode) and the
        rank search is not replaying it; ``prediction``: the model family's (default: the output is the
        prediction, as for SD1.x/2.x and SDXL)."""
        self._network_recording = recording
        self.unet = unet
        self.loss_fn = loss_fn
        self.prediction = prediction or Prediction()
        self.calls: list[_Call] = []
        self.complete = False  # one pass recorded: later passes repeat its images, timesteps and noise
        self.failed: Optional[str] = None  # why the recording cannot be used (a rebuilt prediction was wrong)
        self._pending: Optional[_Pending] = None
        self._wanted = {name for _, name in self.prediction.functions}
        self._handles = [
            unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            unet.register_forward_hook(self._post_hook),
        ]
        _listeners.add(self)

    @classmethod
    def attach(
        cls,
        recording: Callable[[], bool],
        unet: Optional[nn.Module],
        expected: bool = False,
        prediction: Optional[Prediction] = None,
    ) -> Optional["SdScriptsValidation"]:
        """A recorder for this network's U-Net, or None outside sd-scripts (its loss function is not
        loaded; said in the log when ``expected``, i.e. sd-scripts' args asked for a validation split)."""
        if unet is None:
            return None
        original = _install_loss_wrapper()
        if original is None:
            if expected:
                logger.info(
                    "AC-LoRA: validation_split is set but sd-scripts' library.train_util.conditional_loss "
                    "is not loaded; the rank search runs without a held-out loss"
                )
            return None
        for module_name, name in prediction.functions if prediction else ():
            _install_function_wrapper(module_name, name)  # a missing one fails the first call's check, loudly
        return cls(recording, unet, original, prediction)

    def _recording(self) -> bool:
        return self._network_recording() and not self.complete and self.failed is None and len(self.calls) < MAX_CALLS

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording():
            self._pending = None
        elif self._pending is None:  # the first call before a loss is the prediction's
            self._pending = _Pending(_detached(args), _detached(kwargs), _autocast_state(args, kwargs))

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._pending is not None and self._pending.output is None and self._recording():
            self._pending.output = output  # validation runs without grad: nothing to detach

    def on_function(self, name: str, function: Callable[..., Any], args: tuple, kwargs: dict, result: Any) -> None:
        """A call of one of the family's functions: kept for the pending denoiser call (its first only)."""
        pending = self._pending
        if (
            pending is not None
            and pending.output is not None
            and name in self._wanted
            and name not in pending.functions
            and self._recording()
        ):
            pending.functions[name] = RecordedCall(function, _detached(args), _detached(kwargs), _detached(result))

    def on_loss(self, target: torch.Tensor, loss_type: Any, huber_c: Any, model_pred: Any = None) -> None:
        """Pair the pending U-Net call with the target sd-scripts compares its prediction with."""
        pending, self._pending = self._pending, None
        if pending is None or pending.output is None or not self._recording():
            return
        call = _Call(
            pending.args,
            pending.kwargs,
            pending.autocast,
            target.detach(),
            loss_type,
            _detached(huber_c),
            pending.functions,
        )
        problem = self._check(call, pending.output, model_pred)
        if problem is not None:
            self.failed = problem
            self.calls.clear()
            logger.warning(
                "AC-LoRA: cannot replay sd-scripts' validation pass (%s); the rank search runs without a held-out loss",
                problem,
            )
            return
        self.calls.append(call)
        if len(self.calls) == 1:
            logger.info("AC-LoRA: recording sd-scripts' validation calls; the product mode chooses ranks on them")

    def adjust_loss(self, loss: Any) -> Any:
        """sd-scripts' loss as the training step goes on with it (unchanged here; see ``holdout.HeldCalls``)."""
        return loss

    def _check(self, call: _Call, output: Any, model_pred: Any) -> Optional[str]:
        """None when the family's rebuilt prediction is what sd-scripts compared, else what is wrong."""
        try:
            rebuilt, _ = self.prediction.predict(output, call.args, call.kwargs, call.functions)
        except Exception as error:  # noqa: BLE001  (a trainer the recipe does not fit: said, not raised)
            return f"the prediction could not be rebuilt from the recorded call: {type(error).__name__}: {error}"
        if not isinstance(model_pred, torch.Tensor):
            return None  # a caller that does not pass the prediction (only tests of older wrappers)
        expected = model_pred.detach().float()
        if not isinstance(rebuilt, torch.Tensor):
            return f"the rebuilt prediction is a {type(rebuilt).__name__}, not a tensor"
        if tuple(rebuilt.shape) != tuple(expected.shape):
            return f"the rebuilt prediction has shape {tuple(rebuilt.shape)}, sd-scripts' {tuple(expected.shape)}"
        difference = float((rebuilt.float() - expected).norm() / expected.norm().clamp_min(1e-30))
        if not difference <= PREDICTION_TOLERANCE:
            return f"the rebuilt prediction differs from sd-scripts' by {difference:.3g} (relative)"
        return None

    def end_pass(self) -> None:
        """sd-scripts set the network back to training: the pass recorded so far is the held-out set."""
        self._pending = None
        self.complete = self.complete or bool(self.calls)

    @property
    def ready(self) -> bool:
        return bool(self.calls) and self.failed is None

    @property
    def groups(self) -> Optional[torch.Tensor]:
        """The image each item of ``__call__`` belongs to, so the held-out standard error counts images, not
        (image, timestep) items: sd-scripts calls the model ``CALLS_PER_BATCH`` times per validation batch,
        in a row. None (items counted as independent) when the recording does not have that shape."""
        sizes = [int(call.target.shape[0]) if call.target.dim() > 0 else 1 for call in self.calls]
        runs = [sizes[i : i + CALLS_PER_BATCH] for i in range(0, len(sizes), CALLS_PER_BATCH)]
        if not runs or len(sizes) % CALLS_PER_BATCH or any(len(set(run)) != 1 for run in runs):
            return None
        groups, first = [], 0
        for run in runs:
            groups += list(range(first, first + run[0])) * CALLS_PER_BATCH
            first += run[0]
        return torch.tensor(groups, dtype=torch.long)

    def __call__(self) -> torch.Tensor:
        """The loss of every recorded validation sample (1-D; its mean is the held-out loss), the calls
        replayed through the U-Net as it is now."""
        losses = []
        prepare_block_swap = getattr(self.unet, "prepare_block_swap_before_forward", None)
        for call in self.calls:
            context = (
                torch.autocast(call.autocast[0], dtype=call.autocast[1]) if call.autocast else contextlib.nullcontext()
            )
            with context:
                output = self.unet(*call.args, **call.kwargs)
            if callable(prepare_block_swap):
                prepare_block_swap()  # no backward follows: ready the swapped blocks for the next forward
            prediction, weighting = self.prediction.predict(output, call.args, call.kwargs, call.functions)
            loss = self.loss_fn(prediction.float(), call.target.float(), call.loss_type, "none", call.huber_c)
            if weighting is not None:
                loss = loss * weighting
            losses.append(loss.reshape(loss.shape[0], -1).mean(dim=1) if loss.dim() > 0 else loss.reshape(1))
        return torch.cat(losses)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        _listeners.discard(self)
