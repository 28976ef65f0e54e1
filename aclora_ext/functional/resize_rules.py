"""kohya resize_lora.py's three rank rules, batched (for ``aclora resize`` and the benchmarks).

A LoRA file has no layer inputs and no held-out data: its modules are resized from the spectra of
their updates alone (``product.product_core``). The index_sv_* functions are resize_lora.py's rules
(sd-scripts networks/resize_lora.py: index_sv_cumulative / index_sv_fro / index_sv_ratio and
rank_resize), batched: resize_lora applies them to the full min(out, in) spectrum of the update,
whose entries beyond the R computed here are zero.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

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
    """resize_lora's ``index_sv_fro`` per module: the share ``target`` of the Frobenius norm (target^2 of the
    energy)."""
    energy = s * s
    return _index_of_share(torch.cumsum(energy, dim=-1) / energy.sum(dim=-1, keepdim=True), target**2, size)


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
    "RESIZE_LORA_MIN_SV",
    "index_sv_cumulative",
    "index_sv_fro",
    "index_sv_ratio",
    "RESIZE_LORA_INDEX",
    "resize_lora_rank",
]
