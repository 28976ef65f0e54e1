"""What every model family shares: a target layer, kohya's naming rule, and finding layers by block
class or by path pattern.

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

from ..lora.module import is_targetable


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

