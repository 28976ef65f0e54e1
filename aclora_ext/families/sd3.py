"""SD3 / SD3.5 (sd-scripts' sd3_train_network.py): the layers and names of sd-scripts' networks.lora_sd3.

DiT (sd-scripts' ``library.sd3_models.MMDiT``): every Linear inside ``SingleDiTBlock`` modules, i.e.
each joint block's ``context_block`` and ``x_block`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``, ``adaLN_modulation.1``; ``attn2`` in SD3.5's self-attention x blocks; the last context
block only ``attn.qkv`` and ``adaLN_modulation.1``), prefix ``lora_unet``:
``lora_unet_joint_blocks_0_x_block_attn_qkv``. With ``emb_dims`` also the embedders and the final
layer (``lora_unet_x_embedder_proj`` is a 2x2 convolution). Text encoders ``[CLIP-L, CLIP-G, T5-XXL]``
as ``lora_te1``, ``lora_te2`` and (with ``train_t5xxl``) ``lora_te3``.

Options (same names and meaning as lora_sd3): per-type ranks ``context_attn_dim`` ... ``x_mod_dim``,
``emb_dims``, ``train_block_indices``, ``train_t5xxl``, and ``network_reg_dims`` (every family),
which wins over the others.

The trainer calls ``mmdit(noisy_model_input, timesteps, context=..., y=...)`` and compares
``out * (-sigmas) + noisy_model_input`` with ``sigmas = timesteps / 1000``, weighted by
``compute_loss_weighting_for_sd3``'s result: the replay does the same from the recorded call.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, cast

import torch
from torch import nn

from .base import (
    CleanLatents,
    Family,
    Prediction,
    RecordedCall,
    Target,
    block_index,
    check_selection,
    find_by_name,
    find_in_blocks,
    keep,
    regex_rank,
    selected,
    type_rank,
    with_rank,
)
from .flux import T5_TARGETS
from .sd import TEXT_ENCODER_TARGETS, text_encoder_root_path

DIT_BLOCK = "SingleDiTBlock"
PREFIX_DIT = "lora_unet"
TEXT_ENCODERS = (("lora_te1", "te1"), ("lora_te2", "te2"), ("lora_te3", "te3"))
# emb_dims, in its order: the words that pick each layer's LoRA names ("_t_embedder": context_embedder
# contains "t_embedder")
EMB_LAYERS = (
    "context_embedder",
    "_t_embedder",
    "x_embedder",
    "y_embedder",
    "final_layer_adaLN_modulation",
    "final_layer_linear",
)
CONV_EMB_LAYER = "x_embedder"
TYPE_RULES = (
    ("context_attn_dim", ("context_block", "attn")),
    ("context_mlp_dim", ("context_block", "mlp")),
    ("context_mod_dim", ("context_block", "adaLN_modulation")),
    ("x_attn_dim", ("x_block", "attn")),
    ("x_mlp_dim", ("x_block", "mlp")),
    ("x_mod_dim", ("x_block", "adaLN_modulation")),
)


def recognises(unet: nn.Module, text_encoders: Sequence[Any]) -> bool:
    """sd-scripts' ``MMDiT``: a list of joint blocks."""
    return hasattr(unet, "joint_blocks")


def name(unet: nn.Module, text_encoders: Sequence[Any]) -> str:
    return "SD3"


def _text_encoder_targets(text_encoders: Sequence[Any], with_t5: bool) -> list[Target]:
    found = []
    for (prefix, part), te in zip(TEXT_ENCODERS, text_encoders):
        if te is None or (part == "te3" and not with_t5):
            continue
        classes = T5_TARGETS if part == "te3" else TEXT_ENCODER_TARGETS
        found += find_in_blocks(te, prefix, part, classes, path_prefix=text_encoder_root_path(te))
    return found


def _emb_targets(unet: nn.Module, word: str, conv_dim: Optional[int]) -> list[Target]:
    """One emb_dims entry's layers; x_embedder's 2x2 conv takes conv_dim when it is set (as in lora_sd3)."""
    found = find_by_name(unet, PREFIX_DIT, "unet", word, conv=True)
    if word != CONV_EMB_LAYER:
        found = [t for t in found if not t.is_conv3x3 or conv_dim is not None]
    return found


def layers(text_encoders: Sequence[Any], unet: nn.Module, conv3x3: bool) -> list[Target]:
    """Every layer an SD3 LoRA file may name (T5 and the embedders included)."""
    found = _text_encoder_targets(text_encoders, with_t5=True) + find_in_blocks(unet, PREFIX_DIT, "unet", (DIT_BLOCK,))
    names = {t.lora_name for t in found}
    for word in EMB_LAYERS:
        found += [t for t in _emb_targets(unet, word, 1 if conv3x3 else None) if t.lora_name not in names]
    return found


def targets(text_encoders: Sequence[Any], unet: nn.Module, config: Any) -> list[Target]:
    """What lora_sd3's create_network adapts with these options, each with the rank an option gives it."""
    check_selection(
        "train_block_indices", config.train_block_indices, len(cast(nn.ModuleList, unet.joint_blocks)), "joint blocks"
    )
    reg = config.network_reg_dims
    found = [
        with_rank(t, regex_rank(t.lora_name, reg))
        for t in _text_encoder_targets(text_encoders, with_t5=config.train_t5xxl)
    ]
    rules = [(words, getattr(config, option)) for option, words in TYPE_RULES]
    for t in find_in_blocks(unet, PREFIX_DIT, "unet", (DIT_BLOCK,)):
        rank = regex_rank(t.lora_name, reg)
        if rank is None:
            rank = type_rank(t.lora_name, rules)
            if rank != 0 and not selected(config.train_block_indices, block_index(t.lora_name)):
                rank = 0
        found.append(with_rank(t, rank))
    names = {t.lora_name for t in found}
    for word, rank in zip(EMB_LAYERS, config.emb_dims or ()):
        for t in _emb_targets(unet, word, config.conv_dim):
            if t.lora_name in names:
                continue
            reg_rank = regex_rank(t.lora_name, reg)
            conv = t.is_conv3x3 and config.conv_dim is not None  # conv_dim (and conv_alpha) win, even over a 0
            found.append(with_rank(t, reg_rank if reg_rank is not None else None if conv else rank))
    return keep(found)


def _prediction(
    output: torch.Tensor, args: tuple, kwargs: dict, calls: Mapping[str, RecordedCall]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """sd3_train_network's preconditioning: out * (-t / 1000) + noisy input, and the recorded weighting."""
    noisy = args[0] if args else kwargs["x"]
    timesteps = args[1] if len(args) > 1 else kwargs["t"]
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
    weighting = calls.get("compute_loss_weighting_for_sd3")
    return output * (-sigmas) + noisy, None if weighting is None else weighting.result


PREDICTION = Prediction((("library.sd3_train_utils", "compute_loss_weighting_for_sd3"),), _prediction)
CLEAN_LATENTS = CleanLatents("library.sd3_train_utils", "get_noisy_model_input_and_timesteps", 1)
FAMILY = Family("sd3", recognises, name, targets, layers, PREDICTION, t5_part="te3", clean_latents=CLEAN_LATENTS)
