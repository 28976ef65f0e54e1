"""``aclora resize``: pick the ranks of an existing kohya LoRA file.

A module's update is ΔW = alpha/R · up @ down. Its spectrum comes from the
R x R core of the factors' QR decompositions (``functional.product_core``),
never from an out x in SVD, and the kept components' factors are built from
the stored factors directly, so an SDXL LoRA is resized in seconds. How many
components each module keeps is the criterion's (``criteria``). The written
file follows our alpha convention (see ``lora/export.py``): one alpha for every
module (the file's most common one) and the factors absorb the rest, so
alpha/k · up @ down is the best rank-k approximation of the module's update.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch

from ... import functional as F
from ...files.storage import LoRAFileError, load_state_dict, read_metadata, save_state_dict
from ...functional import median
from ...lora.batching import chunk_budget, chunks
from ...version import __version__
from ..rank_report import _reference_ranks
from .criteria import Criterion, ResizeError
from .inputs import _Module, _modules
from .max_size import Budget, budget_criterion, fit_budget, parse_max_size
from .progress import Progress, _wants_progress
from .result import ModuleResize, ResizeResult

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# metadata of the input that no longer describes the resized file (replaced, or dropped)
STALE_KEYS = (
    "aclora_ranks",
    "aclora_full_rank",
    "aclora_file_decision",
    "aclora_truncation_error_mean",
    "aclora_truncation_error_max",
    "aclora_resize",
    "aclora_version",
)


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


def resize_state_dict(
    tensors: Mapping[str, torch.Tensor],
    criterion: Criterion | str | None = None,
    *,
    dtype: Optional[str | torch.dtype] = None,
    device: str | torch.device = "cpu",
    progress: Optional[bool] = False,
    source: str = "weights",
    max_size: int | str | None = None,
    metadata: Optional[Mapping[str, str]] = None,
    **criterion_args,
) -> ResizeResult:
    """Resize a kohya LoRA state dict: the resized tensors (kohya keys, one alpha) and a per-module account.

    ``criterion``: a :class:`Criterion`, or its name with its parameters as
    keywords (``resize_state_dict(sd, "sv_fro", param=0.9, max_rank=64)``);
    None: importance (0.01), or with ``max_size`` and no ``min_importance`` /
    ``param``, no criterion cap (``max_size.budget_criterion``).
    ``dtype``: of the written factors (fp16, bf16, fp32; default the input's);
    the math runs in float32 (float64 for float64 input) on ``device``.
    ``max_size`` (bytes, or "50MB", "1.5GB", "512MiB"): the file
    :func:`resize_file` writes for these tensors, with ``resized_metadata(metadata,
    result)`` (``metadata``: the input file's), is at most that size, and keeps
    as much of the whole update as that size allows (``budget``).
    Raises LoRAFileError for a file that is not a plain LoRA/LoCon or has
    NaN/Inf weights, ResizeError for bad parameters, ``F.allocation.BudgetError``
    (a ValueError saying the smallest possible size) when no file fits.
    """
    start = time.perf_counter()
    budget_bytes = parse_max_size(max_size)
    criterion, criterion_caps = budget_criterion(criterion, criterion_args, budget_bytes)
    dev = _device(device)
    modules = _modules(tensors, source)
    out_dtype = _dtype(dtype, modules)
    max_rank = criterion.max_rank or max(m.rank for m in modules)
    max_conv_rank = criterion.max_conv_rank or max_rank
    if criterion.min_rank > max_rank or criterion.min_rank > max_conv_rank:
        raise ResizeError(
            f"min_rank={criterion.min_rank} is larger than the largest rank allowed ({min(max_rank, max_conv_rank)})"
        )
    bar = Progress(2 * len(modules), _wants_progress(progress, len(modules)))
    try:
        spectra = _analyse(modules, dev, bar, source)
        ranks, threshold, top = _decide(modules, spectra, criterion, max_rank, max_conv_rank)
        alpha = _file_alpha(modules, out_dtype, source)
        result = ResizeResult(
            {},
            [],
            criterion,
            alpha,
            max_rank,
            max_conv_rank,
            threshold,
            top,
            0.0,
            str(out_dtype).replace("torch.", ""),
            {m.name: m.rank for m in modules},
            None if budget_bytes is None else Budget(budget_bytes, criterion_caps),
        )
        if result.budget is not None:
            ranks = _fit_budget(modules, spectra, ranks, result, out_dtype, metadata or {}, source)
        result.tensors = _write(modules, spectra, ranks, alpha, out_dtype, dev, bar)
        result.modules = _accounts(modules, spectra, ranks)
    finally:
        bar.close()
    bad = sorted({key.rsplit(".", 2)[0] for key, t in result.tensors.items() if not bool(torch.isfinite(t).all())})
    if bad:
        raise LoRAFileError(
            f"{source}: the resized weights of {len(bad)} module(s) do not fit in "
            f"{str(out_dtype).replace('torch.', '')} (e.g. {bad[0]}); use a wider dtype (bf16 or fp32)"
        )
    result.seconds = time.perf_counter() - start
    return result


def _fit_budget(
    modules: list[_Module],
    spectra: dict[int, _Spectrum],
    ranks: dict[int, int],
    plan: ResizeResult,
    dtype: torch.dtype,
    metadata: Mapping[str, str],
    source: str,
) -> dict[int, int]:
    """The ranks under ``plan.budget`` (``max_size.fit_budget``), the criterion's ``ranks`` as the caps, sized
    with the metadata :func:`resize_file` writes: ``plan`` (a result without tensors yet) with each candidate's
    accounts."""

    def metadata_of(chosen: dict[int, int]) -> dict[str, str]:
        return resized_metadata(metadata, replace(plan, modules=_accounts(modules, spectra, chosen)), source)

    assert plan.budget is not None  # resize_state_dict fits only a plan that has a budget
    return fit_budget(
        modules,
        {m.index: spectra[m.index].s for m in modules},
        ranks,
        plan.criterion.min_rank,
        plan.budget,
        dtype,
        metadata_of,
    )


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
        raise LoRAFileError(
            f"{source}: NaN/Inf weights in {len(non_finite)} module(s): {', '.join(non_finite[:5])}{more}"
        )
    return spectra


def _decide(
    modules: list[_Module], spectra: dict[int, _Spectrum], criterion: Criterion, max_rank: int, max_conv_rank: int
) -> tuple[dict[int, int], Optional[float], Optional[float]]:
    """Each module's new rank: {module index: rank}, and (threshold, top) for the importance criterion."""
    ranks: dict[int, int] = {}
    threshold = top = None
    if criterion.name == "importance":  # singular values of the scaled update alpha/R * up @ down
        importance = {m.index: spectra[m.index].s.double().cpu() * abs(m.scale) for m in modules}
        top = max(float(v[0]) for v in importance.values())
        threshold = criterion.min_importance * top
    for members in _groups(modules).values():
        s = torch.stack([spectra[m.index].s for m in members]).double().cpu()
        caps = torch.tensor([max_conv_rank if m.conv else max_rank for m in members])
        if threshold is not None:  # the importance criterion
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


def _accounts(modules: list[_Module], spectra: dict[int, _Spectrum], ranks: Mapping[int, int]) -> list[ModuleResize]:
    """Every module's account at ``ranks``: its update's relative error and energy, from its spectrum alone
    (batched by rank). The budget sizes the metadata with the same function that writes it."""
    errors: dict[int, float] = {}
    energies: dict[int, float] = {}
    by_rank: dict[int, list[_Module]] = {}
    for m in modules:
        by_rank.setdefault(m.rank, []).append(m)
    for rank, members in by_rank.items():
        s = torch.stack([spectra[m.index].s for m in members]).cpu()
        counts = torch.tensor([min(ranks[m.index], rank) for m in members])
        errors.update(zip((m.index for m in members), F.truncation_error(s, counts).tolist()))
        energies.update(zip((m.index for m in members), s.double().square().sum(dim=1).tolist()))
    return [
        ModuleResize(m.name, m.kind, m.rank, ranks[m.index], errors[m.index], energies[m.index] * m.scale**2)
        for m in modules
    ]


def _write(
    modules: list[_Module],
    spectra: dict[int, _Spectrum],
    ranks: dict[int, int],
    alpha: float,
    dtype: torch.dtype,
    dev: torch.device,
    bar: Progress,
) -> dict[str, torch.Tensor]:
    """Pass 2: the kept components' factors, in batches; alpha/k * up @ down = the module's scaled rank-k part."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for (rank, cols, rows), members in _groups(modules).items():
            for batch in chunks(members, F.chunk_size(rows, cols, rank, chunk_budget(dev))):
                down, up = _stack(batch, dev)
                s = torch.stack([spectra[m.index].s for m in batch])
                to_up = torch.stack([spectra[m.index].to_up for m in batch])
                to_down = torch.stack([spectra[m.index].to_down for m in batch])
                counts = torch.tensor([min(ranks[m.index], rank) for m in batch], device=s.device)
                new_down, new_up = F.component_factors(down, up, s, to_up, to_down, counts, int(counts.max()))
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
                bar.advance(len(batch), "writing")
    return out


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
    meta["ss_training_comment"] = f"Dynamic resize with {result.describe()} from {old_dim}; {comment}"
    meta["ss_network_dim"] = "Dynamic"
    meta["ss_network_alpha"] = "Dynamic"
    shapes = {m.name: (m.kind, m.rank_before) for m in result.modules}
    linear, conv = _reference_ranks(dict(metadata), source, shapes)
    ranks = result.ranks
    errors = [m.error for m in result.modules]
    meta.update(
        {
            "aclora_version": __version__,
            "aclora_ranks": json.dumps(ranks, separators=(",", ":")),
            "aclora_max_rank": str(linear),
            "aclora_truncation_error_mean": f"{sum(errors) / len(errors):.6g}",
            "aclora_truncation_error_max": f"{max(errors):.6g}",
            "aclora_resize": json.dumps(_resize_record(result), separators=(",", ":")),
        }
    )
    meta.setdefault("aclora_modules", json.dumps(list(ranks), separators=(",", ":")))
    if conv is not None:
        meta["aclora_conv_max_rank"] = str(conv)
    return meta


def _resize_record(result: ResizeResult) -> dict:
    c = result.criterion
    record = {
        "criterion": c.name,
        "param": c.value,
        "max_rank": result.max_rank,
        "max_conv_rank": result.max_conv_rank,
        "alpha": result.alpha,
        "dtype": result.dtype,
    }
    if c.name == "importance":
        record.update(min_rank=c.min_rank, threshold=result.threshold, largest_singular_value=result.top)
    if result.budget is not None:
        record.update(result.budget.record())
    before = list(result.source_ranks.values())
    record["source_ranks"] = {"min": min(before), "median": median(before), "max": max(before)}
    return record


def resize_file(
    source: str,
    target: str,
    criterion: Criterion | str | None = None,
    *,
    dtype: Optional[str | torch.dtype] = None,
    device: str | torch.device = "cpu",
    progress: Optional[bool] = None,
    max_size: int | str | None = None,
    **criterion_args,
) -> ResizeResult:
    """Resize the LoRA file ``source`` into ``target`` (.safetensors, written atomically).

    Nothing is written when anything fails: an existing ``target`` is only
    ever replaced by a complete file. ``progress``: a bar on stderr (None: only
    on a terminal, for files with many modules). ``max_size``: the written
    file, metadata included, is at most that size. See :func:`resize_state_dict`.
    """
    source, target = os.fspath(source), os.fspath(target)
    if not target.endswith(".safetensors"):
        raise ResizeError(f"output {target!r} is not a .safetensors path; aclora resize writes safetensors files")
    if os.path.isdir(target):
        raise ResizeError(f"output {target!r} is a directory; give the path of the .safetensors file to write")
    budget_criterion(criterion, criterion_args, parse_max_size(max_size))  # bad parameters fail before reading
    tensors = load_state_dict(source)
    metadata = read_metadata(source)
    result = resize_state_dict(
        tensors,
        criterion,
        dtype=dtype,
        device=device,
        progress=progress,
        source=source,
        max_size=max_size,
        metadata=metadata,
        **criterion_args,
    )
    save_state_dict(
        target,
        result.tensors,
        resized_metadata(metadata, result, source),
        max_size=result.budget.max_size if result.budget else None,
    )
    ranks = list(result.ranks.values())
    logger.info(
        "resized %s -> %s with %s: %d modules, ranks %d..%d, %.2f s",
        source,
        target,
        result.describe(),
        len(ranks),
        min(ranks),
        max(ranks),
        result.seconds,
    )
    return result
