"""Lumina 2 LoRA files read by their module names (sd-scripts' ``networks.lora_lumina``): which part and block
of the model a module is in, and whether a file is for Lumina 2.

The names (kohya's ``prefix + "." + module path`` with "." -> "_"): the main blocks
``lora_unet_layers_<i>_<layer>``, the refiners ``lora_unet_noise_refiner_<i>_<layer>`` and
``lora_unet_context_refiner_<i>_<layer>``, the ``embedder_dims`` layers ``lora_unet_x_embedder``,
``lora_unet_t_embedder_mlp_{0,2}``, ``lora_unet_cap_embedder_1``, the final layer ``lora_unet_final_layer_*``
(read as every DiT's final layer, ``dit_names``) and Gemma2 as ``lora_te_layers_<i>_...``.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

LUMINA = "Lumina 2"
#: parts of a Lumina 2 file, in the model's order (between the DiT input layers and the final layer)
LUMINA_PARTS = ("refiners", "layers")
LUMINA_PART_LABELS = {"refiners": "refiner blocks", "layers": "main blocks"}

_BLOCK = re.compile(r"lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_")
_EMBEDDERS = ("lora_unet_x_embedder", "lora_unet_t_embedder_", "lora_unet_cap_embedder_")


def locate_lumina(name: str) -> Optional[tuple[str, str]]:
    """(part, block) of a Lumina 2 DiT module name, or None when the name is not one of its blocks or embedders."""
    found = _BLOCK.match(name)
    if found:
        return ("layers" if found[1] == "layers" else "refiners"), f"{found[1]}.{found[2]}"
    if name == _EMBEDDERS[0] or name.startswith(_EMBEDDERS[1:]):
        return "dit_in", "embedders"
    return None


def lumina_model(names: Iterable[str], meta: Mapping[str, str]) -> Optional[str]:
    """ "Lumina 2" when the metadata says so (sd-scripts' ``modelspec.architecture`` lumina-2/lora,
    ``ss_base_model_version`` lumina2) or the names do (its blocks, its caption embedder); None otherwise."""
    arch = str(meta.get("modelspec.architecture", "")).split("/")[0].lower()
    if arch.startswith("lumina") or str(meta.get("ss_base_model_version", "")).lower().startswith("lumina"):
        return LUMINA
    if any(_BLOCK.match(n) or n.startswith("lora_unet_cap_embedder_") for n in names):
        return LUMINA
    return None


def lumina_text_encoder(part: str, model: str) -> Optional[str]:
    """ "Gemma2" for the text-encoder part of a Lumina 2 file; None otherwise."""
    return "Gemma2" if model == LUMINA and part == "te" else None


__all__ = ["LUMINA", "LUMINA_PARTS", "LUMINA_PART_LABELS", "locate_lumina", "lumina_model", "lumina_text_encoder"]
