"""Operations batched over many LoRA modules: modules of one shape are stacked and processed in
chunks bounded by a memory budget, then written back into the existing parameters (the optimizer
keeps holding them)."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional, Sequence, TypeVar

import torch

from .module import ACLoRAModule

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
        yield indices[start:start + size]


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


def held_slots(modules: Sequence[ACLoRAModule]) -> torch.Tensor:
    """Every module's held slots (``ACLoRAModule.held``; 1 = held) concatenated: int64 on the CPU, one
    entry per slot of every module, so that it can be stored or broadcast as one tensor."""
    return torch.cat([torch.zeros(m.rank, dtype=torch.int64) if m.held is None else m.held.long()
                      for m in modules])


def hold_from(modules: Sequence[ACLoRAModule], held: torch.Tensor) -> None:
    """The inverse of ``held_slots``: hold in each module the slots ``held`` marks (none: every slot in use)."""
    for m, part in zip(modules, held.cpu().split([m.rank for m in modules])):
        m.hold_slots(part.bool())
