"""Anima LoRA files read by their module names (sd-scripts' ``networks.lora_anima``): which part and block of
the model a module is in, and which model a file is for.

The names are kohya's: ``lora_unet_blocks_<i>_{self_attn,cross_attn}_{q,k,v,output}_proj``,
``lora_unet_blocks_<i>_mlp_layer{1,2}``, ``lora_unet_blocks_<i>_adaln_modulation_<kind>_<j>`` (by
include_patterns), the LLM adapter ``lora_unet_llm_adapter_blocks_<i>_...`` (train_llm_adapter), the
embedders ``lora_unet_x_embedder_proj_1``, ``lora_unet_t_embedder_1_linear_{1,2}`` and
``lora_unet_final_layer_...``; the Qwen3 text encoder ``lora_te_layers_<i>_{self_attn,mlp}_...``.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

from ..families.anima import names_are_anima

ANIMA = "Anima"
#: the parts an Anima file adds to the DiT parts (dit_names.DIT_PARTS places them in the model's order)
ANIMA_PART_LABELS = {"llm_adapter": "LLM adapter", "blocks": "DiT blocks"}
TEXT_ENCODERS = {ANIMA: {"te": "Qwen3"}}

_BLOCK = re.compile(r"lora_unet_blocks_(\d+)_")
_ADAPTER = re.compile(r"lora_unet_llm_adapter_blocks_(\d+)_")


def locate_anima(name: str) -> Optional[tuple[str, str]]:
    """(part, block) of an Anima DiT block or LLM adapter module name, or None (the embedders and the final
    layer are placed by the rules every DiT shares)."""
    found = _BLOCK.match(name)
    if found:
        return "blocks", f"blocks.{found[1]}"
    found = _ADAPTER.match(name)
    if found:
        return "llm_adapter", f"llm_adapter.blocks.{found[1]}"
    return None


def anima_model(names: Iterable[str], meta: Mapping[str, str]) -> Optional[str]:
    """ "Anima preview" (or "Anima") when the metadata sd-scripts writes or the module names say Anima."""
    arch = str(meta.get("modelspec.architecture", "")).split("/")[0].lower()
    said = arch.startswith("anima") or str(meta.get("ss_base_model_version", "")).lower() == "anima"
    if not said and not names_are_anima(list(names)):
        return None
    variant = arch[len("anima") :].strip("-")
    return f"{ANIMA} {variant}" if variant and variant != "unknown" else ANIMA
