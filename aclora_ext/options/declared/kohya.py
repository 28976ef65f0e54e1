"""What is trained, with the names and meaning of kohya's networks.lora: the 3x3 conv LoRA, dropouts, LoRA+."""

from __future__ import annotations

from ..option import Option

KOHYA_OPTIONS: tuple[Option, ...] = (
    Option(
        "conv_dim",
        "int",
        None,
        "Maximum rank of the LoRA on 3x3 convolutions (ResnetBlock2D, Down/Upsample2D). "
        "Unset: no 3x3 conv LoRA, like networks.lora.",
        minimum=1,
    ),
    Option(
        "conv_alpha",
        "float",
        None,
        "Alpha of the 3x3 conv LoRA (defaults to 1.0 like networks.lora). Needs conv_dim.",
        minimum=0,
        min_inclusive=False,
    ),
    Option(
        "dropout",
        "float",
        None,
        "Dropout on the rank-dimension activations (sd-scripts fills it from --network_dropout).",
        minimum=0,
        maximum=1,
        max_inclusive=False,
    ),
    Option(
        "rank_dropout",
        "float",
        None,
        "Probability of dropping each rank for a step (the kept ones are rescaled).",
        minimum=0,
        maximum=1,
        max_inclusive=False,
    ),
    Option(
        "module_dropout",
        "float",
        None,
        "Probability of skipping a whole module for a step.",
        minimum=0,
        maximum=1,
        max_inclusive=False,
    ),
    Option(
        "loraplus_lr_ratio",
        "float",
        None,
        "LoRA+: the lr of lora_up is this many times the lr of lora_down.",
        minimum=0,
        min_inclusive=False,
    ),
    Option(
        "loraplus_unet_lr_ratio",
        "float",
        None,
        "LoRA+ ratio for the U-Net only (overrides loraplus_lr_ratio).",
        minimum=0,
        min_inclusive=False,
    ),
    Option(
        "loraplus_text_encoder_lr_ratio",
        "float",
        None,
        "LoRA+ ratio for the text encoder(s) only (overrides loraplus_lr_ratio).",
        minimum=0,
        min_inclusive=False,
    ),
    Option(
        "network_reg_lrs",
        "regex_lrs",
        None,
        "Learning rate by LoRA module name, as lora_flux / lora_hunyuan_image / lora_anima: comma-separated "
        "pattern=lr pairs (re.search on the name, e.g. single_blocks=5e-5; Anima: re.fullmatch on the dotted "
        "module path); the first match wins over unet_lr / text_encoder_lr, LoRA+ multiplies it for lora_up, "
        "0: that module is not trained. Every family.",
    ),
)
