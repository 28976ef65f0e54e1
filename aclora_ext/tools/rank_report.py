"""The rank report of a LoRA file, read: which rank every module kept, per block, and how RESTART got there.

Reads AC-LoRA files and plain kohya LoRA files (fixed rank, no ``aclora_*``
metadata) alike: ranks come from the tensors (what every consumer uses), the
maximum rank and the RESTART history from the metadata when it has them.
Blocks follow the U-Net's own naming: diffusers (down_blocks / mid_block /
up_blocks) or sd-scripts' SDXL U-Net (input_blocks / middle_block /
output_blocks), plus one row per text encoder; FLUX.1 and SD3 files by their
DiT's blocks (double/single blocks, joint blocks' context and x halves, input
and final layers; see ``dit_names``). ``inspect`` prints and draws it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..families import model_family
from ..files.lora_dict import group_modules
from ..files.storage import LoRAFileError, load_state_dict, metadata_json, metadata_ranks, read_metadata
from ..functional import median
from .dit_names import DIT_PART_LABELS, DIT_PARTS, dit_model, locate_dit, text_encoder_label
from .lumina_names import LUMINA_PART_LABELS, LUMINA_PARTS, locate_lumina, lumina_model, lumina_text_encoder


class ReportError(Exception):
    """The report cannot be drawn or written (matplotlib missing for ``--plot``, an unwritable path)."""


PARTS = ("te", "te1", "te2", "te3", "input", "middle", "output", *DIT_PARTS[:-1], *LUMINA_PARTS, DIT_PARTS[-1], "other")
PART_LABELS = {
    "te": "text encoder",
    "te1": "text encoder 1",
    "te2": "text encoder 2",
    "input": "U-Net input",
    "middle": "U-Net middle",
    "output": "U-Net output",
    "other": "other",
    **DIT_PART_LABELS,
    **LUMINA_PART_LABELS,
}
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
DECIDED_BY = {
    "loss": "p from the loss",
    "fixed_p": "fixed_p",
    "given": "p given",
    "validation": "held-out loss",
    "prior": "min_importance",
    "frozen": "held ranks",
    "deferred": "deferred (no held-out loss)",
}


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
        data.update(
            params=self.params, params_at_max_rank=self.params_at_max_rank, ranks={"min": lo, "median": mid, "max": hi}
        )
        return data


# --- reading -------------------------------------------------------------------------------------------
def locate(name: str) -> tuple[str, str]:
    """(part, block) of a kohya module name."""
    te = re.match(r"lora_(te[123]?)_", name)
    if te:
        return te[1], te[1]
    dit = locate_lumina(name) or locate_dit(name)
    if dit:
        return dit
    if not name.startswith("lora_unet_"):
        return "other", "other"
    rest = name[len("lora_unet_") :]
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
            raise LoRAFileError(
                f"{path}: metadata field aclora_history: restart {i + 1} has a non-numeric "
                "index, epoch, step, p or loss"
            )
        rows.append(
            RestartRow(
                index=int(entry.get("index", i + 1)),
                epoch=entry.get("epoch"),
                step=entry.get("step"),
                p=entry.get("p"),
                loss=entry.get("loss"),
                rank_min=min(ranks),
                rank_median=median(ranks),
                rank_max=max(ranks),
                ranks=ranks,
                source=entry.get("source") if isinstance(entry.get("source"), str) else None,
            )
        )
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
        cap = conv_max_rank if kind == "conv3x3" else max_rank
        assert cap is not None  # _reference_ranks gives a conv rank whenever the file has a 3x3 conv
        reference = max(k, cap)
        per_rank = down[0].numel() + up.shape[0]
        part, block = locate(name)
        rows.append(ModuleRank(name, part, block, kind, k, reference, k * per_rank, reference * per_rank))
        extra_bytes += (reference - k) * (down[0].numel() * down.element_size() + up.shape[0] * up.element_size())

    blocks = []
    for key in {(m.part, m.block) for m in rows}:
        members = [m for m in rows if (m.part, m.block) == key]
        ranks = [m.rank for m in members]
        blocks.append(
            BlockRow(
                key[0],
                key[1],
                len(members),
                min(ranks),
                median(ranks),
                max(ranks),
                sum(m.params for m in members),
                sum(m.params_at_max_rank for m in members),
            )
        )
    blocks.sort(key=lambda b: _block_order(b.part, b.block))
    rows.sort(key=lambda m: (_block_order(m.part, m.block), m.name))

    is_ours = any(key.startswith("aclora_") for key in meta)
    model = dit_model(modules, meta) or lumina_model(modules, meta) or model_family(modules)
    if model is None:
        base = meta.get("ss_base_model_version", "")
        model = (
            "SDXL"
            if base.startswith("sdxl") or any("_transformer_blocks_1_" in n for n in modules)
            else ("SD1.x/2.x" if any(n.startswith("lora_unet_") for n in modules) else "unknown")
        )
    size = os.path.getsize(path)
    return RankReport(
        path=path,
        source="AC-LoRA" if is_ours else "kohya LoRA",
        model=model,
        max_rank=max_rank,
        conv_max_rank=conv_max_rank,
        file_bytes=size,
        file_bytes_at_max_rank=size + extra_bytes,
        modules=rows,
        blocks=blocks,
        history=history,
        mode=meta.get("aclora_mode"),
        full_rank_file=meta.get("aclora_full_rank") == "true",
        truncation_error_mean=_float(meta, "aclora_truncation_error_mean"),
        truncation_error_max=_float(meta, "aclora_truncation_error_max"),
    )


def _float(meta: dict, key: str) -> Optional[float]:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


def part_label(part: str, model: str) -> str:
    """How the report names a part: "text encoder 1 (CLIP-L)" in a FLUX.1/SD3 file, else PART_LABELS."""
    encoder = text_encoder_label(part, model) or lumina_text_encoder(part, model)
    return f"{PART_LABELS[part]} ({encoder})" if encoder else PART_LABELS[part]
