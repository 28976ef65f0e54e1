"""The rank report of a LoRA file: which rank every module kept, per block, and how RESTART got there.

Reads AC-LoRA files and plain kohya LoRA files (fixed rank, no ``aclora_*``
metadata) alike: ranks come from the tensors (what every consumer uses), the
maximum rank and the RESTART history from the metadata when it has them.
Blocks follow the U-Net's own naming: diffusers (down_blocks / mid_block /
up_blocks) or sd-scripts' SDXL U-Net (input_blocks / middle_block /
output_blocks), plus one row per text encoder; FLUX.1 and SD3 files by their
DiT's blocks (double/single blocks, joint blocks' context and x halves, input
and final layers; see ``dit_names``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from ..families import model_family
from ..files.lora_dict import group_modules
from ..files.storage import LoRAFileError, load_state_dict, metadata_json, metadata_ranks, read_metadata
from ..functional import median
from .dit_names import DIT_PART_LABELS, DIT_PARTS, dit_model, locate_dit, text_encoder_label


class ReportError(Exception):
    """The report cannot be drawn or written (matplotlib missing for ``--plot``, an unwritable path)."""


PARTS = ("te", "te1", "te2", "te3", "input", "middle", "output", *DIT_PARTS, "other")
PART_LABELS = {"te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2", "input": "U-Net input",
               "middle": "U-Net middle", "output": "U-Net output", "other": "other", **DIT_PART_LABELS}
_UNET_BLOCK = re.compile(r"(down_blocks|input_blocks|up_blocks|output_blocks)_(\d+)_")


@dataclass
class ModuleRank:
    name: str
    part: str  # one of PARTS
    block: str  # "down_blocks.1", "input_blocks.4", "mid_block", "te1", ...
    kind: str  # "linear", "conv1x1" or "conv3x3"
    rank: int
    max_rank: int  # the rank of the same LoRA trained without RESTART
    params: int
    params_at_max_rank: int


@dataclass
class BlockRow:
    part: str
    block: str
    modules: int
    rank_min: int
    rank_median: float
    rank_max: int
    params: int
    params_at_max_rank: int


@dataclass
class RestartRow:
    index: int
    epoch: Optional[int]
    step: Optional[int]
    p: Optional[float]
    loss: Optional[float]
    rank_min: int
    rank_median: float
    rank_max: int
    ranks: list[int] = field(repr=False)
    source: Optional[str] = None  # how the RESTART decided (aclora_history's "source"; DECIDED_BY says it in words)


#: the history's "source" of a RESTART, in the report's words
DECIDED_BY = {"loss": "p from the loss", "fixed_p": "fixed_p", "given": "p given", "validation": "held-out loss",
              "prior": "min_importance", "frozen": "held ranks", "deferred": "deferred (no held-out loss)"}


@dataclass
class RankReport:
    path: str
    source: str  # "AC-LoRA" or "kohya LoRA"
    model: str  # "SDXL", "SD1.x/2.x" or "unknown"
    max_rank: int
    conv_max_rank: Optional[int]
    file_bytes: int
    file_bytes_at_max_rank: int
    modules: list[ModuleRank]
    blocks: list[BlockRow]
    history: list[RestartRow]
    mode: Optional[str] = None
    full_rank_file: bool = False
    truncation_error_mean: Optional[float] = None
    truncation_error_max: Optional[float] = None

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def params_at_max_rank(self) -> int:
        return sum(m.params_at_max_rank for m in self.modules)

    def rank_stats(self) -> tuple[int, float, int]:
        ranks = [m.rank for m in self.modules]
        return min(ranks), median(ranks), max(ranks)

    def as_dict(self) -> dict[str, Any]:
        """Everything in the report, as plain JSON-able data."""
        lo, mid, hi = self.rank_stats()
        data = asdict(self)
        data.update(params=self.params, params_at_max_rank=self.params_at_max_rank,
                    ranks={"min": lo, "median": mid, "max": hi})
        return data


# --- reading -------------------------------------------------------------------------------------------
def locate(name: str) -> tuple[str, str]:
    """(part, block) of a kohya module name."""
    te = re.match(r"lora_(te[123]?)_", name)
    if te:
        return te[1], te[1]
    dit = locate_dit(name)
    if dit:
        return dit
    if not name.startswith("lora_unet_"):
        return "other", "other"
    rest = name[len("lora_unet_"):]
    block = _UNET_BLOCK.match(rest)
    if block:
        part = "input" if block[1] in ("down_blocks", "input_blocks") else "output"
        return part, f"{block[1]}.{block[2]}"
    for prefix in ("mid_block", "middle_block"):
        if rest.startswith(prefix + "_"):
            return "middle", prefix
    return "other", "unet"


def _block_order(part: str, block: str) -> tuple:
    number = re.search(r"\.(\d+)(?:\.|$)", block)  # "down_blocks.1", "joint_blocks.3.x"
    return PARTS.index(part), int(number[1]) if number else -1, block


def _int_field(meta: dict, key: str, path: str) -> Optional[int]:
    """A positive integer field; our own (aclora_*) must be one when present, others (ss_*) are only hints."""
    raw = meta.get(key)
    if raw is None or raw in ("", "Dynamic", "None"):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not value.is_integer() or value < 1:
        if key.startswith("aclora_"):
            raise LoRAFileError(f"{path}: metadata field {key}={raw!r} is not a positive integer")
        return None
    return int(value)


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _history(meta: dict, path: str) -> list[RestartRow]:
    entries = metadata_json(meta, "aclora_history", path, list) or []
    rows = []
    for i, entry in enumerate(entries):
        ranks = entry.get("ranks") if isinstance(entry, dict) else None
        if not isinstance(ranks, list) or not ranks or not all(isinstance(k, int) for k in ranks):
            raise LoRAFileError(f"{path}: metadata field aclora_history: restart {i + 1} has no list of integer ranks")
        if not all(_number(entry.get(key)) for key in ("index", "epoch", "step", "p", "loss")):
            raise LoRAFileError(f"{path}: metadata field aclora_history: restart {i + 1} has a non-numeric "
                                "index, epoch, step, p or loss")
        rows.append(RestartRow(index=int(entry.get("index", i + 1)), epoch=entry.get("epoch"), step=entry.get("step"),
                               p=entry.get("p"), loss=entry.get("loss"), rank_min=min(ranks),
                               rank_median=median(ranks), rank_max=max(ranks), ranks=ranks,
                               source=entry.get("source") if isinstance(entry.get("source"), str) else None))
    return rows


def _reference_ranks(meta: dict, path: str, modules: dict[str, tuple[str, int]]) -> tuple[int, Optional[int]]:
    """(maximum rank of linear / 1x1 modules, of 3x3 conv modules): from metadata, else the largest in the file."""
    linear = _int_field(meta, "aclora_max_rank", path) or _int_field(meta, "ss_network_dim", path)
    conv = _int_field(meta, "aclora_conv_max_rank", path)
    if conv is None:  # a plain kohya file: sd-scripts records --network_args as JSON
        try:
            args = json.loads(meta.get("ss_network_args") or "{}")
        except json.JSONDecodeError:
            args = {}
        conv = _int_field(args if isinstance(args, dict) else {}, "conv_dim", path)
    linear_ranks = [k for kind, k in modules.values() if kind != "conv3x3"]
    conv_ranks = [k for kind, k in modules.values() if kind == "conv3x3"]
    linear = max([linear or 0] + linear_ranks)
    conv = max([conv or 0] + conv_ranks) if conv_ranks else None
    return linear, conv


def read_report(path: str) -> RankReport:
    """Read a LoRA file into a :class:`RankReport`; LoRAFileError with the reason when it is not usable."""
    path = os.fspath(path)
    tensors = load_state_dict(path)
    meta = read_metadata(path)
    modules = group_modules(tensors, path)
    metadata_ranks(meta, path)  # a damaged field is an error, even where the tensors suffice
    history = _history(meta, path)

    shapes = {}
    for name, parts in modules.items():
        down = parts["lora_down.weight"]
        kind = "linear" if down.dim() == 2 else "conv1x1" if tuple(down.shape[2:]) == (1, 1) else "conv3x3"
        shapes[name] = (kind, int(down.shape[0]))
    max_rank, conv_max_rank = _reference_ranks(meta, path, shapes)

    rows, extra_bytes = [], 0
    for name, parts in modules.items():
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        kind, k = shapes[name]
        reference = max(k, conv_max_rank if kind == "conv3x3" else max_rank)
        per_rank = down[0].numel() + up.shape[0]
        part, block = locate(name)
        rows.append(ModuleRank(name, part, block, kind, k, reference, k * per_rank, reference * per_rank))
        extra_bytes += (reference - k) * (down[0].numel() * down.element_size() + up.shape[0] * up.element_size())

    blocks = []
    for key in {(m.part, m.block) for m in rows}:
        members = [m for m in rows if (m.part, m.block) == key]
        ranks = [m.rank for m in members]
        blocks.append(BlockRow(key[0], key[1], len(members), min(ranks), median(ranks), max(ranks),
                               sum(m.params for m in members), sum(m.params_at_max_rank for m in members)))
    blocks.sort(key=lambda b: _block_order(b.part, b.block))
    rows.sort(key=lambda m: (_block_order(m.part, m.block), m.name))

    is_ours = any(key.startswith("aclora_") for key in meta)
    model = dit_model(modules, meta) or model_family(modules)
    if model is None:
        base = meta.get("ss_base_model_version", "")
        model = "SDXL" if base.startswith("sdxl") or any("_transformer_blocks_1_" in n for n in modules) else (
            "SD1.x/2.x" if any(n.startswith("lora_unet_") for n in modules) else "unknown")
    size = os.path.getsize(path)
    return RankReport(
        path=path, source="AC-LoRA" if is_ours else "kohya LoRA", model=model, max_rank=max_rank,
        conv_max_rank=conv_max_rank, file_bytes=size, file_bytes_at_max_rank=size + extra_bytes, modules=rows,
        blocks=blocks, history=history, mode=meta.get("aclora_mode"),
        full_rank_file=meta.get("aclora_full_rank") == "true",
        truncation_error_mean=_float(meta, "aclora_truncation_error_mean"),
        truncation_error_max=_float(meta, "aclora_truncation_error_max"))


def _float(meta: dict, key: str) -> Optional[float]:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


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
        lines.append(f"  truncation error of the export (relative, per module) "
                     f"mean {report.truncation_error_mean:.3g}, max {report.truncation_error_max:.3g}")
    rows = [[part_label(b.part, report.model), b.block, str(b.modules), str(b.rank_min), f"{b.rank_median:g}", str(b.rank_max),
             f"{b.params:,}", f"{b.params_at_max_rank:,}"] for b in report.blocks]
    rows.append(["total", "", str(len(report.modules)), str(lo), f"{mid:g}", str(hi), f"{report.params:,}",
                 f"{report.params_at_max_rank:,}"])
    lines += ["", *_table(["part", "block", "modules", "rank min", "median", "max", "params", "at max rank"], rows, (0, 1))]
    lines.append("")
    if not report.history:
        plain = " (a plain LoRA file)" if report.source != "AC-LoRA" else ""
        lines.append(f"RESTART history: none in the metadata{plain}")
    else:
        lines.append(f"RESTART history ({len(report.history)})")
        history = [[str(h.index), _opt(h.epoch), _opt(h.step), _opt(h.p, "{:.4f}"), _opt(h.loss, "{:.4f}"),
                    f"{h.rank_min}/{h.rank_median:g}/{h.rank_max}", DECIDED_BY.get(h.source, h.source or "-")]
                   for h in report.history]
        lines += ["  " + line for line in _table(["#", "epoch", "step", "p", "L", "ranks min/median/max", "decided by"],
                                                 history, (5, 6))]
    return "\n".join(lines)


def part_label(part: str, model: str) -> str:
    """How the report names a part: "text encoder 1 (CLIP-L)" in a FLUX.1/SD3 file, else PART_LABELS."""
    encoder = text_encoder_label(part, model)
    return f"{PART_LABELS[part]} ({encoder})" if encoder else PART_LABELS[part]


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
    ax.bar(xs, [m.rank for m in report.modules], width=1.0, color=[colors[m.part] for m in report.modules],
           edgecolor="none")
    ax.plot(xs, [m.max_rank for m in report.modules], color="0.3", lw=1, ls="--", drawstyle="steps-mid",
            label="maximum rank")
    start = 0
    for i, block in enumerate(report.blocks):
        end = start + block.modules
        if i % 2:
            ax.axvspan(start - 0.5, end - 0.5, color="0.92", zorder=0)
        ax.text((start + end - 1) / 2, -0.02, block.block, rotation=90, ha="center", va="top", fontsize=8,
                transform=ax.get_xaxis_transform())
        start = end
    for part in dict.fromkeys(m.part for m in report.modules):
        ax.bar([0], [0], color=colors[part], label=part_label(part, report.model))
    lo, mid, hi = report.rank_stats()
    ax.set_xlim(-0.5, len(report.modules) - 0.5)
    ax.set_xticks([])
    ax.set_ylabel("rank")
    ax.set_title(f"{os.path.basename(report.path)}: rank per module ({len(report.modules)} modules, "
                 f"min/median/max {lo}/{mid:g}/{hi})")
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


def run(path: str, as_json: bool = False, plot_to: Optional[str] = None,
        curve: Optional[Callable[[str], Any]] = None) -> int:
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
