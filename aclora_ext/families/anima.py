"""Anima (sd-scripts' anima_train_network.py): the layers and names of sd-scripts' networks.lora_anima.

DiT (sd-scripts' ``library.anima_models.Anima``, a Cosmos-Predict2 DiT): every Linear inside ``Block``,
``PatchEmbed``, ``TimestepEmbedding`` and ``FinalLayer`` modules whose dotted module path no exclude
pattern matches in full (``re.fullmatch``), prefix ``lora_unet``. lora_anima always adds the exclude
pattern ``.*(_modulation|_norm|_embedder|final_layer).*``, so by default each block's ``self_attn``,
``cross_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``) and ``mlp`` (``layer1``, ``layer2``)
Linears get a LoRA: ``lora_unet_blocks_0_self_attn_q_proj``. ``include_patterns`` win over the exclude
patterns (they bring back the embedders, the final layer, the AdaLN modulation). With ``train_llm_adapter``
also the LLM adapter's ``LLMAdapterTransformerBlock`` Linears (``lora_unet_llm_adapter_blocks_0_...``).
Text encoder: Qwen3 (``transformers``' ``Qwen3Model``), its attention and MLP Linears as ``lora_te``
(``lora_te_layers_0_self_attn_q_proj``), built whenever a text encoder is given (sd-scripts' ``apply_to``
keeps them only when the text encoder is trained).

``network_reg_dims`` / ``network_reg_lrs``: a pattern that matches a module's dotted path in full
(``re.fullmatch``, as in lora_anima, not ``re.search`` on the LoRA name as for the other families) gives it
that rank / learning rate.

The trainer calls ``anima(noisy_5d, timesteps / 1000, prompt_embeds, padding_mask=..., ...)`` on 5-D
latents ``[B, C, 1, H, W]`` and compares ``output.squeeze(2)`` with ``noise - latents``, weighted by
``compute_loss_weighting_for_anima(weighting_scheme, sigmas)``: the replay squeezes the output the same way
and calls that function again with its recorded arguments.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..lora.module import is_targetable
from .base import CleanLatents, Family, Prediction, RecordedCall, Target, first_match, indexed, keep, lora_name

DIT_BLOCKS = ("Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer")
ADAPTER_BLOCKS = ("LLMAdapterTransformerBlock",)
TEXT_ENCODER_BLOCKS = ("Qwen3Attention", "Qwen3MLP", "Qwen3SdpaAttention", "Qwen3FlashAttention2")
PREFIX_DIT, PREFIX_TE = "lora_unet", "lora_te"
#: the exclude pattern lora_anima always adds to the user's
DEFAULT_EXCLUDE = r".*(_modulation|_norm|_embedder|final_layer).*"


def recognises(unet: nn.Module, text_encoders: Sequence[Any]) -> bool:
    """sd-scripts' ``Anima`` DiT (class ``Anima`` with its list of ``Block`` modules)."""
    blocks = getattr(unet, "blocks", None)
    return (
        type(unet).__name__ == "Anima"
        and isinstance(blocks, nn.ModuleList)
        and any(type(b).__name__ == "Block" for b in blocks)
    )


def name(unet: nn.Module, text_encoders: Sequence[Any]) -> str:
    return "Anima"


#: LoRA names only lora_anima gives: the DiT blocks, the LLM adapter, the embedders, the final layer's modulation
#: (its ``final_layer_linear`` is SD3's name too)
_ANIMA_NAMES = re.compile(
    r"lora_unet_(blocks_\d+_(self_attn|cross_attn|mlp|adaln_modulation)_|llm_adapter_|x_embedder_proj_|"
    r"t_embedder_1_linear_|final_layer_adaln_modulation_)"
)


def names_are_anima(names: Sequence[str]) -> bool:
    """A LoRA file's (or a model's) module names are lora_anima's DiT names."""
    return any(_ANIMA_NAMES.match(n) for n in names)


def _walk(root: nn.Module, classes: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(dotted path, layer) of every Linear/Conv2d inside a module whose class is in ``classes``, once each."""
    seen: set[str] = set()
    for block_path, block in root.named_modules():
        if type(block).__name__ not in classes:
            continue
        for child_path, child in block.named_modules():
            path = ".".join(p for p in (block_path, child_path) if p)
            if is_targetable(child) and path not in seen:
                seen.add(path)
                yield path, child


def _candidates(text_encoders: Sequence[Any], unet: nn.Module, adapter: bool) -> list[tuple[str, Target]]:
    found = []
    for te in text_encoders:
        if te is not None:
            found += [(p, Target(lora_name(PREFIX_TE, p), m, "te")) for p, m in _walk(te, TEXT_ENCODER_BLOCKS)]
    classes = DIT_BLOCKS + (ADAPTER_BLOCKS if adapter else ())
    found += [(p, Target(lora_name(PREFIX_DIT, p), m, "unet")) for p, m in _walk(unet, classes)]
    return found


def layers(text_encoders: Sequence[Any], unet: nn.Module, conv3x3: bool) -> list[Target]:
    """Every layer an Anima LoRA file may name (lora_anima's create_network_from_weights: no exclusion, the
    LLM adapter included)."""
    return [t for _, t in _candidates(text_encoders, unet, adapter=True)]


def fullmatch_rank(path: str, reg_dims: Optional[Sequence[tuple[str, int]]]) -> Optional[int]:
    """network_reg_dims as lora_anima reads it: the rank of the first pattern matching the whole dotted path."""
    return first_match(path, reg_dims, re.fullmatch)


def targets(text_encoders: Sequence[Any], unet: nn.Module, config: Any) -> list[Target]:
    """What lora_anima's create_network adapts with these options, each with the rank an option gives it."""
    exclude = [re.compile(p) for p in (*(config.exclude_patterns or ()), DEFAULT_EXCLUDE)]
    include = [re.compile(p) for p in config.include_patterns or ()]
    found = []
    for path, t in _candidates(text_encoders, unet, adapter=config.train_llm_adapter):
        if any(p.fullmatch(path) for p in exclude) and not any(p.fullmatch(path) for p in include):
            continue
        rank = fullmatch_rank(path, config.network_reg_dims)
        if rank is None and t.is_conv3x3:
            continue  # lora_anima gives a kxk convolution a LoRA only through network_reg_dims
        reg_lr = first_match(path, indexed(config.network_reg_lrs), re.fullmatch)  # lora_anima's, likewise
        found.append(Target(t.lora_name, t.layer, t.part, rank, reg_lr))
    return keep(found)


def _prediction(
    output: torch.Tensor, args: tuple, kwargs: dict, calls: Mapping[str, RecordedCall]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """anima_train_network's get_noise_pred_and_target after the DiT call: the 5-D output squeezed back to
    4-D, and the loss weighting from sd-scripts' own function with the recorded arguments."""
    weighting = calls.get("compute_loss_weighting_for_anima")
    weight = None if weighting is None else weighting.function(*weighting.args, **weighting.kwargs)
    return output.squeeze(2), weight


PREDICTION = Prediction((("library.anima_train_utils", "compute_loss_weighting_for_anima"),), _prediction)
#: anima_train_network.py noises the (4-D) clean latents with flux_train_utils.get_noisy_model_input_and_timesteps
CLEAN_LATENTS = CleanLatents("library.flux_train_utils", "get_noisy_model_input_and_timesteps", 2)
FAMILY = Family("anima", recognises, name, targets, layers, PREDICTION, clean_latents=CLEAN_LATENTS, matches_paths=True)
