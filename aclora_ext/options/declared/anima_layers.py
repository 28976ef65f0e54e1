"""Which layers get a LoRA in an Anima DiT: sd-scripts' networks.lora_anima options, same names and meaning."""

from __future__ import annotations

from ..option import Option

_ANIMA = ("anima",)

ANIMA_OPTIONS: tuple[Option, ...] = (
    Option(
        "train_llm_adapter",
        "bool",
        False,
        "Also give the LLM adapter's transformer blocks a LoRA (lora_unet_llm_adapter_blocks_...).",
        optional=False,
        families=_ANIMA,
    ),
    Option(
        "exclude_patterns",
        "patterns",
        None,
        "Regular expressions (a Python literal, e.g. \"['.*mlp.*']\"); a layer whose whole dotted module path one "
        "matches (re.fullmatch) gets no LoRA. Always added: .*(_modulation|_norm|_embedder|final_layer).*",
        families=_ANIMA,
    ),
    Option(
        "include_patterns",
        "patterns",
        None,
        "Regular expressions (a Python literal); a layer whose whole dotted module path one matches gets a LoRA "
        "even when an exclude pattern matches it (e.g. \"['t_embedder.*', 'final_layer.*']\").",
        families=_ANIMA,
    ),
)
