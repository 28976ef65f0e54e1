"""Variable-rank export: each module's update truncated to its signal rank, as standard kohya keys.

Consumers compute ΔW = alpha / rank * up @ down with rank = down.shape[0] of
*that* module, so a file whose modules have different ranks is an ordinary
LoRA file. We write, per module with signal rank k: the best rank-k
approximation of the training update alpha/R * up @ down (from the SVD of the
factors' R x R core, never of the out x in update), split evenly between
lora_up (out x k) and lora_down (k x in, or conv shapes). No refill noise
reaches the file.

Every module gets the same ``alpha`` (the most common training alpha); the
module's own factor k * (alpha_m/R_m) / alpha is folded into the factors, so
alpha/k * up @ down is the truncated training update. kohya's resize_lora
writes alpha = k * alpha/R instead, but diffusers (0.42) applies one alpha to
every module whose alpha is not the file's most common one: its alpha_pattern
keys do not match the peft module names. A single alpha is read the same way by
every consumer.

One rank layout is padded (``pad_lone_ranks``): diffusers 0.32 (sd-scripts' pin)
with peft loads a kohya FLUX.1 file whose modules of one model part all have the
same rank but one at a wrong scale (the odd module, or all the others); that one
module is stored at the common rank with zero rows and columns instead.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import functional as F
from .batching import Batch, decompose_in_batches
from .module import ACLoRAModule


@dataclass
class ExportResult:
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    errors: dict[str, float]  # relative Frobenius error of the truncation, per module
    non_finite: list[str]
    padded: dict[str, int]  # modules stored at a higher rank than they have (pad_lone_ranks): their rank


def export_modules(
    modules: Sequence[ACLoRAModule],
    keeps: Sequence[int | torch.Tensor],
    dtype: torch.dtype | None = None,
    budget_bytes: Optional[int] = None,
    pad: bool = True,
) -> ExportResult:
    """Truncated factors of every module (float32 math, stored in ``dtype``).

    ``keeps[i]``: module i's rank (its leading components), or a (R,) bool mask
    over the components of its update in descending order of singular value
    (the product mode's choice, which need not be a prefix). ``pad``: store a
    part's lone odd rank at the common one (``pad_lone_ranks``).
    """
    tensors: dict[str, torch.Tensor] = {}  # float32 until every module is in (padding), then ``dtype``
    out_ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    alpha = file_alpha(modules, dtype)

    def export(batch: Batch) -> None:
        rank = batch.modules[0].rank
        keep = torch.stack([_keep_mask(keeps[i], rank) for i in batch.indices]).to(batch.down.device)
        counts = keep.sum(dim=1).tolist()
        s, to_up, to_down = F.product_core(batch.down, batch.up)
        new_down, new_up = F.component_factors(batch.down, batch.up, s, to_up, to_down, keep, int(max(counts)))
        err = F.truncation_error(s, keep)
        if not bool(F.is_finite(new_down, new_up).all()):
            raise torch.linalg.LinAlgError("non-finite result")
        for j, m in enumerate(batch.modules):
            kj = int(counts[j])
            gain = math.sqrt(kj * m.scale / alpha)  # alpha/k * up @ down == scale * (rank-k part)
            _store(tensors, m, new_down[j, :kj] * gain, new_up[j, :, :kj] * gain, kj, alpha)
            out_ranks[m.lora_name] = kj
            errors[m.lora_name] = float(err[j])

    with torch.no_grad():
        skipped = decompose_in_batches(modules, export, what="export", left="not exported", budget_bytes=budget_bytes)
    non_finite = skipped.names  # the save refuses a file that would lack them
    padded = pad_lone_ranks(tensors) if pad else {}
    out_ranks.update({name: int(tensors[f"{name}.lora_down.weight"].shape[0]) for name in padded})
    return ExportResult(_cast(tensors, modules, dtype), out_ranks, errors, non_finite, padded)


def _keep_mask(keep: int | torch.Tensor, rank: int) -> torch.Tensor:
    """A (rank,) bool mask: a given mask (at least one component), or the first k components (1 <= k <= rank)."""
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
        mask = keep.clone()
        if not bool(mask.any()):
            mask[0] = True
        return mask
    return torch.arange(rank) < min(max(int(keep), 1), rank)


def file_alpha(modules: Sequence[ACLoRAModule], dtype: torch.dtype | None = None) -> float:
    """The one alpha written for every module: the most common training alpha, as the file stores it."""
    value = Counter(float(m.alpha) for m in modules).most_common(1)[0][0]
    stored = dtype or modules[0].lora_down.weight.dtype
    return float(torch.tensor(value).to(stored))


def _store(tensors: dict, m: ACLoRAModule, down: torch.Tensor, up: torch.Tensor, k: int, alpha: float) -> None:
    """Write one module's keys (float32, on the CPU) with the original layer's shapes (conv kernels restored)."""
    down_shape = (k,) + tuple(m.lora_down.weight.shape[1:])
    up_shape = (m.out_dim, k) + tuple(m.lora_up.weight.shape[2:])
    tensors[f"{m.lora_name}.lora_down.weight"] = down.reshape(down_shape).to("cpu", torch.float32)
    tensors[f"{m.lora_name}.lora_up.weight"] = up.reshape(up_shape).to("cpu", torch.float32)
    tensors[f"{m.lora_name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)


def _cast(
    tensors: dict[str, torch.Tensor], modules: Sequence[ACLoRAModule], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Every tensor in ``dtype`` (None: its module's training dtype)."""
    dtypes = {m.lora_name: dtype or m.lora_down.weight.dtype for m in modules}
    return {
        key: value.to(dtypes[key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]])
        for key, value in tensors.items()
    }


def raw_modules(
    modules: Sequence[ACLoRAModule], dtype: torch.dtype | None = None, pad: bool = True
) -> dict[str, torch.Tensor]:
    """The training factors as they are (maximum rank, refill noise included): the full-rank file
    (padded as ``pad_lone_ranks`` says)."""
    tensors = {}
    for m in modules:
        tensors[f"{m.lora_name}.lora_down.weight"] = m.lora_down.weight.detach().to("cpu", torch.float32)
        tensors[f"{m.lora_name}.lora_up.weight"] = m.lora_up.weight.detach().to("cpu", torch.float32)
        tensors[f"{m.lora_name}.alpha"] = m.alpha.detach().to("cpu", torch.float32)
    if pad:
        pad_lone_ranks(tensors)
    return _cast(tensors, modules, dtype)


#: the model parts diffusers loads (and counts ranks in) one at a time: kohya's U-Net/DiT and text-encoder prefixes
_PART = re.compile(r"^(lora_unet|lora_te\d*)_")


def pad_lone_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Make a model part whose modules have one rank but one uniform, by zero-padding (in place, float32).

    diffusers 0.32 (sd-scripts' pinned release) with peft reads a kohya FLUX.1 file in which exactly one
    module's rank differs from the most common rank at a wrong scale (the odd module, or every other,
    depending on which module it lists first); with two or more differing ranks it is right. Per part
    (``lora_unet``, ``lora_te``, ``lora_te1`` ...: diffusers loads each on its own), when exactly one
    module's rank differs from the others', the lower-rank module(s) are stored at the higher rank: zero
    rows in lora_down, zero columns in lora_up, lora_up scaled by new/old rank and alpha unchanged, so
    alpha/rank * up @ down is the same update. Returns {module: its rank before padding}.
    """
    parts: dict[str, dict[str, int]] = {}
    for key, value in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            match = _PART.match(name)
            if match:
                parts.setdefault(match[1], {})[name] = int(value.shape[0])
    padded: dict[str, int] = {}
    for ranks in parts.values():
        counts = Counter(ranks.values())
        if len(counts) != 2 or min(counts.values()) != 1:
            continue
        target = max(counts)
        for name, rank in ranks.items():
            if rank < target:
                _pad(tensors, name, rank, target)
                padded[name] = rank
    return padded


def _pad(tensors: dict[str, torch.Tensor], name: str, rank: int, target: int) -> None:
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    zeros_down = torch.zeros((target - rank,) + tuple(down.shape[1:]), dtype=down.dtype)
    zeros_up = torch.zeros((up.shape[0], target - rank) + tuple(up.shape[2:]), dtype=up.dtype)
    tensors[f"{name}.lora_down.weight"] = torch.cat([down, zeros_down])
    tensors[f"{name}.lora_up.weight"] = torch.cat([up.float() * (target / rank), zeros_up.float()], dim=1).to(up.dtype)
