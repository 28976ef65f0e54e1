"""What one RESTART did: the one record of it, the log line it prints, and the history entry it is kept as.

The record is serialised where it is stored: the metadata's ``aclora_history`` takes ``entry()`` as JSON
(``network.saving``), the resumable state packs it into an integer row (``network.state``), and
``from_entry`` reads either back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .. import functional as F


@dataclass
class RestartReport:
    """What one RESTART did: the threshold, the loss it came from, and every module's rank."""

    index: int
    epoch: int
    step: int
    p: Optional[float]  # NaN in product mode (no energy share); None when read back from a resumed state
    loss: Optional[float]
    alpha: float
    mode: str
    ranks: dict[str, int]  # in the network's module order
    max_rank: int
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    p_clamped: bool = False
    applied: bool = True
    reason: str = ""
    # "loss" (p = 1 - L^alpha), "fixed_p" or "given"; product mode: "validation", "prior", "frozen", "deferred"
    p_source: str = "loss"
    level: Optional[float] = None  # product mode: the threshold, in decades below the largest component (inf: none)
    validation_loss: Optional[float] = None  # product mode with held-out loss: the chosen configuration's
    candidates: int = 0  # product mode with held-out loss: configurations evaluated

    def rank_stats(self) -> tuple[int, float, int]:
        values = list(self.ranks.values())
        return min(values), F.median(values), max(values)

    def line(self) -> str:
        """The one log line per RESTART."""
        if not self.applied:
            return f"AC-LoRA RESTART #{self.index} at epoch {self.epoch}, step {self.step}: skipped ({self.reason})"
        lo, mid, hi = self.rank_stats()
        loss = "none seen" if self.loss is None else f"{self.loss:.4f}"
        text = (
            f"AC-LoRA RESTART #{self.index} at epoch {self.epoch}, step {self.step}: {self._threshold(loss)} "
            f"ranks min/median/max {lo}/{mid:g}/{hi} of {self.max_rank} over {len(self.ranks)} modules "
            f"[{self.mode}] in {self.seconds:.2f}s"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} module(s) skipped"
        return text

    def _threshold(self, loss: str) -> str:
        if self.level is None:  # an energy share p: paper mode, or fixed_p / restart(p=...)
            origin = (
                f"from mean loss {loss}, alpha {self.alpha:.2f}"
                if self.p_source == "loss"
                else f"{self.p_source}; mean loss {loss}"
            )
            p = math.nan if self.p is None else self.p
            return f"p={p:.4f} ({origin}{', clamped' if self.p_clamped else ''})"
        where = (
            "keep every component"
            if self.level == math.inf
            else f"threshold 10^-{self.level:.2f} of the largest component"
        )
        if self.p_source == "validation":
            origin = f"chosen on held-out loss {self.validation_loss:.4g} among {self.candidates} candidates"
        elif self.p_source == "frozen":
            origin = "held-out choice frozen"
        elif self.p_source == "deferred":
            origin = "no held-out loss: training left whole, the file is trimmed at save time"
        else:
            origin = "no held-out loss: the default level"
        return f"{where} ({origin}; mean training loss {loss})"

    def as_dict(self) -> dict:
        lo, mid, hi = self.rank_stats() if self.ranks else (0, 0.0, 0)
        return {
            "index": self.index,
            "epoch": self.epoch,
            "step": self.step,
            "p": self.p,
            "loss": self.loss,
            "alpha": self.alpha,
            "p_source": self.p_source,
            "mode": self.mode,
            "seconds": round(self.seconds, 4),
            "applied": self.applied,
            "rank_min": lo,
            "rank_median": mid,
            "rank_max": hi,
            "skipped": list(self.skipped),
            "level": self.level,
            "validation_loss": self.validation_loss,
            "candidates": self.candidates,
        }

    # --- the history entry: what the metadata (aclora_history) and the resumable state keep -------------
    def entry(self) -> dict[str, Any]:
        """The RESTART as the history keeps it: its ranks a list in module order (``aclora_modules``), the
        level and held-out loss only when a level decided it. The keys and their order are the file format."""
        entry: dict[str, Any] = {
            "index": self.index,
            "epoch": self.epoch,
            "step": self.step,
            "p": self.p,
            "loss": self.loss,
            "alpha": self.alpha,
            "seconds": self.seconds,
            "ranks": list(self.ranks.values()),
            "source": self.p_source,
        }
        if self.level is not None:
            entry.update(level=self.level, validation_loss=self.validation_loss)
        return entry

    @classmethod
    def from_entry(
        cls, entry: dict[str, Any], names: Sequence[str], mode: str = "", max_rank: int = 0
    ) -> "RestartReport":
        """A history entry read back (``names``: the modules its ranks list is in the order of)."""
        ranks = [int(k) for k in entry["ranks"]]
        return cls(
            index=int(entry["index"]),
            epoch=entry["epoch"],
            step=entry["step"],
            p=entry["p"],
            loss=entry["loss"],
            alpha=entry["alpha"],
            mode=mode,
            ranks=dict(zip(names, ranks)),
            max_rank=max_rank or max(ranks, default=0),
            seconds=entry.get("seconds", 0.0),
            p_source=entry.get("source", "loss"),
            level=entry.get("level"),
            validation_loss=entry.get("validation_loss"),
        )

    def __getitem__(self, key: str) -> Any:
        """Read as its history entry (``report["ranks"]``: the list in module order), as the history was
        read before it held the records themselves."""
        return self.entry()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.entry().get(key, default)
