"""The product-mode RESTART over many modules: each update's spectrum and component importances
(batched by shape, ``functional.product``), the factors rebased on the update's SVD, keep masks applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from .. import functional as F
from .batching import Batch, chunk_budget, chunks, decompose_in_batches, generator, shape_groups, stack, write_back
from .module import ACLoRAModule


# --- product mode ---------------------------------------------------------------------------------------------------
@dataclass
class Spectrum:
    """What the product mode decides from, per module: its update's singular values (alpha/R included),
    each component's importance (``F.component_importance`` with alpha/R, relative to the RMS of the layer's output,
    so that layers whose activations differ in scale compare on the same footing), and the old
    lora_down's row statistics that a RESTART of its freed slots needs."""

    s: torch.Tensor  # (R,), descending, on the CPU
    importance: torch.Tensor  # (R,), on the CPU
    row_sq: float
    std: float
    measured: bool  # False: no layer inputs were recorded (the importance is then the singular value)


@dataclass
class InputStats:
    """What a module saw in training: the sum of h h^T over its LoRA activations h = lora_down(x) and
    how many, and the sum of squares of its layer's outputs and how many entries."""

    gram: torch.Tensor
    count: int = 0
    out_sq: Optional[torch.Tensor] = None
    out_numel: int = 0
    out_calls: int = 0  # training forwards seen by the output hook (it samples them, see ranksearch)

    def output_rms(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The RMS of the layer's outputs seen (only when ``measured``)."""
        if self.out_sq is None:
            raise ValueError("no layer output was recorded")
        return (self.out_sq.to(device, dtype) / self.out_numel).sqrt()

    def reset(self) -> None:
        self.gram.zero_()
        self.count = 0
        if self.out_sq is not None:
            self.out_sq.zero_()
        self.out_numel = 0
        self.out_calls = 0

    @property
    def measured(self) -> bool:
        return self.count > 0 and self.out_numel > 0


def analyse_modules(
    modules: Sequence[ACLoRAModule],
    stats: Mapping[str, InputStats],
    *,
    rebase: bool,
    budget_bytes: Optional[int] = None,
) -> tuple[dict[int, Spectrum], list[str]]:
    """Spectrum and component importance of every module's update (batched by shape).

    With ``rebase`` the factors are rewritten in place in their update's SVD
    basis (one component per slot, descending; the update itself unchanged), so
    that a keep mask acts on slots: ``restart_kept`` then, or the held-out
    evaluation of candidate thresholds before it. Modules with non-finite
    weights, or whose decomposition fails even in float64, are left out
    (returned by name) and left unchanged.
    """
    spectra: dict[int, Spectrum] = {}

    def analyse(batch: Batch) -> None:
        found, factors = _analyse(batch.modules, batch.down, batch.up, stats)
        spectra.update(zip(batch.indices, found))
        if rebase:
            write_back(batch.modules, *factors)

    with torch.no_grad():
        skipped = decompose_in_batches(modules, analyse, what="RESTART", budget_bytes=budget_bytes)
    return spectra, skipped.names


def _analyse(
    batch: Sequence[ACLoRAModule], down: torch.Tensor, up: torch.Tensor, stats: Mapping[str, InputStats]
) -> tuple[list[Spectrum], tuple[torch.Tensor, torch.Tensor]]:
    s, to_up, to_down = F.product_core(down, up)
    scale = torch.tensor([m.scale for m in batch], dtype=s.dtype, device=s.device)
    s_scaled = s * scale[:, None]
    measured = [m.lora_name in stats and stats[m.lora_name].measured for m in batch]
    importance = s_scaled  # unmeasured modules: unit input energy
    if any(measured):
        rank = down.shape[1]
        zeros = torch.zeros(rank, rank, dtype=down.dtype, device=down.device)
        gram = torch.stack(
            [stats[m.lora_name].gram.to(down.device, down.dtype) if ok else zeros for m, ok in zip(batch, measured)]
        )
        count = torch.tensor(
            [stats[m.lora_name].count if ok else 1 for m, ok in zip(batch, measured)], device=down.device
        )
        output_rms = torch.stack(
            [
                stats[m.lora_name].output_rms(down.device, down.dtype)
                if ok
                else torch.ones((), dtype=down.dtype, device=down.device)
                for m, ok in zip(batch, measured)
            ]
        )
        measured_importance = (
            F.component_importance(to_down, gram, count) * (scale / output_rms.clamp(min=1e-12))[:, None]
        )
        importance = torch.where(torch.tensor(measured, device=down.device)[:, None], measured_importance, s_scaled)
    if not bool(F.is_finite(importance, s_scaled).all()):
        raise torch.linalg.LinAlgError("non-finite spectrum")
    row_sq = down.pow(2).sum(dim=(1, 2)) / down.shape[1]
    std = F.row_std(down)
    keep_all = torch.full(s.shape, True, device=s.device)
    new_down, new_up = F.component_factors(down, up, s, to_up, to_down, keep_all, down.shape[1])
    cpu = [t.cpu() for t in (s_scaled, importance, row_sq, std)]
    spectra = [
        Spectrum(cpu[0][j], cpu[1][j], float(cpu[2][j]), float(cpu[3][j]), measured[j]) for j in range(len(batch))
    ]
    return spectra, (new_down, new_up)


def restart_kept(
    modules: Sequence[ACLoRAModule],
    spectra: Mapping[int, Spectrum],
    keeps: Mapping[int, torch.Tensor],
    seed: int,
    budget_bytes: Optional[int] = None,
) -> None:
    """Apply keep masks to modules rebased by ``analyse_modules``: kept slots stay, freed slots restart."""
    chunk_no = 0
    with torch.no_grad():
        for (rank, cols, rows, device), indices in shape_groups(modules).items():
            indices = [i for i in indices if i in keeps]
            size = F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))
            for part in chunks(indices, size):
                chunk_no += 1
                batch = [modules[i] for i in part]
                down, up = stack(batch, torch.float32)
                keep = torch.stack([keeps[i] for i in part]).to(down.device)
                row_sq = torch.tensor([spectra[i].row_sq for i in part], device=down.device)
                std = torch.tensor([spectra[i].std for i in part], device=down.device)
                gen = generator(down.device, seed * 1_000_003 + chunk_no)
                new_down, new_up = F.restart_slots(down, up, keep, row_sq, std, gen)
                write_back(batch, new_down, new_up)


def keeps_at_level(spectra: Mapping[int, Spectrum], level: float, min_rank: int) -> dict[int, torch.Tensor]:
    """Keep masks of one network-wide threshold ``level`` decades below the largest importance
    (infinity: keep every component), at least ``min_rank`` components per module.

    A module whose inputs were not recorded (no training step since the last
    RESTART or since a resume) has no importance comparable to the others': it
    keeps every nonzero component until a decision that can judge it.
    """
    top = max((float(sp.importance.max()) for sp in spectra.values() if sp.measured), default=0.0)
    threshold = 0.0 if level == math.inf else top * 10.0**-level
    return {
        i: F.keep_above(sp.importance[None], threshold if sp.measured else 0.0, min_rank)[0]
        for i, sp in spectra.items()
    }


def restart_product(
    modules: Sequence[ACLoRAModule],
    stats: Mapping[str, InputStats],
    choose: Callable[[dict[int, Spectrum]], dict[int, torch.Tensor]],
    seed: int,
    budget_bytes: Optional[int] = None,
) -> tuple[dict[int, int], list[str]]:
    """Product-mode RESTART of every module in place: analyse (rebasing the factors), ``choose`` the keep
    masks from the spectra (the modules are in their SVD basis meanwhile, so ``choose`` may evaluate
    candidates by masking slots), apply them. Returns ({module index: new rank}, skipped module names)."""
    spectra, skipped = analyse_modules(modules, stats, rebase=True, budget_bytes=budget_bytes)
    keeps = choose(spectra)
    restart_kept(modules, spectra, keeps, seed, budget_bytes)
    return {i: int(keep.sum()) for i, keep in keeps.items()}, skipped
