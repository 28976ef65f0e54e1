"""The real Stable Diffusion architectures as literal configs (no download), and the LoRA module shapes
kohya's networks.lora gives them: for ``aclora vram``'s meta-device models, the tiny models' layouts and
the benchmarks' realistic files."""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import nn

from .tiny import as_transformers4_layout

FAMILIES = ("sd1", "sd2", "sdxl")
NATIVE_RESOLUTION = {
    "sd1": 512,
    "sd2": 768,
    "sdxl": 1024,
    "flux": 1024,
    "sd3": 1024,
    "lumina": 1024,
    "hunyuan_image": 2048,
    "anima": 1024,
}
LATENT_CHANNELS = 4
TOKENS_PER_CHUNK = 77

SD1_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD2_UNET_CONFIG: dict[str, Any] = {
    **SD1_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
# OpenCLIP ViT-H/14 text tower as SD2 uses it (the last of its 24 layers dropped)
SD2_TE_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
# the same VAE architecture for SD1.x, SD2.x and SDXL
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 32,
}

# Real SDXL module-set sizes (kohya networks/lora.py, default options).
SDXL_UNET_MODULES = 722
SDXL_TE1_MODULES = 72
SDXL_TE2_MODULES = 192
SDXL_TOTAL_MODULES = SDXL_UNET_MODULES + SDXL_TE1_MODULES + SDXL_TE2_MODULES

UNET_TARGET_CLASSES = ("Transformer2DModel",)
TEXT_ENCODER_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


class ModuleShape(NamedTuple):
    """One LoRA target: kohya name, out/in features (channels), kernel size (() for Linear)."""

    lora_name: str
    out_features: int
    in_features: int
    kernel_size: Tuple[int, ...]


SDXL_UNET_CONFIG: Dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# CLIP ViT-L/14 text tower (SDXL te1) and OpenCLIP ViT-bigG/14 text tower (te2).
SDXL_TE1_CONFIG: Dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
SDXL_TE2_CONFIG: Dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}


def kohya_target_shapes(root: nn.Module, prefix: str, target_classes: Sequence[str]) -> List[ModuleShape]:
    """The Linear and 1x1 Conv2d modules kohya's networks.lora wraps (default
    options, no conv_dim) inside modules of ``target_classes``, named its way."""
    shapes = []
    for name, module in root.named_modules():
        if type(module).__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            lora_name = f"{prefix}.{name}.{child_name}".replace(".", "_")
            if isinstance(child, nn.Linear):
                shapes.append(ModuleShape(lora_name, child.out_features, child.in_features, ()))
            elif isinstance(child, nn.Conv2d) and tuple(child.kernel_size) == (1, 1):
                shapes.append(ModuleShape(lora_name, child.out_channels, child.in_channels, (1, 1)))
    return shapes


def sdxl_module_shapes() -> List[ModuleShape]:
    """The 986 modules kohya's LoRA trains on SDXL base 1.0 (U-Net 722, te1 72, te2 192).

    Models are built on the meta device from literal configs: no memory, no
    download. Text-encoder names carry the ``text_model_`` level whatever
    transformers is installed, as existing LoRA consumers expect.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel  # typed (diffusers' lazy root is not)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TE1_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2_CONFIG))
    shapes = (
        kohya_target_shapes(unet, "lora_unet", UNET_TARGET_CLASSES)
        + kohya_target_shapes(as_transformers4_layout(te1), "lora_te1", TEXT_ENCODER_TARGET_CLASSES)
        + kohya_target_shapes(as_transformers4_layout(te2), "lora_te2", TEXT_ENCODER_TARGET_CLASSES)
    )
    assert len(shapes) == SDXL_TOTAL_MODULES, f"expected {SDXL_TOTAL_MODULES} SDXL LoRA modules, found {len(shapes)}"
    return shapes


# --- FLUX.1 and SD3/SD3.5 (the DiT layouts of ``harness.dit``) ------------------------------------------
FLUX_DIT_TARGET_CLASSES = ("DoubleStreamBlock", "SingleStreamBlock")
SD3_DIT_TARGET_CLASSES = ("SingleDiTBlock",)
FLUX_MODULES = {"unet": 19 * 10 + 38 * 3, "te1": 72, "te3": 168}  # lora_flux.py, full FLUX.1 (r16 facts)
SD35_MEDIUM_MODULES = {"unet": 24 * 10 - 3 + 13 * 2, "te1": 72, "te2": 192, "te3": 168}


def t5xxl_encoder(device: str = "meta") -> nn.Module:
    """T5 v1.1 XXL's encoder (transformers' T5EncoderModel) on ``device``, from its literal config."""
    from transformers import T5Config, T5EncoderModel

    from .dit import T5XXL_CONFIG

    with torch.device(device):
        return T5EncoderModel(T5Config(**T5XXL_CONFIG))


def _clip_shapes(config: Dict[str, Any], prefix: str, projection: bool) -> List[ModuleShape]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
    return kohya_target_shapes(as_transformers4_layout(model), prefix, TEXT_ENCODER_TARGET_CLASSES)


def flux_module_shapes(text_encoders: bool = True) -> List[ModuleShape]:
    """The modules sd-scripts' networks.lora_flux trains on FLUX.1 dev with default options: the DiT's 304
    (19 double blocks x 10, 38 single blocks x 3), CLIP-L's 72 (``lora_te1_``) and, with ``train_t5xxl``,
    T5-XXL's 168 (``lora_te3_``), named as lora_flux names them."""
    from .dit import FLUX_DEV, T5_TARGET_CLASSES
    from .flux_dit import Flux

    with torch.device("meta"):
        shapes = kohya_target_shapes(Flux(FLUX_DEV), "lora_unet", FLUX_DIT_TARGET_CLASSES)
    if text_encoders:
        shapes += _clip_shapes(SDXL_TE1_CONFIG, "lora_te1", False)
        shapes += kohya_target_shapes(t5xxl_encoder(), "lora_te3", T5_TARGET_CLASSES)
    expected = FLUX_MODULES["unet"] + (FLUX_MODULES["te1"] + FLUX_MODULES["te3"] if text_encoders else 0)
    assert len(shapes) == expected, f"expected {expected} FLUX.1 LoRA modules, found {len(shapes)}"
    return shapes


def sd3_module_shapes(text_encoders: bool = True) -> List[ModuleShape]:
    """The modules sd-scripts' networks.lora_sd3 trains on SD3.5 medium with default options: the DiT's 263
    (24 joint blocks' context and x blocks, the last context block pre-only, ``attn2`` in the x blocks of
    joint blocks 0-12), CLIP-L's 72, CLIP-G's 192 and, with ``train_t5xxl``, T5-XXL's 168."""
    from .dit import SD35_MEDIUM, T5_TARGET_CLASSES
    from .sd3_dit import MMDiT

    with torch.device("meta"):
        shapes = kohya_target_shapes(MMDiT(SD35_MEDIUM), "lora_unet", SD3_DIT_TARGET_CLASSES)
    if text_encoders:
        shapes += _clip_shapes(SDXL_TE1_CONFIG, "lora_te1", True)
        shapes += _clip_shapes(SDXL_TE2_CONFIG, "lora_te2", True)
        shapes += kohya_target_shapes(t5xxl_encoder(), "lora_te3", T5_TARGET_CLASSES)
    expected = sum(SD35_MEDIUM_MODULES.values()) if text_encoders else SD35_MEDIUM_MODULES["unet"]
    assert len(shapes) == expected, f"expected {expected} SD3.5 medium LoRA modules, found {len(shapes)}"
    return shapes
