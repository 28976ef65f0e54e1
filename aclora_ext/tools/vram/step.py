"""One training step as ``train_network.py`` runs it (the network's hooks, the VAE and text encoders unless
cached, the U-Net under autocast, ``accelerator.backward``, clipping, the optimizer step), on the device
the models are on, and the optimizer sd-scripts' --optimizer_type builds."""

from __future__ import annotations

import ast
import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ...harness.architectures import LATENT_CHANNELS, TOKENS_PER_CHUNK
from ...harness.sdcalls import alphas_cumprod, encode_text, make_args
from ...network import factory, schedule
from .counter import FROZEN_TE, FROZEN_UNET, FROZEN_VAE
from .cuda import CudaPolicy
from .models import Models, _enable_checkpointing, _text_model
from .setup import Setup, VramError


class TrainingStep:
    """A network on ``models`` with its optimizer, stepped like ``train_network.py``'s loop.

    ``phase`` is called with the name of each part of the step as it starts
    (the estimate records where its peak falls). Constant inputs (SDXL's size
    conditioning, the noise schedule) are made on the device once, as
    sd-scripts keeps its noise scheduler's tables there.
    """

    def __init__(
        self,
        models: Models,
        setup: Setup,
        device: str = "meta",
        policy: Optional[CudaPolicy] = None,
        phase: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.models, self.setup, self.device = models, setup, torch.device(device)
        self.policy = policy or CudaPolicy("meta")
        self.phase = phase
        self.args = make_args(
            network_dim=setup.rank,
            network_alpha=setup.alpha,
            network_args=[f"{k}={v}" for k, v in setup.network_args] or None,
            network_train_unet_only=not setup.train_text_encoder,
            network_train_text_encoder_only=not setup.train_unet,
            train_batch_size=setup.batch_size,
            gradient_checkpointing=setup.gradient_checkpointing,
            max_grad_norm=setup.max_grad_norm,
            mixed_precision=setup.mixed_precision,
            full_bf16=setup.full_lora_precision and setup.mixed_precision == "bf16",
            full_fp16=setup.full_lora_precision and setup.mixed_precision == "fp16",
            fp8_base=setup.fp8_base,
            cache_latents=setup.cache_latents,
            cache_text_encoder_outputs=setup.cache_text_encoder_outputs,
            max_token_length=None if setup.max_token_length == 75 else setup.max_token_length,
            v2=setup.family == "sd2",
            optimizer_type=setup.optimizer,
            learning_rate=1e-4,
        )
        te_argument = models.text_encoder_argument
        with torch.device(self.device):
            network = self._create_network(te_argument)
        try:
            network.prepare_network(self.args)
            network.apply_to(te_argument, models.unet, setup.train_text_encoder, setup.train_unet)
            self._prepare(network)
        except BaseException:
            network.remove_from()  # it already listens to accelerator.backward: a later loop's losses are not its own
            raise
        schedule.forget(network)  # it hears accelerator.backward during its own steps only (see _only_listener)
        self.network = network
        self.accelerator = _accelerator()
        self._constants()

    def _create_network(self, te_argument: Any) -> Any:
        """``create_network`` as sd-scripts calls it (on the device in effect)."""
        setup = self.setup
        network_args: dict[str, Any] = dict(setup.network_args)  # strings, as sd-scripts passes them
        return factory.create_network(1.0, setup.rank, setup.alpha, None, te_argument, self.models.unet, **network_args)

    def _trained_text_encoders(self) -> list[nn.Module]:
        """The text encoders whose LoRA trains (sd-scripts' per-encoder train flags)."""
        return list(self.models.text_encoders) if self.setup.train_text_encoder else []

    def offloaded_tensors(self) -> list[torch.Tensor]:
        """Weights sd-scripts keeps on the CPU although their model is on the device (block swap)."""
        return []

    def _prepare(self, network: Any) -> None:
        """The rest of train_network.py's set-up, from moving the network to the device to the first epoch."""
        models, setup, te_argument = self.models, self.setup, self.models.text_encoder_argument
        network.to(self.device)  # its state buffers too, as accelerator.prepare(network) does
        if setup.gradient_checkpointing:
            unet: Any = models.unet  # diffusers' U-Net or the harness DiT, both with this method
            unet.enable_gradient_checkpointing()
            for te in self._trained_text_encoders():
                _enable_checkpointing(te)
            network.enable_gradient_checkpointing()
        groups, _ = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
        self.optimizer = make_optimizer(setup, groups)
        if setup.full_lora_precision:
            network.to(setup.weight_dtype)
        if setup.gradient_checkpointing:
            models.unet.train()
            for te in models.text_encoders:
                te.train()
            for te in self._trained_text_encoders():
                self._checkpointing_workaround(te)
        else:
            models.unet.eval()
            for te in models.text_encoders:
                te.eval()
        network.prepare_grad_etc(te_argument, models.unet)
        network.on_epoch_start(te_argument, models.unet)

    def _checkpointing_workaround(self, te: nn.Module) -> None:
        """sd-scripts' workaround for checkpointing a trained text encoder: its embeddings require grad."""
        _text_model(te).embeddings.requires_grad_(True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``accelerator.autocast()``: real autocast on a real device, the policy's on the meta device."""
        dtype = self.setup.autocast_dtype
        if self.device.type == self.policy.device_type:
            return self.policy.autocast(dtype)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _constants(self) -> None:
        s, d = self.setup, self.device
        self.alphas = alphas_cumprod("cpu").to(d)
        self.latent_shape = (s.batch_size, LATENT_CHANNELS, s.height // 8, s.width // 8)
        self.time_ids = torch.tensor([s.height, s.width, 0, 0, s.height, s.width], dtype=s.weight_dtype).to(d)
        self.time_ids = self.time_ids.expand(s.batch_size, 6)
        self.token_ids = torch.zeros((s.batch_size * s.chunks, TOKENS_PER_CHUNK), dtype=torch.long, device=d)

    def constants(self) -> list[torch.Tensor]:
        return [self.alphas, self.time_ids, self.token_ids]

    def device_models(self) -> list[tuple[nn.Module, str]]:
        """The frozen models that sit on the device during the step, with their category; a model sd-scripts
        keeps on the CPU (cached text-encoder outputs or latents) holds no device memory."""
        m = self.models
        found = [(m.unet, FROZEN_UNET)]
        if "text_encoders" in m.on_device:
            found += [(te, FROZEN_TE) for te in m.text_encoders]
        if m.vae is not None and "vae" in m.on_device:
            found.append((m.vae, FROZEN_VAE))
        return found

    def step(self) -> torch.Tensor:
        """One micro-batch that is also an optimizer step; returns the loss (on the meta device under the policy)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(_only_listener(self.network))
            if self.device.type == self.policy.device_type:
                m = self.models
                stack.enter_context(self.policy)
                stack.enter_context(self.policy.through_recomputation([m.unet, *m.text_encoders, m.vae]))
            return self._step()

    def _step(self) -> torch.Tensor:
        s, models, network = self.setup, self.models, self.network
        te_argument = models.text_encoder_argument
        self.phase("step start")
        network.on_step_start(te_argument, models.unet)
        latents = self._latents()
        conds = self._text_conditioning()
        self.phase(f"{s.denoiser} forward")
        loss = self._loss(latents, conds)
        self.phase("backward")
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            network.record_loss(loss)
            loss.backward()
        self.phase("clipping and hooks")
        self.after_backward()
        if s.max_grad_norm:
            params = network.get_trainable_params()
            if self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, s.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        for hook in ("update_grad_norms", "update_norms"):  # the optional per-step hooks train_network.py calls
            if hasattr(network, hook):
                getattr(network, hook)()
        self.phase("optimizer step")
        self.optimizer.step()
        self.after_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _loss(self, latents: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        """The U-Net's forward and the loss of train_network.py (epsilon prediction, DDPM noise)."""
        s = self.setup
        noise = torch.randn(self.latent_shape, device=self.device, dtype=latents.dtype)
        timesteps = torch.randint(0, len(self.alphas), (s.batch_size,), device=self.device)
        abar = self.alphas[timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1.0 - abar).sqrt() * noise
        if s.gradient_checkpointing:  # as train_network.py does for checkpointing
            noisy.requires_grad_(True)
            for c in conds:
                if c.is_leaf:
                    c.requires_grad_(True)
        with self.autocast():
            prediction = self._unet(noisy.requires_grad_(s.train_unet), timesteps, conds)
        return F.mse_loss(prediction.float(), noise.float(), reduction="none").mean([1, 2, 3]).mean()

    def close(self) -> None:
        """Give the models their own forwards back."""
        self.network.remove_from()

    def warm_optimizer(self) -> None:
        """Create the optimizer's state as the first step does, from zero gradients and without a forward: the
        step that follows has the state from its start, as every step after the first has."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_backward(self) -> None:
        """Called once the gradients exist (the estimate labels them here)."""

    def after_optimizer(self) -> None:
        """Called once the optimizer state exists."""

    def _latents(self) -> torch.Tensor:
        s = self.setup
        if s.cache_latents:
            return torch.randn(self.latent_shape, device=self.device)  # the cached latents, moved to the device
        self.phase("VAE encode")
        images = torch.randn((s.batch_size, 3, s.height, s.width), device=self.device, dtype=s.vae_dtype)
        vae: Any = self.models.vae  # diffusers' AutoencoderKL, there when latents are not cached
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def _text_conditioning(self) -> list[torch.Tensor]:
        s, models = self.setup, self.models
        tokens = TOKENS_PER_CHUNK * s.chunks
        configs: list[Any] = [te.config for te in models.text_encoders]  # transformers' configs
        dims = [c.hidden_size for c in configs]
        if s.cache_text_encoder_outputs:
            # what sdxl_train_network.py reads from the cache and moves to the device
            hidden = [torch.randn((s.batch_size, tokens, d), device=self.device, dtype=s.weight_dtype) for d in dims]
            pooled = torch.randn((s.batch_size, configs[1].projection_dim), device=self.device, dtype=s.weight_dtype)
            return [*hidden, pooled]
        self.phase("text encoders")
        with torch.set_grad_enabled(s.train_text_encoder), self.autocast():
            conds = encode_text(models.text_encoders, self.token_ids, models.sdxl)
        batch = s.batch_size
        hidden = [c.reshape(batch, tokens, c.shape[-1]) for c in conds[: len(dims)]]
        return hidden + [c[:: s.chunks] for c in conds[len(dims) :]]

    def _unet(self, noisy: torch.Tensor, timesteps: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        unet = self.models.unet
        if not self.models.sdxl:
            return unet(noisy, timesteps, conds[0]).sample
        hidden1, hidden2, pooled = conds
        added = {"text_embeds": pooled, "time_ids": self.time_ids}
        return unet(noisy, timesteps, torch.cat([hidden1, hidden2], dim=2), added_cond_kwargs=added).sample


@contextlib.contextmanager
def _only_listener(network: Any) -> Iterator[None]:
    """Let ``network``, and only it, see the losses of ``accelerator.backward`` meanwhile: the capture is
    process-wide, and neither is a simulated step's loss (on the meta device, say) another network's training
    loss, nor another training loop's loss this network's."""
    others = [n for n in list(schedule._listeners) if n is not network]
    for other in others:
        schedule.forget(other)
    schedule.listen(network)
    try:
        yield
    finally:
        schedule.forget(network)
        for other in others:
            schedule.listen(other)


def _accelerator():
    """accelerate's Accelerator (its backward is where the network reads the loss), or None without accelerate."""
    try:
        from accelerate import Accelerator
    except ImportError:
        return None
    return Accelerator()


def _literal(value: Any) -> Any:
    """An optimizer_args value as sd-scripts reads it (ast.literal_eval of the string)."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def make_optimizer(setup: Setup, groups: list) -> torch.optim.Optimizer:
    """The optimizer sd-scripts' --optimizer_type builds, with --optimizer_args, as it runs on a CUDA device."""
    kwargs = {k: _literal(v) for k, v in setup.optimizer_args}
    try:
        if setup.optimizer == "AdamW":
            # on CUDA torch picks the multi-tensor (foreach) implementation, with its param-sized temporaries;
            # the fused kernel has none, the meta device has no fused kernel: the per-tensor loop stands in
            fused = bool(kwargs.pop("fused", False))
            kwargs.setdefault("foreach", not fused)
            return torch.optim.AdamW(groups, lr=1e-4, **kwargs)
        if setup.optimizer == "Adafactor":
            from transformers.optimization import Adafactor

            # the step-size options do not change the memory; scale_parameter=True reads a norm back to the host
            # per parameter and step, which the meta device cannot do (and which syncs a GPU every step)
            kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
            kwargs.pop("lr", None)
            return Adafactor(groups, lr=1e-4, **kwargs)
        return _adamw8bit(groups, kwargs)
    except TypeError as err:
        raise VramError(
            f"optimizer_args={[f'{k}={v}' for k, v in setup.optimizer_args]} is not valid for "
            f"optimizer_type={setup.optimizer!r}: {err}"
        ) from None


def _adamw8bit(groups: list, kwargs: dict) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise VramError(
            "optimizer_type='AdamW8bit' needs bitsandbytes, which is not importable here; allowed "
            "without it: AdamW, Adafactor"
        ) from None

    class StateOnly(bnb.optim.AdamW8bit):
        """bitsandbytes' own 8-bit state (uint8 moments, block-wise scales) without its CUDA update kernel,
        which updates in place and so adds no memory."""

        @torch.no_grad()
        def step(self, closure=None):
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is not None and len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)

    return StateOnly(groups, lr=1e-4, **kwargs)
