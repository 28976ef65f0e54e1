"""Counting live storages: every storage an operator creates on the (meta) device, while it lives,
and the allocation log's peak."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: the CUDA caching allocator hands out blocks in multiples of 512 bytes (what max_memory_allocated counts)
BLOCK_BYTES = 512

FROZEN_UNET = "U-Net weights (frozen)"
FROZEN_TE = "text-encoder weights (frozen)"
FROZEN_VAE = "VAE weights (frozen)"
LORA = "LoRA weights"
GRADIENTS = "gradients"
OPTIMIZER_STATE = "optimizer state"
ACTIVATIONS = "activations and temporaries"
CATEGORIES = (FROZEN_UNET, FROZEN_TE, FROZEN_VAE, LORA, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS)
SET_UP = "set-up"


@dataclass(eq=False)
class Block:
    """One storage while it lives: its size (rounded like the allocator's), what it is, when it was made."""

    nbytes: int
    category: str
    phase: str
    offloaded: bool = False  # a storage counted as 0 bytes because it waits in host memory (block swap)


class StorageCounter(TorchDispatchMode):
    """Every storage an operator creates on ``device_type``, while it lives.

    A storage is recognised by its Python object, which PyTorch keeps for as
    long as the storage lives (so views and in-place results count once), and
    a weak reference tells when it dies. ``events`` is the allocation log
    ((block, +1) made, (block, -1) freed) from which :meth:`replay` finds the
    largest live total; blocks can be re-labelled afterwards (what became a
    gradient, what the optimizer keeps), so the peak's breakdown is exact.
    """

    def __init__(self, device_type: str = "meta", block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__()
        self.device_type = device_type
        self.block_bytes = block_bytes
        self.phase = "counting"  # what allocations are made for (the estimate names the parts of the step)
        self.events: list[tuple[Block, int]] = []
        self._live: dict[int, tuple[Block, weakref.ref]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.see(t)
        return out

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes) * self.block_bytes if self.block_bytes > 1 else nbytes

    def see(self, t: torch.Tensor, category: str = ACTIVATIONS, phase: Optional[str] = None) -> Optional[Block]:
        """Count ``t``'s storage if it is new (or was resized in place); its block either way."""
        if t.device.type != self.device_type:
            return None
        storage = t.untyped_storage()
        key = id(storage)
        size = self._rounded(storage.nbytes())
        entry = self._live.get(key)
        if entry is not None:
            if entry[0].nbytes == size or entry[0].offloaded:
                return entry[0]
            self._free(key)  # resized in place: the old block goes, a new one comes
        block = Block(size, category, phase or self.phase)
        self._live[key] = (block, weakref.ref(storage, self._on_death(key)))
        self.events.append((block, 1))
        return block

    def _on_death(self, key: int) -> Callable[[object], None]:
        """The weakref callback that frees ``key``'s block when its storage dies."""
        return lambda _ref: self._free(key)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.events.append((entry[0], -1))

    def label(self, tensors: Iterable[Optional[torch.Tensor]], category: str) -> None:
        """Say what the storages of ``tensors`` are (now and for the whole replay); ones not seen before were
        there before counting began (the set-up: part of every total, never the moment of a peak)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                block = self.see(t, category, SET_UP)
                if block is not None:
                    block.category = category

    def offload(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count ``tensors`` (already labelled) as 0 bytes from now on and in the replay: their model is on the
        device, but they wait in host memory (sd-scripts' block swap keeps a swapped block's weights there)."""
        for t in tensors:
            block = self.see(t)
            if block is not None:
                block.nbytes, block.offloaded = 0, True

    def live_bytes(self) -> dict[str, int]:
        totals = dict.fromkeys(CATEGORIES, 0)
        for block, _ in self._live.values():
            totals[block.category] = totals.get(block.category, 0) + block.nbytes
        return totals

    def replay(self) -> "Replay":
        """The allocation log summed up; only allocations outside the set-up can make the peak."""
        totals = dict.fromkeys(CATEGORIES, 0)
        result = Replay(0, dict(totals), "", dict(totals), {})
        current, started = 0, False
        for block, sign in self.events:
            current += sign * block.nbytes
            totals[block.category] = totals.get(block.category, 0) + sign * block.nbytes
            if sign < 0 or block.phase == SET_UP:
                continue
            if not started:
                result.before, started = current - block.nbytes, True
            if current > result.peak:
                result.peak, result.at_peak, result.phase = current, dict(totals), block.phase
            result.by_phase[block.phase] = max(result.by_phase.get(block.phase, 0), current)
            for category, value in totals.items():
                result.largest[category] = max(result.largest.get(category, 0), value)
        return result


@dataclass
class Replay:
    """What an allocation log adds up to.

    ``peak``: the most bytes live at once; ``at_peak``: per category at that
    moment; ``phase``: the part of the step it fell in; ``largest``: the most
    each category held at any moment; ``by_phase``: the peak within each part
    of the step; ``before``: bytes live when the first counted block came.
    """

    peak: int
    at_peak: dict[str, int]
    phase: str
    largest: dict[str, int]
    by_phase: dict[str, int]
    before: int = 0
