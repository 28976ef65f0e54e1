"""Small helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from aclora_ext import create_network


def text_encoder_of(models):
    """``text_encoder`` as sd-scripts passes it: one model (SD1.x) or a list of two (SDXL)."""
    return models["text_encoders"] if "text_encoders" in models else models["text_encoder"]


def lora_network(models, rank=4, alpha=2.0, apply_text_encoder=True, apply_unet=True, multiplier=1.0, **kwargs):
    """create_network + apply_to on an SD1.x-like or SDXL-like model set, as sd-scripts calls them."""
    text_encoder = text_encoder_of(models)
    network = create_network(multiplier, rank, alpha, None, text_encoder, models["unet"], **kwargs)
    network.apply_to(text_encoder, models["unet"], apply_text_encoder, apply_unet)
    return network


def pretend_trained(network, seed=0, scale=0.05):
    """Seeded non-zero lora_up weights: the network now changes the model as a trained one does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=generator) * scale)
    return network
