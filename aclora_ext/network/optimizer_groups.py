"""sd-scripts' optimizer groups of a network: one per part (each text encoder, the U-Net), with LoRA+ groups
for lora_up."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from ..lora.module import ACLoRAModule
from ..options import ACLoRAConfig

logger = logging.getLogger(__name__)


def param_groups(
    text_encoder_loras: Sequence[ACLoRAModule],
    unet_loras: Sequence[ACLoRAModule],
    parts: dict[str, Any],
    config: ACLoRAConfig,
    text_encoder_lr: Any = None,
    unet_lr: Any = None,
    default_lr: Any = None,
) -> tuple[list[dict], list[str]]:
    """``(groups, descriptions)``: ``text_encoder_lr`` may be a number, None, or a list (one per text encoder,
    ``parts`` telling which module is in which; a single value applies to every one)."""
    te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
    groups: list[dict] = []
    descriptions: list[str] = []
    te_parts = sorted({parts[m.lora_name] for m in text_encoder_loras})
    for i, part in enumerate(te_parts):
        lr = te_lrs[min(i, len(te_lrs) - 1)] if te_lrs else None
        lr = default_lr if lr is None else lr
        ratio = config.loraplus_text_encoder_lr_ratio or config.loraplus_lr_ratio
        label = "textencoder" if len(te_parts) == 1 else f"textencoder {i + 1}"
        members = [m for m in text_encoder_loras if parts[m.lora_name] == part]
        _add_groups(groups, descriptions, members, lr, ratio, label)
    if unet_loras:
        lr = default_lr if unet_lr is None else unet_lr
        ratio = config.loraplus_unet_lr_ratio or config.loraplus_lr_ratio
        _add_groups(groups, descriptions, unet_loras, lr, ratio, "unet")
    return groups, descriptions


def _add_groups(
    groups: list, descriptions: list, modules: Sequence[ACLoRAModule], lr: Any, ratio: Optional[float], label: str
) -> None:
    plain = [p for m in modules for name, p in m.named_parameters() if not (ratio and "lora_up" in name)]
    plus = [p for m in modules for p in m.lora_up.parameters()] if ratio else []
    for params, factor, suffix in ((plain, 1.0, ""), (plus, ratio or 1.0, " plus")):
        if not params:
            continue
        group: dict = {"params": params}
        if lr is not None:
            if float(lr) == 0:
                logger.info("AC-LoRA: lr 0 for %s%s, its parameters are not trained", label, suffix)
                continue
            group["lr"] = float(lr) * factor
        groups.append(group)
        descriptions.append(label + suffix)
