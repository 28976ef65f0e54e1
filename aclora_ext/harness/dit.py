"""The FLUX.1 and SD3/SD3.5 diffusion transformers as sd-scripts lays them out, from literal configs, in
plain torch: for ``aclora vram``'s meta-device count, the tiny DiT layouts of the tests, and the LoRA
module shapes of the benchmarks. No sd-scripts, no download. This file: the configs and what both share;
the models are in ``flux_dit`` (``Flux``), ``chroma_dit`` (``Chroma``) and ``sd3_dit`` (``MMDiT``).

The modules carry sd-scripts' class and attribute names (``Flux``, ``DoubleStreamBlock``,
``SingleStreamBlock``, ``img_attn.qkv``, ``linear1``; ``MMDiT``, ``MMDiTBlock``, ``SingleDiTBlock``,
``joint_blocks.N.context_block.attn.qkv``), so the Linears a kohya LoRA targets have its shapes (a fused
qkv of 3*hidden x hidden, FLUX's fused ``linear1``) and its names (``networks.lora_flux`` /
``networks.lora_sd3``). The forwards do what sd-scripts' do, operator by operator where memory depends on
it (which tensors are made, in which dtype: the float32 RMSNorm and RoPE, autocast's casts, the
``(K B H L D)`` attention layout, the per-block ``torch.utils.checkpoint`` with ``use_reentrant=False``),
written here from the architecture, not taken from sd-scripts. Block swapping is not simulated (see
``aclora_ext.tools.vram.dit``: it only changes which weights sit on the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


# --- configs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FluxConfig:
    """sd-scripts' FluxParams; the defaults are FLUX.1 dev (schnell: guidance_embed=False)."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double blocks
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    in_channels: int = 64  # 16 latent channels packed 2x2
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class SD3Config:
    """sd-scripts' SD3Params (hidden = 64 x depth, heads = depth); the defaults are SD3.5 medium."""

    depth: int = 24
    patch_size: int = 2
    in_channels: int = 16
    pos_embed_max_size: int = 384
    adm_in_channels: int = 2048  # CLIP-L + CLIP-G pooled
    context_in_features: int = 4096
    qk_norm: Optional[str] = "rms"
    x_block_self_attn_layers: tuple[int, ...] = tuple(range(13))
    mlp_ratio: float = 4.0
    model_type: str = "5-medium"

    @property
    def hidden_size(self) -> int:
        return 64 * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth


@dataclass(frozen=True)
class ChromaConfig(FluxConfig):
    """sd-scripts' ChromaParams (``chroma_models.chroma_params``): FLUX.1's widths and blocks, no CLIP-L input
    (``vec_in_dim`` unused) and no per-block modulation Linears; one approximator MLP makes every block's
    modulation vectors from the timestep, the guidance and each vector's index."""

    approximator_in_dim: int = 64
    approximator_depth: int = 5
    approximator_hidden_size: int = 5120

    @property
    def modulation_vectors(self) -> int:
        """3 per single block, 2x2x3 per double block (image and text), 2 for the final layer: 344 at full size."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)
CHROMA = ChromaConfig()
SD3_MEDIUM = SD3Config(pos_embed_max_size=192, qk_norm=None, x_block_self_attn_layers=(), model_type="medium")
SD35_MEDIUM = SD3Config()
SD35_LARGE = SD3Config(depth=38, pos_embed_max_size=192, x_block_self_attn_layers=(), model_type="5-large")
#: the DiT models by sd-scripts' name: FLUX "dev"/"schnell" (flux_models.configs) and "chroma"
#: (flux_train_network.py --model_type chroma), SD3 model_type
DIT_CONFIGS: dict[str, dict[str, FluxConfig | SD3Config]] = {
    "flux": {"dev": FLUX_DEV, "schnell": FLUX_SCHNELL, "chroma": CHROMA},
    "sd3": {"medium": SD3_MEDIUM, "5-medium": SD35_MEDIUM, "5-large": SD35_LARGE},
}

# T5 v1.1 XXL's encoder as FLUX.1 and SD3 use it (transformers' T5Config keys)
T5XXL_CONFIG: dict = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}
T5_TARGET_CLASSES = ("T5Attention", "T5DenseGatedActDense")
# the FLUX.1 autoencoder and the SD3 VAE: the SD VAE's architecture with 16 latent channels, no quant convs
DIT_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
DIT_LATENT_CHANNELS = 16


def small(config: FluxConfig | SD3Config, **changes) -> FluxConfig | SD3Config:
    """The same layout at another size (tests): ``small(FLUX_DEV, hidden_size=64, num_heads=2, depth=2, ...)``."""
    return replace(config, **changes)


# --- shared pieces ---------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, time_factor: float = 1.0, max_period: int = 10_000) -> Tensor:
    """Sinusoidal embedding, computed in float32 and returned in ``t``'s dtype when ``t`` is floating."""
    t = t * time_factor
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    angles = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


class CheckpointedBlock(nn.Module):
    """A block whose forward goes through :func:`checkpointed`: sd-scripts' ``gradient_checkpointing`` flag."""

    gradient_checkpointing: bool = False
    _inside: bool = False  # True while the checkpoint's recomputation calls the block


def checkpointed(module: CheckpointedBlock, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, through torch.utils.checkpoint (non-reentrant) when ``module`` trains with checkpointing.

    sd-scripts checkpoints the block's ``_forward``; here the checkpointed function calls the module itself
    (which then runs ``fn``), so that module hooks also see the recomputation during backward (``aclora
    vram`` keeps its CUDA policy on through them). What is saved and recomputed is the same.
    """
    if module.training and module.gradient_checkpointing and not module._inside:
        return checkpoint(_through_call, module, *args, use_reentrant=False)
    return fn(*args)


def _through_call(module: CheckpointedBlock, *args: Any) -> Any:
    module._inside = True
    try:
        return module(*args)
    finally:
        module._inside = False


def heads_first(x: Tensor, heads: int, parts: int) -> tuple[Tensor, ...]:
    """``(B, L, parts*H*D)`` viewed as ``parts`` tensors of ``(B, H, L, D)``."""
    b, n, _ = x.shape
    return tuple(x.reshape(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


__all__ = [
    "FluxConfig",
    "ChromaConfig",
    "SD3Config",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "CHROMA",
    "SD3_MEDIUM",
    "SD35_MEDIUM",
    "SD35_LARGE",
    "DIT_CONFIGS",
    "T5XXL_CONFIG",
    "T5_TARGET_CLASSES",
    "DIT_VAE_CONFIG",
    "DIT_LATENT_CHANNELS",
    "small",
    "timestep_embedding",
    "checkpointed",
]
