"""RESTART over a whole network: group modules by shape, run the batched math, write back in place.

The math lives in :mod:`aclora_ext.functional`; this file only batches it:
modules with the same (rank, in, out, device) are stacked and processed in
chunks bounded by a memory budget, in float32 (float64 when float32 fails), and
written back into the existing parameters (the optimizer keeps holding them).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from . import functional as F
from .module import ACLoRAModule

logger = logging.getLogger(__name__)

#: transient memory a RESTART may use per chunk (the factors themselves are small)
CHUNK_BYTES = 256 * 1024 * 1024
#: on a CPU, chunks this small stay in the allocator's cache and the CPU caches
#: (large fresh tensors page-fault on every allocation): ~20-40% faster than CHUNK_BYTES
CPU_CHUNK_BYTES = 32 * 1024 * 1024


@dataclass
class RestartReport:
    """What one RESTART did: the threshold, the loss it came from, and every module's rank."""

    index: int
    epoch: int
    step: int
    p: float
    loss: Optional[float]
    alpha: float
    mode: str
    ranks: dict[str, int]
    max_rank: int
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    p_clamped: bool = False
    applied: bool = True
    reason: str = ""
    p_source: str = "loss"  # "loss" (p = 1 - L^alpha), "fixed_p" or "given"

    def rank_stats(self) -> tuple[int, float, int]:
        values = list(self.ranks.values())
        return min(values), F.median(values), max(values)

    def line(self) -> str:
        """The one log line per RESTART."""
        if not self.applied:
            return f"AC-LoRA RESTART #{self.index} at epoch {self.epoch}, step {self.step}: skipped ({self.reason})"
        lo, mid, hi = self.rank_stats()
        loss = "none seen" if self.loss is None else f"{self.loss:.4f}"
        text = (f"AC-LoRA RESTART #{self.index} at epoch {self.epoch}, step {self.step}: p={self.p:.4f} "
                f"({self._p_origin(loss)}{', clamped' if self.p_clamped else ''}) "
                f"ranks min/median/max {lo}/{mid:g}/{hi} of {self.max_rank} over {len(self.ranks)} modules "
                f"[{self.mode}] in {self.seconds:.2f}s")
        if self.skipped:
            text += f"; {len(self.skipped)} module(s) skipped"
        return text

    def _p_origin(self, loss: str) -> str:
        if self.p_source == "loss":
            return f"from mean loss {loss}, alpha {self.alpha:.2f}"
        return f"{self.p_source}; mean loss {loss}"

    def as_dict(self) -> dict:
        lo, mid, hi = self.rank_stats() if self.ranks else (0, 0.0, 0)
        return {"index": self.index, "epoch": self.epoch, "step": self.step, "p": self.p, "loss": self.loss,
                "alpha": self.alpha, "p_source": self.p_source, "mode": self.mode, "seconds": round(self.seconds, 4), "applied": self.applied,
                "rank_min": lo, "rank_median": mid, "rank_max": hi, "skipped": list(self.skipped)}


def shape_groups(modules: Sequence[ACLoRAModule]) -> dict[tuple, list[int]]:
    """Indices of modules that can be stacked together: same rank, in, out, device."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(modules):
        w = m.lora_down.weight
        groups[(m.rank, m.down_matrix().shape[1], m.out_dim, w.device)].append(i)
    return groups


def chunk_budget(device: torch.device, budget_bytes: Optional[int] = None) -> int:
    """``budget_bytes`` when given, else the default for the device (smaller on a CPU)."""
    if budget_bytes is not None:
        return budget_bytes
    return CPU_CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES


def chunks(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _stack(modules: Sequence[ACLoRAModule], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.stack([m.down_matrix().detach().to(dtype) for m in modules])
    up = torch.stack([m.up_matrix().detach().to(dtype) for m in modules])
    return down, up


def _write_back(modules: Sequence[ACLoRAModule], down: torch.Tensor, up: torch.Tensor) -> None:
    for m, d, u in zip(modules, down, up):
        m.lora_down.weight.data.copy_(d.reshape(m.lora_down.weight.shape))
        m.lora_up.weight.data.copy_(u.reshape(m.lora_up.weight.shape))


MathFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def restart_modules(modules: Sequence[ACLoRAModule], *, mode: str, p: float, energy: str, min_rank: int,
                    seed: int, budget_bytes: Optional[int] = None) -> tuple[list[int], list[str]]:
    """RESTART every module in place; returns (new rank per module, names of skipped modules).

    Skipped modules (non-finite weights, or a decomposition that fails even in
    float64) keep their weights and their previous rank.
    """
    math_fn: MathFn = F.restart_paper if mode == "paper" else F.restart_product
    ranks = [m.rank for m in modules]
    skipped: list[str] = []
    chunk_no = 0
    with torch.no_grad():
        for (rank, cols, rows, device), indices in shape_groups(modules).items():
            size = F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))
            for part in chunks(indices, size):
                chunk_no += 1
                batch = [modules[i] for i in part]
                down, up = _stack(batch, torch.float32)
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
                gen = _generator(down.device, seed * 1_000_003 + chunk_no)
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
                _write_back(batch, new_down, new_up)
                for i, ki in zip(part, k.tolist()):
                    ranks[i] = int(ki)
    return ranks, skipped


def _restart_one_float64(m: ACLoRAModule, math_fn: MathFn, p: float, energy: str, min_rank: int,
                         gen: torch.Generator) -> Optional[int]:
    down, up = _stack([m], torch.float64)
    try:
        new_down, new_up, k = math_fn(down, up, p, energy, min_rank, gen)
        if not bool(F.is_finite(new_down, new_up).all()):
            raise torch.linalg.LinAlgError("non-finite result")
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        logger.warning("AC-LoRA RESTART: decomposition of %s failed in float64 too (%s); module left unchanged",
                       m.lora_name, err)
        return None
    _write_back([m], new_down, new_up)
    return int(k[0])
