"""One training set-up of ``aclora vram``, in sd-scripts' terms, checked as sd-scripts checks it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...harness.dit import DIT_CONFIGS, FluxConfig
from ...harness.lumina_dit import LUMINA_2B
from ...options import parse_network_args
from .anima_setup import anima_defaults, anima_problem
from .hunyuan_image_checks import hunyuan_image_problem

#: sd1/sd2/sdxl: train_network.py / sdxl_train_network.py; flux: flux_train_network.py; sd3: sd3_train_network.py;
#: lumina: lumina_train_network.py (Lumina 2); hunyuan_image: hunyuan_image_train_network.py;
#: anima: anima_train_network.py
FAMILIES = ("sd1", "sd2", "sdxl", "flux", "sd3", "lumina", "hunyuan_image", "anima")
DIT_FAMILIES = ("flux", "sd3")
#: the models of a DiT family (sd-scripts' names: FLUX "dev"/"schnell"/"chroma", SD3 model_type)
VARIANTS = {family: tuple(DIT_CONFIGS[family]) for family in DIT_FAMILIES}
DEFAULT_VARIANT = {"flux": "dev", "sd3": "5-medium"}
FAMILY_NAMES = {
    "sd1": "SD1.x",
    "sd2": "SD2.x",
    "sdxl": "SDXL",
    "flux": "FLUX.1",
    "sd3": "SD3",
    "lumina": "Lumina 2",
    "hunyuan_image": "HunyuanImage-2.1",
    "anima": "Anima",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
MIXED_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor")
ATTENTION = ("sdpa", "xformers", "mem_eff_attn", "none")


class VramError(ValueError):
    """A set-up the estimate cannot use: the message names the key, the value and what is allowed."""


def max_blocks_to_swap(family: str, variant: str) -> int:
    """The largest --blocks_to_swap sd-scripts accepts for the model (flux_models.py enable_block_swap: N//2 double
    and (N - N//2)*2 single blocks, each at most its count - 2; sd3_models.py: N <= depth - 2)."""
    config = DIT_CONFIGS[family][variant]
    if isinstance(config, FluxConfig):
        n = 0
        while (n + 1) // 2 <= config.depth - 2 and (n + 1 - (n + 1) // 2) * 2 <= config.depth_single_blocks - 2:
            n += 1
        return n
    return config.depth - 2


@dataclass(frozen=True)
class Setup:
    """One training set-up, in sd-scripts' terms (the defaults are those of sample_configs/sdxl_style_24gb.toml)."""

    family: str = "sdxl"
    width: int = 1024
    height: int = 1024
    batch_size: int = 1
    rank: int = 128
    alpha: float = 64.0
    network_args: tuple[tuple[str, str], ...] = ()
    mixed_precision: str = "bf16"  # no | fp16 | bf16: the frozen weights' dtype and autocast
    full_lora_precision: bool = False  # --full_bf16 / --full_fp16: the LoRA weights in that dtype too
    fp8_base: bool = False  # frozen U-Net (and text encoders) stored in fp8
    gradient_checkpointing: bool = True
    train_unet: bool = True
    train_text_encoder: bool = False
    optimizer: str = "AdamW"
    optimizer_args: tuple[tuple[str, Any], ...] = ()
    max_grad_norm: float = 1.0
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = False
    attention: str = "sdpa"
    no_half_vae: bool = False
    max_token_length: int = 75
    # FLUX.1 / SD3 (flux_train_network.py, sd3_train_network.py)
    # flux: dev, schnell, chroma (--model_type chroma); sd3: medium, 5-medium, 5-large ("" = the family's default)
    variant: str = ""
    blocks_to_swap: int = 0  # --blocks_to_swap: that many blocks' weights live on the CPU
    t5_tokens: int = 0  # --t5xxl_max_token_length (0 = sd-scripts' default: FLUX dev/Chroma 512, schnell/SD3 256)
    apply_t5_attn_mask: bool = False  # --apply_t5_attn_mask (FLUX: a mask in every attention)
    # Lumina 2 (lumina_train_network.py; blocks_to_swap too)
    gemma2_tokens: int = 0  # --gemma2_max_token_length (0 = sd-scripts' default, 256)
    # HunyuanImage-2.1 (hunyuan_image_train_network.py; blocks_to_swap above too)
    fp8_scaled: bool = False  # --fp8_scaled: the blocks' Linear weights in fp8 with bf16 scales
    split_attn: bool = False  # --split_attn: attention one sample at a time
    # Anima (anima_train_network.py; also blocks_to_swap, and t5_tokens = --t5_max_token_length)
    qwen3_tokens: int = 0  # --qwen3_max_token_length (0 = sd-scripts' default, 512)

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> VramError:
            return VramError(f"{key}={value!r} is not valid; allowed: {allowed}")

        if self.family not in FAMILIES:
            raise bad("family", self.family, ", ".join(FAMILIES))
        self._check_dit(bad)
        for key in ("width", "height"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 64 or value % 8:
                raise bad(key, value, "a multiple of 8, at least 64")
        for key in ("batch_size", "rank"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "an integer >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", self.mixed_precision, ", ".join(MIXED_PRECISION))
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer_type", self.optimizer, ", ".join(OPTIMIZERS))
        if self.attention not in ATTENTION:
            raise bad("attention", self.attention, ", ".join(ATTENTION))
        if self.max_token_length not in (75, 150, 225):
            raise bad("max_token_length", self.max_token_length, "75, 150, 225")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", self.max_grad_norm, "a number >= 0")
        # the checks sd-scripts makes before it trains
        if not (self.train_unet or self.train_text_encoder):
            raise VramError(
                "network_train_unet_only and network_train_text_encoder_only are both set: nothing would "
                "be trained; allowed: at most one of them"
            )
        if self.full_lora_precision and self.mixed_precision == "no":
            raise VramError("full_bf16/full_fp16 need mixed_precision='bf16'/'fp16'; mixed_precision='no' is set")
        if self.fp8_base and self.mixed_precision == "no":
            raise VramError("fp8_base=True needs mixed_precision='fp16' or 'bf16'; mixed_precision='no' is set")
        if self.cache_text_encoder_outputs and self.family not in (
            "sdxl",
            "lumina",
            "anima",
            "hunyuan_image",
            *DIT_FAMILIES,
        ):
            raise VramError(
                f"cache_text_encoder_outputs=True is an sdxl_train_network.py option (and "
                f"flux_train_network.py's and sd3_train_network.py's); family={self.family!r}"
            )
        if self.cache_text_encoder_outputs and self.train_text_encoder and self.family == "sdxl":
            raise VramError(
                "cache_text_encoder_outputs=True needs network_train_unet_only=True (text encoders cannot "
                "be trained from cached outputs), as sdxl_train_network.py asserts"
            )
        parse_network_args(dict(self.network_args), max_rank=self.rank)  # OptionError names the key and value

    def _check_dit(self, bad) -> None:
        """The FLUX.1/SD3 fields: a variant of the family, blocks_to_swap within what sd-scripts asserts."""
        if self.is_hunyuan_image:  # hunyuan_image_train_network.py's own checks (and what is not counted yet)
            problem = hunyuan_image_problem(self)
            if problem:
                raise VramError(problem)
            return
        if self.family == "anima":  # its own checks (anima_setup)
            for key, value in anima_defaults(self).items():
                object.__setattr__(self, key, value)
            problem = anima_problem(self)
            if problem:
                raise VramError(problem)
            return
        if self.fp8_scaled or self.split_attn:
            raise VramError(
                f"fp8_scaled={self.fp8_scaled!r}, split_attn={self.split_attn!r}: options of "
                f"hunyuan_image_train_network.py; family={self.family!r} (allowed: false, or family hunyuan_image)"
            )
        if self.family not in DIT_FAMILIES:
            if self.is_lumina:
                self._check_lumina(bad)
            elif self.gemma2_tokens:
                raise bad("gemma2_max_token_length", self.gemma2_tokens, "unset (a lumina_train_network.py option)")
            for key, default in (
                ("variant", ""),
                ("blocks_to_swap", 0 if not self.is_lumina else self.blocks_to_swap),
                ("t5_tokens", 0),
                ("apply_t5_attn_mask", False),
            ):
                if getattr(self, key) != default:
                    raise VramError(
                        f"{key}={getattr(self, key)!r} is an option of flux_train_network.py and "
                        f"sd3_train_network.py; family={self.family!r} (allowed: family flux or sd3)"
                    )
            return
        variants = VARIANTS[self.family]
        object.__setattr__(self, "variant", self.variant or DEFAULT_VARIANT[self.family])
        if self.variant not in variants:
            raise bad("variant", self.variant, f"{', '.join(variants)} (family {self.family})")
        if not self.t5_tokens:
            long = (self.family, self.variant) in (("flux", "dev"), ("flux", "chroma"))
            object.__setattr__(self, "t5_tokens", 512 if long else 256)
        if not isinstance(self.t5_tokens, int) or self.t5_tokens < 1:
            raise bad("t5xxl_max_token_length", self.t5_tokens, "an integer >= 1")
        most = max_blocks_to_swap(self.family, self.variant)
        if not isinstance(self.blocks_to_swap, int) or not 0 <= self.blocks_to_swap <= most:
            raise bad(
                "blocks_to_swap",
                self.blocks_to_swap,
                f"an integer from 0 to {most} for {self.model_name} ("
                + (
                    "it swaps N//2 double and (N - N//2)*2 single blocks, and sd-scripts asserts each is at most "
                    "the block count - 2)"
                    if self.family == "flux"
                    else "sd-scripts asserts N <= the joint block count - 2)"
                ),
            )
        if self.is_chroma:
            self._check_chroma()
        if self.attention != "sdpa":
            raise bad(
                "attention",
                self.attention,
                f"sdpa for family {self.family} (sd-scripts' DiTs always call scaled_dot_product_attention)",
            )

    def _check_chroma(self) -> None:
        """What flux_train_network.py asserts or cannot run for --model_type chroma."""
        if not self.apply_t5_attn_mask:
            raise VramError(
                "model_type='chroma' needs apply_t5_attn_mask=true (flux_train_network.py asserts it); "
                "apply_t5_attn_mask=False is set"
            )
        if self.train_text_encoder:
            raise VramError(
                "train_text_encoder=True (no network_train_unet_only) is not valid for Chroma: it has no CLIP-L, "
                "so no text-encoder LoRA trains, and with cached text-encoder outputs flux_train_network.py would "
                "encode every step with no text encoder; allowed: network_train_unet_only=true"
            )

    def _check_lumina(self, bad) -> None:
        """What lumina_train_network.py asserts, and what the Lumina 2 count does not model (tools/vram/lumina.py)."""
        object.__setattr__(self, "gemma2_tokens", self.gemma2_tokens or 256)
        if not isinstance(self.gemma2_tokens, int) or self.gemma2_tokens < 1:
            raise bad("gemma2_max_token_length", self.gemma2_tokens, "an integer >= 1")
        most = LUMINA_2B.depth - 2
        if not isinstance(self.blocks_to_swap, int) or not 0 <= self.blocks_to_swap <= most:
            raise bad(
                "blocks_to_swap",
                self.blocks_to_swap,
                f"an integer from 0 to {most} for Lumina 2 (sd-scripts asserts N <= the main block count - 2)",
            )
        if self.attention != "sdpa":
            raise bad("attention", self.attention, "sdpa for Lumina 2 (its NextDiT calls scaled_dot_product_attention)")

    @property
    def is_lumina(self) -> bool:
        """Lumina 2 (lumina_train_network.py)."""
        return self.family == "lumina"

    @property
    def is_chroma(self) -> bool:
        """Chroma (flux_train_network.py --model_type chroma), counted as the FLUX.1 trainer's other model."""
        return (self.family, self.variant) == ("flux", "chroma")

    @property
    def is_hunyuan_image(self) -> bool:
        return self.family == "hunyuan_image"

    @property
    def is_dit(self) -> bool:
        return self.family in DIT_FAMILIES

    @property
    def model_name(self) -> str:
        """ "FLUX.1 dev", "SD3.5 medium", "SDXL", ..."""
        if self.is_chroma:
            return "Chroma"
        if self.family == "sd3":
            return {"medium": "SD3 medium", "5-medium": "SD3.5 medium", "5-large": "SD3.5 large"}[self.variant]
        return FAMILY_NAMES[self.family] + (f" {self.variant}" if self.variant else "")

    @property
    def weight_dtype(self) -> torch.dtype:
        return DTYPES[MIXED_PRECISION[self.mixed_precision]]

    @property
    def unet_dtype(self) -> torch.dtype:
        return DTYPES["fp8"] if self.fp8_base or self.fp8_scaled else self.weight_dtype

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        # train_network.py: fp8_base stores the text encoders in fp8 as well
        return DTYPES["fp8"] if self.fp8_base else self.weight_dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return torch.float32 if self.no_half_vae else self.weight_dtype

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.weight_dtype if self.full_lora_precision else torch.float32

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return None if self.mixed_precision == "no" else self.weight_dtype

    @property
    def chunks(self) -> int:
        return self.max_token_length // 75

    @property
    def denoiser(self) -> str:
        """What sd-scripts' ``unet`` is: "DiT" for FLUX.1/SD3, else "U-Net"."""
        return "DiT" if self.is_dit or self.is_lumina or self.is_hunyuan_image or self.family == "anima" else "U-Net"

    def describe(self) -> str:
        net = self.denoiser
        what = (
            f"{net} and text encoder(s)"
            if self.train_unet and self.train_text_encoder
            else (net if self.train_unet else "text encoder(s)")
        )
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", DTYPES["fp8"]: "fp8"}
        model = (
            self.model_name
            if self.is_dit or self.is_lumina or self.is_hunyuan_image or self.family == "anima"
            else self.family.upper()
        )
        n = self.blocks_to_swap
        blocks = n // 2 + (n - n // 2) * 2 if self.family in ("flux", "hunyuan_image") else n
        swap = f" (blocks_to_swap {n}: {blocks} blocks' weights on the CPU)" if n else ""
        parts = [
            f"{model} {self.width}x{self.height}, batch {self.batch_size}, LoRA rank {self.rank} on the {what}",
            f"{net} weights {name[self.unet_dtype]}{swap}, LoRA {name[self.lora_dtype]}"
            + (f", {name[self.autocast_dtype]} autocast" if self.autocast_dtype else ", no autocast"),
            "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing",
            self.optimizer
            + (" " + " ".join(f"{k}={v}" for k, v in self.optimizer_args) if self.optimizer_args else ""),
            "latents cached" if self.cache_latents else f"VAE on the GPU ({name[self.vae_dtype]})",
            "text-encoder outputs cached"
            if self.cache_text_encoder_outputs
            else (
                "text encoders trained"
                if self.train_text_encoder
                else f"text encoders on the GPU ({name[self.text_encoder_dtype]}, frozen)"
            ),
            f"attention: {self.attention}",
        ]
        if self.family == "anima":
            parts.append(f"Qwen3 tokens {self.qwen3_tokens}, T5 tokens {self.t5_tokens}")
        if self.is_dit:
            parts.append(f"T5 tokens {self.t5_tokens}" + (", T5 attention mask" if self.apply_t5_attn_mask else ""))
        if self.is_lumina:
            parts.append(f"Gemma2 tokens {self.gemma2_tokens}")
        if self.is_hunyuan_image:
            parts.append(("fp8_scaled" if self.fp8_scaled else "no fp8") + (", split_attn" if self.split_attn else ""))
        if self.network_args:
            parts.append("network_args " + " ".join(f"{k}={v}" for k, v in self.network_args))
        return "; ".join(parts)
