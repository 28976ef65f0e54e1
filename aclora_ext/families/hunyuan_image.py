"""HunyuanImage-2.1 (sd-scripts' hunyuan_image_train_network.py): the layers and names of sd-scripts'
networks.lora_hunyuan_image.

DiT (sd-scripts' ``library.hunyuan_image_models.HYImageDiffusionTransformer``): every Linear inside
``MMDoubleStreamBlock`` and ``MMSingleStreamBlock`` modules (per double block ``img_mod.linear``,
``img_attn_qkv``, ``img_attn_proj``, ``img_mlp.fc1``, ``img_mlp.fc2`` and the same for ``txt_``; per
single block ``linear1``, ``linear2``, ``modulation.linear``), prefix ``lora_unet``:
``lora_unet_double_blocks_0_img_mod_linear``, ``lora_unet_single_blocks_0_modulation_linear``. The
embedders, the token refiner, the ByT5 mapper and the final layer never get a LoRA, nor do the text
encoders (Qwen2.5-VL and ByT5: the trainer does not train them), as in lora_hunyuan_image.

Its DiT has ``double_blocks`` and ``single_blocks`` like FLUX.1's, so it is told by its block classes.

Options: lora_hunyuan_image has no per-type ranks and no block selection; ``network_reg_dims`` (every
family) sets ranks by name, and its ``split_qkv`` is refused as for FLUX.1 (it saves the q/k/v factors
merged with alpha unchanged).

The trainer calls the DiT positionally, ``dit(noisy_model_input, timesteps, vlm_embed, vlm_mask,
byt5_embed, byt5_mask)`` (B, C, H, W latents in and out), and compares
``apply_model_prediction_type(args, output, noisy_model_input, sigmas)`` with ``noise - latents``: the
replay calls that function with the recorded arguments.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .base import CleanLatents, Family, Prediction, RecordedCall, Target, find_in_blocks, keep, regex_rank, with_rank

DOUBLE_BLOCK, SINGLE_BLOCK = "MMDoubleStreamBlock", "MMSingleStreamBlock"
MODEL_CLASS = "HYImageDiffusionTransformer"
PREFIX_DIT = "lora_unet"
NAME = "HunyuanImage-2.1"


def recognises(unet: nn.Module, text_encoders: Sequence[Any]) -> bool:
    """sd-scripts' ``HYImageDiffusionTransformer``, or any model of its double/single-stream block classes."""
    if type(unet).__name__ == MODEL_CLASS:
        return True
    return any(type(m).__name__ in (DOUBLE_BLOCK, SINGLE_BLOCK) for m in unet.modules())


def name(unet: nn.Module, text_encoders: Sequence[Any]) -> str:
    return NAME


def layers(text_encoders: Sequence[Any], unet: nn.Module, conv3x3: bool) -> list[Target]:
    """Every layer a HunyuanImage-2.1 LoRA file may name."""
    return find_in_blocks(unet, PREFIX_DIT, "unet", (DOUBLE_BLOCK, SINGLE_BLOCK), conv3x3=conv3x3)


def targets(text_encoders: Sequence[Any], unet: nn.Module, config: Any) -> list[Target]:
    """What lora_hunyuan_image's create_network adapts with these options (network_reg_dims by re.search)."""
    reg = config.network_reg_dims
    found = layers(text_encoders, unet, config.conv_dim is not None)
    return keep(with_rank(t, regex_rank(t.lora_name, reg)) for t in found)


def _prediction(
    output: torch.Tensor, args: tuple, kwargs: dict, calls: Mapping[str, RecordedCall]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """hunyuan_image_train_network's get_noise_pred_and_target after the DiT call: the prediction type (and
    its loss weighting) through sd-scripts' own function and the recorded arguments."""
    apply = calls["apply_model_prediction_type"]
    prediction, weighting = apply.function(apply.args[0], output, *apply.args[2:], **apply.kwargs)
    return prediction, weighting


PREDICTION = Prediction((("library.flux_train_utils", "apply_model_prediction_type"),), _prediction)
#: hunyuan_image_train_network.py noises the clean latents with flux_train_utils.get_noisy_model_input_and_timesteps
CLEAN_LATENTS = CleanLatents("library.flux_train_utils", "get_noisy_model_input_and_timesteps", 2)
FAMILY = Family("hunyuan_image", recognises, name, targets, layers, PREDICTION, clean_latents=CLEAN_LATENTS)

# the layer names (after lora_unet_{double,single}_blocks_N_) that only one of the two families has; a name may
# be a module's or one of its tensors' ("....lora_down.weight")
_OWN_LAYER = re.compile(r"_(?:mod_linear|mlp_fc1|mlp_fc2|modulation_linear)(?:\.|$)")
_FLUX_LAYER = re.compile(r"_(?:mod_lin|mlp_0|mlp_2|modulation_lin)(?:\.|$)")
_BLOCKS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")
_FLUX_ONLY_PREFIXES = (
    "lora_te1_",
    "lora_te3_",
    "lora_unet_img_in",
    "lora_unet_txt_in",
    "lora_unet_time_in_",
    "lora_unet_vector_in_",
    "lora_unet_guidance_in_",
)


def file_family(names: Sequence[str]) -> Optional[str]:
    """The family of a file of double/single-block modules: "HunyuanImage-2.1" (``img_mod_linear``,
    ``img_mlp_fc1``, ``modulation_linear``), "FLUX.1" (``img_mod_lin``, ``img_mlp_0``, ``modulation_lin``,
    its text encoders or input layers), None when the names are in both (attention, linear1/linear2 only)."""
    blocks = [n for n in names if n.startswith(_BLOCKS)]
    if any(_OWN_LAYER.search(n) for n in blocks):
        return NAME
    if any(_FLUX_LAYER.search(n) for n in blocks) or any(n.startswith(_FLUX_ONLY_PREFIXES) for n in names):
        return "FLUX.1"
    return None
