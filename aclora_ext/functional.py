"""The AC-LoRA weight math, as pure batched tensor functions (paper §3.2-3.4).

Every function takes a batch of same-shaped matrices (leading dimension B) so that
a RESTART over hundreds of modules is a handful of batched kernels, and every
function works in float32 or float64 (never fp16/bf16: callers upcast).

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


def restart_paper(down: Tensor, up: Tensor, p: float, energy: str, min_rank: int,
                  generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
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


def product_svd(down: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the module updates up @ down without forming them (B, out, in).

    up = Q_u R_u and down^T = Q_d R_d (thin QR, R columns each), so
    up @ down = Q_u (R_u R_d^T) Q_d^T and only the R x R core is decomposed:
    core = A S B^T. Returns (left, S, right) with left = Q_u A (B, out, R),
    right = Q_d B (B, in, R): up @ down = left diag(S) right^T.
    """
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.transpose(1, 2))
    a, s, bh = torch.linalg.svd(r_up @ r_down.transpose(1, 2))
    return q_up @ a, s, q_down @ bh.transpose(1, 2)


def balanced_factors(left: Tensor, s: Tensor, right: Tensor, k: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Factors (down (B, slots, in), up (B, out, slots)) of the best rank-k approximation.

    The k kept singular values are split evenly (sqrt on each side); slots
    beyond k[b] are zero in both factors. slots >= max(k).
    """
    mask = keep_mask(k, s.shape[-1]).to(s.dtype)
    root = s.clamp(min=0).sqrt() * mask
    up = left[:, :, :slots] * root[:, None, :slots]
    down = (right[:, :, :slots] * root[:, None, :slots]).transpose(1, 2)
    return down, up


def restart_product(down: Tensor, up: Tensor, p: float, energy: str, min_rank: int,
                    generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """RESTART decided on, and applied to, the module's update up @ down (our product mode).

    The signal count comes from the spectrum of the product (what the layer
    actually adds), not from each factor: a fresh lora_down is a random kaiming
    matrix whose flat spectrum says nothing about what was learned. The kept
    part is re-factored exactly (the module's output keeps its signal part and
    loses only the discarded part). The freed slots restart like a fresh LoRA:
    lora_up columns zero, lora_down rows Gaussian with the std of the old
    lora_down, so the model output carries no refill noise and the freed
    directions can learn again. The kept part is re-balanced so that the kept
    lora_down rows have the old rows' mean norm, keeping the optimiser's
    per-parameter scale close to what it was.
    """
    r = down.shape[1]
    left, s, right = product_svd(down, up)
    k = signal_rank(s, p, energy, min_rank)
    new_down, new_up = balanced_factors(left, s, right, k, r)
    old_row_sq = down.pow(2).sum(dim=(1, 2)) / r
    kept_row_sq = new_down.pow(2).sum(dim=(1, 2)) / k.to(down.dtype)
    c = torch.where(kept_row_sq > 0, (old_row_sq / kept_row_sq.clamp(min=1e-30)).sqrt(), torch.ones_like(old_row_sq))
    new_down = new_down * c[:, None, None]
    new_up = new_up / c[:, None, None]
    free = 1.0 - keep_mask(k, r).to(down.dtype)
    noise = torch.randn(down.shape, generator=generator, device=down.device, dtype=down.dtype)
    new_down = noise.mul_(row_std(down)[:, None, None]).mul_(free[:, :, None]).add_(new_down)
    return new_down, new_up, k


def truncation_error(s: Tensor, k: Tensor) -> Tensor:
    """Relative Frobenius error ||W - W_k|| / ||W|| of keeping k of the singular values s (B, R) -> (B,)."""
    energy = s * s
    total = energy.sum(dim=-1)
    kept = (energy * keep_mask(k, s.shape[-1]).to(energy.dtype)).sum(dim=-1)
    return torch.where(total > 0, ((total - kept).clamp(min=0) / total.clamp(min=1e-30)).sqrt(), torch.zeros_like(total))


def chunk_size(rows: int, cols: int, rank: int, budget_bytes: int, bytes_per: int = 4, copies: int = 6) -> int:
    """How many modules of this shape to process at once within ``budget_bytes``.

    ``copies`` bounds the transient tensors held per module (factors, their
    truncations, noise, QR factors) relative to one factor's size.
    """
    per_module = (rows + cols) * rank * bytes_per * copies
    return max(1, int(budget_bytes // max(per_module, 1)))


def is_finite(*tensors: Tensor) -> Tensor:
    """(B,) bool: all entries of each batch item finite in every tensor.

    A batch item whose sum is finite has only finite entries (barring overflow
    of the sum, which the exact check then clears), so the element-wise check,
    a quarter of a CPU RESTART when run on everything, runs only on the items
    whose sum is not finite.
    """
    ok = None
    for t in tensors:
        flat = t.flatten(1)
        item = torch.isfinite(flat.sum(dim=1))
        if not bool(item.all()):
            suspect = (~item).nonzero().flatten()
            item[suspect] = torch.isfinite(flat[suspect]).all(dim=1)
        ok = item if ok is None else ok & item
    return ok


def median(values: list[int]) -> float:
    """Median of a non-empty list of ints (for the log line)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


__all__ = [
    "threshold_p", "signal_rank", "rank_side_svd", "keep_mask", "truncate_factor", "residual_std",
    "row_std", "gaussian_refill", "restart_paper", "product_svd", "balanced_factors", "restart_product",
    "truncation_error", "chunk_size", "is_finite", "median",
]
