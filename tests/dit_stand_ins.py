"""Stand-ins for sd-scripts' FLUX.1 and SD3 DiTs, for tests that run without sd-scripts' library.

Only what a LoRA module looks at: the class names of the blocks (``DoubleStreamBlock``,
``SingleStreamBlock``, ``SingleDiTBlock``), the attributes the families recognise a model by, and
every Linear / Conv2d at its module path and shape. No forward. Built on the meta device by default
(FLUX.1's width is 3072: only the LoRA factors are ever allocated). tests/test_flux_sd3_sd_scripts.py
checks that their layers are exactly those of sd-scripts' own ``Flux`` and ``MMDiT``.
"""

from __future__ import annotations

import torch
from torch import nn

FLUX_HIDDEN, FLUX_IN, FLUX_VEC, FLUX_CONTEXT, FLUX_TIME = 3072, 64, 768, 4096, 256


class Modulation(nn.Module):
    def __init__(self, hidden: int, double: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, (6 if double else 3) * hidden)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)


class MLPEmbedder(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(width, hidden)
        self.out_layer = nn.Linear(hidden, hidden)


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, double=True))
            setattr(self, f"{stream}_attn", SelfAttention(hidden))
            setattr(self, f"{stream}_mlp", _mlp(hidden))


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, 7 * hidden)
        self.linear2 = nn.Linear(5 * hidden, hidden)
        self.modulation = Modulation(hidden, double=False)


class LastLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, FLUX_IN)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))


class Flux(nn.Module):
    def __init__(self, double: int = 1, single: int = 1, hidden: int = FLUX_HIDDEN, guidance: bool = True) -> None:
        super().__init__()
        self.img_in = nn.Linear(FLUX_IN, hidden)
        self.time_in = MLPEmbedder(FLUX_TIME, hidden)
        self.vector_in = MLPEmbedder(FLUX_VEC, hidden)
        self.guidance_in = MLPEmbedder(FLUX_TIME, hidden) if guidance else nn.Identity()
        self.txt_in = nn.Linear(FLUX_CONTEXT, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden) for _ in range(single))
        self.final_layer = LastLayer(hidden)


def flux(double: int = 1, single: int = 1, hidden: int = FLUX_HIDDEN, device: str = "meta") -> Flux:
    with torch.device(device):
        return Flux(double, single, hidden)


# --- SD3 -----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, hidden: int, pre_only: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        if not pre_only:
            self.proj = nn.Linear(hidden, hidden)


class Mlp(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)


class SingleDiTBlock(nn.Module):
    def __init__(self, hidden: int, pre_only: bool = False, self_attention: bool = False) -> None:
        super().__init__()
        self.attn = Attention(hidden, pre_only)
        if self_attention:
            self.attn2 = Attention(hidden)
        if not pre_only:
            self.mlp = Mlp(hidden)
        chunks = 2 if pre_only else 9 if self_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, chunks * hidden))


class MMDiTBlock(nn.Module):
    def __init__(self, hidden: int, last: bool, self_attention: bool) -> None:
        super().__init__()
        self.context_block = SingleDiTBlock(hidden, pre_only=last)
        self.x_block = SingleDiTBlock(hidden, self_attention=self_attention)


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, 2, 2)


class Embedder(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class MMDiT(nn.Module):
    def __init__(self, depth: int = 2, self_attention_layers: tuple[int, ...] = (), channels: int = 16,
                 adm: int = 2048, context: int = 4096) -> None:
        super().__init__()
        hidden = 64 * depth
        self.x_embedder = PatchEmbed(channels, hidden)
        self.t_embedder = Embedder(256, hidden)
        self.y_embedder = Embedder(adm, hidden)
        self.context_embedder = nn.Linear(context, hidden)
        self.joint_blocks = nn.ModuleList(MMDiTBlock(hidden, i == depth - 1, i in self_attention_layers)
                                          for i in range(depth))
        self.final_layer = LastLayer(hidden)
        self.final_layer.linear = nn.Linear(hidden, 2 * 2 * channels)


def mmdit(depth: int = 2, self_attention_layers: tuple[int, ...] = (), device: str = "meta") -> MMDiT:
    with torch.device(device):
        return MMDiT(depth, self_attention_layers)
