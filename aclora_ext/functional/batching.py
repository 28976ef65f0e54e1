"""Small helpers shared by the batched math: chunk sizes, finiteness checks, the median of the log line."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def chunk_size(rows: int, cols: int, rank: int, budget_bytes: int, bytes_per: int = 4, copies: int = 6) -> int:
    """How many modules of this shape to process at once within ``budget_bytes``.

    ``copies`` bounds the transient tensors held per module (factors, their
    truncations, noise, QR factors) relative to one factor's size.
    """
    per_module = (rows + cols) * rank * bytes_per * copies
    return max(1, int(budget_bytes // max(per_module, 1)))


def is_finite(*tensors: Tensor) -> Tensor:
    """(B,) bool: all entries of each batch item finite in every tensor.

    A batch item whose sum is finite has only finite entries (barring overflow
    of the sum, which the exact check then clears), so the element-wise check,
    a quarter of a CPU RESTART when run on everything, runs only on the items
    whose sum is not finite.
    """
    ok = None
    for t in tensors:
        flat = t.flatten(1)
        item = torch.isfinite(flat.sum(dim=1))
        if not bool(item.all()):
            suspect = (~item).nonzero().flatten()
            item[suspect] = torch.isfinite(flat[suspect]).all(dim=1)
        ok = item if ok is None else ok & item
    assert ok is not None, "is_finite needs at least one tensor"
    return ok


def median(values: list[int]) -> float:
    """Median of a non-empty list of ints (for the log line)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


__all__ = ["chunk_size", "is_finite", "median"]
