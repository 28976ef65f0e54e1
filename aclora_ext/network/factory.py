"""Building networks: sd-scripts' ``create_network`` / ``create_network_from_weights``, and ``attach`` for any model."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, cast

import torch
from torch import nn

from ..families import check_model_family, detect
from ..families.base import as_list, check_patterns, find_by_patterns
from ..files.lora_dict import check_shapes, group_modules, module_alpha, module_rank
from ..files.storage import LoRAFileError, load_state_dict, metadata_ranks, read_metadata
from ..options import OptionError, parse_network_args, parse_positive
from .network import ACLoRANetwork

logger = logging.getLogger(__name__)

DEFAULT_MAX_RANK = 64
DEFAULT_ALPHA = 1.0


def create_network(
    multiplier: float,
    network_dim: Optional[int | str],
    network_alpha: Optional[float | str],
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: Optional[float] = None,
    **kwargs: Any,
) -> ACLoRANetwork:
    """sd-scripts' entry point: an AC-LoRA network at maximum rank ``network_dim`` on the U-Net and text encoder(s)."""
    if network_dim is None:
        logger.info("AC-LoRA: network_dim not given; using maximum rank %d", DEFAULT_MAX_RANK)
    max_rank = parse_positive("network_dim", network_dim, DEFAULT_MAX_RANK, int)
    if network_alpha is None:
        logger.info("AC-LoRA: network_alpha not given; using %g (like networks.lora)", DEFAULT_ALPHA)
    alpha = parse_positive("network_alpha", network_alpha, DEFAULT_ALPHA, float, allow_zero=True)
    if alpha == 0:
        logger.info("AC-LoRA: network_alpha=0 means alpha = rank (scale 1), as in networks.lora")
        alpha = float(max_rank)
    text_encoders = as_list(text_encoder)
    family = detect(unet, text_encoders)
    config = parse_network_args(kwargs, max_rank=max_rank, family=family.key)
    if config.dropout is None and neuron_dropout is not None:
        config = config.replace(dropout=parse_network_args({"dropout": neuron_dropout}).dropout)
    conv3x3 = config.conv_dim is not None
    targets = family.with_learning_rates(family.targets(text_encoders, unet, config), config)
    model = family.name(unet, text_encoders)
    if not targets:
        raise ValueError(
            f"AC-LoRA: no layer to adapt in the given {model} model and text encoder(s) (none of the "
            "layers sd-scripts' LoRA module targets there, or the options left none)"
        )
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv_rank = config.conv_dim if config.conv_dim is not None else max_rank  # conv3x3: conv_dim is set
    for t in targets:
        conv = t.is_conv3x3 and conv3x3  # a rank an option gives a layer comes with network_alpha
        rank = t.rank if t.rank is not None else conv_rank if conv else max_rank
        ranks[t.lora_name], alphas[t.lora_name] = rank, (config.conv_alpha or DEFAULT_ALPHA) if conv else alpha
    with_lr = sum(t.reg_lr is not None for t in targets)
    logger.info(
        "AC-LoRA: %s, maximum rank %d, alpha %g%s%s%s, %s",
        model,
        max_rank,
        alpha,
        f", 3x3 conv rank {config.conv_dim}" if conv3x3 else "",
        f", other ranks set by options on {sum(t.rank is not None for t in targets)} modules"
        if any(t.rank is not None for t in targets)
        else "",
        f", learning rates set by network_reg_lrs on {with_lr} modules" if config.network_reg_lrs else "",
        _describe(config),
    )
    return ACLoRANetwork(
        targets,
        ranks,
        alphas,
        multiplier,
        config,
        is_sdxl=model == "SDXL",
        train_t5xxl=any(t.part == family.t5_part for t in targets),
        prediction=family.prediction,
        model=model,
        clean_latents=family.clean_latents,
    )


def _describe(config) -> str:
    if config.restart_mode == "off":
        return "restarts off (plain LoRA)"
    every = (
        f"every {config.restart_every_steps} steps"
        if config.restart_every_steps
        else f"every {config.restart_every} epochs"
        if config.restart_every
        else "every tenth of the run"
    )
    return f"RESTART {config.restart_mode} mode {every}"


def create_network_from_weights(
    multiplier: float,
    file: Optional[str],
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: Optional[dict] = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[ACLoRANetwork, dict]:
    """A network whose modules and ranks are those of a LoRA file (ours or any kohya LoRA).

    Used by sd-scripts for ``--base_weights`` (then ``merge_to``) and
    ``--dim_from_weights`` (then training continues at the file's ranks).
    """
    if weights_sd is None:
        if file is None:
            raise LoRAFileError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_state_dict(file)
    source = str(file) if file is not None else "weights_sd"
    meta = read_metadata(file) if file is not None and str(file).endswith(".safetensors") else {}
    modules = group_modules(weights_sd, source)
    conv3x3 = any(
        p["lora_down.weight"].dim() == 4 and p["lora_down.weight"].shape[2:] != (1, 1) for p in modules.values()
    )
    text_encoders = as_list(text_encoder)
    family = detect(unet, text_encoders)
    candidates = {t.lora_name: t for t in family.layers(text_encoders, unet, conv3x3)}
    check_model_family(modules, candidates, source)
    present = [name for name in modules if name in candidates]
    unknown = sorted(set(modules) - set(candidates))
    if not present:
        raise LoRAFileError(
            f"{source}: none of its {len(modules)} LoRA modules exists in this model "
            f"(e.g. {unknown[0]}); is it for another model (SD1.x vs SDXL)?"
        )
    if unknown:
        logger.warning(
            "AC-LoRA: %d module(s) of %s do not exist in this model and are ignored: %s",
            len(unknown),
            source,
            ", ".join(unknown[:10]),
        )
    config = parse_network_args(kwargs, family=family.key)
    targets = family.with_learning_rates([candidates[name] for name in present], config)
    if config.network_reg_lrs and family.matches_paths:
        logger.warning(
            "AC-LoRA: network_reg_lrs is not applied to a %s network made from a file (its patterns match "
            "module paths, which a file does not have); every module trains at its part's learning rate",
            family.name(unet, text_encoders),
        )
    ranks = {n: module_rank(modules[n]) for n in present}
    alphas = {n: module_alpha(modules[n]) for n in present}
    signal = metadata_ranks(meta, source)
    network = ACLoRANetwork(
        targets,
        ranks,
        alphas,
        multiplier,
        config,
        is_sdxl=family.name(unet, text_encoders) == "SDXL",
        signal_ranks=signal,
        train_t5xxl=any(t.part == family.t5_part for t in targets),
        prediction=family.prediction,
        model=family.name(unet, text_encoders),
        clean_latents=family.clean_latents,
    )
    check_shapes(
        {n: modules[n] for n in present}, {m.lora_name: m for m in network.loras}, source, allow_smaller_rank=False
    )
    return network, weights_sd


def attach(
    model: nn.Module,
    max_rank: int = DEFAULT_MAX_RANK,
    alpha: Optional[float] = None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    multiplier: float = 1.0,
    prefix: str = "lora",
    **options: Any,
) -> ACLoRANetwork:
    """Attach AC-LoRA to the Linear/Conv2d layers of any model whose module path matches ``include``.

    ``options`` are the same as ``--network_args`` (e.g. ``restart_mode="product"``,
    ``restart_every_steps=100``). The network is applied (forwards hooked) and
    returned; train ``network.parameters()``, call ``network.record_loss(loss)``
    each step (or use accelerate's backward) and ``network.on_epoch_start()``
    each epoch, or call ``network.restart()`` yourself.
    """
    check_patterns(include, "include")
    check_patterns(exclude, "exclude")
    rank = parse_positive("max_rank", max_rank, DEFAULT_MAX_RANK, int)
    alpha_value = parse_positive("alpha", alpha, float(rank), float)
    config = parse_network_args(options, max_rank=rank)
    targets = find_by_patterns(model, include, exclude, prefix)
    if not targets:
        raise ValueError(
            f"attach: no Linear/Conv2d layer of {type(model).__name__} matches include={list(include)} "
            f"exclude={list(exclude)}"
        )
    ranks = {t.lora_name: rank for t in targets}
    alphas = {t.lora_name: alpha_value for t in targets}
    network = ACLoRANetwork(targets, ranks, alphas, multiplier, config)
    network.to(
        cast(torch.Tensor, targets[0].layer.weight).device
    )  # the factors live beside the layers (they stay float32)
    network.apply_to(None, None, True, True)
    return network


__all__ = ["create_network", "create_network_from_weights", "attach", "OptionError"]
