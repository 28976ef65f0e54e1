"""SD3/SD3.5's MMDiT as sd-scripts lays it out (``library.sd3_models.MMDiT``): joint blocks of a context and an
x ``SingleDiTBlock``, the pre-only last context block, SD3.5 medium's x-block self-attention (``attn2``), the
q/k RMSNorms of SD3.5; written here from the architecture (see ``harness.dit``)."""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .dit import SD35_MEDIUM, CheckpointedBlock, SD3Config, checkpointed, timestep_embedding

QKV = tuple[Tensor, Tensor, Tensor]


class SD3RMSNorm(nn.Module):
    """SD3's q/k RMSNorm (learned ``weight``), computed in the dtypes autocast gives its operators."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.weight.to(device=x.device, dtype=x.dtype)


class AttentionLinears(nn.Module):
    def __init__(self, dim: int, num_heads: int, pre_only: bool, qk_norm: Optional[str]) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        self.ln_q = SD3RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()
        self.ln_k = SD3RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k as ``(B, L, dim)``, v as ``(B, L, H, D)``."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, -1, self.head_dim).chunk(3, dim=2)
        return self.ln_q(q).reshape(b, n, -1), self.ln_k(k).reshape(b, n, -1), v


def sd3_attention(q: Tensor, k: Tensor, v: Tensor, head_dim: int) -> Tensor:
    """sd-scripts' "torch" mode: heads first, scaled dot-product attention, heads merged."""
    b, n = q.shape[:2]
    q, k, v = (t.reshape(b, n, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k.to(q), v.to(q))
    return out.transpose(1, 2).reshape(b, n, -1)


class _Mlp(nn.Module):
    """``mlp.fc1``, ``mlp.act``, ``mlp.fc2``, as sd-scripts names them."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)


# the containers below hold submodules under sd-scripts' names (x_embedder.proj, t_embedder.mlp, final_layer.*)
class _PatchEmbed(nn.Module):
    def __init__(self, proj: nn.Conv2d) -> None:
        super().__init__()
        self.proj = proj


class _Embedder(nn.Module):
    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.mlp = mlp


class _FinalLayer(nn.Module):
    def __init__(self, h: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(h, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))


class SingleDiTBlock(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        mlp_ratio: float,
        pre_only: bool,
        qk_norm: Optional[str],
        x_block_self_attn: bool,
    ) -> None:
        super().__init__()
        self.pre_only, self.x_block_self_attn = pre_only, x_block_self_attn
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = AttentionLinears(hidden, num_heads, pre_only, qk_norm)
        if x_block_self_attn:
            self.attn2 = AttentionLinears(hidden, num_heads, False, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            inner = int(hidden * mlp_ratio)
            self.mlp = _Mlp(hidden, inner)
        mods = 9 if x_block_self_attn else (2 if pre_only else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, mods * hidden))

    def _mlp(self, x: Tensor) -> Tensor:
        return self.mlp.fc2(self.mlp.act(self.mlp.fc1(x)))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[QKV, Optional[QKV], tuple[Tensor, tuple[Tensor, ...]]]:
        """(q, k, v), (q2, k2, v2) or None, and what the second half needs."""
        mods = self.adaLN_modulation(c).chunk(9 if self.x_block_self_attn else (2 if self.pre_only else 6), dim=-1)
        normed = self.norm1(x)
        qkv = self.attn.pre_attention(normed * (1 + mods[1].unsqueeze(1)) + mods[0].unsqueeze(1))
        qkv2: Optional[QKV] = None
        if self.x_block_self_attn:
            qkv2 = self.attn2.pre_attention(normed * (1 + mods[7].unsqueeze(1)) + mods[6].unsqueeze(1))
        return qkv, qkv2, (x, mods)

    def post_attention(self, attn: Tensor, attn2: Optional[Tensor], x: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        if attn2 is not None:
            x = x + mods[8].unsqueeze(1) * self.attn2.proj(attn2)
        modulated = self.norm2(x) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        return x + gate_mlp.unsqueeze(1) * self._mlp(modulated)


class MMDiTBlock(CheckpointedBlock):
    def __init__(self, c: SD3Config, index: int) -> None:
        super().__init__()
        last = index == c.depth - 1
        self.context_block = SingleDiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, last, c.qk_norm, False)
        self.x_block = SingleDiTBlock(
            c.hidden_size, c.num_heads, c.mlp_ratio, False, c.qk_norm, index in c.x_block_self_attn_layers
        )
        self.head_dim = c.hidden_size // c.num_heads
        self.gradient_checkpointing = False

    def _forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Optional[Tensor], Tensor]:
        ctx_qkv, _, ctx_rest = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_rest = self.x_block.pre_attention(x, c)
        n = ctx_qkv[0].shape[1]
        q, k, v = (torch.cat((a, b), dim=1) for a, b in zip(ctx_qkv, x_qkv))
        attn = sd3_attention(q, k, v, self.head_dim)
        # sd-scripts passes attn2's head count where the head size goes (sd3_models.py:721): at SD3.5 medium
        # its self-attention runs 64 heads of 24, not 24 of 64; reproduced as it runs
        attn2 = sd3_attention(*x_qkv2, self.x_block.attn2.num_heads) if x_qkv2 is not None else None
        x = self.x_block.post_attention(attn[:, n:], attn2, *x_rest)
        new_context = (
            None if self.context_block.pre_only else self.context_block.post_attention(attn[:, :n], None, *ctx_rest)
        )
        return new_context, x

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Optional[Tensor], Tensor]:
        return checkpointed(self, self._forward, context, x, c)


class MMDiT(nn.Module):
    """The SD3/SD3.5 transformer; ``forward(x, t, y, context)`` as sd-scripts calls it, latents in and out."""

    pos_embed: Tensor  # a buffer

    def __init__(self, config: SD3Config = SD35_MEDIUM) -> None:
        super().__init__()
        c = self.params = config
        h = c.hidden_size
        self.x_embedder = _PatchEmbed(nn.Conv2d(c.in_channels, h, c.patch_size, c.patch_size))
        self.t_embedder = _Embedder(nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h)))
        self.y_embedder = _Embedder(nn.Sequential(nn.Linear(c.adm_in_channels, h), nn.SiLU(), nn.Linear(h, h)))
        self.context_embedder = nn.Linear(c.context_in_features, h)
        self.register_buffer("pos_embed", torch.zeros(1, c.pos_embed_max_size**2, h))
        self.joint_blocks = nn.ModuleList(MMDiTBlock(c, i) for i in range(c.depth))
        self.final_layer = _FinalLayer(h, c.patch_size**2 * c.in_channels)

    @property
    def model_type(self) -> str:
        return self.params.model_type

    def enable_gradient_checkpointing(self) -> None:
        """As sd-scripts: every joint block."""
        for block in self.joint_blocks:
            cast(MMDiTBlock, block).gradient_checkpointing = True

    def _pos_embed(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        c = self.params
        size, p = c.pos_embed_max_size, c.patch_size
        h, w = (h + 1) // p, (w + 1) // p
        if h > size or w > size:
            raise ValueError(f"a {h * p}x{w * p} latent needs more than the model's {size}x{size} positions")
        top, left = (size - h) // 2, (size - w) // 2
        grid = self.pos_embed.reshape(1, size, size, -1)[:, top : top + h, left : left + w, :]
        return grid.reshape(1, h * w, -1).to(dtype=dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor) -> Tensor:
        c = self.params
        b, _, height, width = x.shape
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self._pos_embed(height, width, x.dtype)
        cond = self.t_embedder.mlp(timestep_embedding(t, 256).to(x.dtype)) + self.y_embedder.mlp(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, x = block(context, x, cond)
        final = self.final_layer
        shift, scale = final.adaLN_modulation(cond).chunk(2, dim=-1)
        x = final.linear(final.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        p, gh, gw = c.patch_size, height // c.patch_size, width // c.patch_size
        x = x.view(b, gh, gw, p, p, c.in_channels).permute(0, 5, 1, 3, 2, 4).contiguous()
        return x.view(b, c.in_channels, gh * p, gw * p)


__all__ = ["MMDiT", "MMDiTBlock", "SingleDiTBlock", "AttentionLinears", "sd3_attention"]
