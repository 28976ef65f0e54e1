"""FLUX.1's transformer as sd-scripts lays it out (``library.flux_models.Flux``): class and attribute names,
fused qkv / linear1 / linear2, the float32 RMSNorm and RoPE, per-block checkpointing; written here from the
architecture (see ``harness.dit``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .dit import FLUX_DEV, CheckpointedBlock, FluxConfig, checkpointed, heads_first, timestep_embedding


class RMSNorm(nn.Module):
    """FLUX's RMSNorm: normalised in float32, scaled by ``scale`` in float32, returned in the input's dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float()
        return (wide * torch.rsqrt(torch.mean(wide**2, dim=-1, keepdim=True) + 1e-6) * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = heads_first(self.qkv(x), self.num_heads, 3)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.count = 6 if double else 3
        self.lin = nn.Linear(dim, self.count * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        """(shift, scale, gate) once or twice, each ``(B, 1, dim)``."""
        return self.lin(F.silu(vec))[:, None, :].chunk(self.count, dim=-1)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices ``(B, L, dim/2, 2, 2)`` in float32 (computed in float64)."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(*angles.shape, 2, 2).float()


def rope_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, mask: Optional[Tensor]) -> Tensor:
    """RoPE on q and k (in float32, back to their dtype), scaled dot-product attention, heads merged."""

    def rotate(x: Tensor) -> Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)

    out = F.scaled_dot_product_attention(rotate(q), rotate(k), v, attn_mask=mask)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _joint_mask(text_mask: Optional[Tensor], image_tokens: int, heads: int, queries: int) -> Optional[Tensor]:
    if text_mask is None:
        return None
    keep = torch.cat(
        [text_mask.to(torch.bool), text_mask.new_ones(text_mask.shape[0], image_tokens, dtype=torch.bool)], dim=1
    )
    return keep[:, None, None, :].expand(-1, heads, queries, -1)


class DoubleStreamBlock(CheckpointedBlock):
    def __init__(self, c: FluxConfig) -> None:
        super().__init__()
        h = c.hidden_size
        self.num_heads = c.num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(h, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(h, c.num_heads, c.qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6))
            setattr(
                self,
                f"{stream}_mlp",
                nn.Sequential(nn.Linear(h, c.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(c.mlp_hidden, h)),
            )
        self.gradient_checkpointing = False

    def _forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Optional[Tensor]):
        streams = {}
        for name, x in (("img", img), ("txt", txt)):
            shift1, scale1, gate1, shift2, scale2, gate2 = getattr(self, f"{name}_mod")(vec)
            modulated = (1 + scale1) * getattr(self, f"{name}_norm1")(x) + shift1
            streams[name] = (getattr(self, f"{name}_attn").heads(modulated), (gate1, shift2, scale2, gate2))
        (tq, tk, tv), (iq, ik, iv) = streams["txt"][0], streams["img"][0]
        q, k, v = torch.cat((tq, iq), dim=2), torch.cat((tk, ik), dim=2), torch.cat((tv, iv), dim=2)
        attn = rope_attention(q, k, v, pe, _joint_mask(mask, img.shape[1], self.num_heads, q.shape[2]))
        out = {"txt": (txt, attn[:, : txt.shape[1]]), "img": (img, attn[:, txt.shape[1] :])}
        for name in ("img", "txt"):
            x, a = out[name]
            gate1, shift2, scale2, gate2 = streams[name][1]
            x = x + gate1 * getattr(self, f"{name}_attn").proj(a)
            x = x + gate2 * getattr(self, f"{name}_mlp")((1 + scale2) * getattr(self, f"{name}_norm2")(x) + shift2)
            out[name] = x
        return out["img"], out["txt"]

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Optional[Tensor] = None):
        return checkpointed(self, self._forward, img, txt, vec, pe, mask)


class SingleStreamBlock(CheckpointedBlock):
    def __init__(self, c: FluxConfig) -> None:
        super().__init__()
        h = c.hidden_size
        self.hidden_size, self.mlp_hidden, self.num_heads = h, c.mlp_hidden, c.num_heads
        self.linear1 = nn.Linear(h, 3 * h + c.mlp_hidden)  # qkv and the MLP's input, fused
        self.linear2 = nn.Linear(h + c.mlp_hidden, h)  # attention projection and the MLP's output, fused
        self.norm = QKNorm(h // c.num_heads)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(h, double=False)
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Optional[Tensor]) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1((1 + scale) * self.pre_norm(x) + shift), [3 * self.hidden_size, self.mlp_hidden], dim=-1
        )
        q, k, v = heads_first(qkv, self.num_heads, 3)
        q, k = self.norm(q, k, v)
        text = 0 if mask is None else mask.shape[1]
        attn = rope_attention(q, k, v, pe, _joint_mask(mask, x.shape[1] - text, self.num_heads, q.shape[2]))
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return checkpointed(self, self._forward, x, vec, pe, mask)


class MLPEmbedder(CheckpointedBlock):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer, self.silu, self.out_layer = nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))

    def forward(self, x: Tensor) -> Tensor:
        return checkpointed(self, self._forward, x)


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class Flux(nn.Module):
    """The FLUX.1 transformer; ``forward`` takes sd-scripts' keywords (img, img_ids, txt, txt_ids, timesteps,
    y, guidance, txt_attention_mask) and returns the packed prediction ``(B, L_img, in_channels)``."""

    def __init__(self, config: FluxConfig = FLUX_DEV) -> None:
        super().__init__()
        c = self.params = config
        if sum(c.axes_dim) != c.hidden_size // c.num_heads:
            raise ValueError(f"axes_dim {c.axes_dim} must add up to the head size {c.hidden_size // c.num_heads}")
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.in_channels)

    def enable_gradient_checkpointing(self) -> None:
        """As sd-scripts: every block and the time/vector/guidance embedders."""
        for m in self.modules():
            if isinstance(m, CheckpointedBlock):
                m.gradient_checkpointing = True

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Optional[Tensor] = None,
        txt_attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        c = self.params
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256, time_factor=1000.0))
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 model embeds the guidance scale: pass guidance (a tensor per sample)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256, time_factor=1000.0))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = torch.cat([rope(ids[..., i], d, c.theta) for i, d in enumerate(c.axes_dim)], dim=-3).unsqueeze(1)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, txt_attention_mask)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe, txt_attention_mask)
        return self.final_layer(x[:, txt.shape[1] :, ...], vec)


__all__ = ["Flux", "DoubleStreamBlock", "SingleStreamBlock", "RMSNorm", "rope", "rope_attention"]
