"""The network's files: the variable-rank export with its metadata, loading a LoRA file into the
network, and merging one into the base model."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..families import check_model_family
from ..files.lora_dict import check_shapes, group_modules
from ..files.sizes import saved_file_size
from ..files.storage import LoRAFileError, load_state_dict, metadata_ranks, read_metadata, save_state_dict
from ..functional.allocation import BudgetError
from ..lora.export import export_modules, raw_modules
from ..options import format_size
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



def metadata(network, ranks: dict[str, int], errors: Optional[dict[str, float]] = None,
             padded: Optional[dict[str, int]] = None) -> dict[str, str]:
    """Our own metadata keys: enough for a file to explain how its ranks came about. ``padded``: the
    modules stored above their rank with zeros (``lora.export.pad_lone_ranks``), with their own ranks."""
    last = network.history[-1] if network.history else None
    conv3x3 = [m.rank for m in network.loras if m.lora_down.weight.shape[2:] not in ((), (1, 1))]
    others = [m.rank for m in network.loras if m.lora_down.weight.shape[2:] in ((), (1, 1))]
    meta = {
        "aclora_version": __version__,
        "aclora_mode": network.config.restart_mode,
        "aclora_energy": network.config.energy,
        "aclora_max_rank": str(max(others) if others else network.max_rank),
        "aclora_restarts": str(len(network.history)),
        "aclora_ranks": json.dumps(ranks, separators=(",", ":")),
        "aclora_history": json.dumps([{k: _json_number(v) for k, v in h.items()} for h in network.history],
                                     separators=(",", ":")),
        "aclora_modules": json.dumps([m.lora_name for m in network.loras], separators=(",", ":")),
    }
    if network.rank_search.file_decision is not None:  # product mode: how the file's own ranks were decided
        meta["aclora_file_decision"] = json.dumps(
            {k: _json_number(v) for k, v in network.rank_search.file_decision.items()}, separators=(",", ":"))
    if conv3x3:
        meta["aclora_conv_max_rank"] = str(max(conv3x3))  # conv_dim: the 3x3 modules' own maximum rank
    if last is not None:
        meta["aclora_last_p"] = "" if last["p"] is None or last["p"] != last["p"] else f"{last['p']:.6f}"
        meta["aclora_last_loss"] = "" if last["loss"] is None else f"{last['loss']:.6f}"
    if errors:
        values = list(errors.values())
        meta["aclora_truncation_error_mean"] = f"{sum(values) / len(values):.6g}"
        meta["aclora_truncation_error_max"] = f"{max(values):.6g}"
    if network.config.max_file_size is not None:
        meta["aclora_max_file_size"] = str(network.config.max_file_size)
    if padded:
        meta["aclora_padded"] = json.dumps(padded, separators=(",", ":"))
    return meta


def written_metadata(network, metadata: Optional[dict], ranks: dict[str, int], errors: dict[str, float],
                     padded: Optional[dict[str, int]] = None) -> dict:
    """The metadata ``save_weights`` writes: sd-scripts' with ours (``max_file_size`` sizes the file with it)."""
    meta = dict(metadata or {})
    meta.update(network.metadata(ranks, errors, padded))
    # sd-scripts wrote the training dim/alpha; they no longer describe a file whose ranks vary or
    # were all cut below the maximum (e.g. every module at min_rank after a p = 0 RESTART)
    if len(set(ranks.values())) > 1 or any(ranks[m.lora_name] != m.rank for m in network.loras):
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    return meta


def state_for_export(network, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None):
    """(tensors, metadata, truncation errors) of the variable-rank export.

    With ``max_file_size`` the ranks also fit that budget for the file ``save_weights`` writes with
    sd-scripts' ``metadata`` (``budget``; BudgetError, a ValueError, when no file can).
    Raises ValueError naming the modules whose weights are NaN/Inf, checked
    after the cast to ``dtype`` so that an fp16 overflow counts too.
    """
    for m in network.loras:  # held slots add nothing: the file must not carry what the optimiser left there
        m.clear_held()
    signal: list = [network._signal[m.lora_name] for m in network.loras]
    network.rank_search.file_decision = None
    product = network.config.restart_mode == "product"
    if product:
        signal = network.rank_search.file_keeps(network.loras, signal)
    budgeted = None
    if network.config.max_file_size is not None:
        found = file_budget.candidates(network.loras, signal, network.rank_search.file_spectra if product else None)
        signal, budgeted, _ = file_budget.fit_keeps(
            network.loras, found, network.config.max_file_size, network.config.min_rank, dtype,
            lambda ranks, errors: written_metadata(network, metadata, ranks, errors))
    tensors, ranks, errors, bad, padded = _export(network, signal, dtype, pad=True)
    if padded and budgeted is not None:
        sized = saved_file_size(tensors, written_metadata(network, metadata, ranks, budgeted, padded))
        if sized > network.config.max_file_size:  # padding would break the budget: the budget wins
            network._warn_once("pad-budget", "AC-LoRA: max_file_size leaves no room to pad %d module(s) to their "
                               "part's common rank; diffusers 0.32 may read this file at a wrong scale (later "
                               "releases read it right)", len(padded))
            tensors, ranks, errors, bad, padded = _export(network, signal, dtype, pad=False)
    if budgeted is not None:
        errors = budgeted  # the errors the file was sized with (the same spectra's, up to float rounding)
    bad = bad or sorted({key.rsplit(".", 2)[0] for key, t in tensors.items() if not bool(torch.isfinite(t).all())})
    if bad:
        raise ValueError(f"non-finite weights in {len(bad)} module(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    meta = network.metadata(ranks, errors, padded)
    return tensors, meta, errors


def _export(network, signal: list, dtype: Optional[torch.dtype], pad: bool):
    """(tensors, ranks, errors, non-finite modules, padded modules) of the file at ``signal``'s ranks."""
    if all(isinstance(k, int) and k == m.rank for k, m in zip(signal, network.loras)):
        # nothing truncated yet (or restarts off): the training factors are the file, exactly
        tensors = raw_modules(network.loras, dtype, pad=pad)
        ranks = {m.lora_name: int(tensors[f"{m.lora_name}.lora_down.weight"].shape[0]) for m in network.loras}
        padded = {m.lora_name: m.rank for m in network.loras if ranks[m.lora_name] != m.rank}
        return tensors, ranks, {}, [], padded
    result = export_modules(network.loras, signal, dtype, pad=pad)
    return result.tensors, result.ranks, result.errors, result.non_finite, result.padded


def save_weights(network, file: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> bool:
    """Write the variable-rank LoRA file (atomically). Returns False, keeping any old file, on NaN/Inf weights
    or when no file fits ``max_file_size`` (training goes on)."""
    max_size = network.config.max_file_size
    try:
        tensors, ours, errors = network.state_for_export(dtype, metadata)
        ranks = json.loads(ours["aclora_ranks"])
        padded = json.loads(ours.get("aclora_padded") or "{}")
        save_state_dict(file, tensors, written_metadata(network, metadata, ranks, errors, padded), max_size=max_size)
    except BudgetError as err:
        logger.error("AC-LoRA: NOT saving %s: max_file_size=%s: %s. The previous file (if any) is kept; training "
                     "goes on.", file, format_size(max_size), err)
        return False
    except ValueError as err:  # non-finite weights; LoRAFileError (a ValueError) from a size check
        logger.error("AC-LoRA: NOT saving %s: %s. The previous file (if any) is kept.", file, err)
        return False
    if errors or max_size is not None:
        details = [f"{len(ranks)} modules, ranks {min(ranks.values())}..{max(ranks.values())}"]
        if errors:
            details.append(f"truncation error mean {sum(errors.values()) / len(errors):.3g} max "
                           f"{max(errors.values()):.3g}")
        if max_size is not None:
            details.append(f"{format_size(os.path.getsize(file))} of max_file_size {format_size(max_size)}")
        logger.info("AC-LoRA: saved %s (%s)", file, "; ".join(details))
    if network.config.save_full_rank:  # not budgeted: it exists to continue training at the maximum rank
        stem, ext = os.path.splitext(file)
        full_meta = dict(metadata or {})
        full_meta.update(network.metadata({m.lora_name: network._signal[m.lora_name] for m in network.loras}))
        full_meta["aclora_full_rank"] = "true"
        save_state_dict(f"{stem}-fullrank{ext}", raw_modules(network.loras, dtype, pad=False), full_meta)
    return True


def load_weights(network, file: str) -> LoadInfo:
    """Load a LoRA file into this network; smaller per-module ranks are padded to this network's rank.

    Modules in the file that this network does not have are ignored with a
    warning (sd-scripts' non-strict contract); shapes that cannot fit raise.
    """
    weights = load_state_dict(file)
    meta = read_metadata(file) if str(file).endswith(".safetensors") else {}
    return network.load_state(weights, meta, source=str(file))


def load_state(network, weights: dict[str, torch.Tensor], meta: Optional[dict] = None, source: str = "weights") -> LoadInfo:
    modules = group_modules(weights, source)
    by_name = {m.lora_name: m for m in network.loras}
    check_model_family(modules, by_name, source)
    info = LoadInfo()
    info.unexpected = sorted(set(modules) - set(by_name))
    info.missing = sorted(set(by_name) - set(modules))
    if not set(modules) & set(by_name):
        raise LoRAFileError(f"{source}: none of its {len(modules)} LoRA modules exists in this model "
                            f"(e.g. {next(iter(modules), '?')}); is it for another model (SD1.x vs SDXL)?")
    padded = json.loads((meta or {}).get("aclora_padded") or "{}")  # stored above their rank with zeros
    modules = {n: _without_zero_components(p, by_name[n].rank) if n in by_name and n in padded else p
               for n, p in modules.items()}
    check_shapes({n: modules[n] for n in modules if n in by_name}, by_name, source, allow_smaller_rank=True)
    saved_ranks = metadata_ranks(meta or {}, source)
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
            network._signal[name] = min(int(saved_ranks.get(name, k)), k) if k == m.rank or name in padded else k
            (info.padded if k < m.rank else info.loaded).append(name)
    info.loaded += info.padded
    if info.unexpected:
        logger.warning("AC-LoRA: %d module(s) of %s do not exist in this model and were ignored: %s",
                       len(info.unexpected), source, ", ".join(info.unexpected[:10]))
    return info


def _without_zero_components(parts: dict, rank: int) -> dict:
    """A module a file stored above ``rank`` with zero components (``aclora_padded``), at ``rank``."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    k = down.shape[0]
    if k <= rank or (bool(down[rank:].any()) and bool(up[:, rank:].any())):
        return parts
    alpha = float(parts["alpha"]) if "alpha" in parts else float(k)
    return {**parts, "lora_down.weight": down[:rank], "lora_up.weight": up[:, :rank].float() * (rank / k),
            "alpha": torch.tensor(alpha)}


def file_ranks(path: str, key: str = "ranks_from") -> dict[str, int]:
    """Every module's rank in a LoRA file: its ``aclora_ranks`` (the ranks a run chose, also where the
    file pads a module), else its factors' shapes. LoRAFileError names ``key`` and the path."""
    try:
        weights = load_state_dict(path)
        meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
        shapes = {name: int(parts["lora_down.weight"].shape[0]) for name, parts in group_modules(weights, path).items()}
        return {**shapes, **{k: v for k, v in metadata_ranks(meta, path).items() if k in shapes}}
    except (LoRAFileError, OSError) as err:
        raise LoRAFileError(f"network_args: {key}={path!r} is not a usable LoRA file ({err}); allowed: the path "
                            "of a kohya LoRA file (.safetensors), e.g. one an AC-LoRA run saved") from None


def merge_to(network, weights_sd: Optional[dict] = None, dtype=None, device=None) -> None:
    """Add multiplier * alpha/rank * up @ down of ``weights_sd`` into the base layers; without
    ``weights_sd``, exactly what this network adds now (its training factors, nothing truncated)."""
    if weights_sd is None:
        for m in network.loras:
            m.clear_held()
        weights_sd = raw_modules(network.loras, torch.float32)
    modules = group_modules(weights_sd, "weights_sd")
    unknown = sorted(set(modules) - {m.lora_name for m in network.loras})
    if unknown:
        logger.warning("AC-LoRA merge: %d module(s) not in this model were ignored: %s", len(unknown),
                       ", ".join(unknown[:10]))
    with torch.no_grad():
        for m in network.loras:
            parts = modules.get(m.lora_name)
            if parts is None:
                continue
            weight = m.org_module.weight
            target = torch.device(device) if device is not None else weight.device
            down = parts["lora_down.weight"].to(target, torch.float32)
            up = parts["lora_up.weight"].to(target, torch.float32)
            k = down.shape[0]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(k)
            delta = (up.reshape(up.shape[0], k) @ down.reshape(k, -1)).reshape(weight.shape) * (alpha / k)
            merged = weight.to(target, torch.float32) + delta * network.multiplier
            weight.data = merged.to(weight.device, dtype or weight.dtype)
    logger.info("AC-LoRA: merged %d modules", sum(1 for m in network.loras if m.lora_name in modules))


def _json_number(value: Any) -> Any:
    """NaN and infinity as null (what JSON readers other than Python's accept): p is NaN in product mode,
    a level is infinite when every component is kept."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
