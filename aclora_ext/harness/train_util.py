"""A stand-in for sd-scripts' ``library.train_util``, for the replay (``replay_training(..., sd_library=True)``).

sd-scripts' train_network.py noises each batch's clean latents through
``train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)`` and computes the
per-element loss through ``train_util.conditional_loss(pred, target, loss_type, "none", huber_c)``, both
looked up through the module at call time. A network that wraps those functions (item identities, the
``holdout`` split) finds them here, under the same module name, while the replay runs: the same DDPM
objective as ``sdcalls.training_loss`` (noise then timesteps from the global RNG, L2 loss).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Iterator, Optional

import torch

from .sdcalls import NUM_TRAIN_TIMESTEPS, add_noise

MODULE = "library.train_util"


def get_noise_noisy_latents_and_timesteps(args: Any, noise_scheduler: Any, latents: torch.Tensor):
    """(noise, noisy latents, timesteps), drawn from the global RNG in ``training_loss``'s order."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), device=latents.device)
    return noise, add_noise(latents, noise, timesteps), timesteps


def conditional_loss(
    model_pred: torch.Tensor, target: torch.Tensor, loss_type: str, reduction: str, huber_c: Optional[Any] = None
) -> torch.Tensor:
    """The L2 loss (the only ``loss_type`` the replay uses), with sd-scripts' ``reduction``."""
    if loss_type != "l2":
        raise ValueError(f"loss_type={loss_type!r}; allowed in the replay: 'l2'")
    return torch.nn.functional.mse_loss(model_pred, target, reduction=reduction)


def stand_in() -> types.ModuleType:
    """A fresh module with the two functions (wrappers a network installs go on it, not on this file)."""
    module = types.ModuleType(MODULE, __doc__)
    module.get_noise_noisy_latents_and_timesteps = get_noise_noisy_latents_and_timesteps  # type: ignore[attr-defined]
    module.conditional_loss = conditional_loss  # type: ignore[attr-defined]
    return module


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """``library.train_util`` is the stand-in while the block runs (then what it was before, or nothing)."""
    previous = sys.modules.get(MODULE)
    module = stand_in()
    sys.modules[MODULE] = module
    try:
        yield module
    finally:
        if previous is None:
            sys.modules.pop(MODULE, None)
        else:
            sys.modules[MODULE] = previous
