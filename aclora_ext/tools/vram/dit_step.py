"""One FLUX.1 / Chroma / SD3 training step as ``flux_train_network.py`` / ``sd3_train_network.py`` run it
inside ``train_network.py``'s loop: the text encoders unless their outputs are cached, the flow-matching noise,
the DiT under autocast (FLUX: 2x2-packed latents and position ids; Chroma: its modulation vectors first;
SD3: the CLIP and T5 contexts concatenated), the default "sigma_scaled" prediction and the loss; backward,
clipping and the optimizer step are ``TrainingStep``'s."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...harness.dit import DIT_LATENT_CHANNELS
from ...network.network import ACLoRANetwork
from ...options import parse_network_args
from .dit import CLIP_TOKENS, dit_targets, offloaded_weights, text_encoder_kind, trained_clips
from .step import TrainingStep

FLUX_GUIDANCE = 1.0  # --guidance_scale's default; its value does not change memory


class DitTrainingStep(TrainingStep):
    """A network on a FLUX.1/SD3 ``Models`` (``build_dit_models``), stepped like the DiT trainers."""

    def _create_network(self, te_argument: Any) -> ACLoRANetwork:
        """lora_flux / lora_sd3's modules at rank ``setup.rank`` (alpha 0 = the rank, as sd-scripts reads it)."""
        setup = self.setup
        config = parse_network_args(dict(setup.network_args), max_rank=setup.rank)
        targets = dit_targets(self.models, setup)
        alpha = float(setup.alpha) or float(setup.rank)
        return ACLoRANetwork(
            targets, {t.lora_name: setup.rank for t in targets}, {t.lora_name: alpha for t in targets}, 1.0, config
        )

    def _trained_text_encoders(self) -> list[nn.Module]:
        return trained_clips(self.models, self.setup)

    def offloaded_tensors(self) -> list[torch.Tensor]:
        return offloaded_weights(self.models.unet, self.setup)

    def _constants(self) -> None:
        s, d = self.setup, self.device
        self.latent_shape = (s.batch_size, DIT_LATENT_CHANNELS, s.height // 8, s.width // 8)
        self.encoder_token_ids: dict[int, torch.Tensor] = {}  # by id() of the text encoder
        for te in self.models.text_encoders:  # the tokens the dataset hands over
            length = s.t5_tokens if text_encoder_kind(te) == "t5" else CLIP_TOKENS
            self.encoder_token_ids[id(te)] = torch.zeros((s.batch_size, length), dtype=torch.long, device=d)

    def constants(self) -> list[torch.Tensor]:
        return list(self.encoder_token_ids.values())

    # --- text ------------------------------------------------------------------------------------------------------
    def _text_conditioning(self) -> list[torch.Tensor]:
        """FLUX: [l_pooled, t5_out, txt_ids, t5_attn_mask]; SD3: [lg_out, t5_out, lg_pooled] (strategy_flux /
        strategy_sd3 ``encode_tokens``, or their cache moved to the device: float32 arrays)."""
        s, d, b = self.setup, self.device, self.setup.batch_size
        t = s.t5_tokens
        clips = [te for te in self.models.text_encoders if text_encoder_kind(te) == "clip"]
        t5 = next((te for te in self.models.text_encoders if text_encoder_kind(te) == "t5"), None)
        mask = torch.ones((b, t), dtype=torch.long, device=d)
        if clips or t5 is not None:
            self.phase("text encoders")
        with torch.set_grad_enabled(s.train_text_encoder), self.autocast():
            clip_out = [te(self.encoder_token_ids[id(te)], output_hidden_states=True) for te in clips]
        with torch.no_grad(), self.autocast():
            t5_out = t5(self.encoder_token_ids[id(t5)], return_dict=False, output_hidden_states=True)[0] if t5 else None
        c: Any = (
            self.models.unet.params
        )  # FluxConfig or SD3Config: the widths the DiT takes (4096 / 768 / 2048 at full size)
        if t5_out is None:
            t5_out = torch.randn((b, t, c.context_in_dim if s.family == "flux" else c.context_in_features), device=d)
        if s.is_chroma:  # the stand-in CLIP-L's output (B, 77, 1), unused by the DiT
            return [torch.zeros((b, CLIP_TOKENS, 1), device=d), t5_out, torch.zeros((b, t, 3), device=d), mask]
        if s.family == "flux":
            l_pooled = clip_out[0]["pooler_output"] if clip_out else torch.randn((b, c.vec_in_dim), device=d)
            txt_ids = torch.zeros((b, t, 3), device=d)
            return [l_pooled, t5_out, txt_ids, mask]
        if clip_out:  # SD3: the penultimate hidden states of both CLIPs side by side, their pooled projections too
            lg_out = torch.cat([o.hidden_states[-2] for o in clip_out], dim=-1)
            lg_pooled = torch.cat([o[0] for o in clip_out], dim=-1)
        else:  # CLIP-L's 768 + CLIP-G's 1280 wide, as the DiT's y embedder takes them
            lg_out = torch.randn((b, CLIP_TOKENS, c.adm_in_channels), device=d)
            lg_pooled = torch.randn((b, c.adm_in_channels), device=d)
        return [lg_out, t5_out, lg_pooled]

    # --- the DiT and the loss -----------------------------------------------------------------------------------------
    def _loss(self, latents: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        s = self.setup
        noise = torch.randn_like(latents)
        if s.gradient_checkpointing:  # the conditioning requires grad (flux_train_network.py, sd3_train_network.py)
            for c in conds:
                if c.dtype.is_floating_point and (c.is_leaf or c.requires_grad):
                    c.requires_grad_(True)
        if s.family == "flux":
            return self._flux_loss(latents, noise, conds)
        return self._sd3_loss(latents, noise, conds)

    def _flux_loss(self, latents: torch.Tensor, noise: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        s, d, b = self.setup, self.device, self.setup.batch_size
        l_pooled, t5_out, txt_ids, mask = conds
        sigmas = torch.rand((b,), device=d).to(s.weight_dtype).view(-1, 1, 1, 1)  # --timestep_sampling sigma
        timesteps = (sigmas.flatten() * 1000).to(s.weight_dtype)
        noisy = ((1.0 - sigmas) * latents + sigmas * noise).to(s.weight_dtype)
        h, w = noisy.shape[2] // 2, noisy.shape[3] // 2
        packed = noisy.reshape(b, DIT_LATENT_CHANNELS, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] += torch.arange(h)[:, None]
        img_ids[..., 2] += torch.arange(w)[None, :]
        img_ids = img_ids.reshape(1, h * w, 3).repeat(b, 1, 1).to(d)
        guidance = torch.full((b,), FLUX_GUIDANCE, device=d)
        extra: dict[str, torch.Tensor] = {}
        if s.is_chroma:  # flux_train_network.py: Chroma's modulation vectors, made without a graph
            chroma: Any = self.models.unet
            with self.autocast(), torch.no_grad():
                extra["mod_vectors"] = chroma.get_mod_vectors(timesteps / 1000, guidance, b)
        if s.gradient_checkpointing:
            noisy.requires_grad_(True)
            img_ids.requires_grad_(True)
            guidance.requires_grad_(True)
            for vectors in extra.values():
                vectors.requires_grad_(True)
        with self.autocast():
            out = self.models.unet(
                img=packed,
                img_ids=img_ids,
                txt=t5_out,
                txt_ids=txt_ids,
                y=l_pooled,
                timesteps=timesteps / 1000,
                guidance=guidance,
                txt_attention_mask=mask if s.apply_t5_attn_mask else None,
                **extra,
            )
        out = out.reshape(b, h, w, DIT_LATENT_CHANNELS, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(noisy.shape)
        prediction = out * (-sigmas) + noisy  # --model_prediction_type sigma_scaled (the default)
        target = noise - latents
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean([1, 2, 3]).mean()

    def _sd3_loss(self, latents: torch.Tensor, noise: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        s, d, b = self.setup, self.device, self.setup.batch_size
        lg_out, t5_out, lg_pooled = conds
        timesteps = torch.randint(0, 1000, (b,), device=d).to(s.weight_dtype)
        sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
        noisy = sigmas * noise + (1.0 - sigmas) * latents
        if s.gradient_checkpointing:
            noisy.requires_grad_(True)
        context = torch.cat([F.pad(lg_out, (0, t5_out.shape[-1] - lg_out.shape[-1])), t5_out], dim=-2)
        with self.autocast():
            out = self.models.unet(noisy, timesteps, y=lg_pooled, context=context)
        prediction = out * (-sigmas) + noisy
        return F.mse_loss(prediction.float(), latents.float(), reduction="none").mean([1, 2, 3]).mean()


__all__ = ["DitTrainingStep"]
