"""Lumina 2's diffusion transformer (sd-scripts' ``library.lumina_models.NextDiT``, the 2B model
``lumina_util.load_lumina_model`` builds) as sd-scripts lays it out, from a literal config, in plain torch: for
``aclora vram``'s meta-device count. No sd-scripts, no download.

The modules carry sd-scripts' class and attribute names (``NextDiT``, ``JointTransformerBlock``,
``FinalLayer``, ``attention.qkv``, ``feed_forward.w1``, ``adaLN_modulation``, ``noise_refiner``,
``context_refiner``, ``cap_embedder``), so the parameters have its names, shapes and order (a test checks them
against sd-scripts' own model) and ``families.lumina`` finds the layers ``networks.lora_lumina`` adapts.

The forward is sd-scripts' for captions that fill the Gemma2 length (every caption token valid): sd-scripts
reads each caption's valid length back to the host (``cap_mask.sum(dim=1).tolist()``) and joins that many
caption tokens with the image tokens; the meta device has no values, so every sample here has all of them (the
longest sequence a batch can have). The rotary tables are built in float64 and applied in complex128, as
sd-scripts does (``torch.polar`` of float64 angles)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LuminaConfig:
    """sd-scripts' ``LuminaParams.get_2b_config()`` (what ``NextDiT_2B_GQA_patch2_Adaln_Refiner`` builds)."""

    patch_size: int = 2
    in_channels: int = 16
    dim: int = 2304
    n_layers: int = 26
    n_refiner_layers: int = 2
    n_heads: int = 24
    n_kv_heads: int = 8
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2304  # Gemma2-2B's hidden size
    axes_dims: tuple[int, ...] = (32, 32, 32)
    axes_lens: tuple[int, ...] = (300, 512, 512)

    @property
    def depth(self) -> int:
        """The main blocks (``layers``): what ``--blocks_to_swap`` swaps."""
        return self.n_layers

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = 4 * self.dim
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


LUMINA_2B = LuminaConfig()
#: Gemma2 2B as ``lumina_util.load_gemma2`` builds it (transformers' Gemma2Config fields; the text encoder)
GEMMA2_2B_CONFIG: dict = {
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


class RMSNorm(nn.Module):
    """sd-scripts' fallback RMSNorm (without apex): computed in float32, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps)
        return ((x * rrms) * self.weight.float()).to(dtype=dtype)


class Checkpointed(nn.Module):
    """sd-scripts' GradientCheckpointMixin: ``_forward`` under non-reentrant checkpointing while training."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def forward(self, *args, **kwargs):
        if self.training and self.gradient_checkpointing:
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
        return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        raise NotImplementedError


class TimestepEmbedder(Checkpointed):
    def __init__(self, hidden: int, frequencies: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.frequencies = frequencies

    def _forward(self, t: Tensor) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        angles = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        first: nn.Linear = self.mlp[0]  # type: ignore[assignment]
        return self.mlp(embedding.to(first.weight.dtype))


def apply_rope(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """x as complex pairs times the (complex128) rotations, back in x's dtype."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


class JointAttention(nn.Module):
    def __init__(self, c: LuminaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.out = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.q_norm: nn.Module = RMSNorm(c.head_dim) if c.qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(c.head_dim) if c.qk_norm else nn.Identity()

    def forward(self, x: Tensor, x_mask: Tensor, freqs_cis: Tensor) -> Tensor:
        b, n, _ = x.shape
        dtype, d = x.dtype, self.head_dim
        q, k, v = torch.split(self.qkv(x), [self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k, v = q.view(b, n, self.heads, d), k.view(b, n, self.kv_heads, d), v.view(b, n, self.kv_heads, d)
        q = apply_rope(self.q_norm(q), freqs_cis).to(dtype)
        k = apply_rope(self.k_norm(k), freqs_cis).to(dtype)
        repeat = self.heads // self.kv_heads
        if repeat > 1:  # grouped-query attention: the key/value heads repeated, as sd-scripts does before SDPA
            k = k.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
            v = v.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
        mask = x_mask.bool().view(b, 1, 1, n).expand(-1, self.heads, n, -1)
        out = F.scaled_dot_product_attention(
            q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=mask, scale=d**-0.5
        )
        return self.out(out.permute(0, 2, 1, 3).to(dtype).flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, c: LuminaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(c.dim, c.ffn_hidden, bias=False)
        self.w2 = nn.Linear(c.ffn_hidden, c.dim, bias=False)
        self.w3 = nn.Linear(c.dim, c.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def modulate(x: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1))


class JointTransformerBlock(Checkpointed):
    def __init__(self, c: LuminaConfig, modulation: bool = True) -> None:
        super().__init__()
        self.attention = JointAttention(c)
        self.feed_forward = FeedForward(c)
        self.attention_norm1 = RMSNorm(c.dim, eps=c.norm_eps)
        self.ffn_norm1 = RMSNorm(c.dim, eps=c.norm_eps)
        self.attention_norm2 = RMSNorm(c.dim, eps=c.norm_eps)
        self.ffn_norm2 = RMSNorm(c.dim, eps=c.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(c.dim, 1024), 4 * c.dim))

    def _forward(self, x: Tensor, x_mask: Tensor, pe: Tensor, adaln_input: Optional[Tensor] = None) -> Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), x_mask, pe))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        assert adaln_input is not None
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
        attended = self.attention(modulate(self.attention_norm1(x), scale_msa), x_mask, pe)
        x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(attended)
        fed = self.feed_forward(modulate(self.ffn_norm1(x), scale_mlp))
        return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(fed)


class FinalLayer(nn.Module):
    """Not checkpointed (sd-scripts' FinalLayer overrides the mixin's forward)."""

    def __init__(self, c: LuminaConfig) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.norm_final = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c.dim, c.patch_size**2 * c.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(c.dim, 1024), c.dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(modulate(self.norm_final(x), self.adaLN_modulation(c)))


class NextDiT(nn.Module):
    """sd-scripts' NextDiT: caption and image refined apart (context / noise refiner), then jointly (``layers``)."""

    def __init__(self, c: LuminaConfig = LUMINA_2B) -> None:
        super().__init__()
        assert c.head_dim == sum(c.axes_dims)
        self.params = c
        self.t_embedder = TimestepEmbedder(min(c.dim, 1024))
        self.cap_embedder = nn.Sequential(RMSNorm(c.cap_feat_dim, eps=c.norm_eps), nn.Linear(c.cap_feat_dim, c.dim))
        self.context_refiner = nn.ModuleList(
            [JointTransformerBlock(c, modulation=False) for _ in range(c.n_refiner_layers)]
        )
        self.x_embedder = nn.Linear(c.patch_size**2 * c.in_channels, c.dim)
        self.noise_refiner = nn.ModuleList([JointTransformerBlock(c) for _ in range(c.n_refiner_layers)])
        self.layers = nn.ModuleList([JointTransformerBlock(c) for _ in range(c.n_layers)])
        self.norm_final = RMSNorm(c.dim, eps=c.norm_eps)  # in sd-scripts' model, unused by its forward
        self.final_layer = FinalLayer(c)

    def enable_gradient_checkpointing(self) -> None:
        """As sd-scripts: the timestep embedder and every transformer block (not the final layer)."""
        for module in [self.t_embedder, *self.layers, *self.context_refiner, *self.noise_refiner]:
            module.gradient_checkpointing = True

    def rope(self, position_ids: Tensor) -> Tensor:
        """sd-scripts' RopeEmbedder: per axis, the float64 angle table's complex rotations gathered by position."""
        c, found = self.params, []
        for i, (dim, length) in enumerate(zip(c.axes_dims, c.axes_lens)):
            pos = torch.arange(length, dtype=torch.float64)
            freqs = torch.outer(pos, 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)))
            table = torch.polar(torch.ones_like(freqs), freqs).to(position_ids.device)
            index = position_ids[:, :, i : i + 1].repeat(1, 1, table.shape[-1]).to(torch.int64)
            found.append(torch.gather(table.unsqueeze(0).repeat(index.shape[0], 1, 1), dim=1, index=index))
        return torch.cat(found, dim=-1)

    def forward(self, x: Tensor, t: Tensor, cap_feats: Tensor, cap_mask: Tensor) -> Tensor:
        c = self.params
        b, channels, height, width = x.shape
        p, device = c.patch_size, x.device
        t = self.t_embedder(t)
        cap_feats = self.cap_embedder(cap_feats)
        cap_len = cap_mask.shape[1]  # every caption token valid (see the module's doc)
        h, w = height // p, width // p
        positions = torch.zeros(b, cap_len + h * w, 3, dtype=torch.int32, device=device)
        positions[:, :cap_len, 0] = torch.arange(cap_len, dtype=torch.int32, device=device)
        positions[:, cap_len:, 0] = cap_len
        positions[:, cap_len:, 1] = torch.arange(h, dtype=torch.int32, device=device).view(-1, 1).repeat(1, w).flatten()
        positions[:, cap_len:, 2] = torch.arange(w, dtype=torch.int32, device=device).view(1, -1).repeat(h, 1).flatten()
        freqs_cis = self.rope(positions)
        cap_freqs = torch.zeros(b, cap_len, freqs_cis.shape[-1], device=device, dtype=freqs_cis.dtype)
        img_freqs = torch.zeros(b, h * w, freqs_cis.shape[-1], device=device, dtype=freqs_cis.dtype)
        cap_freqs[:] = freqs_cis[:, :cap_len]
        img_freqs[:] = freqs_cis[:, cap_len:]
        for layer in self.context_refiner:
            cap_feats = layer(cap_feats, cap_mask, cap_freqs)
        x = x.view(b, channels, h, p, w, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        x_mask = torch.ones(b, h * w, dtype=torch.bool, device=device)
        x = self.x_embedder(x)
        for layer in self.noise_refiner:
            x = layer(x, x_mask, img_freqs, t)
        joint = torch.zeros(b, cap_len + h * w, c.dim, device=device, dtype=x.dtype)
        mask = torch.ones(b, cap_len + h * w, dtype=torch.bool, device=device)
        joint[:, :cap_len] = cap_feats
        joint[:, cap_len:] = x
        x = joint
        for layer in self.layers:
            x = layer(x, mask, freqs_cis, t)
        x = self.final_layer(x, t)
        images = [
            x[i][cap_len:].view(h, w, p, p, c.in_channels).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2)
            for i in range(b)
        ]
        return torch.stack(images, dim=0)


__all__ = ["LuminaConfig", "LUMINA_2B", "GEMMA2_2B_CONFIG", "NextDiT", "JointTransformerBlock", "FinalLayer", "RMSNorm"]
