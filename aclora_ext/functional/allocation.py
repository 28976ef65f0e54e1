"""Ranks under a byte budget: which components of which modules to keep (a knapsack of prefix chains).

The pure math of ``aclora resize --max-size`` and of training's ``max_file_size``; tensors and numbers
in, ranks out (the file's exact size is ``files.sizes``, both together ``files.fit``).

Module i has components of worth w_i1 >= w_i2 >= ... (what the criterion measures, comparable across
modules: for resize the squared singular values of the module's update alpha/R*up*down, so the kept
worth is the kept part of ||dW||^2 summed over the network and maximising it minimises the whole
update's squared error), each costing c_i bytes ((in*kh*kw + out) * bytes per element). Choose k_i in
[min_i, max_i] maximising sum_i (w_i1 + ... + w_ik_i) with sum_i c_i*k_i <= budget. Worth is
non-increasing along a module and its cost constant, so the worth-per-byte order takes each module's
components in order: the LP relaxation is the plain fractional knapsack over all components, and any
0/1 choice can be turned into a prefix one of the same cost and at least the same worth. Two methods:

- ``"greedy"``: every component beyond the minimum ranks, in decreasing worth per byte (ties: module
  order, then component order), taken when it fits, skipped when not. A component that does not fit
  closes its module (the later ones cost the same and the room only shrinks), so every module keeps a
  prefix. Guarantee: with U the LP bound, OPT - greedy <= U - greedy < the worth of the first component
  that did not fit ("optimal up to one component of one module"); ``Allocation.bound`` reports U, so
  every answer carries its own certified gap.
- ``"exact"`` (the default): the greedy answer, then a core algorithm. With lambda the critical worth
  per byte, deciding a component against the LP costs the bound at least its |w - lambda*c|, summed
  (ranks are prefixes) from the module's LP boundary to it; every component whose cost exceeds U - L
  (L: the best answer so far) is fixed at its LP decision in every optimum. A dynamic program on the
  256 undecided components nearest the boundary (same-cost modules merged into one chain; capacity in
  units of the gcd of their costs: exact integer bytes, no rounding) raises L; if that proves the rest
  fixed the answer is an optimum, else the DP is rerun on everything not fixed, which is exact. Result:
  an optimum (up to float64 rounding of worth sums), flagged ``exact=True``. Only if that second DP
  would exceed ``dp_limit`` (work = chain lengths x capacity cells; 30M, ~0.1-0.2 s on a 2-core CPU) is
  the best answer found returned, with ``exact=False``: never worse than the greedy, and within its
  certified ``gap`` (< one component's worth).

A module's worth need not be sorted (the product mode's importance comes in the update's SVD order):
k_i then means "the k_i components of largest worth" (stable: equal worths keep their order), which
:meth:`Allocation.masks` returns as boolean masks in the module's own component order. Components of
worth 0 are never bought beyond the minimum rank; ranks never exceed the number of components given.
The method, its guarantee and its measurements: docs/resize.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..options import format_size

# --- the allocation -----------------------------------------------------------------------------------------
METHODS = ("exact", "greedy")
DEFAULT_METHOD = "exact"
#: exact: items in the first dynamic program, the ones nearest the critical worth per byte
CORE_ITEMS = 256
#: exact: the most work (sum over cost classes of chain length x capacity cells) a dynamic program may take;
#: above it the best answer found is returned with exact=False and its certified bound
DP_LIMIT = 30_000_000


class BudgetError(ValueError):
    """A budget no choice of ranks can meet; ``smallest`` is the smallest possible size (bytes)."""

    def __init__(self, message: str, smallest: int) -> None:
        super().__init__(message)
        self.smallest = smallest


@dataclass
class Allocation:
    """The chosen ranks and what they keep."""

    ranks: list[int]
    cost: int  # bytes of all kept components (min ranks included)
    worth: float  # kept worth (min ranks included)
    total_worth: float  # worth of every component given
    bound: float  # LP bound: no feasible choice keeps more (worth <= optimum <= bound)
    method: str
    exact: bool  # the ranks are an optimum (up to float64 rounding of worth sums)
    seconds: float = 0.0
    core: int = 0  # exact: components the last dynamic program decided
    dp_work: int = 0  # exact: its size (sum over cost classes of chain length x capacity cells)
    order: Optional[torch.Tensor] = field(default=None, repr=False)  # (M, n) components by decreasing worth
    lengths: list[int] = field(default_factory=list, repr=False)

    @property
    def gap(self) -> float:
        """Certified: the optimum keeps at most this much more worth (0 when ``exact``)."""
        return 0.0 if self.exact else max(self.bound - self.worth, 0.0)

    def masks(self) -> list[torch.Tensor]:
        """Per module, a bool mask over its components in its own order: the ``rank`` ones of largest worth
        (a prefix when the worths were given in non-increasing order)."""
        if self.order is None:
            raise ValueError("Allocation.masks needs the components' order; an Allocation from solve() has it")
        out = []
        for i, (k, n) in enumerate(zip(self.ranks, self.lengths)):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[self.order[i, :k]] = True
            out.append(mask)
        return out


def _per_module(value, count: int, what: str) -> torch.Tensor:
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a rank")
    if isinstance(value, int):
        return torch.full((count,), int(value), dtype=torch.int64)
    values = torch.as_tensor(value).reshape(-1)
    if len(values) != count or values.dtype.is_floating_point or values.dtype == torch.bool:
        raise ValueError(f"{what}: give one integer, or one integer per module ({count})")
    return values.to(torch.int64)


@dataclass
class AllocationProblem:
    """Validated allocation input: worths sorted within modules, and each module's rank range."""

    worths: torch.Tensor  # (M, n) float64, rows non-increasing, zero past a module's length
    order: torch.Tensor  # (M, n) the sort: component indices by decreasing worth
    lengths: list[int]
    costs: torch.Tensor  # (M,) int64 bytes per component
    lo: torch.Tensor  # (M,) int64
    hi: torch.Tensor  # (M,) int64

    @property
    def base_cost(self) -> int:
        return int((self.costs * self.lo).sum())


def allocation_problem(
    worths, costs, min_ranks=1, max_ranks=None, names: Optional[Sequence[str]] = None
) -> AllocationProblem:
    """The validated, sorted input of :func:`solve` (arguments as :func:`allocate`'s): built once when the
    same modules are solved at several budgets, as ``files.fit.fit_ranks`` does."""
    if isinstance(worths, torch.Tensor) and worths.dim() == 2:
        rows = list(worths.detach().to("cpu", torch.float64))
    else:
        rows = [torch.as_tensor(w).detach().to("cpu", torch.float64).reshape(-1) for w in worths]
    count = len(rows)
    names = [str(n) for n in names] if names is not None else [f"module {i}" for i in range(count)]
    costs = costs.tolist() if isinstance(costs, torch.Tensor) else list(costs)
    if len(costs) != count or len(names) != count:
        raise ValueError(f"{len(costs)} costs and {len(names)} names for {count} modules")
    if any(isinstance(c, bool) or not float(c).is_integer() for c in costs):
        raise ValueError("costs must be whole numbers of bytes")
    costs = torch.tensor([int(c) for c in costs], dtype=torch.int64)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    if count == 0:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return AllocationProblem(empty, empty.long(), [], costs, costs.clone(), costs.clone())
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1.0)
    real = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    bad = (~torch.isfinite(padded) | (padded < 0)) & real
    if bool(bad.any()):
        raise ValueError(f"{names[int(bad.any(dim=1).nonzero()[0])]}: worths must be finite and >= 0")
    if bool((costs < 1).any()):
        i = int((costs < 1).nonzero()[0])
        raise ValueError(f"{names[i]}: cost per component {int(costs[i])} is not a positive number of bytes")
    lows = _per_module(min_ranks, count, "min_ranks")
    highs = _per_module(max_ranks, count, "max_ranks") if max_ranks is not None else lengths.clone()
    lo = torch.minimum(lows, lengths)  # a minimum above the module's number of components means all of them
    if bool(((lows < 0) | (highs < lo)).any()):
        i = int(((lows < 0) | (highs < lo)).nonzero()[0])
        raise ValueError(f"{names[i]}: min rank {int(lows[i])} and max rank {int(highs[i])} allow no rank")
    sorted_w, order = torch.sort(padded, dim=1, descending=True, stable=True)  # padding (-1) sorts last
    sorted_w = sorted_w.clamp(min=0.0)
    positive = (sorted_w > 0).sum(dim=1)
    # zero-worth components are never bought beyond the minimum rank
    hi = torch.maximum(lo, torch.minimum(torch.minimum(highs, lengths), positive))
    return AllocationProblem(sorted_w, order, lengths.tolist(), costs, lo, hi)


def allocate(
    worths,
    costs: Sequence[int],
    budget: int,
    *,
    min_ranks: Union[int, Sequence[int]] = 1,
    max_ranks: Union[int, Sequence[int], None] = None,
    method: str = DEFAULT_METHOD,
    dp_limit: int = DP_LIMIT,
    names: Optional[Sequence[str]] = None,
) -> Allocation:
    """Ranks maximising the kept worth with sum(cost_i * rank_i) <= ``budget`` bytes (see the module doc).

    ``worths``: per module a (n_i,) tensor of its components' worth (>= 0, finite), or one (M, n)
    tensor; ``costs[i]``: bytes per component of module i (> 0); ``min_ranks`` / ``max_ranks``: one
    for all or one per module (ranks are also capped by n_i, and a minimum above n_i means n_i);
    ``names``: for messages. Raises BudgetError when the minimum ranks alone cost more than
    ``budget``, ValueError for bad input.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; allowed: {', '.join(METHODS)}")
    return solve(allocation_problem(worths, costs, min_ranks, max_ranks, names), int(budget), method, dp_limit)


def solve(
    problem: AllocationProblem, budget: int, method: str = DEFAULT_METHOD, dp_limit: int = DP_LIMIT
) -> Allocation:
    """:func:`allocate` on a problem already validated (BudgetError when its minimum ranks exceed ``budget``)."""
    start = time.perf_counter()
    lo, hi, W = problem.lo, problem.hi, problem.worths
    count = len(lo)
    base_cost = problem.base_cost
    if base_cost > budget:
        raise BudgetError(
            f"the minimum ranks alone need {format_size(base_cost)}, more than the budget of "
            f"{format_size(max(budget, 0))}",
            base_cost,
        )
    col = torch.arange(W.shape[1])[None, :]
    total = float(W.sum())
    base_worth = float(W[col < lo[:, None]].sum())
    # the optional items: module i's components lo_i .. hi_i - 1, module-major, component order
    optional = (col >= lo[:, None]) & (col < hi[:, None])
    item_w = W[optional]
    module_of = optional.nonzero()[:, 0]
    item_c = problem.costs[module_of]
    room = budget - base_cost
    taken, bound, critical, lp_in = _greedy(item_w, item_c, room)
    # everything fits (no critical component): the greedy answer is the optimum
    result = Allocation(
        [],
        0,
        base_worth + float(item_w[taken].sum()),
        total,
        base_worth + bound,
        method,
        critical is None,
        order=problem.order,
        lengths=problem.lengths,
    )
    if method == "exact" and critical is not None:
        taken = _exact(result, item_w, item_c, module_of, taken, lp_in, critical, room, bound, dp_limit)
        result.worth = base_worth + float(item_w[taken].sum())
    ranks = lo + torch.bincount(module_of[taken], minlength=count)
    result.ranks = ranks.tolist()
    result.cost = int((problem.costs * ranks).sum())
    result.seconds = time.perf_counter() - start
    return result


def _greedy(w: torch.Tensor, c: torch.Tensor, room: int) -> tuple[torch.Tensor, float, Optional[int], torch.Tensor]:
    """Greedy by worth per byte with skipping: (taken mask, LP bound of the optional items, critical item,
    the LP's whole items: the mask of the greedy prefix before the critical item).

    Items are in module-major, component order with non-increasing worth within a module, so the stable
    sort by decreasing ratio keeps every module's items in order. ``critical`` is the first item (index
    into ``w``) that does not fit, None when all fit (then the answer is optimal and the bound is exact).
    """
    taken = torch.zeros(len(w), dtype=torch.bool)
    if len(w) == 0:
        return taken, 0.0, None, taken
    order = torch.sort(w / c.to(torch.float64), descending=True, stable=True).indices
    c_sorted = c[order]
    cum = torch.cumsum(c_sorted, 0)
    n_fit = int(torch.searchsorted(cum, torch.tensor([room]), right=True)[0])
    taken[order[:n_fit]] = True
    lp_in = taken.clone()
    prefix_worth = float(w[order[:n_fit]].sum())
    if n_fit == len(w):
        return taken, prefix_worth, None, lp_in
    left = room - (int(cum[n_fit - 1]) if n_fit else 0)
    critical = int(order[n_fit])
    bound = prefix_worth + float(w[critical]) * left / int(c[critical])
    # fill: later items that still fit (a skipped item's module never fits again: same cost, less room)
    position = n_fit + 1
    smallest = int(c.min())
    while left >= smallest and position < len(order):
        fits = torch.nonzero(c_sorted[position:] <= left)
        if len(fits) == 0:
            break
        position += int(fits[0])
        taken[order[position]] = True
        left -= int(c_sorted[position])
        position += 1
    return taken, bound, critical, lp_in


def _exact(
    result: Allocation,
    w: torch.Tensor,
    c: torch.Tensor,
    module_of: torch.Tensor,
    taken: torch.Tensor,
    lp_in: torch.Tensor,
    critical: int,
    room: int,
    bound: float,
    dp_limit: int,
) -> torch.Tensor:
    """An optimum from the greedy answer (a core algorithm); returns the taken mask over the optional items.

    With lambda the critical worth per byte, an item's reduced worth d = w - lambda*c is what the LP
    bound U loses when the item is decided against its LP decision (Dembo-Hammer). Ranks are prefixes,
    so dropping an LP-kept component drops the module's later LP-kept ones too, and buying an LP-dropped
    one buys the earlier LP-dropped ones: deciding item j against the LP costs at least D_j, the sum of
    |d| from the module's LP boundary to j. Any choice keeping at least L (a feasible answer's worth)
    therefore agrees with the LP on every item with D_j > U - L. D grows away from each module's LP
    boundary, so the undecided items {D <= tau} are a contiguous run of each module's components.
    First a DP on the CORE_ITEMS items of smallest D (the rest at their LP decisions) raises L; if then
    U - L <= tau the answer is optimal, else the DP is redone on {D <= U - L}, which is exact (when it
    fits in ``dp_limit``; else the best answer found is returned with its certified bound).
    """
    lam = float(w[critical]) / int(c[critical])
    d = w - lam * c.to(torch.float64)
    # D: suffix sums of d over each module's LP-kept items, prefix sums of -d over its LP-dropped ones
    kept = torch.where(lp_in, d, 0.0)
    dropped = torch.where(lp_in, 0.0, -d)
    count = int(module_of.max()) + 1 if len(module_of) else 0
    first = torch.zeros(count, dtype=torch.int64)
    first.scatter_reduce_(0, module_of, torch.arange(len(module_of)), "amin", include_self=False)
    csum_kept = torch.cumsum(kept, 0)
    csum_dropped = torch.cumsum(dropped, 0)
    start_kept = (csum_kept - kept)[first][module_of]  # sum before the module's first item
    start_dropped = (csum_dropped - dropped)[first][module_of]
    total_kept = torch.zeros(count, dtype=torch.float64).index_add_(0, module_of, kept)[module_of]
    suffix = total_kept - (csum_kept - kept - start_kept)
    prefix = csum_dropped - start_dropped
    reach = torch.where(lp_in, suffix, prefix).clamp(min=0.0)
    best, best_worth = taken, float(w[taken].sum())
    # float rounding (of d, of the sums): decide fewer items, never more
    margin = 1e-9 * max(abs(bound), float(w.abs().sum()), 1e-300)
    tau = float(torch.kthvalue(reach, min(CORE_ITEMS, len(w))).values) if len(w) else 0.0
    for attempt in range(2):
        free = reach <= tau
        chosen, work = _core_dp(w, c, free, lp_in, room, dp_limit)
        result.core, result.dp_work = int(free.sum()), work
        if chosen is not None and float(w[chosen].sum()) > best_worth:
            best, best_worth = chosen, float(w[chosen].sum())
        needed = bound - best_worth + margin
        if chosen is not None and needed <= tau:
            result.exact = True
            return best
        if chosen is None or attempt == 1:
            break
        tau = needed
    return best


def _core_dp(
    w: torch.Tensor, c: torch.Tensor, free: torch.Tensor, lp_in: torch.Tensor, room: int, dp_limit: int
) -> tuple[Optional[torch.Tensor], int]:
    """The best choice with items outside ``free`` at their LP decisions (None when over ``dp_limit``).

    Modules of equal cost form one chain (their free items merged by decreasing worth: taking the t best
    of the chain takes a prefix of every module's free run), and a DP over the chains runs in units of
    the gcd of their costs, on the exact integer capacity left by the fixed items.
    """
    fixed = lp_in & ~free
    left = room - int(c[fixed].sum())
    items = free.nonzero()[:, 0]
    classes: dict[int, torch.Tensor] = {}
    for q in torch.unique(c[items]).tolist():
        members = items[c[items] == q]
        chain = members[torch.sort(w[members], descending=True, stable=True).indices]
        classes[int(q)] = chain
    unit = 0
    for q in classes:
        unit = math.gcd(unit, q)
    unit = max(unit, 1)
    cells = min(left, sum(q * len(chain) for q, chain in classes.items())) // unit + 1
    work = sum(min(len(chain), (cells - 1) // (q // unit)) + 1 for q, chain in classes.items()) * cells
    if work > dp_limit:
        return None, work
    dp = torch.zeros(cells, dtype=torch.float64)
    choices = []
    for q, chain in classes.items():
        step = q // unit
        longest = min(len(chain), (cells - 1) // step)
        gains = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w[chain[:longest]], 0)])
        # new[s] = max over t <= s/step of dp[s - t*step] + gains[t]; row u = longest - t of a strided view
        padded = torch.cat([torch.full((longest * step,), -math.inf, dtype=torch.float64), dp])
        best = torch.full((cells,), -math.inf, dtype=torch.float64)
        arg = torch.zeros(cells, dtype=torch.int64)
        rows = max(1, 4_000_000 // cells)
        for u0 in range(0, longest + 1, rows):
            u1 = min(longest + 1, u0 + rows)
            view = padded.as_strided((u1 - u0, cells), (step, 1), u0 * step)
            value, row = (view + gains.flip(0)[u0:u1, None]).max(dim=0)
            better = value > best
            best = torch.where(better, value, best)
            arg = torch.where(better, longest - (u0 + row), arg)
        dp = best
        choices.append((q, chain, arg))
    taken = fixed.clone()
    at = cells - 1
    for q, chain, arg in reversed(choices):
        t = int(arg[at])
        taken[chain[:t]] = True
        at -= t * (q // unit)
    return taken, work


def update_worths(singular_values: torch.Tensor, scale: float) -> torch.Tensor:
    """Worth of a module's components for resize: the squared singular values of its update
    scale * up @ down (scale = alpha / R), i.e. each component's share of ||dW||_F^2, float64."""
    return (singular_values.detach().to("cpu", torch.float64) * abs(float(scale))).square()


__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "CORE_ITEMS",
    "DP_LIMIT",
    "BudgetError",
    "Allocation",
    "AllocationProblem",
    "allocation_problem",
    "allocate",
    "solve",
    "update_worths",
]
