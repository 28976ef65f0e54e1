"""FLUX.1 (sd-scripts' flux_train_network.py): the layers and names of sd-scripts' networks.lora_flux.

DiT (sd-scripts' ``library.flux_models.Flux``): every Linear inside ``DoubleStreamBlock`` and
``SingleStreamBlock`` modules (per double block ``img_mod.lin``, ``img_attn.qkv``, ``img_attn.proj``,
``img_mlp.0``, ``img_mlp.2`` and the same for ``txt_``; per single block ``linear1``, ``linear2``,
``modulation.lin``), prefix ``lora_unet``: ``lora_unet_double_blocks_0_img_attn_qkv``,
``lora_unet_single_blocks_0_linear1``. With ``in_dims`` also the input layers (``lora_unet_img_in``,
``lora_unet_time_in_in_layer``, ...). Text encoders ``[CLIP-L, T5-XXL]``: CLIP's attention and MLP
Linears as ``lora_te1``, T5's attention and gated feed-forward Linears as ``lora_te3`` (only with
``train_t5xxl``). The final layer never gets a LoRA (as in lora_flux).

Options (same names and meaning as lora_flux): per-type ranks ``img_attn_dim`` ... ``single_mod_dim``,
``in_dims``, ``train_blocks``, ``train_double_block_indices`` / ``train_single_block_indices``,
``train_t5xxl``, and ``network_reg_dims`` (every family), which wins over the others.

The trainer calls the DiT with keywords only and compares, not its packed output, but
``apply_model_prediction_type(args, unpack_latents(output, h, w), noisy_model_input, sigmas)``
(``out * (-sigmas) + noisy`` by default) with ``noise - latents``: the replay calls the same two
functions with the recorded arguments.
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
    check_choice,
    check_selection,
    find_by_name,
    find_in_blocks,
    keep,
    regex_rank,
    selected,
    type_rank,
    with_rank,
)
from .sd import TEXT_ENCODER_TARGETS, text_encoder_root_path

DOUBLE_BLOCK, SINGLE_BLOCK = "DoubleStreamBlock", "SingleStreamBlock"
CHROMA_CLASS, CHROMA = "Chroma", "Chroma"  # sd-scripts' library.chroma_models.Chroma, a Flux without CLIP-L
T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")
PREFIX_DIT, PREFIX_CLIP_L, PREFIX_T5 = "lora_unet", "lora_te1", "lora_te3"
# in_dims, in its order: the words that pick each input layer's LoRA names
IN_LAYERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")
# the per-type ranks, in lora_flux's order (the first rule that matches a name and is set wins)
TYPE_RULES = (
    ("img_attn_dim", ("img_attn",)),
    ("txt_attn_dim", ("txt_attn",)),
    ("img_mlp_dim", ("img_mlp",)),
    ("txt_mlp_dim", ("txt_mlp",)),
    ("img_mod_dim", ("img_mod",)),
    ("txt_mod_dim", ("txt_mod",)),
    ("single_dim", ("single_blocks", "linear")),
    ("single_mod_dim", ("modulation",)),
)


def recognises(unet: nn.Module, text_encoders: Sequence[Any]) -> bool:
    """sd-scripts' ``Flux`` (and ``Chroma``, a Flux): double- and single-stream block lists of FLUX's block
    classes (HunyuanImage-2.1's DiT has the same two lists, of other classes)."""
    if not (hasattr(unet, "double_blocks") and hasattr(unet, "single_blocks")):
        return False
    blocks = [*cast(nn.ModuleList, unet.double_blocks), *cast(nn.ModuleList, unet.single_blocks)]
    return not blocks or any(type(b).__name__ in (DOUBLE_BLOCK, SINGLE_BLOCK) for b in blocks)


def name(unet: nn.Module, text_encoders: Sequence[Any]) -> str:
    """ "Chroma" for sd-scripts' ``Chroma`` (``flux_train_network.py --model_type chroma``), else "FLUX.1"."""
    return CHROMA if type(unet).__name__ == CHROMA_CLASS else "FLUX.1"


def _text_encoder_targets(text_encoders: Sequence[Any], with_t5: bool) -> list[Target]:
    clip_l, t5 = (list(text_encoders) + [None, None])[:2]
    found = []
    if clip_l is not None:
        found += find_in_blocks(
            clip_l, PREFIX_CLIP_L, "te1", TEXT_ENCODER_TARGETS, path_prefix=text_encoder_root_path(clip_l)
        )
    if with_t5 and t5 is not None:
        found += find_in_blocks(t5, PREFIX_T5, "te3", T5_TARGETS)
    return found


def _block_targets(unet: nn.Module, kinds: Sequence[str]) -> list[Target]:
    return find_in_blocks(unet, PREFIX_DIT, "unet", kinds)


def layers(text_encoders: Sequence[Any], unet: nn.Module, conv3x3: bool) -> list[Target]:
    """Every layer a FLUX.1 LoRA file may name (T5 and the input layers included)."""
    found = _text_encoder_targets(text_encoders, with_t5=True) + _block_targets(unet, (DOUBLE_BLOCK, SINGLE_BLOCK))
    names = {t.lora_name for t in found}
    for word in IN_LAYERS:
        found += [t for t in find_by_name(unet, PREFIX_DIT, "unet", word) if t.lora_name not in names]
    return found


def targets(text_encoders: Sequence[Any], unet: nn.Module, config: Any) -> list[Target]:
    """What lora_flux's create_network adapts with these options, each with the rank an option gives it."""
    check_choice("train_blocks", config.train_blocks, ("all", "double", "single"), "FLUX.1")
    check_selection(
        "train_double_block_indices",
        config.train_double_block_indices,
        len(cast(nn.ModuleList, unet.double_blocks)),
        "double blocks",
    )
    check_selection(
        "train_single_block_indices",
        config.train_single_block_indices,
        len(cast(nn.ModuleList, unet.single_blocks)),
        "single blocks",
    )
    reg = config.network_reg_dims
    found = [
        with_rank(t, regex_rank(t.lora_name, reg))
        for t in _text_encoder_targets(text_encoders, with_t5=config.train_t5xxl)
    ]
    kinds = {"all": (DOUBLE_BLOCK, SINGLE_BLOCK), "double": (DOUBLE_BLOCK,), "single": (SINGLE_BLOCK,)}
    rules = [(words, getattr(config, option)) for option, words in TYPE_RULES]
    for t in _block_targets(unet, kinds[config.train_blocks]):
        rank = regex_rank(t.lora_name, reg)
        if rank is None:
            rank = type_rank(t.lora_name, rules)
            selection = (
                config.train_double_block_indices if "double" in t.lora_name else config.train_single_block_indices
            )
            if rank != 0 and not selected(selection, block_index(t.lora_name)):
                rank = 0
        found.append(with_rank(t, rank))
    names = {t.lora_name for t in found}
    for word, rank in zip(IN_LAYERS, config.in_dims or ()):
        for t in find_by_name(unet, PREFIX_DIT, "unet", word):
            if t.lora_name not in names:
                reg_rank = regex_rank(t.lora_name, reg)
                found.append(with_rank(t, rank if reg_rank is None else reg_rank))
    return keep(found)


def _prediction(
    output: torch.Tensor, args: tuple, kwargs: dict, calls: Mapping[str, RecordedCall]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """flux_train_network's get_noise_pred_and_target after the DiT call: unpack, then the prediction type
    (with its loss weighting), through sd-scripts' own functions and the recorded arguments."""
    unpack, apply = calls["unpack_latents"], calls["apply_model_prediction_type"]
    prediction = unpack.function(output, *unpack.args[1:], **unpack.kwargs)
    prediction, weighting = apply.function(apply.args[0], prediction, *apply.args[2:], **apply.kwargs)
    return prediction, weighting


PREDICTION = Prediction(
    (("library.flux_utils", "unpack_latents"), ("library.flux_train_utils", "apply_model_prediction_type")), _prediction
)
CLEAN_LATENTS = CleanLatents("library.flux_train_utils", "get_noisy_model_input_and_timesteps", 2)
FAMILY = Family("flux", recognises, name, targets, layers, PREDICTION, t5_part="te3", clean_latents=CLEAN_LATENTS)
