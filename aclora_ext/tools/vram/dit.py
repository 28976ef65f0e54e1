"""FLUX.1, Chroma and SD3/SD3.5 in ``aclora vram``: the frozen models as ``flux_train_network.py`` (Chroma:
``--model_type chroma``) / ``sd3_train_network.py`` leave them on the device, the layers sd-scripts'
``networks.lora_flux`` / ``networks.lora_sd3`` adapt (their fused shapes and names), and what
``--blocks_to_swap`` keeps off the device.

The DiT is ``harness.dit``'s (sd-scripts' layout, written here, built on the meta device from the
literal config); the text encoders are transformers' CLIPTextModel(WithProjection) and T5EncoderModel, as
sd-scripts loads them; the FLUX.1 autoencoder / SD3 VAE is diffusers' AutoencoderKL at 16 latent channels.

Which models sit on the device (flux_train_network.py ``cache_text_encoder_outputs_if_needed``,
train_network.py): the DiT always (less its swapped blocks' weights); CLIP-L (and SD3's CLIP-G) when their
outputs are not cached or their LoRA trains (Chroma has none: sd-scripts hands it a stand-in CLIP-L of four
numbers, not counted); T5-XXL when its outputs are not cached; the autoencoder when
latents are not cached. Text encoders on the device are cast to fp8 with ``--fp8_base`` (embeddings and
T5's layer norms kept in the weight dtype, as sd-scripts' ``prepare_text_encoder_fp8`` does).

Block swap (library/custom_offloading_utils.py): ``enable_block_swap(N)`` swaps the last N//2 double and
(N - N//2)*2 single FLUX (and Chroma) blocks (SD3: the last N joint blocks). Before the forward their weights are on the
CPU, the other blocks' on the device; during forward and backward a block's weights are copied into the
device storage of the block it replaces (``cuda_data_view.copy_``, the CUDA path pairs modules by name and
shape), so the device always holds the resident blocks' weight storages and no more: the in-flight blocks
reuse them. Only ``.weight`` moves: biases, SD3's pos_embed buffer and every non-block layer stay on the
device. So the count takes the swapped blocks' weights (every submodule's non-None ``weight``, as the
offloader selects them) off the device and changes nothing else.
"""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import nn

from ...families.base import Target, find_in_blocks
from ...families.sd import TEXT_ENCODER_TARGETS, text_encoder_root_path
from ...harness.architectures import SDXL_TE1_CONFIG, SDXL_TE2_CONFIG
from ...harness.chroma_dit import Chroma
from ...harness.dit import DIT_CONFIGS, DIT_VAE_CONFIG, T5XXL_CONFIG, ChromaConfig, FluxConfig, SD3Config
from ...harness.flux_dit import Flux
from ...harness.sd3_dit import MMDiT
from .models import Models, _needs, block_weights
from .setup import Setup, VramError

#: the blocks whose Linears lora_flux / lora_sd3 adapt (class names, as in sd-scripts)
DIT_TARGET_CLASSES = {"flux": ("DoubleStreamBlock", "SingleStreamBlock"), "sd3": ("SingleDiTBlock",)}
#: transformers configs of the text encoders: FLUX.1 CLIP-L + T5-XXL, SD3 CLIP-L + CLIP-G + T5-XXL
TEXT_CONFIGS = {"clip_l": SDXL_TE1_CONFIG, "clip_g": SDXL_TE2_CONFIG, "t5xxl": T5XXL_CONFIG}
CLIP_TOKENS = 77


def dit_config(setup: Setup) -> FluxConfig | SD3Config:
    return DIT_CONFIGS[setup.family][setup.variant]


def clip_names(setup: Setup) -> list[str]:
    """FLUX.1: CLIP-L; SD3: CLIP-L and CLIP-G; Chroma none (sd-scripts' stand-in holds 4 numbers, not counted)."""
    if setup.is_chroma:
        return []
    return ["clip_l"] if setup.family == "flux" else ["clip_l", "clip_g"]


def build_dit(config: FluxConfig | SD3Config) -> nn.Module:
    if isinstance(config, ChromaConfig):
        return Chroma(config)
    return Flux(config) if isinstance(config, FluxConfig) else MMDiT(config)


def dit_vae(setup: Setup, config: Optional[dict] = None) -> Optional[nn.Module]:
    """The autoencoder on the device when latents are not cached (FLUX.1's 16-channel one as diffusers'
    AutoencoderKL, or ``config``), else None; built on the current default device."""
    if setup.cache_latents:
        return None
    try:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # typed, unlike diffusers' root
    except ImportError:
        _needs("diffusers")
    return AutoencoderKL(**(config or DIT_VAE_CONFIG))


def build_dit_models(
    setup: Setup,
    device: str = "meta",
    config: Optional[FluxConfig | SD3Config] = None,
    text_configs: Optional[dict[str, dict]] = None,
    vae_config: Optional[dict] = None,
) -> Models:
    """The frozen models of a FLUX.1/Chroma/SD3 set-up on ``device``, in sd-scripts' dtypes, holding only those
    that sit on the device (text encoders ``[clip_l, (clip_g,) t5xxl]``, Chroma ``[t5xxl]``, fewer when cached);
    ``config``, ``text_configs`` and ``vae_config`` replace the real ones (tiny models for tests)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    except ImportError:
        _needs("transformers")
    texts = {**TEXT_CONFIGS, **(text_configs or {})}
    clips_on_device = not setup.cache_text_encoder_outputs or setup.train_text_encoder
    with torch.device(device):
        c = config or dit_config(setup)
        dit = build_dit(c)
        encoders: list[nn.Module] = []
        if clips_on_device:
            for name in clip_names(setup):  # FLUX: CLIPTextModel; SD3: both with their projections
                kind = CLIPTextModel if setup.family == "flux" else CLIPTextModelWithProjection
                encoders.append(kind(CLIPTextConfig(**texts[name])))
        if not setup.cache_text_encoder_outputs:
            encoders.append(T5EncoderModel(T5Config(**texts["t5xxl"])))
        vae = dit_vae(setup, vae_config)
    models = Models(setup.family, dit, encoders, vae)
    prepare_dit_models(models, setup)
    return models


def prepare_dit_models(models: Models, setup: Setup) -> None:
    """Dtypes and placement as flux_train_network.py / sd3_train_network.py and train_network.py leave them."""
    models.unet.requires_grad_(False).to(dtype=setup.unet_dtype)
    for te in models.text_encoders:
        te.requires_grad_(False).to(dtype=setup.text_encoder_dtype)
        if setup.fp8_base:  # nn.Embedding (and T5's layer norms) have no fp8 kernels: sd-scripts keeps them wide
            for module in te.modules():
                if type(module).__name__ in ("T5LayerNorm", "Embedding", "CLIPTextEmbeddings"):
                    module.to(dtype=setup.weight_dtype)
    if models.vae is not None:
        models.vae.requires_grad_(False).to(dtype=setup.vae_dtype).eval()
    if not models.text_encoders:
        models.on_device.discard("text_encoders")
    if setup.cache_latents:
        models.on_device.discard("vae")
    swapped_blocks(models.unet, setup)  # refuses a blocks_to_swap the model cannot take


def text_encoder_kind(te: nn.Module) -> str:
    """ "clip" or "t5" (by class name, as sd-scripts' network modules tell them apart)."""
    return "t5" if type(te).__name__.startswith("T5") else "clip"


def trained_clips(models: Models, setup: Setup) -> list[nn.Module]:
    """The CLIP encoders whose LoRA trains (without --network_train_unet_only); T5-XXL's never does here."""
    if not setup.train_text_encoder:
        return []
    return [te for te in models.text_encoders if text_encoder_kind(te) == "clip"]


def dit_targets(models: Models, setup: Setup) -> list[Target]:
    """The layers lora_flux / lora_sd3 adapt, named their way: every Linear inside the DiT's target blocks
    (``lora_unet_``) and, when the text encoders train, the CLIP attention/MLP Linears (``lora_te1_`` CLIP-L,
    ``lora_te2_`` CLIP-G). T5-XXL (``lora_te3_``, lora_flux's ``train_t5xxl``) is not modelled."""
    targets = find_in_blocks(models.unet, "lora_unet", "unet", DIT_TARGET_CLASSES[setup.family])
    for i, te in enumerate(trained_clips(models, setup)):
        targets += find_in_blocks(
            te, f"lora_te{i + 1}", f"te{i + 1}", TEXT_ENCODER_TARGETS, path_prefix=text_encoder_root_path(te)
        )
    return targets


def swapped_blocks(dit: nn.Module, setup: Setup) -> list[nn.Module]:
    """The blocks whose weights ``--blocks_to_swap`` keeps on the CPU (VramError when the model has too few)."""
    n = setup.blocks_to_swap
    if not n:
        return []

    def blocks_of(name: str) -> nn.ModuleList:
        return cast(nn.ModuleList, dit.get_submodule(name))  # sd-scripts' DiTs hold their blocks in ModuleLists

    if setup.family == "flux":
        groups = [
            (blocks_of("double_blocks"), n // 2, "double"),
            (blocks_of("single_blocks"), (n - n // 2) * 2, "single"),
        ]
    else:
        groups = [(blocks_of("joint_blocks"), n, "joint")]
    found: list[nn.Module] = []
    for blocks, count, kind in groups:
        if count > len(blocks) - 2:
            raise VramError(
                f"blocks_to_swap={n} swaps {count} {kind} blocks, but this model has {len(blocks)}; "
                f"allowed: at most {len(blocks) - 2} {kind} blocks (sd-scripts asserts count - 2)"
            )
        found += list(blocks)[len(blocks) - count :] if count else []
    return found


def offloaded_weights(dit: nn.Module, setup: Setup) -> list[torch.Tensor]:
    """What the offloader moves of the swapped blocks: each submodule's ``weight`` (not biases, not buffers)."""
    return block_weights(swapped_blocks(dit, setup))


def lora_parameter_count(targets: list[Target], rank: int) -> int:
    """Parameters of rank-``rank`` LoRAs on ``targets``: rank x (in + out) per Linear, as kohya's LoRAModule."""
    linears = [cast(nn.Linear, t.layer) for t in targets]  # lora_flux / lora_sd3 adapt Linears only
    return sum(rank * (layer.in_features + layer.out_features) for layer in linears)


def describe_swap(dit: nn.Module, setup: Setup) -> Optional[str]:
    """A note saying what block swap keeps off the device."""
    blocks = swapped_blocks(dit, setup)
    if not blocks:
        return None
    weights = offloaded_weights(dit, setup)
    gib = sum(w.numel() * w.element_size() for w in weights) / 1024**3
    return (
        f"blocks_to_swap {setup.blocks_to_swap}: {len(blocks)} blocks' weights ({gib:.2f} GiB) stay on the CPU; "
        "the blocks swapped in reuse the device storage of those swapped out (sd-scripts' CUDA offloader), so "
        "nothing more is counted for them; the copies' time is not estimated"
    )


def dit_notes(setup: Setup) -> list[str]:
    fused = "fused qkv and linear1" if setup.family == "flux" else "fused qkv"
    if setup.is_chroma:
        fused += "; its modulation vectors from sd-scripts' approximator layout"
    notes = [
        f"the {setup.model_name} DiT is aclora's own literal build of sd-scripts' layout ({fused} as "
        "sd-scripts has them), not sd-scripts' module"
        + ("" if setup.cache_latents else "; the autoencoder is diffusers' AutoencoderKL")
    ]
    if setup.is_chroma:
        notes.append(
            f"Chroma's text counted at all {setup.t5_tokens} T5 tokens in every sample's attention (sd-scripts "
            "trims it to the longest caption + 1 token: shorter captions use less); no CLIP-L"
        )
    if setup.train_text_encoder:
        notes.append("text encoders trained: the CLIP LoRA only; T5-XXL's (network_args train_t5xxl) is not modelled")
    return notes


__all__ = [
    "DIT_TARGET_CLASSES",
    "build_dit_models",
    "prepare_dit_models",
    "dit_targets",
    "swapped_blocks",
    "offloaded_weights",
    "lora_parameter_count",
    "trained_clips",
    "text_encoder_kind",
    "dit_config",
]
