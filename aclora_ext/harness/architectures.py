"""The real Stable Diffusion architectures as literal configs (no download), and the LoRA module shapes
kohya's networks.lora gives them: for ``aclora vram``'s meta-device models, the tiny models' layouts and
the benchmarks' realistic files."""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import nn

from .tiny import as_transformers4_layout

FAMILIES = ("sd1", "sd2", "sdxl")
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
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
    from diffusers import UNet2DConditionModel
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
