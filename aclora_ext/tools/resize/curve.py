"""The size/quality curve of a LoRA file: how much of its update a smaller copy of it keeps.

For a few sizes (10, 25, 50 and 75 % of the file by default), the relative error of the whole update,
||dW - dW'||_F / ||dW||_F over all modules together, of the file ``aclora resize FILE OUT --max-size``
would write at that size: the same analysis, allocation and metadata (``core``, ``max_size``), in the
file's own dtype, with no criterion cap. ``aclora inspect`` prints it (a table, ``--json``) and draws
it beside the rank plot (``--plot``). The analysis costs what a resize costs (about a second for an
SDXL file at rank 32), each size a fraction of that.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

import torch

from ...files.storage import LoRAFileError, load_state_dict, read_metadata
from ...functional import median
from ...functional.allocation import BudgetError
from .core import _accounts, _analyse, _decide, _dtype, _file_alpha, _fit_budget
from .criteria import Criterion
from .inputs import _modules
from .max_size import Budget
from .progress import Progress
from .result import ResizeResult

#: the shares of the file's size the table shows
TABLE_SHARES = (0.1, 0.25, 0.5, 0.75)
#: the shares the plot adds between them
PLOT_SHARES = (0.05, 0.15, 0.2, 0.3, 0.4, 0.6, 0.9, 1.0)


@dataclass
class CurvePoint:
    share: float  # of the file's size
    max_size: int  # bytes
    size: Optional[int] = None  # the resized file's exact size; None: no file fits
    error: Optional[float] = None  # relative error of the whole update
    ranks: Optional[tuple[int, float, int]] = None  # min / median / max


@dataclass
class SizeCurve:
    """The relative error of the whole update at several sizes of a file (see the module docstring)."""

    path: str
    file_bytes: int
    points: list[CurvePoint] = field(default_factory=list)
    smallest: Optional[int] = None  # the smallest file resize can write (every module at rank 1)
    unavailable: Optional[str] = None  # why there is no curve (a file resize cannot read)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """The table of the shares in TABLE_SHARES (or the reason there is none)."""
        if self.unavailable:
            return f"size/quality curve: not available: {self.unavailable}"
        rows = [
            [f"{p.share:.0%}", _mb(p.max_size)]
            + (
                [_mb(p.size), "{}/{:g}/{}".format(*p.ranks), f"{p.error:.4g}"]
                if p.size is not None and p.ranks is not None  # set together, when a file fits
                else ["-", "-", "no file fits"]
            )
            for p in self.points
            if p.share in TABLE_SHARES
        ]
        header = ["share", "max size", "file size", "ranks min/median/max", "rel. error"]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = [
            "size/quality: the file `aclora resize --max-size` writes at a share of this file's size, and the "
            "relative error of its whole update ||dW - dW'||_F / ||dW||_F (all modules together; MB = 10^6 bytes)"
        ]
        lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
        if self.smallest is not None:
            lines.append(f"  smallest possible file (every module at rank 1): {_mb(self.smallest)}")
        return "\n".join(lines)

    def draw(self, ax) -> None:
        """The curve on a matplotlib axis: file size (MB) against the whole update's relative error."""
        fitted = [(p.size, p) for p in self.points if p.size is not None]
        if self.unavailable or not fitted:
            ax.text(
                0.5,
                0.5,
                "no size/quality curve:\n" + (self.unavailable or "no size fits"),
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
                wrap=True,
            )
            ax.set_axis_off()
            return
        unit, scale = ("MB", 1e6) if self.file_bytes >= 1e6 else ("KB", 1e3)
        ax.plot([size / scale for size, _ in fitted], [p.error for _, p in fitted], marker="o", color="C3")
        for size, p in fitted:
            if p.share in TABLE_SHARES:
                ax.annotate(
                    f"{p.share:.0%}", (size / scale, p.error), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        ax.axvline(self.file_bytes / scale, color="0.3", lw=1, ls="--", label="this file")
        ax.set_xlabel(f"file size ({unit}, 1 {unit} = {scale:.0e} bytes)".replace("e+0", "e"))
        ax.set_ylabel("relative error of the whole update")
        ax.set_ylim(bottom=0)
        ax.set_title("size/quality (aclora resize --max-size)")
        ax.legend(loc="upper right", fontsize=8)


def _mb(size: int) -> str:
    return f"{size / 1e6:.3g} MB" if size >= 1e5 else f"{size / 1e3:.3g} KB"


def size_curve(path: str, shares: Sequence[float] = TABLE_SHARES, with_smallest: bool = False) -> SizeCurve:
    """The size/quality curve of the LoRA file ``path`` at ``shares`` of its size (see the module docstring);
    ``with_smallest``: also at the smallest file possible, where the curve starts (for the plot).

    A file resize cannot read (LyCORIS, NaN weights, ...) gives a curve saying why, not an error: the
    rank report stands without it.
    """
    path = os.fspath(path)
    curve = SizeCurve(path, os.path.getsize(path))
    try:
        tensors = load_state_dict(path)
        metadata = read_metadata(path)
        modules = _modules(tensors, path)
        dtype = _dtype(None, modules)
        spectra = _analyse(modules, torch.device("cpu"), Progress(0, False), path)
        alpha = _file_alpha(modules, dtype, path)
    except LoRAFileError as err:
        curve.unavailable = " ".join(str(err).split())
        return curve
    criterion = Criterion("importance", min_importance=0.0)  # no criterion cap: only the sizes decide
    max_rank = max(m.rank for m in modules)
    caps, threshold, top = _decide(modules, spectra, criterion, max_rank, max_rank)
    plan = ResizeResult(
        {},
        [],
        criterion,
        alpha,
        max_rank,
        max_rank,
        threshold,
        top,
        0.0,
        str(dtype).replace("torch.", ""),
        {m.name: m.rank for m in modules},
    )
    sizes = {share: int(share * curve.file_bytes) for share in shares}
    if with_smallest:
        smallest = _smallest(modules, spectra, caps, plan, dtype, metadata, path)
        sizes[smallest / curve.file_bytes] = smallest
    for share, max_size in sorted(sizes.items()):
        point = CurvePoint(share, max_size)
        budget = Budget(point.max_size, False)
        budgeted = replace(plan, budget=budget)
        try:
            ranks = _fit_budget(modules, spectra, caps, budgeted, dtype, metadata, path)
        except BudgetError as err:
            curve.smallest = err.smallest
            curve.points.append(point)
            continue
        kept = list(ranks.values())
        point.size, curve.smallest = budget.size, budget.smallest
        point.error = replace(plan, modules=_accounts(modules, spectra, ranks)).error
        point.ranks = (min(kept), median(kept), max(kept))
        curve.points.append(point)
    return curve


def _smallest(modules, spectra, caps, plan: ResizeResult, dtype, metadata, path: str) -> int:
    """The smallest file resize can write (a budget of one byte is refused, saying it)."""
    try:
        _fit_budget(modules, spectra, caps, replace(plan, budget=Budget(1, False)), dtype, metadata, path)
    except BudgetError as err:
        return err.smallest
    return 1  # pragma: no cover - no file is one byte


__all__ = ["TABLE_SHARES", "PLOT_SHARES", "CurvePoint", "SizeCurve", "size_curve"]
