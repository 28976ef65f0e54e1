"""The product mode's threshold search: candidate levels and how a held-out loss scores them."""

from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor


#: 10^-4 up to 10^0 = the largest itself (only min_rank components stay), a quarter of a decade apart
LEVELS: tuple[float, ...] = (math.inf,) + tuple(4.0 - 0.25 * i for i in range(17))
LEVEL_STEP = 0.25
#: after a choice, the coarse levels within this many decades of it are evaluated again
WINDOW_DECADES = 1.0


#: the layer-output hook measures the output's mean square on one training forward in this many
OUTPUT_SAMPLE_EVERY = 4

#: standard errors added to a candidate's held-out loss (see ``pessimistic_loss``)
HELDOUT_STANDARD_ERRORS = 1.0


def pessimistic_loss(items: Tensor, reference: Tensor) -> float:
    """A candidate's held-out loss plus ``HELDOUT_STANDARD_ERRORS`` standard errors of its paired difference from
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
    return mean + HELDOUT_STANDARD_ERRORS * _standard_error(items - reference)


def paired_excess(items: Tensor, best: Tensor, groups: Optional[Tensor] = None) -> float:
    """How far a candidate's held-out loss is above the best candidate's beyond ``HELDOUT_STANDARD_ERRORS`` standard
    errors of their paired difference (<= 0: within the band, the one-standard-error rule's "as good").

    The difference is taken item by item; with ``groups`` (the held-out unit, e.g. the image, of every
    item) it is averaged per group first, so that the standard error counts independent units: the items
    of one image (its timesteps) share that image's idiosyncrasies. Invariant to the loss's scale.
    """
    items = items.detach().double().flatten().cpu()
    best = best.detach().double().flatten().cpu()
    if items.shape != best.shape or not bool(torch.isfinite(items).all()) or not bool(torch.isfinite(best).all()):
        return float(items.mean() - best.mean()) if items.numel() and best.numel() else math.inf
    difference = items - best
    if groups is not None and groups.numel() == difference.numel():  # one value per held-out unit
        _, unit, count = groups.cpu().unique(return_inverse=True, return_counts=True)
        difference = torch.zeros(len(count), dtype=difference.dtype).index_add_(0, unit, difference) / count
    return float(difference.mean()) - HELDOUT_STANDARD_ERRORS * _standard_error(difference)


def _standard_error(difference: Tensor) -> float:
    """The standard error of the mean of paired differences (0 with fewer than two)."""
    if difference.numel() < 2:
        return 0.0
    return float(difference.std()) / math.sqrt(difference.numel())


def parsimonious_choice(candidates: dict, groups: Optional[Tensor] = None, final: bool = False) -> tuple:
    """The one-standard-error rule over held-out candidates: which kept set to choose.

    ``candidates``: {signature (kept components per module): 1-D tensor of held-out item losses}, every
    one evaluated on the same items; the signature with the largest total keeps every active component.
    During training (Breiman's rule): among the candidates whose loss is no worse than the best
    candidate's by more than one standard error of their paired difference (``paired_excess``), the one
    keeping the fewest components. A run that then trains at that rank compares, at its next decision, a
    trained model with cuts of it. ``final`` (the file's own ranks at save time: no training follows the
    cut, and a cut of a trained model is not a trained smaller model): a cut only where it beats keeping
    everything by one standard error, the one it beats by most (ties: the fewer components).
    """
    finite = {sig: items for sig, items in candidates.items() if math.isfinite(float(items.double().mean()))}
    if not finite:
        raise ValueError("parsimonious_choice: no candidate has a finite held-out loss")
    everything = max(finite, key=sum)
    if final:
        margin = {
            sig: paired_excess(finite[everything], items, groups) for sig, items in finite.items() if sig != everything
        }  # > 0: this cut beats keeping everything beyond the band
        chosen = max(margin, key=lambda sig: (margin[sig], -sum(sig)), default=everything)
        return chosen if margin.get(chosen, 0.0) > 0.0 else everything
    best = min(finite, key=lambda sig: float(finite[sig].double().mean()))
    within = [sig for sig, items in finite.items() if sig == best or paired_excess(items, finite[best], groups) <= 0.0]
    return min(within, key=lambda sig: (sum(sig), float(finite[sig].double().mean())))


def window_levels(center: Optional[float]) -> list[float]:
    """The coarse levels worth evaluating after a choice at ``center``: keeping everything, and those
    within ``WINDOW_DECADES`` of it (every level before any choice, ``center`` None, and after keeping
    everything, ``center`` inf: that choice says nothing about where a cut would go)."""
    if center is None or center == math.inf:  # nothing chosen yet, or everything kept: no hint where to cut
        return list(LEVELS)
    return [LEVELS[0]] + [level for level in LEVELS[1:] if abs(level - center) <= WINDOW_DECADES + 1e-9]


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


__all__ = [
    "LEVELS",
    "LEVEL_STEP",
    "WINDOW_DECADES",
    "OUTPUT_SAMPLE_EVERY",
    "HELDOUT_STANDARD_ERRORS",
    "pessimistic_loss",
    "paired_excess",
    "parsimonious_choice",
    "window_levels",
    "refine_levels",
]
