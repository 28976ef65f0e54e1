"""Version 0.1's rank search, kept here for the benchmarks that compare against it (no longer a product option).

Its three rules, each of which the benchmarks name by the option it had (``cut_rule=beat``,
``freed_slots=relearn``, ``cut_without_heldout=true``):

* ``cut_rule=beat``: among the held-out candidates, the level with the lowest running score of pessimistic
  losses (``F.pessimistic_loss``: the mean plus one standard error of the paired difference from keeping
  everything), a score that halves at every evaluation, then the best of the cuts between that level's
  neighbours (the product now takes the fewest components within one standard error of the best:
  ``F.parsimonious_choice``);
* ``freed_slots=relearn``: the slots a held-out cut frees restart like a fresh LoRA and learn again (the
  product holds them out of the forward, so the run trains at the kept rank);
* ``cut_without_heldout=true``: without a held-out loss, every RESTART also cuts at ``min_importance`` (the
  product leaves training whole and trims the file at save time).

``attach(model, **options)`` is ``aclora_ext.attach`` that also takes those three keys; ``use(network, ...)``
switches an existing network's rank search to them.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from aclora_ext import functional as F
from aclora_ext.lora.module import ACLoRAModule
from aclora_ext.lora.product_restart import Spectrum, keeps_at_level
from aclora_ext.network.factory import attach as product_attach
from aclora_ext.network.network import ACLoRANetwork
from aclora_ext.ranksearch.rank_search import Keeps, RankSearch

#: the options of version 0.1 and the values each allowed (the first: what the product does now)
RULES = {"cut_rule": ("parsimony", "beat"), "freed_slots": ("hold", "relearn"), "cut_without_heldout": (False, True)}


class RuleBefore(RankSearch):
    """The rank search with any of version 0.1's rules (set by ``use``)."""

    beat = False
    relearn = False
    cut_without_heldout = False

    def defers(self, p: Optional[float], progress: float) -> bool:
        return False if self.cut_without_heldout else super().defers(p, progress)

    def _holds_after(self, modules: Sequence[ACLoRAModule], decision: dict) -> bool:
        return False if self.relearn else super()._holds_after(modules, decision)

    def _choose_on_heldout(
        self, modules: Sequence[ACLoRAModule], spectra: dict[int, Spectrum], final: bool
    ) -> Optional[tuple[Keeps, dict]]:
        if not self.beat:
            return super()._choose_on_heldout(modules, spectra, final)
        seen: dict[tuple, tuple[float, float]] = {}  # kept ranks -> (pessimistic loss, mean loss)
        reference: list[torch.Tensor] = []  # the items of keeping everything

        def evaluate(level: float) -> float:
            keeps = keeps_at_level(spectra, level, self.config.min_rank)
            signature = tuple(int(k.sum()) for k in keeps.values())
            if signature not in seen:
                self._set_masks(modules, keeps)
                items = self.held_out_losses()
                if not reference:
                    reference.append(items)
                mean = float(items.mean()) if items.numel() else math.nan
                seen[signature] = (F.pessimistic_loss(items, reference[0]), mean)
            return seen[signature][0]

        try:
            levels = F.window_levels(self.frozen_level)  # keeping everything first: the paired reference
            values = {level: evaluate(level) for level in levels}
            finite = [v for v in values.values() if math.isfinite(v)]
            if not finite:
                return None
            best = min(finite)
            scale = abs(best) if best != 0 else 1.0
            for level, value in values.items():
                excess = (value - best) / scale if math.isfinite(value) else math.inf
                self.scores[level] = 0.5 * self.scores.get(level, 0.0) + excess
            coarse = min(values, key=lambda lv: (self.scores[lv], -lv))
            importances = [sp.importance for sp in spectra.values() if sp.measured]
            level, value = coarse, values[coarse]
            for fine in F.refine_levels(importances, coarse):
                candidate = evaluate(fine)
                if math.isfinite(candidate) and candidate < value:
                    level, value = fine, candidate
        finally:
            self._set_masks(modules, None)
        self.frozen_level = level
        keeps = keeps_at_level(spectra, level, self.config.min_rank)
        mean = seen[tuple(int(k.sum()) for k in keeps.values())][1]
        return keeps, {"level": level, "source": "validation", "validation_loss": mean, "candidates": len(seen)}


def use(
    network: ACLoRANetwork, cut_rule: str = "parsimony", freed_slots: str = "hold", cut_without_heldout: Any = False
) -> ACLoRANetwork:
    """Switch ``network``'s rank search to the chosen rules of version 0.1 (in place; returns the network)."""
    flag = (
        str(cut_without_heldout).lower() in ("true", "1")
        if isinstance(cut_without_heldout, str)
        else bool(cut_without_heldout)
    )
    for key, value in (("cut_rule", cut_rule), ("freed_slots", freed_slots), ("cut_without_heldout", flag)):
        if value not in RULES[key]:
            raise ValueError(
                f"bench rule_before: {key}={value!r} is not valid; allowed: {', '.join(map(str, RULES[key]))}"
            )
    search = network.rank_search
    search.__class__ = RuleBefore  # the same state, the rules of version 0.1
    assert isinstance(search, RuleBefore)
    search.beat, search.relearn, search.cut_without_heldout = cut_rule == "beat", freed_slots == "relearn", flag
    return network


def split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the product's options, version 0.1's) of a benchmark's option set."""
    return ({k: v for k, v in options.items() if k not in RULES}, {k: v for k, v in options.items() if k in RULES})


def attach(model: torch.nn.Module, **options: Any) -> ACLoRANetwork:
    """``aclora_ext.attach`` that also takes ``cut_rule``, ``freed_slots`` and ``cut_without_heldout``."""
    product, before = split(options)
    network = product_attach(model, **product)
    return use(network, **before) if before else network
