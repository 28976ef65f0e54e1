"""The product mode's threshold search: candidate levels and how a held-out loss scores them."""

from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor


#: 10^-4 up to 10^0 = the largest itself (only min_rank components stay), a quarter of a decade apart
LEVELS: tuple[float, ...] = (math.inf,) + tuple(4.0 - 0.25 * i for i in range(17))
LEVEL_STEP = 0.25


#: the layer-output hook measures the output's mean square on one training forward in this many
OUTPUT_SAMPLE_EVERY = 4

#: standard errors added to a candidate's held-out loss (see ``pessimistic_loss``)
HELDOUT_STANDARD_ERRORS = 1.0


def pessimistic_loss(items: Tensor, reference: Tensor, standard_errors: float = HELDOUT_STANDARD_ERRORS) -> float:
    """A candidate's held-out loss plus ``standard_errors`` standard errors of its paired difference from
    ``reference`` (the loss of keeping everything, item by item on the same held-out items).

    A held-out set is a handful of images with fixed noise: among ~15 candidates,
    the one whose loss is lowest by chance wins too often, and a cut that only
    looks better costs what the model learned. Judged by the upper end of a
    one-standard-error band on the paired difference, a cut must beat keeping
    everything by more than the noise of that difference (the reference scores
    exactly its mean). The same for every candidate and invariant to the loss's
    scale. With fewer than two items, or items that do not pair, it is the mean.
    """
    items = items.detach().double().flatten().cpu()
    mean = float(items.mean()) if items.numel() else math.nan
    if not math.isfinite(mean):
        return math.inf
    reference = reference.detach().double().flatten().cpu()
    if items.numel() < 2 or items.shape != reference.shape or not bool(torch.isfinite(reference).all()):
        return mean
    difference = items - reference
    return mean + standard_errors * float(difference.std()) / math.sqrt(items.numel())


def window_levels(center: Optional[float], width: float = 1.0) -> list[float]:
    """The coarse levels worth evaluating after a choice at ``center``: keeping everything, and those
    within ``width`` decades of it (every level before any choice, ``center`` None, and after keeping
    everything, ``center`` inf: that choice says nothing about where a cut would go)."""
    if center is None or center == math.inf:  # nothing chosen yet, or everything kept: no hint where to cut
        return list(LEVELS)
    return [LEVELS[0]] + [level for level in LEVELS[1:] if abs(level - center) <= width + 1e-9]


def refine_levels(importances: list[Tensor], level: float, most: int = 4) -> list[float]:
    """Levels strictly between ``level``'s coarse neighbours at which the kept set changes.

    Every threshold between two consecutive importances keeps the same
    components, so the candidates are the geometric midpoints of consecutive
    distinct importances in that window, as levels below the largest; when there
    are more than ``most``, ``most`` of them evenly spread. Empty for ``inf``
    (keep everything has no neighbour below it) or when nothing is in between.
    """
    values = torch.cat([i.flatten() for i in importances]) if importances else torch.zeros(0)
    values = values[values > 0]
    if level == math.inf or values.numel() < 2:
        return []
    top = float(values.max())
    levels = torch.log10(top / values).unique()  # ascending: the largest first
    cuts = ((levels[1:] + levels[:-1]) / 2).tolist()
    low, high = level - LEVEL_STEP, level + LEVEL_STEP
    inside = [c for c in cuts if low < c < high and abs(c - level) > 1e-9]
    if len(inside) > most:
        inside = [inside[round(i * (len(inside) - 1) / (most - 1))] for i in range(most)]
    return inside


__all__ = ["LEVELS", "LEVEL_STEP", "OUTPUT_SAMPLE_EVERY", "HELDOUT_STANDARD_ERRORS", "pessimistic_loss",
           "window_levels", "refine_levels"]
