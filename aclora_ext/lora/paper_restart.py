"""The paper-mode RESTART over many modules: the batched math of ``functional.paper`` applied in place,
in float32 (float64 one by one when float32 fails), skipping modules with non-finite weights."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import functional as F
from .batching import Batch, decompose_in_batches, generator, write_back
from .module import ACLoRAModule

MathFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def restart_modules(
    modules: Sequence[ACLoRAModule],
    *,
    p: float,
    energy: str,
    min_rank: int,
    seed: int,
    budget_bytes: Optional[int] = None,
) -> tuple[list[int], list[str]]:
    """Paper-mode RESTART of every module in place; returns (new rank per module, names of skipped modules).

    Skipped modules (non-finite weights, or a decomposition that fails even in
    float64) keep their weights and their previous rank.
    """
    math_fn: MathFn = F.restart_paper
    ranks = [m.rank for m in modules]
    generators: dict[int, torch.Generator] = {}  # one per chunk, kept for its float64 retries

    def restart(batch: Batch) -> None:
        gen = generators.setdefault(batch.number, generator(batch.down.device, seed * 1_000_003 + batch.number))
        new_down, new_up, k = math_fn(batch.down, batch.up, p, energy, min_rank, gen)
        if not bool(F.is_finite(new_down, new_up).all()):
            raise torch.linalg.LinAlgError("non-finite result")
        write_back(batch.modules, new_down, new_up)
        for i, ki in zip(batch.indices, k.tolist()):
            ranks[i] = int(ki)

    with torch.no_grad():
        skipped = decompose_in_batches(modules, restart, what="RESTART", budget_bytes=budget_bytes)
    return ranks, skipped.names
