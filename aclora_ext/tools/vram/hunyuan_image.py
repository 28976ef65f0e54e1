"""HunyuanImage-2.1 in ``aclora vram``: the DiT as ``hunyuan_image_train_network.py`` leaves it on the device,
``--fp8_scaled`` and ``--blocks_to_swap`` as sd-scripts applies them, and one training step of the trainer.

The DiT is ``harness.hunyuan_image_dit``'s (sd-scripts' layout, written here, built on the meta device); its
LoRA is ``networks.aclora``'s own on it (the layers and names of ``networks.lora_hunyuan_image``: every Linear
of the double and single blocks). The text encoders (Qwen2.5-VL-7B, byT5) and the VAE are not on the device:
the count needs cached text-encoder outputs and cached latents (``hunyuan_image_checks`` refuses the rest).

What sits on the device (hunyuan_image_train_network.py, train_network.py): the DiT in the weight dtype
(``cast_unet``), or with ``--fp8_scaled`` as sd-scripts' ``load_safetensors_with_lora_and_fp8`` and
``apply_fp8_monkey_patch`` leave it: every ``.weight`` of ``double_blocks`` / ``single_blocks`` whose key has
neither ``norm`` nor ``_emb`` (the blocks' Linears) in float8_e4m3fn, with a ``scale_weight`` buffer of one bf16
scale per 64 input channels (``[out, in/64, 1]``; per output channel when the width is not a multiple of 64),
and the rest in the file's bf16. Such a Linear's forward makes a bf16 copy of its weight times its scales and
calls ``F.linear`` with it, so autograd keeps that copy for backward (with gradient checkpointing only while a
block is recomputed). Cached text-encoder outputs arrive as the cache holds them: Qwen2.5-VL's in float32,
byT5's in float16, with int64 masks.

Block swap (library/custom_offloading_utils.py): ``enable_block_swap(N)`` swaps the last N//2 double and
(N - N//2)*2 single blocks; as for FLUX.1 (see ``tools.vram.dit``) only the modules' ``.weight`` moves and the
blocks swapped in reuse the device storage of those swapped out, so the count takes the swapped blocks'
weights off the device (their biases and fp8 scales stay) and changes nothing else.
"""

from __future__ import annotations

import types
from typing import Any, Optional, cast

import torch
from torch import nn
from torch.nn import functional as F

from ...harness.hunyuan_image_dit import (
    BYT5_TOKENS,
    HUNYUAN_IMAGE_21,
    QWEN_TOKENS,
    HunyuanImageConfig,
    HYImageDiffusionTransformer,
)
from .models import Models, block_weights
from .setup import DTYPES, Setup
from .step import TrainingStep

#: sd-scripts' FP8_OPTIMIZATION_TARGET_KEYS / _EXCLUDE_KEYS for HunyuanImage-2.1, and its block size
FP8_TARGETS, FP8_EXCLUDED, FP8_BLOCK = ("double_blocks", "single_blocks"), ("norm", "_emb"), 64
FILE_DTYPE = torch.bfloat16  # the HunyuanImage-2.1 DiT file's dtype (kept as it is under --fp8_scaled)
LATENT_STEP = 32  # the VAE downsamples 32x


def build_hunyuan_image_models(
    setup: Setup, device: str = "meta", config: Optional[HunyuanImageConfig] = None
) -> Models:
    """The DiT of a HunyuanImage-2.1 set-up on ``device``, frozen, in sd-scripts' dtypes (``config``: another
    size, for tests); no text encoder and no VAE (their outputs are cached)."""
    with torch.device(device):
        dit = HYImageDiffusionTransformer(config or HUNYUAN_IMAGE_21, split_attn=setup.split_attn)
    dit.requires_grad_(False)
    if setup.fp8_scaled:
        dit.to(dtype=FILE_DTYPE)
        scale_fp8(dit)
    else:
        dit.to(dtype=setup.weight_dtype)
    models = Models(setup.family, dit, [], None)
    models.on_device -= {"text_encoders", "vae"}
    swapped_blocks(dit, setup.blocks_to_swap)
    return models


def fp8_linears(dit: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears whose weights --fp8_scaled stores in fp8 (by their state-dict keys, as sd-scripts selects)."""
    found = []
    for name, module in dit.named_modules():
        key = f"{name}.weight"
        if isinstance(module, nn.Linear) and any(t in key for t in FP8_TARGETS):
            if not any(x in key for x in FP8_EXCLUDED):
                found.append((name, module))
    return found


def _dequantizing_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    scale = self.get_buffer("scale_weight")
    weight = self.weight.to(scale.dtype)
    if scale.dim() == 3:  # per block of input channels
        rows, blocks, _ = scale.shape
        weight = (weight.contiguous().view(rows, blocks, -1) * scale).view(self.weight.shape)
    else:
        weight = weight * scale
    return F.linear(x, weight, self.bias)


def scale_fp8(dit: nn.Module) -> None:
    """The fp8 weights, their scale buffers and their dequantizing forward, as --fp8_scaled leaves them."""
    for _, layer in fp8_linears(dit):
        rows, cols = layer.weight.shape
        shape = (rows, cols // FP8_BLOCK, 1) if cols % FP8_BLOCK == 0 else (rows, 1)
        scales = torch.ones(shape, dtype=layer.weight.dtype, device=layer.weight.device)
        layer.weight = nn.Parameter(layer.weight.detach().to(DTYPES["fp8"]), requires_grad=False)
        layer.register_buffer("scale_weight", scales)
        layer.forward = types.MethodType(_dequantizing_forward, layer)  # type: ignore[method-assign]


def swapped_blocks(dit: nn.Module, n: int) -> list[nn.Module]:
    """The last n//2 double and (n - n//2)*2 single blocks (``hunyuan_image_checks`` bounds n for the full model)."""
    double = cast(nn.ModuleList, dit.get_submodule("double_blocks"))
    single = cast(nn.ModuleList, dit.get_submodule("single_blocks"))
    counts = (n // 2, (n - n // 2) * 2)
    return [*list(double)[len(double) - counts[0] :], *list(single)[len(single) - counts[1] :]] if n else []


def offloaded_weights(dit: nn.Module, n: int) -> list[torch.Tensor]:
    """What the offloader moves of the swapped blocks: each submodule's ``weight`` (not biases, not scales)."""
    return block_weights(swapped_blocks(dit, n))


class HunyuanImageTrainingStep(TrainingStep):
    """hunyuan_image_train_network.py's step on a ``build_hunyuan_image_models`` DiT: the cached text-encoder
    outputs moved to the device, flow-matching noise (``--timestep_sampling sigma``, the default), the DiT under
    autocast with integer timesteps, the default ``raw`` prediction against ``noise - latents``."""

    def offloaded_tensors(self) -> list[torch.Tensor]:
        return offloaded_weights(self.models.unet, self.setup.blocks_to_swap)

    def _constants(self) -> None:
        s, c = self.setup, self._config
        self.latent_shape = (s.batch_size, c.in_channels, s.height // LATENT_STEP, s.width // LATENT_STEP)

    @property
    def _config(self) -> HunyuanImageConfig:
        return cast(HunyuanImageConfig, self.models.unet.params)

    def constants(self) -> list[torch.Tensor]:
        return []

    def _text_conditioning(self) -> list[torch.Tensor]:
        """[vlm_embed, vlm_mask, byt5_embed, byt5_mask] from the cache, every token valid (the longest captions)."""
        b, d, c = self.setup.batch_size, self.device, self._config
        return [
            torch.randn((b, QWEN_TOKENS, c.text_dim), device=d),
            torch.ones((b, QWEN_TOKENS), dtype=torch.long, device=d),
            torch.randn((b, BYT5_TOKENS, c.byt5_dim), device=d, dtype=torch.float16),
            torch.ones((b, BYT5_TOKENS), dtype=torch.long, device=d),
        ]

    def _loss(self, latents: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        s, d, b = self.setup, self.device, self.setup.batch_size
        noise = torch.randn_like(latents)
        sigmas = torch.rand((b,), device=d).to(s.weight_dtype).view(-1, 1, 1, 1)
        noisy = ((1.0 - sigmas) * latents + sigmas * noise).to(s.weight_dtype)
        timesteps = (sigmas[:, 0, 0, 0] * 1000).to(torch.int64)
        if s.gradient_checkpointing:  # hunyuan_image_train_network.py
            noisy.requires_grad_(True)
            for t in conds:
                if t.dtype.is_floating_point:
                    t.requires_grad_(True)
        dit: Any = self.models.unet
        with self.autocast():
            prediction = dit(noisy, timesteps, *conds)  # --model_prediction_type raw (the default)
        target = noise - latents
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean([1, 2, 3]).mean()


def describe_swap(dit: nn.Module, setup: Setup) -> Optional[str]:
    blocks = swapped_blocks(dit, setup.blocks_to_swap)
    if not blocks:
        return None
    gib = sum(w.numel() * w.element_size() for w in offloaded_weights(dit, setup.blocks_to_swap)) / 1024**3
    return (
        f"blocks_to_swap {setup.blocks_to_swap}: {len(blocks)} blocks' weights ({gib:.2f} GiB) stay on the CPU; "
        "the blocks swapped in reuse the device storage of those swapped out (sd-scripts' CUDA offloader), so "
        "nothing more is counted for them; the copies' time is not estimated"
    )


def hunyuan_image_notes(setup: Setup, models: Models) -> list[str]:
    notes = [
        "the HunyuanImage-2.1 DiT is aclora's own literal build of sd-scripts' layout, not sd-scripts' module",
        f"text counted at all {QWEN_TOKENS} Qwen2.5-VL + {BYT5_TOKENS} byT5 tokens in every sample (sd-scripts "
        "trims the text to the longest caption's valid tokens: shorter captions use less)",
    ]
    if setup.fp8_scaled:
        notes.append(
            "fp8_scaled: the blocks' Linear weights in fp8 with bf16 scales; each of their forwards makes a bf16 "
            "copy of the weight, which autograd keeps for backward"
            + (" (within one block's recomputation)" if setup.gradient_checkpointing else " (for every block)")
        )
    return notes + [n for n in [describe_swap(models.unet, setup)] if n]


__all__ = [
    "build_hunyuan_image_models",
    "HunyuanImageTrainingStep",
    "fp8_linears",
    "scale_fp8",
    "swapped_blocks",
    "offloaded_weights",
    "hunyuan_image_notes",
]
