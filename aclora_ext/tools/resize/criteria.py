"""The criteria of ``aclora resize``: how many components each module keeps.

- ``importance`` (the default): the rule training uses in product mode with no
  held-out data, with unit input energy: a component's importance is its
  singular value in the scaled update ΔW (conv kernels flattened), and every
  module keeps the components above ONE threshold shared by the whole file,
  ``min_importance`` times the largest singular value of any module; at least
  ``min_rank`` per module.
- ``sv_fro``, ``sv_cumulative``, ``sv_ratio``: kohya's resize_lora.py methods
  with its ``--dynamic_param`` (``param``), picking exactly the ranks that
  script picks: its +1, its clamps, its MIN_SV floor, on the full min(out, in)
  spectrum of the unscaled up @ down (``functional.resize_lora_rank``). A rank
  above the module's number of components (the +1 can ask for one more) gets
  zero factors there, where the script stores rounding noise.

Every criterion is capped by ``max_rank`` (``max_conv_rank`` for conv modules,
1x1 included, as resize_lora's ``--new_conv_rank``); by default the largest
rank in the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ...options import OPTIONS

CRITERIA = ("importance", "sv_fro", "sv_cumulative", "sv_ratio")
# the same default as training's min_importance (product mode without held-out data)
DEFAULT_MIN_IMPORTANCE = next(option.default for option in OPTIONS if option.name == "min_importance")


class ResizeError(ValueError):
    """Resize parameters that cannot be used (the message names the parameter, its value and what is allowed)."""


# --- the criterion ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    """How many components each module keeps (see the module docstring)."""

    name: str = "importance"
    # importance: the threshold, a fraction of the largest singular value
    min_importance: float = DEFAULT_MIN_IMPORTANCE
    param: Optional[float] = None  # sv_*: resize_lora's --dynamic_param
    min_rank: int = 1  # importance: fewest components a module keeps
    max_rank: Optional[int] = None  # cap (None: the largest rank in the file)
    max_conv_rank: Optional[int] = None  # cap of conv modules (None: max_rank), resize_lora's --new_conv_rank

    def __post_init__(self) -> None:
        if self.name not in CRITERIA:
            raise ResizeError(f"criterion {self.name!r} is not known; allowed: {', '.join(CRITERIA)}")
        if self.name == "importance":
            if self.param is not None:
                raise ResizeError(
                    f"param={self.param} is for the resize_lora criteria ({', '.join(CRITERIA[1:])}); "
                    "criterion importance takes min_importance"
                )
            if not 0.0 <= self.min_importance < 1.0:  # the range of training's min_importance option
                raise ResizeError(
                    f"min_importance={self.min_importance} is not valid; allowed: a number >= 0 and < 1 "
                    "(a fraction of the largest singular value of the file)"
                )
        else:
            if self.param is None:
                raise ResizeError(
                    f"criterion {self.name} needs param (resize_lora's --dynamic_param): "
                    + (
                        "a ratio > 0 of the largest singular value"
                        if self.name == "sv_ratio"
                        else "a fraction > 0 and <= 1"
                    )
                )
            ok = self.param > 0 if self.name == "sv_ratio" else 0 < self.param <= 1
            if not ok or not math.isfinite(self.param):
                raise ResizeError(
                    f"param={self.param} is not valid for {self.name}; allowed: "
                    + ("a number > 0" if self.name == "sv_ratio" else "a number > 0 and <= 1")
                )
            if self.min_importance != DEFAULT_MIN_IMPORTANCE:
                raise ResizeError(f"min_importance={self.min_importance} is for criterion importance, not {self.name}")
            if self.min_rank != 1:
                raise ResizeError(
                    f"min_rank={self.min_rank} is for criterion importance; resize_lora's {self.name} "
                    "has no minimum rank"
                )
        for key in ("min_rank", "max_rank", "max_conv_rank"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ResizeError(f"{key}={value!r} is not valid; allowed: an integer >= 1")
        for key in ("max_rank", "max_conv_rank"):
            cap = getattr(self, key)
            if cap is not None and self.min_rank > cap:
                raise ResizeError(f"min_rank={self.min_rank} is larger than {key}={cap}")

    @property
    def value(self) -> float:
        """The criterion's parameter: min_importance, or resize_lora's dynamic_param."""
        if self.name == "importance":
            return self.min_importance
        assert self.param is not None  # __post_init__ refuses an sv_* criterion without one
        return float(self.param)

    def describe(self) -> str:
        """ "importance: 0.01", "sv_fro: 0.9": as resize_lora names its dynamic method in the training comment."""
        return f"{self.name}: {self.value}"
