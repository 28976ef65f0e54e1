"""RESTART over a whole network: group modules by shape, run the batched math, write back in place.

The math lives in :mod:`aclora_ext.functional`; this file only batches it:
modules with the same (rank, in, out, device) are stacked and processed in
chunks bounded by a memory budget, in float32 (float64 when float32 fails), and
written back into the existing parameters (the optimizer keeps holding them).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from . import functional as F
from .module import ACLoRAModule

logger = logging.getLogger(__name__)

#: transient memory a RESTART may use per chunk (the factors themselves are small)
CHUNK_BYTES = 256 * 1024 * 1024
#: on a CPU, chunks this small stay in the allocator's cache and the CPU caches
#: (large fresh tensors page-fault on every allocation): ~20-40% faster than CHUNK_BYTES
CPU_CHUNK_BYTES = 32 * 1024 * 1024


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
    p_source: str = "loss"  # "loss" (p = 1 - L^alpha), "fixed_p" or "given"; product mode: "validation", "prior", "frozen"
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
        else:
            origin = "no held-out loss: the default level"
        return f"{where} ({origin}; mean training loss {loss})"

    def as_dict(self) -> dict:
        lo, mid, hi = self.rank_stats() if self.ranks else (0, 0.0, 0)
        return {"index": self.index, "epoch": self.epoch, "step": self.step, "p": self.p, "loss": self.loss,
                "alpha": self.alpha, "p_source": self.p_source, "mode": self.mode, "seconds": round(self.seconds, 4), "applied": self.applied,
                "rank_min": lo, "rank_median": mid, "rank_max": hi, "skipped": list(self.skipped),
                "level": self.level, "validation_loss": self.validation_loss, "candidates": self.candidates}


def shape_groups(modules: Sequence[ACLoRAModule]) -> dict[tuple, list[int]]:
    """Indices of modules that can be stacked together: same rank, in, out, device."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(modules):
        w = m.lora_down.weight
        groups[(m.rank, m.down_matrix().shape[1], m.out_dim, w.device)].append(i)
    return groups


def chunk_budget(device: torch.device, budget_bytes: Optional[int] = None) -> int:
    """``budget_bytes`` when given, else the default for the device (smaller on a CPU)."""
    if budget_bytes is not None:
        return budget_bytes
    return CPU_CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES


def chunks(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _stack(modules: Sequence[ACLoRAModule], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.stack([m.down_matrix().detach().to(dtype) for m in modules])
    up = torch.stack([m.up_matrix().detach().to(dtype) for m in modules])
    return down, up


def _write_back(modules: Sequence[ACLoRAModule], down: torch.Tensor, up: torch.Tensor) -> None:
    for m, d, u in zip(modules, down, up):
        m.lora_down.weight.data.copy_(d.reshape(m.lora_down.weight.shape))
        m.lora_up.weight.data.copy_(u.reshape(m.lora_up.weight.shape))


MathFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def restart_modules(modules: Sequence[ACLoRAModule], *, p: float, energy: str, min_rank: int,
                    seed: int, budget_bytes: Optional[int] = None) -> tuple[list[int], list[str]]:
    """Paper-mode RESTART of every module in place; returns (new rank per module, names of skipped modules).

    Skipped modules (non-finite weights, or a decomposition that fails even in
    float64) keep their weights and their previous rank.
    """
    math_fn: MathFn = F.restart_paper
    ranks = [m.rank for m in modules]
    skipped: list[str] = []
    chunk_no = 0
    with torch.no_grad():
        for (rank, cols, rows, device), indices in shape_groups(modules).items():
            size = F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))
            for part in chunks(indices, size):
                chunk_no += 1
                batch = [modules[i] for i in part]
                down, up = _stack(batch, torch.float32)
                finite = F.is_finite(down, up)
                if not bool(finite.all()):
                    bad = [batch[j].lora_name for j in range(len(batch)) if not bool(finite[j])]
                    logger.warning("AC-LoRA RESTART: non-finite weights, module(s) left unchanged: %s", ", ".join(bad))
                    skipped += bad
                    keep = finite.nonzero().flatten().tolist()
                    part = [part[j] for j in keep]
                    batch = [batch[j] for j in keep]
                    if not batch:
                        continue
                    down, up = down[keep], up[keep]
                gen = _generator(down.device, seed * 1_000_003 + chunk_no)
                try:
                    new_down, new_up, k = math_fn(down, up, p, energy, min_rank, gen)
                    ok = F.is_finite(new_down, new_up)
                    if not bool(ok.all()):
                        raise torch.linalg.LinAlgError("non-finite result")
                except (torch.linalg.LinAlgError, RuntimeError) as err:
                    logger.warning("AC-LoRA RESTART: float32 decomposition failed for %d module(s) (%s); "
                                   "retrying one by one in float64", len(batch), err)
                    for i, m in zip(part, batch):
                        result = _restart_one_float64(m, math_fn, p, energy, min_rank, gen)
                        if result is None:
                            skipped.append(m.lora_name)
                        else:
                            ranks[i] = result
                    continue
                _write_back(batch, new_down, new_up)
                for i, ki in zip(part, k.tolist()):
                    ranks[i] = int(ki)
    return ranks, skipped


def _restart_one_float64(m: ACLoRAModule, math_fn: MathFn, p: float, energy: str, min_rank: int,
                         gen: torch.Generator) -> Optional[int]:
    down, up = _stack([m], torch.float64)
    try:
        new_down, new_up, k = math_fn(down, up, p, energy, min_rank, gen)
        if not bool(F.is_finite(new_down, new_up).all()):
            raise torch.linalg.LinAlgError("non-finite result")
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        logger.warning("AC-LoRA RESTART: decomposition of %s failed in float64 too (%s); module left unchanged",
                       m.lora_name, err)
        return None
    _write_back([m], new_down, new_up)
    return int(k[0])


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


def analyse_modules(modules: Sequence[ACLoRAModule], stats: Mapping[str, InputStats], *, rebase: bool,
                    budget_bytes: Optional[int] = None) -> tuple[dict[int, Spectrum], list[str]]:
    """Spectrum and component importance of every module's update (batched by shape).

    With ``rebase`` the factors are rewritten in place in their update's SVD
    basis (one component per slot, descending; the update itself unchanged), so
    that a keep mask acts on slots: ``restart_kept`` then, or the held-out
    evaluation of candidate thresholds before it. Modules with non-finite
    weights, or whose decomposition fails even in float64, are left out
    (returned by name) and left unchanged.
    """
    spectra: dict[int, Spectrum] = {}
    skipped: list[str] = []
    with torch.no_grad():
        for (rank, cols, rows, device), indices in shape_groups(modules).items():
            size = F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))
            for part in chunks(indices, size):
                batch = [modules[i] for i in part]
                down, up = _stack(batch, torch.float32)
                finite = F.is_finite(down, up)
                bad = [j for j in range(len(batch)) if not bool(finite[j])]
                if bad:
                    names = [batch[j].lora_name for j in bad]
                    logger.warning("AC-LoRA RESTART: non-finite weights, module(s) left unchanged: %s", ", ".join(names))
                    skipped += names
                    keep = [j for j in range(len(batch)) if j not in bad]
                    part, batch = [part[j] for j in keep], [batch[j] for j in keep]
                    if not batch:
                        continue
                    down, up = down[keep], up[keep]
                try:
                    results = _analyse(batch, down, up, stats)
                except (torch.linalg.LinAlgError, RuntimeError) as err:
                    logger.warning("AC-LoRA RESTART: float32 decomposition failed for %d module(s) (%s); "
                                   "retrying one by one in float64", len(batch), err)
                    results = []
                    for m in batch:
                        try:
                            results.append(_analyse([m], *_stack([m], torch.float64), stats))
                        except (torch.linalg.LinAlgError, RuntimeError) as err64:
                            logger.warning("AC-LoRA RESTART: decomposition of %s failed in float64 too (%s); "
                                           "module left unchanged", m.lora_name, err64)
                            results.append(None)
                    for i, m, result in zip(part, batch, results):
                        if result is None:
                            skipped.append(m.lora_name)
                            continue
                        spectrum, factors = result
                        spectra[i] = spectrum[0]
                        if rebase:
                            _write_back([m], *factors)
                    continue
                chunk_spectra, factors = results
                for i, spectrum in zip(part, chunk_spectra):
                    spectra[i] = spectrum
                if rebase:
                    _write_back(batch, *factors)
    return spectra, skipped


def _analyse(batch: Sequence[ACLoRAModule], down: torch.Tensor, up: torch.Tensor,
             stats: Mapping[str, InputStats]) -> tuple[list[Spectrum], tuple[torch.Tensor, torch.Tensor]]:
    s, to_up, to_down = F.product_core(down, up)
    scale = torch.tensor([m.scale for m in batch], dtype=s.dtype, device=s.device)
    s_scaled = s * scale[:, None]
    measured = [m.lora_name in stats and stats[m.lora_name].measured for m in batch]
    importance = s_scaled  # unmeasured modules: unit input energy
    if any(measured):
        rank = down.shape[1]
        zeros = torch.zeros(rank, rank, dtype=down.dtype, device=down.device)
        gram = torch.stack([stats[m.lora_name].gram.to(down.device, down.dtype) if ok else zeros
                            for m, ok in zip(batch, measured)])
        count = torch.tensor([stats[m.lora_name].count if ok else 1 for m, ok in zip(batch, measured)],
                             device=down.device)
        output_rms = torch.stack([(stats[m.lora_name].out_sq.to(down.device, down.dtype) / stats[m.lora_name].out_numel)
                                  .sqrt() if ok else torch.ones((), dtype=down.dtype, device=down.device)
                                  for m, ok in zip(batch, measured)])
        measured_importance = F.component_importance(to_down, gram, count) * (scale / output_rms.clamp(min=1e-12))[:, None]
        importance = torch.where(torch.tensor(measured, device=down.device)[:, None], measured_importance, s_scaled)
    if not bool(F.is_finite(importance, s_scaled).all()):
        raise torch.linalg.LinAlgError("non-finite spectrum")
    row_sq = down.pow(2).sum(dim=(1, 2)) / down.shape[1]
    std = F.row_std(down)
    keep_all = torch.full(s.shape, True, device=s.device)
    new_down, new_up = F.component_factors(down, up, s, to_up, to_down, keep_all, down.shape[1])
    cpu = [t.cpu() for t in (s_scaled, importance, row_sq, std)]
    spectra = [Spectrum(cpu[0][j], cpu[1][j], float(cpu[2][j]), float(cpu[3][j]), measured[j]) for j in range(len(batch))]
    return spectra, (new_down, new_up)


def restart_kept(modules: Sequence[ACLoRAModule], spectra: Mapping[int, Spectrum], keeps: Mapping[int, torch.Tensor],
                 seed: int, budget_bytes: Optional[int] = None) -> None:
    """Apply keep masks to modules rebased by ``analyse_modules``: kept slots stay, freed slots restart."""
    chunk_no = 0
    with torch.no_grad():
        for (rank, cols, rows, device), indices in shape_groups(modules).items():
            indices = [i for i in indices if i in keeps]
            size = F.chunk_size(rows, cols, rank, chunk_budget(device, budget_bytes))
            for part in chunks(indices, size):
                chunk_no += 1
                batch = [modules[i] for i in part]
                down, up = _stack(batch, torch.float32)
                keep = torch.stack([keeps[i] for i in part]).to(down.device)
                row_sq = torch.tensor([spectra[i].row_sq for i in part], device=down.device)
                std = torch.tensor([spectra[i].std for i in part], device=down.device)
                gen = _generator(down.device, seed * 1_000_003 + chunk_no)
                new_down, new_up = F.restart_slots(down, up, keep, row_sq, std, gen)
                _write_back(batch, new_down, new_up)


def keeps_at_level(spectra: Mapping[int, Spectrum], level: float, min_rank: int) -> dict[int, torch.Tensor]:
    """Keep masks of one network-wide threshold ``level`` decades below the largest importance
    (infinity: keep every component), at least ``min_rank`` components per module.

    A module whose inputs were not recorded (no training step since the last
    RESTART or since a resume) has no importance comparable to the others': it
    keeps every nonzero component until a decision that can judge it.
    """
    top = max((float(sp.importance.max()) for sp in spectra.values() if sp.measured), default=0.0)
    threshold = 0.0 if level == math.inf else top * 10.0 ** -level
    return {i: F.keep_above(sp.importance[None], threshold if sp.measured else 0.0, min_rank)[0]
            for i, sp in spectra.items()}


def restart_product(modules: Sequence[ACLoRAModule], stats: Mapping[str, InputStats],
                    choose: Callable[[dict[int, Spectrum]], dict[int, torch.Tensor]], seed: int,
                    budget_bytes: Optional[int] = None) -> tuple[dict[int, int], list[str]]:
    """Product-mode RESTART of every module in place: analyse (rebasing the factors), ``choose`` the keep
    masks from the spectra (the modules are in their SVD basis meanwhile, so ``choose`` may evaluate
    candidates by masking slots), apply them. Returns ({module index: new rank}, skipped module names)."""
    spectra, skipped = analyse_modules(modules, stats, rebase=True, budget_bytes=budget_bytes)
    keeps = choose(spectra)
    restart_kept(modules, spectra, keeps, seed, budget_bytes)
    return {i: int(keep.sum()) for i, keep in keeps.items()}, skipped
