"""Anima's DiT as sd-scripts lays it out (``library.anima_models.Anima``, trained by ``anima_train_network.py``): a
Cosmos-Predict2 DiT of AdaLN-LoRA modulated blocks (self-attention with 3-D RoPE, cross-attention to the text,
a GELU MLP) and the LLM adapter that turns the Qwen3 embeddings into the cross-attention context, attending from
T5 token embeddings. In plain torch, from the literal config sd-scripts' ``anima_utils.load_anima_model``
hard-codes, with sd-scripts' class and attribute names (so that the Linears ``networks.lora_anima`` adapts have
its names and shapes: ``blocks.0.self_attn.q_proj``), written here from the architecture, not taken from
sd-scripts. The forwards make the tensors sd-scripts' make where memory depends on it: the float32 RMSNorm, the
autocast float32 LayerNorm, the ``(B, H, L, D)`` attention layout and its copy back, the per-block
``torch.utils.checkpoint`` (``use_reentrant=False``); sd-scripts' "torch" attention mode (SDPA) only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Optional, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .dit import CheckpointedBlock, checkpointed


@dataclass(frozen=True)
class AnimaConfig:
    """The DiT config load_anima_model fixes, and the LLM adapter's (fixed inside sd-scripts' Anima)."""

    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024
    in_channels: int = 16  # latent channels (+1 for the padding mask)
    out_channels: int = 16
    patch_spatial: int = 2
    adaln_lora_dim: int = 256
    max_img: int = 512  # max_img_h = max_img_w, in pixels of the latent grid before patching
    max_frames: int = 128
    rope_extrapolation: tuple[float, float, float] = (4.0, 4.0, 1.0)  # h, w, t
    # the LLM adapter
    adapter_source_dim: int = 1024  # Qwen3's hidden size
    adapter_dim: int = 1024  # its model and target widths (equal: no in_proj)
    adapter_layers: int = 6
    adapter_heads: int = 16
    adapter_vocab: int = 32128  # T5's vocabulary

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads


ANIMA = AnimaConfig()
#: Qwen3-0.6B as sd-scripts loads it (its configs/qwen3_06b/config.json; transformers' Qwen3Config keys)
QWEN3_06B_CONFIG: dict = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "use_cache": False,
}
ANIMA_LATENT_CHANNELS = 16
#: pixels per latent token: the VAE's 8x and the 2x2 patches
ANIMA_PIXELS_PER_TOKEN = 16


def small(config: AnimaConfig, **changes) -> AnimaConfig:
    return replace(config, **changes)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(..., enabled=False)`` for ``device``; the meta device's stand-in autocast follows the CPU's."""
    return torch.autocast("cpu" if device.type == "meta" else device.type, enabled=False)


class RMSNorm(nn.Module):
    """The DiT's RMSNorm: normalised in float32, back to the input's dtype, then scaled by ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float()
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class AdapterRMSNorm(RMSNorm):
    """The LLM adapter's RMSNorm: the variance in float32, the input scaled in its own dtype (in the weight's when
    that is half)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope(t: Tensor, angles: Tensor) -> Tensor:
    """RoPE on ``t`` (B, L, H, D) by ``angles`` (1, L, 1, D): cos and sin in t's dtype, the result concatenated
    with t's (empty) unrotated rest, as a new tensor."""
    cos, sin = torch.cos(angles).to(t.dtype), torch.sin(angles).to(t.dtype)
    return torch.cat(((t * cos) + (_rotate_half(t) * sin), t[..., angles.shape[-1] :]), dim=-1)


class Attention(nn.Module):
    """Self- (``context_dim`` None, with RoPE) or cross-attention with RMS-normed q and k, no biases."""

    def __init__(self, dim: int, context_dim: Optional[int], heads: int, head_dim: int) -> None:
        super().__init__()
        self.is_selfattn = context_dim is None
        context_dim = dim if context_dim is None else context_dim
        self.n_heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_proj = nn.Linear(context_dim, heads * head_dim, bias=False)
        self.k_norm = RMSNorm(head_dim)
        self.v_proj = nn.Linear(context_dim, heads * head_dim, bias=False)
        self.output_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, context: Optional[Tensor], rope: Optional[Tensor]) -> Tensor:
        context = x if context is None else context

        def split(t: Tensor) -> Tensor:  # (B, L, H*D) viewed as (B, L, H, D)
            return t.view(*t.shape[:-1], self.n_heads, self.head_dim)

        q, k, v = (
            self.q_norm(split(self.q_proj(x))),
            self.k_norm(split(self.k_proj(context))),
            split(self.v_proj(context)),
        )
        if self.is_selfattn and rope is not None:
            q, k = _rope(q, rope), _rope(k, rope)
        if q.dtype != v.dtype and torch.is_autocast_enabled("cpu" if v.device.type == "meta" else v.device.type):
            q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return self.output_proj(out.reshape(out.shape[0], out.shape[1], -1))


class GPT2FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.activation = nn.GELU()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def _modulation(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    """AdaLN-LoRA: SiLU, a down and an up Linear to ``chunks`` vectors of ``dim``."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * dim, bias=False))


class Block(CheckpointedBlock):
    """Self-attention, cross-attention, MLP; each ``x + gate * f(norm(x) * (1 + scale) + shift)``."""

    def __init__(self, c: AnimaConfig) -> None:
        super().__init__()
        d = c.model_channels
        self.layer_norm_self_attn = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(d, None, c.num_heads, c.head_dim)
        self.layer_norm_cross_attn = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(d, c.crossattn_emb_channels, c.num_heads, c.head_dim)
        self.layer_norm_mlp = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(d, int(d * c.mlp_ratio))
        self.adaln_modulation_self_attn = _modulation(d, c.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _modulation(d, c.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _modulation(d, c.adaln_lora_dim, 3)
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor, emb: Tensor, context: Tensor, rope: Tensor, adaln_lora: Tensor) -> Tensor:
        """``x``: (B, T, H, W, D); ``emb``: (B, T, D); ``adaln_lora``: (B, T, 3D)."""
        mods = [
            [m.view(*m.shape[:2], 1, 1, m.shape[-1]) for m in (modulation(emb) + adaln_lora).chunk(3, dim=-1)]
            for modulation in (
                self.adaln_modulation_self_attn,
                self.adaln_modulation_cross_attn,
                self.adaln_modulation_mlp,
            )
        ]
        b, t, h, w, d = x.shape
        (shift, scale, gate), (shift_c, scale_c, gate_c), (shift_m, scale_m, gate_m) = mods
        normed = self.layer_norm_self_attn(x) * (1 + scale) + shift
        out = self.self_attn(normed.reshape(b, t * h * w, d), None, rope)
        x = x + gate * out.view(b, t, h, w, d)
        normed = self.layer_norm_cross_attn(x) * (1 + scale_c) + shift_c
        out = self.cross_attn(normed.reshape(b, t * h * w, d), context, rope)
        x = out.view(b, t, h, w, d) * gate_c + x
        normed = self.layer_norm_mlp(x) * (1 + scale_m) + shift_m
        return x + gate_m * self.mlp(normed)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, rope: Tensor, adaln_lora: Tensor) -> Tensor:
        return checkpointed(self, self._forward, x, emb, context, rope, adaln_lora)


class _Patchify(nn.Module):
    """(B, C, T, H, W) to (B, T, H/p, W/p, C*p*p), channels outermost in each patch (no parameters)."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, t, 1, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, t, h // p, w // p, c * p * p)


class PatchEmbed(nn.Module):
    def __init__(self, p: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(_Patchify(p), nn.Linear(in_channels * p * p, out_channels, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class VideoRopePosition3DEmb(nn.Module):
    """3-D RoPE angles: a third of each head's pairs for height, a third for width, the rest for time."""

    def __init__(self, c: AnimaConfig) -> None:
        super().__init__()
        dim = c.head_dim
        self.dim_h = dim // 6 * 2
        self.dim_t = dim - 2 * self.dim_h
        tokens = c.max_img // c.patch_spatial
        self.max_hw = tokens
        self.seq: Tensor
        self.dim_spatial_range: Tensor
        self.dim_temporal_range: Tensor
        self.register_buffer("seq", torch.arange(max(tokens, c.max_frames), dtype=torch.float))
        self.register_buffer(
            "dim_spatial_range", torch.arange(0, self.dim_h, 2)[: self.dim_h // 2].float() / self.dim_h
        )
        self.register_buffer(
            "dim_temporal_range", torch.arange(0, self.dim_t, 2)[: self.dim_t // 2].float() / self.dim_t
        )
        h_ratio, w_ratio, t_ratio = c.rope_extrapolation
        self.ntk = (
            h_ratio ** (self.dim_h / (self.dim_h - 2)),
            w_ratio ** (self.dim_h / (self.dim_h - 2)),
            t_ratio ** (self.dim_t / (self.dim_t - 2)),
        )

    def forward(self, t: int, h: int, w: int) -> Tensor:
        """(1, T*H*W, 1, D) angles in float32 (the (L, 1, 1, D) table, transposed as the bshd layout reads it)."""
        if h > self.max_hw or w > self.max_hw:
            raise ValueError(f"{h}x{w} latent tokens exceed the DiT's {self.max_hw}x{self.max_hw}")
        seq: Tensor = self.seq
        hf = 1.0 / ((10000.0 * self.ntk[0]) ** self.dim_spatial_range)
        wf = 1.0 / ((10000.0 * self.ntk[1]) ** self.dim_spatial_range)
        tf = 1.0 / ((10000.0 * self.ntk[2]) ** self.dim_temporal_range)
        eh, ew, et = torch.outer(seq[:h], hf), torch.outer(seq[:w], wf), torch.outer(seq[:t], tf)
        parts = [
            et[:, None, None, :].expand(t, h, w, -1),
            eh[None, :, None, :].expand(t, h, w, -1),
            ew[None, None, :, :].expand(t, h, w, -1),
        ]
        table = torch.cat(parts * 2, dim=-1).reshape(t * h * w, 1, 1, -1).float()
        return table.transpose(0, 1)


class TimestepEmbedding(nn.Module):
    """With AdaLN-LoRA: returns the sinusoidal features unchanged and the (B, T, 3D) AdaLN-LoRA vectors."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sample: Tensor) -> tuple[Tensor, Tensor]:
        return sample, self.linear_2(self.activation(self.linear_1(sample)))


class Timesteps(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        """(B, T) timesteps to (B, T, dim) [cos, sin] features, computed in float32, returned in t's dtype."""
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.flatten().float()[:, None] * freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(t.dtype).view(*t.shape, self.dim)


class FinalLayer(nn.Module):
    def __init__(self, c: AnimaConfig) -> None:
        super().__init__()
        d = c.model_channels
        self.layer_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, c.patch_spatial**2 * c.out_channels, bias=False)
        self.adaln_modulation = _modulation(d, c.adaln_lora_dim, 2)
        self.d = d

    def forward(self, x: Tensor, emb: Tensor, adaln_lora: Tensor) -> Tensor:
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[:, :, : 2 * self.d]).chunk(2, dim=-1)
        shift, scale = (m.view(*m.shape[:2], 1, 1, m.shape[-1]) for m in (shift, scale))
        return self.linear(self.layer_norm(x) * (1 + scale) + shift)


# --- the LLM adapter -------------------------------------------------------------------------------------------
class AdapterRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.inv_freq: Tensor
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor, length: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(length, device=x.device).unsqueeze(0)
        with no_autocast(x.device):
            freqs = (self.inv_freq[None, :, None].float() @ positions[:, None, :].float()).transpose(1, 2)
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos(), angles.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


class LLMAdapterAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = AdapterRMSNorm(self.head_dim)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.k_norm = AdapterRMSNorm(self.head_dim)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mask: Optional[Tensor], context: Optional[Tensor], pe_q: tuple, pe_k: tuple) -> Tensor:
        context = x if context is None else context

        def heads(t: Tensor) -> Tensor:
            return t.view(*t.shape[:-1], self.n_heads, self.head_dim)

        q = self.q_norm(heads(self.q_proj(x))).transpose(1, 2)
        k = self.k_norm(heads(self.k_proj(context))).transpose(1, 2)
        v = heads(self.v_proj(context)).transpose(1, 2)
        q = q * pe_q[0].unsqueeze(1) + _rotate_half(q) * pe_q[1].unsqueeze(1)
        k = k * pe_k[0].unsqueeze(1) + _rotate_half(k) * pe_k[1].unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1).contiguous())


class LLMAdapterTransformerBlock(nn.Module):
    def __init__(self, source_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_self_attn = AdapterRMSNorm(dim)
        self.self_attn = LLMAdapterAttention(dim, dim, heads)
        self.norm_cross_attn = AdapterRMSNorm(dim)
        self.cross_attn = LLMAdapterAttention(dim, source_dim, heads)
        self.norm_mlp = AdapterRMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor, masks: tuple, pe: tuple, pe_context: tuple) -> Tensor:
        target_mask, source_mask = masks
        x = x + self.self_attn(self.norm_self_attn(x), target_mask, None, pe, pe)
        x = x + self.cross_attn(self.norm_cross_attn(x), source_mask, context, pe, pe_context)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """Qwen3 hidden states to the DiT's cross-attention context, from T5 token ids."""

    def __init__(self, c: AnimaConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.adapter_vocab, c.adapter_dim)
        self.rotary_emb = AdapterRotaryEmbedding(c.adapter_dim // c.adapter_heads)
        self.blocks = nn.ModuleList(
            LLMAdapterTransformerBlock(c.adapter_source_dim, c.adapter_dim, c.adapter_heads)
            for _ in range(c.adapter_layers)
        )
        self.out_proj = nn.Linear(c.adapter_dim, c.adapter_dim)
        self.norm = AdapterRMSNorm(c.adapter_dim)

    def forward(self, source: Tensor, target_ids: Tensor, target_mask: Tensor, source_mask: Tensor) -> Tensor:
        masks = tuple(m.to(torch.bool)[:, None, None, :] for m in (target_mask, source_mask))
        x = self.embed(target_ids)
        pe, pe_context = self.rotary_emb(x, x.shape[1]), self.rotary_emb(x, source.shape[1])
        for block in self.blocks:
            x = block(x, source, masks, pe, pe_context)
        return self.norm(self.out_proj(x))


# --- the DiT ---------------------------------------------------------------------------------------------------
class Anima(nn.Module):
    """The Anima DiT; ``forward`` takes anima_train_network.py's call: 5-D latents ``(B, C, 1, H, W)``, timesteps in
    [0, 1], the Qwen3 embeddings, the padding mask and the LLM adapter's inputs; returns ``(B, C, 1, H, W)``."""

    LATENT_CHANNELS = ANIMA_LATENT_CHANNELS

    def __init__(self, config: AnimaConfig = ANIMA) -> None:
        super().__init__()
        c = self.params = config
        self.x_embedder = PatchEmbed(c.patch_spatial, c.in_channels + 1, c.model_channels)  # + the padding mask
        self.pos_embedder = VideoRopePosition3DEmb(c)
        self.t_embedder = nn.Sequential(Timesteps(c.model_channels), TimestepEmbedding(c.model_channels))
        self.llm_adapter = LLMAdapter(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_blocks))
        self.final_layer = FinalLayer(c)
        self.t_embedding_norm = RMSNorm(c.model_channels)

    def enable_gradient_checkpointing(self) -> None:
        """As sd-scripts: every DiT block (not the LLM adapter)."""
        for block in self.blocks:
            cast(Block, block).gradient_checkpointing = True

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        padding_mask: Optional[Tensor] = None,
        target_input_ids: Optional[Tensor] = None,
        target_attention_mask: Optional[Tensor] = None,
        source_attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        c = self.params
        if target_input_ids is not None:
            if target_attention_mask is None or source_attention_mask is None:
                raise ValueError("the LLM adapter needs target_attention_mask and source_attention_mask")
            context = self.llm_adapter(context, target_input_ids, target_attention_mask, source_attention_mask)
            context[~target_attention_mask.bool()] = 0  # the padding tokens' context
        b, _, t, h, w = x.shape
        if padding_mask is None:
            padding_mask = torch.zeros((b, 1, h, w), dtype=x.dtype, device=x.device)
        if tuple(padding_mask.shape[-2:]) != (h, w):  # sd-scripts resizes it (nearest); the trainer's has the size
            raise ValueError(f"padding_mask of {tuple(padding_mask.shape)} for latents of {h}x{w}")
        x = torch.cat([x, padding_mask.unsqueeze(1).repeat(1, 1, t, 1, 1)], dim=1)
        x = self.x_embedder(x)  # (B, T, H/p, W/p, D)
        rope = self.pos_embedder(*x.shape[1:4])
        if timesteps.ndim == 1:
            timesteps = timesteps.unsqueeze(1)
        emb, adaln_lora = self.t_embedder(timesteps)
        emb = self.t_embedding_norm(emb)
        for block in self.blocks:
            x = block(x, emb, context, rope, adaln_lora)
        x = self.final_layer(x, emb, adaln_lora)  # (B, T, H/p, W/p, p*p*C)
        p, bt, th, tw = c.patch_spatial, *x.shape[1:4]
        x = x.reshape(b, bt, th, tw, p, p, 1, c.out_channels).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, c.out_channels, bt, th * p, tw * p)


__all__ = ["Anima", "AnimaConfig", "ANIMA", "QWEN3_06B_CONFIG", "ANIMA_LATENT_CHANNELS", "small", "Block"]
