"""Which layers get a LoRA, and what they are called (kohya's networks.lora naming).

A LoRA module's name is ``prefix + "." + module path`` with every "." replaced by
"_": ``lora_unet_down_blocks_1_attentions_0_..._to_q``,
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``. Consumers (A1111,
ComfyUI, diffusers) key on those names, so they must not depend on the installed
library versions.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from torch import nn

from .module import is_targetable

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"


@dataclass(frozen=True)
class Target:
    """A layer to adapt: its LoRA name, the layer, and which part of the model it is in."""

    lora_name: str
    layer: nn.Module
    part: str  # "unet", "te", "te1", "te2" or "model"

    @property
    def is_conv3x3(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and self.layer.kernel_size != (1, 1)

    @property
    def is_text_encoder(self) -> bool:
        return self.part.startswith("te")


def lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def text_encoder_root_path(text_encoder: nn.Module) -> str:
    """The module-path prefix that makes text-encoder names canonical.

    transformers 4.x spells CLIPTextModel paths ``text_model.encoder.layers...``;
    transformers 5.x dropped the ``text_model`` level (``encoder.layers...``).
    Files must always carry it, so we add it when the model lacks it.
    """
    name = type(text_encoder).__name__
    if name.startswith("CLIPTextModel") and not hasattr(text_encoder, "text_model"):
        return "text_model."
    return ""


def find_in_blocks(root: nn.Module, prefix: str, part: str, block_classes: Sequence[str],
                   path_prefix: str = "", conv3x3: bool = False) -> list[Target]:
    """Linear / Conv2d layers inside modules whose class name is in ``block_classes``.

    1x1 convs always count (they are linear); 3x3 convs only when ``conv3x3``.
    A layer reachable from two nested blocks is listed once.
    """
    found: dict[str, Target] = {}
    for block_path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_path, child in block.named_modules():
            if not is_targetable(child):
                continue
            if isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1) and not conv3x3:
                continue
            path = ".".join(p for p in (path_prefix + block_path, child_path) if p)
            name = lora_name(prefix, path)
            found.setdefault(name, Target(name, child, part))
    return list(found.values())


def is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL U-Nets, told apart without importing sd-scripts.

    sd-scripts' own SDXL U-Net class is ``SdxlUNet2DConditionModel``; diffusers'
    SDXL U-Net has the "text_time" additional embedding.
    """
    if "Sdxl" in type(unet).__name__:
        return True
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def find_unet_targets(unet: nn.Module, conv3x3: bool) -> list[Target]:
    classes = UNET_TARGETS + (UNET_CONV_TARGETS if conv3x3 else ())
    return find_in_blocks(unet, PREFIX_UNET, "unet", classes, conv3x3=conv3x3)


def text_encoder_prefixes(count: int) -> list[tuple[str, str]]:
    """(prefix, part) per text encoder: one -> lora_te, two (SDXL) -> lora_te1, lora_te2."""
    if count == 1:
        return [(PREFIX_TE, "te")]
    return [(f"{PREFIX_TE}{i + 1}", f"te{i + 1}") for i in range(count)]


def find_text_encoder_targets(text_encoders: Sequence[nn.Module]) -> list[Target]:
    targets: list[Target] = []
    for (prefix, part), te in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        if te is None:
            continue
        targets += find_in_blocks(te, prefix, part, TEXT_ENCODER_TARGETS, path_prefix=text_encoder_root_path(te))
    return targets


def as_list(text_encoder: Optional[nn.Module | Sequence[nn.Module]]) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return list(text_encoder)
    return [text_encoder]


def _matches(path: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if fnmatch.fnmatchcase(path, pattern):
            return True
        # Globs such as "*.attn" are not regular expressions: only valid ones are tried as such.
        if _safe_regex(pattern) and re.fullmatch(pattern, path) is not None:
            return True
    return False


def find_by_patterns(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                     prefix: str = "lora") -> list[Target]:
    """Linear/Conv2d layers of any model whose module path matches a pattern.

    Patterns are shell globs (``"blocks.*.attn.*"``) or full regular expressions;
    ``exclude`` wins over ``include``.
    """
    targets = []
    for path, layer in model.named_modules():
        if not path or not is_targetable(layer):
            continue
        if _matches(path, include) and not _matches(path, exclude):
            targets.append(Target(lora_name(prefix, path), layer, "model"))
    return targets


def _safe_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def check_patterns(patterns: Sequence[str], what: str) -> None:
    """Reject patterns that are neither globs nor valid regular expressions."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{what}: {pattern!r} is not a pattern; allowed: non-empty glob or regex strings")
        if any(ch in pattern for ch in "()[]{}+^$|\\") and not _safe_regex(pattern):
            raise ValueError(f"{what}: {pattern!r} is not a valid regular expression")
