"""create_network's arguments: sd-scripts' ``--network_args`` into a config, and network_dim/network_alpha."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional

from .aclora_config import ACLoRAConfig, validate
from .declared import BY_NAME, FAMILIES, LAYER_OPTIONS, OPTIONS
from .option import OptionError

logger = logging.getLogger(__name__)

_QUOTES = ("'", '"')


def parse_network_args(
    kwargs: Mapping[str, Any], max_rank: Optional[int] = None, family: Optional[str] = None
) -> ACLoRAConfig:
    """Parse sd-scripts' ``**kwargs`` (strings, or Python values from the API) into a config.

    ``family`` (a :data:`~aclora_ext.options.FAMILIES` key): the model's family; an option that only another
    family has is refused, naming the key, the value and the options this family accepts.
    """
    kwargs, quoted = _unquote(kwargs)
    unknown = sorted(k for k in kwargs if k not in BY_NAME)
    if unknown:
        key = unknown[0]
        if key in quoted:
            how = f", from the quoted argument {quoted[key]!r}"
        elif key[:1] in _QUOTES:
            how = f"; it starts with a quote, {key[0]}, that the value does not end with"
        else:
            how = ""
        raise OptionError(
            f"network_args: unknown key {key!r} (value {kwargs[key]!r}{how}); "
            f"allowed keys: {', '.join(o.name for o in OPTIONS)}"
        )
    if family is not None:
        _check_family(kwargs, family)
    values = {name: BY_NAME[name].parse(raw) for name, raw in kwargs.items()}
    return validate(ACLoRAConfig(**values), max_rank=max_rank)


def _unquote(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``kwargs`` with every key=value that arrived wrapped in one pair of quotes unwrapped, and those arguments.

    The kohya_ss GUI passes each "Additional parameters" piece through shlex.quote and runs sd-scripts without a
    shell, so ``ranks_from=C:\\runs\\x.safetensors`` arrives as ``'ranks_from=C:\\runs\\x.safetensors'`` and
    sd-scripts' split on "=" gives the key ``'ranks_from`` and a value ending in ``'``. Only a quote on the key's
    start matched by the same quote on the value's end is taken off; anything else is left for the key check.
    """
    plain = {key: value for key, value in kwargs.items() if not _is_quoted(key, value)}
    quoted: dict[str, str] = {}
    for key, value in kwargs.items():
        if not _is_quoted(key, value):
            continue
        name, inner = key[1:], value[:-1]
        # sd-scripts adds dropout=--network_dropout only because it did not see the quoted dropout
        if name in plain and not (name == "dropout" and name not in quoted):
            earlier = quoted.get(name, f"{name}={plain[name]}")
            raise OptionError(
                f"network_args: {name} is given twice, as {earlier!r} and as {key}={value}; allowed: one of them"
            )
        plain[name] = inner
        quoted[name] = f"{key}={value}"
    if quoted:
        logger.warning(
            "AC-LoRA: network_args %s arrived wrapped in quotes (the kohya_ss GUI quotes an argument with a "
            "backslash or another character special to a shell); read as %s",
            ", ".join(quoted.values()),
            ", ".join(f"{name}={plain[name]}" for name in quoted),
        )
    return plain, quoted


def _is_quoted(key: str, value: Any) -> bool:
    return len(key) > 1 and key[0] in _QUOTES and isinstance(value, str) and value.endswith(key[0])


def _check_family(kwargs: Mapping[str, Any], family: str) -> None:
    for key in sorted(kwargs):
        option = BY_NAME[key]
        if option.families and family not in option.families:
            theirs = " and ".join(FAMILIES[f] for f in option.families)
            ours = [o.name for o in LAYER_OPTIONS if not o.families or family in o.families]
            raise OptionError(
                f"network_args: {key}={kwargs[key]!r} is an option for {theirs} models, and this model is "
                f"{FAMILIES[family]}; the layer options allowed for {FAMILIES[family]}: {', '.join(ours)}"
            )


def parse_positive(
    name: str, raw: Any, default: Optional[float], kind: Callable[[Any], Any] = float, allow_zero: bool = False
) -> Any:
    """Parse ``network_dim``/``network_alpha`` style arguments (numbers or numeric strings)."""
    if raw is None:
        return default
    what = f"a positive {'integer' if kind is int else 'number'}"
    try:
        value = kind(float(raw)) if kind is int else kind(raw)
        if kind is int and float(raw) != int(float(raw)):
            raise ValueError
    except (TypeError, ValueError):
        raise OptionError(f"{name}={raw!r} is not valid; allowed: {what}") from None
    if not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero):
        raise OptionError(f"{name}={raw!r} is not valid; allowed: {'a number >= 0' if allow_zero else what}")
    return value
