"""Variable-rank export: each module's update truncated to its signal rank, as standard kohya keys.

Consumers compute ΔW = alpha / rank * up @ down with rank = down.shape[0] of
*that* module, so a file whose modules have different ranks is an ordinary
LoRA file. We write, per module with signal rank k: the best rank-k
approximation of the training update alpha/R * up @ down (from the SVD of the
factors' R x R core, never of the out x in update), split evenly between
lora_up (out x k) and lora_down (k x in, or conv shapes), and alpha = k * alpha/R
so that alpha/k equals the training scale. No refill noise reaches the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import functional as F
from .module import ACLoRAModule
from .restart import CHUNK_BYTES, chunks, shape_groups


@dataclass
class ExportResult:
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    errors: dict[str, float]  # relative Frobenius error of the truncation, per module
    non_finite: list[str]


def export_modules(modules: Sequence[ACLoRAModule], ranks: Sequence[int], dtype: torch.dtype | None = None,
                   budget_bytes: int = CHUNK_BYTES) -> ExportResult:
    """Truncated factors of every module (float32 math, stored in ``dtype``)."""
    tensors: dict[str, torch.Tensor] = {}
    out_ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    non_finite: list[str] = []
    with torch.no_grad():
        for (rank, cols, rows, _device), indices in shape_groups(modules).items():
            for part in chunks(indices, F.chunk_size(rows, cols, rank, budget_bytes)):
                batch = [modules[i] for i in part]
                down = torch.stack([m.down_matrix().detach().float() for m in batch])
                up = torch.stack([m.up_matrix().detach().float() for m in batch])
                finite = F.is_finite(down, up)
                non_finite += [m.lora_name for m, ok in zip(batch, finite.tolist()) if not ok]
                if not bool(finite.all()):
                    continue
                k = torch.tensor([min(max(int(ranks[i]), 1), rank) for i in part], device=down.device)
                left, s, right = F.product_svd(down, up)
                slots = int(k.max())
                new_down, new_up = F.balanced_factors(left, s, right, k, slots)
                err = F.truncation_error(s, k)
                for j, m in enumerate(batch):
                    kj = int(k[j])
                    _store(tensors, m, new_down[j, :kj], new_up[j, :, :kj], kj, dtype)
                    out_ranks[m.lora_name] = kj
                    errors[m.lora_name] = float(err[j])
    return ExportResult(tensors, out_ranks, errors, non_finite)


def _store(tensors: dict, m: ACLoRAModule, down: torch.Tensor, up: torch.Tensor, k: int,
           dtype: torch.dtype | None) -> None:
    """Write one module's keys with the original layer's shapes (conv kernels restored)."""
    down_shape = (k,) + tuple(m.lora_down.weight.shape[1:])
    up_shape = (m.out_dim, k) + tuple(m.lora_up.weight.shape[2:])
    dtype = dtype or m.lora_down.weight.dtype
    tensors[f"{m.lora_name}.lora_down.weight"] = down.reshape(down_shape).to("cpu", dtype)
    tensors[f"{m.lora_name}.lora_up.weight"] = up.reshape(up_shape).to("cpu", dtype)
    tensors[f"{m.lora_name}.alpha"] = torch.tensor(m.scale * k).to(dtype)


def raw_modules(modules: Sequence[ACLoRAModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The training factors as they are (maximum rank, refill noise included): the full-rank file."""
    tensors = {}
    for m in modules:
        dt = dtype or m.lora_down.weight.dtype
        tensors[f"{m.lora_name}.lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dt)
        tensors[f"{m.lora_name}.lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dt)
        tensors[f"{m.lora_name}.alpha"] = m.alpha.detach().to("cpu", dt)
    return tensors
