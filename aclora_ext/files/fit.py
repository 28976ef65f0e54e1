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
from typing import Optional, Sequence, Union

import torch

from ..functional.allocation import (
    DEFAULT_METHOD,
    METHODS,
    Allocation,
    AllocationProblem,
    BudgetError,
    allocation_problem,
    solve,
)
from ..options import format_size
from .sizes import FileLayout

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


def fit_ranks(
    file: FileLayout,
    worths: Sequence[torch.Tensor],
    max_size: int,
    *,
    min_ranks: Union[int, Sequence[int]] = 1,
    max_ranks: Union[int, Sequence[int], None] = None,
    method: str = DEFAULT_METHOD,
) -> FileFit:
    """Every module's rank so that the written file is at most ``max_size`` bytes, keeping the most worth.

    ``file``: the modules' tensors and the metadata the file will carry; ``worths[i]``: the worth of
    module i's components (see ``functional.allocation.allocate``; the cost of a component is
    ``file.modules[i].component_bytes``). Raises BudgetError (a ValueError) saying the smallest
    possible size when no choice fits.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; allowed: {', '.join(METHODS)}")
    max_size = int(max_size)
    costs = [layout.component_bytes for layout in file.modules]
    problem = allocation_problem(worths, costs, min_ranks, max_ranks, file.names)
    lo = problem.lo.tolist()
    smallest = file.size(lo)
    if smallest > max_size:
        raise _nothing_fits(max_size, smallest, lo)
    header_bound = _overhead(file, costs, problem.hi.tolist())  # header length only grows with the ranks
    best, tries = _best_fit(file, problem, max_size, max_size - header_bound, method)
    if best is None:  # pragma: no cover - needs metadata that shrinks as ranks grow, beyond MAX_TRIES
        best = (solve(problem, problem.base_cost, method), smallest)
    allocation, size = best
    return FileFit(dict(zip(file.names, allocation.ranks)), allocation, size, max_size, smallest, header_bound, tries)


def _overhead(file: FileLayout, costs: Sequence[int], ranks: Sequence[int]) -> int:
    """Bytes of the file at ``ranks`` that are not component data: 8 + header (metadata included)."""
    return file.size(ranks) - sum(c * int(k) for c, k in zip(costs, ranks))


def _nothing_fits(max_size: int, smallest: int, lo: Sequence[int]) -> BudgetError:
    low = sorted(set(lo))
    ranks_text = f"rank {low[0]}" if len(low) == 1 else f"its minimum rank ({low[0]}..{low[-1]})"
    return BudgetError(
        f"no file fits in {format_size(max_size)}: the smallest possible file, every module at "
        f"{ranks_text} with its header and metadata, is {format_size(smallest)}",
        smallest,
    )


def _best_fit(
    file: FileLayout, problem: AllocationProblem, max_size: int, budget: int, method: str
) -> tuple[Optional[tuple[Allocation, int]], int]:
    """The best allocation whose exact file fits ``max_size``, starting from a tensor ``budget`` (header
    bound at the cap ranks), and the number of allocations tried: (allocation, its size) or None."""
    costs = problem.costs.tolist()
    unit = functools.reduce(math.gcd, costs, 0) or 1
    best: Optional[tuple[Allocation, int]] = None
    tries = 0
    while tries < MAX_TRIES:
        tries += 1
        allocation = solve(problem, max(budget, problem.base_cost), method)
        size = file.size(allocation.ranks)
        if size > max_size:  # metadata that grew as ranks shrank: tighten by the overshoot
            budget = min(budget, allocation.cost) - (size - max_size)
            continue
        if best is None or allocation.worth > best[0].worth:
            best = (allocation, size)
        exact_budget = max_size - (size - allocation.cost)  # the room with this choice's own header
        if exact_budget // unit <= budget // unit:  # every cost is a multiple of unit: nothing more can fit
            break
        budget = exact_budget
    return best, tries


__all__ = ["FileFit", "fit_ranks", "MAX_TRIES"]
