"""Anima (``anima_train_network.py``) in ``aclora vram``: the frozen models as the trainer leaves them on the
device, what ``--blocks_to_swap`` keeps off it, and its arguments read.

The DiT is ``harness.anima_dit``'s (sd-scripts' layout, written here, LLM adapter included: 2,091,068,928
parameters), in the weight dtype (the trainer turns ``fp8_base`` off for Anima and has no fp8_scaled). The text
encoder is transformers' ``Qwen3Model`` at Qwen3-0.6B's config, as ``anima_utils.load_qwen3_text_encoder`` builds
it, in the weight dtype; on the device unless its outputs are cached (then the trainer moves it back to the CPU).
The Qwen-Image VAE is not modelled: latents must be cached (else refused).

Block swap: ``Anima.enable_block_swap(N)`` hands the last N of its 28 blocks to sd-scripts' offloader, which
keeps their weights on the CPU and copies each into the device storage of the block it replaces (as for FLUX.1,
see ``dit``): the count takes those blocks' weights off the device and changes nothing else.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, cast

import torch
from torch import nn

from ...harness.anima_dit import QWEN3_06B_CONFIG, Anima, AnimaConfig, no_autocast
from .anima_setup import DEFAULT_TOKENS, SCRIPT
from .models import Models, _needs, block_weights
from .setup import Setup, VramError

#: the Anima trainer's arguments that do not change the estimate (listed as such when given)
ANIMA_IGNORED = (
    "qwen3",
    "vae",
    "t5_tokenizer_path",
    "llm_adapter_path",
    "llm_adapter_lr",
    "self_attn_lr",
    "cross_attn_lr",
    "mlp_lr",
    "mod_lr",
    "vae_chunk_size",
    "vae_disable_cache",
    "text_encoder_batch_size",
    "disable_mmap_load_safetensors",
)

#: the arguments it shares with the other DiT trainers that do not change the estimate either
SHARED_IGNORED = (
    "timestep_sampling",
    "discrete_flow_shift",
    "sigmoid_scale",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
)


def build_anima_models(
    setup: Setup, device: str = "meta", config: Optional[AnimaConfig] = None, qwen3_config: Optional[dict] = None
) -> Models:
    """The frozen models of an Anima set-up on ``device``, in the trainer's dtypes: the DiT and the Qwen3 text
    encoder (held even when its outputs are cached, as sd-scripts holds it on the CPU; then not on the device).
    ``config`` / ``qwen3_config`` replace the real ones (tiny models for tests)."""
    try:
        from transformers import Qwen3Config, Qwen3Model
    except ImportError:
        _needs("transformers")
    with torch.device(device):
        dit = Anima(config) if config is not None else Anima()
        qwen3: nn.Module = Qwen3Model(Qwen3Config(**(qwen3_config or QWEN3_06B_CONFIG)))
    if torch.device(device).type == "meta":
        _meta_safe_rotary(qwen3)
    models = Models("anima", dit, [qwen3], None)
    dit.requires_grad_(False).to(dtype=setup.weight_dtype)
    qwen3.requires_grad_(False).to(dtype=setup.weight_dtype)
    if setup.cache_text_encoder_outputs:
        models.on_device.discard("text_encoders")
    models.on_device.discard("vae")
    swapped_blocks(dit, setup)
    return models


def _meta_safe_rotary(qwen3: nn.Module) -> None:
    """transformers' Qwen3 rotary embedding opens ``torch.autocast(device_type=x.device.type)``, which the meta
    device has not: the same cos/sin (float32, with autocast off, then in x's dtype) computed here instead."""
    rotary: Any = qwen3.get_submodule("rotary_emb")

    @torch.no_grad()
    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = rotary.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        with no_autocast(x.device):
            freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
            angles = torch.cat((freqs, freqs), dim=-1)
            scaling = getattr(rotary, "attention_scaling", 1.0)
            cos, sin = angles.cos() * scaling, angles.sin() * scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    rotary.forward = forward


def swapped_blocks(dit: nn.Module, setup: Setup) -> list[nn.Module]:
    """The last ``blocks_to_swap`` blocks, whose weights the offloader keeps on the CPU."""
    blocks = cast(nn.ModuleList, dit.get_submodule("blocks"))
    n = setup.blocks_to_swap
    if n > len(blocks) - 2:
        raise VramError(f"blocks_to_swap={n} is not valid; allowed: at most {len(blocks) - 2} for this model")
    return list(blocks)[len(blocks) - n :] if n else []


def offloaded_weights(dit: nn.Module, setup: Setup) -> list[torch.Tensor]:
    """Each swapped block's submodules' ``weight`` (what the offloader moves; the DiT's Linears have no biases)."""
    return block_weights(swapped_blocks(dit, setup))


def anima_notes(models: Models, setup: Setup) -> list[str]:
    notes = [
        "the Anima DiT (LLM adapter included) is aclora's own literal build of sd-scripts' layout, not sd-scripts' "
        "module; the Qwen3 text encoder is transformers' Qwen3Model",
        f"text counted at all {setup.qwen3_tokens} Qwen3 and {setup.t5_tokens} T5 tokens (sd-scripts pads both to "
        "their max length; the masks are all ones here, the Qwen3's causal mask a B x 1 x L x L one, as transformers "
        "makes it for a padded caption)",
    ]
    blocks = swapped_blocks(models.unet, setup)
    if blocks:
        gib = sum(w.numel() * w.element_size() for w in offloaded_weights(models.unet, setup)) / 1024**3
        notes.append(
            f"blocks_to_swap {setup.blocks_to_swap}: {len(blocks)} blocks' weights ({gib:.2f} GiB) stay on the CPU; "
            "the blocks swapped in reuse the device storage of those swapped out, so nothing more is counted"
        )
    if setup.train_text_encoder and setup.gradient_checkpointing:
        notes.append(
            "Qwen3 LoRA with gradient checkpointing: sd-scripts makes the first Qwen3 parameter (its token "
            "embedding) require a gradient, which is counted"
        )
    return notes


def anima_fields(values: dict[str, Any], raw: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """The Setup fields of an Anima run from the checked ``values``; refuses what is not counted, and, as the
    trainer does, turns fp8_base off (with a note)."""
    attn = values.get("attn_mode") or ("xformers" if values.get("xformers") else "torch")
    if attn not in ("torch", "sdpa"):  # the trainer: attn_mode, else xformers, else torch (SDPA)
        key = "attn_mode" if values.get("attn_mode") else "xformers"
        raise VramError(
            f"{key}={raw.get(key)!r}: Anima's {attn} attention is not counted by aclora vram; allowed: attn_mode "
            "torch or sdpa (sd-scripts' default), no xformers"
        )
    if values.pop("split_attn", False):
        raise VramError("split_attn=True is not counted for Anima (per-sample attention); allowed: split_attn=false")
    if values.pop("fp8_base", False):
        notes.append(f"fp8_base is not supported for Anima: {SCRIPT} turns it off, and so does the estimate")
    given = sorted(k for k in (*ANIMA_IGNORED, *SHARED_IGNORED) if k in raw)
    if given:
        notes.append("Anima trainer arguments that do not change the estimate: " + ", ".join(given))
    return {
        "blocks_to_swap": values.get("blocks_to_swap", 0) or 0,
        "t5_tokens": values.get("t5_max_token_length", DEFAULT_TOKENS),
        "qwen3_tokens": values.get("qwen3_max_token_length", DEFAULT_TOKENS),
    }


__all__ = ["build_anima_models", "swapped_blocks", "offloaded_weights", "anima_notes", "anima_fields"]
