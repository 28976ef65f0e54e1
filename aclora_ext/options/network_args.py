"""create_network's arguments: sd-scripts' ``--network_args`` into a config, and network_dim/network_alpha."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

from .aclora_config import ACLoRAConfig, validate
from .declared import BY_NAME, FAMILIES, LAYER_OPTIONS, OPTIONS
from .option import OptionError


def parse_network_args(
    kwargs: Mapping[str, Any], max_rank: Optional[int] = None, family: Optional[str] = None
) -> ACLoRAConfig:
    """Parse sd-scripts' ``**kwargs`` (strings, or Python values from the API) into a config.

    ``family`` (a :data:`~aclora_ext.options.FAMILIES` key): the model's family; an option that only another
    family has is refused, naming the key, the value and the options this family accepts.
    """
    unknown = sorted(k for k in kwargs if k not in BY_NAME)
    if unknown:
        key = unknown[0]
        raise OptionError(
            f"network_args: unknown key {key!r} (value {kwargs[key]!r}); "
            f"allowed keys: {', '.join(o.name for o in OPTIONS)}"
        )
    if family is not None:
        _check_family(kwargs, family)
    values = {name: BY_NAME[name].parse(raw) for name, raw in kwargs.items()}
    return validate(ACLoRAConfig(**values), max_rank=max_rank)


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
