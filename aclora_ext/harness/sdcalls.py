"""sd-scripts' side of a training step, as a network module sees it: the ``args`` Namespace and the
kwargs it passes, the text encoders and their conditioning, the DDPM objective (epsilon prediction,
scaled-linear betas, uniform timesteps) on pre-computed latents, and fixed-noise losses for scoring.

Used by the sd-scripts replay (``replay``), the tiny models' pre-training, the benchmarks, the demo and
``aclora vram``'s simulated step. diffusers and transformers are never imported here.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

# sd-scripts' argparse default for --max_train_steps: what prepare_network sees
# when the run length is given in epochs.
SD_SCRIPTS_DEFAULT_MAX_TRAIN_STEPS = 1600
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
LATENT_TO_PIXEL = 8


# ---------------------------------------------------------------------------
# args, kwargs and models as sd-scripts hands them over
# ---------------------------------------------------------------------------


def network_args_list(network_args: Optional[Mapping[str, Any]]) -> Optional[List[str]]:
    """``--network_args`` as argparse stores it: a list of "key=value" strings (or None)."""
    if not network_args:
        return None
    return [f"{key}={value}" for key, value in network_args.items()]


def net_kwargs_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The kwargs sd-scripts builds from ``args.network_args``: every value a str."""
    kwargs: Dict[str, Any] = {}
    for item in args.network_args or []:
        key, value = item.split("=", 1)
        kwargs[key] = value
    return kwargs


def make_args(**overrides: Any) -> argparse.Namespace:
    """An ``args`` Namespace with the attributes of sd-scripts' parser that a
    network may read, at sd-scripts' defaults unless overridden."""
    defaults: Dict[str, Any] = {
        "network_module": "networks.aclora",
        "network_dim": None,
        "network_alpha": 1.0,
        "network_dropout": None,
        "network_args": None,
        "network_weights": None,
        "dim_from_weights": False,
        "network_train_unet_only": False,
        "network_train_text_encoder_only": False,
        "base_weights": None,
        "learning_rate": 2.0e-6,
        "unet_lr": None,
        "text_encoder_lr": None,
        "optimizer_type": "AdamW",
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "max_train_steps": SD_SCRIPTS_DEFAULT_MAX_TRAIN_STEPS,
        "max_train_epochs": None,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,
        "max_grad_norm": 1.0,
        "scale_weight_norms": None,
        "mixed_precision": "no",
        "full_fp16": False,
        "full_bf16": False,
        "fp8_base": False,
        "save_precision": None,
        "save_model_as": "safetensors",
        "save_every_n_epochs": None,
        "save_every_n_steps": None,
        "save_state": False,
        "output_dir": None,
        "output_name": None,
        "no_metadata": False,
        "seed": None,
        "v2": False,
        "v_parameterization": False,
        "clip_skip": None,
        "max_token_length": None,
        "cache_latents": True,
        "cache_text_encoder_outputs": False,
        "noise_offset": None,
        "min_snr_gamma": None,
        "loss_type": "l2",
        "lowram": False,
        "training_comment": None,
        "pretrained_model_name_or_path": None,
    }
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"make_args: unknown sd-scripts arguments {sorted(unknown)}")
    defaults.update(overrides)
    return argparse.Namespace(**defaults)


def text_encoders_of(models: Mapping[str, Any], sdxl: bool) -> List[nn.Module]:
    """The text encoders as a list: [te] for SD1.x, [te1, te2] for SDXL."""
    if "text_encoders" in models:
        encoders = list(models["text_encoders"])
    else:
        encoders = [models["text_encoder"]]
    expected = 2 if sdxl else 1
    if len(encoders) != expected:
        raise ValueError(f"{'SDXL' if sdxl else 'SD1.x'} needs {expected} text encoder(s), got {len(encoders)}")
    return encoders


def text_encoder_argument(models: Mapping[str, Any], sdxl: bool) -> Union[nn.Module, List[nn.Module]]:
    """``text_encoder`` as sd-scripts passes it to the network: one model, or a list of two (SDXL)."""
    encoders = text_encoders_of(models, sdxl)
    return encoders if sdxl else encoders[0]


# ---------------------------------------------------------------------------
# the diffusion objective
# ---------------------------------------------------------------------------


def alphas_cumprod(device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """DDPM ᾱ_t of sd-scripts' noise scheduler (scaled-linear betas, 1000 steps)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(device=device, dtype=torch.float32)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε."""
    abar = alphas_cumprod(latents.device)[timesteps].view(-1, 1, 1, 1)
    return abar.sqrt() * latents + (1.0 - abar).sqrt() * noise


def collate(samples: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack a list of dataset samples into a batch."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in ("latents", "input_ids")}


Batch = Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]]


def _as_batch(batch: Batch) -> Dict[str, torch.Tensor]:
    return dict(batch) if isinstance(batch, Mapping) else collate(batch)


def _eos_pool(text_encoder: nn.Module, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """te2's pooled embedding as sd-scripts computes it: the final hidden state at
    the first EOS token, through the text projection."""
    config: Any = text_encoder.config  # transformers' config (nn.Module types attributes as tensors or modules)
    positions = (input_ids == config.eos_token_id).int().argmax(dim=-1)
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=positions.device), positions]
    return text_encoder.get_submodule("text_projection")(pooled)


def encode_text(text_encoders: Sequence[nn.Module], input_ids: torch.Tensor, sdxl: bool) -> List[torch.Tensor]:
    """Text conditioning: SD1.x the last hidden state; SDXL the penultimate hidden
    states of te1 and te2 plus te2's pooled projection."""
    if not sdxl:
        return [text_encoders[0](input_ids).last_hidden_state]
    te1, te2 = text_encoders
    hidden1 = te1(input_ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(input_ids, output_hidden_states=True)
    pool2 = _eos_pool(te2, out2.last_hidden_state, input_ids)
    return [hidden1, out2.hidden_states[-2], pool2]


def sdxl_time_ids(latents: torch.Tensor) -> torch.Tensor:
    """SDXL's size conditioning (original size, crop top-left, target size) for uncropped images."""
    height, width = (dim * LATENT_TO_PIXEL for dim in latents.shape[-2:])
    row = torch.tensor([height, width, 0, 0, height, width], dtype=latents.dtype, device=latents.device)
    return row.expand(latents.shape[0], 6)


def call_unet(
    unet: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conds: Sequence[torch.Tensor], sdxl: bool
) -> torch.Tensor:
    """The U-Net's noise prediction with SD1.x or SDXL conditioning."""
    if not sdxl:
        return unet(noisy_latents, timesteps, conds[0]).sample
    hidden1, hidden2, pool2 = conds
    added = {"text_embeds": pool2, "time_ids": sdxl_time_ids(noisy_latents)}
    return unet(noisy_latents, timesteps, torch.cat([hidden1, hidden2], dim=2), added_cond_kwargs=added).sample


def _model_device(models: Mapping[str, Any]) -> torch.device:
    return next(models["unet"].parameters()).device


def _fixed_noise(latents: torch.Tensor, seed: int):
    """Noise and timesteps drawn from a private generator: the same for every call with one seed."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=generator)
    return noise.to(latents.device), timesteps.to(latents.device)


@torch.no_grad()
def model_outputs(models: Mapping[str, Any], batch: Batch, sdxl: bool, seed: int = 0) -> torch.Tensor:
    """The U-Net's output for a fixed noisy input (fixed noise and timesteps per seed),
    for checking that a network leaves the base model's function unchanged."""
    data = _as_batch(batch)
    device = _model_device(models)
    latents = data["latents"].to(device)
    noise, timesteps = _fixed_noise(latents, seed)
    conds = encode_text(text_encoders_of(models, sdxl), data["input_ids"].to(device), sdxl)
    return call_unet(models["unet"], add_noise(latents, noise, timesteps), timesteps, conds, sdxl)


@torch.no_grad()
def fixed_batch_loss(
    network: Optional[nn.Module], models: Mapping[str, Any], batch: Batch, sdxl: bool, seed: int = 0, repeats: int = 1
) -> float:
    """The training objective on a fixed batch with fixed noise and timesteps, averaged
    over ``repeats`` noise draws: comparable before and after training.

    The models compute with whatever network is applied to them; ``network``
    (when given) is only switched to eval mode for the measurement, so dropout
    does not blur the comparison, and switched back afterwards.
    """
    data = _as_batch(batch)
    was_training = network.training if network is not None else False
    if network is not None:
        network.eval()
    try:
        losses = []
        for repeat in range(repeats):
            noise = _fixed_noise(data["latents"], seed + repeat)[0]
            prediction = model_outputs(models, data, sdxl, seed + repeat)
            losses.append(torch.nn.functional.mse_loss(prediction.float(), noise.to(prediction.device).float()).item())
    finally:
        if network is not None:
            network.train(was_training)
    return sum(losses) / len(losses)


def training_loss(
    accelerator,
    models,
    text_encoders,
    batch,
    sdxl: bool,
    train_unet: bool,
    train_text_encoder: bool,
    train_util: Any = None,
) -> torch.Tensor:
    """One micro-batch of sd-scripts' objective, drawing noise and timesteps from the global RNG.

    With ``train_util`` (a module like sd-scripts' ``library.train_util``; ``harness.train_util``), the
    latents are noised and the per-element loss computed through its functions, as train_network.py
    calls them, and reduced per item, then over the batch."""
    device = accelerator.device
    latents = batch["latents"].to(device)
    with torch.set_grad_enabled(train_text_encoder), accelerator.autocast():
        conds = encode_text(text_encoders, batch["input_ids"].to(device), sdxl)
    if train_util is not None:
        noise, noisy_latents, timesteps = train_util.get_noise_noisy_latents_and_timesteps(None, None, latents)
    else:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), device=device)
        noisy_latents = add_noise(latents, noise, timesteps)
    noisy_latents = noisy_latents.requires_grad_(train_unet)
    with accelerator.autocast():
        prediction = call_unet(models["unet"], noisy_latents, timesteps, conds, sdxl)
    if train_util is None:
        return torch.nn.functional.mse_loss(prediction.float(), noise.float())
    loss = train_util.conditional_loss(prediction.float(), noise.float(), "l2", "none", None)
    return loss.mean(dim=list(range(1, loss.ndim))).mean()
