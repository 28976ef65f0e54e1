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
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import functional as F
from .batching import chunk_budget, chunks, shape_groups
from .module import ACLoRAModule


@dataclass
class ExportResult:
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    errors: dict[str, float]  # relative Frobenius error of the truncation, per module
    non_finite: list[str]


def export_modules(modules: Sequence[ACLoRAModule], keeps: Sequence[int | torch.Tensor],
                   dtype: torch.dtype | None = None, budget_bytes: Optional[int] = None) -> ExportResult:
    """Truncated factors of every module (float32 math, stored in ``dtype``).

    ``keeps[i]``: module i's rank (its leading components), or a (R,) bool mask
    over the components of its update in descending order of singular value
    (the product mode's choice, which need not be a prefix).
    """
    tensors: dict[str, torch.Tensor] = {}
    out_ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    non_finite: list[str] = []
    alpha = file_alpha(modules, dtype)
    with torch.no_grad():
        for (rank, cols, rows, device), indices in shape_groups(modules).items():
            for part in chunks(indices, F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))):
                batch = [modules[i] for i in part]
                down = torch.stack([m.down_matrix().detach().float() for m in batch])
                up = torch.stack([m.up_matrix().detach().float() for m in batch])
                finite = F.is_finite(down, up)
                non_finite += [m.lora_name for m, ok in zip(batch, finite.tolist()) if not ok]
                if not bool(finite.all()):
                    continue
                keep = torch.stack([_keep_mask(keeps[i], rank) for i in part]).to(down.device)
                counts = keep.sum(dim=1).tolist()
                s, to_up, to_down = F.product_core(down, up)
                new_down, new_up = F.component_factors(down, up, s, to_up, to_down, keep, int(max(counts)))
                err = F.truncation_error(s, keep)
                for j, m in enumerate(batch):
                    kj = int(counts[j])
                    gain = math.sqrt(kj * m.scale / alpha)  # alpha/k * up @ down == scale * (rank-k part)
                    _store(tensors, m, new_down[j, :kj] * gain, new_up[j, :, :kj] * gain, kj, alpha, dtype)
                    out_ranks[m.lora_name] = kj
                    errors[m.lora_name] = float(err[j])
    return ExportResult(tensors, out_ranks, errors, non_finite)


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


def _store(tensors: dict, m: ACLoRAModule, down: torch.Tensor, up: torch.Tensor, k: int, alpha: float,
           dtype: torch.dtype | None) -> None:
    """Write one module's keys with the original layer's shapes (conv kernels restored)."""
    down_shape = (k,) + tuple(m.lora_down.weight.shape[1:])
    up_shape = (m.out_dim, k) + tuple(m.lora_up.weight.shape[2:])
    dtype = dtype or m.lora_down.weight.dtype
    tensors[f"{m.lora_name}.lora_down.weight"] = down.reshape(down_shape).to("cpu", dtype)
    tensors[f"{m.lora_name}.lora_up.weight"] = up.reshape(up_shape).to("cpu", dtype)
    tensors[f"{m.lora_name}.alpha"] = torch.tensor(alpha).to(dtype)


def raw_modules(modules: Sequence[ACLoRAModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The training factors as they are (maximum rank, refill noise included): the full-rank file."""
    tensors = {}
    for m in modules:
        dt = dtype or m.lora_down.weight.dtype
        tensors[f"{m.lora_name}.lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dt)
        tensors[f"{m.lora_name}.lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dt)
        tensors[f"{m.lora_name}.alpha"] = m.alpha.detach().to("cpu", dt)
    return tensors
