"""FLUX.1, Chroma, SD3/SD3.5 and HunyuanImage-2.1 LoRA files read by their module names (sd-scripts'
``networks.lora_flux``, ``networks.lora_sd3`` and ``networks.lora_hunyuan_image``): which part and block of
the model a module is in, and which model a file is for.

The names are kohya's (``prefix + "." + module path`` with "." -> "_"):

- FLUX.1: ``lora_unet_double_blocks_<i>_{img,txt}_{mod_lin,attn_qkv,attn_proj,mlp_0,mlp_2}``,
  ``lora_unet_single_blocks_<i>_{linear1,linear2,modulation_lin}``, the ``in_dims`` layers
  ``lora_unet_{img_in,txt_in,time_in_*,vector_in_*,guidance_in_*}``; CLIP-L ``lora_te1_``, T5-XXL ``lora_te3_``.
- SD3: ``lora_unet_joint_blocks_<i>_{context,x}_block_<layer>``, the ``emb_dims`` layers
  ``lora_unet_{context_embedder,t_embedder_*,x_embedder_proj,y_embedder_*}`` and
  ``lora_unet_final_layer_{adaLN_modulation_1,linear}``; CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_``,
  T5-XXL ``lora_te3_``.
- HunyuanImage-2.1: ``lora_unet_double_blocks_<i>_{img,txt}_{mod_linear,attn_qkv,attn_proj,mlp_fc1,mlp_fc2}``,
  ``lora_unet_single_blocks_<i>_{linear1,linear2,modulation_linear}``; no text encoder.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

from ..families.hunyuan_image import NAME as HUNYUAN_IMAGE
from ..families.hunyuan_image import file_family
from .anima_names import ANIMA_PART_LABELS, anima_model, locate_anima
from .anima_names import TEXT_ENCODERS as ANIMA_TEXT_ENCODERS

FLUX, SD3, CHROMA = "FLUX.1", "SD3", "Chroma"
#: parts of a DiT file, in the model's order (after the text encoders)
DIT_PARTS = ("llm_adapter", "dit_in", "double", "single", "joint", "blocks", "dit_out")
DIT_PART_LABELS = {
    "te3": "text encoder 3",
    "dit_in": "DiT input layers",
    "double": "double blocks",
    "single": "single blocks",
    "joint": "joint blocks",
    "dit_out": "DiT final layer",
    **ANIMA_PART_LABELS,
}
#: what the text encoders of a DiT file are
TEXT_ENCODERS = {FLUX: {"te1": "CLIP-L", "te3": "T5-XXL"}, SD3: {"te1": "CLIP-L", "te2": "CLIP-G", "te3": "T5-XXL"}}
TEXT_ENCODERS.update(ANIMA_TEXT_ENCODERS)

_DOUBLE = re.compile(r"lora_unet_double_blocks_(\d+)_")
_SINGLE = re.compile(r"lora_unet_single_blocks_(\d+)_")
_JOINT = re.compile(r"lora_unet_joint_blocks_(\d+)_(context|x)_block_")
#: the input layers (sd-scripts' FLUX ``in_dims``, SD3 ``emb_dims``): whole names, and name prefixes
_IN_NAMES = {FLUX: ("img_in", "txt_in"), SD3: ("context_embedder",)}
_IN_PREFIXES = {FLUX: ("time_in_", "vector_in_", "guidance_in_"), SD3: ("t_embedder_", "x_embedder_", "y_embedder_")}


def _input_layer_of(rest: str) -> Optional[str]:
    """The family whose input layer ``rest`` (a name after ``lora_unet_``) is, or None."""
    for family in (FLUX, SD3):
        if rest in _IN_NAMES[family] or rest.startswith(_IN_PREFIXES[family]):
            return family
    return None


def locate_dit(name: str) -> Optional[tuple[str, str]]:
    """(part, block) of a FLUX.1 / SD3 / Anima DiT module name, or None when the name is not one."""
    anima = locate_anima(name)
    if anima:
        return anima
    found = _DOUBLE.match(name)
    if found:
        return "double", f"double_blocks.{found[1]}"
    found = _SINGLE.match(name)
    if found:
        return "single", f"single_blocks.{found[1]}"
    found = _JOINT.match(name)
    if found:
        return "joint", f"joint_blocks.{found[1]}.{found[2]}"
    if not name.startswith("lora_unet_"):
        return None
    rest = name[len("lora_unet_") :]
    if _input_layer_of(rest):
        return "dit_in", "embedders"
    if rest.startswith("final_layer_"):
        return "dit_out", "final_layer"
    return None


def family_from_names(names: Iterable[str]) -> Optional[str]:
    """FLUX.1, SD3 or HunyuanImage-2.1 from kohya module names, or None when the names do not tell (an SD
    file, or a file of CLIP-L modules only, which FLUX.1, SD3 and SDXL files all name ``lora_te1_``). Double
    and single blocks of layers both families have (attention, linear1/linear2 only) read as FLUX.1."""
    names = list(names)
    if any(_DOUBLE.match(n) or _SINGLE.match(n) for n in names):
        return file_family(names) or FLUX
    if any(_JOINT.match(n) for n in names):
        return SD3
    te = {n[5:8] for n in names if re.match(r"lora_te[123]_", n)}
    unet = [n[len("lora_unet_") :] for n in names if n.startswith("lora_unet_")]
    kinds = {"final" if r.startswith("final_layer_") else _input_layer_of(r) for r in unet}
    if kinds == {FLUX}:
        return FLUX
    if unet and kinds <= {SD3, "final"}:
        return SD3
    if not unet and "te3" in te:  # T5-XXL: with CLIP-G it is SD3, without it FLUX.1
        return SD3 if "te2" in te else FLUX
    return None


def model_from_metadata(meta: Mapping[str, str]) -> Optional[str]:
    """The model a file says it is for (sd-scripts' ``modelspec.architecture``, ``ss_base_model_version``),
    when that is FLUX.1, Chroma, SD3/SD3.5 or HunyuanImage-2.1; None otherwise. Our own ``aclora_model``
    names Chroma and HunyuanImage-2.1 as they are."""
    arch = str(meta.get("modelspec.architecture", "")).split("/")[0].lower()
    base = str(meta.get("ss_base_model_version", "")).lower()
    if meta.get("aclora_model") in (CHROMA, HUNYUAN_IMAGE):
        return str(meta["aclora_model"])
    if arch.startswith("hunyuan-image") or base.startswith("hunyuan-image"):
        return HUNYUAN_IMAGE
    if arch.startswith("flux-1"):
        variant = arch[len("flux-1") :].strip("-")
        return f"{FLUX} {variant}" if variant else FLUX
    if arch.startswith("chroma") or base == "chroma":
        return CHROMA
    if arch.startswith("stable-diffusion-3"):
        return _sd3_name(arch[len("stable-diffusion-3") :].strip("-"))
    if base == "flux1":
        return FLUX
    if base in ("medium", "5-medium", "5-large"):
        return _sd3_name(base)
    return None


def _sd3_name(model_type: str) -> str:
    if model_type.startswith("5-"):
        return f"SD3.5 {model_type[2:]}"
    return f"{SD3} {model_type}" if model_type else SD3


def dit_model(names: Iterable[str], meta: Mapping[str, str]) -> Optional[str]:
    """The model of a FLUX.1 / SD3 file as the report names it ("FLUX.1 dev", "SD3.5 medium", "SD3"), from
    the metadata when it says, else from the names (an SD3 file with ``x_block_attn2`` modules is SD3.5
    medium); None for other files."""
    names = list(names)
    anima = anima_model(names, meta)
    if anima:
        return anima
    family = family_from_names(names)
    named = model_from_metadata(meta)
    if named and (
        family is None
        or named.startswith(family)
        or (family == FLUX and named.startswith(CHROMA))
        or (family == SD3 and named.startswith("SD3"))
        or (named == HUNYUAN_IMAGE and file_family(names) != FLUX)  # names of both families: the metadata tells
    ):
        return named
    if family == SD3 and any("_x_block_attn2_" in n for n in names):
        return "SD3.5 medium"
    return family


def text_encoder_label(part: str, model: str) -> Optional[str]:
    """ "CLIP-L", "CLIP-G", "T5-XXL" for a text-encoder part of a FLUX.1/SD3 file; None for other files."""
    for family, encoders in TEXT_ENCODERS.items():
        if (
            model.startswith(family)
            or (family == SD3 and model.startswith("SD3"))
            or (family == FLUX and model.startswith("Chroma"))
        ):
            return encoders.get(part)
    return None


__all__ = [
    "FLUX",
    "SD3",
    "DIT_PARTS",
    "DIT_PART_LABELS",
    "locate_dit",
    "family_from_names",
    "model_from_metadata",
    "dit_model",
    "text_encoder_label",
]
