"""Chroma's transformer as sd-scripts lays it out (``library.chroma_models.Chroma``, trained by
``flux_train_network.py --model_type chroma``): FLUX.1's double and single blocks without their modulation
Linears, the joint sequence image first, text second, and each sample's attention run on its own (what
sd-scripts copies into zeroed buffers copied so here too); one approximator MLP (``distilled_guidance_layer``)
makes every block's shift/scale/gate vectors. Written here from the architecture (see ``harness.dit``).

sd-scripts trims the text to the longest caption in the batch plus one padding token (``txt_attention_mask``
summed, a host read); a meta-device count cannot read a mask, so this build always keeps the whole T5 sequence
(``t5xxl_max_token_length`` tokens): the most sd-scripts keeps, the case of a caption that fills it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .dit import CHROMA, CheckpointedBlock, ChromaConfig, checkpointed, heads_first, timestep_embedding
from .flux_dit import MLPEmbedder, QKNorm, RMSNorm, SelfAttention, rope, rope_attention

#: one block's modulation: (shift, scale, gate), each ``(B, 1, hidden)``; a double block has two per stream
Mod = tuple[Tensor, Tensor, Tensor]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


def _per_sample_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, split: int) -> tuple[Tensor, Tensor]:
    """sd-scripts' loop over the batch: one sample's attention at a time; its first ``split`` tokens kept as a view
    (a double block's image tokens), the rest copied into a zeroed buffer of the text's length (the whole sequence
    in a single block); each part concatenated over the batch."""
    heads, tails = [], []
    for i in range(q.shape[0]):
        one = rope_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], pe[i : i + 1], None)
        tail = torch.zeros((1, one.shape[1] - split, one.shape[-1]), dtype=one.dtype, device=one.device)
        tail[:] = one[:, split:]
        heads.append(one[:, :split])
        tails.append(tail)
    return torch.cat(heads, dim=0), torch.cat(tails, dim=0)


class Approximator(nn.Module):
    """``distilled_guidance_layer``: in_proj, residual RMSNorm + MLPEmbedder layers, out_proj to the hidden size."""

    def __init__(self, c: ChromaConfig) -> None:
        super().__init__()
        h = c.approximator_hidden_size
        self.in_proj = nn.Linear(c.approximator_in_dim, h)
        self.layers = nn.ModuleList(MLPEmbedder(h, h) for _ in range(c.approximator_depth))
        self.norms = nn.ModuleList(RMSNorm(h) for _ in range(c.approximator_depth))
        self.out_proj = nn.Linear(h, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class DoubleStreamBlock(CheckpointedBlock):
    def __init__(self, c: ChromaConfig) -> None:
        super().__init__()
        h = c.hidden_size
        self.num_heads = c.num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_norm1", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(h, c.num_heads, c.qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6))
            setattr(
                self,
                f"{stream}_mlp",
                nn.Sequential(nn.Linear(h, c.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(c.mlp_hidden, h)),
            )
        self.gradient_checkpointing = False

    def _forward(self, img: Tensor, txt: Tensor, pe: Tensor, mods: tuple[Mod, Mod, Mod, Mod]) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2, txt_mod1, txt_mod2 = mods
        heads = {}
        for name, x, (shift, scale, _) in (("img", img, img_mod1), ("txt", txt, txt_mod1)):
            modulated = _modulate(getattr(self, f"{name}_norm1")(x), shift, scale)
            heads[name] = getattr(self, f"{name}_attn").heads(modulated)
        (iq, ik, iv), (tq, tk, tv) = heads["img"], heads["txt"]
        img_attn, txt_attn = _per_sample_attention(
            torch.cat((iq, tq), dim=2), torch.cat((ik, tk), dim=2), torch.cat((iv, tv), dim=2), pe, img.shape[1]
        )
        out = {}
        for name, x, a, (_, _, gate1), (shift2, scale2, gate2) in (
            ("img", img, img_attn, img_mod1, img_mod2),
            ("txt", txt, txt_attn, txt_mod1, txt_mod2),
        ):
            x = x + gate1 * getattr(self, f"{name}_attn").proj(a)
            x = x + gate2 * getattr(self, f"{name}_mlp")(_modulate(getattr(self, f"{name}_norm2")(x), shift2, scale2))
            out[name] = x
        return out["img"], out["txt"]

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, mods: tuple[Mod, Mod, Mod, Mod]) -> tuple[Tensor, Tensor]:
        return checkpointed(self, self._forward, img, txt, pe, mods)


class SingleStreamBlock(CheckpointedBlock):
    def __init__(self, c: ChromaConfig) -> None:
        super().__init__()
        h = c.hidden_size
        self.hidden_size, self.mlp_hidden, self.num_heads = h, c.mlp_hidden, c.num_heads
        self.linear1 = nn.Linear(h, 3 * h + c.mlp_hidden)  # qkv and the MLP's input, fused
        self.linear2 = nn.Linear(h + c.mlp_hidden, h)  # attention projection and the MLP's output, fused
        self.norm = QKNorm(h // c.num_heads)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor, pe: Tensor, mod: Mod) -> Tensor:
        shift, scale, gate = mod
        qkv, mlp = torch.split(
            self.linear1(_modulate(self.pre_norm(x), shift, scale)), [3 * self.hidden_size, self.mlp_hidden], dim=-1
        )
        q, k, v = heads_first(qkv, self.num_heads, 3)
        q, k = self.norm(q, k, v)
        _, attn = _per_sample_attention(q, k, v, pe, 0)
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))

    def forward(self, x: Tensor, pe: Tensor, mod: Mod) -> Tensor:
        return checkpointed(self, self._forward, x, pe, mod)


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class Chroma(nn.Module):
    """The Chroma transformer; ``forward`` takes flux_train_network.py's keywords (``y`` is the dummy CLIP-L's
    output and unused; ``mod_vectors`` from :meth:`get_mod_vectors`) and returns ``(B, L_img, in_channels)``."""

    def __init__(self, config: ChromaConfig = CHROMA) -> None:
        super().__init__()
        c = self.params = config
        if sum(c.axes_dim) != c.hidden_size // c.num_heads:
            raise ValueError(f"axes_dim {c.axes_dim} must add up to the head size {c.hidden_size // c.num_heads}")
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.distilled_guidance_layer = Approximator(c)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.in_channels)
        self.mod_index: Tensor  # each modulation vector's index, embedded as the approximator's input
        self.register_buffer("mod_index", torch.arange(c.modulation_vectors), persistent=False)

    def enable_gradient_checkpointing(self) -> None:
        """As sd-scripts: every block and the approximator's layers."""
        for m in self.modules():
            if isinstance(m, CheckpointedBlock):
                m.gradient_checkpointing = True

    def get_mod_vectors(self, timesteps: Tensor, guidance: Tensor, batch_size: int) -> Tensor:
        """``(B, modulation_vectors, hidden)``: the approximator on [timestep, guidance, vector index] embeddings."""
        c = self.params
        quarter = c.approximator_in_dim // 4
        step = timestep_embedding(timesteps, quarter, time_factor=1000.0)
        scale = timestep_embedding(guidance, quarter, time_factor=1000.0)
        index = timestep_embedding(self.mod_index, c.approximator_in_dim // 2, time_factor=1000.0)
        index = index.unsqueeze(0).repeat(batch_size, 1, 1)
        per_step = torch.cat([step, scale], dim=1).unsqueeze(1).repeat(1, c.modulation_vectors, 1)
        return self.distilled_guidance_layer(torch.cat([per_step, index], dim=-1))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Optional[Tensor] = None,
        guidance: Optional[Tensor] = None,
        txt_attention_mask: Optional[Tensor] = None,
        mod_vectors: Optional[Tensor] = None,
    ) -> Tensor:
        c = self.params
        img = self.img_in(img)
        txt = self.txt_in(txt)
        if mod_vectors is None:
            if guidance is None:
                raise ValueError("Chroma's modulation vectors need guidance (a tensor per sample) or mod_vectors")
            with torch.no_grad():
                mod_vectors = self.get_mod_vectors(timesteps, guidance, img.shape[0])

        def mod(i: int) -> Mod:
            return (mod_vectors[:, i : i + 1], mod_vectors[:, i + 1 : i + 2], mod_vectors[:, i + 2 : i + 3])

        singles, doubles = 3 * c.depth_single_blocks, 6 * c.depth  # the order of sd-scripts' lookup table
        ids = torch.cat((img_ids, txt_ids), dim=1)
        pe = torch.cat([rope(ids[..., i], d, c.theta) for i, d in enumerate(c.axes_dim)], dim=-3).unsqueeze(1)
        for i, block in enumerate(self.double_blocks):
            img_at, txt_at = singles + 6 * i, singles + doubles + 6 * i
            img, txt = block(img, txt, pe, (mod(img_at), mod(img_at + 3), mod(txt_at), mod(txt_at + 3)))
        x = torch.cat((img, txt), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = block(x, pe, mod(3 * i))
        final = singles + 2 * doubles
        return self.final_layer(x[:, : img.shape[1]], mod_vectors[:, final : final + 1], mod_vectors[:, final + 1 :])


__all__ = ["Chroma", "Approximator", "DoubleStreamBlock", "SingleStreamBlock"]
