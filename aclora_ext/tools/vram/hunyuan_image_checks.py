"""What ``aclora vram`` checks of a HunyuanImage-2.1 set-up (hunyuan_image_train_network.py) before counting it:
what the trainer asserts or warns away, and what the count does not model yet, each refused with the key, the
value and what is allowed. Kept apart from ``setup`` (which calls it) so that it needs nothing of the tool."""

from __future__ import annotations

from typing import Any, Optional

from ...harness.hunyuan_image_dit import HUNYUAN_IMAGE_21

TRAINER = "hunyuan_image_train_network.py"


def most_blocks_to_swap(
    double: int = HUNYUAN_IMAGE_21.depth_double, single: int = HUNYUAN_IMAGE_21.depth_single
) -> int:
    """The largest N enable_block_swap accepts: N//2 double and (N - N//2)*2 single blocks, each <= count - 2."""
    n = 0
    while (n + 1) // 2 <= double - 2 and (n + 1 - (n + 1) // 2) * 2 <= single - 2:
        n += 1
    return n


def hunyuan_image_problem(setup: Any) -> Optional[str]:
    """Why ``setup`` (a ``Setup`` of family hunyuan_image) cannot be counted, or None."""
    s = setup
    for key, default in (("variant", ""), ("t5_tokens", 0), ("apply_t5_attn_mask", False)):
        if getattr(s, key) != default:
            return f"{key}={getattr(s, key)!r} is an option of the FLUX.1/SD3 trainers, not of {TRAINER}"
    if s.attention != "sdpa":
        return f"attention={s.attention!r} is not counted for {TRAINER}; allowed: sdpa (attn_mode torch)"
    for key in ("width", "height"):
        if getattr(s, key) % 32:
            return f"{key}={getattr(s, key)!r} is not valid for {TRAINER}; allowed: a multiple of 32 (its VAE's step)"
    if s.fp8_base:
        return (
            f"fp8_base=True without fp8_scaled: {TRAINER} warns that fp8_base is not supported for HunyuanImage-2.1; "
            "allowed: fp8_scaled=true (then fp8_base is ignored), or neither"
        )
    if s.mixed_precision == "no":
        return (
            f"mixed_precision='no' is not valid for {TRAINER}: the cached byT5 outputs are float16 and only "
            "autocast lets a float32 DiT take them (fp8_scaled's scales are bf16 too); allowed: mixed_precision="
            "'bf16' (its recommendation) or 'fp16'"
        )
    if s.train_text_encoder:
        return (
            f"train_text_encoder=True (no network_train_unet_only): {TRAINER} never trains Qwen2.5-VL or byT5; "
            "allowed: network_train_unet_only=true"
        )
    if not s.cache_text_encoder_outputs:
        return (
            "cache_text_encoder_outputs=False: aclora vram does not count Qwen2.5-VL-7B and byT5 on the device yet "
            "(they would encode every step); allowed: cache_text_encoder_outputs=true"
        )
    if not s.cache_latents:
        return (
            "cache_latents=False: aclora vram does not count the HunyuanImage-2.1 VAE on the device yet; allowed: "
            "cache_latents=true (or cache_latents_to_disk=true)"
        )
    most = most_blocks_to_swap()
    if not isinstance(s.blocks_to_swap, int) or not 0 <= s.blocks_to_swap <= most:
        return (
            f"blocks_to_swap={s.blocks_to_swap!r} is not valid; allowed: an integer from 0 to {most} for "
            "HunyuanImage-2.1 (it swaps N//2 of its 20 double and (N - N//2)*2 of its 40 single blocks, and "
            "sd-scripts asserts each is at most the block count - 2)"
        )
    return None
