"""What every model family shares: a target layer, kohya's naming rule, finding layers by block
class or by path pattern, the rules sd-scripts' LoRA modules choose ranks by, and what a family adapter
provides (``Family``).

A LoRA module's name is ``prefix + "." + module path`` with every "." replaced by
"_": ``lora_unet_down_blocks_1_attentions_0_..._to_q``,
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``. Consumers (A1111,
ComfyUI, diffusers) key on those names, so they must not depend on the installed
library versions.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..lora.module import is_targetable
from ..options import OptionError


@dataclass(frozen=True)
class Target:
    """A layer to adapt: its LoRA name, the layer, and which part of the model it is in."""

    lora_name: str
    layer: nn.Module
    part: str  # "unet", "te", "te1", "te2", "te3" or "model"
    rank: Optional[int] = None  # its maximum rank when an option sets one; None: network_dim (conv_dim for 3x3)
    reg_lr: Optional[int] = None  # the network_reg_lrs pair that sets its learning rate (index); None: its part's

    @property
    def is_conv3x3(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and self.layer.kernel_size != (1, 1)

    @property
    def is_text_encoder(self) -> bool:
        return self.part.startswith("te")


def lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def find_in_blocks(
    root: nn.Module, prefix: str, part: str, block_classes: Sequence[str], path_prefix: str = "", conv3x3: bool = False
) -> list[Target]:
    """Linear / Conv2d layers inside modules whose class name is in ``block_classes``.

    1x1 convs always count (they are linear); 3x3 convs only when ``conv3x3``.
    A layer reachable from two nested blocks is listed once.
    """
    found: dict[str, Target] = {}
    for block_path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_path, child in block.named_modules():
            if not is_targetable(child):
                continue
            if isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1) and not conv3x3:
                continue
            path = ".".join(p for p in (path_prefix + block_path, child_path) if p)
            name = lora_name(prefix, path)
            found.setdefault(name, Target(name, child, part))
    return list(found.values())


def as_list(text_encoder: Optional[nn.Module | list[nn.Module] | tuple[nn.Module, ...]]) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return list(text_encoder)
    return [text_encoder]


def _matches(path: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if fnmatch.fnmatchcase(path, pattern):
            return True
        # Globs such as "*.attn" are not regular expressions: only valid ones are tried as such.
        if _safe_regex(pattern) and re.fullmatch(pattern, path) is not None:
            return True
    return False


def find_by_patterns(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (), prefix: str = "lora"
) -> list[Target]:
    """Linear/Conv2d layers of any model whose module path matches a pattern.

    Patterns are shell globs (``"blocks.*.attn.*"``) or full regular expressions;
    ``exclude`` wins over ``include``.
    """
    targets = []
    for path, layer in model.named_modules():
        if not path or not is_targetable(layer):
            continue
        if _matches(path, include) and not _matches(path, exclude):
            targets.append(Target(lora_name(prefix, path), layer, "model"))
    return targets


def _safe_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def check_patterns(patterns: Sequence[str], what: str) -> None:
    """Reject patterns that are neither globs nor valid regular expressions."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{what}: {pattern!r} is not a pattern; allowed: non-empty glob or regex strings")
        if any(ch in pattern for ch in "()[]{}+^$|\\") and not _safe_regex(pattern):
            raise ValueError(f"{what}: {pattern!r} is not a valid regular expression")


# --- the rank rules sd-scripts' lora_flux / lora_sd3 apply per layer ------------------------------------
def regex_rank(name: str, reg_dims: Optional[Sequence[tuple[str, int]]]) -> Optional[int]:
    """network_reg_dims: the rank of the first pattern found in the name (re.search), or None."""
    return first_match(name, reg_dims, re.search)


def indexed(pairs: Optional[Sequence[tuple[str, Any]]]) -> list[tuple[str, int]]:
    """(pattern, index) for each pair: first_match then gives which pair matched."""
    return [(pattern, i) for i, (pattern, _) in enumerate(pairs or ())]


def first_match(text: str, pairs: Optional[Sequence[tuple[str, Any]]], match: Callable[..., Any]) -> Any:
    """The value of the first (pattern, value) pair whose pattern ``match`` (re.search, re.fullmatch) finds in
    ``text``, or None."""
    for pattern, value in pairs or ():
        if match(pattern, text):
            return value
    return None


def type_rank(name: str, rules: Sequence[tuple[tuple[str, ...], Optional[int]]]) -> Optional[int]:
    """Per-type maximum ranks: the first rule whose words all occur in the name and whose rank is set."""
    for words, rank in rules:
        if rank is not None and all(word in name for word in words):
            return rank
    return None


def block_index(name: str) -> int:
    """N of ``lora_unet_<kind>_blocks_N_...`` (double_blocks, single_blocks, joint_blocks)."""
    return int(name.split("_")[4])


def selected(selection: Any, index: int) -> bool:
    """A parsed block selection ("all" or the chosen indices) includes block ``index``."""
    return selection == "all" or index in selection


def check_selection(option: str, selection: Any, count: int, what: str) -> None:
    """Refuse block indices this model does not have, naming the option, the value and the range."""
    if selection != "all" and selection and max(selection) >= count:
        raise OptionError(
            f"network_args: {option}={','.join(map(str, selection))} names block {max(selection)}, "
            f"but this model has {count} {what}; allowed: indices 0-{count - 1}, all or none"
        )


def check_choice(option: str, value: str, allowed: Sequence[str], model: str) -> None:
    """Refuse a choice another family's option of the same name has, naming the option, the value and the choices."""
    if value not in allowed:
        raise OptionError(
            f"network_args: {option}={value} is not a choice for {model} models; allowed: {', '.join(allowed)}"
        )


def with_rank(target: Target, rank: Optional[int]) -> Target:
    return dataclasses.replace(target, rank=rank)


def keep(targets: Iterable[Target]) -> list[Target]:
    """The targets that get a LoRA (a rank of 0 means none)."""
    return [t for t in targets if t.rank != 0]


def find_by_name(root: nn.Module, prefix: str, part: str, word: str, conv: bool = False) -> list[Target]:
    """Every Linear (and 1x1 conv; every conv with ``conv``) of ``root`` whose LoRA name contains ``word``."""
    found = []
    for path, layer in root.named_modules():
        if not path or not is_targetable(layer):
            continue
        if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) and not conv:
            continue
        name = lora_name(prefix, path)
        if word in name:
            found.append(Target(name, layer, part))
    return found


# --- the held-out replay: how sd-scripts makes the prediction conditional_loss compares ------------------
class RecordedCall(NamedTuple):
    """One call of an sd-scripts function during the validation pass: the function, its arguments, its result."""

    function: Callable[..., Any]
    args: tuple
    kwargs: dict
    result: Any


def output_is_prediction(
    output: Any, args: tuple, kwargs: dict, calls: Mapping[str, RecordedCall]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """SD1.x/2.x and SDXL: conditional_loss compares the U-Net's output itself (no loss weighting)."""
    prediction = getattr(output, "sample", output)
    if isinstance(prediction, (tuple, list)):
        prediction = prediction[0]
    return prediction, None


@dataclass(frozen=True)
class Prediction:
    """From the denoiser's output to what sd-scripts hands ``conditional_loss``, for the held-out replay.

    ``functions``: the sd-scripts functions ``(module, name)`` the trainer calls between the denoiser and
    ``conditional_loss``; the first call of each after a recorded denoiser call is kept (``calls`` by
    name). ``predict(output, args, kwargs, calls)`` rebuilds ``(prediction, loss weighting or None)`` from
    the denoiser's output and its recorded call.
    """

    functions: tuple[tuple[str, str], ...] = ()
    predict: Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]] = output_is_prediction


@dataclass(frozen=True)
class CleanLatents:
    """The sd-scripts function a family's trainer hands the clean latents of each training batch to (to
    noise them), looked up through its module at call time: ``(module, name)``, and where the latents
    are among its arguments (``position``, or the keyword ``keyword``). Training items' identities are
    read there (docs/identities.md).
    """

    module: str
    name: str
    position: int
    keyword: str = "latents"

    def latents(self, args: tuple, kwargs: dict) -> Any:
        """The latents among a call's arguments (None when the call has none there)."""
        if self.keyword in kwargs:
            return kwargs[self.keyword]
        return args[self.position] if len(args) > self.position else None


@dataclass(frozen=True)
class Family:
    """A model family adapter (one file in this folder): how it is recognised, which layers get a LoRA
    and how they are named, which options select them, and how its trainer makes its prediction.

    ``recognises(unet, text_encoders)``; ``name(unet, text_encoders)`` as messages and files say it;
    ``targets(text_encoders, unet, config)``: what ``create_network`` adapts (each with its rank when an
    option sets one); ``layers(text_encoders, unet, conv3x3)``: every layer a LoRA file of this family may
    name (``create_network_from_weights``, ``load_weights``); ``t5_part``: the part of T5-XXL's modules,
    whose presence is sd-scripts' ``network.train_t5xxl``; ``clean_latents``: where its trainer hands over
    the clean latents of a training batch (None: not known, no identities); ``matches_paths``: its
    ``targets`` match network_reg_dims / network_reg_lrs to the whole dotted module path and set both
    (Anima); otherwise a pattern is searched for in the LoRA name.
    """

    key: str  # its key in options.FAMILIES
    recognises: Callable[[nn.Module, Sequence[Any]], bool]
    name: Callable[[nn.Module, Sequence[Any]], str]
    targets: Callable[[Sequence[Any], nn.Module, Any], list[Target]]
    layers: Callable[[Sequence[Any], nn.Module, bool], list[Target]]
    prediction: Prediction = Prediction()
    t5_part: Optional[str] = None
    clean_latents: Optional[CleanLatents] = None
    matches_paths: bool = False

    def with_learning_rates(self, targets: list[Target], config: Any) -> list[Target]:
        """``targets`` with network_reg_lrs' learning rates (re.search on the LoRA name, first match)."""
        if self.matches_paths or not config.network_reg_lrs:
            return targets
        pairs = indexed(config.network_reg_lrs)
        return [dataclasses.replace(t, reg_lr=first_match(t.lora_name, pairs, re.search)) for t in targets]
