"""``aclora resize``: pick the ranks of an existing kohya LoRA file.

A module's update is ΔW = alpha/R · up @ down. Its spectrum comes from the
R x R core of the factors' QR decompositions (``functional.product_core``),
never from an out x in SVD, and the kept components' factors are built from
the stored factors directly, so an SDXL LoRA is resized in seconds.

Criteria (how many components each module keeps):

- ``importance`` (the default): the rule training uses in product mode with no
  held-out data, with unit input energy: a component's importance is its
  singular value in the scaled update ΔW (conv kernels flattened), and every
  module keeps the components above ONE threshold shared by the whole file,
  ``min_importance`` times the largest singular value of any module; at least
  ``min_rank`` per module.
- ``sv_fro``, ``sv_cumulative``, ``sv_ratio``: kohya's resize_lora.py methods
  with its ``--dynamic_param`` (``param``), picking exactly the ranks that
  script picks: its +1, its clamps, its MIN_SV floor, on the full min(out, in)
  spectrum of the unscaled up @ down (``functional.resize_lora_rank``). A rank
  above the module's number of components (the +1 can ask for one more) gets
  zero factors there, where the script stores rounding noise.

Every criterion is capped by ``max_rank`` (``max_conv_rank`` for conv modules,
1x1 included, as resize_lora's ``--new_conv_rank``); by default the largest
rank in the file. The written file follows our alpha convention (see
export.py): one alpha for every module (the file's most common one) and the
factors absorb the rest, so alpha/k · up @ down is the best rank-k
approximation of the module's update.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, TextIO

import torch

from . import functional as F
from .files import LoRAFileError, load_state_dict, read_metadata, save_state_dict
from .functional import median
from .network import __version__
from .options import OPTIONS
from .report import PART_LABELS, ReportError, _block_order, _reference_ranks, _table, format_report, locate, read_report
from .restart import chunk_budget, chunks
from .weights import group_modules, module_alpha

logger = logging.getLogger(__name__)

CRITERIA = ("importance", "sv_fro", "sv_cumulative", "sv_ratio")
# the same default as training's min_importance (product mode without held-out data)
DEFAULT_MIN_IMPORTANCE = next(option.default for option in OPTIONS if option.name == "min_importance")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: files with at least this many modules get a progress bar on a terminal
PROGRESS_MIN_MODULES = 64
# metadata of the input that no longer describes the resized file (replaced, or dropped)
STALE_KEYS = ("aclora_ranks", "aclora_full_rank", "aclora_file_decision", "aclora_truncation_error_mean",
              "aclora_truncation_error_max", "aclora_resize", "aclora_version")

# keys of adapters that are not a plain LoRA/LoCon (matched on the key's dot-separated tail), and what they are
FOREIGN_FORMATS = tuple((re.compile(pattern), what) for pattern, what in (
    (r"(^|\.)dora_scale$", "a DoRA file (dora_scale keys: a per-channel magnitude that is not a low-rank update)"),
    (r"(^|\.)hada_(w[12]_[ab]|t[12])$", "a LyCORIS LoHa file (hada_* keys)"),
    (r"(^|\.)lokr_(w[12](_[ab])?|t[12])$", "a LyCORIS LoKr file (lokr_* keys)"),
    (r"(^|\.)lora_mid\.weight$", "a LyCORIS LoCon file with Tucker decomposition (lora_mid keys)"),
    (r"(^|\.)oft_(blocks|diag)$", "an OFT/BOFT file (oft_blocks / oft_diag keys)"),
    (r"(^|\.)[ab][12]\.weight$", "a LyCORIS GLoRA file (a1/a2/b1/b2 keys)"),
    (r"(^|\.)diff(_b)?$", "a LyCORIS full file (diff keys: whole weight differences)"),
    (r"(^|\.)on_input$", "a LyCORIS (IA)^3 file (on_input keys)"),
    (r"(^|\.)[wb]_norm$", "a LyCORIS file with trained norm layers (w_norm/b_norm keys)"),
    (r"(^|\.)lora_[AB](\.default)?(\.weight)?$", "a diffusers/peft-format LoRA (lora_A/lora_B keys), not kohya format"),
    (r"(^|\.|_)lora\.(down|up)\.weight$", "a diffusers-format LoRA (lora.down/lora.up keys), not kohya format"),
    (r"(^|\.)lora_linear_layer\.(down|up)\.weight$",
     "a diffusers-format LoRA (lora_linear_layer keys), not kohya format"),
))


class ResizeError(ValueError):
    """Resize parameters that cannot be used (the message names the parameter, its value and what is allowed)."""


# --- the criterion ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    """How many components each module keeps (see the module docstring)."""

    name: str = "importance"
    min_importance: float = DEFAULT_MIN_IMPORTANCE  # importance: the threshold, a fraction of the largest singular value
    param: Optional[float] = None  # sv_*: resize_lora's --dynamic_param
    min_rank: int = 1  # importance: fewest components a module keeps
    max_rank: Optional[int] = None  # cap (None: the largest rank in the file)
    max_conv_rank: Optional[int] = None  # cap of conv modules (None: max_rank), resize_lora's --new_conv_rank

    def __post_init__(self) -> None:
        if self.name not in CRITERIA:
            raise ResizeError(f"criterion {self.name!r} is not known; allowed: {', '.join(CRITERIA)}")
        if self.name == "importance":
            if self.param is not None:
                raise ResizeError(f"param={self.param} is for the resize_lora criteria ({', '.join(CRITERIA[1:])}); "
                                  "criterion importance takes min_importance")
            if not 0.0 <= self.min_importance < 1.0:  # the range of training's min_importance option
                raise ResizeError(f"min_importance={self.min_importance} is not valid; allowed: a number >= 0 and < 1 "
                                  "(a fraction of the largest singular value of the file)")
        else:
            if self.param is None:
                raise ResizeError(f"criterion {self.name} needs param (resize_lora's --dynamic_param): "
                                  + ("a ratio > 0 of the largest singular value" if self.name == "sv_ratio"
                                     else "a fraction > 0 and <= 1"))
            ok = self.param > 0 if self.name == "sv_ratio" else 0 < self.param <= 1
            if not ok or not math.isfinite(self.param):
                raise ResizeError(f"param={self.param} is not valid for {self.name}; allowed: "
                                  + ("a number > 0" if self.name == "sv_ratio" else "a number > 0 and <= 1"))
            if self.min_importance != DEFAULT_MIN_IMPORTANCE:
                raise ResizeError(f"min_importance={self.min_importance} is for criterion importance, not {self.name}")
            if self.min_rank != 1:
                raise ResizeError(f"min_rank={self.min_rank} is for criterion importance; resize_lora's {self.name} "
                                  "has no minimum rank")
        for key in ("min_rank", "max_rank", "max_conv_rank"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ResizeError(f"{key}={value!r} is not valid; allowed: an integer >= 1")
        for key in ("max_rank", "max_conv_rank"):
            cap = getattr(self, key)
            if cap is not None and self.min_rank > cap:
                raise ResizeError(f"min_rank={self.min_rank} is larger than {key}={cap}")

    @property
    def value(self) -> float:
        """The criterion's parameter: min_importance, or resize_lora's dynamic_param."""
        return self.min_importance if self.name == "importance" else float(self.param)

    def describe(self) -> str:
        """"importance: 0.01", "sv_fro: 0.9": as resize_lora names its dynamic method in the training comment."""
        return f"{self.name}: {self.value}"


# --- reading and checking the input ------------------------------------------------------------------------
def check_kohya_lora(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The modules of a plain kohya LoRA/LoCon state dict, or LoRAFileError saying why it is not one."""
    for key in tensors:
        for pattern, what in FOREIGN_FORMATS:
            if pattern.search(key):
                raise LoRAFileError(f"{source}: {what}, e.g. {key!r}; aclora resize reads plain LoRA/LoCon files "
                                    "(lora_down / lora_up / alpha) only")
    if not any(key.endswith((".lora_down.weight", ".lora_up.weight")) for key in tensors):
        example = f"; it has e.g. {next(iter(tensors))!r}" if tensors else " (it has no tensors)"
        raise LoRAFileError(f"{source}: not a LoRA file: none of its {len(tensors)} tensors is a kohya LoRA key "
                            f"(<module>.lora_down.weight / .lora_up.weight / .alpha){example}")
    modules = group_modules(tensors, source)
    for name, parts in modules.items():
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.shape[0] == 0:
            raise LoRAFileError(f"{source}: module {name} has rank 0 (lora_down {tuple(down.shape)})")
        if down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoRAFileError(f"{source}: module {name} has a {up.shape[2]}x{up.shape[3]} lora_up kernel; "
                                "a kohya LoCon module has a 1x1 lora_up")
        if not down.dtype.is_floating_point or not up.dtype.is_floating_point:
            raise LoRAFileError(f"{source}: module {name} has {down.dtype}/{up.dtype} factors; expected floating point")
        if "alpha" in parts:
            alpha = float(parts["alpha"])
            if not math.isfinite(alpha):
                raise LoRAFileError(f"{source}: NaN/Inf weights: module {name} has alpha {alpha}")
            if alpha == 0:
                raise LoRAFileError(f"{source}: module {name} has alpha 0, which consumers read differently "
                                    "(sd-scripts as alpha = rank, ComfyUI and diffusers as a zero update)")
    return modules


@dataclass
class _Module:
    name: str
    index: int
    down: torch.Tensor  # (R, in) view, conv kernels flattened
    up: torch.Tensor  # (out, R) view
    down_shape: tuple
    up_shape: tuple
    rank: int
    alpha: float
    conv: bool

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def kind(self) -> str:
        if not self.conv:
            return "linear"
        return "conv1x1" if self.down_shape[2:] == (1, 1) else "conv3x3"

    @property
    def size(self) -> int:
        """Length of the update's full spectrum, min(out, in), as resize_lora sees it."""
        return min(self.up.shape[0], self.down.shape[1])


def _modules(tensors: Mapping[str, torch.Tensor], source: str) -> list[_Module]:
    grouped = check_kohya_lora(tensors, source)
    out = []
    for i, (name, parts) in enumerate(grouped.items()):
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = int(down.shape[0])
        out.append(_Module(name, i, down.reshape(rank, -1), up.reshape(up.shape[0], rank), tuple(down.shape),
                           tuple(up.shape), rank, module_alpha(parts), down.dim() == 4))
    return out


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
            dropped = sum(m.energy * m.error ** 2 for m in members)
            before = [m.rank_before for m in members]
            after = [m.rank_after for m in members]
            rows.append(BlockError(part, block, len(members), (min(before), median(before), max(before)),
                                   (min(after), median(after), max(after)),
                                   math.sqrt(dropped / total) if total > 0 else 0.0, max(m.error for m in members)))
        rows.sort(key=lambda b: _block_order(b.part, b.block))
        return rows


# --- progress ---------------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on ``stream`` (stderr), redrawn at most ten times a second."""

    def __init__(self, total: int, enabled: bool, stream: Optional[TextIO] = None, width: int = 30) -> None:
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.stream = stream or sys.stderr
        self.done, self.drawn_at = 0, 0.0

    def advance(self, n: int, label: str) -> None:
        if not self.enabled:
            return
        self.done = min(self.done + n, self.total)
        now = time.monotonic()
        if now - self.drawn_at < 0.1 and self.done < self.total:
            return
        self.drawn_at = now
        filled = self.width * self.done // self.total
        self.stream.write(f"\raclora resize: [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{100 * self.done // self.total:3d}% {label:<10}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _wants_progress(progress: Optional[bool], modules: int) -> bool:
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and modules >= PROGRESS_MIN_MODULES


# --- resizing ---------------------------------------------------------------------------------------------
def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ResizeError(f"device={device!r} is not a torch device; allowed: cpu, cuda, cuda:N, ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ResizeError(f"device={device!r}: no CUDA device is available on this machine")
    return dev


def _dtype(dtype: Optional[str | torch.dtype], modules: list[_Module]) -> torch.dtype:
    if dtype is None:  # the input's (most common) factor dtype
        return Counter(t.dtype for m in modules for t in (m.down, m.up)).most_common(1)[0][0]
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ResizeError(f"dtype={dtype} is not valid; allowed: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ResizeError(f"dtype={dtype!r} is not valid; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _groups(modules: list[_Module]) -> dict[tuple, list[_Module]]:
    groups: dict[tuple, list[_Module]] = {}
    for m in modules:
        groups.setdefault((m.rank, m.down.shape[1], m.up.shape[0]), []).append(m)
    return groups


def resize_state_dict(tensors: Mapping[str, torch.Tensor], criterion: Criterion | str = "importance", *,
                      dtype: Optional[str | torch.dtype] = None, device: str | torch.device = "cpu",
                      progress: Optional[bool] = False, source: str = "weights", **criterion_args) -> ResizeResult:
    """Resize a kohya LoRA state dict: the resized tensors (kohya keys, one alpha) and a per-module account.

    ``criterion``: a :class:`Criterion`, or its name with its parameters as
    keywords (``resize_state_dict(sd, "sv_fro", param=0.9, max_rank=64)``).
    ``dtype``: of the written factors (fp16, bf16, fp32; default the input's);
    the math runs in float32 (float64 for float64 input) on ``device``.
    Raises LoRAFileError for a file that is not a plain LoRA/LoCon or has
    NaN/Inf weights, ResizeError for bad parameters.
    """
    start = time.perf_counter()
    if isinstance(criterion, str):
        criterion = Criterion(criterion, **criterion_args)
    elif criterion_args:
        raise ResizeError(f"give the criterion's parameters in the Criterion, not as {sorted(criterion_args)}")
    dev = _device(device)
    modules = _modules(tensors, source)
    out_dtype = _dtype(dtype, modules)
    max_rank = criterion.max_rank or max(m.rank for m in modules)
    max_conv_rank = criterion.max_conv_rank or max_rank
    if criterion.min_rank > max_rank or criterion.min_rank > max_conv_rank:
        raise ResizeError(f"min_rank={criterion.min_rank} is larger than the largest rank allowed "
                          f"({min(max_rank, max_conv_rank)})")
    bar = Progress(2 * len(modules), _wants_progress(progress, len(modules)))
    try:
        spectra = _analyse(modules, dev, bar, source)
        ranks, threshold, top = _decide(modules, spectra, criterion, max_rank, max_conv_rank)
        alpha = _file_alpha(modules, out_dtype, source)
        tensors_out, accounts = _write(modules, spectra, ranks, alpha, out_dtype, dev, bar)
    finally:
        bar.close()
    bad = sorted({key.rsplit(".", 2)[0] for key, t in tensors_out.items() if not bool(torch.isfinite(t).all())})
    if bad:
        raise LoRAFileError(f"{source}: the resized weights of {len(bad)} module(s) do not fit in "
                            f"{str(out_dtype).replace('torch.', '')} (e.g. {bad[0]}); use a wider dtype (bf16 or fp32)")
    return ResizeResult(tensors_out, accounts, criterion, alpha, max_rank, max_conv_rank, threshold, top,
                        time.perf_counter() - start, str(out_dtype).replace("torch.", ""),
                        {m.name: m.rank for m in modules})


@dataclass
class _Spectrum:
    s: torch.Tensor  # (R,) singular values of the unscaled up @ down
    to_up: torch.Tensor  # (R, R)
    to_down: torch.Tensor  # (R, R)


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stack(batch: list[_Module], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _math_dtype(batch[0].down)
    down = torch.stack([m.down.to(dev, dtype) for m in batch])
    up = torch.stack([m.up.to(dev, dtype) for m in batch])
    return down, up


def _analyse(modules: list[_Module], dev: torch.device, bar: Progress, source: str) -> dict[int, _Spectrum]:
    """Pass 1: every module's spectrum and component maps, in batches of same-shaped modules."""
    spectra: dict[int, _Spectrum] = {}
    non_finite: list[str] = []
    with torch.no_grad():
        for (rank, cols, rows), members in _groups(modules).items():
            for batch in chunks(members, F.chunk_size(rows, cols, rank, chunk_budget(dev))):
                down, up = _stack(batch, dev)
                finite = F.is_finite(down, up)
                if not bool(finite.all()):
                    non_finite += [m.name for m, ok in zip(batch, finite.tolist()) if not ok]
                    bar.advance(len(batch), "analysing")
                    continue
                s, to_up, to_down = F.product_core(down, up)
                for j, m in enumerate(batch):
                    spectra[m.index] = _Spectrum(s[j], to_up[j], to_down[j])
                bar.advance(len(batch), "analysing")
    if non_finite:
        more = f" (and {len(non_finite) - 5} more)" if len(non_finite) > 5 else ""
        raise LoRAFileError(f"{source}: NaN/Inf weights in {len(non_finite)} module(s): "
                            f"{', '.join(non_finite[:5])}{more}")
    return spectra


def _decide(modules: list[_Module], spectra: dict[int, _Spectrum], criterion: Criterion, max_rank: int,
            max_conv_rank: int) -> tuple[dict[int, int], Optional[float], Optional[float]]:
    """Each module's new rank: {module index: rank}, and (threshold, top) for the importance criterion."""
    ranks: dict[int, int] = {}
    threshold = top = None
    if criterion.name == "importance":  # singular values of the scaled update alpha/R * up @ down
        importance = {m.index: spectra[m.index].s.double().cpu() * abs(m.scale) for m in modules}
        top = max(float(v[0]) for v in importance.values())
        threshold = criterion.min_importance * top
    for (rank, cols, rows), members in _groups(modules).items():
        s = torch.stack([spectra[m.index].s for m in members]).double().cpu()
        caps = torch.tensor([max_conv_rank if m.conv else max_rank for m in members])
        if criterion.name == "importance":
            keep = F.keep_above(torch.stack([importance[m.index] for m in members]), threshold, criterion.min_rank)
            chosen = torch.minimum(keep.sum(dim=1), caps)
        else:
            sizes = torch.tensor([m.size for m in members])
            chosen = F.resize_lora_rank(s, criterion.name, criterion.value, sizes, caps)
        ranks.update({m.index: int(k) for m, k in zip(members, chosen.tolist())})
    return ranks, threshold, top


def _file_alpha(modules: list[_Module], dtype: torch.dtype, source: str) -> float:
    """The one alpha of the written file: the input's most common alpha, as ``dtype`` stores it."""
    value = Counter(m.alpha for m in modules).most_common(1)[0][0]
    stored = float(torch.tensor(value).to(dtype))
    if not math.isfinite(stored) or stored == 0:
        raise LoRAFileError(f"{source}: its alpha {value} cannot be stored in {str(dtype).replace('torch.', '')}")
    return stored


def _write(modules: list[_Module], spectra: dict[int, _Spectrum], ranks: dict[int, int], alpha: float,
           dtype: torch.dtype, dev: torch.device, bar: Progress) -> tuple[dict[str, torch.Tensor], list[ModuleResize]]:
    """Pass 2: the kept components' factors, in batches; alpha/k * up @ down = the module's scaled rank-k part."""
    out: dict[str, torch.Tensor] = {}
    accounts: dict[int, ModuleResize] = {}
    with torch.no_grad():
        for (rank, cols, rows), members in _groups(modules).items():
            for batch in chunks(members, F.chunk_size(rows, cols, rank, chunk_budget(dev))):
                down, up = _stack(batch, dev)
                s = torch.stack([spectra[m.index].s for m in batch])
                to_up = torch.stack([spectra[m.index].to_up for m in batch])
                to_down = torch.stack([spectra[m.index].to_down for m in batch])
                counts = torch.tensor([min(ranks[m.index], rank) for m in batch], device=s.device)
                new_down, new_up = F.component_factors(down, up, s, to_up, to_down, counts, int(counts.max()))
                errors = F.truncation_error(s, counts).tolist()
                energies = (s.double().square().sum(dim=1)).tolist()
                for j, m in enumerate(batch):
                    k, kept = ranks[m.index], int(counts[j])
                    ratio = k * m.scale / alpha  # alpha/k * up' @ down' == scale * (rank-k part of up @ down)
                    gain = math.sqrt(abs(ratio))
                    d = torch.zeros(k, cols, dtype=new_down.dtype, device=new_down.device)
                    u = torch.zeros(rows, k, dtype=new_up.dtype, device=new_up.device)
                    d[:kept] = new_down[j, :kept] * gain
                    u[:, :kept] = new_up[j, :, :kept] * (gain if ratio >= 0 else -gain)
                    out[f"{m.name}.lora_down.weight"] = d.reshape((k,) + m.down_shape[1:]).to("cpu", dtype)
                    out[f"{m.name}.lora_up.weight"] = u.reshape((m.up_shape[0], k) + m.up_shape[2:]).to("cpu", dtype)
                    out[f"{m.name}.alpha"] = torch.tensor(alpha).to(dtype)
                    accounts[m.index] = ModuleResize(m.name, m.kind, m.rank, k, errors[j], energies[j] * m.scale ** 2)
                bar.advance(len(batch), "writing")
    return out, [accounts[m.index] for m in modules]


# --- the file -----------------------------------------------------------------------------------------------
def resized_metadata(metadata: Mapping[str, str], result: ResizeResult, source: str = "weights") -> dict[str, str]:
    """The input's metadata, updated the way resize_lora does, with our rank metadata.

    ss_* keys are kept; ``ss_network_dim`` / ``ss_network_alpha`` read "Dynamic"
    and ``ss_training_comment`` gains resize_lora's "Dynamic resize with
    <method>: <param> from <old dim>; " prefix. The sshs_* hashes are left to
    ``save_state_dict``, which recomputes them. An AC-LoRA input keeps its
    training story (aclora_history, aclora_modules, ...); ranks, errors and
    the resize itself are described anew.
    """
    meta = {k: v for k, v in metadata.items() if k not in STALE_KEYS and not k.startswith("sshs_")}
    old_dim = max(result.source_ranks.values())
    comment = metadata.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"Dynamic resize with {result.criterion.describe()} from {old_dim}; {comment}"
    meta["ss_network_dim"] = "Dynamic"
    meta["ss_network_alpha"] = "Dynamic"
    shapes = {m.name: (m.kind, m.rank_before) for m in result.modules}
    linear, conv = _reference_ranks(dict(metadata), source, shapes)
    ranks = result.ranks
    errors = [m.error for m in result.modules]
    meta.update({
        "aclora_version": __version__,
        "aclora_ranks": json.dumps(ranks, separators=(",", ":")),
        "aclora_max_rank": str(linear),
        "aclora_truncation_error_mean": f"{sum(errors) / len(errors):.6g}",
        "aclora_truncation_error_max": f"{max(errors):.6g}",
        "aclora_resize": json.dumps(_resize_record(result), separators=(",", ":")),
    })
    meta.setdefault("aclora_modules", json.dumps(list(ranks), separators=(",", ":")))
    if conv is not None:
        meta["aclora_conv_max_rank"] = str(conv)
    return meta


def _resize_record(result: ResizeResult) -> dict:
    c = result.criterion
    record = {"criterion": c.name, "param": c.value, "max_rank": result.max_rank, "max_conv_rank": result.max_conv_rank,
              "alpha": result.alpha, "dtype": result.dtype}
    if c.name == "importance":
        record.update(min_rank=c.min_rank, threshold=result.threshold, largest_singular_value=result.top)
    before = list(result.source_ranks.values())
    record["source_ranks"] = {"min": min(before), "median": median(before), "max": max(before)}
    return record


def resize_file(source: str, target: str, criterion: Criterion | str = "importance", *,
                dtype: Optional[str | torch.dtype] = None, device: str | torch.device = "cpu",
                progress: Optional[bool] = None, **criterion_args) -> ResizeResult:
    """Resize the LoRA file ``source`` into ``target`` (.safetensors, written atomically).

    Nothing is written when anything fails: an existing ``target`` is only
    ever replaced by a complete file. ``progress``: a bar on stderr (None: only
    on a terminal, for files with many modules). See :func:`resize_state_dict`.
    """
    source, target = os.fspath(source), os.fspath(target)
    if not target.endswith(".safetensors"):
        raise ResizeError(f"output {target!r} is not a .safetensors path; aclora resize writes safetensors files")
    if os.path.isdir(target):
        raise ResizeError(f"output {target!r} is a directory; give the path of the .safetensors file to write")
    if isinstance(criterion, str):
        criterion = Criterion(criterion, **criterion_args)  # bad parameters fail before the file is read
        criterion_args = {}
    tensors = load_state_dict(source)
    metadata = read_metadata(source)
    result = resize_state_dict(tensors, criterion, dtype=dtype, device=device, progress=progress, source=source,
                               **criterion_args)
    save_state_dict(target, result.tensors, resized_metadata(metadata, result, source))
    ranks = list(result.ranks.values())
    logger.info("resized %s -> %s with %s: %d modules, ranks %d..%d, %.2f s", source, target,
                result.criterion.describe(), len(ranks), min(ranks), max(ranks), result.seconds)
    return result


def result_summary(result: ResizeResult) -> dict:
    """The result as plain JSON-able data (without the tensors)."""
    return {"criterion": asdict(result.criterion), "alpha": result.alpha, "max_rank": result.max_rank,
            "max_conv_rank": result.max_conv_rank, "threshold": result.threshold, "top": result.top,
            "seconds": result.seconds, "dtype": result.dtype, "modules": [asdict(m) for m in result.modules],
            "blocks": [asdict(b) for b in result.blocks()]}


# --- the command ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aclora resize",
        description="Pick every module's rank of an existing kohya LoRA file (SD1.x, SD2.x, SDXL; LoRA and LoCon) "
                    "and write the resized file. The default criterion keeps, in every module, the components whose "
                    "singular value exceeds one threshold shared by the whole file (--min-importance times the "
                    "largest one); kohya resize_lora's sv_fro / sv_cumulative / sv_ratio are available with --param.")
    parser.add_argument("input", metavar="IN.safetensors", help="the LoRA file to resize")
    parser.add_argument("output", metavar="OUT.safetensors", help="the file to write (replaced only by a complete file)")
    parser.add_argument("--criterion", default="importance", choices=CRITERIA,
                        help="how ranks are chosen (default importance)")
    parser.add_argument("--min-importance", type=float, default=DEFAULT_MIN_IMPORTANCE, metavar="F",
                        help="importance: keep components above F x the largest singular value of the file "
                             f"(default {DEFAULT_MIN_IMPORTANCE}; 0 keeps every nonzero component)")
    parser.add_argument("--param", type=float, default=None, metavar="X",
                        help="sv_fro / sv_cumulative: the share of the Frobenius norm / of the sum of singular values "
                             "to keep (0 < X <= 1); sv_ratio: the largest ratio to the first singular value (X > 0); "
                             "resize_lora's --dynamic_param")
    parser.add_argument("--min-rank", type=int, default=1, metavar="N",
                        help="importance: fewest components a module keeps (default 1)")
    parser.add_argument("--max-rank", type=int, default=None, metavar="N",
                        help="largest rank of a module (default: the largest rank in the file); resize_lora's --new_rank")
    parser.add_argument("--max-conv-rank", type=int, default=None, metavar="N",
                        help="largest rank of a conv module, 1x1 included (default --max-rank); resize_lora's "
                             "--new_conv_rank")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="precision of the written factors (default: the input's)")
    parser.add_argument("--device", default="cpu", help="where the math runs: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--progress", action="store_true",
                        help="always show the progress bar (default: on a terminal, for files with many modules)")
    parser.add_argument("--json", action="store_true", help="print the per-module and per-block result as JSON")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``aclora resize``: 0 on success, 1 (one line on stderr, nothing written) when the file or a parameter is bad."""
    args = build_parser().parse_args(argv)
    try:
        result = resize_file(args.input, args.output, args.criterion, dtype=args.dtype, device=args.device,
                             progress=True if args.progress else None, min_importance=args.min_importance,
                             param=args.param, min_rank=args.min_rank, max_rank=args.max_rank,
                             max_conv_rank=args.max_conv_rank)
    except (LoRAFileError, ResizeError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"aclora resize: error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result_summary(result), indent=2))
        return 0
    print(format_summary(result, args.input, args.output))
    print()
    try:
        print(format_report(read_report(args.output)))
    except (LoRAFileError, ReportError) as err:  # the file is written; only the report failed
        print(f"aclora resize: the rank report could not be read back: {err}", file=sys.stderr)
        return 1
    print()
    print(format_block_errors(result))
    return 0


def format_summary(result: ResizeResult, source: str, target: str) -> str:
    before, after = list(result.source_ranks.values()), list(result.ranks.values())
    lines = [f"resized {source} -> {target} in {result.seconds:.2f} s with {result.criterion.describe()}"
             + (f" (threshold {result.threshold:.4g} = {result.criterion.min_importance:g} x the largest singular "
                f"value {result.top:.4g})" if result.threshold is not None else ""),
             f"  {len(after)} modules, ranks min/median/max {min(before)}/{median(before):g}/{max(before)} -> "
             f"{min(after)}/{median(after):g}/{max(after)}; one alpha {result.alpha:g}, {result.dtype}"]
    return "\n".join(lines)


def format_block_errors(result: ResizeResult) -> str:
    """Per block: ranks before and after, and the relative Frobenius error of the resized updates."""
    rows = [[PART_LABELS[b.part], b.block, str(b.modules), "{}/{:g}/{}".format(*b.ranks_before),
             "{}/{:g}/{}".format(*b.ranks_after), f"{b.error:.3g}", f"{b.error_max:.3g}"] for b in result.blocks()]
    header = ["part", "block", "modules", "ranks before", "ranks after", "rel. error", "max module error"]
    return "\n".join(["relative error of the resized updates per block, ||dW - dW'||_F / ||dW||_F "
                      "(all of the block's modules together)", *_table(header, rows, (0, 1))])


__all__ = ["CRITERIA", "Criterion", "ResizeError", "ResizeResult", "ModuleResize", "BlockError", "check_kohya_lora",
           "resize_state_dict", "resize_file", "resized_metadata", "result_summary", "Progress", "main"]
