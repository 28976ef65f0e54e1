"""The per-layer adapter: one LoRA module hooked into one Linear or Conv2d.

Same parameters, buffer and forward as kohya's networks.lora ``LoRAModule``
(``lora_down``, ``lora_up``, ``alpha``; y = W0 x + multiplier * alpha/r *
up(down(x))), so state dicts are interchangeable. The original module stays in
the model; only its ``forward`` is replaced.

The forward reads no tensor back to the host: on a GPU every such read
(``.item()``, ``float(t)``, ``bool(t)``) waits for the device, and a U-Net
forward runs it once per module. So the scale is a Python float kept beside the
``alpha`` buffer (which files and ``--save_state`` carry), and the module
dropout is drawn on the CPU.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, cast

import torch
from torch import nn


def is_targetable(layer: nn.Module) -> bool:
    """Linear, or Conv2d without groups (LoRA on grouped convs has no standard file form)."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1


def effective_alpha(alpha: Optional[float], rank: int) -> float:
    """alpha as networks.lora reads it: None or 0 means the rank (scale 1)."""
    return float(rank) if alpha is None or float(alpha) == 0 else float(alpha)


class ACLoRAModule(nn.Module):
    """LoRA factors for one layer, at rank ``rank`` (the module's maximum rank R while training)."""

    lora_down: nn.Conv2d | nn.Linear
    lora_up: nn.Conv2d | nn.Linear
    alpha: torch.Tensor  # a buffer
    slot_mask: Optional[torch.Tensor]  # a buffer
    _org_forward: Optional[Callable[..., Any]]

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        rank: int,
        alpha: Optional[float],
        multiplier: float = 1.0,
        dropout: Optional[float] = None,
        rank_dropout: Optional[float] = None,
        module_dropout: Optional[float] = None,
    ) -> None:
        super().__init__()
        if not is_targetable(org_module):
            raise TypeError(f"{lora_name}: cannot attach a LoRA to {type(org_module).__name__}")
        self.lora_name = lora_name
        self.rank = int(rank)
        if isinstance(org_module, nn.Conv2d):
            self.is_conv = True
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            conv = cast(Any, org_module)  # its kernel_size/stride/padding/dilation are 2-tuples, as typed below
            self.lora_down = nn.Conv2d(
                in_dim, rank, conv.kernel_size, conv.stride, conv.padding, dilation=conv.dilation, bias=False
            )
            self.lora_up = nn.Conv2d(rank, out_dim, (1, 1), (1, 1), bias=False)
        else:
            self.is_conv = False
            linear = cast(nn.Linear, org_module)  # is_targetable: a Linear when not a Conv2d
            in_dim, out_dim = linear.in_features, linear.out_features
            self.lora_down = nn.Linear(in_dim, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_dim, bias=False)
        self.in_dim, self.out_dim = in_dim, out_dim
        alpha = effective_alpha(alpha, self.rank)
        self.register_buffer("alpha", torch.tensor(alpha))
        self._alpha = alpha  # the buffer's value as a Python number (set_alpha and loading keep them equal)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        # slots held out of the forward after a held-out cut: 1 in use, 0 held; None: all in
        # use. A buffer, so it follows the module to its device; not persistent (the network's state keeps it)
        self.register_buffer("slot_mask", None, persistent=False)
        # A plain list keeps the original layer out of this module's children and state_dict.
        self._org = [org_module]
        self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def scale(self) -> float:
        """alpha / rank, from Python numbers: follows ``rank`` and ``set_alpha`` without touching a tensor."""
        return self._alpha / self.rank

    @property
    def alpha_value(self) -> float:
        """The alpha the scale uses (the buffer's value, read when it was set or loaded)."""
        return self._alpha

    def set_alpha(self, alpha: Optional[float]) -> None:
        """Change alpha: the buffer (what files and states carry) and the scale together (None or 0: the rank)."""
        value = effective_alpha(alpha, self.rank)
        with torch.no_grad():
            self.alpha.fill_(value)
        self._alpha = value

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: D401 - torch hook
        """load_state_dict (--resume, accelerate's load_state) sets the buffer: the scale follows it here."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        value = state_dict.get(prefix + "alpha")
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
            self._alpha = effective_alpha(float(value), self.rank)  # once per load, never per step

    def apply_to(self) -> None:
        """Route the original layer's forward through this module (idempotent)."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def remove(self) -> None:
        """Give the original layer its own forward back."""
        if self._org_forward is not None:
            self.org_module.forward = self._org_forward
            self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._org_forward(x)  # type: ignore[misc]  # set by apply_to, before any forward
        if not self.enabled or self.multiplier == 0:
            return base
        # drawn on the CPU (reading a CPU tensor does not wait for the device), like networks.lora
        if self.module_dropout and self.training and torch.rand((), device="cpu").item() < self.module_dropout:
            return base
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.slot_mask is not None:
            hidden = hidden * self.slot_mask.to(hidden.dtype)
        if self.dropout and self.training:
            hidden = nn.functional.dropout(hidden, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            mask = torch.rand((hidden.size(0), self.rank), device=hidden.device) > self.rank_dropout
            if hidden.dim() == 3:
                mask = mask.unsqueeze(1)
            elif hidden.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            hidden = hidden * mask.to(hidden.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return base + (self.lora_up(hidden) * (self.multiplier * scale)).to(base.dtype)

    # --- slots held out of training ----------------------------------------------
    def hold_slots(self, held: Optional[torch.Tensor]) -> None:
        """Take the slots marked in ``held`` (bool (rank,)) out of the forward for good (None: none held).

        A held slot adds nothing and gets no gradient, so the module trains at its kept rank; its lora_up
        column is zeroed, so the update up @ down (what RESTARTs analyse and files store) is the function
        the module computes. The mask is multiplied in on the device: no host read in the forward."""
        if held is None or not bool(held.any()):
            self.slot_mask = None
            return
        keep = (~held.to(self.lora_up.weight.device)).to(torch.float32)
        self.slot_mask = keep.view(-1, 1, 1) if self.is_conv else keep
        self.clear_held()

    def clear_held(self) -> None:
        """Zero the lora_up columns of held slots (weight decay and momentum may have moved them; they never
        reach the output, but the factors' product must not carry them)."""
        if self.slot_mask is None:
            return
        with torch.no_grad():
            keep = self.slot_mask.flatten().to(self.lora_up.weight.dtype)
            self.lora_up.weight.mul_(keep.view((1, -1) + (1,) * (self.lora_up.weight.dim() - 2)))

    @property
    def held(self) -> Optional[torch.Tensor]:
        """bool (rank,) on the CPU: the held slots (None: none)."""
        return None if self.slot_mask is None else (self.slot_mask.flatten() == 0).cpu()

    # --- matrices ---------------------------------------------------------------
    def down_matrix(self) -> torch.Tensor:
        """lora_down as an (r, in * kh * kw) matrix (a view)."""
        return self.lora_down.weight.reshape(self.rank, -1)

    def up_matrix(self) -> torch.Tensor:
        """lora_up as an (out, r) matrix (a view)."""
        return self.lora_up.weight.reshape(self.out_dim, self.rank)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """multiplier-free update alpha/r * up @ down, shaped like the original weight."""
        delta = self.up_matrix().to(dtype) @ self.down_matrix().to(dtype) * self.scale
        return delta.reshape(cast(torch.Tensor, self.org_module.weight).shape)
