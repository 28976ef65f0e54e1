"""A faithful, minimal replay of what sd-scripts' train_network.py does with a network module.

Tests, the demo and the benchmarks drive a network module through this replay
(the real sd-scripts runs in the end-to-end tests only). It depends only on the module
contract (``create_network`` and the network's methods) and reproduces the
facts of ``NetworkTrainer.train`` that a network can observe: the order of the
calls and their arguments, the ``args`` Namespace (including
``args.max_train_steps`` still holding sd-scripts' default 1600 when
``prepare_network`` runs and becoming final only before the loop), the base
models frozen *after* ``apply_to`` and the optimizer, ``accelerate`` wrapping,
gradient accumulation, clipping on ``get_trainable_params()``, max-norm
regularisation, and ``save_weights`` with ``ss_*`` metadata.

The training objective is sd-scripts' epsilon-prediction loss (DDPM noise,
scaled-linear betas, uniform timesteps) on pre-computed latents, with SD1.x or
SDXL text conditioning. No VAE, no tokenizer, no sample images, no resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .sdcalls import (
    SD_SCRIPTS_DEFAULT_MAX_TRAIN_STEPS,
    collate,
    make_args,
    net_kwargs_from_args,
    network_args_list,
    text_encoder_argument,
    text_encoders_of,
    training_loss,
)

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = {False: "sd_v1", True: "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {False: "stable-diffusion-v1/lora", True: "stable-diffusion-xl-v1-base/lora"}
MODELSPEC_IMPLEMENTATION = {False: "diffusers", True: "https://github.com/Stability-AI/generative-models"}


@dataclass
class ReplayResult:
    """What a replayed run leaves behind, for assertions and reports.

    ``network`` is the unwrapped network; ``losses`` holds the loss of every
    micro-batch (what sd-scripts records), ``global_step`` the optimizer steps;
    ``saved_files`` the paths ``save_weights`` was given, in order; ``metadata``
    the ``ss_*`` dict of the last save.
    """

    network: Any
    losses: List[float]
    args: argparse.Namespace
    accelerator: Any
    saved_files: List[str] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)
    global_step: int = 0
    num_train_epochs: int = 0
    net_kwargs: Dict[str, Any] = field(default_factory=dict)
    lr_descriptions: Optional[List[str]] = None
    load_info: Any = None
    optimizer: Any = None


# ---------------------------------------------------------------------------
# the network calls, in sd-scripts' order
# ---------------------------------------------------------------------------


def create_network(network_module, args: argparse.Namespace, models: Mapping[str, Any], sdxl: bool):
    """``create_network`` (or ``create_network_from_weights`` with dim_from_weights), with
    sd-scripts' kwargs; returns (network, net_kwargs as recorded in the metadata)."""
    net_kwargs = net_kwargs_from_args(args)
    text_encoder = text_encoder_argument(models, sdxl)
    vae = models.get("vae")
    if args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(
            1, args.network_weights, vae, text_encoder, models["unet"], **net_kwargs
        )
        return network, net_kwargs
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = args.network_dropout
    network = network_module.create_network(
        1.0,
        args.network_dim,
        args.network_alpha,
        vae,
        text_encoder,
        models["unet"],
        neuron_dropout=args.network_dropout,
        **net_kwargs,
    )
    return network, net_kwargs


def prepare_optimizer_params(network, args: argparse.Namespace):
    """The param groups, as sd-scripts asks for them: the multiple-te-lr variant when the
    network has it, the 3-argument form with a 2-argument fallback on TypeError,
    and a (groups, descriptions) tuple or a bare list. Returns (groups, descriptions, te_lr)."""
    multiple = hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs")
    text_encoder_lr = args.text_encoder_lr
    if not multiple and not (text_encoder_lr is None or isinstance(text_encoder_lr, (int, float))):
        text_encoder_lr = text_encoder_lr[0] if len(text_encoder_lr) else None
    try:
        if multiple:
            results = network.prepare_optimizer_params_with_multiple_te_lrs(
                text_encoder_lr, args.unet_lr, args.learning_rate
            )
        else:
            results = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr, args.learning_rate)
    except TypeError:
        return network.prepare_optimizer_params(text_encoder_lr, args.unet_lr), None, text_encoder_lr
    if type(results) is tuple:
        return results[0], results[1], text_encoder_lr
    return results, None, text_encoder_lr


def training_metadata(
    args, net_kwargs, sdxl: bool, num_train_epochs: int, batches_per_epoch: int, te_lr, n_samples: int
) -> Dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` metadata sd-scripts writes (the subset a network or a
    consumer may read); every value a string, as sd-scripts converts them."""
    started = time.time()
    metadata: Dict[str, Any] = {
        "ss_session_id": args.seed,
        "ss_training_started_at": started,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": n_samples,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_train_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_v2": bool(args.v2),
        "ss_base_model_version": BASE_MODEL_VERSION[sdxl],
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_noise_offset": args.noise_offset,
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_loss_type": args.loss_type,
        "ss_training_comment": args.training_comment,
    }
    if args.network_args:
        metadata["ss_network_args"] = json.dumps(net_kwargs)
    metadata = {key: str(value) for key, value in metadata.items()}
    metadata.update(
        {
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": MODELSPEC_ARCHITECTURE[sdxl],
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION[sdxl],
            "modelspec.title": args.output_name or "last",
            "modelspec.resolution": "1024x1024" if sdxl else "512x512",
            "modelspec.prediction_type": "epsilon",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        }
    )
    return metadata


def _save(network, args, metadata: Dict[str, str], name: str, steps: int, epoch_no: int, save_dtype) -> str:
    """sd-scripts' save_model: update ss_steps / ss_epoch, then ``save_weights``."""
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, name)
    metadata["ss_training_finished_at"] = str(time.time())
    metadata["ss_steps"] = str(steps)
    metadata["ss_epoch"] = str(epoch_no)
    network.save_weights(path, save_dtype, dict(metadata))
    return path


def _prepare_base_models(accelerator, models, text_encoders, train_unet: bool, train_text_encoder: bool):
    """Freeze and place the base models as sd-scripts does after the optimizer exists:
    requires_grad False, prepared by accelerate when trained through, eval mode."""
    unet = models["unet"]
    unet.requires_grad_(False)
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        encoder.to(accelerator.device)
    if train_unet:
        accelerator.prepare(unet)
    else:
        unet.to(accelerator.device)
    if train_text_encoder:
        for encoder in text_encoders:
            accelerator.prepare(encoder)
    unet.eval()
    for encoder in text_encoders:
        encoder.eval()


def replay_training(
    network_module,
    models: Mapping[str, Any],
    dataset: Sequence[Mapping[str, torch.Tensor]],
    *,
    sdxl: bool,
    network_dim: Optional[int] = 8,
    network_alpha: Optional[float] = 4.0,
    network_args: Optional[Mapping[str, Any]] = None,
    network_dropout: Optional[float] = None,
    epochs: Optional[int] = 2,
    max_train_steps: Optional[int] = None,
    batch_size: int = 2,
    gradient_accumulation_steps: int = 1,
    lr: float = 1e-3,
    text_encoder_lr: Union[None, float, List[float]] = None,
    unet_lr: Optional[float] = None,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    network_weights: Optional[str] = None,
    dim_from_weights: bool = False,
    max_grad_norm: Optional[float] = 1.0,
    scale_weight_norms: Optional[float] = None,
    save_path: Optional[str] = None,
    save_every_n_epochs: Optional[int] = None,
    save_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    accelerator=None,
    log_fn: Optional[Callable[[Dict[str, Any]], None]] = None,
    network_module_name: str = "networks.aclora",
) -> ReplayResult:
    """Train ``network_module``'s network on ``dataset`` the way sd-scripts' train_network.py would.

    The run length is ``epochs`` (sd-scripts' --max_train_epochs) unless
    ``max_train_steps`` is given. ``network_args`` values are passed as strings.
    A float ``text_encoder_lr`` becomes a one-element list, as
    ``--text_encoder_lr 1e-4`` does on sd-scripts' command line.
    Files are written only with ``save_path`` (the final file; epoch files sit
    beside it as ``<stem>-<epoch:06d><suffix>``). ``models`` are changed in
    place (frozen, patched by the network), as in sd-scripts.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not (train_unet or train_text_encoder):
        raise ValueError("at least one of train_unet and train_text_encoder must be True")
    if accelerator is None:
        accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
    elif accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
        raise ValueError(
            f"accelerator accumulates {accelerator.gradient_accumulation_steps} steps, "
            f"but gradient_accumulation_steps={gradient_accumulation_steps}"
        )
    set_seed(seed)

    output_dir, output_name, extension = None, None, ".safetensors"
    if save_path is not None:
        output_dir = os.path.dirname(os.path.abspath(save_path))
        output_name, extension = os.path.splitext(os.path.basename(save_path))
    args = make_args(
        network_module=network_module_name,
        network_dim=network_dim,
        network_alpha=network_alpha,
        network_dropout=network_dropout,
        network_args=network_args_list(network_args),
        network_weights=network_weights,
        dim_from_weights=dim_from_weights,
        network_train_unet_only=not train_text_encoder,
        network_train_text_encoder_only=not train_unet,
        learning_rate=lr,
        unet_lr=unet_lr,
        text_encoder_lr=[text_encoder_lr] if isinstance(text_encoder_lr, (int, float)) else text_encoder_lr,
        max_train_steps=max_train_steps if max_train_steps is not None else SD_SCRIPTS_DEFAULT_MAX_TRAIN_STEPS,
        max_train_epochs=None if max_train_steps is not None else epochs,
        train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=0.0 if max_grad_norm is None else max_grad_norm,
        scale_weight_norms=scale_weight_norms,
        save_every_n_epochs=save_every_n_epochs,
        save_model_as=extension.lstrip("."),
        output_dir=output_dir,
        output_name=output_name,
        seed=seed,
    )
    text_encoders = text_encoders_of(models, sdxl)
    text_encoder = text_encoder_argument(models, sdxl)
    unet = models["unet"]

    network, net_kwargs = create_network(network_module, args, models, sdxl)
    if hasattr(network, "prepare_network"):
        network.prepare_network(args)
    if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
        logger.warning("scale_weight_norms is set but the network has no apply_max_norm_regularization")
        args.scale_weight_norms = False
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    load_info = None
    if args.network_weights is not None:
        load_info = network.load_weights(args.network_weights)
        logger.info("load network weights from %s: %s", args.network_weights, load_info)

    param_groups, lr_descriptions, te_lr = prepare_optimizer_params(network, args)
    optimizer = torch.optim.AdamW(param_groups, lr=args.learning_rate)
    loader = torch.utils.data.DataLoader(list(dataset), batch_size=batch_size, shuffle=True, collate_fn=collate)
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * math.ceil(
            len(loader) / accelerator.num_processes / args.gradient_accumulation_steps
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    _prepare_base_models(accelerator, models, text_encoders, train_unet, train_text_encoder)
    network, optimizer, loader, scheduler = accelerator.prepare(network, optimizer, loader, scheduler)
    accelerator.unwrap_model(network).prepare_grad_etc(text_encoder, unet)

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    metadata = training_metadata(args, net_kwargs, sdxl, num_train_epochs, len(loader), te_lr, len(dataset))
    on_step_start = getattr(accelerator.unwrap_model(network), "on_step_start", None)

    result = ReplayResult(
        network=None,
        losses=[],
        args=args,
        accelerator=accelerator,
        metadata=metadata,
        num_train_epochs=num_train_epochs,
        net_kwargs=net_kwargs,
        lr_descriptions=lr_descriptions,
        load_info=load_info,
    )
    global_step = 0
    for epoch in range(num_train_epochs):
        metadata["ss_epoch"] = str(epoch + 1)
        accelerator.unwrap_model(network).on_epoch_start(text_encoder, unet)
        for step, batch in enumerate(loader):
            with accelerator.accumulate(network):
                if on_step_start is not None:
                    on_step_start(text_encoder, unet)
                loss = training_loss(accelerator, models, text_encoders, batch, sdxl, train_unet, train_text_encoder)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm != 0.0:
                    trainable = accelerator.unwrap_model(network).get_trainable_params()
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            norm_stats = None
            if args.scale_weight_norms:
                norm_stats = accelerator.unwrap_model(network).apply_max_norm_regularization(
                    args.scale_weight_norms, accelerator.device
                )
            if accelerator.sync_gradients:
                global_step += 1
            result.losses.append(loss.detach().item())
            if log_fn is not None:
                log_fn(
                    {
                        "epoch": epoch + 1,
                        "step": step,
                        "global_step": global_step,
                        "loss": result.losses[-1],
                        "sync_gradients": accelerator.sync_gradients,
                        "max_norm": norm_stats,
                    }
                )
            if global_step >= args.max_train_steps:
                break
        logger.debug("epoch %d/%d done, global step %d", epoch + 1, num_train_epochs, global_step)
        accelerator.wait_for_everyone()
        if (
            save_path is not None
            and args.save_every_n_epochs is not None
            and (epoch + 1) % args.save_every_n_epochs == 0
            and (epoch + 1) < num_train_epochs
        ):
            name = f"{args.output_name}-{epoch + 1:06d}.{args.save_model_as}"
            result.saved_files.append(
                _save(accelerator.unwrap_model(network), args, metadata, name, global_step, epoch + 1, save_dtype)
            )

    network = accelerator.unwrap_model(network)
    accelerator.end_training()
    if save_path is not None:
        name = f"{args.output_name}.{args.save_model_as}"
        result.saved_files.append(_save(network, args, metadata, name, global_step, num_train_epochs, save_dtype))
    result.network = network
    result.global_step = global_step
    result.optimizer = optimizer
    return result
