"""One option's declaration (name, kind, default, range, help) and the parsing of a value from it."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .selections import LAYER_KINDS, layer_kind_allowed, parse_layer_kind
from .size_grammar import SIZE_ALLOWED, parse_size

LORA_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt")

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "")


class OptionError(ValueError):
    """A ``--network_args`` value (or a create_network argument) that cannot be used."""


@dataclass(frozen=True)
class Option:
    """One user-facing option: its name, type, default, allowed range and help.

    ``kind`` is "int", "float", "bool", "choice", "size" (bytes, see
    :func:`~aclora_ext.options.size_grammar.parse_size`), "path" (an existing LoRA file), or one of the
    layer-selection kinds of :mod:`~aclora_ext.options.selections`: "ints", "blocks", "regex_dims".
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: Sequence[str] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    optional: bool = True  # "None" is accepted and means "not set"
    families: tuple[str, ...] = ()  # the model families (FAMILIES keys) that accept it; empty: every family
    length: Optional[int] = None  # "ints": how many numbers

    def allowed(self, separator: str = " | ") -> str:
        """A short human description of the accepted values."""
        if self.kind in LAYER_KINDS:
            return layer_kind_allowed(self.kind, self.length)
        if self.kind == "choice":
            text = separator.join(self.choices)
        elif self.kind == "size":
            text = SIZE_ALLOWED
        elif self.kind == "path":
            text = "the path of an existing LoRA file (.safetensors, .ckpt, .pt)"
        elif self.kind == "bool":
            text = separator.join(("true", "false"))
        else:
            lo = "" if self.minimum is None else f"{'>=' if self.min_inclusive else '>'} {self.minimum:g}"
            hi = "" if self.maximum is None else f"{'<=' if self.max_inclusive else '<'} {self.maximum:g}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            text = f"{'an integer' if self.kind == 'int' else 'a number'}{' ' + bounds if bounds else ''}"
        return text + (" (or none)" if self.optional and self.default is None else "")

    def parse(self, raw: Any) -> Any:
        """Convert ``raw`` (a string from the command line, or a Python value) or raise OptionError."""
        if self.kind in LAYER_KINDS and raw is not None:
            # a block selection reads "none" as "no block"; the other layer kinds as "not set"
            if self.kind != "blocks" and isinstance(raw, str) and raw.strip().lower() in _NONE:
                return self.default
            try:
                return parse_layer_kind(self.kind, raw, self.length)
            except (TypeError, ValueError, re.error):
                raise OptionError(self._bad(raw)) from None
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE):
            if self.optional:
                return self.default if self.default is not None else None
            raise OptionError(self._bad(raw))
        text = raw.strip() if isinstance(raw, str) else raw
        try:
            value = self._convert(text)
        except (TypeError, ValueError):
            raise OptionError(self._bad(raw)) from None
        if self.kind in ("int", "float"):
            self._check_range(raw, value)
        return value

    def _convert(self, text: Any) -> Any:
        """``text`` as a value of this kind; ValueError or TypeError if it is none."""
        if self.kind == "choice":
            choice = str(text).lower()
            if choice not in self.choices:
                raise ValueError
            return choice
        if self.kind == "size":
            return parse_size(text)
        if self.kind == "path":
            if isinstance(text, str) and text.lower().endswith(LORA_FILE_SUFFIXES) and os.path.isfile(text):
                return text
            raise ValueError
        if isinstance(text, bool):  # a bool is an int to Python, but not a number to a user
            if self.kind == "bool":
                return text
            raise ValueError
        if self.kind == "bool":
            if str(text).lower() in _TRUE:
                return True
            if str(text).lower() in _FALSE:
                return False
            raise ValueError
        if self.kind == "int":
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        number = float(text)
        if not math.isfinite(number):
            raise ValueError
        return number

    def _check_range(self, raw: Any, value: float) -> None:
        if self.minimum is not None:
            if value < self.minimum or (not self.min_inclusive and value == self.minimum):
                raise OptionError(self._bad(raw))
        if self.maximum is not None:
            if value > self.maximum or (not self.max_inclusive and value == self.maximum):
                raise OptionError(self._bad(raw))

    def _bad(self, raw: Any) -> str:
        return f"network_args: {self.name}={raw!r} is not valid; allowed: {self.allowed()}"
