"""Which sd-scripts trainer a set of arguments is for: the model family (SD1.x, SD2.x, SDXL, FLUX.1, SD3)
and, for the DiTs, the model (FLUX.1 dev/schnell, Chroma, SD3 medium, SD3.5 medium/large); the arguments that only
one trainer has, refused for another family with the key, the value and the family it belongs to."""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from .setup import DEFAULT_VARIANT, DIT_FAMILIES, VramError

SCRIPTS = {
    "sd1": "train_network.py",
    "sd2": "train_network.py --v2",
    "sdxl": "sdxl_train_network.py",
    "flux": "flux_train_network.py",
    "sd3": "sd3_train_network.py",
    "lumina": "lumina_train_network.py",
    "hunyuan_image": "hunyuan_image_train_network.py",
    "anima": "anima_train_network.py",
}
SD_FAMILIES = ("sd1", "sd2", "sdxl")
#: sd-scripts arguments that belong to some trainers only: {key: the families whose trainer has it}
FAMILY_ONLY: dict[str, tuple[str, ...]] = {
    "v2": ("sd1", "sd2"),
    "ae": ("flux",),
    "clip_l": DIT_FAMILIES,
    "t5xxl": DIT_FAMILIES,
    "clip_g": ("sd3",),
    "blocks_to_swap": DIT_FAMILIES,
    "t5xxl_max_token_length": DIT_FAMILIES,
    "apply_t5_attn_mask": DIT_FAMILIES,
    "model_type": ("flux",),
    "split_mode": ("flux",),
    "guidance_scale": ("flux",),
    "timestep_sampling": ("flux",),
    "discrete_flow_shift": ("flux",),
    "model_prediction_type": ("flux",),
    "sigmoid_scale": ("flux",),
    "training_shift": ("sd3",),
    "apply_lg_attn_mask": ("sd3",),
    "clip_l_dropout_rate": ("sd3",),
    "clip_g_dropout_rate": ("sd3",),
    "t5_dropout_rate": ("sd3",),
    "pos_emb_random_crop_rate": ("sd3",),
    "enable_scaled_pos_embed": ("sd3",),
    "t5xxl_device": DIT_FAMILIES,
    "t5xxl_dtype": DIT_FAMILIES,
    "weighting_scheme": DIT_FAMILIES,
    "logit_mean": DIT_FAMILIES,
    "logit_std": DIT_FAMILIES,
    "mode_scale": DIT_FAMILIES,
}
# hunyuan_image_train_network.py: its own arguments, and those it shares with the FLUX.1 (and SD3) trainers
HUNYUAN_IMAGE_ONLY = ("byt5", "fp8_scaled", "fp8_vl", "split_attn", "attn_mode", "text_encoder_cpu", "vae_chunk_size")
HUNYUAN_IMAGE_SHARED = (
    "blocks_to_swap",
    "timestep_sampling",
    "discrete_flow_shift",
    "model_prediction_type",
    "sigmoid_scale",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
)
FAMILY_ONLY.update({key: ("hunyuan_image",) for key in HUNYUAN_IMAGE_ONLY})
FAMILY_ONLY.update({key: (*FAMILY_ONLY[key], "hunyuan_image") for key in HUNYUAN_IMAGE_SHARED})
#: anima_train_network.py: the arguments it shares with the DiT trainers, and those only it has
ANIMA_SHARED = "blocks_to_swap timestep_sampling discrete_flow_shift sigmoid_scale weighting_scheme logit_mean".split()
ANIMA_ONLY = "qwen3 qwen3_max_token_length t5_max_token_length t5_tokenizer_path llm_adapter_path attn_mode".split()
FAMILY_ONLY.update({key: (*FAMILY_ONLY[key], "anima") for key in [*ANIMA_SHARED, "logit_std", "mode_scale"]})
# attn_mode, split_attn and vae_chunk_size are HunyuanImage-2.1's too
ANIMA_ALSO = ("split_attn", "unsloth_offload_checkpointing", "vae_chunk_size")
FAMILY_ONLY.update({k: (*FAMILY_ONLY.get(k, ()), "anima") for k in [*ANIMA_ONLY, *ANIMA_ALSO]})
#: the DiT trainers' arguments that do not change the estimate (listed as such when given)
DIT_IGNORED = (
    "ae",
    "clip_l",
    "t5xxl",
    "clip_g",
    "guidance_scale",
    "timestep_sampling",
    "discrete_flow_shift",
    "model_prediction_type",
    "sigmoid_scale",
    "training_shift",
    "apply_lg_attn_mask",
    "clip_l_dropout_rate",
    "clip_g_dropout_rate",
    "t5_dropout_rate",
    "pos_emb_random_crop_rate",
    "enable_scaled_pos_embed",
    "t5xxl_device",
    "t5xxl_dtype",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "split_mode",
    "byt5",
    "text_encoder_cpu",
    "vae_chunk_size",
)
# Lumina 2 (lumina_train_network.py): its own arguments, the DiT trainers' arguments it has too, and those of
# them that do not change the estimate (use_flash_attn / use_sage_attn change the attention: config.UNSUPPORTED)
FAMILY_ONLY.update({"gemma2": ("lumina",), "gemma2_max_token_length": ("lumina",), "system_prompt": ("lumina",)})
LUMINA_SHARED = (
    "ae",
    "blocks_to_swap",
    "timestep_sampling",
    "discrete_flow_shift",
    "model_prediction_type",
    "sigmoid_scale",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
)
FAMILY_ONLY.update({key: (*FAMILY_ONLY[key], "lumina") for key in LUMINA_SHARED})
LUMINA_IGNORED = ("gemma2", "system_prompt")
_SD3_PATH = re.compile(r"sd3|sd_3|stable[-_ ]?diffusion[-_ ]?3")
_SD35_PATH = re.compile(r"3[._-]5|sd35")


def _given(arguments: Mapping[str, Any], key: str) -> bool:
    return arguments.get(key) not in (None, False, "", 0, "false")


def detect_family(arguments: Mapping[str, Any], notes: list[str]) -> str:
    """The family from the arguments (v2; the model path; the DiT trainers' own arguments), with a note why."""
    model = str(arguments.get("pretrained_model_name_or_path", ""))
    lower = model.lower()
    if "hunyuan" in lower or _given(arguments, "byt5"):  # hunyuan_image_train_network.py
        why = "byt5 is given" if _given(arguments, "byt5") else f"'hunyuan' in {model!r}"
        notes.append(f"family hunyuan_image ({why}: hunyuan_image_train_network.py; --family to change)")
        return "hunyuan_image"
    if _given(arguments, "qwen3"):
        notes.append("family anima (qwen3 is given: an anima_train_network.py argument; --family to change)")
        return "anima"
    if _given(arguments, "gemma2") or "lumina" in lower:  # lumina_train_network.py
        why = "gemma2 is given" if _given(arguments, "gemma2") else f"'lumina' in {model!r}"
        notes.append(f"family lumina ({why}; --family to change)")
        return "lumina"
    if _given(arguments, "v2"):
        notes.append("family sd2 (v2 = true)")
        return "sd2"
    if "flux" in lower:
        notes.append(f"family flux ('flux' in {model!r}; --family to change)")
        return "flux"
    if _SD3_PATH.search(lower):
        notes.append(f"family sd3 ('sd3' in {model!r}; --family to change)")
        return "sd3"
    for key, family in (("model_type", "flux"), ("ae", "flux"), ("clip_g", "sd3")):
        if _given(arguments, key):
            notes.append(f"family {family} ({key} is given: a {SCRIPTS[family]} argument; --family to change)")
            return family
    if "xl" in lower:
        notes.append(f"family sdxl ('xl' in {model!r}; --family to change)")
        return "sdxl"
    dit_only = sorted(k for k, fams in FAMILY_ONLY.items() if set(DIT_FAMILIES) <= set(fams) and _given(arguments, k))
    if dit_only:
        raise VramError(
            f"{dit_only[0]}={arguments[dit_only[0]]!r} belongs to flux_train_network.py and "
            "sd3_train_network.py, and nothing tells which: allowed: --family flux or --family sd3 "
            "(or 'flux' / 'sd3' in pretrained_model_name_or_path, or --ae / --clip_g)"
        )
    notes.append("family sd1 (no v2, no 'xl', 'flux' or 'sd3' in pretrained_model_name_or_path; --family to change)")
    return "sd1"


def detect_variant(family: str, arguments: Mapping[str, Any], variant: Optional[str], notes: list[str]) -> str:
    """The DiT model: --variant, else from the model path, else the family's default ("" for SD families)."""
    if family not in DIT_FAMILIES:
        if variant:
            raise VramError(f"--variant {variant!r} is for family flux or sd3; family {family!r} has none")
        return ""
    chroma = family == "flux" and str(arguments.get("model_type", "flux")).strip().lower() == "chroma"
    if variant:
        if chroma and variant != "chroma":
            raise VramError(
                f"--variant {variant!r} and model_type='chroma' disagree: flux_train_network.py builds Chroma; "
                "allowed: --variant chroma, or leave --variant out"
            )
        return variant
    if chroma:
        notes.append("model chroma (model_type = chroma)")
        return "chroma"
    model = str(arguments.get("pretrained_model_name_or_path", "")).lower()
    if family == "flux":
        found = "schnell" if "schnell" in model else "dev" if "dev" in model else ""
    elif "large" in model:
        found = "5-large"
    elif "medium" in model:
        found = "5-medium" if _SD35_PATH.search(model) else "medium"
    else:
        found = ""
    if found:
        notes.append(f"model {found} (from pretrained_model_name_or_path; --variant to change)")
        return found
    notes.append(f"model {DEFAULT_VARIANT[family]} (the default for family {family}; --variant to change)")
    return DEFAULT_VARIANT[family]


def check_family_arguments(family: str, arguments: Mapping[str, tuple[Any, str]]) -> None:
    """Refuse an argument another trainer has (e.g. --clip_g for FLUX.1, --blocks_to_swap for SDXL)."""
    for key, (raw, origin) in arguments.items():
        families = FAMILY_ONLY.get(key)
        if families and family not in families and raw not in (None, False, "false"):
            scripts = sorted({SCRIPTS[f].split()[0] for f in families})
            named = ", ".join(scripts[:-1]) + " and " + scripts[-1] if len(scripts) > 1 else scripts[0]
            raise VramError(
                f"{origin}: {key}={raw!r} is an argument of {named}, not of "
                f"{SCRIPTS[family].split()[0]} (family {family!r}); allowed for family {family!r}: "
                "leave it unset, or choose the family it belongs to with --family"
            )
