"""Operations batched over many LoRA modules: modules of one shape are stacked and processed in
chunks bounded by a memory budget, then written back into the existing parameters (the optimizer
keeps holding them)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import torch

from .. import functional as F
from .module import ACLoRAModule

logger = logging.getLogger(__name__)

#: transient memory a RESTART may use per chunk (the factors themselves are small)
CHUNK_BYTES = 256 * 1024 * 1024
#: on a CPU, chunks this small stay in the allocator's cache and the CPU caches
#: (large fresh tensors page-fault on every allocation): ~20-40% faster than CHUNK_BYTES
CPU_CHUNK_BYTES = 32 * 1024 * 1024


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


_T = TypeVar("_T")


def chunks(indices: list[_T], size: int) -> Iterable[list[_T]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def stack(modules: Sequence[ACLoRAModule], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.stack([m.down_matrix().detach().to(dtype) for m in modules])
    up = torch.stack([m.up_matrix().detach().to(dtype) for m in modules])
    return down, up


def write_back(modules: Sequence[ACLoRAModule], down: torch.Tensor, up: torch.Tensor) -> None:
    for m, d, u in zip(modules, down, up):
        m.lora_down.weight.data.copy_(d.reshape(m.lora_down.weight.shape))
        m.lora_up.weight.data.copy_(u.reshape(m.lora_up.weight.shape))


@dataclass
class Batch:
    """One chunk of same-shape modules, stacked: what ``decompose_in_batches`` hands its work."""

    number: int  # 1-based, over the whole call, in shape-group order (per-chunk noise seeds derive from it)
    indices: list[int]  # the modules' positions in the sequence given
    modules: list[ACLoRAModule]
    down: torch.Tensor  # (n, R, in), float32, or float64 when one module is retried alone
    up: torch.Tensor  # (n, out, R)


@dataclass
class Skipped:
    """Modules a batched decomposition left out, by name."""

    non_finite: list[str] = field(default_factory=list)  # NaN/Inf in their weights
    failed: list[str] = field(default_factory=list)  # the decomposition failed in float32 and float64 alike

    @property
    def names(self) -> list[str]:
        return self.non_finite + self.failed


#: what a failed decomposition raises (LAPACK's non-convergence, or work that found a non-finite result)
DECOMPOSITION_ERRORS = (torch.linalg.LinAlgError, RuntimeError)


def decompose_in_batches(
    modules: Sequence[ACLoRAModule],
    work: Callable[[Batch], None],
    *,
    what: str,
    left: str = "left unchanged",
    budget_bytes: Optional[int] = None,
) -> Skipped:
    """Run ``work`` on every module, batched: modules of one shape stacked in chunks of at most the memory
    budget, in float32; modules with non-finite weights left out; a chunk whose ``work`` raises one of
    ``DECOMPOSITION_ERRORS`` is retried one module at a time in float64, and a module that fails there too
    is left out. ``work`` must write nothing before it has succeeded. ``what`` names the caller in the log
    ("RESTART", "export"), ``left`` what becomes of a module left out ("left unchanged")."""
    skipped = Skipped()
    number = 0
    for (rank, cols, rows, device), indices in shape_groups(modules).items():
        size = F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))
        for part in chunks(indices, size):
            number += 1
            batch = [modules[i] for i in part]
            down, up = stack(batch, torch.float32)
            finite = F.is_finite(down, up)
            if not bool(finite.all()):
                keep = finite.nonzero().flatten().tolist()
                bad = [m.lora_name for j, m in enumerate(batch) if j not in keep]
                logger.warning("AC-LoRA %s: non-finite weights, module(s) %s: %s", what, left, ", ".join(bad))
                skipped.non_finite += bad
                part, batch = [part[j] for j in keep], [batch[j] for j in keep]
                if not batch:
                    continue
                down, up = down[keep], up[keep]
            try:
                work(Batch(number, part, batch, down, up))
            except DECOMPOSITION_ERRORS as err:
                logger.warning(
                    "AC-LoRA %s: float32 decomposition failed for %d module(s) (%s); retrying one by one in float64",
                    what,
                    len(batch),
                    err,
                )
                for i, m in zip(part, batch):
                    try:
                        work(Batch(number, [i], [m], *stack([m], torch.float64)))
                    except DECOMPOSITION_ERRORS as err64:
                        logger.warning(
                            "AC-LoRA %s: decomposition of %s failed in float64 too (%s); module %s",
                            what,
                            m.lora_name,
                            err64,
                            left,
                        )
                        skipped.failed.append(m.lora_name)
    return skipped


def held_slots(modules: Sequence[ACLoRAModule]) -> torch.Tensor:
    """Every module's held slots (``ACLoRAModule.held``; 1 = held) concatenated: int64 on the CPU, one
    entry per slot of every module, so that it can be stored or broadcast as one tensor."""
    return torch.cat([torch.zeros(m.rank, dtype=torch.int64) if m.held is None else m.held.long() for m in modules])


def hold_from(modules: Sequence[ACLoRAModule], held: torch.Tensor) -> None:
    """The inverse of ``held_slots``: hold in each module the slots ``held`` marks (none: every slot in use)."""
    for m, part in zip(modules, held.cpu().split([m.rank for m in modules])):
        m.hold_slots(part.bool())
