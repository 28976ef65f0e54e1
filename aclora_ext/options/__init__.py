"""Every ``--network_args`` option, declared once and parsed from that declaration.

sd-scripts hands ``--network_args key=value`` pairs to ``create_network`` as ``**kwargs`` of strings (and
always adds ``dropout``). :func:`parse_network_args` turns them into a typed :class:`ACLoRAConfig`; anything
unknown or malformed raises :class:`OptionError` naming the key, the value and what is allowed. The options
table of docs/options.md is generated from :data:`OPTIONS` (``aclora options``) and a test keeps the two in step.
"""

from __future__ import annotations

from .aclora_config import ACLoRAConfig, validate
from .declared import ENERGY_RULES, FAMILIES, LAYER_OPTIONS, OPTIONS, RESTART_MODES
from .network_args import parse_network_args, parse_positive
from .option import LORA_FILE_SUFFIXES, Option, OptionError
from .selections import BlockSelection
from .size_grammar import SIZE_ALLOWED, SIZE_UNITS, format_size, parse_size
from .table import markdown_table

__all__ = [
    "ACLoRAConfig",
    "BlockSelection",
    "ENERGY_RULES",
    "FAMILIES",
    "LAYER_OPTIONS",
    "LORA_FILE_SUFFIXES",
    "OPTIONS",
    "Option",
    "OptionError",
    "RESTART_MODES",
    "SIZE_ALLOWED",
    "SIZE_UNITS",
    "format_size",
    "markdown_table",
    "parse_network_args",
    "parse_positive",
    "parse_size",
    "validate",
]
