"""What one RESTART did, and the one log line it prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .. import functional as F


@dataclass
class RestartReport:
    """What one RESTART did: the threshold, the loss it came from, and every module's rank."""

    index: int
    epoch: int
    step: int
    p: float
    loss: Optional[float]
    alpha: float
    mode: str
    ranks: dict[str, int]
    max_rank: int
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    p_clamped: bool = False
    applied: bool = True
    reason: str = ""
    p_source: str = "loss"  # "loss" (p = 1 - L^alpha), "fixed_p" or "given"; product mode: "validation", "prior", "frozen", "deferred"
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
        text = (f"AC-LoRA RESTART #{self.index} at epoch {self.epoch}, step {self.step}: {self._threshold(loss)} "
                f"ranks min/median/max {lo}/{mid:g}/{hi} of {self.max_rank} over {len(self.ranks)} modules "
                f"[{self.mode}] in {self.seconds:.2f}s")
        if self.skipped:
            text += f"; {len(self.skipped)} module(s) skipped"
        return text

    def _threshold(self, loss: str) -> str:
        if self.level is None:  # an energy share p: paper mode, or fixed_p / restart(p=...)
            origin = f"from mean loss {loss}, alpha {self.alpha:.2f}" if self.p_source == "loss" \
                else f"{self.p_source}; mean loss {loss}"
            return f"p={self.p:.4f} ({origin}{', clamped' if self.p_clamped else ''})"
        where = "keep every component" if self.level == float("inf") else \
            f"threshold 10^-{self.level:.2f} of the largest component"
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
        return {"index": self.index, "epoch": self.epoch, "step": self.step, "p": self.p, "loss": self.loss,
                "alpha": self.alpha, "p_source": self.p_source, "mode": self.mode, "seconds": round(self.seconds, 4), "applied": self.applied,
                "rank_min": lo, "rank_median": mid, "rank_max": hi, "skipped": list(self.skipped),
                "level": self.level, "validation_loss": self.validation_loss, "candidates": self.candidates}
