"""Reading and checking the input of ``aclora resize``: a kohya LoRA/LoCon state dict, its modules."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ...files.lora_dict import group_modules, module_alpha
from ...files.storage import LoRAFileError

# keys of adapters that are not a plain LoRA/LoCon (matched on the key's dot-separated tail), and what they are
FOREIGN_FORMATS = tuple(
    (re.compile(pattern), what)
    for pattern, what in (
        (r"(^|\.)dora_scale$", "a DoRA file (dora_scale keys: a per-channel magnitude that is not a low-rank update)"),
        (r"(^|\.)hada_(w[12]_[ab]|t[12])$", "a LyCORIS LoHa file (hada_* keys)"),
        (r"(^|\.)lokr_(w[12](_[ab])?|t[12])$", "a LyCORIS LoKr file (lokr_* keys)"),
        (r"(^|\.)lora_mid\.weight$", "a LyCORIS LoCon file with Tucker decomposition (lora_mid keys)"),
        (r"(^|\.)oft_(blocks|diag)$", "an OFT/BOFT file (oft_blocks / oft_diag keys)"),
        (r"(^|\.)[ab][12]\.weight$", "a LyCORIS GLoRA file (a1/a2/b1/b2 keys)"),
        (r"(^|\.)diff(_b)?$", "a LyCORIS full file (diff keys: whole weight differences)"),
        (r"(^|\.)on_input$", "a LyCORIS (IA)^3 file (on_input keys)"),
        (r"(^|\.)[wb]_norm$", "a LyCORIS file with trained norm layers (w_norm/b_norm keys)"),
        (
            r"(^|\.)lora_[AB](\.default)?(\.weight)?$",
            "a diffusers/peft-format LoRA (lora_A/lora_B keys), not kohya format",
        ),
        (r"(^|\.|_)lora\.(down|up)\.weight$", "a diffusers-format LoRA (lora.down/lora.up keys), not kohya format"),
        (
            r"(^|\.)lora_linear_layer\.(down|up)\.weight$",
            "a diffusers-format LoRA (lora_linear_layer keys), not kohya format",
        ),
    )
)


def check_kohya_lora(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The modules of a plain kohya LoRA/LoCon state dict, or LoRAFileError saying why it is not one."""
    for key in tensors:
        for pattern, what in FOREIGN_FORMATS:
            if pattern.search(key):
                raise LoRAFileError(
                    f"{source}: {what}, e.g. {key!r}; aclora resize reads plain LoRA/LoCon files "
                    "(lora_down / lora_up / alpha) only"
                )
    if not any(key.endswith((".lora_down.weight", ".lora_up.weight")) for key in tensors):
        example = f"; it has e.g. {next(iter(tensors))!r}" if tensors else " (it has no tensors)"
        raise LoRAFileError(
            f"{source}: not a LoRA file: none of its {len(tensors)} tensors is a kohya LoRA key "
            f"(<module>.lora_down.weight / .lora_up.weight / .alpha){example}"
        )
    modules = group_modules(tensors, source)
    for name, parts in modules.items():
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.shape[0] == 0:
            raise LoRAFileError(f"{source}: module {name} has rank 0 (lora_down {tuple(down.shape)})")
        if down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoRAFileError(
                f"{source}: module {name} has a {up.shape[2]}x{up.shape[3]} lora_up kernel; "
                "a kohya LoCon module has a 1x1 lora_up"
            )
        if not down.dtype.is_floating_point or not up.dtype.is_floating_point:
            raise LoRAFileError(f"{source}: module {name} has {down.dtype}/{up.dtype} factors; expected floating point")
        if "alpha" in parts:
            alpha = float(parts["alpha"])
            if not math.isfinite(alpha):
                raise LoRAFileError(f"{source}: NaN/Inf weights: module {name} has alpha {alpha}")
            if alpha == 0:
                raise LoRAFileError(
                    f"{source}: module {name} has alpha 0, which consumers read differently "
                    "(sd-scripts as alpha = rank, ComfyUI and diffusers as a zero update)"
                )
    return modules


@dataclass
class _Module:
    name: str
    index: int
    down: torch.Tensor  # (R, in) view, conv kernels flattened
    up: torch.Tensor  # (out, R) view
    down_shape: tuple
    up_shape: tuple
    rank: int
    alpha: float
    conv: bool

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def kind(self) -> str:
        if not self.conv:
            return "linear"
        return "conv1x1" if self.down_shape[2:] == (1, 1) else "conv3x3"

    @property
    def size(self) -> int:
        """Length of the update's full spectrum, min(out, in), as resize_lora sees it."""
        return min(self.up.shape[0], self.down.shape[1])


def _modules(tensors: Mapping[str, torch.Tensor], source: str) -> list[_Module]:
    grouped = check_kohya_lora(tensors, source)
    out = []
    for i, (name, parts) in enumerate(grouped.items()):
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = int(down.shape[0])
        out.append(
            _Module(
                name,
                i,
                down.reshape(rank, -1),
                up.reshape(up.shape[0], rank),
                tuple(down.shape),
                tuple(up.shape),
                rank,
                module_alpha(parts),
                down.dim() == 4,
            )
        )
    return out
