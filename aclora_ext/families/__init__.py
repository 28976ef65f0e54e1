"""Model families: which layers of a model get a LoRA and how they are named, one adapter file per
family (``sd``: SD1.x/2.x and SDXL), on the shared rules of ``base``. Nothing outside this folder knows
an architecture."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from torch import nn

from ..files.storage import LoRAFileError
from . import sd
from .base import Target


def model_targets(text_encoders: Sequence[nn.Module], unet: nn.Module, conv3x3: bool) -> list[Target]:
    """The layers sd-scripts' own LoRA module for this model's family targets, named its way."""
    return sd.find_text_encoder_targets(text_encoders) + sd.find_unet_targets(unet, conv3x3)


def is_sdxl(unet: nn.Module, text_encoders: Sequence[nn.Module]) -> bool:
    return sd.is_sdxl_unet(unet) or len(text_encoders) == 2


def model_family(names: Iterable[str]) -> Optional[str]:
    """"SDXL" or "SD1.x/2.x" from kohya module names, or None when the names do not tell.

    SDXL files name their two text encoders lora_te1_/lora_te2_ and, from
    sd-scripts' own U-Net, its blocks input_blocks/middle_block/output_blocks;
    SD1.x/2.x files have one text encoder, lora_te_.
    """
    names = list(names)
    if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
                         "lora_unet_output_blocks_")) for n in names):
        return "SDXL"
    if any(n.startswith("lora_te_") for n in names):
        return "SD1.x/2.x"
    return None


def check_model_family(file_names: Iterable[str], model_names: Iterable[str], source: str) -> None:
    """Refuse, by name, a file for SD1.x/2.x given to an SDXL model (or the reverse)."""
    ours, theirs = model_family(file_names), model_family(model_names)
    if ours and theirs and ours != theirs:
        raise LoRAFileError(f"{source}: this LoRA is for an {ours} model, but the model given is {theirs} "
                            "(another model's LoRA cannot be loaded)")
