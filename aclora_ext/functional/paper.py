"""The paper's RESTART math (AC-LoRA §3.2-3.4), as pure batched tensor functions.

Every function takes a batch of same-shaped matrices (leading dimension B) so that
a RESTART over hundreds of modules is a handful of batched kernels, and works in
float32 or float64 (never fp16/bf16: callers upcast).

Notation (paper Eq. 2): a LoRA factor M (lora_down: R x in, lora_up: out x R) has
the SVD M = U D V. Both factors have the rank R on one side; all the spectral work
happens on that small R side, so the large side is never decomposed.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def threshold_p(loss: float, progress: float) -> tuple[float, float]:
    """The energy threshold p = 1 - L^alpha with alpha = 1 + progress (Eq. 5, Eq. 6).

    ``progress`` is the fraction of training done (Eq. 6: Epoch / TotalEpoch), so
    alpha grows from 1 to 2 over the run and p rises as the loss falls. Returns
    ``(p, alpha)``; p is clamped to [0, 1] (a loss above 1 would give p < 0).
    """
    alpha = 1.0 + min(max(progress, 0.0), 1.0)
    loss = max(float(loss), 0.0)
    p = 1.0 - loss**alpha
    return min(max(p, 0.0), 1.0), alpha


def signal_rank(singular_values: Tensor, p: float | Tensor, energy: str = "squared", min_rank: int = 1) -> Tensor:
    """How many leading components carry a fraction ``p`` of the energy (Eq. 3).

    ``singular_values``: (B, R), sorted descending. ``energy="squared"`` sums
    squared singular values (the paper's "squared progressive sum"),
    ``"linear"`` sums the singular values themselves.

    Boundary convention: a component is kept while the energy *before* it is
    below p * total, i.e. we keep the smallest k whose cumulative energy reaches
    p. Eq. 3 read literally (inclusive sum strictly below p) would drop the
    component that crosses p, which is a signal component whenever the signal
    dominates; the exclusive reading keeps it. At least ``min_rank`` components
    (and at least one) are always kept; p = 1 keeps every nonzero component.
    Returns an int64 tensor (B,).
    """
    s = singular_values.abs()
    weights = s * s if energy == "squared" else s
    total = weights.sum(dim=-1, keepdim=True)
    before = torch.cumsum(weights, dim=-1) - weights  # energy of the components before i
    p_t = torch.as_tensor(p, dtype=weights.dtype, device=weights.device)
    if p_t.ndim == 1:
        p_t = p_t[:, None]
    keep = (before < p_t * total) & (weights > 0)
    k = keep.sum(dim=-1)
    return k.clamp(min=max(1, int(min_rank)), max=s.shape[-1])


def rank_side_svd(factor: Tensor, rank_dim: int) -> tuple[Tensor, Tensor]:
    """Singular values and rank-side singular vectors of a batch of LoRA factors.

    ``factor``: (B, R, n) when ``rank_dim == 1`` (lora_down, conv kernels
    flattened) or (B, n, R) when ``rank_dim == 2`` (lora_up). Returns
    ``(S, V)`` with S (B, R) descending and V (B, R, R) whose columns are the
    singular vectors living in the R-dimensional space (U of lora_down, V of
    lora_up in the paper's M = U D V).

    Computed from the R x R Gram matrix (M M^T or M^T M) by a symmetric
    eigendecomposition: same U/V and D as the full SVD, at the cost of one
    batched matmul plus an R x R eigh instead of a decomposition of the large
    side. Small singular values lose relative precision (they are squared), which
    the energy threshold never looks at: it compares energies to the total.
    """
    gram = factor @ factor.transpose(1, 2) if rank_dim == 1 else factor.transpose(1, 2) @ factor
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    s = evals.flip(-1).clamp(min=0).sqrt()
    return s, evecs.flip(-1)


def keep_mask(k: Tensor, size: int) -> Tensor:
    """(B, size) float mask with ones on the first k[b] positions."""
    return (torch.arange(size, device=k.device)[None, :] < k[:, None]).to(torch.float32)


def truncate_factor(factor: Tensor, vectors: Tensor, k: Tensor, rank_dim: int) -> Tensor:
    """U D' V of Eq. 2: keep the first k[b] components of each factor.

    With V the rank-side singular vectors, dropping components is the
    projection P = V_k V_k^T applied on the rank side (P M for lora_down,
    M P for lora_up), so the large side is never touched by a decomposition.
    """
    mask = keep_mask(k, vectors.shape[-1]).to(vectors.dtype)
    proj = (vectors * mask[:, None, :]) @ vectors.transpose(1, 2)
    return proj @ factor if rank_dim == 1 else factor @ proj


def row_std(x: Tensor) -> Tensor:
    """Sample std (n - 1) of each batch item's entries, (B,).

    From the sum and the sum of squares: ~30x faster than ``Tensor.std`` on a
    CPU (whose Welford reduction dominated a RESTART); LoRA factors and their
    residuals have a mean far below their spread, so nothing cancels.
    """
    flat = x.flatten(1)
    n = flat.shape[1]
    if n < 2:
        return flat.abs().flatten()
    mean = flat.mean(dim=1)
    squares = torch.linalg.vector_norm(flat, dim=1).square()
    return ((squares - n * mean * mean) / (n - 1)).clamp(min=0).sqrt()


def residual_std(original: Tensor, truncated: Tensor) -> Tensor:
    """sigma of Eq. 2 / Algorithm 1 line 18: std(U D V - U D' V) per matrix, (B,)."""
    return row_std(original - truncated)


def gaussian_refill(truncated: Tensor, sigma: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """M' = U D' V + G with G ~ N(0, sigma^2) over the whole matrix (Eq. 2 and its "in practice" note).

    The paper first defines G on the discarded ranks only, then adds it to the
    entire matrix "to accelerate the calculation"; we follow the practical form.
    """
    noise = torch.randn(truncated.shape, generator=generator, device=truncated.device, dtype=truncated.dtype)
    return noise.mul_(sigma.view(-1, *([1] * (truncated.ndim - 1)))).add_(truncated)


def restart_paper(
    down: Tensor, up: Tensor, p: float, energy: str, min_rank: int, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor, Tensor]:
    """RESTART of a batch of modules, the paper's way (Algorithm 1, lines 10-23).

    down: (B, R, n_in), up: (B, n_out, R). Each factor gets its own SVD and its own
    signal count; the module keeps the union (the largest count, Eq. 7); every
    factor is truncated to it and refilled with Gaussian noise of its own
    residual's std. Returns (new_down, new_up, k) with k (B,) the module ranks.
    """
    s_down, v_down = rank_side_svd(down, rank_dim=1)
    s_up, v_up = rank_side_svd(up, rank_dim=2)
    k = torch.maximum(signal_rank(s_down, p, energy, min_rank), signal_rank(s_up, p, energy, min_rank))
    kept_down = truncate_factor(down, v_down, k, rank_dim=1)
    kept_up = truncate_factor(up, v_up, k, rank_dim=2)
    new_down = gaussian_refill(kept_down, residual_std(down, kept_down), generator)
    new_up = gaussian_refill(kept_up, residual_std(up, kept_up), generator)
    return new_down, new_up, k


__all__ = [
    "threshold_p",
    "signal_rank",
    "rank_side_svd",
    "keep_mask",
    "truncate_factor",
    "row_std",
    "residual_std",
    "gaussian_refill",
    "restart_paper",
]
