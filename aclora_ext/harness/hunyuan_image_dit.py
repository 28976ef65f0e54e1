"""HunyuanImage-2.1's diffusion transformer as sd-scripts lays it out
(``library.hunyuan_image_models.HYImageDiffusionTransformer``), in plain torch, from a literal config: for
``aclora vram``'s meta-device count and the tests. Written here from the architecture, not taken from sd-scripts.

The modules carry sd-scripts' class and attribute names (``MMDoubleStreamBlock`` with ``img_mod.linear``,
``img_attn_qkv``, ``img_mlp.fc1``...; ``MMSingleStreamBlock`` with ``linear1``, ``linear2``,
``modulation.linear``; ``byt5_in``, ``img_in``, ``txt_in``, ``time_in``, ``final_layer``), registered in its
order, so that the state dict has its names, shapes and order and the Linears a kohya LoRA targets
(``networks.lora_hunyuan_image``) have its shapes and names. 17 B parameters at full size.

The forward does what sd-scripts' does where memory depends on it: autocast's float32 LayerNorms, the
float32 RMSNorm of q and k and the float32 RoPE (its tables made on the CPU and copied to the device in every
block that uses them), the ``(B, L, H, D)`` layout transposed for ``scaled_dot_product_attention`` and the
copies around it, the ByT5 and Qwen2.5-VL tokens joined valid-first, per-block checkpointing of the double and
single blocks (not of the token refiner) with ``use_reentrant=False``. Every text token is taken as valid (the
count's captions fill their length): the attention then runs unmasked, as sd-scripts' does when all of a
batch's lengths are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .dit import CheckpointedBlock, checkpointed, timestep_embedding


@dataclass(frozen=True)
class HunyuanImageConfig:
    """The literals of sd-scripts' ``HYImageDiffusionTransformer.__init__`` (HunyuanImage-2.1)."""

    hidden_size: int = 3584
    num_heads: int = 28
    depth_double: int = 20
    depth_single: int = 40
    mlp_ratio: int = 4
    in_channels: int = 64  # latent channels (1x1 patches: no packing)
    text_dim: int = 3584  # Qwen2.5-VL's hidden states
    byt5_dim: int = 1472  # the glyph ByT5's width
    byt5_hidden: int = 2048  # the ByT5 mapper's inner widths
    refiner_depth: int = 2
    rope_dims: tuple[int, ...] = (64, 64)  # per image axis; they add up to the head width
    rope_theta: float = 256.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return self.hidden_size * self.mlp_ratio


HUNYUAN_IMAGE_21 = HunyuanImageConfig()
#: hunyuan_image_strategy's lengths: Qwen2.5-VL tokens after the prompt template's 34 are dropped, ByT5 glyph tokens
QWEN_TOKENS, BYT5_TOKENS = 1024, 128


def small(config: HunyuanImageConfig, **changes) -> HunyuanImageConfig:
    return replace(config, **changes)


# --- pieces --------------------------------------------------------------------------------------------------------
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gate(x: Tensor, g: Tensor) -> Tensor:
    return x * g.unsqueeze(1)


def rope_tables(config: HunyuanImageConfig, height: int, width: int) -> tuple[Tensor, Tensor]:
    """cos and sin ``(height*width, head_dim)`` on the CPU, each frequency repeated for its pair of channels."""
    rows, cols = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    cos, sin = [], []
    for positions, dim in zip((rows.reshape(-1), cols.reshape(-1)), config.rope_dims):
        inverse = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        angles = torch.outer(positions, inverse)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def _quarter_turn(x: Tensor) -> Tensor:
    """Each channel pair (a, b) -> (-b, a), in float32."""
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([-b, a], dim=-1).flatten(3)


def rotate(q: Tensor, k: Tensor, tables: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """RoPE on ``(B, L, H, D)`` image queries and keys; the CPU tables are copied to the device on every call."""
    shape = (1, q.shape[1], 1, q.shape[-1])
    cos, sin = (t.view(shape).to(q.device, copy=True) for t in tables)
    return tuple((x.float() * cos + _quarter_turn(x.float()) * sin).to(q.dtype) for x in (q, k))  # type: ignore


def attention(q: Tensor, k: Tensor, v: Tensor, split: bool) -> Tensor:
    """``(B, L, H, D)`` in, ``(B, L, H*D)`` out, every token valid: one ``scaled_dot_product_attention`` over the
    batch (then padded back to the full length, a copy), or with ``split_attn`` one per sample, joined."""
    b, length = q.shape[0], q.shape[1]
    if split:
        parts = []
        for i in range(b):
            qi, ki, vi = (t[i : i + 1].transpose(1, 2) for t in (q, k, v))
            parts.append(F.pad(F.scaled_dot_product_attention(qi, ki, vi), (0, 0, 0, 0)))
        out = torch.cat(parts, dim=0).transpose(1, 2)
        return out.reshape(b, length, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.pad(out.reshape(b, length, -1), (0, 0, 0, 0))


def heads(x: Tensor, count: int) -> Tensor:
    """``(B, L, H*D)`` viewed as ``(B, L, H, D)``."""
    return x.reshape(*x.shape[:2], count, -1)


class RMSNorm(nn.Module):
    """Normalised in float32, returned in the input's dtype, then scaled by ``weight`` in that dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float()
        normed = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x)
        return normed * self.weight.to(normed.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ModulateDiT(nn.Module):
    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, factor * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.act(x))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        first = cast(nn.Linear, self.mlp[0])
        return self.mlp(timestep_embedding(t.float(), 256).type(first.weight.dtype))


# --- the text path: ByT5 mapper, token refiner ------------------------------------------------------------------------
class ByT5Mapper(nn.Module):
    def __init__(self, c: HunyuanImageConfig) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(c.byt5_dim)
        self.fc1 = nn.Linear(c.byt5_dim, c.byt5_hidden)
        self.fc2 = nn.Linear(c.byt5_hidden, c.byt5_hidden)
        self.fc3 = nn.Linear(c.byt5_hidden, c.hidden_size)
        self.act_fn = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act_fn(self.fc2(self.act_fn(self.fc1(self.layernorm(x))))))


class PatchEmbed2D(nn.Module):
    def __init__(self, c: HunyuanImageConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c.in_channels, c.hidden_size, kernel_size=1)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TextProjection(nn.Module):
    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class IndividualTokenRefinerBlock(nn.Module):
    def __init__(self, c: HunyuanImageConfig, split: bool) -> None:
        super().__init__()
        d, self.num_heads, self.split = c.hidden_size, c.num_heads, split
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.self_attn_qkv = nn.Linear(d, 3 * d)
        self.self_attn_q_norm = nn.Identity()
        self.self_attn_k_norm = nn.Identity()
        self.self_attn_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = MLP(d, c.mlp_hidden, nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        qkv = self.self_attn_qkv(self.norm1(x))
        q, k, v = qkv.reshape(*qkv.shape[:2], 3, self.num_heads, -1).permute(2, 0, 1, 3, 4).unbind(0)
        q, k = self.self_attn_q_norm(q).to(v), self.self_attn_k_norm(k).to(v)
        x = x + gate(self.self_attn_proj(attention(q, k, v, self.split)), gate_attn)
        return x + gate(self.mlp(self.norm2(x)), gate_mlp)


class IndividualTokenRefiner(nn.Module):
    def __init__(self, c: HunyuanImageConfig, split: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(IndividualTokenRefinerBlock(c, split) for _ in range(c.refiner_depth))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x


class SingleTokenRefiner(nn.Module):
    """The Qwen2.5-VL states projected and refined, conditioned on the timestep and their mean."""

    def __init__(self, c: HunyuanImageConfig, split: bool) -> None:
        super().__init__()
        self.input_embedder = nn.Linear(c.text_dim, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.c_embedder = TextProjection(c.text_dim, c.hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(c, split)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        timestep = self.t_embedder(t)
        context = torch.stack([x[i].mean(dim=0) for i in range(x.shape[0])], dim=0)  # every token valid
        c = timestep + self.c_embedder(context)
        return self.individual_token_refiner(self.input_embedder(x), c)


# --- the blocks ------------------------------------------------------------------------------------------------------
class MMDoubleStreamBlock(CheckpointedBlock):
    def __init__(self, c: HunyuanImageConfig, split: bool) -> None:
        super().__init__()
        d, self.num_heads, self.split = c.hidden_size, c.num_heads, split
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", ModulateDiT(d, 6))
            self.add_module(f"{stream}_norm1", nn.LayerNorm(d, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{stream}_attn_qkv", nn.Linear(d, 3 * d))
            self.add_module(f"{stream}_attn_q_norm", RMSNorm(c.head_dim))
            self.add_module(f"{stream}_attn_k_norm", RMSNorm(c.head_dim))
            self.add_module(f"{stream}_attn_proj", nn.Linear(d, d))
            self.add_module(f"{stream}_norm2", nn.LayerNorm(d, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{stream}_mlp", MLP(d, c.mlp_hidden, nn.GELU(approximate="tanh")))

    def _qkv(self, stream: str, x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (
            heads(t, self.num_heads)
            for t in self.get_submodule(f"{stream}_attn_qkv")(
                modulate(self.get_submodule(f"{stream}_norm1")(x), shift, scale)
            ).chunk(3, dim=-1)
        )
        q = self.get_submodule(f"{stream}_attn_q_norm")(q).to(v)
        k = self.get_submodule(f"{stream}_attn_k_norm")(k).to(v)
        return q, k, v

    def _rest(self, stream: str, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        x = x + gate(self.get_submodule(f"{stream}_attn_proj")(attn), mods[2])
        mlp = self.get_submodule(f"{stream}_mlp")
        return x + gate(mlp(modulate(self.get_submodule(f"{stream}_norm2")(x), mods[3], mods[4])), mods[5])

    def _forward(self, img: Tensor, txt: Tensor, vec: Tensor, tables: tuple[Tensor, Tensor]):
        img_mods = self.get_submodule("img_mod")(vec).chunk(6, dim=-1)  # shift, scale, gate; shift, scale, gate
        txt_mods = self.get_submodule("txt_mod")(vec).chunk(6, dim=-1)
        img_q, img_k, img_v = self._qkv("img", img, img_mods[0], img_mods[1])
        img_q, img_k = rotate(img_q, img_k, tables)
        txt_q, txt_k, txt_v = self._qkv("txt", txt, txt_mods[0], txt_mods[1])
        n = img.shape[1]
        q, k, v = (torch.cat(pair, dim=1) for pair in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v)))
        del img_q, img_k, img_v, txt_q, txt_k, txt_v
        attn = attention(q, k, v, self.split)
        del q, k, v
        img_attn, txt_attn = attn[:, :n].contiguous(), attn[:, n:].contiguous()
        del attn
        img = self._rest("img", img, img_attn, img_mods)
        return img, self._rest("txt", txt, txt_attn, txt_mods)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, tables: tuple[Tensor, Tensor]):
        return checkpointed(self, self._forward, img, txt, vec, tables)


class MMSingleStreamBlock(CheckpointedBlock):
    def __init__(self, c: HunyuanImageConfig, split: bool) -> None:
        super().__init__()
        d, self.num_heads, self.split, self.mlp_hidden = c.hidden_size, c.num_heads, split, c.mlp_hidden
        self.linear1 = nn.Linear(d, 3 * d + c.mlp_hidden)
        self.linear2 = nn.Linear(d + c.mlp_hidden, d)
        self.q_norm = RMSNorm(c.head_dim)
        self.k_norm = RMSNorm(c.head_dim)
        self.pre_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = ModulateDiT(d, 3)

    def _forward(self, x: Tensor, vec: Tensor, tables: tuple[Tensor, Tensor], image_tokens: int) -> Tensor:
        shift, scale, g = self.modulation(vec).chunk(3, dim=-1)
        d = x.shape[-1]
        q, k, v, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([d, d, d, self.mlp_hidden], -1)
        q, k, v = (heads(t, self.num_heads) for t in (q, k, v))
        q, k = self.q_norm(q).to(v), self.k_norm(k).to(v)
        img_q, img_k = rotate(q[:, :image_tokens], k[:, :image_tokens], tables)
        q = torch.cat([img_q, q[:, image_tokens:]], dim=1)
        k = torch.cat([img_k, k[:, image_tokens:]], dim=1)
        del img_q, img_k
        out = torch.cat([attention(q, k, v, self.split), self.mlp_act(mlp)], dim=2).contiguous()
        del q, k, v, mlp
        return x + gate(self.linear2(out), g)

    def forward(self, x: Tensor, vec: Tensor, tables: tuple[Tensor, Tensor], image_tokens: int) -> Tensor:
        return checkpointed(self, self._forward, x, vec, tables, image_tokens)


class FinalLayer(nn.Module):
    def __init__(self, c: HunyuanImageConfig) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(c.hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c.hidden_size, c.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 2 * c.hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class HYImageDiffusionTransformer(nn.Module):
    """HunyuanImage-2.1's DiT; ``forward`` takes what hunyuan_image_train_network.py passes (latents
    ``(B, 64, H/32, W/32)``, integer timesteps, Qwen2.5-VL states and mask, ByT5 states and mask) and returns the
    prediction in the latents' shape. ``split_attn``: sd-scripts' ``--split_attn`` (attention per sample)."""

    def __init__(self, config: HunyuanImageConfig = HUNYUAN_IMAGE_21, split_attn: bool = False) -> None:
        super().__init__()
        c = self.params = config
        if sum(c.rope_dims) != c.head_dim:
            raise ValueError(f"rope_dims {c.rope_dims} must add up to the head width {c.head_dim}")
        self.byt5_in = ByT5Mapper(c)
        self.img_in = PatchEmbed2D(c)
        self.txt_in = SingleTokenRefiner(c, split_attn)
        self.time_in = TimestepEmbedder(c.hidden_size)
        self.double_blocks = nn.ModuleList(MMDoubleStreamBlock(c, split_attn) for _ in range(c.depth_double))
        self.single_blocks = nn.ModuleList(MMSingleStreamBlock(c, split_attn) for _ in range(c.depth_single))
        self.final_layer = FinalLayer(c)

    def enable_gradient_checkpointing(self) -> None:
        """As sd-scripts: every double and single block (the token refiner is not checkpointed)."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.gradient_checkpointing = True

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        text_states: Tensor,
        encoder_attention_mask: Optional[Tensor] = None,
        byt5_text_states: Optional[Tensor] = None,
        byt5_text_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """The masks are taken as all ones (every token valid), as the count's captions are."""
        if byt5_text_states is None:
            raise ValueError("byt5_text_states is needed: hunyuan_image_train_network.py always passes them")
        b, _, h, w = hidden_states.shape
        tables = rope_tables(self.params, h, w)
        img = self.img_in(hidden_states)
        vec = self.time_in(timestep)
        txt = self.txt_in(text_states, timestep)
        glyphs = self.byt5_in(byt5_text_states)
        txt = torch.stack([torch.cat([glyphs[i], txt[i]], dim=0) for i in range(b)])  # valid tokens first: ByT5's
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, tables)
        n = img.shape[1]
        x = torch.cat((img, txt), 1)
        for block in self.single_blocks:
            x = block(x, vec, tables, n)
        out = self.final_layer(x[:, :n], vec)
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)


__all__ = ["HunyuanImageConfig", "HUNYUAN_IMAGE_21", "HYImageDiffusionTransformer", "QWEN_TOKENS", "BYT5_TOKENS"]
