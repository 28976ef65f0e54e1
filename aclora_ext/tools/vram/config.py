"""Reading sd-scripts' arguments for ``aclora vram``: a --config_file TOML, the dataset config's
resolution and batch size, command-line flags; each value checked, naming the key, the value and what is
allowed."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ...harness.architectures import NATIVE_RESOLUTION
from .anima import ANIMA_IGNORED, anima_fields
from .family_args import (
    DIT_IGNORED,
    LUMINA_IGNORED,
    check_family_arguments,
    detect_family,
    detect_variant,
)
from .hunyuan_image_args import hunyuan_image_fields
from .setup import OPTIMIZERS, Setup, VramError


@dataclass(frozen=True)
class Key:
    """One sd-scripts argument the estimate reads: how to check its value."""

    kind: str  # bool, int, number, choice, resolution, text, list
    allowed: str = ""
    choices: tuple = ()
    minimum: float = 0


KEYS: dict[str, Key] = {
    "pretrained_model_name_or_path": Key("text", "a path"),
    "v2": Key("bool"),
    "resolution": Key("resolution", "'W,H' or one size, multiples of 8 from 64"),
    "train_batch_size": Key("int", "an integer >= 1", minimum=1),
    "network_module": Key("choice", "networks.aclora", ("networks.aclora",)),
    "network_dim": Key("int", "an integer >= 1", minimum=1),
    "network_alpha": Key("number", "a number >= 0"),
    "network_args": Key("list", "a list of 'key=value' strings"),
    "network_train_unet_only": Key("bool"),
    "network_train_text_encoder_only": Key("bool"),
    "mixed_precision": Key("choice", "no, fp16, bf16", ("no", "fp16", "bf16")),
    "full_bf16": Key("bool"),
    "full_fp16": Key("bool"),
    "fp8_base": Key("bool"),
    "no_half_vae": Key("bool"),
    "gradient_checkpointing": Key("bool"),
    "cache_latents": Key("bool"),
    "cache_latents_to_disk": Key("bool"),
    "cache_text_encoder_outputs": Key("bool"),
    "cache_text_encoder_outputs_to_disk": Key("bool"),
    "optimizer_type": Key("choice", ", ".join(OPTIMIZERS), tuple(o.lower() for o in OPTIMIZERS)),
    "optimizer_args": Key("list", "a list of 'key=value' strings"),
    "use_8bit_adam": Key("bool"),
    "max_grad_norm": Key("number", "a number >= 0"),
    "sdpa": Key("bool"),
    "xformers": Key("bool"),
    "mem_eff_attn": Key("bool"),
    "max_token_length": Key("choice", "75, 150, 225", (75, 150, 225)),
    "gradient_accumulation_steps": Key("int", "an integer >= 1", minimum=1),
    "dataset_config": Key("text", "a path"),
    # flux_train_network.py / sd3_train_network.py
    "blocks_to_swap": Key("int", "an integer >= 0", minimum=0),
    "t5xxl_max_token_length": Key("int", "an integer >= 1", minimum=1),
    "apply_t5_attn_mask": Key("bool"),
    "model_type": Key("choice", "flux, chroma", ("flux", "chroma")),
    "split_mode": Key("bool"),
    # lumina_train_network.py
    "gemma2_max_token_length": Key("int", "an integer >= 1", minimum=1),
    # hunyuan_image_train_network.py (read in hunyuan_image_args) and anima_train_network.py (read in anima)
    "fp8_scaled": Key("bool"),
    "fp8_vl": Key("bool"),
    "split_attn": Key("bool"),
    "attn_mode": Key(
        "choice", "torch, sdpa, xformers, flash, sageattn", ("torch", "sdpa", "xformers", "flash", "sageattn")
    ),
    # anima_train_network.py (also blocks_to_swap)
    "qwen3_max_token_length": Key("int", "an integer >= 1", minimum=1),
    "t5_max_token_length": Key("int", "an integer >= 1", minimum=1),
}
# sd-scripts arguments that change memory in ways the estimate does not model: refused when switched on
UNSUPPORTED = (
    "deepspeed",
    "fp8_base_unet",
    "fused_backward_pass",
    "use_lion_optimizer",
    "lowvram",
    "cpu_offload_checkpointing",
    "train_text_encoder_only",
    "use_flash_attn",  # Lumina 2: flash attention's varlen kernel instead of SDPA with a mask
    "use_sage_attn",
    "unsloth_offload_checkpointing",
)
_TRUE, _FALSE = (True, "true"), (False, "false")


def _check(key: str, raw: Any, origin: str) -> Any:
    """The value of one argument, checked; VramError names the origin, the key, the value and what is allowed."""
    spec = KEYS[key]

    def bad(allowed: str) -> VramError:
        return VramError(f"{origin}: {key}={raw!r} is not valid; allowed: {allowed}")

    value = raw.strip() if isinstance(raw, str) else raw
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("true or false")
    if spec.kind in ("int", "number"):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise bad(spec.allowed) from None
        if number != number or number < spec.minimum or (spec.kind == "int" and not number.is_integer()):
            raise bad(spec.allowed)
        return int(number) if spec.kind == "int" else number
    if spec.kind == "choice":
        options = {str(c).lower(): c for c in spec.choices}
        found = options.get(str(value).lower()) if not isinstance(value, bool) else None
        if found is None:
            raise bad(spec.allowed)
        return found
    if spec.kind == "resolution":
        parts = str(value).replace(" ", "").split(",") if not isinstance(value, bool) else []
        try:
            sizes = [int(x) for x in parts]
        except ValueError:
            raise bad(spec.allowed) from None
        if len(sizes) not in (1, 2) or any(x < 64 or x % 8 for x in sizes):
            raise bad(spec.allowed)
        return (sizes[0], sizes[-1])
    if spec.kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and "=" in i for i in items):
            raise bad(spec.allowed)
        return tuple(tuple(x.strip() for x in item.split("=", 1)) for item in items)
    if not isinstance(value, str):
        raise bad(spec.allowed)
    return value


def read_config(path: str) -> dict[str, Any]:
    """sd-scripts' --config_file: a TOML file whose [sections] merge into one flat set of arguments."""
    try:
        data = _load_toml(Path(path))
    except FileNotFoundError:
        raise VramError(f"--config_file {path!r}: no such file") from None
    except Exception as err:  # a TOML syntax error
        raise VramError(f"--config_file {path!r} is not valid TOML: {err}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for inner, item in value.items():
                if isinstance(item, dict):
                    raise VramError(
                        f"{path}: [{key}.{inner}] is nested two levels deep; sd-scripts reads one level of "
                        "[sections] only"
                    )
                flat[inner] = item
        else:
            flat[key] = value
    return flat


def setup_from_arguments(
    arguments: Mapping[str, tuple[Any, str]],
    family: Optional[str] = None,
    base: Optional[Path] = None,
    variant: Optional[str] = None,
) -> tuple[Setup, list[str]]:
    """A Setup from sd-scripts arguments ({key: (value, where it came from)}); also the notes on what was read.
    ``family`` / ``variant``: --family / --variant (else told from the arguments, see ``family_args``)."""
    notes: list[str] = []
    values: dict[str, Any] = {}
    ignored = []
    for key, (raw, origin) in arguments.items():
        if key in KEYS:
            values[key] = _check(key, raw, origin)
        elif key in DIT_IGNORED or key in LUMINA_IGNORED or key in ANIMA_IGNORED:
            continue  # a DiT trainer's argument: listed with the family's notes
        elif key in UNSUPPORTED:
            if raw not in (False, None, 0, "false", ""):
                raise VramError(f"{origin}: {key}={raw!r} is not modelled by aclora vram; allowed: leave it unset")
        else:
            close = difflib.get_close_matches(key, list(KEYS) + list(UNSUPPORTED), n=1, cutoff=0.85)
            if close:
                raise VramError(f"{origin}: unknown key {key!r} (value {raw!r}); did you mean {close[0]!r}?")
            ignored.append(key)
    if ignored:
        notes.append("arguments that do not change the estimate: " + ", ".join(sorted(ignored)))
    values.update(_dataset_overrides(values.get("dataset_config"), base, notes))
    raw = {key: value for key, (value, _) in arguments.items()}
    fam = family or detect_family(raw, notes)
    check_family_arguments(fam, arguments)
    if fam == "hunyuan_image":  # hunyuan_image_train_network.py
        dit = hunyuan_image_fields(raw, values, notes)
    else:
        dit = _dit_fields(fam, raw, values, variant, notes)
    if fam == "anima":  # anima_train_network.py
        dit = anima_fields(values, raw, notes)
    if fam == "lumina":  # lumina_train_network.py: its DiT always calls SDPA; Gemma2's length, its block swap
        dit = {
            "blocks_to_swap": values.get("blocks_to_swap", 0),
            "gemma2_tokens": values.get("gemma2_max_token_length", 0),
        }
        given = sorted(k for k in (*LUMINA_IGNORED, *DIT_IGNORED) if k in raw)
        notes += ["Lumina 2 trainer arguments that do not change the estimate: " + ", ".join(given)] if given else []
    resolution = values.get("resolution") or (NATIVE_RESOLUTION[fam],) * 2
    if "resolution" not in values:
        notes.append(f"no resolution given: {resolution[0]}x{resolution[1]} (the family's native size)")
    attention = next((name for name in ("xformers", "mem_eff_attn", "sdpa") if values.get(name)), "none")
    if dit:
        attention = "sdpa"  # sd-scripts' DiTs always call scaled_dot_product_attention
    train_text_encoder = not values.get("network_train_unet_only", False)
    if train_text_encoder and dit.get("variant") == "chroma" and not _cached_text(values):
        train_text_encoder = False  # with cached outputs Setup refuses it: sd-scripts could not run
        notes.append(
            "Chroma without network_train_unet_only: no text-encoder LoRA (no CLIP-L; T5-XXL's is not trained), "
            "so the DiT's LoRA only"
        )
    optimizer = next((o for o in OPTIMIZERS if o.lower() == str(values.get("optimizer_type", "adamw"))), "AdamW")
    if values.get("use_8bit_adam"):
        optimizer = "AdamW8bit"
    precision = values.get("mixed_precision", "no")
    for key, wanted in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
        if values.get(key) and precision != wanted:
            raise VramError(
                f"full_bf16/full_fp16 must match mixed_precision={precision!r} ({key}=True needs "
                f"mixed_precision={wanted!r}, as train_network.py asserts)"
            )
    setup = Setup(
        family=fam,
        width=resolution[0],
        height=resolution[1],
        batch_size=values.get("train_batch_size", 1),
        rank=values.get("network_dim", 64),
        alpha=values.get("network_alpha", 1.0),
        network_args=values.get("network_args", ()),
        mixed_precision=precision,
        full_lora_precision=bool(values.get("full_bf16") or values.get("full_fp16")),
        fp8_base=values.get("fp8_base", False),
        gradient_checkpointing=values.get("gradient_checkpointing", False),
        train_unet=not values.get("network_train_text_encoder_only", False),
        train_text_encoder=train_text_encoder,
        optimizer=optimizer,
        optimizer_args=values.get("optimizer_args", ()),
        max_grad_norm=values.get("max_grad_norm", 1.0),
        cache_latents=bool(values.get("cache_latents") or values.get("cache_latents_to_disk")),
        cache_text_encoder_outputs=_cached_text(values),
        attention=attention,
        no_half_vae=values.get("no_half_vae", False),
        max_token_length=75 if dit else values.get("max_token_length", 75),
        **dit,
    )
    return setup, notes


def _cached_text(values: Mapping[str, Any]) -> bool:
    return bool(values.get("cache_text_encoder_outputs") or values.get("cache_text_encoder_outputs_to_disk"))


def _dit_fields(
    family: str, raw: Mapping[str, Any], values: dict[str, Any], variant: Optional[str], notes: list[str]
) -> dict[str, Any]:
    """The Setup fields of a FLUX.1/SD3 run ({} for SD families); notes for the arguments read and ignored."""
    found_variant = detect_variant(family, raw, variant, notes)
    if not found_variant:
        return {}
    swap = values.get("blocks_to_swap", 0) or 0
    if values.get("split_mode") and not swap:
        swap = 18
        notes.append("split_mode = true without blocks_to_swap: sd-scripts sets blocks_to_swap 18")
    if values.get("max_token_length") is not None:
        notes.append(
            "max_token_length is not used by the FLUX.1/SD3 trainers (sd-scripts warns and ignores it); "
            "the T5 length is t5xxl_max_token_length"
        )
    attention = [k for k in ("sdpa", "xformers", "mem_eff_attn") if values.get(k)]
    if attention:
        notes.append(f"{', '.join(attention)}: sd-scripts' DiTs always use scaled_dot_product_attention")
    given = sorted(k for k in DIT_IGNORED if k in raw)
    if given:
        notes.append("DiT trainer arguments that do not change the estimate: " + ", ".join(given))
    return {
        "variant": found_variant,
        "blocks_to_swap": swap,
        "t5_tokens": values.get("t5xxl_max_token_length", 0),
        "apply_t5_attn_mask": values.get("apply_t5_attn_mask", False),
    }


def _dataset_overrides(path: Optional[str], base: Optional[Path], notes: list[str]) -> dict[str, Any]:
    """Resolution and batch size from the dataset config when it sets them (sd-scripts lets it override)."""
    if not path:
        return {}
    candidates = [Path(path)] + ([base / path, base.parent / path] if base is not None else [])
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        notes.append(f"dataset_config {path!r} not found from here: its resolution/batch size (if any) not read")
        return {}
    data = _load_toml(found)
    general = data.get("general", {}) if isinstance(data.get("general"), dict) else {}
    datasets = data.get("datasets", []) if isinstance(data.get("datasets"), list) else []
    found_values: dict[str, Any] = {}
    origin = f"dataset_config {found}"
    for scope in [general] + [d for d in datasets if isinstance(d, dict)]:
        if "resolution" in scope:
            raw = scope["resolution"]
            raw = ",".join(str(x) for x in raw) if isinstance(raw, list) else raw
            found_values["resolution"] = _check("resolution", raw, origin)
        if "batch_size" in scope:
            size = _check("train_batch_size", scope["batch_size"], origin)
            found_values["train_batch_size"] = max(size, found_values.get("train_batch_size", 0))
    if found_values:
        notes.append(f"from {found}: " + ", ".join(f"{k}={v}" for k, v in found_values.items()))
    return found_values


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.load(str(path))
    with open(path, "rb") as f:
        return tomllib.load(f)
