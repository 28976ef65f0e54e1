"""Every ``--network_args`` option, declared once and parsed from that declaration.

sd-scripts hands ``--network_args key=value`` pairs to ``create_network`` as
``**kwargs`` of strings (and always adds ``dropout``). :func:`parse_network_args`
turns them into a typed :class:`ACLoRAConfig`; anything unknown or malformed
raises :class:`OptionError` naming the key, the value and what is allowed.
The README's options table is generated from :data:`OPTIONS`
(``aclora options``) and a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Mapping, Optional, Sequence, Union

RESTART_MODES = ("paper", "product", "off")
ENERGY_RULES = ("squared", "linear")
LORA_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt")

_TRUE = ("true", "1", "yes", "on")
#: a block selection: "all", or the indices of the blocks that get a LoRA
BlockSelection = Union[str, tuple[int, ...]]
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "")


class OptionError(ValueError):
    """A ``--network_args`` value (or a create_network argument) that cannot be used."""


@dataclass(frozen=True)
class Option:
    """One user-facing option: its name, type, default, allowed range and help."""

    name: str
    kind: str  # "int", "float", "bool", "choice", "size" (bytes, see parse_size), "path", or a layer-selection kind: "ints", "blocks", "regex_dims"
    default: Any
    help: str
    choices: Sequence[str] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    optional: bool = True  # "None" is accepted and means "not set"
    families: tuple[str, ...] = ()  # the model families (FAMILIES keys) that accept it; empty: every family
    length: Optional[int] = None  # "ints": how many numbers

    def allowed(self, separator: str = " | ") -> str:
        """A short human description of the accepted values."""
        if self.kind in _LAYER_KINDS:
            return _layer_kind_allowed(self)
        if self.kind == "choice":
            text = separator.join(self.choices)
        elif self.kind == "size":
            text = SIZE_ALLOWED
        elif self.kind == "path":
            text = "the path of an existing LoRA file (.safetensors, .ckpt, .pt)"
        elif self.kind == "bool":
            text = separator.join(("true", "false"))
        else:
            lo = "" if self.minimum is None else f"{'>=' if self.min_inclusive else '>'} {self.minimum:g}"
            hi = "" if self.maximum is None else f"{'<=' if self.max_inclusive else '<'} {self.maximum:g}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            text = f"{'an integer' if self.kind == 'int' else 'a number'}{' ' + bounds if bounds else ''}"
        return text + (" (or none)" if self.optional and self.default is None else "")

    def parse(self, raw: Any) -> Any:
        """Convert ``raw`` (a string from the command line, or a Python value) or raise OptionError."""
        if self.kind in _LAYER_KINDS and raw is not None:
            return _parse_layer_kind(self, raw)
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE):
            if self.optional:
                return self.default if self.default is not None else None
            raise OptionError(self._bad(raw))
        text = raw.strip() if isinstance(raw, str) else raw
        try:
            if self.kind == "choice":
                value = str(text).lower()
                if value not in self.choices:
                    raise ValueError
                return value
            if self.kind == "size":
                return parse_size(text)
            if self.kind == "path":
                if isinstance(text, str) and text.lower().endswith(LORA_FILE_SUFFIXES) and os.path.isfile(text):
                    return text
                raise ValueError
            if self.kind == "bool":
                if isinstance(text, bool):
                    return text
                if str(text).lower() in _TRUE:
                    return True
                if str(text).lower() in _FALSE:
                    return False
                raise ValueError
            if self.kind == "int":
                if isinstance(text, bool):
                    raise ValueError
                number = float(text)
                if not number.is_integer():
                    raise ValueError
                value = int(number)
            else:
                if isinstance(text, bool):
                    raise ValueError
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
        except (TypeError, ValueError):
            raise OptionError(self._bad(raw)) from None
        self._check_range(raw, value)
        return value

    def _check_range(self, raw: Any, value: float) -> None:
        if self.minimum is not None:
            if value < self.minimum or (not self.min_inclusive and value == self.minimum):
                raise OptionError(self._bad(raw))
        if self.maximum is not None:
            if value > self.maximum or (not self.max_inclusive and value == self.maximum):
                raise OptionError(self._bad(raw))

    def _bad(self, raw: Any) -> str:
        return f"network_args: {self.name}={raw!r} is not valid; allowed: {self.allowed()}"


OPTIONS: tuple[Option, ...] = (
    # --- what is trained (same meaning as kohya's networks.lora) -------------
    Option("conv_dim", "int", None, "Maximum rank of the LoRA on 3x3 convolutions (ResnetBlock2D, Down/Upsample2D). Unset: no 3x3 conv LoRA, like networks.lora.", minimum=1),
    Option("conv_alpha", "float", None, "Alpha of the 3x3 conv LoRA (defaults to 1.0 like networks.lora). Needs conv_dim.", minimum=0, min_inclusive=False),
    Option("dropout", "float", None, "Dropout on the rank-dimension activations (sd-scripts fills it from --network_dropout).", minimum=0, maximum=1, max_inclusive=False),
    Option("rank_dropout", "float", None, "Probability of dropping each rank for a step (the kept ones are rescaled).", minimum=0, maximum=1, max_inclusive=False),
    Option("module_dropout", "float", None, "Probability of skipping a whole module for a step.", minimum=0, maximum=1, max_inclusive=False),
    Option("loraplus_lr_ratio", "float", None, "LoRA+: the lr of lora_up is this many times the lr of lora_down.", minimum=0, min_inclusive=False),
    Option("loraplus_unet_lr_ratio", "float", None, "LoRA+ ratio for the U-Net only (overrides loraplus_lr_ratio).", minimum=0, min_inclusive=False),
    Option("loraplus_text_encoder_lr_ratio", "float", None, "LoRA+ ratio for the text encoder(s) only (overrides loraplus_lr_ratio).", minimum=0, min_inclusive=False),
    # --- RESTART ------------------------------------------------------------
    Option("restart_mode", "choice", "product", "product: decide on each module's update up*down: keep the components whose importance (the RMS they add to the layer's output) clears one threshold shared by every module, chosen on a held-out loss when the training loop gives one (sd-scripts' --validation_split), else only at save time at min_importance; truncate exactly, and train at the kept rank after a held-out cut. paper: the paper's algorithm exactly (SVD of each factor, p = 1 - L^alpha from the training loss, Gaussian refill). off: never restart (a plain LoRA at the maximum rank).", choices=RESTART_MODES, optional=False),
    Option("restart_every", "int", None, "Epochs between RESTARTs. Unset: a tenth of the run (at least 1), as in the paper (every 10 of 100 epochs).", minimum=1),
    Option("restart_every_steps", "int", None, "Optimizer steps between RESTARTs, for runs counted in steps or with few epochs. Replaces restart_every.", minimum=1),
    Option("energy", "choice", "squared", "What the threshold p is a fraction of: squared = cumulative energy of squared singular values; linear = cumulative sum of singular values.", choices=ENERGY_RULES, optional=False),
    Option("min_rank", "int", 1, "Fewest components a module keeps at a RESTART.", minimum=1, optional=False),
    Option("fixed_p", "float", None, "Keep, in every module, the leading components carrying this share p of the energy at every RESTART (paper mode: instead of p = 1 - L^alpha, also what makes a RESTART run when no loss was captured; product mode: of the update's spectrum, instead of the importance threshold).", minimum=0, maximum=1, min_inclusive=False),
    Option("ranks_from", "path", None, "Train at the per-module ranks of this LoRA file (its aclora_ranks, else its tensor shapes), starting fresh: the second run of the two-run recipe (a first run with a validation split chooses the ranks, this one trains on every image at them). Unlike --dim_from_weights, no weights are loaded. Modules the file lacks keep the maximum rank. Product mode or off, not paper."),
    Option("min_importance", "float", 0.01, "Product mode without a held-out loss: keep the components whose importance is at least this fraction of the largest component's in the whole network (0 keeps every component).", minimum=0, maximum=1, max_inclusive=False, optional=False),
    Option("seed", "int", 0, "Seed of the RESTART noise (shared by all processes, so every GPU draws the same noise).", minimum=0, optional=False),
    Option("save_full_rank", "bool", False, "Also write '<name>-fullrank.safetensors' beside every saved file: the raw training factors at the maximum rank, for continuing a run. The normal file is always the variable-rank export.", optional=False),
    # --- the saved file -----------------------------------------------------
    Option("max_file_size", "size", None, "Every saved file (each save_weights, the final one included) is at most this size, metadata included: the ranks the run decided are the caps, and the components worth the least per byte go first. A budget no file can meet refuses the save (the previous file is kept). The save_full_rank file is not budgeted."),
)

# --- which layers get a LoRA, per model family: sd-scripts' networks.lora_flux / lora_sd3 options, same names
# and meaning (a rank given here is that layer's maximum rank: the rank search still decides the file's) ----
#: the model families (families/ adapters) by their option key, as messages name them
FAMILIES = {"sd": "SD1.x/2.x/SDXL", "flux": "FLUX.1", "sd3": "SD3/SD3.5"}
_FLUX, _SD3, _DIT = ("flux",), ("sd3",), ("flux", "sd3")


def _dim(name: str, what: str, families: tuple[str, ...]) -> Option:
    return Option(name, "int", None, f"Maximum rank of the {what} (unset: network_dim; 0: no LoRA there).",
                  minimum=0, families=families)


LAYER_OPTIONS: tuple[Option, ...] = (
    _dim("img_attn_dim", "double blocks' image attention (img_attn.qkv, img_attn.proj)", _FLUX),
    _dim("txt_attn_dim", "double blocks' text attention (txt_attn.qkv, txt_attn.proj)", _FLUX),
    _dim("img_mlp_dim", "double blocks' image MLP (img_mlp.0, img_mlp.2)", _FLUX),
    _dim("txt_mlp_dim", "double blocks' text MLP (txt_mlp.0, txt_mlp.2)", _FLUX),
    _dim("img_mod_dim", "double blocks' image modulation (img_mod.lin)", _FLUX),
    _dim("txt_mod_dim", "double blocks' text modulation (txt_mod.lin)", _FLUX),
    _dim("single_dim", "single blocks' linear1 and linear2", _FLUX),
    _dim("single_mod_dim", "single blocks' modulation (modulation.lin)", _FLUX),
    Option("in_dims", "ints", None, "Maximum ranks of the input layers img_in, time_in, vector_in, guidance_in, txt_in (0: no LoRA there). Unset: none of them gets a LoRA.", minimum=0, families=_FLUX, length=5),
    Option("train_blocks", "choice", "all", "Which blocks get a LoRA: all, single (single-stream blocks only) or double (double-stream blocks only).", choices=("all", "single", "double"), optional=False, families=_FLUX),
    Option("train_double_block_indices", "blocks", "all", "Which double-stream blocks get a LoRA.", families=_FLUX),
    Option("train_single_block_indices", "blocks", "all", "Which single-stream blocks get a LoRA.", families=_FLUX),
    _dim("context_attn_dim", "joint blocks' context attention (context_block.attn.qkv, .proj)", _SD3),
    _dim("context_mlp_dim", "joint blocks' context MLP (context_block.mlp.fc1, .fc2)", _SD3),
    _dim("context_mod_dim", "joint blocks' context modulation (context_block.adaLN_modulation.1)", _SD3),
    _dim("x_attn_dim", "joint blocks' image attention (x_block.attn and attn2: qkv, proj)", _SD3),
    _dim("x_mlp_dim", "joint blocks' image MLP (x_block.mlp.fc1, .fc2)", _SD3),
    _dim("x_mod_dim", "joint blocks' image modulation (x_block.adaLN_modulation.1)", _SD3),
    Option("emb_dims", "ints", None, "Maximum ranks of context_embedder, t_embedder, x_embedder (a 2x2 conv; conv_dim wins when set), y_embedder, final_layer.adaLN_modulation, final_layer.linear (0: no LoRA there). Unset: none of them gets a LoRA.", minimum=0, families=_SD3, length=6),
    Option("train_block_indices", "blocks", "all", "Which joint blocks get a LoRA.", families=_SD3),
    Option("train_t5xxl", "bool", False, "Also give T5-XXL's attention and feed-forward layers a LoRA (lora_te3_...); sd-scripts then cannot cache the text-encoder outputs.", optional=False, families=_DIT),
    Option("split_qkv", "bool", False, "Only false is accepted: sd-scripts saves split_qkv's q/k/v factors merged into one module with alpha unchanged, so every consumer applies a third (FLUX.1 single blocks: a quarter) of the trained update; AC-LoRA gives the fused layer the rank it needs instead.", optional=False, families=_DIT),
    Option("network_reg_dims", "regex_dims", None, "Maximum rank by LoRA module name: comma-separated pattern=rank pairs (re.search on the name, e.g. double_blocks_0_=16; the first match wins over network_dim, conv_dim and the per-type ranks; 0: no LoRA there)."),
)
OPTIONS = OPTIONS + LAYER_OPTIONS
_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class ACLoRAConfig:
    """Validated options of one network (see :data:`OPTIONS` for their meaning)."""

    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    dropout: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None
    restart_mode: str = "product"
    restart_every: Optional[int] = None
    restart_every_steps: Optional[int] = None
    energy: str = "squared"
    min_rank: int = 1
    fixed_p: Optional[float] = None
    ranks_from: Optional[str] = None
    min_importance: float = 0.01
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
    train_t5xxl: bool = False
    split_qkv: bool = False
    network_reg_dims: Optional[tuple[tuple[str, int], ...]] = None

    def replace(self, **changes: Any) -> "ACLoRAConfig":
        return validate(dataclasses.replace(self, **changes))


def validate(config: ACLoRAConfig, max_rank: Optional[int] = None) -> ACLoRAConfig:
    """Reject option combinations that contradict each other."""
    if config.restart_every is not None and config.restart_every_steps is not None:
        raise OptionError(f"network_args: restart_every={config.restart_every} and restart_every_steps="
                          f"{config.restart_every_steps} contradict each other; set only one (epochs or optimizer steps)")
    if config.restart_mode == "off":
        for name in ("restart_every", "restart_every_steps", "fixed_p"):
            if getattr(config, name) is not None:
                raise OptionError(
                    f"network_args: {name}={getattr(config, name)} has no effect with restart_mode=off; "
                    "remove it or choose restart_mode=paper|product"
                )
    if config.ranks_from is not None and config.restart_mode == "paper":  # its RESTARTs decide every rank again
        raise OptionError(f"network_args: ranks_from={config.ranks_from!r} needs restart_mode=product or off, not "
                          "paper; allowed: remove one of them")
    if config.conv_alpha is not None and config.conv_dim is None:
        raise OptionError(f"network_args: conv_alpha={config.conv_alpha} needs conv_dim=<rank of the 3x3 conv LoRA>")
    if max_rank is not None and config.min_rank > max_rank:
        raise OptionError(f"network_args: min_rank={config.min_rank} is larger than the maximum rank "
                          f"network_dim={max_rank}; allowed: 1 .. {max_rank}")
    if max_rank is not None and config.conv_dim is not None and config.min_rank > config.conv_dim:
        raise OptionError(
            f"network_args: min_rank={config.min_rank} is larger than conv_dim={config.conv_dim}; allowed: 1 .. {config.conv_dim}"
        )
    return _validate_layers(config)


def _validate_layers(config: ACLoRAConfig) -> ACLoRAConfig:
    """split_qkv is refused (see its help); a layer's maximum rank below min_rank cannot be honoured."""
    if config.split_qkv:
        raise OptionError("network_args: split_qkv=True is refused; allowed: false. sd-scripts' split_qkv trains separate "
                          "q/k/v factors and saves them merged into one module with alpha unchanged, so every "
                          "consumer applies a third (FLUX.1 single blocks: a quarter) of the trained update; AC-LoRA "
                          "gives the fused layer the rank it needs instead")
    for o in LAYER_OPTIONS:
        value = getattr(config, o.name)
        ranks = value if o.kind == "ints" and value else ([value] if o.kind == "int" and value else [])
        if o.kind == "regex_dims" and value:
            ranks = [rank for _, rank in value]
        low = [r for r in ranks if 0 < r < config.min_rank]
        if low:
            raise OptionError(f"network_args: {o.name}={_show(value)} gives a maximum rank of {low[0]}, below "
                              f"min_rank={config.min_rank}; allowed: 0 (no LoRA) or ranks >= min_rank")
    return config


def _show(value: Any) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(f"{p}={r}" for p, r in value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def parse_network_args(kwargs: Mapping[str, Any], max_rank: Optional[int] = None,
                       family: Optional[str] = None) -> ACLoRAConfig:
    """Parse sd-scripts' ``**kwargs`` (strings, or Python values from the API) into a config.

    ``family`` (a :data:`FAMILIES` key): the model's family; an option that only another family has
    is refused, naming the key, the value and the options this family accepts.
    """
    unknown = sorted(k for k in kwargs if k not in _BY_NAME)
    if unknown:
        key = unknown[0]
        raise OptionError(
            f"network_args: unknown key {key!r} (value {kwargs[key]!r}); "
            f"allowed keys: {', '.join(o.name for o in OPTIONS)}"
        )
    if family is not None:
        _check_family(kwargs, family)
    values = {name: _BY_NAME[name].parse(raw) for name, raw in kwargs.items()}
    return validate(ACLoRAConfig(**values), max_rank=max_rank)


def _check_family(kwargs: Mapping[str, Any], family: str) -> None:
    for key in sorted(kwargs):
        option = _BY_NAME[key]
        if option.families and family not in option.families:
            theirs = " and ".join(FAMILIES[f] for f in option.families)
            ours = [o.name for o in LAYER_OPTIONS if not o.families or family in o.families]
            raise OptionError(
                f"network_args: {key}={kwargs[key]!r} is an option for {theirs} models, and this model is "
                f"{FAMILIES[family]}; the layer options allowed for {FAMILIES[family]}: {', '.join(ours)}")


# --- the layer-selection kinds ---------------------------------------------------------------------
_LAYER_KINDS = ("ints", "blocks", "regex_dims")


def _layer_kind_allowed(option: Option) -> str:
    if option.kind == "ints":
        return f"{option.length} integers >= 0, comma-separated, brackets optional (or none)"
    if option.kind == "blocks":
        return "all, none, or block indices and inclusive ranges, comma-separated (e.g. 0,2-5)"
    return "comma-separated pattern=rank pairs, each pattern a regular expression and each rank an integer >= 0 " \
           "(or none)"


def _parse_layer_kind(option: Option, raw: Any) -> Any:
    try:
        if option.kind == "blocks":
            return _parse_blocks(raw)
        if isinstance(raw, str) and raw.strip().lower() in _NONE:
            return option.default
        if option.kind == "ints":
            return _parse_ints(raw, option.length)
        return _parse_regex_dims(raw)
    except (TypeError, ValueError, re.error):
        raise OptionError(option._bad(raw)) from None


def _parse_blocks(raw: Any) -> BlockSelection:
    """sd-scripts' block selection: "all", "none" or "" (no block), or indices and a-b ranges."""
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text == "all":
            return "all"
        if text in ("none", ""):
            return ()
        items = [part.strip() for part in text.split(",")]
    else:
        items = [str(int(v)) for v in raw]
    chosen: set[int] = set()
    for item in items:
        start, _, end = item.partition("-")
        first, last = _index(start), _index(end if end else start)
        if last < first:
            raise ValueError(item)
        chosen.update(range(first, last + 1))
    return tuple(sorted(chosen))


def _index(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(text)
    return int(text)


def _parse_ints(raw: Any, length: Optional[int]) -> tuple[int, ...]:
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        values = [_index(part) for part in text.split(",")]
    else:
        values = [v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else _index("x") for v in raw]
    if length is not None and len(values) != length:
        raise ValueError(raw)
    return tuple(values)


def _parse_regex_dims(raw: Any) -> tuple[tuple[str, int], ...]:
    pairs = raw.items() if isinstance(raw, Mapping) else None
    if pairs is None:
        if not isinstance(raw, str):
            raise TypeError(raw)
        pairs = [part.split("=", 1) if "=" in part else (part, "x") for part in raw.split(",") if part.strip()]
    parsed = []
    for pattern, rank in pairs:
        pattern = str(pattern).strip()
        if not pattern:
            raise ValueError(raw)
        re.compile(pattern)
        parsed.append((pattern, rank if isinstance(rank, int) and rank >= 0 else _index(str(rank))))
    if not parsed:
        raise ValueError(raw)
    return tuple(parsed)


def parse_positive(name: str, raw: Any, default: Optional[float], kind: Callable[[Any], Any] = float,
                   allow_zero: bool = False) -> Any:
    """Parse ``network_dim``/``network_alpha`` style arguments (numbers or numeric strings)."""
    if raw is None:
        return default
    try:
        value = kind(float(raw)) if kind is int else kind(raw)
        if kind is int and float(raw) != int(float(raw)):
            raise ValueError
    except (TypeError, ValueError):
        raise OptionError(f"{name}={raw!r} is not valid; allowed: a positive {'integer' if kind is int else 'number'}") from None
    if not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero):
        what = "a number >= 0" if allow_zero else f"a positive {'integer' if kind is int else 'number'}"
        raise OptionError(f"{name}={raw!r} is not valid; allowed: {what}")
    return value


# --- sizes ------------------------------------------------------------------------------------------------
# The size grammar of max_file_size and ``aclora resize --max-size``. It lives here, beside the other
# option types, because this leaf module parses every user value and may import nothing of the package.
#: bytes per unit, lower case (units are case-insensitive): KB/MB/GB decimal, KiB/MiB/GiB binary
SIZE_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}
SIZE_ALLOWED = ("a size: bytes (123456) or a number with a unit, KB/MB/GB (decimal: 10^3, 10^6, 10^9 bytes) or "
                "KiB/MiB/GiB (binary: 2^10, 2^20, 2^30 bytes), e.g. 50MB")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$", re.ASCII)


def parse_size(text: Any) -> int:
    """Bytes in "50MB", "50 MB", "1.5GB", "800KB", "512MiB", "100B" or "123456" (an int is bytes).

    KB/MB/GB are decimal, as model sites and file browsers show sizes; KiB/MiB/GiB binary. A bare K, M
    or G is refused as ambiguous, and so are exponents and non-ASCII digits. Fractions need a unit and
    are rounded down (the size is a maximum). ValueError names the value and what is allowed.
    """
    def bad(why: str = "is not valid") -> ValueError:
        return ValueError(f"size {text!r} {why}; allowed: {SIZE_ALLOWED}")

    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise bad()
    if isinstance(text, int):
        if text < 1:
            raise bad()
        return text
    match = _SIZE.match(text)
    if not match:
        raise bad()
    number, unit = match.group(1), match.group(2).lower()
    if unit not in SIZE_UNITS and unit != "":
        raise bad(f"has unit {match.group(2)!r}, which is not known")
    if unit in ("", "b") and "." in number:
        raise bad("is not a whole number of bytes")
    size = int(Decimal(number) * SIZE_UNITS[unit or "b"])  # int() rounds down: the budget is a maximum
    if size < 1:
        raise bad("is less than one byte")
    return size


def format_size(size: int) -> str:
    """"49,912,345 bytes (49.91 MB)": the exact bytes, and the decimal unit :func:`parse_size` reads."""
    for unit, scale in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3)):
        if size >= scale:
            return f"{size:,} bytes ({size / scale:.2f} {unit})"
    return f"{size:,} bytes"


def markdown_table() -> str:
    """The README's options table, generated from :data:`OPTIONS`."""
    rows = ["| option | default | allowed | what it does |", "|---|---|---|---|"]
    for o in OPTIONS:
        default = "unset" if o.default is None else str(o.default).lower() if isinstance(o.default, bool) else str(o.default)
        only = f"{' and '.join(FAMILIES[f] for f in o.families)} only. " if o.families else ""
        rows.append(f"| `{o.name}` | {default} | {o.allowed(separator=', ')} | {only}{o.help} |")
    return "\n".join(rows)

