"""The typed options of one network, and the rules between them that no single option can check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .declared import LAYER_OPTIONS
from .option import OptionError
from .selections import BlockSelection


@dataclass(frozen=True)
class ACLoRAConfig:
    """Validated options of one network (see :data:`~aclora_ext.options.OPTIONS` for their meaning)."""

    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    dropout: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None
    network_reg_lrs: Optional[tuple[tuple[str, float], ...]] = None
    restart_mode: str = "product"
    restart_every: Optional[int] = None
    restart_every_steps: Optional[int] = None
    energy: str = "squared"
    min_rank: int = 1
    fixed_p: Optional[float] = None
    ranks_from: Optional[str] = None
    min_importance: float = 0.01
    holdout: Optional[float] = None
    holdout_until: float = 0.7
    seed: int = 0
    save_full_rank: bool = False
    max_file_size: Optional[int] = None  # bytes
    # which layers (LAYER_OPTIONS)
    img_attn_dim: Optional[int] = None
    txt_attn_dim: Optional[int] = None
    img_mlp_dim: Optional[int] = None
    txt_mlp_dim: Optional[int] = None
    img_mod_dim: Optional[int] = None
    txt_mod_dim: Optional[int] = None
    single_dim: Optional[int] = None
    single_mod_dim: Optional[int] = None
    in_dims: Optional[tuple[int, ...]] = None
    train_blocks: str = "all"
    train_double_block_indices: BlockSelection = "all"
    train_single_block_indices: BlockSelection = "all"
    context_attn_dim: Optional[int] = None
    context_mlp_dim: Optional[int] = None
    context_mod_dim: Optional[int] = None
    x_attn_dim: Optional[int] = None
    x_mlp_dim: Optional[int] = None
    x_mod_dim: Optional[int] = None
    emb_dims: Optional[tuple[int, ...]] = None
    train_block_indices: BlockSelection = "all"
    attn_dim: Optional[int] = None
    mlp_dim: Optional[int] = None
    mod_dim: Optional[int] = None
    refiner_dim: Optional[int] = None
    embedder_dims: Optional[tuple[int, ...]] = None
    train_llm_adapter: bool = False  # Anima
    exclude_patterns: Optional[tuple[str, ...]] = None
    include_patterns: Optional[tuple[str, ...]] = None
    train_t5xxl: bool = False
    split_qkv: bool = False
    network_reg_dims: Optional[tuple[tuple[str, int], ...]] = None

    def replace(self, **changes: Any) -> "ACLoRAConfig":
        return validate(dataclasses.replace(self, **changes))


def validate(config: ACLoRAConfig, max_rank: Optional[int] = None) -> ACLoRAConfig:
    """Reject option combinations that contradict each other."""
    if config.restart_every is not None and config.restart_every_steps is not None:
        raise OptionError(
            f"network_args: restart_every={config.restart_every} and restart_every_steps="
            f"{config.restart_every_steps} contradict each other; set only one (epochs or optimizer steps)"
        )
    if config.restart_mode == "off":
        for name in ("restart_every", "restart_every_steps", "fixed_p"):
            if getattr(config, name) is not None:
                raise OptionError(
                    f"network_args: {name}={getattr(config, name)} has no effect with restart_mode=off; "
                    "remove it or choose restart_mode=paper|product"
                )
    if config.ranks_from is not None and config.restart_mode == "paper":  # its RESTARTs decide every rank again
        raise OptionError(
            f"network_args: ranks_from={config.ranks_from!r} needs restart_mode=product or off, not "
            "paper; allowed: remove one of them"
        )
    if config.holdout is not None and (
        config.restart_mode != "product" or config.fixed_p is not None or config.ranks_from is not None
    ):
        raise OptionError(
            f"network_args: holdout={config.holdout} chooses ranks on a held-out loss, which only product mode "
            f"without fixed_p and ranks_from does (restart_mode={config.restart_mode}, fixed_p={config.fixed_p}, "
            f"ranks_from={config.ranks_from!r}); allowed: remove one of them"
        )
    if config.conv_alpha is not None and config.conv_dim is None:
        raise OptionError(f"network_args: conv_alpha={config.conv_alpha} needs conv_dim=<rank of the 3x3 conv LoRA>")
    if max_rank is not None and config.min_rank > max_rank:
        raise OptionError(
            f"network_args: min_rank={config.min_rank} is larger than the maximum rank "
            f"network_dim={max_rank}; allowed: 1 .. {max_rank}"
        )
    if max_rank is not None and config.conv_dim is not None and config.min_rank > config.conv_dim:
        raise OptionError(
            f"network_args: min_rank={config.min_rank} is larger than conv_dim={config.conv_dim}; "
            f"allowed: 1 .. {config.conv_dim}"
        )
    return _validate_layers(config)


def _validate_layers(config: ACLoRAConfig) -> ACLoRAConfig:
    """split_qkv is refused (see its help); a layer's maximum rank below min_rank cannot be honoured."""
    if config.split_qkv:
        raise OptionError(
            "network_args: split_qkv=True is refused; allowed: false. sd-scripts' split_qkv trains separate "
            "q/k/v factors and saves them merged into one module with alpha unchanged, so every "
            "consumer applies a third (FLUX.1 single blocks: a quarter) of the trained update (Lumina 2's "
            "lora_lumina merges with the q/k/v widths of the 2B model hard-coded, 2304/768/768, and never splits "
            "its modules, so its save fails); AC-LoRA gives the fused layer the rank it needs instead"
        )
    for o in LAYER_OPTIONS:
        value = getattr(config, o.name)
        ranks = value if o.kind == "ints" and value else ([value] if o.kind == "int" and value else [])
        if o.kind == "regex_dims" and value:
            ranks = [rank for _, rank in value]
        low = [r for r in ranks if 0 < r < config.min_rank]
        if low:
            raise OptionError(
                f"network_args: {o.name}={_show(value)} gives a maximum rank of {low[0]}, below "
                f"min_rank={config.min_rank}; allowed: 0 (no LoRA) or ranks >= min_rank"
            )
    return config


def _show(value: Any) -> str:
    """A layer option's value as it would be typed."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(f"{p}={r}" for p, r in value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)
