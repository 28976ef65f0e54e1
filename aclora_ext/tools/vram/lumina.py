"""Lumina 2 (``lumina_train_network.py``) in ``aclora vram``: the frozen models as the trainer leaves them on the
device, what ``--blocks_to_swap`` keeps off it, and one training step as it runs inside ``train_network.py``'s
loop.

The DiT is ``harness.lumina_dit``'s NextDiT (sd-scripts' 2B layout, written here, built on the meta device);
the autoencoder is FLUX.1's, counted as diffusers' AutoencoderKL at 16 latent channels (as for FLUX.1). The
LoRA is the network sd-scripts builds (``create_network`` on the NextDiT: ``families.lumina``, lora_lumina's
layers and names).

Which models sit on the device (lumina_train_network.py, train_network.py): the DiT always, in the weight
dtype or fp8 with ``--fp8_base`` (less its swapped blocks' weights); Gemma2 2B (transformers' Gemma2Model, the
config ``lumina_util.load_gemma2`` builds) when its outputs are not cached or its LoRA trains (without
``--network_train_unet_only`` sd-scripts keeps it on the device and encodes every step), in the weight dtype, or
fp8 with ``--fp8_base`` but its ``embed_tokens`` in the weight dtype; the autoencoder when latents are not cached
(weight dtype, fp32 with ``--no_half_vae``). Cached outputs come as float32 hidden states with their int64 ids
and mask. Gemma2 reads its padding mask on the host (``mask.all()``) and turns autocast off on the tensors'
device for its rotary embedding: on the meta device the mask is taken as padded (the captions are padded to the
Gemma2 length) and autocast is turned off as on the device. A trained Gemma2 with checkpointing gets
sd-scripts' workaround: ``embed_tokens`` requires grad, so its (dense) gradient is counted too.

Block swap (``NextDiT.enable_block_swap``, library/custom_offloading_utils.py): the last N of the main blocks
(``layers``; sd-scripts asserts N <= their count - 2) keep their weights on the CPU and swap into the device
storage of the blocks they replace, as for FLUX.1/SD3 (see ``dit``): their ``weight`` tensors are taken off the
device, nothing else changes.

The step: the flow-matching noise (``(1 - sigma) * latents + sigma * noise`` in the weight dtype; the timestep
sampling does not change memory), the DiT under autocast as ``dit(x=noisy, t=1 - timesteps / 1000,
cap_feats=hidden, cap_mask=mask.int())``, the default ``raw`` prediction (``--model_prediction_type``) against
``latents - noise`` and the loss in float32; backward, clipping and the optimizer step are ``TrainingStep``'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, cast
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ...harness.dit import DIT_LATENT_CHANNELS
from ...harness.lumina_dit import GEMMA2_2B_CONFIG, LUMINA_2B, LuminaConfig, NextDiT
from .dit import dit_vae
from .models import Models, _needs, block_weights
from .setup import Setup, VramError
from .step import TrainingStep


def gemma2_on_device(setup: Setup) -> bool:
    """Gemma2 sits on the device while its outputs are not cached or its LoRA trains."""
    return not setup.cache_text_encoder_outputs or setup.train_text_encoder


def build_lumina_models(
    setup: Setup,
    device: str = "meta",
    config: Optional[LuminaConfig] = None,
    gemma2_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
) -> Models:
    """The frozen models of a Lumina 2 set-up on ``device`` in sd-scripts' dtypes, holding only those that sit
    on the device (``config`` / ``gemma2_config`` / ``vae_config``: tiny ones for tests)."""
    try:
        from transformers import Gemma2Config, Gemma2Model
    except ImportError:
        _needs("transformers")
    with torch.device(device):
        dit = NextDiT(config or LUMINA_2B)
        encoders: list[nn.Module] = []
        if gemma2_on_device(setup):
            encoders.append(Gemma2Model(Gemma2Config(**(gemma2_config or GEMMA2_2B_CONFIG))))
        vae = dit_vae(setup, vae_config)
    models = Models(setup.family, dit, encoders, vae)
    dit.requires_grad_(False).to(dtype=setup.unet_dtype)
    for te in encoders:
        te.requires_grad_(False).to(dtype=setup.text_encoder_dtype)
        te.get_submodule("embed_tokens").to(dtype=setup.weight_dtype)  # prepare_text_encoder_fp8: no fp8 embedding
    if vae is not None:
        vae.requires_grad_(False).to(dtype=setup.vae_dtype).eval()
    if not encoders:
        models.on_device.discard("text_encoders")  # Gemma2 back on the CPU after caching (lumina_train_network.py)
    if setup.cache_latents:
        models.on_device.discard("vae")
    swapped_blocks(dit, setup)  # refuses a blocks_to_swap the model cannot take
    return models


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` with the meta device read as the CPU, whose autocast state CudaPolicy follows."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


class _PaddedMask(TorchDispatchMode):
    """Answers a host read of a meta tensor (Gemma2's ``mask.all()``) with False / 0: the captions are padded."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _gemma2_on_meta(device: torch.device) -> Iterator[None]:
    if device.type != "meta":
        yield
        return
    with _PaddedMask(), mock.patch.object(torch, "autocast", _MetaAutocast):
        yield


def swapped_blocks(dit: nn.Module, setup: Setup) -> list[nn.Module]:
    """The main blocks whose weights ``--blocks_to_swap`` keeps on the CPU: the last N of ``layers``."""
    n = setup.blocks_to_swap
    layers = cast(nn.ModuleList, dit.get_submodule("layers"))
    if n > len(layers) - 2:
        raise VramError(
            f"blocks_to_swap={n} swaps {n} main blocks, but this model has {len(layers)}; allowed: at most "
            f"{len(layers) - 2} (sd-scripts asserts count - 2)"
        )
    return list(layers)[len(layers) - n :] if n else []


def offloaded_weights(dit: nn.Module, setup: Setup) -> list[torch.Tensor]:
    """What the offloader moves of the swapped blocks: each submodule's ``weight`` (not biases)."""
    return block_weights(swapped_blocks(dit, setup))


def lumina_notes(setup: Setup) -> list[str]:
    gemma2 = (
        "Gemma2 off the device (outputs cached)"
        if not gemma2_on_device(setup)
        else "Gemma2 2B on the device, run every step" + (" with its LoRA trained" if setup.train_text_encoder else "")
    )
    notes = [
        "the Lumina 2 DiT is aclora's own literal build of sd-scripts' NextDiT layout (fused qkv, its 2B config), "
        "not sd-scripts' module; Gemma2 is transformers' Gemma2Model"
        + ("" if setup.cache_latents else "; the autoencoder is diffusers' AutoencoderKL"),
        f"Lumina 2's captions counted at all {setup.gemma2_tokens} Gemma2 tokens (sd-scripts joins each caption's "
        f"valid tokens with the image tokens: shorter captions use less); {gemma2}",
    ]
    if setup.blocks_to_swap:
        gib = setup.blocks_to_swap
        notes.append(
            f"blocks_to_swap {gib}: the last {gib} main blocks' weights stay on the CPU; the blocks swapped in "
            "reuse the device storage of those swapped out, so nothing more is counted for them; the copies' "
            "time is not estimated"
        )
    return notes


class LuminaTrainingStep(TrainingStep):
    """A network on a Lumina 2 ``Models`` (``build_lumina_models``), stepped like lumina_train_network.py."""

    def offloaded_tensors(self) -> list[torch.Tensor]:
        return offloaded_weights(self.models.unet, self.setup)

    def _constants(self) -> None:
        s, d = self.setup, self.device
        self.latent_shape = (s.batch_size, DIT_LATENT_CHANNELS, s.height // 8, s.width // 8)
        tokens = -(-s.gemma2_tokens // 8) * 8  # the tokenizer pads to the length, a multiple of 8
        self.token_ids = torch.zeros((s.batch_size, tokens), dtype=torch.long, device=d)
        self.token_mask = torch.ones((s.batch_size, tokens), dtype=torch.long, device=d)
        self.token_mask[:, -1:] = 0  # padded captions (on the meta device: what _PaddedMask answers)

    def constants(self) -> list[torch.Tensor]:
        return [self.token_ids, self.token_mask] if self.models.text_encoders else []

    def _checkpointing_workaround(self, te: nn.Module) -> None:
        te.get_submodule("embed_tokens").requires_grad_(True)  # lumina_train_network.py's workaround

    def _text_conditioning(self) -> list[torch.Tensor]:
        """[hidden_states, input_ids, attention_mask]: Gemma2's penultimate hidden states (strategy_lumina
        ``encode_tokens``), or the cache's moved to the device (float32, int64, int64)."""
        s, d, b = self.setup, self.device, self.setup.batch_size
        if not self.models.text_encoders:
            dit: Any = self.models.unet
            width = dit.params.cap_feat_dim  # Gemma2-2B's hidden size, 2304
            hidden = torch.randn((b, self.token_ids.shape[1], width), device=d)
            return [hidden, self.token_ids.clone(), self.token_mask.clone()]
        self.phase("text encoders")
        gemma2 = self.models.text_encoders[0]
        with torch.set_grad_enabled(s.train_text_encoder), self.autocast(), _gemma2_on_meta(d):
            out = gemma2(
                input_ids=self.token_ids, attention_mask=self.token_mask, output_hidden_states=True, return_dict=True
            )
        return [out.hidden_states[-2], self.token_ids, self.token_mask]

    def _loss(self, latents: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        s, d, b = self.setup, self.device, self.setup.batch_size
        noise = torch.randn_like(latents)
        sigmas = torch.rand((b,), device=d).view(-1, 1, 1, 1)  # lumina_train_util: any --timestep_sampling
        timesteps = (sigmas.flatten() * 1000).to(s.weight_dtype)
        noisy = ((1.0 - sigmas) * latents + sigmas * noise).to(s.weight_dtype)
        if s.gradient_checkpointing:  # lumina_train_network.py: the DiT's inputs require grad
            noisy.requires_grad_(True)
            for c in conds:
                if c.dtype.is_floating_point:
                    c.requires_grad_(True)
        hidden, _, mask = conds
        dit: Any = self.models.unet
        with self.autocast():
            out = dit(x=noisy, t=1 - timesteps / 1000, cap_feats=hidden, cap_mask=mask.to(dtype=torch.int32))
        target = latents - noise  # --model_prediction_type raw (the default): the output itself
        return F.mse_loss(out.float(), target.float(), reduction="none").mean([1, 2, 3]).mean()


__all__ = ["build_lumina_models", "swapped_blocks", "offloaded_weights", "LuminaTrainingStep"]
