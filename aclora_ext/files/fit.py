"""Every module's rank so that the written file, metadata included, is at most a given size.

``functional.allocation`` chooses ranks under a byte budget for the components; the header and the
metadata are the rest of the file. The tensor budget is the size limit minus the exact header
(metadata included) of the file at the CAP ranks: header length is non-decreasing in every rank
(shape and offset digits, and ``aclora_ranks``-style metadata, only grow), so that allocation fits
whatever ranks come out. It then re-allocates once with the exact header of the chosen ranks
(recovering the few bytes of digits the bound held back) and keeps that answer only if its exact
size still fits and it keeps more. Metadata that depends on the ranks is given as a function of them
and must return what will be written; the exact size of the final choice is always computed and
checked, and should a metadata function ever grow as ranks shrink, the budget is tightened by the
overshoot and the allocation redone, so the returned ranks are never over the limit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from ..functional.allocation import DEFAULT_METHOD, DP_LIMIT, METHODS, Allocation, BudgetError, allocation_problem, solve
from ..options import format_size
from .sizes import ModuleLayout, TensorSpec, layout_tensors, safetensors_size, saved_file_size

MetadataSource = Union[None, Mapping[str, str], Callable[[dict[str, int]], Mapping[str, str]]]
#: allocations fit_ranks tries at most (the first, with the header bound, fits unless metadata shrinks with rank)
MAX_TRIES = 6


@dataclass
class FileFit:
    """Ranks for a file of at most ``max_size`` bytes, and its exact size."""

    ranks: dict[str, int]
    allocation: Allocation
    size: int  # the exact size of the file these ranks give (header, metadata and hashes included)
    max_size: int
    smallest: int  # the smallest possible file (every module at its minimum rank)
    header_bound: int  # 8 + header bytes at the cap ranks: the bound the first allocation used
    tries: int  # allocations computed


def fit_ranks(layouts: Sequence[ModuleLayout], worths: Sequence[torch.Tensor], max_size: int, *,
              min_ranks: Union[int, Sequence[int]] = 1, max_ranks: Union[int, Sequence[int], None] = None,
              metadata: MetadataSource = None, extra: Optional[Mapping[str, TensorSpec]] = None,
              hashes: bool = True, method: str = DEFAULT_METHOD, dp_limit: int = DP_LIMIT) -> FileFit:
    """Every module's rank so that the written file is at most ``max_size`` bytes, keeping the most worth.

    ``layouts[i]`` / ``worths[i]``: module i's tensors and the worth of its components (see
    :func:`allocate`; the cost of a component is ``layouts[i].component_bytes``). ``metadata``: the
    metadata the file will carry: a dict, or a function of {module name: rank} returning exactly what
    will be written (e.g. with ``aclora_ranks``). ``extra``: tensors of fixed shape also written.
    ``hashes``: the file is written by ``files.save_state_dict`` (sshs hashes added), else by plain
    ``safetensors.torch.save``. Raises BudgetError (a ValueError) saying the smallest possible size
    when no choice fits.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; allowed: {', '.join(METHODS)}")
    max_size = int(max_size)
    layouts = list(layouts)
    names = [layout.name for layout in layouts]
    problem = allocation_problem(worths, [layout.component_bytes for layout in layouts], min_ranks, max_ranks, names)
    extra = dict(extra or {})

    def overhead(ranks: Sequence[int]) -> tuple[int, int]:
        """(file size, bytes that are not component data: 8 + header + fixed tensors) at ``ranks``."""
        tensors = layout_tensors(layouts, ranks, extra)
        meta = metadata(dict(zip(names, (int(k) for k in ranks)))) if callable(metadata) else metadata
        size = saved_file_size(tensors, meta) if hashes else safetensors_size(tensors, meta)
        return size, size - sum(c * int(k) for c, k in zip(costs, ranks))

    costs, lo, hi = problem.costs.tolist(), problem.lo.tolist(), problem.hi.tolist()
    smallest, _ = overhead(lo)
    if smallest > max_size:
        low = sorted(set(lo))
        ranks_text = f"rank {low[0]}" if len(low) == 1 else f"its minimum rank ({low[0]}..{low[-1]})"
        raise BudgetError(f"no file fits in {format_size(max_size)}: the smallest possible file, every module at "
                          f"{ranks_text} with its header and metadata, is {format_size(smallest)}", smallest)
    _, header_bound = overhead(hi)  # header length only grows with the ranks: a bound for any choice
    unit = functools.reduce(math.gcd, costs, 0) or 1
    budget = max_size - header_bound
    best: Optional[tuple[Allocation, int]] = None
    tries = 0
    while tries < MAX_TRIES:
        tries += 1
        allocation = solve(problem, max(budget, problem.base_cost), method, dp_limit)
        size, used = overhead(allocation.ranks)
        if size > max_size:  # metadata that grew as ranks shrank: tighten by the overshoot
            budget = min(budget, allocation.cost) - (size - max_size)
            continue
        if best is None or allocation.worth > best[0].worth:
            best = (allocation, size)
        exact_budget = max_size - used  # the room with this choice's own header
        if exact_budget // unit <= budget // unit:  # every cost is a multiple of unit: nothing more can fit
            break
        budget = exact_budget
    if best is None:  # pragma: no cover - needs metadata that shrinks as ranks grow, beyond MAX_TRIES
        allocation = solve(problem, problem.base_cost, method, dp_limit)
        best = (allocation, smallest)
    allocation, size = best
    return FileFit(dict(zip(names, allocation.ranks)), allocation, size, max_size, smallest, header_bound, tries)


__all__ = ["FileFit", "fit_ranks", "MetadataSource", "MAX_TRIES"]
