"""The ``aclora vram`` command: arguments, and the estimate as it prints it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import read_config, setup_from_arguments
from .counter import CATEGORIES
from .estimate import CARD_SIZES_GIB, NOT_COUNTED, Estimate, GiB, estimate
from .setup import FAMILIES, VARIANTS, VramError

BOOLEAN_FLAGS = (
    "v2",
    "network_train_unet_only",
    "network_train_text_encoder_only",
    "full_bf16",
    "full_fp16",
    "fp8_base",
    "no_half_vae",
    "gradient_checkpointing",
    "cache_latents",
    "cache_text_encoder_outputs",
    "sdpa",
    "xformers",
    "mem_eff_attn",
    "apply_t5_attn_mask",
    "fp8_scaled",  # hunyuan_image_train_network.py
    "split_attn",
)
VALUE_FLAGS = (
    "pretrained_model_name_or_path",
    "resolution",
    "train_batch_size",
    "network_dim",
    "network_alpha",
    "mixed_precision",
    "optimizer_type",
    "max_grad_norm",
    "max_token_length",
    "blocks_to_swap",
    "t5xxl_max_token_length",
    "ae",
    "clip_l",
    "clip_g",
    "t5xxl",
    "model_prediction_type",
    "model_type",
    "gemma2",
    "gemma2_max_token_length",
    "byt5",  # hunyuan_image_train_network.py
    "qwen3",  # anima_train_network.py
    "qwen3_max_token_length",
    "t5_max_token_length",
    "attn_mode",
)
LIST_FLAGS = ("network_args", "optimizer_args")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aclora vram",
        description="Estimate the peak GPU memory of an AC-LoRA training run, counted on PyTorch's meta device "
        "(no GPU, no download; under a minute on a CPU). Give sd-scripts' --config_file and/or its arguments, "
        "spelled as sd-scripts spells them; arguments override the file, as in sd-scripts.",
    )
    parser.add_argument(
        "--config_file", metavar="FILE.toml", help="an sd-scripts training config (sample_configs/*.toml)"
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help="the base model (default: anima when --qwen3 is given; lumina with --gemma2 or 'lumina' in the model "
        "path; sd2 with v2; flux / sd3 when the model path says so or --ae / --clip_g is given; hunyuan_image when "
        "it says 'hunyuan' or --byt5 is given; sdxl when the model path contains 'xl'; else sd1)",
    )
    variants = sorted({v for vs in VARIANTS.values() for v in vs})
    parser.add_argument(
        "--variant",
        choices=variants,
        help="flux: dev (default) or schnell; sd3: medium (SD3), 5-medium (SD3.5, default) or 5-large "
        "(default: from the model path)",
    )
    for name in BOOLEAN_FLAGS:
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
    for name in VALUE_FLAGS:
        parser.add_argument(f"--{name}", metavar="VALUE", default=None)
    for name in LIST_FLAGS:
        parser.add_argument(f"--{name}", nargs="*", metavar="KEY=VALUE", default=None)
    parser.add_argument("--no-restart", action="store_true", help="skip measuring the RESTART transient (faster)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parser


def arguments_from(args: argparse.Namespace) -> tuple[dict[str, tuple[Any, str]], Optional[Path]]:
    arguments: dict[str, tuple[Any, str]] = {}
    base = None
    if args.config_file:
        base = Path(args.config_file).resolve().parent
        arguments = {k: (v, args.config_file) for k, v in read_config(args.config_file).items()}
    for name in BOOLEAN_FLAGS + VALUE_FLAGS + LIST_FLAGS:
        value = getattr(args, name)
        if value is not None:
            arguments[name] = (value, "command line")
    return arguments, base


def format_estimate(result: Estimate, notes: Sequence[str] = ()) -> str:
    gib = lambda n: f"{n / GiB:6.2f}"  # noqa: E731
    lines = [
        f"AC-LoRA VRAM estimate: {result.setup.describe()}",
        f"{result.modules} LoRA modules, {result.lora_parameters / 1e6:.1f} M trainable parameters",
        "",
        "  GiB   at the peak of the training step",
    ]
    for category in CATEGORIES:
        if result.breakdown.get(category):
            lines.append(f"{gib(result.breakdown[category])}  {category.replace('U-Net', result.setup.denoiser)}")
    lines += [
        f"{gib(result.peak_bytes)}  peak allocated (estimate of torch.cuda.max_memory_allocated), during: "
        f"{result.peak_phase}",
        "        peak in each part of the step: "
        + ", ".join(f"{phase} {value / GiB:.2f}" for phase, value in result.phase_peaks.items()),
        f"{gib(result.restart_transient_bytes)}  RESTART transient, between steps (peak then: "
        f"{result.restart_peak_bytes / GiB:.2f} GiB)",
        f"{gib(result.margin_bytes)}  margin for what is not counted (below)",
        f"{gib(result.with_margin_bytes)}  estimate with the margin",
        "",
    ]
    verdicts = [f"{c} GiB: {'fits' if result.fits(c) else 'does not fit'}" for c in CARD_SIZES_GIB]
    lines.append("By this estimate, on a card with " + "; ".join(verdicts) + ".")
    lines += ["", NOT_COUNTED]
    extra = list(notes) + result.notes
    if extra:
        lines += [""] + [f"note: {n}" for n in extra]
    lines.append(f"(counted in {result.seconds:.0f} s)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        arguments, base = arguments_from(args)
        setup, notes = setup_from_arguments(arguments, args.family, base, args.variant)
        result = estimate(setup, measure_restart=not args.no_restart)
    except VramError as err:
        print(f"aclora vram: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # OptionError from network_args
        print(f"aclora vram: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.as_dict(), "notes": list(notes) + result.notes}, indent=2))
    else:
        print(format_estimate(result, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
