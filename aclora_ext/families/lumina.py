"""Lumina 2 (sd-scripts' lumina_train_network.py): the layers and names of sd-scripts' networks.lora_lumina.

DiT (sd-scripts' ``library.lumina_models.NextDiT``): every Linear inside ``JointTransformerBlock`` and
``FinalLayer`` modules, prefix ``lora_unet``: the main blocks ``lora_unet_layers_<i>_{attention_qkv,
attention_out,feed_forward_w1,w2,w3,adaLN_modulation_1}``, the refiners ``lora_unet_noise_refiner_<i>_...``
and ``lora_unet_context_refiner_<i>_...`` (the context refiner has no modulation), and
``lora_unet_final_layer_{linear,adaLN_modulation_1}``. With ``embedder_dims`` also ``lora_unet_x_embedder``,
``lora_unet_t_embedder_mlp_{0,2}`` and ``lora_unet_cap_embedder_1``. Text encoder: Gemma2's attention and
MLP Linears as ``lora_te`` (``lora_te_layers_0_self_attn_q_proj``); sd-scripts drops them with
``--network_train_unet_only``.

Options (same names and meaning as lora_lumina): ``train_blocks`` (all, transformer, refiners,
noise_refiner, context_refiner), the per-type ranks ``attn_dim``, ``mlp_dim``, ``mod_dim``, ``refiner_dim``
(the first that is set and whose word is in the LoRA name wins: "attention", "mlp", "modulation",
"refiner"; as in lora_lumina they also reach the embedders and the final layer, never the text encoder;
no block's layer has "mlp" in its name, the feed-forward layers are ``feed_forward_w1..w3``, so ``mlp_dim``
reaches only ``t_embedder``'s MLP, with ``embedder_dims``), ``embedder_dims`` and ``network_reg_dims``
(every family; lora_lumina has none), which wins over the others. lora_lumina's ``split_qkv`` is refused
(options.aclora_config).

The trainer calls ``dit(x=noisy, t=1 - timesteps / 1000, cap_feats=..., cap_mask=...)`` and compares
``apply_model_prediction_type(args, output, noisy, sigmas)`` (raw by default; ``additive``: + noisy;
``sigma_scaled``: ``out * (-sigmas) + noisy`` with its loss weighting) with ``latents - noise``: the replay
calls the same function with the recorded arguments, the DiT with its recorded keywords (so with the
trainer's ``t``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .base import (
    CleanLatents,
    Family,
    Prediction,
    RecordedCall,
    Target,
    check_choice,
    find_by_name,
    find_in_blocks,
    keep,
    regex_rank,
    type_rank,
    with_rank,
)

DIT_CLASS = "NextDiT"
DIT_BLOCKS = ("JointTransformerBlock", "FinalLayer")
TEXT_ENCODER_BLOCKS = ("Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP")
PREFIX_DIT, PREFIX_TE = "lora_unet", "lora_te"
#: LoRA names only a Lumina 2 file has (its blocks and caption embedder; a Gemma2 lora_te_layers_ alone does not tell)
FILE_PREFIXES = (
    "lora_unet_layers_",
    "lora_unet_noise_refiner_",
    "lora_unet_context_refiner_",
    "lora_unet_cap_embedder_",
)
#: train_blocks: the words a block target's LoRA name must contain (any of them); None: every block target
TRAIN_BLOCKS: dict[str, Optional[tuple[str, ...]]] = {
    "all": None,
    "transformer": ("layers_",),
    "refiners": ("noise_refiner", "context_refiner"),
    "noise_refiner": ("noise_refiner",),
    "context_refiner": ("context_refiner",),
}
#: embedder_dims, in its order: the word that picks each embedder's LoRA names
EMBEDDERS = ("x_embedder", "t_embedder", "cap_embedder")
#: the per-type ranks, in lora_lumina's order (the first that is set and matches the name wins)
TYPE_RULES = (
    ("attn_dim", ("attention",)),
    ("mlp_dim", ("mlp",)),
    ("mod_dim", ("modulation",)),
    ("refiner_dim", ("refiner",)),
)


def recognises(unet: nn.Module, text_encoders: Sequence[Any]) -> bool:
    """sd-scripts' ``NextDiT``, or a model with its refiners and caption embedder."""
    return type(unet).__name__ == DIT_CLASS or all(
        hasattr(unet, a) for a in ("noise_refiner", "context_refiner", "cap_embedder")
    )


def name(unet: nn.Module, text_encoders: Sequence[Any]) -> str:
    return "Lumina 2"


def _text_encoder_targets(text_encoders: Sequence[Any]) -> list[Target]:
    gemma2 = text_encoders[0] if text_encoders else None
    return [] if gemma2 is None else find_in_blocks(gemma2, PREFIX_TE, "te", TEXT_ENCODER_BLOCKS)


def _embedder_targets(unet: nn.Module, word: str) -> list[Target]:
    return find_by_name(unet, PREFIX_DIT, "unet", word)


def layers(text_encoders: Sequence[Any], unet: nn.Module, conv3x3: bool) -> list[Target]:
    """Every layer a Lumina 2 LoRA file may name (the text encoder and the embedders included)."""
    found = _text_encoder_targets(text_encoders) + find_in_blocks(unet, PREFIX_DIT, "unet", DIT_BLOCKS)
    names = {t.lora_name for t in found}
    for word in EMBEDDERS:
        found += [t for t in _embedder_targets(unet, word) if t.lora_name not in names]
    return found


def targets(text_encoders: Sequence[Any], unet: nn.Module, config: Any) -> list[Target]:
    """What lora_lumina's create_network adapts with these options, each with the rank an option gives it."""
    check_choice("train_blocks", config.train_blocks, tuple(TRAIN_BLOCKS), "Lumina 2")
    reg = config.network_reg_dims
    found = [with_rank(t, regex_rank(t.lora_name, reg)) for t in _text_encoder_targets(text_encoders)]
    rules = [(words, getattr(config, option)) for option, words in TYPE_RULES]

    def rank_of(target: Target, default: Optional[int]) -> Optional[int]:
        rank = regex_rank(target.lora_name, reg)
        if rank is None:
            rank = type_rank(target.lora_name, rules)
        return default if rank is None else rank

    words = TRAIN_BLOCKS[config.train_blocks]
    for t in find_in_blocks(unet, PREFIX_DIT, "unet", DIT_BLOCKS):
        if words is None or any(w in t.lora_name for w in words):
            found.append(with_rank(t, rank_of(t, None)))
    names = {t.lora_name for t in found}
    for word, rank in zip(EMBEDDERS, config.embedder_dims or ()):
        found += [with_rank(t, rank_of(t, rank)) for t in _embedder_targets(unet, word) if t.lora_name not in names]
    return keep(found)


def _prediction(
    output: torch.Tensor, args: tuple, kwargs: dict, calls: Mapping[str, RecordedCall]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """lumina_train_network's get_noise_pred_and_target after the DiT call: the prediction type (and its loss
    weighting) through sd-scripts' own function and the recorded arguments."""
    apply = calls["apply_model_prediction_type"]
    prediction, weighting = apply.function(apply.args[0], output, *apply.args[2:], **apply.kwargs)
    return prediction, weighting


PREDICTION = Prediction((("library.lumina_train_util", "apply_model_prediction_type"),), _prediction)
#: lumina_train_network.py noises the clean latents with lumina_train_util.get_noisy_model_input_and_timesteps
CLEAN_LATENTS = CleanLatents("library.lumina_train_util", "get_noisy_model_input_and_timesteps", 2)
FAMILY = Family("lumina", recognises, name, targets, layers, PREDICTION, clean_latents=CLEAN_LATENTS)
