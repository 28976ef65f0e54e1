"""``aclora inspect``: the rank report of a LoRA file (``rank_report``) as text, JSON and a plot."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional

from ..files.storage import LoRAFileError
from .rank_report import DECIDED_BY, RankReport, ReportError, locate, part_label, read_report


# --- text ----------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...]) -> list[str]:
    """Columns padded to width; those in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header)] + [line(r) for r in rows]


def format_report(report: RankReport) -> str:
    lo, mid, hi = report.rank_stats()
    conv = f"; 3x3 conv {report.conv_max_rank}" if report.conv_max_rank else ""
    restarts = f", {len(report.history)} RESTART{'s' if len(report.history) != 1 else ''}" if report.history else ""
    mode = f", restart_mode {report.mode}" if report.mode else ""
    share = 100.0 * report.params / report.params_at_max_rank if report.params_at_max_rank else 100.0
    lines = [
        f"{report.path}",
        f"  {report.source} file for {report.model}{mode}{restarts}"
        + (" (full-rank training weights)" if report.full_rank_file else ""),
        f"  {len(report.modules)} modules, ranks min/median/max {lo}/{mid:g}/{hi} "
        f"(maximum rank {report.max_rank}{conv})",
        f"  parameters {report.params:,} = {share:.1f}% of {report.params_at_max_rank:,} at the maximum rank",
        f"  file size {_size(report.file_bytes)}; at the maximum rank about {_size(report.file_bytes_at_max_rank)}",
    ]
    if report.truncation_error_mean is not None:
        lines.append(
            f"  truncation error of the export (relative, per module) "
            f"mean {report.truncation_error_mean:.3g}, max {report.truncation_error_max:.3g}"
        )
    rows = [
        [
            part_label(b.part, report.model),
            b.block,
            str(b.modules),
            str(b.rank_min),
            f"{b.rank_median:g}",
            str(b.rank_max),
            f"{b.params:,}",
            f"{b.params_at_max_rank:,}",
        ]
        for b in report.blocks
    ]
    rows.append(
        [
            "total",
            "",
            str(len(report.modules)),
            str(lo),
            f"{mid:g}",
            str(hi),
            f"{report.params:,}",
            f"{report.params_at_max_rank:,}",
        ]
    )
    lines += [
        "",
        *_table(["part", "block", "modules", "rank min", "median", "max", "params", "at max rank"], rows, (0, 1)),
    ]
    lines.append("")
    if not report.history:
        plain = " (a plain LoRA file)" if report.source != "AC-LoRA" else ""
        lines.append(f"RESTART history: none in the metadata{plain}")
    else:
        lines.append(f"RESTART history ({len(report.history)})")
        history = [
            [
                str(h.index),
                _opt(h.epoch),
                _opt(h.step),
                _opt(h.p, "{:.4f}"),
                _opt(h.loss, "{:.4f}"),
                f"{h.rank_min}/{h.rank_median:g}/{h.rank_max}",
                DECIDED_BY.get(h.source, h.source) if h.source else "-",
            ]
            for h in report.history
        ]
        lines += [
            "  " + line
            for line in _table(["#", "epoch", "step", "p", "L", "ranks min/median/max", "decided by"], history, (5, 6))
        ]
    return "\n".join(lines)


def _opt(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


# --- plot ----------------------------------------------------------------------------------------------
def plot_report(report: RankReport, out: str, curve: Any = None) -> None:
    """Ranks per module grouped by block and, when the history is known, rank distributions over RESTARTs;
    beside them ``curve.draw(ax)`` (the size/quality curve) when a curve is given."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("--plot needs matplotlib, which is not installed: pip install 'aclora[plot]'") from None
    rows = 2 if report.history else 1
    width = min(18.0, max(9.0, 0.05 * len(report.modules)))
    fig = Figure(figsize=(width + (5.0 if curve is not None else 0.0), 4.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 2, width_ratios=[width, 5.0]) if curve is not None else fig.add_gridspec(rows, 1)
    if curve is not None:
        curve.draw(fig.add_subplot(grid[:, 1]))
    ax = fig.add_subplot(grid[0, 0])
    colors = {part: f"C{i % 10}" for i, part in enumerate(dict.fromkeys(m.part for m in report.modules))}
    xs = range(len(report.modules))
    ax.bar(
        xs,
        [m.rank for m in report.modules],
        width=1.0,
        color=[colors[m.part] for m in report.modules],
        edgecolor="none",
    )
    ax.plot(
        xs,
        [m.max_rank for m in report.modules],
        color="0.3",
        lw=1,
        ls="--",
        drawstyle="steps-mid",
        label="maximum rank",
    )
    start = 0
    for i, block in enumerate(report.blocks):
        end = start + block.modules
        if i % 2:
            ax.axvspan(start - 0.5, end - 0.5, color="0.92", zorder=0)
        ax.text(
            (start + end - 1) / 2,
            -0.02,
            block.block,
            rotation=90,
            ha="center",
            va="top",
            fontsize=8,
            transform=ax.get_xaxis_transform(),
        )
        start = end
    for part in dict.fromkeys(m.part for m in report.modules):
        ax.bar([0], [0], color=colors[part], label=part_label(part, report.model))
    lo, mid, hi = report.rank_stats()
    ax.set_xlim(-0.5, len(report.modules) - 0.5)
    ax.set_xticks([])
    ax.set_ylabel("rank")
    ax.set_title(
        f"{os.path.basename(report.path)}: rank per module ({len(report.modules)} modules, "
        f"min/median/max {lo}/{mid:g}/{hi})"
    )
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    if report.history:
        ax2 = fig.add_subplot(grid[1, 0])
        positions = list(range(1, len(report.history) + 1))
        ax2.boxplot([h.ranks for h in report.history], positions=positions, widths=0.6)
        ax2.plot(positions, [h.rank_median for h in report.history], color="C1", marker="o", label="median")
        labels = [f"#{h.index}" + ("" if h.p is None else f"\np={h.p:.2f}") for h in report.history]
        ax2.set_xticks(positions, labels, fontsize=8)
        ax2.axhline(report.max_rank, color="0.3", lw=1, ls="--", label="maximum rank")
        ax2.set_ylabel("rank")
        ax2.set_xlabel("RESTART")
        ax2.set_title("rank distribution after each RESTART")
        ax2.legend(loc="upper right", fontsize=8)
    try:
        fig.savefig(out, dpi=110)
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot write the plot to {out}: {getattr(err, 'strerror', None) or err}") from None


def run(
    path: str, as_json: bool = False, plot_to: Optional[str] = None, curve: Optional[Callable[[str], Any]] = None
) -> int:
    """Print the rank report of ``path`` (and draw it to ``plot_to``); 0 on success, 1 on a bad file.

    ``curve(path)``: the file's size/quality curve (``resize.curve.size_curve``, passed in by the command:
    it needs resize, which builds on this report), printed after the report, in the JSON as
    ``size_curve``, and drawn beside the rank plot.
    """
    try:
        report = read_report(path)
        sizes = curve(path) if curve is not None else None
        if as_json:
            data = report.as_dict()
            if sizes is not None:
                data["size_curve"] = sizes.as_dict()
            print(json.dumps(data, indent=2))
        else:
            print(format_report(report))
            if sizes is not None:
                print()
                print(sizes.format())
        if plot_to:
            plot_report(report, plot_to, sizes)
            print(f"plot written to {plot_to}", file=sys.stderr if as_json else sys.stdout)
    except (LoRAFileError, ReportError) as err:
        message = " ".join(str(err).split())
        print(f"aclora inspect: error: {message}", file=sys.stderr)
        return 1
    return 0


__all__ = ["RankReport", "ReportError", "read_report", "format_report", "plot_report", "locate", "part_label"]
