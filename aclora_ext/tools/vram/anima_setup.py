"""What ``aclora vram`` accepts for an Anima run (``anima_train_network.py``), as sd-scripts checks it: the
defaults it fills in and the problems it refuses (a message naming the key, the value and what is allowed). No
imports from ``setup`` (which asks this module), so the checks hand back messages rather than raise."""

from __future__ import annotations

from typing import Any, Optional

from ...harness.anima_dit import ANIMA, ANIMA_PIXELS_PER_TOKEN

SCRIPT = "anima_train_network.py"
#: sd-scripts' defaults for --qwen3_max_token_length and --t5_max_token_length
DEFAULT_TOKENS = 512
#: Anima.enable_block_swap asserts blocks_to_swap <= num_blocks - 2
MAX_BLOCKS_TO_SWAP = ANIMA.num_blocks - 2
#: the largest image the DiT's 3-D RoPE table covers (max_img_h / patch_spatial tokens, 16 pixels each)
MAX_PIXELS = ANIMA.max_img // ANIMA.patch_spatial * ANIMA_PIXELS_PER_TOKEN


def anima_defaults(setup: Any) -> dict[str, Any]:
    """The fields sd-scripts' defaults fill in (0 = its default)."""
    return {
        "t5_tokens": setup.t5_tokens or DEFAULT_TOKENS,
        "qwen3_tokens": setup.qwen3_tokens or DEFAULT_TOKENS,
    }


def anima_problem(setup: Any) -> Optional[str]:
    """Why ``setup`` is not a run aclora vram counts for Anima, or None."""
    for key, value, allowed in (
        ("t5_max_token_length", setup.t5_tokens, "an integer >= 1"),
        ("qwen3_max_token_length", setup.qwen3_tokens, "an integer >= 1"),
    ):
        if not isinstance(value, int) or value < 1:
            return f"{key}={value!r} is not valid; allowed: {allowed}"
    if setup.variant:
        return f"variant={setup.variant!r} is not valid for Anima; allowed: none (sd-scripts builds one Anima DiT)"
    if not isinstance(setup.blocks_to_swap, int) or not 0 <= setup.blocks_to_swap <= MAX_BLOCKS_TO_SWAP:
        return (
            f"blocks_to_swap={setup.blocks_to_swap!r} is not valid; allowed: an integer from 0 to "
            f"{MAX_BLOCKS_TO_SWAP} for Anima (sd-scripts asserts N <= its {ANIMA.num_blocks} blocks - 2)"
        )
    for key in ("width", "height"):
        value = getattr(setup, key)
        if value % ANIMA_PIXELS_PER_TOKEN or value > MAX_PIXELS:
            return (
                f"{key}={value!r} is not valid for Anima; allowed: a multiple of 16 (sd-scripts verifies bucket "
                f"steps of 16) up to {MAX_PIXELS} (the DiT's position table)"
            )
    if not setup.cache_latents:
        return (
            "cache_latents=False is not counted for Anima (its Qwen-Image VAE is not modelled by aclora vram); "
            "allowed: cache_latents=true or cache_latents_to_disk=true"
        )
    if setup.fp8_base:
        return f"fp8_base=True is not valid for Anima: {SCRIPT} turns it off (not supported); allowed: fp8_base=false"
    if setup.apply_t5_attn_mask:
        return f"apply_t5_attn_mask=True is not an option of {SCRIPT}; allowed: leave it unset"
    if setup.attention != "sdpa":
        return (
            f"attention={setup.attention!r} is not counted for Anima; allowed: sdpa (attn_mode torch, sd-scripts' "
            "default for Anima)"
        )
    if setup.cache_text_encoder_outputs and setup.train_text_encoder:
        return (
            "cache_text_encoder_outputs=True needs network_train_unet_only=True (the Qwen3 LoRA cannot train from "
            f"cached outputs), as {SCRIPT} asserts"
        )
    return None
