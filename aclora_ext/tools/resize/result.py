"""What ``aclora resize`` did: per module, per block, and as a whole."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ...functional import median
from ..rank_report import _block_order, locate
from .criteria import Criterion
from .max_size import Budget


# --- the result ------------------------------------------------------------------------------------------
@dataclass
class ModuleResize:
    name: str
    kind: str
    rank_before: int
    rank_after: int
    error: float  # relative Frobenius error of the resized update, ||ΔW - ΔW'|| / ||ΔW||
    energy: float  # ||ΔW||_F^2 of the original update (alpha/R up @ down), for per-block errors


@dataclass
class BlockError:
    part: str
    block: str
    modules: int
    ranks_before: tuple[int, float, int]
    ranks_after: tuple[int, float, int]
    error: float  # relative Frobenius error of the block's updates taken together
    error_max: float  # the largest module error in the block


@dataclass
class ResizeResult:
    """The resized tensors (kohya keys, one alpha) and what happened to every module."""

    tensors: dict[str, torch.Tensor]
    modules: list[ModuleResize]
    criterion: Criterion
    alpha: float  # the file's one alpha
    max_rank: int  # the caps applied
    max_conv_rank: int
    threshold: Optional[float] = None  # importance: the absolute threshold on singular values of ΔW
    top: Optional[float] = None  # importance: the largest singular value of any module's ΔW
    seconds: float = 0.0
    dtype: str = ""
    source_ranks: dict[str, int] = field(default_factory=dict)
    budget: Optional[Budget] = None  # max_size: what it asked for and gave

    def describe(self) -> str:
        """ "importance: 0.01", or with a budget "importance: 0.0, max_size: 50000000" (resize_lora's wording)."""
        text = self.criterion.describe()
        return text if self.budget is None else f"{text}, max_size: {self.budget.max_size}"

    @property
    def error(self) -> float:
        """Relative Frobenius error of the whole update, all modules together: ||dW - dW'|| / ||dW||."""
        total = sum(m.energy for m in self.modules)
        return math.sqrt(sum(m.energy * m.error**2 for m in self.modules) / total) if total > 0 else 0.0

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank_after for m in self.modules}

    @property
    def errors(self) -> dict[str, float]:
        return {m.name: m.error for m in self.modules}

    def blocks(self) -> list[BlockError]:
        """Per block of the model (the rank report's blocks): ranks before/after and the relative error."""
        grouped: dict[tuple[str, str], list[ModuleResize]] = {}
        for m in self.modules:
            grouped.setdefault(locate(m.name), []).append(m)
        rows = []
        for (part, block), members in grouped.items():
            total = sum(m.energy for m in members)
            dropped = sum(m.energy * m.error**2 for m in members)
            before = [m.rank_before for m in members]
            after = [m.rank_after for m in members]
            rows.append(
                BlockError(
                    part,
                    block,
                    len(members),
                    (min(before), median(before), max(before)),
                    (min(after), median(after), max(after)),
                    math.sqrt(dropped / total) if total > 0 else 0.0,
                    max(m.error for m in members),
                )
            )
        rows.sort(key=lambda b: _block_order(b.part, b.block))
        return rows


def result_summary(result: ResizeResult) -> dict:
    """The result as plain JSON-able data (without the tensors)."""
    return {
        "criterion": asdict(result.criterion),
        "alpha": result.alpha,
        "max_rank": result.max_rank,
        "max_conv_rank": result.max_conv_rank,
        "threshold": result.threshold,
        "top": result.top,
        "seconds": result.seconds,
        "dtype": result.dtype,
        "error": result.error,
        "budget": asdict(result.budget) if result.budget else None,
        "modules": [asdict(m) for m in result.modules],
        "blocks": [asdict(b) for b in result.blocks()],
    }
