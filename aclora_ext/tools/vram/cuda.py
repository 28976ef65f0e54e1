"""What a CUDA device does that the meta device does not, reproduced on the meta device: autocast's cast
policy and the fused attention kernels ``scaled_dot_product_attention`` picks."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map


def _functions(*names: str) -> set:
    """The torch, torch.Tensor and torch.nn.functional callables of these names (those that exist)."""
    found = set()
    for name in names:
        for owner in (torch, torch.Tensor, F, torch.linalg, torch.special):
            if hasattr(owner, name):
                found.add(getattr(owner, name))
    return found


# autocast's lists for CUDA (ATen's autocast_mode.h): operators run in the autocast dtype ...
_LOWER = _functions(
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "prelu",
    "addmm",
    "addmv",
    "addr",
    "matmul",
    "__matmul__",
    "__rmatmul__",
    "einsum",
    "mm",
    "mv",
    "addbmm",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "multi_dot",
    "vecdot",
)
# ... in float32 ...
_FP32 = _functions(
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow",
    "__pow__",
    "__rpow__",
    "softplus",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "cosine_similarity",
    "poisson_nll_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "hinge_embedding_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "mse_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "binary_cross_entropy_with_logits",
    "dist",
    "pdist",
    "cdist",
    "renorm",
    "logsumexp",
    "interpolate",
    "upsample",
    "upsample_nearest",
    "upsample_bilinear",
)
# ... or on their input's dtype with a float32 result
_FP32_RESULT = _functions("softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum", "vector_norm", "matrix_norm")


def _is_castable(t: Any, device_type: str) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.device.type == device_type
        and t.is_floating_point()
        and t.dtype != torch.float64
    )


class CudaPolicy(TorchFunctionMode):
    """On ``device_type`` (meta), do what autocast and the attention dispatcher do on a CUDA device.

    Autocast: enabled exactly when CPU autocast is (``torch.autocast("cpu", dtype)``),
    because gradient checkpointing saves and restores the CPU autocast state
    around its recomputation, and CPU autocast itself never touches meta
    tensors. Inputs of the ``_LOWER`` operators are cast to the autocast dtype,
    those of ``_FP32`` to float32, ``_FP32_RESULT`` operators return float32;
    casts of fp32 leaf tensors that require grad (the LoRA weights) are cached
    until :meth:`autocast` exits, as autocast's cast cache does (not during
    backward: a recomputed block's casts live as long as its saved tensors).

    Attention: ``scaled_dot_product_attention`` runs the kernel CUDA would pick:
    flash attention for fp16/bf16 without a mask and head size <= 256, else the
    memory-efficient kernel (their outputs and saved log-sum-exp, not an L x L
    matrix), so ``attention="none"`` is modelled by the models' eager attention
    instead.
    """

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.device_type = device_type
        self._cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    @contextlib.contextmanager
    def autocast(self, dtype: Optional[torch.dtype]) -> Iterator[None]:
        """``accelerator.autocast()`` for this device (nothing when ``dtype`` is None)."""
        if dtype is None:
            yield
            return
        try:
            with torch.autocast("cpu", dtype=dtype):
                yield
        finally:
            self._cache.clear()

    @contextlib.contextmanager
    def through_recomputation(self, models: Iterable[Optional[nn.Module]]) -> Iterator[None]:
        """Keep the policy on in the blocks that gradient checkpointing recomputes during backward.

        Autograd runs backward without the torch-function modes of the forward,
        so a recomputed block would escape the policy (and non-reentrant
        checkpointing would see other dtypes than it saved). While this is
        active, a call of any module of ``models`` turns the policy back on
        when it is off, until that call returns.
        """
        pushed: list[nn.Module] = []

        def before(module: nn.Module, args: Any) -> None:
            if not any(mode is self for mode in torch.overrides._get_current_function_mode_stack()):
                self.__enter__()
                pushed.append(module)

        def after(module: nn.Module, args: Any, output: Any) -> None:
            if pushed and pushed[-1] is module:
                pushed.pop()
                self.__exit__(None, None, None)

        handles = []
        for model in models:
            if model is not None:
                for module in model.modules():
                    handles += [
                        module.register_forward_pre_hook(before),
                        module.register_forward_hook(after, always_call=True),
                    ]  # also when it raises
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        if func is F.scaled_dot_product_attention:
            return self._attention(dtype, *args, **kwargs)
        if dtype is not None:
            if func in _LOWER:
                args, kwargs = self._cast((args, kwargs), dtype)
            elif func in _FP32:
                args, kwargs = self._cast((args, kwargs), torch.float32)
            elif func in _FP32_RESULT and kwargs.get("dtype") is None:
                first = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
                if first is not None and _is_castable(first, self.device_type) and first.dtype != torch.float32:
                    kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)

    def _cast(self, tree: Any, dtype: torch.dtype) -> Any:
        in_backward = torch._C._current_graph_task_id() != -1

        def cast(t: Any) -> Any:
            if not _is_castable(t, self.device_type) or t.dtype == dtype:
                return t
            cacheable = (
                not in_backward
                and dtype != torch.float32
                and t.dtype == torch.float32
                and t.is_leaf
                and t.requires_grad
            )
            if not cacheable:
                return t.to(dtype)
            hit = self._cache.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
            result = t.to(dtype)
            self._cache[id(t)] = (weakref.ref(t), result)
            return result

        return tree_map(cast, tree)

    def _attention(self, dtype, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
        if query.device.type != self.device_type:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **rest
            )
        if dtype is not None:
            query, key, value, attn_mask = self._cast((query, key, value, attn_mask), dtype)
        head = query.shape[-1]
        if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and head <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        bias = None
        if attn_mask is not None:
            shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            if attn_mask.dtype == torch.bool:
                bias = torch.zeros(shape, dtype=query.dtype, device=query.device).masked_fill(~attn_mask, float("-inf"))
            else:
                bias = attn_mask.to(query.dtype).expand(shape)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, grad, dropout_p, is_causal, scale=scale
        )[0]
