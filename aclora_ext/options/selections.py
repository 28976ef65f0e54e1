"""The value kinds that select layers, as sd-scripts' networks.lora_flux / lora_sd3 spell them.

``ints``: a fixed number of ranks ("4,0,8,0,0" or "[4,0,8,0,0]"); ``blocks``: "all", "none" or indices and
inclusive ranges ("0,2-5"); ``regex_dims``: pattern=rank pairs ("double_blocks_0_=16,single=8"); ``regex_lrs``:
pattern=learning-rate pairs ("double_blocks=1e-4,single=0"); ``patterns``:
regular expressions as a Python literal, as lora_anima reads them ("['.*mlp.*', '.*attn.*']"). A parser here
raises ValueError, TypeError or re.error; :class:`~aclora_ext.options.option.Option` turns that into the
message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Callable, Mapping, Optional, Union

#: the kinds of :class:`~aclora_ext.options.option.Option` parsed here
LAYER_KINDS = ("ints", "blocks", "regex_dims", "regex_lrs", "patterns")
#: a block selection: "all", or the indices of the blocks that get a LoRA
BlockSelection = Union[str, tuple[int, ...]]


def layer_kind_allowed(kind: str, length: Optional[int]) -> str:
    """What a value of ``kind`` may be, for messages and the options table."""
    if kind == "ints":
        return f"{length} integers >= 0, comma-separated, brackets optional (or none)"
    if kind == "blocks":
        return "all, none, or block indices and inclusive ranges, comma-separated (e.g. 0,2-5)"
    if kind == "patterns":
        return "a Python literal: a quoted regular expression or a list of them, e.g. ['.*mlp.*'] (or none)"
    if kind == "regex_lrs":
        return (
            "comma-separated pattern=lr pairs, each pattern a regular expression and each lr a finite number >= 0 "
            "(or none)"
        )
    return (
        "comma-separated pattern=rank pairs, each pattern a regular expression and each rank an integer >= 0 (or none)"
    )


def parse_layer_kind(kind: str, raw: Any, length: Optional[int]) -> Any:
    """``raw`` (a string from the command line, or a Python value) as a value of ``kind``."""
    if kind == "blocks":
        return parse_blocks(raw)
    if kind == "ints":
        return parse_ints(raw, length)
    if kind == "patterns":
        return parse_patterns(raw)
    if kind == "regex_lrs":
        return parse_regex_pairs(raw, _learning_rate)
    return parse_regex_dims(raw)


def parse_blocks(raw: Any) -> BlockSelection:
    """sd-scripts' block selection: "all", "none" or "" (no block), or indices and a-b ranges."""
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text == "all":
            return "all"
        if text in ("none", ""):
            return ()
        items = [part.strip() for part in text.split(",")]
    else:
        items = [str(int(v)) for v in raw]
    chosen: set[int] = set()
    for item in items:
        start, _, end = item.partition("-")
        first, last = _index(start), _index(end if end else start)
        if last < first:
            raise ValueError(item)
        chosen.update(range(first, last + 1))
    return tuple(sorted(chosen))


def parse_ints(raw: Any, length: Optional[int]) -> tuple[int, ...]:
    """``length`` integers >= 0, comma-separated, in optional brackets (or a sequence of ints)."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        values = [_index(part) for part in text.split(",")]
    else:
        values = [v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else _index("x") for v in raw]
    if length is not None and len(values) != length:
        raise ValueError(raw)
    return tuple(values)


def parse_regex_dims(raw: Any) -> tuple[tuple[str, int], ...]:
    """Comma-separated pattern=rank pairs (or a mapping), each pattern a valid regular expression."""
    return parse_regex_pairs(raw, _rank)


def parse_regex_pairs(raw: Any, value_of: Callable[[Any], Any]) -> tuple[tuple[str, Any], ...]:
    """Comma-separated pattern=value pairs (or a mapping), each pattern a valid regular expression and each
    value what ``value_of`` makes of it (it raises ValueError on a bad one)."""
    pairs: list[tuple[Any, Any]]
    if isinstance(raw, Mapping):
        pairs = list(raw.items())
    elif isinstance(raw, str):
        pairs = []
        for part in raw.split(","):
            if part.strip():
                pattern, equals, rank = part.partition("=")
                pairs.append((pattern, rank if equals else "x"))  # "x": a pair without a rank is refused below
    else:
        raise TypeError(raw)
    parsed = []
    for pattern, rank in pairs:
        pattern = str(pattern).strip()
        if not pattern:
            raise ValueError(raw)
        re.compile(pattern)
        parsed.append((pattern, value_of(rank)))
    if not parsed:
        raise ValueError(raw)
    return tuple(parsed)


def parse_patterns(raw: Any) -> tuple[str, ...]:
    """A regular expression or a list of them, written as a Python literal (``ast.literal_eval``, as
    lora_anima reads include_patterns / exclude_patterns), each one valid."""
    try:
        value = ast.literal_eval(raw.strip()) if isinstance(raw, str) else raw
    except SyntaxError:  # an unquoted regular expression, most often
        raise ValueError(raw) from None
    patterns = list(value) if isinstance(value, (list, tuple)) else [value]
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(raw)
    for pattern in patterns:
        re.compile(pattern)
    return tuple(patterns)


def _learning_rate(raw: Any) -> float:
    """A finite learning rate >= 0 (a number, or its text)."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError(raw)
    return value


def _rank(raw: Any) -> int:
    """A rank >= 0 (an int, or its text); a bool is no rank (as in :func:`parse_ints`)."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    return _index(str(raw))


def _index(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(text)
    return int(text)
