"""The frozen base models of a set-up, on the meta device, in the dtypes and placement sd-scripts gives them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ...harness.architectures import (
    SD1_UNET_CONFIG,
    SD2_TE_CONFIG,
    SD2_UNET_CONFIG,
    SDXL_TE1_CONFIG,
    SDXL_TE2_CONFIG,
    SDXL_UNET_CONFIG,
    VAE_CONFIG,
)
from .setup import Setup, VramError


def _unet_config(family: str) -> dict[str, Any]:
    return {"sd1": SD1_UNET_CONFIG, "sd2": SD2_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}[family]


def _text_encoder_configs(family: str) -> list[dict[str, Any]]:
    # SD1.x's text encoder is CLIP ViT-L/14's text tower, SDXL's first one too
    return {"sd1": [SDXL_TE1_CONFIG], "sd2": [SD2_TE_CONFIG], "sdxl": [SDXL_TE1_CONFIG, SDXL_TE2_CONFIG]}[family]


@dataclass
class Models:
    """The frozen base models on the device: the U-Net, [te] or [te1, te2], and the VAE when latents are not cached."""

    family: str
    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: Optional[nn.Module] = None
    on_device: set[str] = field(default_factory=lambda: {"unet", "text_encoders", "vae"})

    @property
    def sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def text_encoder_argument(self) -> Any:
        """``text_encoder`` as sd-scripts passes it to the network: one model, or a list (SDXL, FLUX.1, SD3,
        Lumina 2, HunyuanImage-2.1)."""
        return (
            self.text_encoders
            if self.family in ("sdxl", "flux", "sd3", "lumina", "hunyuan_image")
            else (self.text_encoders[0])
        )


def block_weights(blocks: Iterable[nn.Module]) -> list[torch.Tensor]:
    """What sd-scripts' block swap moves of ``blocks``: each submodule's ``weight`` (not biases, scales or buffers),
    each tensor once."""
    weights: dict[int, torch.Tensor] = {}
    for block in blocks:
        for module in block.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                weights[id(weight)] = weight
    return list(weights.values())


def _needs(package: str) -> None:
    raise VramError(
        f"aclora vram builds the models with diffusers and transformers: {package} is not installed "
        "(pip install diffusers transformers accelerate)"
    )


def build_models(setup: Setup, device: str = "meta") -> Models:
    """The real architecture of ``setup.family`` on ``device`` in sd-scripts' dtypes, frozen; nothing initialised."""
    try:
        # the modules, not diffusers' root: mypy reads its lazy __init__ as placeholder classes
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    except ImportError:
        _needs("diffusers")
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError:
        _needs("transformers")
    attn = "eager" if setup.attention == "none" else "sdpa"
    with torch.device(device):
        unet = UNet2DConditionModel(**_unet_config(setup.family))
        encoders: list[nn.Module] = []
        for i, config in enumerate(_text_encoder_configs(setup.family)):
            kind = CLIPTextModelWithProjection if (setup.family == "sdxl" and i == 1) else CLIPTextModel
            # transformers 5 types the config's fields only; PretrainedConfig still takes attn_implementation
            encoders.append(kind(CLIPTextConfig(**config, attn_implementation=attn)))  # type: ignore[call-arg]
        vae = None if setup.cache_latents else AutoencoderKL(**VAE_CONFIG)
    models = Models(setup.family, unet, encoders, vae)
    prepare_models(models, setup)
    return models


def prepare_models(models: Models, setup: Setup) -> None:
    """Dtypes, attention and placement as train_network.py leaves the frozen models (in place)."""
    if setup.attention == "none":
        from diffusers.models.attention_processor import AttnProcessor

        for model in (models.unet, models.vae):
            if model is not None:
                set_processor: Any = model.set_attn_processor  # diffusers' (nn.Module types it as a tensor)
                set_processor(AttnProcessor())  # sd-scripts' own attention without xformers/sdpa
    models.unet.requires_grad_(False).to(dtype=setup.unet_dtype)
    for te in models.text_encoders:
        te.requires_grad_(False).to(dtype=setup.text_encoder_dtype)
        if setup.fp8_base:
            _text_model(te).embeddings.to(dtype=setup.weight_dtype)  # nn.Embedding has no fp8 (train_network.py)
    if models.vae is not None:
        models.vae.requires_grad_(False).to(dtype=setup.vae_dtype).eval()
    if setup.cache_text_encoder_outputs:
        models.on_device.discard("text_encoders")  # sdxl_train_network.py moves them to the CPU after caching
    if setup.cache_latents:
        models.on_device.discard("vae")


def _text_model(te: nn.Module) -> nn.Module:
    return getattr(te, "text_model", te)  # transformers 4.x has a text_model level, 5.x does not


def _enable_checkpointing(te: nn.Module) -> None:
    # what train_network.py calls (transformers 5 renamed it and deprecated the old name)
    enable: Any = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
    enable()
