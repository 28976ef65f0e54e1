"""``aclora resize --max-size``: the ranks of the resized file under a size budget.

Each module's maximum rank is the criterion's rank (capped by ``max_rank`` / ``max_conv_rank``); the
budget then keeps, across the whole file, the components of largest worth per byte. A component's
worth is its squared singular value in the module's scaled update alpha/R * up @ down
(``F.allocation.update_worths``): the kept worth is the kept part of the whole network's ||dW||_F^2, so
the whole update's relative error ||dW - dW'||_F / ||dW||_F is as small as the size allows. Its cost
is a row of lora_down and a column of lora_up at the output dtype. ``files.fit.fit_ranks`` sizes the
file exactly (header, metadata, hashes) with the metadata given as a function of the ranks, so the
file written is the file that was sized.

Without a criterion (no criterion name, no ``min_importance``, no ``param``) only the rank caps
apply: criterion importance at 0 keeps every nonzero component, so the default importance cut does
not silently shrink what the budget can buy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ... import functional as F
from ...files.fit import fit_ranks
from ...files.sizes import FileLayout, ModuleLayout
from ...options import SIZE_ALLOWED, parse_size
from .criteria import Criterion, ResizeError
from .inputs import _Module

#: the criterion parameters whose presence makes the criterion's ranks the budget's caps
CRITERION_KEYS = ("min_importance", "param")


@dataclass
class Budget:
    """What ``max_size`` asked for and what it gave (``ResizeResult.budget``)."""

    max_size: int  # bytes
    criterion_caps: bool  # the criterion's ranks were each module's maximum (else only max_rank / max_conv_rank)
    size: int = 0  # the exact size of the file resize_file writes
    smallest: int = 0  # the smallest file possible (every module at its minimum rank)
    exact: bool = True  # the ranks are an optimum of the allocation (see functional.allocation)
    gap: float = 0.0  # certified: an optimum keeps at most this share more of the whole ||dW||^2
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """What the file's ``aclora_resize`` record says about the budget: the request only, so that the
        metadata sized with the ranks does not depend on the outcome."""
        return {"max_size": self.max_size, "caps": "criterion" if self.criterion_caps else "max_rank"}


def parse_max_size(value: Any) -> Optional[int]:
    """``max_size`` in bytes (None: no budget); ResizeError naming the value and what is allowed."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise ResizeError(f"max_size={value!r} is not valid; allowed: {SIZE_ALLOWED}") from None


def budget_criterion(
    criterion: Criterion | str | None, criterion_args: Mapping[str, Any], max_size: Optional[int]
) -> tuple[Criterion, bool]:
    """The resize's criterion, and whether its ranks cap the budget.

    None without a budget is the default criterion (importance). None with a budget, when no criterion
    parameter is given either, is importance at 0 (every nonzero component: only the rank caps apply).
    """
    if isinstance(criterion, Criterion):
        if criterion_args:
            raise ResizeError(f"give the criterion's parameters in the Criterion, not as {sorted(criterion_args)}")
        return criterion, True
    explicit = criterion is not None or any(key in criterion_args for key in CRITERION_KEYS)
    if max_size is not None and not explicit:
        return Criterion("importance", min_importance=0.0, **criterion_args), False
    return Criterion(criterion or "importance", **criterion_args), explicit


def module_layouts(modules: Sequence[_Module], dtype: torch.dtype) -> list[ModuleLayout]:
    """The tensors every module writes, as the resized file stores them (one alpha each)."""
    return [ModuleLayout.from_shapes(m.name, m.down_shape, m.up_shape, dtype) for m in modules]


def fit_budget(
    modules: Sequence[_Module],
    singular_values: Mapping[int, torch.Tensor],
    caps: Mapping[int, int],
    min_rank: int,
    budget: Budget,
    dtype: torch.dtype,
    metadata_of: Callable[[dict[int, int]], Mapping[str, str]],
) -> dict[int, int]:
    """Every module's rank under ``budget.max_size`` ({module index: rank}); fills in ``budget``'s outcome.

    ``singular_values[i]``: of module i's unscaled up @ down, descending; ``caps[i]``: its largest rank
    (the criterion's, clipped to its rank here: components beyond it are zero and never worth a byte);
    ``metadata_of(ranks)``: exactly the metadata the file will carry at those ranks. Raises
    ``F.allocation.BudgetError`` (a ValueError, with ``smallest``) when no file fits.
    """
    start = time.perf_counter()
    worths = [F.allocation.update_worths(singular_values[m.index], m.scale) for m in modules]
    limits = [min(int(caps[m.index]), m.rank) for m in modules]
    index = {m.name: m.index for m in modules}
    file = FileLayout(
        module_layouts(modules, dtype), lambda ranks: metadata_of({index[n]: k for n, k in ranks.items()})
    )
    fit = fit_ranks(file, worths, budget.max_size, min_ranks=[min(min_rank, cap) for cap in limits], max_ranks=limits)
    total = sum(float(w.sum()) for w in worths)
    budget.size, budget.smallest = fit.size, fit.smallest
    budget.exact = fit.allocation.exact
    budget.gap = fit.allocation.gap / total if total > 0 else 0.0
    budget.seconds = time.perf_counter() - start
    return {index[name]: k for name, k in fit.ranks.items()}


__all__ = ["Budget", "CRITERION_KEYS", "parse_max_size", "budget_criterion", "module_layouts", "fit_budget"]
