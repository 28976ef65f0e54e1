"""The Stable Diffusion 1.x/2.x and SDXL family: kohya networks.lora's targets and names.

U-Net: every Linear and 1x1 Conv2d inside ``Transformer2DModel`` blocks (with
``conv_dim`` also the 3x3 convs of ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D``), prefix ``lora_unet``. Text encoders: the Linear layers of CLIP's
attention and MLP blocks, prefix ``lora_te`` (one encoder) or ``lora_te1`` /
``lora_te2`` (SDXL). sd-scripts' own U-Nets and diffusers' use the same block
class names.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .base import CleanLatents, Family, Target, find_in_blocks, keep, regex_rank, with_rank

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"


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


def layers(text_encoders: Sequence[nn.Module], unet: nn.Module, conv3x3: bool) -> list[Target]:
    return find_text_encoder_targets(text_encoders) + find_unet_targets(unet, conv3x3)


def targets(text_encoders: Sequence[nn.Module], unet: nn.Module, config: Any) -> list[Target]:
    """networks.lora's layers (3x3 convs with conv_dim), with network_reg_dims' ranks where a pattern matches."""
    found = layers(text_encoders, unet, config.conv_dim is not None)
    return keep(with_rank(t, regex_rank(t.lora_name, config.network_reg_dims)) for t in found)


def name(unet: nn.Module, text_encoders: Sequence[Any]) -> str:
    return "SDXL" if is_sdxl_unet(unet) or len(text_encoders) == 2 else "SD1.x/2.x"


#: train_network.py's get_noise_pred_and_target (sdxl_train_network.py inherits it) noises the latents here
CLEAN_LATENTS = CleanLatents("library.train_util", "get_noise_noisy_latents_and_timesteps", 2)
# the fallback family: whatever no other adapter recognises is treated as SD1.x/2.x or SDXL
FAMILY = Family("sd", lambda unet, text_encoders: True, name, targets, layers, clean_latents=CLEAN_LATENTS)
