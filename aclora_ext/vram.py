"""``aclora vram``: the peak accelerator memory of a LoRA training step, counted on PyTorch's meta device.

The real architectures (the SD1.x, SD2.x or SDXL U-Net, its text encoders and
the VAE, from literal configs) are built on the ``meta`` device, where tensors
have shapes and dtypes but no data: nothing is allocated, nothing is
downloaded, and an SDXL step takes seconds on a CPU. The network is attached
the way sd-scripts attaches it (``create_network`` → ``apply_to`` → optimizer
groups) and a training step runs the way ``train_network.py`` runs it, with
the optimizer state a first step leaves: the network's ``on_step_start``, the
VAE (unless latents are cached), the text encoders (unless their outputs are
cached), the U-Net under autocast, ``accelerator.backward``, gradient clipping
on ``get_trainable_params()``, the optimizer step, ``zero_grad(set_to_none=True)``.

:class:`StorageCounter` (a ``TorchDispatchMode``) sees every storage an
operator creates on the device and when it dies; the largest sum of live
storages during the step, each rounded up to the CUDA caching allocator's
512-byte blocks, estimates ``torch.cuda.max_memory_allocated``. Two things a
CUDA device does that the meta device does not are reproduced by
:class:`CudaPolicy` (a ``TorchFunctionMode``): autocast's cast policy (which
operators run in bf16/fp16, which in fp32, and the cached casts of fp32
weights) and the fused attention kernels that ``scaled_dot_product_attention``
picks (flash, memory-efficient). What is not counted, and the margin assumed
for it, is in :data:`NOT_COUNTED`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

GiB = 1024**3
#: the CUDA caching allocator hands out blocks in multiples of 512 bytes (what max_memory_allocated counts)
BLOCK_BYTES = 512
#: what the estimate leaves out, as a fixed allowance plus a share of the estimate (see NOT_COUNTED)
MARGIN_FIXED_BYTES = int(0.75 * GiB)
MARGIN_FRACTION = 0.10
CARD_SIZES_GIB = (8, 12, 16, 24)

NOT_COUNTED = (
    "Not counted, so added as a margin of 0.75 GiB + 10% of the estimate (an assumption: no GPU has checked it "
    "yet): the CUDA context (0.3-0.5 GiB outside PyTorch's allocator, by GPU, driver and CUDA version); cuDNN and "
    "cuBLAS workspaces and the fused-attention backward's scratch buffers (transient, up to a few hundred MiB for "
    "the largest convolutions); the caching allocator's fragmentation and cached free blocks (nvidia-smi shows "
    "reserved memory, typically 5-15% above the allocated peak for a fixed image size, more with buckets of "
    "varying sizes). Also outside the step: sample-image generation (--sample_every_n_*), saving, and other "
    "programs on the same GPU."
)

# --- the architectures ------------------------------------------------------------------------------------------------
FAMILIES = ("sd1", "sd2", "sdxl")
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
LATENT_CHANNELS = 4
TOKENS_PER_CHUNK = 77

SD1_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD2_UNET_CONFIG: dict[str, Any] = {
    **SD1_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
# OpenCLIP ViT-H/14 text tower as SD2 uses it (the last of its 24 layers dropped)
SD2_TE_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
# the same VAE architecture for SD1.x, SD2.x and SDXL
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 32,
}


def _unet_config(family: str) -> dict[str, Any]:
    from .tiny import SDXL_UNET_CONFIG

    return {"sd1": SD1_UNET_CONFIG, "sd2": SD2_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}[family]


def _text_encoder_configs(family: str) -> list[dict[str, Any]]:
    from .tiny import SDXL_TE1_CONFIG, SDXL_TE2_CONFIG

    # SD1.x's text encoder is CLIP ViT-L/14's text tower, SDXL's first one too
    return {"sd1": [SDXL_TE1_CONFIG], "sd2": [SD2_TE_CONFIG], "sdxl": [SDXL_TE1_CONFIG, SDXL_TE2_CONFIG]}[family]


# --- what is estimated -------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
MIXED_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor")
ATTENTION = ("sdpa", "xformers", "mem_eff_attn", "none")


class VramError(ValueError):
    """A set-up the estimate cannot use: the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Setup:
    """One training set-up, in sd-scripts' terms (the defaults are those of sample_configs/sdxl_style_24gb.toml)."""

    family: str = "sdxl"
    width: int = 1024
    height: int = 1024
    batch_size: int = 1
    rank: int = 128
    alpha: float = 64.0
    network_args: tuple[tuple[str, str], ...] = ()
    mixed_precision: str = "bf16"  # no | fp16 | bf16: the frozen weights' dtype and autocast
    full_lora_precision: bool = False  # --full_bf16 / --full_fp16: the LoRA weights in that dtype too
    fp8_base: bool = False  # frozen U-Net (and text encoders) stored in fp8
    gradient_checkpointing: bool = True
    train_unet: bool = True
    train_text_encoder: bool = False
    optimizer: str = "AdamW"
    optimizer_args: tuple[tuple[str, Any], ...] = ()
    max_grad_norm: float = 1.0
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = False
    attention: str = "sdpa"
    no_half_vae: bool = False
    max_token_length: int = 75

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> VramError:
            return VramError(f"{key}={value!r} is not valid; allowed: {allowed}")

        if self.family not in FAMILIES:
            raise bad("family", self.family, ", ".join(FAMILIES))
        for key in ("width", "height"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 64 or value % 8:
                raise bad(key, value, "a multiple of 8, at least 64")
        for key in ("batch_size", "rank"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "an integer >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", self.mixed_precision, ", ".join(MIXED_PRECISION))
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer_type", self.optimizer, ", ".join(OPTIMIZERS))
        if self.attention not in ATTENTION:
            raise bad("attention", self.attention, ", ".join(ATTENTION))
        if self.max_token_length not in (75, 150, 225):
            raise bad("max_token_length", self.max_token_length, "75, 150, 225")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", self.max_grad_norm, "a number >= 0")
        # the checks sd-scripts makes before it trains
        if not (self.train_unet or self.train_text_encoder):
            raise VramError("network_train_unet_only and network_train_text_encoder_only are both set: nothing would "
                            "be trained; allowed: at most one of them")
        if self.full_lora_precision and self.mixed_precision == "no":
            raise VramError("full_bf16/full_fp16 need mixed_precision='bf16'/'fp16'; mixed_precision='no' is set")
        if self.fp8_base and self.mixed_precision == "no":
            raise VramError("fp8_base=True needs mixed_precision='fp16' or 'bf16'; mixed_precision='no' is set")
        if self.cache_text_encoder_outputs and self.family != "sdxl":
            raise VramError(f"cache_text_encoder_outputs=True is an sdxl_train_network.py option; family={self.family!r}")
        if self.cache_text_encoder_outputs and self.train_text_encoder:
            raise VramError("cache_text_encoder_outputs=True needs network_train_unet_only=True (text encoders cannot "
                            "be trained from cached outputs), as sdxl_train_network.py asserts")
        from .options import parse_network_args

        parse_network_args(dict(self.network_args), max_rank=self.rank)  # OptionError names the key and value

    @property
    def weight_dtype(self) -> torch.dtype:
        return DTYPES[MIXED_PRECISION[self.mixed_precision]]

    @property
    def unet_dtype(self) -> torch.dtype:
        return DTYPES["fp8"] if self.fp8_base else self.weight_dtype

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        # train_network.py: fp8_base stores the text encoders in fp8 as well
        return DTYPES["fp8"] if self.fp8_base else self.weight_dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return torch.float32 if self.no_half_vae else self.weight_dtype

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.weight_dtype if self.full_lora_precision else torch.float32

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return None if self.mixed_precision == "no" else self.weight_dtype

    @property
    def chunks(self) -> int:
        return self.max_token_length // 75

    def describe(self) -> str:
        what = "U-Net and text encoder(s)" if self.train_unet and self.train_text_encoder else (
            "U-Net" if self.train_unet else "text encoder(s)")
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", DTYPES["fp8"]: "fp8"}
        parts = [
            f"{self.family.upper()} {self.width}x{self.height}, batch {self.batch_size}, LoRA rank {self.rank} on the {what}",
            f"U-Net weights {name[self.unet_dtype]}, LoRA {name[self.lora_dtype]}"
            + (f", {name[self.autocast_dtype]} autocast" if self.autocast_dtype else ", no autocast"),
            "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing",
            self.optimizer + (" " + " ".join(f"{k}={v}" for k, v in self.optimizer_args) if self.optimizer_args else ""),
            "latents cached" if self.cache_latents else f"VAE on the GPU ({name[self.vae_dtype]})",
            "text-encoder outputs cached" if self.cache_text_encoder_outputs else (
                "text encoders trained" if self.train_text_encoder else f"text encoders on the GPU ({name[self.text_encoder_dtype]}, frozen)"),
            f"attention: {self.attention}",
        ]
        if self.network_args:
            parts.append("network_args " + " ".join(f"{k}={v}" for k, v in self.network_args))
        return "; ".join(parts)


# --- counting live storages -------------------------------------------------------------------------------------------
FROZEN_UNET = "U-Net weights (frozen)"
FROZEN_TE = "text-encoder weights (frozen)"
FROZEN_VAE = "VAE weights (frozen)"
LORA = "LoRA weights"
GRADIENTS = "gradients"
OPTIMIZER_STATE = "optimizer state"
ACTIVATIONS = "activations and temporaries"
CATEGORIES = (FROZEN_UNET, FROZEN_TE, FROZEN_VAE, LORA, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS)
SET_UP = "set-up"


@dataclass(eq=False)
class Block:
    """One storage while it lives: its size (rounded like the allocator's), what it is, when it was made."""

    nbytes: int
    category: str
    phase: str


class StorageCounter(TorchDispatchMode):
    """Every storage an operator creates on ``device_type``, while it lives.

    A storage is recognised by its Python object, which PyTorch keeps for as
    long as the storage lives (so views and in-place results count once), and
    a weak reference tells when it dies. ``events`` is the allocation log
    ((block, +1) made, (block, -1) freed) from which :meth:`replay` finds the
    largest live total; blocks can be re-labelled afterwards (what became a
    gradient, what the optimizer keeps), so the peak's breakdown is exact.
    """

    def __init__(self, device_type: str = "meta", block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__()
        self.device_type = device_type
        self.block_bytes = block_bytes
        self.phase = "counting"  # what allocations are made for (the estimate names the parts of the step)
        self.events: list[tuple[Block, int]] = []
        self._live: dict[int, tuple[Block, weakref.ref]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.see(t)
        return out

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes) * self.block_bytes if self.block_bytes > 1 else nbytes

    def see(self, t: torch.Tensor, category: str = ACTIVATIONS, phase: Optional[str] = None) -> Optional[Block]:
        """Count ``t``'s storage if it is new (or was resized in place); its block either way."""
        if t.device.type != self.device_type:
            return None
        storage = t.untyped_storage()
        key = id(storage)
        size = self._rounded(storage.nbytes())
        entry = self._live.get(key)
        if entry is not None:
            if entry[0].nbytes == size:
                return entry[0]
            self._free(key)  # resized in place: the old block goes, a new one comes
        block = Block(size, category, phase or self.phase)
        self._live[key] = (block, weakref.ref(storage, lambda _ref, key=key: self._free(key)))
        self.events.append((block, 1))
        return block

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.events.append((entry[0], -1))

    def label(self, tensors: Iterable[Optional[torch.Tensor]], category: str) -> None:
        """Say what the storages of ``tensors`` are (now and for the whole replay); ones not seen before were
        there before counting began (the set-up: part of every total, never the moment of a peak)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                block = self.see(t, category, SET_UP)
                if block is not None:
                    block.category = category

    def live_bytes(self) -> dict[str, int]:
        totals = dict.fromkeys(CATEGORIES, 0)
        for block, _ in self._live.values():
            totals[block.category] = totals.get(block.category, 0) + block.nbytes
        return totals

    def replay(self) -> "Replay":
        """The allocation log summed up; only allocations outside the set-up can make the peak."""
        totals = dict.fromkeys(CATEGORIES, 0)
        result = Replay(0, dict(totals), "", dict(totals), {})
        current, started = 0, False
        for block, sign in self.events:
            current += sign * block.nbytes
            totals[block.category] = totals.get(block.category, 0) + sign * block.nbytes
            if sign < 0 or block.phase == SET_UP:
                continue
            if not started:
                result.before, started = current - block.nbytes, True
            if current > result.peak:
                result.peak, result.at_peak, result.phase = current, dict(totals), block.phase
            result.by_phase[block.phase] = max(result.by_phase.get(block.phase, 0), current)
            for category, value in totals.items():
                result.largest[category] = max(result.largest.get(category, 0), value)
        return result


@dataclass
class Replay:
    """What an allocation log adds up to.

    ``peak``: the most bytes live at once; ``at_peak``: per category at that
    moment; ``phase``: the part of the step it fell in; ``largest``: the most
    each category held at any moment; ``by_phase``: the peak within each part
    of the step; ``before``: bytes live when the first counted block came.
    """

    peak: int
    at_peak: dict[str, int]
    phase: str
    largest: dict[str, int]
    by_phase: dict[str, int]
    before: int = 0


# --- CUDA's behaviour, reproduced on the meta device ---------------------------------------------------------------
def _functions(*names: str) -> set:
    """The torch, torch.Tensor and torch.nn.functional callables of these names (those that exist)."""
    found = set()
    for name in names:
        for owner in (torch, torch.Tensor, F, torch.linalg, torch.special):
            if hasattr(owner, name):
                found.add(getattr(owner, name))
    return found


# autocast's lists for CUDA (ATen's autocast_mode.h): operators run in the autocast dtype ...
_LOWER = _functions("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                    "prelu", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv",
                    "addbmm", "baddbmm", "bmm", "chain_matmul", "multi_dot", "vecdot")
# ... in float32 ...
_FP32 = _functions("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
                   "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "rms_norm",
                   "group_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
                   "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
                   "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
                   "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
                   "logsumexp", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
# ... or on their input's dtype with a float32 result
_FP32_RESULT = _functions("softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum", "vector_norm", "matrix_norm")


def _is_castable(t: Any, device_type: str) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == device_type and t.is_floating_point() and t.dtype != torch.float64


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
                    handles += [module.register_forward_pre_hook(before),
                                module.register_forward_hook(after, always_call=True)]  # also when it raises
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
            cacheable = (not in_backward and dtype != torch.float32 and t.dtype == torch.float32 and t.is_leaf
                         and t.requires_grad)
            if not cacheable:
                return t.to(dtype)
            hit = self._cache.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
            result = t.to(dtype)
            self._cache[id(t)] = (weakref.ref(t), result)
            return result

        return tree_map(cast, tree)

    def _attention(self, dtype, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   **rest):
        if query.device.type != self.device_type:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **rest)
        if dtype is not None:
            query, key, value, attn_mask = self._cast((query, key, value, attn_mask), dtype)
        head = query.shape[-1]
        if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and head <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        bias = None
        if attn_mask is not None:
            shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            if attn_mask.dtype == torch.bool:
                bias = torch.zeros(shape, dtype=query.dtype, device=query.device).masked_fill(~attn_mask, float("-inf"))
            else:
                bias = attn_mask.to(query.dtype).expand(shape)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, grad, dropout_p,
                                                                      is_causal, scale=scale)[0]


# --- the models and one training step, as sd-scripts runs them ------------------------------------------------------------
@dataclass
class Models:
    """The frozen base models on the device: the U-Net, [te] or [te1, te2], and the VAE when latents are not cached."""

    family: str
    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: Optional[nn.Module] = None
    on_device: set[str] = field(default_factory=lambda: {"unet", "text_encoders", "vae"})

    @property
    def sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def text_encoder_argument(self) -> Any:
        """``text_encoder`` as sd-scripts passes it to the network: one model, or a list of two (SDXL)."""
        return self.text_encoders if self.sdxl else self.text_encoders[0]


def _needs(package: str) -> None:
    raise VramError(f"aclora vram builds the models with diffusers and transformers: {package} is not installed "
                    "(pip install diffusers transformers accelerate)")


def build_models(setup: Setup, device: str = "meta") -> Models:
    """The real architecture of ``setup.family`` on ``device`` in sd-scripts' dtypes, frozen; nothing initialised."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError:
        _needs("diffusers")
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError:
        _needs("transformers")
    attn = "eager" if setup.attention == "none" else "sdpa"
    with torch.device(device):
        unet = UNet2DConditionModel(**_unet_config(setup.family))
        encoders = []
        for i, config in enumerate(_text_encoder_configs(setup.family)):
            kind = CLIPTextModelWithProjection if (setup.family == "sdxl" and i == 1) else CLIPTextModel
            encoders.append(kind(CLIPTextConfig(**config, attn_implementation=attn)))
        vae = None if setup.cache_latents else AutoencoderKL(**VAE_CONFIG)
    models = Models(setup.family, unet, encoders, vae)
    prepare_models(models, setup)
    return models


def prepare_models(models: Models, setup: Setup) -> None:
    """Dtypes, attention and placement as train_network.py leaves the frozen models (in place)."""
    if setup.attention == "none":
        from diffusers.models.attention_processor import AttnProcessor

        for model in (models.unet, models.vae):
            if model is not None:
                model.set_attn_processor(AttnProcessor())  # sd-scripts' own attention without xformers/sdpa
    models.unet.requires_grad_(False).to(dtype=setup.unet_dtype)
    for te in models.text_encoders:
        te.requires_grad_(False).to(dtype=setup.text_encoder_dtype)
        if setup.fp8_base:
            _text_model(te).embeddings.to(dtype=setup.weight_dtype)  # nn.Embedding has no fp8 (train_network.py)
    if models.vae is not None:
        models.vae.requires_grad_(False).to(dtype=setup.vae_dtype).eval()
    if setup.cache_text_encoder_outputs:
        models.on_device.discard("text_encoders")  # sdxl_train_network.py moves them to the CPU after caching
    if setup.cache_latents:
        models.on_device.discard("vae")


def _text_model(te: nn.Module) -> nn.Module:
    return getattr(te, "text_model", te)  # transformers 4.x has a text_model level, 5.x does not


def _enable_checkpointing(te: nn.Module) -> None:
    # what train_network.py calls (transformers 5 renamed it and deprecated the old name)
    enable = getattr(te, "activation_checkpointing_enable", None) or getattr(te, "gradient_checkpointing_enable")
    enable()


class TrainingStep:
    """A network on ``models`` with its optimizer, stepped like ``train_network.py``'s loop.

    ``phase`` is called with the name of each part of the step as it starts
    (the estimate records where its peak falls). Constant inputs (SDXL's size
    conditioning, the noise schedule) are made on the device once, as
    sd-scripts keeps its noise scheduler's tables there.
    """

    def __init__(self, models: Models, setup: Setup, device: str = "meta", policy: Optional[CudaPolicy] = None,
                 phase: Callable[[str], None] = lambda name: None) -> None:
        from . import factory, replay, schedule

        self.models, self.setup, self.device = models, setup, torch.device(device)
        self.policy = policy or CudaPolicy("meta")
        self.phase = phase
        self.args = replay.make_args(
            network_dim=setup.rank, network_alpha=setup.alpha,
            network_args=[f"{k}={v}" for k, v in setup.network_args] or None,
            network_train_unet_only=not setup.train_text_encoder,
            network_train_text_encoder_only=not setup.train_unet, train_batch_size=setup.batch_size,
            gradient_checkpointing=setup.gradient_checkpointing, max_grad_norm=setup.max_grad_norm,
            mixed_precision=setup.mixed_precision, full_bf16=setup.full_lora_precision and setup.mixed_precision == "bf16",
            full_fp16=setup.full_lora_precision and setup.mixed_precision == "fp16", fp8_base=setup.fp8_base,
            cache_latents=setup.cache_latents, cache_text_encoder_outputs=setup.cache_text_encoder_outputs,
            max_token_length=None if setup.max_token_length == 75 else setup.max_token_length, v2=setup.family == "sd2",
            optimizer_type=setup.optimizer, learning_rate=1e-4)
        te_argument = models.text_encoder_argument
        with torch.device(self.device):
            network = factory.create_network(1.0, setup.rank, setup.alpha, None, te_argument, models.unet,
                                             **dict(setup.network_args))
        try:
            network.prepare_network(self.args)
            network.apply_to(te_argument, models.unet, setup.train_text_encoder, setup.train_unet)
            self._prepare(network)
        except BaseException:
            network.remove_from()  # it already listens to accelerator.backward: a later loop's losses are not its own
            raise
        schedule.forget(network)  # it hears accelerator.backward during its own steps only (see _only_listener)
        self.network = network
        self.accelerator = _accelerator()
        self._constants()

    def _prepare(self, network: Any) -> None:
        """The rest of train_network.py's set-up, from moving the network to the device to the first epoch."""
        models, setup, te_argument = self.models, self.setup, self.models.text_encoder_argument
        network.to(self.device)  # its state buffers too, as accelerator.prepare(network) does
        if setup.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            if setup.train_text_encoder:
                for te in models.text_encoders:
                    _enable_checkpointing(te)
            network.enable_gradient_checkpointing()
        groups, _ = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
        self.optimizer = make_optimizer(setup, groups)
        if setup.full_lora_precision:
            network.to(setup.weight_dtype)
        if setup.gradient_checkpointing:
            models.unet.train()
            for te in models.text_encoders:
                te.train()
                if setup.train_text_encoder:
                    _text_model(te).embeddings.requires_grad_(True)  # sd-scripts' workaround for checkpointing
        else:
            models.unet.eval()
            for te in models.text_encoders:
                te.eval()
        network.prepare_grad_etc(te_argument, models.unet)
        network.on_epoch_start(te_argument, models.unet)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``accelerator.autocast()``: real autocast on a real device, the policy's on the meta device."""
        dtype = self.setup.autocast_dtype
        if self.device.type == self.policy.device_type:
            return self.policy.autocast(dtype)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _constants(self) -> None:
        from .replay import alphas_cumprod

        s, d = self.setup, self.device
        self.alphas = alphas_cumprod("cpu").to(d)
        self.latent_shape = (s.batch_size, LATENT_CHANNELS, s.height // 8, s.width // 8)
        self.time_ids = torch.tensor([s.height, s.width, 0, 0, s.height, s.width], dtype=s.weight_dtype).to(d)
        self.time_ids = self.time_ids.expand(s.batch_size, 6)
        self.token_ids = torch.zeros((s.batch_size * s.chunks, TOKENS_PER_CHUNK), dtype=torch.long, device=d)

    def constants(self) -> list[torch.Tensor]:
        return [self.alphas, self.time_ids, self.token_ids]

    def device_models(self) -> list[tuple[nn.Module, str]]:
        """The frozen models that sit on the device during the step, with their category; a model sd-scripts
        keeps on the CPU (cached text-encoder outputs or latents) holds no device memory."""
        m = self.models
        found = [(m.unet, FROZEN_UNET)]
        if "text_encoders" in m.on_device:
            found += [(te, FROZEN_TE) for te in m.text_encoders]
        if m.vae is not None and "vae" in m.on_device:
            found.append((m.vae, FROZEN_VAE))
        return found

    def step(self) -> torch.Tensor:
        """One micro-batch that is also an optimizer step; returns the loss (on the meta device under the policy)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(_only_listener(self.network))
            if self.device.type == self.policy.device_type:
                m = self.models
                stack.enter_context(self.policy)
                stack.enter_context(self.policy.through_recomputation([m.unet, *m.text_encoders, m.vae]))
            return self._step()

    def _step(self) -> torch.Tensor:
        s, models, network = self.setup, self.models, self.network
        te_argument = models.text_encoder_argument
        self.phase("step start")
        network.on_step_start(te_argument, models.unet)
        latents = self._latents()
        conds = self._text_conditioning()
        self.phase("U-Net forward")
        noise = torch.randn(self.latent_shape, device=self.device, dtype=latents.dtype)
        timesteps = torch.randint(0, len(self.alphas), (s.batch_size,), device=self.device)
        abar = self.alphas[timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1.0 - abar).sqrt() * noise
        if s.gradient_checkpointing:  # as train_network.py does for checkpointing
            noisy.requires_grad_(True)
            for c in conds:
                if c.is_leaf:
                    c.requires_grad_(True)
        with self.autocast():
            prediction = self._unet(noisy.requires_grad_(s.train_unet), timesteps, conds)
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean([1, 2, 3]).mean()
        self.phase("backward")
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            network.record_loss(loss)
            loss.backward()
        self.phase("clipping and hooks")
        self.after_backward()
        if s.max_grad_norm:
            params = network.get_trainable_params()
            if self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, s.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        for hook in ("update_grad_norms", "update_norms"):  # the optional per-step hooks train_network.py calls
            if hasattr(network, hook):
                getattr(network, hook)()
        self.phase("optimizer step")
        self.optimizer.step()
        self.after_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def close(self) -> None:
        """Give the models their own forwards back."""
        self.network.remove_from()

    def warm_optimizer(self) -> None:
        """Create the optimizer's state as the first step does, from zero gradients and without a forward: the
        step that follows has the state from its start, as every step after the first has."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_backward(self) -> None:
        """Called once the gradients exist (the estimate labels them here)."""

    def after_optimizer(self) -> None:
        """Called once the optimizer state exists."""

    def _latents(self) -> torch.Tensor:
        s = self.setup
        if s.cache_latents:
            return torch.randn(self.latent_shape, device=self.device)  # the cached latents, moved to the device
        self.phase("VAE encode")
        images = torch.randn((s.batch_size, 3, s.height, s.width), device=self.device, dtype=s.vae_dtype)
        with torch.no_grad():
            latents = self.models.vae.encode(images).latent_dist.sample()
        return latents * self.models.vae.config.scaling_factor

    def _text_conditioning(self) -> list[torch.Tensor]:
        s, models = self.setup, self.models
        tokens = TOKENS_PER_CHUNK * s.chunks
        dims = [te.config.hidden_size for te in models.text_encoders]
        if s.cache_text_encoder_outputs:
            # what sdxl_train_network.py reads from the cache and moves to the device
            hidden = [torch.randn((s.batch_size, tokens, d), device=self.device, dtype=s.weight_dtype) for d in dims]
            pooled = torch.randn((s.batch_size, models.text_encoders[1].config.projection_dim), device=self.device,
                                 dtype=s.weight_dtype)
            return [*hidden, pooled]
        self.phase("text encoders")
        from .replay import encode_text

        with torch.set_grad_enabled(s.train_text_encoder), self.autocast():
            conds = encode_text(models.text_encoders, self.token_ids, models.sdxl)
        batch = s.batch_size
        hidden = [c.reshape(batch, tokens, c.shape[-1]) for c in conds[: len(dims)]]
        return hidden + [c[:: s.chunks] for c in conds[len(dims):]]

    def _unet(self, noisy: torch.Tensor, timesteps: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        unet = self.models.unet
        if not self.models.sdxl:
            return unet(noisy, timesteps, conds[0]).sample
        hidden1, hidden2, pooled = conds
        added = {"text_embeds": pooled, "time_ids": self.time_ids}
        return unet(noisy, timesteps, torch.cat([hidden1, hidden2], dim=2), added_cond_kwargs=added).sample


@contextlib.contextmanager
def _only_listener(network: Any) -> Iterator[None]:
    """Let ``network``, and only it, see the losses of ``accelerator.backward`` meanwhile: the capture is
    process-wide, and neither is a simulated step's loss (on the meta device, say) another network's training
    loss, nor another training loop's loss this network's."""
    from . import schedule

    others = [n for n in list(schedule._listeners) if n is not network]
    for other in others:
        schedule.forget(other)
    schedule.listen(network)
    try:
        yield
    finally:
        schedule.forget(network)
        for other in others:
            schedule.listen(other)


def _accelerator():
    """accelerate's Accelerator (its backward is where the network reads the loss), or None without accelerate."""
    try:
        from accelerate import Accelerator
    except ImportError:
        return None
    return Accelerator()


def _literal(value: Any) -> Any:
    """An optimizer_args value as sd-scripts reads it (ast.literal_eval of the string)."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def make_optimizer(setup: Setup, groups: list) -> torch.optim.Optimizer:
    """The optimizer sd-scripts' --optimizer_type builds, with --optimizer_args, as it runs on a CUDA device."""
    kwargs = {k: _literal(v) for k, v in setup.optimizer_args}
    try:
        if setup.optimizer == "AdamW":
            # on CUDA torch picks the multi-tensor (foreach) implementation, with its param-sized temporaries;
            # the fused kernel has none, the meta device has no fused kernel: the per-tensor loop stands in
            fused = bool(kwargs.pop("fused", False))
            kwargs.setdefault("foreach", not fused)
            return torch.optim.AdamW(groups, lr=1e-4, **kwargs)
        if setup.optimizer == "Adafactor":
            from transformers.optimization import Adafactor

            # the step-size options do not change the memory; scale_parameter=True reads a norm back to the host
            # per parameter and step, which the meta device cannot do (and which syncs a GPU every step)
            kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
            kwargs.pop("lr", None)
            return Adafactor(groups, lr=1e-4, **kwargs)
        return _adamw8bit(groups, kwargs)
    except TypeError as err:
        raise VramError(f"optimizer_args={[f'{k}={v}' for k, v in setup.optimizer_args]} is not valid for "
                        f"optimizer_type={setup.optimizer!r}: {err}") from None


def _adamw8bit(groups: list, kwargs: dict) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise VramError("optimizer_type='AdamW8bit' needs bitsandbytes, which is not importable here; allowed "
                        "without it: AdamW, Adafactor") from None

    class StateOnly(bnb.optim.AdamW8bit):
        """bitsandbytes' own 8-bit state (uint8 moments, block-wise scales) without its CUDA update kernel,
        which updates in place and so adds no memory."""

        @torch.no_grad()
        def step(self, closure=None):
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is not None and len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)

    return StateOnly(groups, lr=1e-4, **kwargs)


# --- the estimate ---------------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """Peak allocated bytes of a training step and what they are, plus the RESTART between steps."""

    setup: Setup
    peak_bytes: int
    breakdown: dict[str, int]  # per category at the peak
    peak_phase: str
    phase_peaks: dict[str, int]  # the peak within each part of the step
    largest: dict[str, int]  # the most each category held during the step (all the gradients, ...)
    before_step_bytes: int  # live when the step starts: weights, LoRA, optimizer state
    persistent_bytes: int  # live after the step (what a RESTART finds)
    restart_transient_bytes: int
    modules: int
    lora_parameters: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def restart_peak_bytes(self) -> int:
        return self.persistent_bytes + self.restart_transient_bytes

    @property
    def margin_bytes(self) -> int:
        return MARGIN_FIXED_BYTES + int(MARGIN_FRACTION * max(self.peak_bytes, self.restart_peak_bytes))

    @property
    def with_margin_bytes(self) -> int:
        return max(self.peak_bytes, self.restart_peak_bytes) + self.margin_bytes

    def fits(self, card_gib: float) -> bool:
        return self.with_margin_bytes <= card_gib * GiB

    def as_dict(self) -> dict:
        gib = lambda n: round(n / GiB, 3)  # noqa: E731
        return {
            "setup": asdict(self.setup), "peak_gib": gib(self.peak_bytes), "peak_phase": self.peak_phase,
            "breakdown_gib": {k: gib(v) for k, v in self.breakdown.items()},
            "phase_peaks_gib": {k: gib(v) for k, v in self.phase_peaks.items()},
            "largest_gib": {k: gib(v) for k, v in self.largest.items()}, "before_step_gib": gib(self.before_step_bytes),
            "persistent_gib": gib(self.persistent_bytes), "restart_transient_gib": gib(self.restart_transient_bytes),
            "restart_peak_gib": gib(self.restart_peak_bytes), "margin_gib": gib(self.margin_bytes),
            "with_margin_gib": gib(self.with_margin_bytes), "modules": self.modules,
            "lora_parameters": self.lora_parameters, "fits_gib": {str(c): self.fits(c) for c in CARD_SIZES_GIB},
            "seconds": round(self.seconds, 1), "notes": self.notes, "not_counted": NOT_COUNTED,
        }


class CountedStep(TrainingStep):
    """The training step with its gradients and optimizer state labelled for the counter."""

    def __init__(self, counter: StorageCounter, *args: Any, **kwargs: Any) -> None:
        self.counter = counter
        self.with_gradient: set[int] = set()  # ids of the parameters the step gave a gradient
        super().__init__(*args, phase=self._phase, **kwargs)

    def _phase(self, name: str) -> None:
        self.counter.phase = name

    def after_backward(self) -> None:
        params = list(self.network.parameters()) + [p for m, _ in self.device_models() for p in m.parameters()]
        self.counter.label((p.grad for p in params), GRADIENTS)
        self.with_gradient = {id(p) for p in params if p.grad is not None}

    def drop_unused_state(self) -> None:
        """Take out of the count the state :meth:`warm_optimizer` made for parameters the step gave no gradient
        (e.g. the LoRA of SDXL te1's last layer, whose output is not used): a real first step makes none."""
        for p, state in self.optimizer.state.items():
            if id(p) not in self.with_gradient:
                for t in tree_leaves(state):
                    block = self.counter.see(t) if isinstance(t, torch.Tensor) else None
                    if block is not None:
                        block.nbytes = 0

    def after_optimizer(self) -> None:
        self.counter.label((t for state in self.optimizer.state.values() for t in tree_leaves(state)), OPTIMIZER_STATE)


def estimate(setup: Setup, measure_restart: bool = True, models: Optional[Models] = None,
             block_bytes: int = BLOCK_BYTES) -> Estimate:
    """Count one training step of ``setup`` on the meta device, with the optimizer state a first step leaves (the
    first step's optimizer step allocates that state while the gradients live: the same peak); the RESTART
    transient is measured on the CPU (see :func:`restart_transient`). ``models``: other models than the real
    architecture (on the meta device, prepared with :func:`prepare_models`), e.g. tiny ones for tests."""
    start = time.perf_counter()
    counter = StorageCounter("meta", block_bytes)
    policy = CudaPolicy("meta")
    notes: list[str] = []
    models = models or build_models(setup)
    run = CountedStep(counter, models, setup, "meta", policy)
    run.warm_optimizer()
    # what exists before the first step: only what sits on the device is labelled, and so counted
    for model, category in run.device_models():
        counter.label(list(model.parameters()) + list(model.buffers()), category)
    counter.label(list(run.network.parameters()) + list(run.network.buffers()), LORA)
    counter.label(run.constants(), ACTIVATIONS)
    counter.label((t for state in run.optimizer.state.values() for t in tree_leaves(state)), OPTIMIZER_STATE)
    try:
        with counter:
            run.step()
        run.drop_unused_state()
        persistent = counter.live_bytes()
    finally:
        run.close()
    summary = counter.replay()
    persistent_bytes = sum(persistent[c] for c in (FROZEN_UNET, FROZEN_TE, FROZEN_VAE, LORA, OPTIMIZER_STATE))
    transient = restart_transient(run.network) if measure_restart else 0
    if run.accelerator is None:
        notes.append("accelerate is not installed: the loss went to network.record_loss instead of Accelerator.backward")
    if setup.mixed_precision == "fp16":
        notes.append("fp16: the GradScaler's own tensors (a few bytes per step) are not simulated")
    if setup.attention == "none":
        notes.append("attention=none: the U-Net's eager attention stands in for sd-scripts' own (same L x L scores)")
    notes.append("the diffusers U-Net stands in for sd-scripts' own (same layers; both checkpoint every ResNet and "
                 "transformer block, sd-scripts also its down- and upsamplers)")
    lora_params = sum(p.numel() for p in run.network.parameters())
    return Estimate(setup, summary.peak, summary.at_peak, summary.phase, summary.by_phase, summary.largest,
                    summary.before, persistent_bytes, transient, len(run.network.loras), lora_params,
                    time.perf_counter() - start, notes)


def restart_transient(network: Any, p: float = 0.9) -> int:
    """Extra bytes a RESTART of ``network`` allocates on the device.

    RESTART runs between steps (activations and gradients freed) and works
    through the modules in chunks of one shape, one chunk after another, each
    bounded by the device's chunk budget; so its transient is that of its
    largest chunk. It is measured by running ``ACLoRANetwork.restart`` for real
    on the CPU, on a network holding one chunk's worth of modules of every
    shape of ``network`` (the CPU's smaller chunk budget raised to the
    device's for the purpose).
    """
    from unittest import mock

    from . import functional as Fn
    from . import restart as restart_module
    from .network import ACLoRANetwork
    from .targets import Target

    if network.config.restart_mode == "off":
        return 0
    targets, ranks, alphas = [], {}, {}
    for (rank, cols, rows, _), indices in restart_module.shape_groups(network.loras).items():
        sample = network.loras[indices[0]]
        layer = sample.org_module
        for i in range(min(len(indices), Fn.chunk_size(rows, cols, rank, restart_module.CHUNK_BYTES))):
            with torch.device("meta"):  # the base layer is never run: no memory for it
                org = (nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, bias=False)
                       if isinstance(layer, nn.Conv2d) else nn.Linear(layer.in_features, layer.out_features, bias=False))
            name = f"{sample.lora_name}_sample_{i}"
            targets.append(Target(name, org, "unet"))
            ranks[name], alphas[name] = rank, sample.alpha_value
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        samples = ACLoRANetwork(targets, ranks, alphas, 1.0, network.config)
        with torch.no_grad():
            for m in samples.loras:  # a trained-looking update, so that the RESTART has components to sort
                nn.init.normal_(m.lora_up.weight, std=0.01)
    counter = StorageCounter("cpu")
    counter.label(list(samples.parameters()) + list(samples.buffers()), LORA)
    counter.phase = "RESTART"
    with mock.patch.object(restart_module, "CPU_CHUNK_BYTES", restart_module.CHUNK_BYTES), counter:
        samples.restart(p=p)
    summary = counter.replay()
    return max(summary.peak - summary.at_peak[LORA], 0)


# --- reading sd-scripts' arguments -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """One sd-scripts argument the estimate reads: how to check its value."""

    kind: str  # bool, int, number, choice, resolution, text, list
    allowed: str = ""
    choices: tuple = ()
    minimum: float = 0


KEYS: dict[str, Key] = {
    "pretrained_model_name_or_path": Key("text", "a path"),
    "v2": Key("bool"),
    "resolution": Key("resolution", "'W,H' or one size, multiples of 8 from 64"),
    "train_batch_size": Key("int", "an integer >= 1", minimum=1),
    "network_module": Key("choice", "networks.aclora", ("networks.aclora",)),
    "network_dim": Key("int", "an integer >= 1", minimum=1),
    "network_alpha": Key("number", "a number >= 0"),
    "network_args": Key("list", "a list of 'key=value' strings"),
    "network_train_unet_only": Key("bool"),
    "network_train_text_encoder_only": Key("bool"),
    "mixed_precision": Key("choice", "no, fp16, bf16", ("no", "fp16", "bf16")),
    "full_bf16": Key("bool"),
    "full_fp16": Key("bool"),
    "fp8_base": Key("bool"),
    "no_half_vae": Key("bool"),
    "gradient_checkpointing": Key("bool"),
    "cache_latents": Key("bool"),
    "cache_latents_to_disk": Key("bool"),
    "cache_text_encoder_outputs": Key("bool"),
    "cache_text_encoder_outputs_to_disk": Key("bool"),
    "optimizer_type": Key("choice", ", ".join(OPTIMIZERS), tuple(o.lower() for o in OPTIMIZERS)),
    "optimizer_args": Key("list", "a list of 'key=value' strings"),
    "use_8bit_adam": Key("bool"),
    "max_grad_norm": Key("number", "a number >= 0"),
    "sdpa": Key("bool"),
    "xformers": Key("bool"),
    "mem_eff_attn": Key("bool"),
    "max_token_length": Key("choice", "75, 150, 225", (75, 150, 225)),
    "gradient_accumulation_steps": Key("int", "an integer >= 1", minimum=1),
    "dataset_config": Key("text", "a path"),
}
# sd-scripts arguments that change memory in ways the estimate does not model: refused when switched on
UNSUPPORTED = ("deepspeed", "fp8_base_unet", "fused_backward_pass", "use_lion_optimizer", "lowvram", "blocks_to_swap",
               "cpu_offload_checkpointing", "train_text_encoder_only")
_TRUE, _FALSE = (True, "true"), (False, "false")


def _check(key: str, raw: Any, origin: str) -> Any:
    """The value of one argument, checked; VramError names the origin, the key, the value and what is allowed."""
    spec = KEYS[key]

    def bad(allowed: str) -> VramError:
        return VramError(f"{origin}: {key}={raw!r} is not valid; allowed: {allowed}")

    value = raw.strip() if isinstance(raw, str) else raw
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("true or false")
    if spec.kind in ("int", "number"):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise bad(spec.allowed) from None
        if number != number or number < spec.minimum or (spec.kind == "int" and not number.is_integer()):
            raise bad(spec.allowed)
        return int(number) if spec.kind == "int" else number
    if spec.kind == "choice":
        options = {str(c).lower(): c for c in spec.choices}
        found = options.get(str(value).lower()) if not isinstance(value, bool) else None
        if found is None:
            raise bad(spec.allowed)
        return found
    if spec.kind == "resolution":
        parts = str(value).replace(" ", "").split(",") if not isinstance(value, bool) else []
        try:
            sizes = [int(x) for x in parts]
        except ValueError:
            raise bad(spec.allowed) from None
        if len(sizes) not in (1, 2) or any(x < 64 or x % 8 for x in sizes):
            raise bad(spec.allowed)
        return (sizes[0], sizes[-1])
    if spec.kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and "=" in i for i in items):
            raise bad(spec.allowed)
        return tuple(tuple(x.strip() for x in item.split("=", 1)) for item in items)
    if not isinstance(value, str):
        raise bad(spec.allowed)
    return value


def read_config(path: str) -> dict[str, Any]:
    """sd-scripts' --config_file: a TOML file whose [sections] merge into one flat set of arguments."""
    try:
        data = _load_toml(Path(path))
    except FileNotFoundError:
        raise VramError(f"--config_file {path!r}: no such file") from None
    except Exception as err:  # a TOML syntax error
        raise VramError(f"--config_file {path!r} is not valid TOML: {err}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for inner, item in value.items():
                if isinstance(item, dict):
                    raise VramError(f"{path}: [{key}.{inner}] is nested two levels deep; sd-scripts reads one level of "
                                    "[sections] only")
                flat[inner] = item
        else:
            flat[key] = value
    return flat


def setup_from_arguments(arguments: Mapping[str, tuple[Any, str]], family: Optional[str] = None,
                         base: Optional[Path] = None) -> tuple[Setup, list[str]]:
    """A Setup from sd-scripts arguments ({key: (value, where it came from)}); also the notes on what was read."""
    notes: list[str] = []
    values: dict[str, Any] = {}
    ignored = []
    for key, (raw, origin) in arguments.items():
        if key in KEYS:
            values[key] = _check(key, raw, origin)
        elif key in UNSUPPORTED:
            if raw not in (False, None, 0, "false", ""):
                raise VramError(f"{origin}: {key}={raw!r} is not modelled by aclora vram; allowed: leave it unset")
        else:
            close = difflib.get_close_matches(key, list(KEYS) + list(UNSUPPORTED), n=1, cutoff=0.85)
            if close:
                raise VramError(f"{origin}: unknown key {key!r} (value {raw!r}); did you mean {close[0]!r}?")
            ignored.append(key)
    if ignored:
        notes.append("arguments that do not change the estimate: " + ", ".join(sorted(ignored)))
    values.update(_dataset_overrides(values.get("dataset_config"), base, notes))
    fam = family or _family_from(values, notes)
    resolution = values.get("resolution") or (NATIVE_RESOLUTION[fam],) * 2
    if "resolution" not in values:
        notes.append(f"no resolution given: {resolution[0]}x{resolution[1]} (the family's native size)")
    attention = next((name for name in ("xformers", "mem_eff_attn", "sdpa") if values.get(name)), "none")
    optimizer = next((o for o in OPTIMIZERS if o.lower() == str(values.get("optimizer_type", "adamw"))), "AdamW")
    if values.get("use_8bit_adam"):
        optimizer = "AdamW8bit"
    precision = values.get("mixed_precision", "no")
    for key, wanted in (("full_bf16", "bf16"), ("full_fp16", "fp16")):
        if values.get(key) and precision != wanted:
            raise VramError(f"full_bf16/full_fp16 must match mixed_precision={precision!r} ({key}=True needs "
                            f"mixed_precision={wanted!r}, as train_network.py asserts)")
    setup = Setup(
        family=fam, width=resolution[0], height=resolution[1], batch_size=values.get("train_batch_size", 1),
        rank=values.get("network_dim", 64), alpha=values.get("network_alpha", 1.0),
        network_args=values.get("network_args", ()), mixed_precision=precision,
        full_lora_precision=bool(values.get("full_bf16") or values.get("full_fp16")),
        fp8_base=values.get("fp8_base", False), gradient_checkpointing=values.get("gradient_checkpointing", False),
        train_unet=not values.get("network_train_text_encoder_only", False),
        train_text_encoder=not values.get("network_train_unet_only", False), optimizer=optimizer,
        optimizer_args=values.get("optimizer_args", ()), max_grad_norm=values.get("max_grad_norm", 1.0),
        cache_latents=bool(values.get("cache_latents") or values.get("cache_latents_to_disk")),
        cache_text_encoder_outputs=bool(values.get("cache_text_encoder_outputs")
                                        or values.get("cache_text_encoder_outputs_to_disk")),
        attention=attention, no_half_vae=values.get("no_half_vae", False),
        max_token_length=values.get("max_token_length", 75))
    return setup, notes


def _family_from(values: Mapping[str, Any], notes: list[str]) -> str:
    if values.get("v2"):
        notes.append("family sd2 (v2 = true)")
        return "sd2"
    model = str(values.get("pretrained_model_name_or_path", ""))
    if "xl" in model.lower():
        notes.append(f"family sdxl ('xl' in {model!r}; --family to change)")
        return "sdxl"
    notes.append("family sd1 (no v2, no 'xl' in pretrained_model_name_or_path; --family to change)")
    return "sd1"


def _dataset_overrides(path: Optional[str], base: Optional[Path], notes: list[str]) -> dict[str, Any]:
    """Resolution and batch size from the dataset config when it sets them (sd-scripts lets it override)."""
    if not path:
        return {}
    candidates = [Path(path)] + ([base / path, base.parent / path] if base is not None else [])
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        notes.append(f"dataset_config {path!r} not found from here: its resolution/batch size (if any) not read")
        return {}
    data = _load_toml(found)
    general = data.get("general", {}) if isinstance(data.get("general"), dict) else {}
    datasets = data.get("datasets", []) if isinstance(data.get("datasets"), list) else []
    found_values: dict[str, Any] = {}
    origin = f"dataset_config {found}"
    for scope in [general] + [d for d in datasets if isinstance(d, dict)]:
        if "resolution" in scope:
            raw = scope["resolution"]
            raw = ",".join(str(x) for x in raw) if isinstance(raw, list) else raw
            found_values["resolution"] = _check("resolution", raw, origin)
        if "batch_size" in scope:
            size = _check("train_batch_size", scope["batch_size"], origin)
            found_values["train_batch_size"] = max(size, found_values.get("train_batch_size", 0))
    if found_values:
        notes.append(f"from {found}: " + ", ".join(f"{k}={v}" for k, v in found_values.items()))
    return found_values


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.load(str(path))
    with open(path, "rb") as f:
        return tomllib.load(f)


# --- the command ------------------------------------------------------------------------------------------------------------
BOOLEAN_FLAGS = ("v2", "network_train_unet_only", "network_train_text_encoder_only", "full_bf16", "full_fp16",
                 "fp8_base", "no_half_vae", "gradient_checkpointing", "cache_latents", "cache_text_encoder_outputs",
                 "sdpa", "xformers", "mem_eff_attn")
VALUE_FLAGS = ("resolution", "train_batch_size", "network_dim", "network_alpha", "mixed_precision", "optimizer_type",
               "max_grad_norm", "max_token_length")
LIST_FLAGS = ("network_args", "optimizer_args")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aclora vram",
        description="Estimate the peak GPU memory of an AC-LoRA training run, counted on PyTorch's meta device "
                    "(no GPU, no download; under a minute on a CPU). Give sd-scripts' --config_file and/or its arguments, "
                    "spelled as sd-scripts spells them; arguments override the file, as in sd-scripts.")
    parser.add_argument("--config_file", metavar="FILE.toml", help="an sd-scripts training config (sample_configs/*.toml)")
    parser.add_argument("--family", choices=FAMILIES,
                        help="the base model (default: sd2 with v2, sdxl when the model path contains 'xl', else sd1)")
    for name in BOOLEAN_FLAGS:
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
    for name in VALUE_FLAGS:
        parser.add_argument(f"--{name}", metavar="VALUE", default=None)
    for name in LIST_FLAGS:
        parser.add_argument(f"--{name}", nargs="*", metavar="KEY=VALUE", default=None)
    parser.add_argument("--no-restart", action="store_true", help="skip measuring the RESTART transient (faster)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parser


def arguments_from(args: argparse.Namespace) -> tuple[dict[str, tuple[Any, str]], Optional[Path]]:
    arguments: dict[str, tuple[Any, str]] = {}
    base = None
    if args.config_file:
        base = Path(args.config_file).resolve().parent
        arguments = {k: (v, args.config_file) for k, v in read_config(args.config_file).items()}
    for name in BOOLEAN_FLAGS + VALUE_FLAGS + LIST_FLAGS:
        value = getattr(args, name)
        if value is not None:
            arguments[name] = (value, "command line")
    return arguments, base


def format_estimate(result: Estimate, notes: Sequence[str] = ()) -> str:
    gib = lambda n: f"{n / GiB:6.2f}"  # noqa: E731
    lines = [f"AC-LoRA VRAM estimate: {result.setup.describe()}",
             f"{result.modules} LoRA modules, {result.lora_parameters / 1e6:.1f} M trainable parameters", "",
             "  GiB   at the peak of the training step"]
    for category in CATEGORIES:
        if result.breakdown.get(category):
            lines.append(f"{gib(result.breakdown[category])}  {category}")
    lines += [f"{gib(result.peak_bytes)}  peak allocated (estimate of torch.cuda.max_memory_allocated), during: "
              f"{result.peak_phase}",
              "        peak in each part of the step: "
              + ", ".join(f"{phase} {value / GiB:.2f}" for phase, value in result.phase_peaks.items()),
              f"{gib(result.restart_transient_bytes)}  RESTART transient, between steps (peak then: "
              f"{result.restart_peak_bytes / GiB:.2f} GiB)",
              f"{gib(result.margin_bytes)}  margin for what is not counted (below)",
              f"{gib(result.with_margin_bytes)}  estimate with the margin", ""]
    verdicts = [f"{c} GiB: {'fits' if result.fits(c) else 'does not fit'}" for c in CARD_SIZES_GIB]
    lines.append("By this estimate, on a card with " + "; ".join(verdicts) + ".")
    lines += ["", NOT_COUNTED]
    extra = list(notes) + result.notes
    if extra:
        lines += [""] + [f"note: {n}" for n in extra]
    lines.append(f"(counted in {result.seconds:.0f} s)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        arguments, base = arguments_from(args)
        setup, notes = setup_from_arguments(arguments, args.family, base)
        result = estimate(setup, measure_restart=not args.no_restart)
    except VramError as err:
        print(f"aclora vram: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # OptionError from network_args
        print(f"aclora vram: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.as_dict(), "notes": list(notes) + result.notes}, indent=2))
    else:
        print(format_estimate(result, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
