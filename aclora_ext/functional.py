"""The AC-LoRA weight math, as pure batched tensor functions (paper §3.2-3.4).

Every function takes a batch of same-shaped matrices (leading dimension B) so that
a RESTART over hundreds of modules is a handful of batched kernels, and every
function works in float32 or float64 (never fp16/bf16: callers upcast).

Notation (paper Eq. 2): a LoRA factor M (lora_down: R x in, lora_up: out x R) has
the SVD M = U D V. Both factors have the rank R on one side; all the spectral work
happens on that small R side, so the large side is never decomposed.
"""

from __future__ import annotations

import math
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


# --- a module's update up @ down, from the R x R core -------------------------------------------------


def product_core(down: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Singular values of the updates up @ down (B, out, in) and the maps to their components' factors.

    With up = Q_u R_u, down^T = Q_d R_d and the core R_u R_d^T = A diag(s) B^T,
    up @ down = (Q_u A) diag(s) (Q_d B)^T, and the j-th component's vectors,
    scaled by s_j, are up @ (R_d^T B)[:, j] and down^T @ (R_u^T A)[:, j]. Only the
    R factors of the two QR decompositions are computed (``mode="r"``: about half
    the cost of ``product_svd``, whose Q factors are formed). Returns
    ``(s, to_up, to_down)``: s (B, R) descending, to_up = R_d^T B and
    to_down = R_u^T A (B, R, R); see ``component_factors``. When R exceeds a side
    of the layer the components beyond min(out, in) are zero.
    """
    rank = down.shape[1]
    _, r_up = torch.linalg.qr(up, mode="r")
    _, r_down = torch.linalg.qr(down.transpose(1, 2), mode="r")
    a, s, bh = torch.linalg.svd(r_up @ r_down.transpose(1, 2), full_matrices=False)
    to_up, to_down = r_down.transpose(1, 2) @ bh.transpose(1, 2), r_up.transpose(1, 2) @ a
    if s.shape[-1] < rank:  # the missing components are zero
        pad = (0, rank - s.shape[-1])
        s, to_up, to_down = (torch.nn.functional.pad(t, pad) for t in (s, to_up, to_down))
    return s, to_up, to_down


def component_factors(down: Tensor, up: Tensor, s: Tensor, to_up: Tensor, to_down: Tensor, keep: Tensor,
                      slots: int) -> tuple[Tensor, Tensor]:
    """Factors (down (B, slots, in), up (B, out, slots)) of the kept components of up @ down (``product_core``).

    The kept components are packed into the first slots in order (descending
    singular value), each singular value split evenly between the two factors;
    the other slots are zero. Built from the stored factors: component j's lora_up column is up @ to_up[:, j] / sqrt(s_j),
    its lora_down row to_down[:, j]^T @ down / sqrt(s_j). A component whose
    singular value is below rounding (R * eps * the largest) gets zero factors:
    dividing by its root would only amplify rounding errors.
    """
    keep = as_keep(keep, s.shape[-1])
    order = packing_order(keep)[:, :slots]
    kept = torch.gather(keep, 1, order)
    s_kept = torch.gather(s, 1, order)
    floor = s[:, :1] * (torch.finfo(s.dtype).eps * s.shape[-1])
    usable = kept & (s_kept > floor)
    inv_root = torch.where(usable, s_kept.clamp(min=torch.finfo(s.dtype).tiny).rsqrt(), torch.zeros_like(s_kept))
    index = order[:, None, :].expand(-1, to_up.shape[1], -1)
    to_up = torch.gather(to_up, 2, index) * inv_root[:, None, :]
    to_down = torch.gather(to_down, 2, index) * inv_root[:, None, :]
    return to_down.transpose(1, 2) @ down, up @ to_up


def as_keep(keep: Tensor, size: int) -> Tensor:
    """A (B, size) bool keep mask from a mask or from (B,) counts of leading components."""
    if keep.dtype == torch.bool:
        return keep
    return torch.arange(size, device=keep.device)[None, :] < keep[:, None]


def packing_order(keep: Tensor) -> Tensor:
    """Per row, the indices of the kept components first (in order), then the others: (B, R) int64."""
    size = keep.shape[-1]
    position = torch.arange(size, device=keep.device)[None, :].expand_as(keep)
    return torch.argsort(torch.where(keep, position, position + size), dim=-1)


# --- the product mode's rank choice ------------------------------------------------------------------
#
# What a component adds to the model is its share of the layer's *output*, not its singular value:
# two layers with the same spectrum matter differently when one sees inputs ten times larger along
# the component's input direction. A component's importance is the RMS of what it adds to its
# layer's output over the inputs seen in training, s_j * sqrt(E[(v_j . x)^2]); one threshold on it
# compares every component of every module on the same footing. The threshold itself is chosen on
# held-out loss when the training loop provides one (network.set_validation, sd-scripts'
# --validation_split), else it is the option min_importance (ranksearch.RankSearch.decide).


def component_importance(to_down: Tensor, gram: Tensor, count: Tensor) -> Tensor:
    """RMS of each component's contribution to its layer's output over the recorded inputs, (B, R).

    The forward pass accumulates ``gram`` = sum over inputs of h h^T with h = down x
    (the R-dim LoRA activation, cheap to collect) and ``count`` inputs. Component
    j of up @ down is s_j u_j v_j^T, and ``product_core``'s t_j = to_down[:, j]
    satisfies t_j^T down = s_j v_j^T, so what it adds to the output along u_j is
    s_j (v_j . x) = t_j . h, and its mean square is t_j^T (gram / count) t_j:
    exact, from R x R sums. to_down: (B, R, R), gram: (B, R, R), count: (B,).
    """
    mean_square = ((gram @ to_down) * to_down).sum(dim=1) / count.clamp(min=1).to(gram.dtype)[:, None]
    return mean_square.clamp(min=0).sqrt()


def keep_above(importance: Tensor, threshold: float | Tensor, min_rank: int = 1) -> Tensor:
    """(B, R) bool: components whose importance exceeds ``threshold``, at least ``min_rank`` of them
    (the most important ones) per module, and never a component of importance 0 beyond those."""
    size = importance.shape[-1]
    floor = min(max(1, int(min_rank)), size)
    keep = importance > threshold
    top = torch.topk(importance, floor, dim=-1).indices
    return keep.scatter(1, top, True)


#: coarse candidate thresholds, in decades below the largest importance: everything kept (inf), then
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


def restart_slots(down: Tensor, up: Tensor, keep: Tensor, row_sq: Tensor, std: Tensor,
                  generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """The product mode's RESTART of a batch of modules whose factors are in their update's SVD basis.

    ``down`` (B, R, in) / ``up`` (B, out, R) hold one component of the update per
    slot (``component_factors`` with every component kept), ``keep`` (B, R) says
    which stay. Kept slots are left as they are, so the module's output loses
    only the discarded components and no refill noise reaches it. Freed slots
    restart like a fresh LoRA: lora_up columns zero, lora_down rows Gaussian with
    ``std`` (the old lora_down's), so they can learn again and a layer that needs
    capacity gets it back at the next RESTART. The kept lora_down rows are scaled
    to the old rows' mean square norm ``row_sq`` (lora_up by the inverse), keeping
    the optimiser's per-parameter scale close to what it was.
    """
    keep_f = keep.to(down.dtype)
    kept_sq = (down.pow(2).sum(dim=2) * keep_f).sum(dim=1) / keep_f.sum(dim=1).clamp(min=1)
    c = torch.where(kept_sq > 0, (row_sq / kept_sq.clamp(min=1e-30)).sqrt(), torch.ones_like(row_sq))
    noise = torch.randn(down.shape, generator=generator, device=down.device, dtype=down.dtype)
    new_down = down * (keep_f * c[:, None])[:, :, None] + noise * (std[:, None, None] * (1 - keep_f)[:, :, None])
    new_up = up * (keep_f / c[:, None])[:, None, :]
    return new_down, new_up


def truncation_error(s: Tensor, keep: Tensor) -> Tensor:
    """Relative Frobenius error ||W - W_kept|| / ||W|| of keeping some of the singular values s (B, R) -> (B,).

    ``keep``: (B, R) bool, or (B,) counts of leading components."""
    energy = s * s
    total = energy.sum(dim=-1)
    kept = (energy * as_keep(keep, s.shape[-1]).to(energy.dtype)).sum(dim=-1)
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


# --- resizing an existing LoRA file (aclora resize) ----------------------------------------------------
#
# A LoRA file has no layer inputs and no held-out data: its modules are resized from the spectra of
# their updates alone (``product_core``). The index_sv_* functions are kohya's resize_lora.py rank rules (sd-scripts networks/resize_lora.py:
# index_sv_cumulative / index_sv_fro / index_sv_ratio and rank_resize), batched: resize_lora applies them
# to the full min(out, in) spectrum of the update, whose entries beyond the R computed here are zero.

#: resize_lora's MIN_SV: an update whose largest singular value is at most this gets rank 1
RESIZE_LORA_MIN_SV = 1e-6


def _full_spectrum_size(size: int | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(size, dtype=torch.int64, device=like.device).expand(like.shape[0])


def _index_of_share(shares: Tensor, target: float, size: int | Tensor) -> Tensor:
    """resize_lora's ``searchsorted(cumulative shares, target) + 1`` clamped to [1, size - 1], (B,).

    searchsorted (left) is the number of cumulative shares below ``target``; past
    the R computed entries the full spectrum only repeats the last share, so when
    even that is below ``target`` the answer is the full length ``size``.
    """
    n = _full_spectrum_size(size, shares)
    below = (shares < target).sum(dim=-1)
    index = torch.where(shares[:, -1] < target, n, below) + 1
    return torch.maximum(torch.minimum(index, n - 1), torch.ones_like(index))


def index_sv_cumulative(s: Tensor, target: float, size: int | Tensor) -> Tensor:
    """resize_lora's ``index_sv_cumulative`` per module: the share ``target`` of the sum of singular values.

    ``s`` (B, R) descending (the nonzero part of the spectrum), ``size`` the full
    spectrum's length min(out, in) (an int or (B,)). Returns int64 (B,).
    """
    total = s.sum(dim=-1, keepdim=True)
    return _index_of_share(torch.cumsum(s, dim=-1) / total, target, size)


def index_sv_fro(s: Tensor, target: float, size: int | Tensor) -> Tensor:
    """resize_lora's ``index_sv_fro`` per module: the share ``target`` of the Frobenius norm (target^2 of the energy)."""
    energy = s * s
    return _index_of_share(torch.cumsum(energy, dim=-1) / energy.sum(dim=-1, keepdim=True), target ** 2, size)


def index_sv_ratio(s: Tensor, target: float, size: int | Tensor) -> Tensor:
    """resize_lora's ``index_sv_ratio`` per module: singular values above the largest / ``target``, in [1, size - 1]."""
    n = _full_spectrum_size(size, s)
    index = (s > s[:, :1] / target).sum(dim=-1)
    return torch.maximum(torch.minimum(index, n - 1), torch.ones_like(index))


RESIZE_LORA_INDEX = {"sv_cumulative": index_sv_cumulative, "sv_fro": index_sv_fro, "sv_ratio": index_sv_ratio}


def resize_lora_rank(s: Tensor, method: str, target: float, size: int | Tensor, max_rank: int | Tensor) -> Tensor:
    """The rank kohya's resize_lora.py gives each module (its ``rank_resize``), (B,) int64.

    ``s``: (B, R) singular values of the *unscaled* update up @ down (MIN_SV is an
    absolute floor on them), descending; ``size``: min(out, in) per module;
    ``max_rank``: its --new_rank (--new_conv_rank for conv modules). The rank is
    the method's index + 1 (one component more than the index functions count),
    at most ``max_rank``, and 1 when the largest singular value is at most MIN_SV.
    """
    rank = RESIZE_LORA_INDEX[method](s, target, size) + 1
    cap = torch.as_tensor(max_rank, dtype=torch.int64, device=s.device).expand_as(rank)
    return torch.where(s[:, 0] <= RESIZE_LORA_MIN_SV, torch.ones_like(rank), torch.minimum(rank, cap))


__all__ = [
    # the paper
    "threshold_p", "signal_rank", "rank_side_svd", "keep_mask", "truncate_factor", "residual_std", "row_std",
    "gaussian_refill", "restart_paper",
    # the product mode
    "product_core", "component_factors", "as_keep", "packing_order", "component_importance", "keep_above", "LEVELS",
    "LEVEL_STEP", "window_levels", "refine_levels", "restart_slots", "truncation_error",
    # resize_lora's rules
    "RESIZE_LORA_MIN_SV", "index_sv_cumulative", "index_sv_fro", "index_sv_ratio", "RESIZE_LORA_INDEX",
    "resize_lora_rank",
    # batching
    "chunk_size", "is_finite", "median",
]
