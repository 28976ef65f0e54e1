"""Every option's declaration, one file per topic, gathered here in the order of the options table."""

from __future__ import annotations

from ..option import Option
from .family_layers import FAMILIES, LAYER_OPTIONS
from .kohya import KOHYA_OPTIONS
from .rank_choice import RANK_CHOICE_OPTIONS
from .restart_rules import ENERGY_RULES, RESTART_MODES, RESTART_OPTIONS, SEED
from .saved_file import SAVED_FILE_OPTIONS

OPTIONS: tuple[Option, ...] = (
    KOHYA_OPTIONS + RESTART_OPTIONS + RANK_CHOICE_OPTIONS + (SEED,) + SAVED_FILE_OPTIONS + LAYER_OPTIONS
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}

__all__ = [
    "BY_NAME",
    "ENERGY_RULES",
    "FAMILIES",
    "LAYER_OPTIONS",
    "OPTIONS",
    "RESTART_MODES",
]
