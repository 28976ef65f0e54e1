"""Which layers get a LoRA, per model family: sd-scripts' networks.lora_flux / lora_sd3 options, same names and
meaning. A rank given here is that layer's maximum rank: the rank search still decides the file's."""

from __future__ import annotations

from ..option import Option
from .anima_layers import ANIMA_OPTIONS

#: lora_lumina's train_blocks beside "all" (families/lumina.py selects by them)
LUMINA_TRAIN_BLOCKS = ("transformer", "refiners", "noise_refiner", "context_refiner")

#: the model families (families/ adapters) by their option key, as messages name them
FAMILIES = {
    "sd": "SD1.x/2.x/SDXL",
    "flux": "FLUX.1",
    "sd3": "SD3/SD3.5",
    "lumina": "Lumina 2",
    "anima": "Anima",
    "hunyuan_image": "HunyuanImage-2.1",
}
_FLUX, _SD3, _DIT = ("flux",), ("sd3",), ("flux", "sd3")
_LUMINA = ("lumina",)
_SPLIT_QKV = _DIT + ("hunyuan_image",)  # lora_hunyuan_image's split_qkv saves as lora_flux's does


def _dim(name: str, what: str, families: tuple[str, ...]) -> Option:
    """A per-layer-type maximum rank, as lora_flux's img_attn_dim and its kin."""
    return Option(
        name,
        "int",
        None,
        f"Maximum rank of the {what} (unset: network_dim; 0: no LoRA there).",
        minimum=0,
        families=families,
    )


FLUX_OPTIONS: tuple[Option, ...] = (
    _dim("img_attn_dim", "double blocks' image attention (img_attn.qkv, img_attn.proj)", _FLUX),
    _dim("txt_attn_dim", "double blocks' text attention (txt_attn.qkv, txt_attn.proj)", _FLUX),
    _dim("img_mlp_dim", "double blocks' image MLP (img_mlp.0, img_mlp.2)", _FLUX),
    _dim("txt_mlp_dim", "double blocks' text MLP (txt_mlp.0, txt_mlp.2)", _FLUX),
    _dim("img_mod_dim", "double blocks' image modulation (img_mod.lin)", _FLUX),
    _dim("txt_mod_dim", "double blocks' text modulation (txt_mod.lin)", _FLUX),
    _dim("single_dim", "single blocks' linear1 and linear2", _FLUX),
    _dim("single_mod_dim", "single blocks' modulation (modulation.lin)", _FLUX),
    Option(
        "in_dims",
        "ints",
        None,
        "Maximum ranks of the input layers img_in, time_in, vector_in, guidance_in, txt_in (0: no LoRA there). "
        "Unset: none of them gets a LoRA.",
        minimum=0,
        families=_FLUX,
        length=5,
    ),
    Option(
        "train_blocks",
        "choice",
        "all",
        "Which blocks get a LoRA: all; FLUX.1: single (single-stream blocks only) or double (double-stream "
        "blocks only); Lumina 2: transformer (the main blocks), refiners, noise_refiner or context_refiner.",
        choices=("all", "single", "double", *LUMINA_TRAIN_BLOCKS),
        optional=False,
        families=(*_FLUX, *_LUMINA),
    ),
    Option("train_double_block_indices", "blocks", "all", "Which double-stream blocks get a LoRA.", families=_FLUX),
    Option("train_single_block_indices", "blocks", "all", "Which single-stream blocks get a LoRA.", families=_FLUX),
)

SD3_OPTIONS: tuple[Option, ...] = (
    _dim("context_attn_dim", "joint blocks' context attention (context_block.attn.qkv, .proj)", _SD3),
    _dim("context_mlp_dim", "joint blocks' context MLP (context_block.mlp.fc1, .fc2)", _SD3),
    _dim("context_mod_dim", "joint blocks' context modulation (context_block.adaLN_modulation.1)", _SD3),
    _dim("x_attn_dim", "joint blocks' image attention (x_block.attn and attn2: qkv, proj)", _SD3),
    _dim("x_mlp_dim", "joint blocks' image MLP (x_block.mlp.fc1, .fc2)", _SD3),
    _dim("x_mod_dim", "joint blocks' image modulation (x_block.adaLN_modulation.1)", _SD3),
    Option(
        "emb_dims",
        "ints",
        None,
        "Maximum ranks of context_embedder, t_embedder, x_embedder (a 2x2 conv; conv_dim wins when set), "
        "y_embedder, final_layer.adaLN_modulation, final_layer.linear (0: no LoRA there). "
        "Unset: none of them gets a LoRA.",
        minimum=0,
        families=_SD3,
        length=6,
    ),
    Option("train_block_indices", "blocks", "all", "Which joint blocks get a LoRA.", families=_SD3),
)

LUMINA_OPTIONS: tuple[Option, ...] = (
    _dim("attn_dim", 'layers whose LoRA name has "attention" (attention.qkv, attention.out)', _LUMINA),
    _dim("mlp_dim", 'layers whose LoRA name has "mlp" (only t_embedder\'s MLP, with embedder_dims)', _LUMINA),
    _dim("mod_dim", 'layers whose LoRA name has "modulation" (adaLN_modulation.1, final layer\'s too)', _LUMINA),
    _dim("refiner_dim", "noise and context refiner blocks (after attn_dim, mlp_dim, mod_dim)", _LUMINA),
    Option(
        "embedder_dims",
        "ints",
        None,
        "Maximum ranks of x_embedder, t_embedder (its MLP), cap_embedder (0: no LoRA there). "
        "Unset: none of them gets a LoRA.",
        minimum=0,
        families=_LUMINA,
        length=3,
    ),
)

#: options of both diffusion-transformer families, and of every family
SHARED_OPTIONS: tuple[Option, ...] = (
    Option(
        "train_t5xxl",
        "bool",
        False,
        "Also give T5-XXL's attention and feed-forward layers a LoRA (lora_te3_...); "
        "sd-scripts then cannot cache the text-encoder outputs.",
        optional=False,
        families=_DIT,
    ),
    Option(
        "split_qkv",
        "bool",
        False,
        "Only false is accepted: sd-scripts saves split_qkv's q/k/v factors merged into one module with alpha "
        "unchanged, so every consumer applies a third (FLUX.1 single blocks: a quarter) of the trained update "
        "(Lumina 2: with q/k/v widths hard-coded for the 2B model); AC-LoRA gives the fused layer the rank it "
        "needs instead.",
        optional=False,
        families=(*_SPLIT_QKV, *_LUMINA),
    ),
    Option(
        "network_reg_dims",
        "regex_dims",
        None,
        "Maximum rank by LoRA module name: comma-separated pattern=rank pairs (re.search on the name, "
        "e.g. double_blocks_0_=16; the first match wins over network_dim, conv_dim and the per-type ranks; "
        "0: no LoRA there). Anima: re.fullmatch on the dotted module path, as lora_anima (blocks\\.0\\..*=16).",
    ),
)

LAYER_OPTIONS: tuple[Option, ...] = FLUX_OPTIONS + SD3_OPTIONS + LUMINA_OPTIONS + ANIMA_OPTIONS + SHARED_OPTIONS
