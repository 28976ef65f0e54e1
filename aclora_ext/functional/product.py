"""The product mode's math: a module's update up @ down decomposed from the R x R core, each
component's importance, and the RESTART of freed slots. Pure batched tensor functions (B modules
of one shape at a time), float32 or float64.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


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


def component_factors(
    down: Tensor, up: Tensor, s: Tensor, to_up: Tensor, to_down: Tensor, keep: Tensor, slots: int
) -> tuple[Tensor, Tensor]:
    """Factors (down (B, slots, in), up (B, out, slots)) of the kept components of up @ down (``product_core``).

    The kept components are packed into the first slots in order (descending
    singular value), each singular value split evenly between the two factors;
    the other slots are zero. Built from the stored factors: component j's
    lora_up column is up @ to_up[:, j] / sqrt(s_j), its lora_down row
    to_down[:, j]^T @ down / sqrt(s_j). A component whose
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


def restart_slots(
    down: Tensor, up: Tensor, keep: Tensor, row_sq: Tensor, std: Tensor, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
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
    return torch.where(
        total > 0, ((total - kept).clamp(min=0) / total.clamp(min=1e-30)).sqrt(), torch.zeros_like(total)
    )


__all__ = [
    "product_core",
    "component_factors",
    "as_keep",
    "packing_order",
    "component_importance",
    "keep_above",
    "restart_slots",
    "truncation_error",
]
