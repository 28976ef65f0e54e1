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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union, cast

import torch

from . import train_util
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


@dataclass(frozen=True)
class NetworkSetup:
    """The network sd-scripts is asked for: its ``--network_*`` options.

    ``args`` values are passed as strings (``--network_args key=value``); ``weights``
    (``--network_weights``) are loaded after ``apply_to``, or with ``dim_from_weights`` the network
    is created from them; ``train_unet`` / ``train_text_encoder`` are the negations of
    ``--network_train_text_encoder_only`` / ``--network_train_unet_only``.
    """

    dim: Optional[int] = 8
    alpha: Optional[float] = 4.0
    args: Optional[Mapping[str, Any]] = None
    dropout: Optional[float] = None
    weights: Optional[str] = None
    dim_from_weights: bool = False
    train_unet: bool = True
    train_text_encoder: bool = True

    def __post_init__(self) -> None:
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("at least one of train_unet and train_text_encoder must be True")


@dataclass(frozen=True)
class Schedule:
    """How sd-scripts steps: the run's length, batches, learning rates, gradient clipping, the seed.

    The run length is ``epochs`` (sd-scripts' ``--max_train_epochs``) unless ``max_train_steps`` is
    given. A float ``text_encoder_lr`` becomes a one-element list, as ``--text_encoder_lr 1e-4`` does
    on sd-scripts' command line. ``max_grad_norm`` None turns clipping off (sd-scripts' 0.0).
    """

    epochs: Optional[int] = 2
    max_train_steps: Optional[int] = None
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    text_encoder_lr: Union[None, float, List[float]] = None
    unet_lr: Optional[float] = None
    max_grad_norm: Optional[float] = 1.0
    scale_weight_norms: Optional[float] = None
    seed: int = 0


@dataclass(frozen=True)
class Saving:
    """Where ``save_weights`` writes: ``path`` is the final file; with ``every_n_epochs``
    (``--save_every_n_epochs``) epoch files sit beside it as ``<stem>-<epoch:06d><suffix>``."""

    path: str
    every_n_epochs: Optional[int] = None
    dtype: torch.dtype = torch.float32


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
    saved_files: List[str] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)
    global_step: int = 0
    num_train_epochs: int = 0
    lr_descriptions: Optional[List[str]] = None
    load_info: Any = None


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


def sd_scripts_args(setup: NetworkSetup, schedule: Schedule, saving: Optional[Saving]) -> argparse.Namespace:
    """The ``args`` sd-scripts' parser gives for these options; ``max_train_steps`` stays at sd-scripts'
    default 1600 when the run length is in epochs (it becomes final only before the loop)."""
    output_dir, output_name, extension = None, None, ".safetensors"
    if saving is not None:
        output_dir = os.path.dirname(os.path.abspath(saving.path))
        output_name, extension = os.path.splitext(os.path.basename(saving.path))
    text_encoder_lr = schedule.text_encoder_lr
    by_steps = schedule.max_train_steps is not None
    return make_args(
        network_dim=setup.dim,
        network_alpha=setup.alpha,
        network_dropout=setup.dropout,
        network_args=network_args_list(setup.args),
        network_weights=setup.weights,
        dim_from_weights=setup.dim_from_weights,
        network_train_unet_only=not setup.train_text_encoder,
        network_train_text_encoder_only=not setup.train_unet,
        learning_rate=schedule.lr,
        unet_lr=schedule.unet_lr,
        text_encoder_lr=[text_encoder_lr] if isinstance(text_encoder_lr, (int, float)) else text_encoder_lr,
        max_train_steps=schedule.max_train_steps if by_steps else SD_SCRIPTS_DEFAULT_MAX_TRAIN_STEPS,
        max_train_epochs=None if by_steps else schedule.epochs,
        train_batch_size=schedule.batch_size,
        gradient_accumulation_steps=schedule.gradient_accumulation_steps,
        max_grad_norm=0.0 if schedule.max_grad_norm is None else schedule.max_grad_norm,
        scale_weight_norms=schedule.scale_weight_norms,
        save_every_n_epochs=None if saving is None else saving.every_n_epochs,
        save_model_as=extension.lstrip("."),
        output_dir=output_dir,
        output_name=output_name,
        seed=schedule.seed,
    )


def _trains(args: argparse.Namespace) -> tuple[bool, bool]:
    """(train_unet, train_text_encoder), as sd-scripts reads them from ``args``."""
    return not args.network_train_text_encoder_only, not args.network_train_unet_only


def build_network(network_module, args: argparse.Namespace, models: Mapping[str, Any], sdxl: bool):
    """``create_network``, ``prepare_network``, ``apply_to`` and ``load_weights``, in sd-scripts' order.
    Returns (network, net_kwargs, load_info: None without ``args.network_weights``)."""
    network, net_kwargs = create_network(network_module, args, models, sdxl)
    if hasattr(network, "prepare_network"):
        network.prepare_network(args)
    if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
        logger.warning("scale_weight_norms is set but the network has no apply_max_norm_regularization")
        args.scale_weight_norms = False
    train_unet, train_text_encoder = _trains(args)
    network.apply_to(text_encoder_argument(models, sdxl), models["unet"], train_text_encoder, train_unet)
    load_info = None
    if args.network_weights is not None:
        load_info = network.load_weights(args.network_weights)
        logger.info("load network weights from %s: %s", args.network_weights, load_info)
    return network, net_kwargs, load_info


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


class _Loop:
    """sd-scripts' training loop over what accelerate prepared: micro-batches, optimizer steps, losses.

    Built after the optimizer and the loader exist, it freezes the base models, lets accelerate wrap
    network, optimizer, loader and the (constant) scheduler, and calls ``prepare_grad_etc``.
    """

    def __init__(
        self, accelerator, network, optimizer, loader, models: Mapping[str, Any], sdxl: bool, args: argparse.Namespace
    ) -> None:
        self.accelerator, self.models, self.sdxl, self.args = accelerator, models, sdxl, args
        self.train_unet, self.train_text_encoder = _trains(args)
        self.text_encoders = text_encoders_of(models, sdxl)
        self.text_encoder = text_encoder_argument(models, sdxl)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        _prepare_base_models(accelerator, models, self.text_encoders, self.train_unet, self.train_text_encoder)
        prepared = accelerator.prepare(network, optimizer, loader, scheduler)
        self.network, self.optimizer, self.loader, self.scheduler = prepared
        self.unwrapped.prepare_grad_etc(self.text_encoder, models["unet"])
        self.on_step_start = getattr(self.unwrapped, "on_step_start", None)
        self.global_step = 0
        self.losses: List[float] = []
        self.library: Any = None  # the stand-in library.train_util the step calls through (sd_library)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.network)

    @property
    def num_train_epochs(self) -> int:
        steps_per_epoch = math.ceil(len(self.loader) / self.args.gradient_accumulation_steps)
        return math.ceil(self.args.max_train_steps / steps_per_epoch)

    def epoch(self) -> None:
        """``on_epoch_start``, then the loader's micro-batches until it ends or ``max_train_steps`` is reached."""
        self.unwrapped.on_epoch_start(self.text_encoder, self.models["unet"])
        for batch in self.loader:
            self.losses.append(self.step(batch).detach().item())
            if self.global_step >= self.args.max_train_steps:
                break

    def step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch: ``on_step_start``, loss, backward, clipping when gradients sync, the optimizer
        step; then max-norm regularisation. Returns the loss."""
        accelerator, args = self.accelerator, self.args
        with accelerator.accumulate(self.network):
            if self.on_step_start is not None:
                self.on_step_start(self.text_encoder, self.models["unet"])
            models, encoders, library = self.models, self.text_encoders, self.library
            loss = training_loss(
                accelerator, models, encoders, batch, self.sdxl, self.train_unet, self.train_text_encoder, library
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm != 0.0:
                accelerator.clip_grad_norm_(self.unwrapped.get_trainable_params(), args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if args.scale_weight_norms:
            self.unwrapped.apply_max_norm_regularization(args.scale_weight_norms, accelerator.device)
        if accelerator.sync_gradients:
            self.global_step += 1
        return loss


def _final_max_train_steps(args: argparse.Namespace, batches: int, num_processes: int) -> None:
    """sd-scripts' run length in epochs becomes steps once the loader exists."""
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * math.ceil(
            batches / num_processes / args.gradient_accumulation_steps
        )


def _epoch_file_due(args: argparse.Namespace, epoch_no: int, num_train_epochs: int) -> bool:
    """sd-scripts' --save_every_n_epochs: a file after every n-th epoch but the last (the final save covers it)."""
    every = args.save_every_n_epochs
    return every is not None and epoch_no % every == 0 and epoch_no < num_train_epochs


def replay_training(
    network_module,
    models: Mapping[str, Any],
    dataset: Sequence[Mapping[str, torch.Tensor]],
    *,
    sdxl: bool,
    network: Optional[NetworkSetup] = None,
    schedule: Optional[Schedule] = None,
    saving: Optional[Saving] = None,
    sd_library: bool = False,
) -> ReplayResult:
    """Train ``network_module``'s network on ``dataset`` the way sd-scripts' train_network.py would.

    ``network`` and ``schedule`` are sd-scripts' options (defaults: :class:`NetworkSetup`,
    :class:`Schedule`); files are written only with ``saving``. ``models`` are changed in place
    (frozen, patched by the network), as in sd-scripts. ``sd_library``: the step noises the latents
    and computes the loss through a stand-in ``library.train_util`` (``harness.train_util``), installed
    for the run, so that a network wrapping sd-scripts' functions (``holdout``) finds them.
    """
    if not sd_library:
        return _replay_training(network_module, models, dataset, sdxl, network, schedule, saving, None)
    with train_util.installed() as library:
        return _replay_training(network_module, models, dataset, sdxl, network, schedule, saving, library)


def _replay_training(network_module, models, dataset, sdxl, network, schedule, saving, library) -> ReplayResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    schedule = schedule or Schedule()
    accelerator = Accelerator(gradient_accumulation_steps=schedule.gradient_accumulation_steps)
    set_seed(schedule.seed)
    args = sd_scripts_args(network or NetworkSetup(), schedule, saving)

    built, net_kwargs, load_info = build_network(network_module, args, models, sdxl)
    param_groups, lr_descriptions, te_lr = prepare_optimizer_params(built, args)
    optimizer = torch.optim.AdamW(param_groups, lr=args.learning_rate)
    samples = cast("torch.utils.data.Dataset[Mapping[str, torch.Tensor]]", list(dataset))  # a list is a dataset
    loader = torch.utils.data.DataLoader(samples, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate)
    _final_max_train_steps(args, len(loader), accelerator.num_processes)
    loop = _Loop(accelerator, built, optimizer, loader, models, sdxl, args)
    loop.library = library

    epochs = loop.num_train_epochs
    metadata = training_metadata(args, net_kwargs, sdxl, epochs, len(loop.loader), te_lr, len(dataset))
    result = ReplayResult(
        network=None,
        losses=loop.losses,
        args=args,
        metadata=metadata,
        num_train_epochs=epochs,
        lr_descriptions=lr_descriptions,
        load_info=load_info,
    )
    for epoch_no in range(1, epochs + 1):
        metadata["ss_epoch"] = str(epoch_no)
        loop.epoch()
        logger.debug("epoch %d/%d done, global step %d", epoch_no, epochs, loop.global_step)
        accelerator.wait_for_everyone()
        if saving is not None and _epoch_file_due(args, epoch_no, epochs):
            name = f"{args.output_name}-{epoch_no:06d}.{args.save_model_as}"
            result.saved_files.append(
                _save(loop.unwrapped, args, metadata, name, loop.global_step, epoch_no, saving.dtype)
            )

    result.network, result.global_step = loop.unwrapped, loop.global_step
    accelerator.end_training()
    if saving is not None:
        name = f"{args.output_name}.{args.save_model_as}"
        result.saved_files.append(_save(result.network, args, metadata, name, loop.global_step, epochs, saving.dtype))
    return result


__all__ = [
    "NetworkSetup",
    "Schedule",
    "Saving",
    "ReplayResult",
    "replay_training",
    "sd_scripts_args",
    "build_network",
    "create_network",
    "prepare_optimizer_params",
    "training_metadata",
]
