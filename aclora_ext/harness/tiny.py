"""Tiny random-weight stand-ins for SD1.x / SDXL models, and synthetic training data.

Everything here is built in-process from literal configs: no download, no hub,
no checkpoint. The models keep the *layout* that matters to a kohya network
module (the class names it targets, the module paths it turns into LoRA names,
the SDXL conditioning inputs) at a size that trains in seconds on a CPU.

diffusers and transformers are imported inside the functions: the package's
runtime dependencies are only torch and safetensors, these builders are for
tests, the demo and the benchmarks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Token ids of the tiny CLIP vocabulary. They sit inside every tiny vocabulary so
# that transformers neither warns nor pools at an out-of-range position.
BOS_TOKEN_ID = 0
PAD_TOKEN_ID = 1
EOS_TOKEN_ID = 2
TRIGGER_TOKEN_ID = 7
FIRST_WORD_TOKEN_ID = 10

# SDXL-like tiny text encoders: te1 hidden 32, te2 hidden 64 with a 32-dim projection.
TINY_TE1_HIDDEN = 32
TINY_TE2_HIDDEN = 64
TINY_TE2_PROJECTION = 32
TINY_ADDITION_TIME_EMBED_DIM = 8


# ---------------------------------------------------------------------------
# U-Nets
# ---------------------------------------------------------------------------


def tiny_sd1_unet(seed: int = 0) -> nn.Module:
    """A diffusers U-Net with SD1.x's layout (attention at the high resolution,
    plain blocks at the lowest, cross-attention mid block, 1x1-conv projections)
    shrunk to 32/64 channels so a training step costs milliseconds."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel  # typed (diffusers' lazy root is not)

    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=TINY_TE1_HIDDEN,
            attention_head_dim=4,
            use_linear_projection=False,
        )
    return _frozen_eval(unet)


def tiny_sdxl_unet(seed: int = 0) -> nn.Module:
    """A diffusers U-Net with SDXL's layout: no attention at the first level,
    several transformer layers per block deeper down, linear projections, and the
    "text_time" added conditioning (pooled te2 embedding + 6 size/crop values)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel  # typed (diffusers' lazy root is not)

    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=8,
            cross_attention_dim=TINY_TE1_HIDDEN + TINY_TE2_HIDDEN,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TINY_TE2_PROJECTION + 6 * TINY_ADDITION_TIME_EMBED_DIM,
        )
    return _frozen_eval(unet)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG (diffusers and transformers initialise from it) inside a
    fork, so building a model never disturbs the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _frozen_eval(model: nn.Module) -> nn.Module:
    """Base models arrive frozen and in eval mode, as sd-scripts leaves them."""
    model.requires_grad_(False)
    model.eval()
    return model


# ---------------------------------------------------------------------------
# Text encoders and the two transformers layouts
# ---------------------------------------------------------------------------


def _tiny_clip_config(hidden_size: int, layers: int, projection_dim: int, vocab_size: int = 1000):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )


def tiny_clip_text_encoder(
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    with_projection: bool = False,
    projection_dim: int = 32,
) -> nn.Module:
    """A random CLIP text encoder (CLIPTextModel, or CLIPTextModelWithProjection
    for SDXL's te2) in whatever module-path spelling the installed transformers uses."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _tiny_clip_config(hidden_size, layers, projection_dim)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        model = cls(config)
    return _frozen_eval(model)


def has_text_model_level(model: nn.Module) -> bool:
    """True when the model's module paths read ``text_model.encoder...``
    (transformers 4.x CLIPTextModel, and CLIPTextModelWithProjection in both)."""
    return any(name.startswith("text_model.") for name, _ in model.named_modules())


class CLIPTextModel(nn.Module):
    """A re-spelling wrapper named like transformers' class, so that code which
    detects text encoders by class name treats it as the real thing.

    It shares the wrapped model's submodules (patching a Linear here patches the
    wrapped model) and forwards ``input_ids`` and keyword options unchanged.
    Built only by :func:`as_transformers4_layout` / :func:`as_transformers5_layout`.
    """

    def __init__(self, runner: nn.Module, children: Dict[str, nn.Module], config: Any):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        # Held outside the module tree so its (shared) parameters are not listed twice.
        object.__setattr__(self, "_runner", runner)
        self.config = config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return self._runner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _is_projection_model(model: nn.Module) -> bool:
    return type(model).__name__ == "CLIPTextModelWithProjection"


def as_transformers4_layout(model: nn.Module) -> nn.Module:
    """The CLIPTextModel spelled as transformers 4.x does (``text_model.encoder.layers.0...``).

    Returned unchanged when it already has that spelling (and for
    CLIPTextModelWithProjection, which both versions spell with ``text_model.``).
    """
    if _is_projection_model(model) or has_text_model_level(model):
        return model
    wrapper = CLIPTextModel(model, {"text_model": model}, model.config)
    wrapper.train(model.training)
    return wrapper


def as_transformers5_layout(model: nn.Module) -> nn.Module:
    """The CLIPTextModel spelled as transformers 5.x does (``encoder.layers.0...``).

    Returned unchanged when it already has that spelling (and for
    CLIPTextModelWithProjection, which both versions spell with ``text_model.``).
    """
    if _is_projection_model(model) or not has_text_model_level(model):
        return model
    inner = model.get_submodule("text_model")
    children = dict(inner.named_children())
    wrapper = CLIPTextModel(inner, children, model.config)
    wrapper.train(model.training)
    return wrapper


# ---------------------------------------------------------------------------
# Model bundles
# ---------------------------------------------------------------------------


def sd1_models(seed: int = 0, pretrained: bool = False) -> Dict[str, Any]:
    """A tiny SD1.x-like model set: U-Net, one CLIP text encoder, no VAE (data are latents).

    With ``pretrained`` the U-Net is a denoiser of generic latents (see
    :func:`pretrain_unet`) instead of random, so training losses start well below 1.
    """
    models: Dict[str, Any] = {
        "unet": tiny_sd1_unet(seed),
        "text_encoder": tiny_clip_text_encoder(seed + 1, hidden_size=TINY_TE1_HIDDEN),
        "vae": None,
    }
    if pretrained:
        models["unet"].load_state_dict(_pretrained_unet_state(False, seed))
    return models


def sdxl_models(seed: int = 0, pretrained: bool = False) -> Dict[str, Any]:
    """A tiny SDXL-like model set: U-Net, [CLIPTextModel, CLIPTextModelWithProjection], no VAE.

    te1 has 3 layers: SDXL reads te1's penultimate hidden state (hidden_states[11]
    of 13), so, as with the real model, its last layer gets no gradient while the
    layers below it do. ``pretrained`` as for :func:`sd1_models`.
    """
    te1 = tiny_clip_text_encoder(seed + 1, hidden_size=TINY_TE1_HIDDEN, layers=3)
    te2 = tiny_clip_text_encoder(
        seed + 2, hidden_size=TINY_TE2_HIDDEN, layers=2, with_projection=True, projection_dim=TINY_TE2_PROJECTION
    )
    models: Dict[str, Any] = {"unet": tiny_sdxl_unet(seed), "text_encoders": [te1, te2], "vae": None}
    if pretrained:
        models["unet"].load_state_dict(_pretrained_unet_state(True, seed))
    return models


# ---------------------------------------------------------------------------
# Synthetic "style" data
# ---------------------------------------------------------------------------


def _style_patterns(generator: torch.Generator, n_patterns: int, channels: int, size: int) -> torch.Tensor:
    """``n_patterns`` smooth fields (K, C, H, W) of unit RMS: low spatial
    frequencies with random phases, mixed across channels."""
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    patterns = []
    for _ in range(n_patterns):
        fx, fy = torch.randint(0, 2, (2,), generator=generator).tolist()
        fx = fx if fx or fy else 1
        phase = torch.rand(channels, 1, 1, generator=generator) * 2 * math.pi
        weight = torch.randn(channels, 1, 1, generator=generator)
        field = weight * torch.cos(2 * math.pi * (fx * xx + fy * yy) + phase)
        patterns.append(field / field.pow(2).mean().sqrt())
    return torch.stack(patterns)


def style_dataset(
    n: int = 15,
    size: int = 8,
    channels: int = 4,
    seed: int = 0,
    vocab_size: int = 1000,
    seq_len: int = 8,
    n_patterns: int = 3,
    noise_level: float = 0.5,
) -> List[Dict[str, torch.Tensor]]:
    """A learnable style: every latent is a random mix of the same few
    low-frequency patterns (the signal a low-rank adapter should capture) plus
    white noise exclusive to that sample (what it should not spend rank on).

    Captions are ``[trigger, per-sample words..., EOS]`` token ids, so the
    trigger is shared and the words are not. Deterministic by ``seed``; the
    patterns depend only on ``seed``, so two calls with one seed and different
    ``n`` share the style and their first samples.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 (trigger, a word, EOS), got {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    patterns = _style_patterns(generator, n_patterns, channels, size)
    mean_mix = 1.0 + torch.rand(n_patterns, generator=generator)
    samples = []
    for _ in range(n):
        mix = mean_mix * (1.0 + 0.25 * torch.randn(n_patterns, generator=generator))
        signal = torch.einsum("k,kchw->chw", mix, patterns)
        exclusive = torch.randn(channels, size, size, generator=generator)
        latents = (signal + noise_level * exclusive) / math.sqrt(float(mean_mix.pow(2).sum()) + noise_level**2)
        words = torch.randint(FIRST_WORD_TOKEN_ID, vocab_size, (seq_len - 2,), generator=generator)
        input_ids = torch.cat([torch.tensor([TRIGGER_TOKEN_ID]), words, torch.tensor([EOS_TOKEN_ID])])
        samples.append({"latents": latents, "input_ids": input_ids.long()})
    return samples


def style_split(n_train: int = 15, n_holdout: int = 5, **kwargs: Any) -> Tuple[list, list]:
    """(train, held-out) samples of one style: same patterns, disjoint exclusive parts."""
    samples = style_dataset(n=n_train + n_holdout, **kwargs)
    return samples[:n_train], samples[n_train:]


# ---------------------------------------------------------------------------
# Pretrained-like base U-Nets
# ---------------------------------------------------------------------------

PRETRAIN_STEPS = 40
PRETRAIN_BATCH = 16
PRETRAIN_LR = 2e-3
GENERIC_SAMPLES = 256
GENERIC_PATTERNS = 8
GENERIC_SEED_OFFSET = 1000


def pretrain_unet(models: Dict[str, Any], sdxl: bool, steps: int = PRETRAIN_STEPS, seed: int = 0) -> float:
    """Fine-tune the whole U-Net (text encoders untouched) as an epsilon predictor of
    *generic* latents: many patterns, none of them the style's.

    A random U-Net predicts noise worse than predicting zero (loss > 1), which
    no real base model does; after ~40 steps the tiny U-Net reaches a loss of
    about 0.15 on generic data and 0.3 on an unseen style, leaving a LoRA
    something real to learn. Deterministic by ``seed`` on one device; the U-Net
    is left frozen and in eval mode. Returns the mean loss of the last 10 steps.
    """
    from .sdcalls import add_noise, call_unet, collate, encode_text, text_encoders_of

    generator = torch.Generator().manual_seed(seed + GENERIC_SEED_OFFSET)
    generic = style_dataset(n=GENERIC_SAMPLES, seed=seed + GENERIC_SEED_OFFSET, n_patterns=GENERIC_PATTERNS)
    unet, text_encoders = models["unet"], text_encoders_of(models, sdxl)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PRETRAIN_LR)
    unet.requires_grad_(True)
    unet.train()
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            picks = torch.randint(0, GENERIC_SAMPLES, (PRETRAIN_BATCH,), generator=generator).tolist()
            batch = collate([generic[i] for i in picks])
            latents = batch["latents"]
            with torch.no_grad():
                conds = encode_text(text_encoders, batch["input_ids"], sdxl)
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (PRETRAIN_BATCH,), generator=generator)
            prediction = call_unet(unet, add_noise(latents, noise, timesteps), timesteps, conds, sdxl)
            loss = torch.nn.functional.mse_loss(prediction, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    _frozen_eval(unet)
    tail = losses[-10:]
    final = sum(tail) / len(tail)
    logger.debug("pretrained tiny %s U-Net: loss %.3f -> %.3f", "SDXL" if sdxl else "SD1", losses[0], final)
    return final


@functools.lru_cache(maxsize=8)
def _pretrained_unet_state(sdxl: bool, seed: int) -> Dict[str, torch.Tensor]:
    """Pretrain once per process and (kind, seed); later builds just load the weights."""
    models = sdxl_models(seed) if sdxl else sd1_models(seed)
    pretrain_unet(models, sdxl, seed=seed)
    return {key: value.detach().clone() for key, value in models["unet"].state_dict().items()}


# ---------------------------------------------------------------------------
# The real SDXL LoRA module set, from meta-device models
# ---------------------------------------------------------------------------
