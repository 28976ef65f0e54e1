"""The paper-mode RESTART over many modules: the batched math of ``functional.paper`` applied in place,
in float32 (float64 one by one when float32 fails), skipping modules with non-finite weights."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from .. import functional as F
from .batching import chunk_budget, chunks, generator, shape_groups, stack, write_back
from .module import ACLoRAModule

logger = logging.getLogger(__name__)


MathFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def restart_modules(modules: Sequence[ACLoRAModule], *, p: float, energy: str, min_rank: int,
                    seed: int, budget_bytes: Optional[int] = None) -> tuple[list[int], list[str]]:
    """Paper-mode RESTART of every module in place; returns (new rank per module, names of skipped modules).

    Skipped modules (non-finite weights, or a decomposition that fails even in
    float64) keep their weights and their previous rank.
    """
    math_fn: MathFn = F.restart_paper
    ranks = [m.rank for m in modules]
    skipped: list[str] = []
    chunk_no = 0
    with torch.no_grad():
        for (rank, cols, rows, device), indices in shape_groups(modules).items():
            size = F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))
            for part in chunks(indices, size):
                chunk_no += 1
                batch = [modules[i] for i in part]
                down, up = stack(batch, torch.float32)
                finite = F.is_finite(down, up)
                if not bool(finite.all()):
                    bad = [batch[j].lora_name for j in range(len(batch)) if not bool(finite[j])]
                    logger.warning("AC-LoRA RESTART: non-finite weights, module(s) left unchanged: %s", ", ".join(bad))
                    skipped += bad
                    keep = finite.nonzero().flatten().tolist()
                    part = [part[j] for j in keep]
                    batch = [batch[j] for j in keep]
                    if not batch:
                        continue
                    down, up = down[keep], up[keep]
                gen = generator(down.device, seed * 1_000_003 + chunk_no)
                try:
                    new_down, new_up, k = math_fn(down, up, p, energy, min_rank, gen)
                    ok = F.is_finite(new_down, new_up)
                    if not bool(ok.all()):
                        raise torch.linalg.LinAlgError("non-finite result")
                except (torch.linalg.LinAlgError, RuntimeError) as err:
                    logger.warning("AC-LoRA RESTART: float32 decomposition failed for %d module(s) (%s); "
                                   "retrying one by one in float64", len(batch), err)
                    for i, m in zip(part, batch):
                        result = _restart_one_float64(m, math_fn, p, energy, min_rank, gen)
                        if result is None:
                            skipped.append(m.lora_name)
                        else:
                            ranks[i] = result
                    continue
                write_back(batch, new_down, new_up)
                for i, ki in zip(part, k.tolist()):
                    ranks[i] = int(ki)
    return ranks, skipped


def _restart_one_float64(m: ACLoRAModule, math_fn: MathFn, p: float, energy: str, min_rank: int,
                         gen: torch.Generator) -> Optional[int]:
    down, up = stack([m], torch.float64)
    try:
        new_down, new_up, k = math_fn(down, up, p, energy, min_rank, gen)
        if not bool(F.is_finite(new_down, new_up).all()):
            raise torch.linalg.LinAlgError("non-finite result")
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        logger.warning("AC-LoRA RESTART: decomposition of %s failed in float64 too (%s); module left unchanged",
                       m.lora_name, err)
        return None
    write_back([m], new_down, new_up)
    return int(k[0])

