"""The network's files: the variable-rank export with its metadata, loading a LoRA file into the
network, and merging one into the base model."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, cast

import torch

from ..families import check_model_family
from ..files.lora_dict import check_shapes, group_modules
from ..files.sizes import saved_file_size
from ..files.storage import LoRAFileError, load_state_dict, metadata_ranks, read_metadata, save_state_dict
from ..functional.allocation import BudgetError
from ..lora.export import export_modules, raw_modules
from ..lora.module import ACLoRAModule
from ..lora.product_restart import Spectrum
from ..lora.report import RestartReport
from ..options import ACLoRAConfig, format_size
from ..version import __version__
from . import file_budget

logger = logging.getLogger(__name__)


@dataclass
class LoadInfo:
    """What ``load_weights`` did (sd-scripts prints it)."""

    loaded: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        text = f"<AC-LoRA: {len(self.loaded)} modules loaded ({len(self.padded)} padded to the maximum rank)"
        if self.unexpected:
            text += f", {len(self.unexpected)} unknown modules ignored"
        if self.missing:
            text += f", {len(self.missing)} modules not in the file"
        return text + ">"


@dataclass(frozen=True)
class RunRecord:
    """What a file's metadata says about the run: its options, its RESTARTs and how the file's ranks were
    decided (product mode's rank search; None otherwise)."""

    config: ACLoRAConfig
    history: Sequence[RestartReport]
    file_decision: Optional[dict] = None
    model: Optional[str] = None  # the model family as the log names it ("FLUX.1", "Chroma", ...)


@dataclass
class Export:
    """A file ready to write: its tensors, every module's rank, the truncation errors, the modules stored
    above their rank with zeros, our metadata keys, and the whole metadata ``save_weights`` writes."""

    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    errors: dict[str, float]
    padded: dict[str, int]
    metadata: dict[str, str]
    written: dict[str, str]
    unpadded: int = 0  # modules left unpadded because padding would break max_file_size


def metadata(
    modules: Sequence[ACLoRAModule],
    run: RunRecord,
    ranks: dict[str, int],
    errors: Optional[dict[str, float]] = None,
    padded: Optional[dict[str, int]] = None,
) -> dict[str, str]:
    """Our own metadata keys: enough for a file to explain how its ranks came about. ``padded``: the
    modules stored above their rank with zeros (``lora.export.pad_lone_ranks``), with their own ranks."""
    last = run.history[-1] if run.history else None
    conv3x3 = [m.rank for m in modules if m.lora_down.weight.shape[2:] not in ((), (1, 1))]
    others = [m.rank for m in modules if m.lora_down.weight.shape[2:] in ((), (1, 1))]
    meta = {
        "aclora_version": __version__,
        "aclora_mode": run.config.restart_mode,
        "aclora_energy": run.config.energy,
        "aclora_max_rank": str(max(others) if others else max(m.rank for m in modules)),
        "aclora_restarts": str(len(run.history)),
        "aclora_ranks": _json(ranks),
        "aclora_history": _json([{k: _json_number(v) for k, v in h.entry().items()} for h in run.history]),
        "aclora_modules": _json([m.lora_name for m in modules]),
    }
    if run.model:
        meta["aclora_model"] = run.model
    if run.file_decision is not None:  # product mode: how the file's own ranks were decided
        meta["aclora_file_decision"] = _json({k: _json_number(v) for k, v in run.file_decision.items()})
    if conv3x3:
        meta["aclora_conv_max_rank"] = str(max(conv3x3))  # conv_dim: the 3x3 modules' own maximum rank
    if last is not None:
        meta["aclora_last_p"] = "" if last.p is None or last.p != last.p else f"{last.p:.6f}"
        meta["aclora_last_loss"] = "" if last.loss is None else f"{last.loss:.6f}"
    if errors:
        values = list(errors.values())
        meta["aclora_truncation_error_mean"] = f"{sum(values) / len(values):.6g}"
        meta["aclora_truncation_error_max"] = f"{max(values):.6g}"
    if run.config.max_file_size is not None:
        meta["aclora_max_file_size"] = str(run.config.max_file_size)
    if padded:
        meta["aclora_padded"] = _json(padded)
    return meta


def written_metadata(
    modules: Sequence[ACLoRAModule], sd_metadata: Optional[dict], ours: dict[str, str], ranks: dict[str, int]
) -> dict[str, str]:
    """The metadata ``save_weights`` writes: sd-scripts' with ours (``max_file_size`` sizes the file with it)."""
    meta = dict(sd_metadata or {})
    meta.update(ours)
    # sd-scripts wrote the training dim/alpha; they no longer describe a file whose ranks vary or
    # were all cut below the maximum (e.g. every module at min_rank after a p = 0 RESTART)
    if len(set(ranks.values())) > 1 or any(ranks[m.lora_name] != m.rank for m in modules):
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    return meta


def export(
    modules: Sequence[ACLoRAModule],
    keeps: list,
    run: RunRecord,
    dtype: Optional[torch.dtype] = None,
    sd_metadata: Optional[dict] = None,
    spectra: Optional[dict[int, Spectrum]] = None,
) -> Export:
    """The variable-rank file at the run's decision ``keeps`` (per module: a rank or a keep mask).

    With ``max_file_size`` the ranks also fit that budget for the file ``save_weights`` writes with
    sd-scripts' ``sd_metadata`` (``file_budget``; BudgetError, a ValueError, when no file can); ``spectra``:
    the rank search's analysis of this save (product mode), else None. Raises ValueError naming the
    modules whose weights are NaN/Inf, checked after the cast to ``dtype`` so that an fp16 overflow counts too.
    """
    config = run.config

    def described(
        ranks: dict[str, int], errors: dict[str, float], padded: Optional[dict[str, int]] = None
    ) -> tuple[dict[str, str], dict[str, str]]:
        ours = metadata(modules, run, ranks, errors, padded)
        return ours, written_metadata(modules, sd_metadata, ours, ranks)

    budgeted = None
    if config.max_file_size is not None:
        found = file_budget.candidates(modules, keeps, spectra)
        keeps, budgeted, _ = file_budget.fit_keeps(
            modules,
            found,
            config.max_file_size,
            config.min_rank,
            dtype,
            lambda ranks, errors: described(ranks, errors)[1],
        )
    tensors, ranks, errors, bad, padded = _tensors(modules, keeps, dtype, pad=True)
    errors = errors if budgeted is None else budgeted  # the errors the file was sized with (the same spectra's)
    ours, written = described(ranks, errors, padded)
    unpadded = 0
    budget = config.max_file_size
    if padded and budgeted is not None and budget is not None and saved_file_size(tensors, written) > budget:
        unpadded = len(padded)  # padding would break the budget: the budget wins
        tensors, ranks, _, bad, padded = _tensors(modules, keeps, dtype, pad=False)
        ours, written = described(ranks, errors, padded)
    bad = bad or sorted({key.rsplit(".", 2)[0] for key, t in tensors.items() if not bool(torch.isfinite(t).all())})
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise ValueError(f"non-finite weights in {len(bad)} module(s): {', '.join(bad[:5])}{more}")
    return Export(tensors, ranks, errors, padded, ours, written, unpadded)


def _tensors(modules: Sequence[ACLoRAModule], keeps: list, dtype: Optional[torch.dtype], pad: bool):
    """(tensors, ranks, errors, non-finite modules, padded modules) of the file at ``keeps``."""
    if all(isinstance(k, int) and k == m.rank for k, m in zip(keeps, modules)):
        # nothing truncated yet (or restarts off): the training factors are the file, exactly
        tensors = raw_modules(modules, dtype, pad=pad)
        ranks = {m.lora_name: int(tensors[f"{m.lora_name}.lora_down.weight"].shape[0]) for m in modules}
        padded = {m.lora_name: m.rank for m in modules if ranks[m.lora_name] != m.rank}
        return tensors, ranks, {}, [], padded
    result = export_modules(modules, keeps, dtype, pad=pad)
    return result.tensors, result.ranks, result.errors, result.non_finite, result.padded


def write(file: str, exported: Export, max_size: Optional[int]) -> bool:
    """Write ``exported`` to ``file`` (atomically); False, keeping any old file, when a size check refuses it."""
    try:
        save_state_dict(file, exported.tensors, exported.written, max_size=max_size)
    except ValueError as err:  # LoRAFileError (a ValueError) from a size check
        return refuse(file, err, max_size)
    ranks, errors = exported.ranks, exported.errors
    if errors or max_size is not None:
        details = [f"{len(ranks)} modules, ranks {min(ranks.values())}..{max(ranks.values())}"]
        if errors:
            details.append(
                f"truncation error mean {sum(errors.values()) / len(errors):.3g} max {max(errors.values()):.3g}"
            )
        if max_size is not None:
            details.append(f"{format_size(os.path.getsize(file))} of max_file_size {format_size(max_size)}")
        logger.info("AC-LoRA: saved %s (%s)", file, "; ".join(details))
    return True


def refuse(file: str, err: ValueError, max_size: Optional[int]) -> bool:
    """Log why ``file`` is not written (training goes on) and return False."""
    if isinstance(err, BudgetError):
        logger.error(
            "AC-LoRA: NOT saving %s: max_file_size=%s: %s. The previous file (if any) is kept; training goes on.",
            file,
            format_size(max_size) if max_size is not None else "unset",
            err,
        )
    else:  # non-finite weights; LoRAFileError from a size check
        logger.error("AC-LoRA: NOT saving %s: %s. The previous file (if any) is kept.", file, err)
    return False


def write_full_rank(
    file: str,
    modules: Sequence[ACLoRAModule],
    run: RunRecord,
    ranks: dict[str, int],
    dtype: Optional[torch.dtype],
    sd_metadata: Optional[dict],
) -> None:
    """``save_full_rank``'s companion ``<stem>-fullrank<ext>``: the training factors at the maximum rank (not
    budgeted: it exists to continue training at the maximum rank)."""
    stem, ext = os.path.splitext(file)
    full_meta = dict(sd_metadata or {})
    full_meta.update(metadata(modules, run, ranks))
    full_meta["aclora_full_rank"] = "true"
    save_state_dict(f"{stem}-fullrank{ext}", raw_modules(modules, dtype, pad=False), full_meta)


def read_file(file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, metadata) of a LoRA file (no metadata outside .safetensors)."""
    weights = load_state_dict(file)
    return weights, read_metadata(file) if str(file).endswith(".safetensors") else {}


def load_into(
    loras: Sequence[ACLoRAModule],
    weights: dict[str, torch.Tensor],
    meta: Optional[dict] = None,
    source: str = "weights",
) -> tuple[LoadInfo, dict[str, int]]:
    """Load LoRA ``weights`` into ``loras``: (what was done, the signal rank of every loaded module). Smaller
    per-module ranks are padded to the module's rank; modules ``loras`` lacks are ignored with a warning
    (sd-scripts' non-strict contract); shapes that cannot fit raise."""
    modules = group_modules(weights, source)
    by_name = {m.lora_name: m for m in loras}
    check_model_family(modules, by_name, source)
    info = LoadInfo()
    info.unexpected = sorted(set(modules) - set(by_name))
    info.missing = sorted(set(by_name) - set(modules))
    if not set(modules) & set(by_name):
        raise LoRAFileError(
            f"{source}: none of its {len(modules)} LoRA modules exists in this model "
            f"(e.g. {next(iter(modules), '?')}); is it for another model (SD1.x vs SDXL)?"
        )
    padded = json.loads((meta or {}).get("aclora_padded") or "{}")  # stored above their rank with zeros
    modules = {
        n: _without_zero_components(p, by_name[n].rank) if n in by_name and n in padded else p
        for n, p in modules.items()
    }
    check_shapes({n: modules[n] for n in modules if n in by_name}, by_name, source, allow_smaller_rank=True)
    saved_ranks = metadata_ranks(meta or {}, source)
    signal: dict[str, int] = {}
    with torch.no_grad():
        for name, parts in modules.items():
            m = by_name.get(name)
            if m is None:
                continue
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            k = down.shape[0]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(k)
            factor = (alpha / k) / m.scale  # keep alpha/k * up @ down under this module's scale
            m.lora_down.weight[:k].copy_(down.to(m.lora_down.weight.dtype))
            m.lora_up.weight.zero_()
            m.lora_up.weight[:, :k].copy_((up.float() * factor).to(m.lora_up.weight.dtype))
            # a padded module holds zero components above its own rank (aclora_padded, in saved_ranks)
            signal[name] = min(int(saved_ranks.get(name, k)), k) if k == m.rank or name in padded else k
            (info.padded if k < m.rank else info.loaded).append(name)
    info.loaded += info.padded
    if info.unexpected:
        logger.warning(
            "AC-LoRA: %d module(s) of %s do not exist in this model and were ignored: %s",
            len(info.unexpected),
            source,
            ", ".join(info.unexpected[:10]),
        )
    return info, signal


def _without_zero_components(parts: dict, rank: int) -> dict:
    """A module a file stored above ``rank`` with zero components (``aclora_padded``), at ``rank``."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    k = down.shape[0]
    if k <= rank or (bool(down[rank:].any()) and bool(up[:, rank:].any())):
        return parts
    alpha = float(parts["alpha"]) if "alpha" in parts else float(k)
    return {
        **parts,
        "lora_down.weight": down[:rank],
        "lora_up.weight": up[:, :rank].float() * (rank / k),
        "alpha": torch.tensor(alpha),
    }


def file_ranks(path: str, key: str = "ranks_from") -> dict[str, int]:
    """Every module's rank in a LoRA file: its ``aclora_ranks`` (the ranks a run chose, also where the
    file pads a module), else its factors' shapes. LoRAFileError names ``key`` and the path."""
    try:
        weights = load_state_dict(path)
        meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
        shapes = {name: int(parts["lora_down.weight"].shape[0]) for name, parts in group_modules(weights, path).items()}
        return {**shapes, **{k: v for k, v in metadata_ranks(meta, path).items() if k in shapes}}
    except (LoRAFileError, OSError) as err:
        raise LoRAFileError(
            f"network_args: {key}={path!r} is not a usable LoRA file ({err}); allowed: the path "
            "of a kohya LoRA file (.safetensors), e.g. one an AC-LoRA run saved"
        ) from None


def merge_to(
    loras: Sequence[ACLoRAModule], multiplier: float, weights_sd: Optional[dict] = None, dtype=None, device=None
) -> None:
    """Add multiplier * alpha/rank * up @ down of ``weights_sd`` into the base layers of ``loras``; without
    ``weights_sd``, exactly what the modules add now (their training factors, nothing truncated)."""
    if weights_sd is None:
        for m in loras:
            m.clear_held()
        weights_sd = raw_modules(loras, torch.float32)
    modules = group_modules(weights_sd, "weights_sd")
    unknown = sorted(set(modules) - {m.lora_name for m in loras})
    if unknown:
        logger.warning(
            "AC-LoRA merge: %d module(s) not in this model were ignored: %s", len(unknown), ", ".join(unknown[:10])
        )
    with torch.no_grad():
        for m in loras:
            parts = modules.get(m.lora_name)
            if parts is None:
                continue
            weight = cast(torch.Tensor, m.org_module.weight)
            target = torch.device(device) if device is not None else weight.device
            down = parts["lora_down.weight"].to(target, torch.float32)
            up = parts["lora_up.weight"].to(target, torch.float32)
            k = down.shape[0]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(k)
            delta = (up.reshape(up.shape[0], k) @ down.reshape(k, -1)).reshape(weight.shape) * (alpha / k)
            merged = weight.to(target, torch.float32) + delta * multiplier
            weight.data = merged.to(weight.device, dtype or weight.dtype)
    logger.info("AC-LoRA: merged %d modules", sum(1 for m in loras if m.lora_name in modules))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json_number(value: Any) -> Any:
    """NaN and infinity as null (what JSON readers other than Python's accept): p is NaN in product mode,
    a level is infinite when every component is kept."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
