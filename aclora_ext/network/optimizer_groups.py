"""sd-scripts' optimizer groups of a network: one per part (each text encoder, the U-Net), with LoRA+ groups
for lora_up, and before them the groups of the modules network_reg_lrs gives a learning rate (as lora_flux,
lora_hunyuan_image and lora_anima order and name them: ``unet reg_lr_0``, ``unet reg_lr_0 plus``, ...)."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

from ..families.base import Target
from ..lora.module import ACLoRAModule
from ..options import ACLoRAConfig

logger = logging.getLogger(__name__)


def param_groups(
    text_encoder_loras: Sequence[ACLoRAModule],
    unet_loras: Sequence[ACLoRAModule],
    targets: Mapping[str, Target],
    config: ACLoRAConfig,
    text_encoder_lr: Any = None,
    unet_lr: Any = None,
    default_lr: Any = None,
) -> tuple[list[dict], list[str]]:
    """``(groups, descriptions)``: ``text_encoder_lr`` may be a number, None, or a list (one per text encoder,
    ``targets`` telling which module is in which part; a single value applies to every one). A module whose
    target has a ``reg_lr`` (network_reg_lrs) is trained at that pair's rate whatever its part's is."""
    te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
    groups: list[dict] = []
    descriptions: list[str] = []
    te_parts = sorted({targets[m.lora_name].part for m in text_encoder_loras})
    for i, part in enumerate(te_parts):
        lr = te_lrs[min(i, len(te_lrs) - 1)] if te_lrs else None
        lr = default_lr if lr is None else lr
        ratio = config.loraplus_text_encoder_lr_ratio or config.loraplus_lr_ratio
        label = "textencoder" if len(te_parts) == 1 else f"textencoder {i + 1}"
        members = [m for m in text_encoder_loras if targets[m.lora_name].part == part]
        _add_part(groups, descriptions, members, targets, config, lr, ratio, label)
    if unet_loras:
        lr = default_lr if unet_lr is None else unet_lr
        ratio = config.loraplus_unet_lr_ratio or config.loraplus_lr_ratio
        _add_part(groups, descriptions, unet_loras, targets, config, lr, ratio, "unet")
    return groups, descriptions


def _add_part(
    groups: list,
    descriptions: list,
    modules: Sequence[ACLoRAModule],
    targets: Mapping[str, Target],
    config: ACLoRAConfig,
    lr: Any,
    ratio: Optional[float],
    label: str,
) -> None:
    """One part's groups: network_reg_lrs' groups (pattern order), then the part's own."""
    for index, (_, rate) in enumerate(config.network_reg_lrs or ()):
        members = [m for m in modules if targets[m.lora_name].reg_lr == index]
        _add_groups(groups, descriptions, members, rate, ratio, f"{label} reg_lr_{index}")
    rest = [m for m in modules if targets[m.lora_name].reg_lr is None]
    _add_groups(groups, descriptions, rest, lr, ratio, label)


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
