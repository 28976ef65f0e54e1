"""The size grammar of ``max_file_size`` and ``aclora resize --max-size``: "50MB" in, bytes out, and back.

It lives with the options because this layer parses every user value and imports nothing else of the package.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

#: bytes per unit, lower case (units are case-insensitive): KB/MB/GB decimal, KiB/MiB/GiB binary
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
SIZE_ALLOWED = (
    "a size: bytes (123456) or a number with a unit, KB/MB/GB (decimal: 10^3, 10^6, 10^9 bytes) or "
    "KiB/MiB/GiB (binary: 2^10, 2^20, 2^30 bytes), e.g. 50MB"
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$", re.ASCII)


def parse_size(text: Any) -> int:
    """Bytes in "50MB", "50 MB", "1.5GB", "800KB", "512MiB", "100B" or "123456" (an int is bytes).

    KB/MB/GB are decimal, as model sites and file browsers show sizes; KiB/MiB/GiB binary. A bare K, M
    or G is refused as ambiguous, and so are exponents and non-ASCII digits. Fractions need a unit and
    are rounded down (the size is a maximum). ValueError names the value and what is allowed.
    """

    def bad(why: str = "is not valid") -> ValueError:
        return ValueError(f"size {text!r} {why}; allowed: {SIZE_ALLOWED}")

    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise bad()
    if isinstance(text, int):
        if text < 1:
            raise bad()
        return text
    match = _SIZE.match(text)
    if not match:
        raise bad()
    number, unit = match.group(1), match.group(2).lower()
    if unit not in SIZE_UNITS and unit != "":
        raise bad(f"has unit {match.group(2)!r}, which is not known")
    if unit in ("", "b") and "." in number:
        raise bad("is not a whole number of bytes")
    size = int(Decimal(number) * SIZE_UNITS[unit or "b"])  # int() rounds down: the budget is a maximum
    if size < 1:
        raise bad("is less than one byte")
    return size


def format_size(size: int) -> str:
    """ "49,912,345 bytes (49.91 MB)": the exact bytes, and the decimal unit :func:`parse_size` reads."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size:,} bytes ({size / scale:.2f} {unit})"
    return f"{size:,} bytes"
