"""One Anima training step as ``anima_train_network.py`` runs it inside ``train_network.py``'s loop: the Qwen3 text
encoder unless its outputs are cached (its padding zeroed), the flow-matching noise at a sigmoid-sampled sigma
(sd-scripts' default ``timestep_sampling``), the DiT under autocast on 5-D latents with the padding mask and the
LLM adapter's T5 ids, ``noise - latents`` as the target, the uniform weighting; backward, clipping and the
optimizer step are ``TrainingStep``'s."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...harness.anima_dit import ANIMA_LATENT_CHANNELS
from .anima import offloaded_weights
from .step import TrainingStep


class AnimaTrainingStep(TrainingStep):
    """A network (the factory's: the anima family's lora_anima modules) on an Anima ``Models``."""

    def offloaded_tensors(self) -> list[torch.Tensor]:
        return offloaded_weights(self.models.unet, self.setup)

    def _checkpointing_workaround(self, te: nn.Module) -> None:
        """The trainer's prepare_text_encoder_grad_ckpt_workaround: the first Qwen3 parameter requires grad."""
        next(te.parameters()).requires_grad_(True)

    def _constants(self) -> None:
        s, d = self.setup, self.device
        self.latent_shape = (s.batch_size, ANIMA_LATENT_CHANNELS, s.height // 8, s.width // 8)
        self.qwen3_ids = torch.zeros((s.batch_size, s.qwen3_tokens), dtype=torch.long, device=d)
        self.t5_ids = torch.zeros((s.batch_size, s.t5_tokens), dtype=torch.long, device=d)

    def constants(self) -> list[torch.Tensor]:
        return [self.qwen3_ids, self.t5_ids]

    def _text_conditioning(self) -> list[torch.Tensor]:
        """[prompt_embeds, qwen3 mask, t5 ids, t5 mask]: strategy_anima's encode_tokens, or its cache on the device
        (float32 embeddings, integer masks and ids)."""
        s, d, b = self.setup, self.device, self.setup.batch_size
        masks = [torch.ones((b, n), dtype=torch.long, device=d) for n in (s.qwen3_tokens, s.t5_tokens)]
        if s.cache_text_encoder_outputs:
            qwen3: Any = self.models.text_encoders[0]
            embeds = torch.randn((b, s.qwen3_tokens, qwen3.config.hidden_size), device=d)
        else:
            self.phase("text encoders")
            # the (B, 1, L, L) causal mask transformers makes from a padded caption's mask (built here: its own
            # construction reads the mask back to the host, which the meta device cannot)
            n = s.qwen3_tokens
            causal = torch.ones((n, n), dtype=torch.bool, device=d).tril()[None, None].repeat(b, 1, 1, 1)
            with torch.set_grad_enabled(s.train_text_encoder), self.autocast():
                embeds = self.models.text_encoders[0](input_ids=self.qwen3_ids, attention_mask=causal).last_hidden_state
                embeds[~masks[0].bool()] = 0
        return [embeds, masks[0], self.t5_ids.clone(), masks[1]]

    def _loss(self, latents: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        s, d, b = self.setup, self.device, self.setup.batch_size
        noise = torch.randn_like(latents)
        sigmas = torch.sigmoid(torch.randn((b,), device=d))  # --timestep_sampling sigmoid, sigmoid_scale 1
        timesteps = sigmas * 1000
        sigmas = sigmas.view(-1, 1, 1, 1)
        noisy = ((1.0 - sigmas) * latents + sigmas * noise).to(s.weight_dtype)
        timesteps = timesteps.to(s.weight_dtype) / 1000.0
        if s.gradient_checkpointing:  # anima_train_network.py, for checkpointing
            noisy.requires_grad_(True)
            for t in conds:
                if t.dtype.is_floating_point:
                    t.requires_grad_(True)
        embeds, qwen3_mask, t5_ids, t5_mask = conds
        embeds = embeds.to(d, dtype=s.weight_dtype)
        padding = torch.zeros((b, 1, latents.shape[-2], latents.shape[-1]), dtype=s.weight_dtype, device=d)
        with self.autocast():
            prediction = self.models.unet(
                noisy.unsqueeze(2),
                timesteps,
                embeds,
                padding_mask=padding,
                target_input_ids=t5_ids,
                target_attention_mask=t5_mask,
                source_attention_mask=qwen3_mask,
            )
        prediction = prediction.squeeze(2)
        target = noise - latents
        weighting = torch.ones_like(sigmas)  # --weighting_scheme uniform (the default)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none") * weighting
        loss = loss.mean([1, 2, 3]) * torch.ones((b,), device=d)  # the batch's loss_weights
        return loss.mean()


__all__ = ["AnimaTrainingStep"]
