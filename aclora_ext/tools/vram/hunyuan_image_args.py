"""Reading hunyuan_image_train_network.py's arguments for ``aclora vram``: the Setup fields of a HunyuanImage-2.1
run (blocks_to_swap, fp8_scaled, split_attn), the attention it would use, and notes on what was read or ignored."""

from __future__ import annotations

from typing import Any, Mapping

from .family_args import DIT_IGNORED
from .setup import VramError


def hunyuan_image_fields(raw: Mapping[str, Any], values: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The Setup fields of a hunyuan_image_train_network.py run (``values``: the checked arguments; an ignored
    ``fp8_base`` is taken out of them, as the trainer turns it off under ``fp8_scaled``)."""
    attention = values.get("attn_mode") or ("xformers" if values.get("xformers") else "torch")
    if attention not in ("torch", "sdpa"):
        key = "attn_mode" if values.get("attn_mode") else "xformers"
        raise VramError(
            f"{key}={raw[key]!r}: aclora vram counts HunyuanImage-2.1's attention through torch's "
            "scaled_dot_product_attention only (sageattn cannot train); allowed: attn_mode='torch' (the default)"
        )
    fp8_scaled = bool(values.get("fp8_scaled"))
    if fp8_scaled and values.get("fp8_base"):
        values.pop("fp8_base")
        notes.append("fp8_base is ignored under fp8_scaled (hunyuan_image_train_network.py turns it off)")
    if values.get("fp8_vl"):
        notes.append("fp8_vl: Qwen2.5-VL in fp8 while it caches; with cached outputs it holds no device memory")
    given = sorted(k for k in DIT_IGNORED if raw.get(k) not in (None, False, ""))  # byt5, discrete_flow_shift...
    if given:
        notes.append("HunyuanImage-2.1 trainer arguments that do not change the estimate: " + ", ".join(given))
    return {
        "blocks_to_swap": values.get("blocks_to_swap", 0) or 0,
        "fp8_scaled": fp8_scaled,
        "split_attn": bool(values.get("split_attn")),
    }
