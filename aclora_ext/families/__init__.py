"""Model families: which layers of a model get a LoRA and how they are named, one adapter file per
family (``sd``: SD1.x/2.x and SDXL; ``flux``: FLUX.1 and Chroma; ``sd3``: SD3/SD3.5; ``lumina``: Lumina 2;
``anima``: Anima; ``hunyuan_image``: HunyuanImage-2.1), on the shared rules of ``base``. A family is recognised
from the model sd-scripts hands over (class names and attributes,
never by importing sd-scripts). Nothing outside this folder knows an architecture.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from torch import nn

from ..files.storage import LoRAFileError
from . import anima, flux, hunyuan_image, lumina, sd, sd3
from .base import Family, Target
from .lumina import FILE_PREFIXES as LUMINA_PREFIXES

#: the registered families, the most specific first (``sd`` takes whatever the others do not recognise)
FAMILIES: tuple[Family, ...] = (
    flux.FAMILY,
    sd3.FAMILY,
    hunyuan_image.FAMILY,
    lumina.FAMILY,
    anima.FAMILY,
    sd.FAMILY,
)


def detect(unet: nn.Module, text_encoders: Sequence[Any]) -> Family:
    """The family of the model sd-scripts passes to create_network."""
    return next(f for f in FAMILIES if f.recognises(unet, text_encoders))


def model_targets(text_encoders: Sequence[nn.Module], unet: nn.Module, conv3x3: bool) -> list[Target]:
    """Every layer a LoRA file for this model's family may name, named as sd-scripts' own LoRA module does."""
    return detect(unet, text_encoders).layers(text_encoders, unet, conv3x3)


def is_sdxl(unet: nn.Module, text_encoders: Sequence[nn.Module]) -> bool:
    return detect(unet, text_encoders).name(unet, text_encoders) == "SDXL"


def model_family(names: Iterable[str]) -> Optional[str]:
    """ "FLUX.1", "SD3", "HunyuanImage-2.1", "Lumina 2", "Anima", "SDXL" or "SD1.x/2.x" from kohya module names,
    or None when they do not tell.

    The DiT blocks name FLUX.1 and HunyuanImage-2.1 (double_blocks/single_blocks; their layers' own
    names tell the two apart, ``hunyuan_image.file_family``) and SD3 (joint_blocks) files; SD3 has
    three text encoders (lora_te1_/lora_te2_/lora_te3_), FLUX.1 two (lora_te1_, lora_te3_), SDXL two
    (lora_te1_, lora_te2_) and, from sd-scripts' own U-Net, input_blocks/middle_block/output_blocks;
    SD1.x/2.x files have one text encoder, lora_te_. A file of lora_te1_ modules alone could be any
    of the last three. Lumina 2 files name its blocks (lora_unet_layers_, ..._refiner_) or caption embedder;
    Anima files name their DiT ``lora_unet_blocks_N_...``. A file of a decoder LM's modules alone (Lumina 2's
    Gemma2, Anima's Qwen3: ``lora_te_layers_N_...``, not CLIP's text_model) does not tell its model.
    """
    names = list(names)
    if anima.names_are_anima(names):
        return "Anima"

    def has(*prefixes: str) -> bool:
        return any(n.startswith(prefixes) for n in names)

    if has("lora_unet_joint_blocks_") or (has("lora_te3_") and has("lora_te2_")):
        return "SD3"
    if has("lora_unet_double_blocks_", "lora_unet_single_blocks_"):
        return hunyuan_image.file_family(names)
    if has(*LUMINA_PREFIXES):
        return "Lumina 2"
    if has("lora_te3_"):
        return None
    if has("lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"):
        return "SDXL"
    if has("lora_te_layers_"):  # a decoder LM's layers (Lumina 2's Gemma2, Anima's Qwen3), not CLIP's text_model
        return None
    if has("lora_te_"):
        return "SD1.x/2.x"
    return None


def check_model_family(file_names: Iterable[str], model_names: Iterable[str], source: str) -> None:
    """Refuse, by name, a file for one model family given to a model of another (SD1.x/2.x, SDXL, FLUX.1, SD3,
    Lumina 2, Anima, HunyuanImage-2.1)."""
    ours, theirs = model_family(file_names), model_family(model_names)
    if ours and theirs and ours != theirs:
        article = "an" if ours.startswith(("S", "A")) else "a"  # an SDXL, an Anima; a FLUX.1
        raise LoRAFileError(
            f"{source}: this LoRA is for {article} {ours} model, but the model given is {theirs} "
            "(another model's LoRA cannot be loaded)"
        )


__all__ = ["FAMILIES", "Family", "Target", "check_model_family", "detect", "is_sdxl", "model_family", "model_targets"]
