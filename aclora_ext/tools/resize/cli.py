"""The ``aclora resize`` command: arguments, and what it prints."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ...files.storage import LoRAFileError
from ...functional import median
from ...functional.allocation import BudgetError
from ...options import format_size
from ..inspect import _table, format_report
from ..rank_report import PART_LABELS, ReportError, read_report
from .core import DTYPES, resize_file
from .criteria import CRITERIA, DEFAULT_MIN_IMPORTANCE, ResizeError
from .result import ResizeResult, result_summary


# --- the command ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aclora resize",
        description="Pick every module's rank of an existing kohya LoRA file (SD1.x, SD2.x, SDXL; LoRA and LoCon) "
        "and write the resized file. The default criterion keeps, in every module, the components whose "
        "singular value exceeds one threshold shared by the whole file (--min-importance times the "
        "largest one); kohya resize_lora's sv_fro / sv_cumulative / sv_ratio are available with --param. "
        "--max-size sets the size of the written file instead, or as well.",
    )
    parser.add_argument("input", metavar="IN.safetensors", help="the LoRA file to resize")
    parser.add_argument(
        "output", metavar="OUT.safetensors", help="the file to write (replaced only by a complete file)"
    )
    parser.add_argument("--criterion", default=None, choices=CRITERIA, help="how ranks are chosen (default importance)")
    parser.add_argument(
        "--min-importance",
        type=float,
        default=None,
        metavar="F",
        help="importance: keep components above F x the largest singular value of the file "
        f"(default {DEFAULT_MIN_IMPORTANCE}; 0 keeps every nonzero component)",
    )
    parser.add_argument(
        "--param",
        type=float,
        default=None,
        metavar="X",
        help="sv_fro / sv_cumulative: the share of the Frobenius norm / of the sum of singular values "
        "to keep (0 < X <= 1); sv_ratio: the largest ratio to the first singular value (X > 0); "
        "resize_lora's --dynamic_param",
    )
    parser.add_argument(
        "--min-rank", type=int, default=1, metavar="N", help="importance: fewest components a module keeps (default 1)"
    )
    parser.add_argument(
        "--max-rank",
        type=int,
        default=None,
        metavar="N",
        help="largest rank of a module (default: the largest rank in the file); resize_lora's --new_rank",
    )
    parser.add_argument(
        "--max-conv-rank",
        type=int,
        default=None,
        metavar="N",
        help="largest rank of a conv module, 1x1 included (default --max-rank); resize_lora's --new_conv_rank",
    )
    parser.add_argument(
        "--max-size",
        default=None,
        metavar="SIZE",
        help="the written file, metadata included, is at most SIZE: 50MB, 1.5GB, 800KB (decimal), "
        "512MiB, 2GiB (binary) or bytes. Every module's rank is chosen so that the whole "
        "update's error is as small as the size allows. Without --criterion, --min-importance "
        "or --param only --max-rank / --max-conv-rank cap the ranks (the default importance "
        "cut does not apply); with one, its ranks are each module's maximum. A size no file "
        "can meet is refused, saying the smallest possible",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="precision of the written factors (default: the input's)"
    )
    parser.add_argument("--device", default="cpu", help="where the math runs: cpu (default), cuda, cuda:1, ...")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="always show the progress bar (default: on a terminal, for files with many modules)",
    )
    parser.add_argument("--json", action="store_true", help="print the per-module and per-block result as JSON")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``aclora resize``: 0 on success, 1 (one line on stderr, nothing written) when the file or a parameter is bad."""
    args = build_parser().parse_args(argv)
    given = {
        key: value
        for key, value in (("min_importance", args.min_importance), ("param", args.param))
        if value is not None
    }  # a criterion option given: with --max-size, its ranks are the caps
    try:
        result = resize_file(
            args.input,
            args.output,
            args.criterion,
            dtype=args.dtype,
            device=args.device,
            progress=True if args.progress else None,
            max_size=args.max_size,
            min_rank=args.min_rank,
            max_rank=args.max_rank,
            max_conv_rank=args.max_conv_rank,
            **given,
        )
    except BudgetError as err:
        print(f"aclora resize: error: --max-size {args.max_size}: {err}", file=sys.stderr)
        return 1
    except (LoRAFileError, ResizeError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"aclora resize: error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result_summary(result), indent=2))
        return 0
    print(format_summary(result, args.input, args.output))
    print()
    try:
        print(format_report(read_report(args.output)))
    except (LoRAFileError, ReportError) as err:  # the file is written; only the report failed
        print(f"aclora resize: the rank report could not be read back: {err}", file=sys.stderr)
        return 1
    print()
    print(format_block_errors(result))
    return 0


def format_summary(result: ResizeResult, source: str, target: str) -> str:
    before, after = list(result.source_ranks.values()), list(result.ranks.values())
    lines = [
        f"resized {source} -> {target} in {result.seconds:.2f} s with {result.describe()}"
        + (
            f" (threshold {result.threshold:.4g} = {result.criterion.min_importance:g} x the largest singular "
            f"value {result.top:.4g})"
            if result.threshold is not None
            else ""
        ),
        f"  {len(after)} modules, ranks min/median/max {min(before)}/{median(before):g}/{max(before)} -> "
        f"{min(after)}/{median(after):g}/{max(after)}; one alpha {result.alpha:g}, {result.dtype}",
        f"  relative error of the whole update ||dW - dW'||_F / ||dW||_F (all modules together): {result.error:.4g}",
    ]
    budget = result.budget
    if budget is not None:
        caps = "the criterion's ranks" if budget.criterion_caps else "--max-rank / --max-conv-rank"
        optimum = "an optimum" if budget.exact else f"within {budget.gap:.2g} of the optimum's kept energy"
        lines.append(
            f"  file {format_size(budget.size)}, at most {format_size(budget.max_size)} (--max-size; "
            f"caps: {caps}; ranks {optimum}, chosen in {budget.seconds:.2f} s)"
        )
    return "\n".join(lines)


def format_block_errors(result: ResizeResult) -> str:
    """Per block: ranks before and after, and the relative Frobenius error of the resized updates."""
    rows = [
        [
            PART_LABELS[b.part],
            b.block,
            str(b.modules),
            "{}/{:g}/{}".format(*b.ranks_before),
            "{}/{:g}/{}".format(*b.ranks_after),
            f"{b.error:.3g}",
            f"{b.error_max:.3g}",
        ]
        for b in result.blocks()
    ]
    header = ["part", "block", "modules", "ranks before", "ranks after", "rel. error", "max module error"]
    return "\n".join(
        [
            "relative error of the resized updates per block, ||dW - dW'||_F / ||dW||_F "
            "(all of the block's modules together)",
            *_table(header, rows, (0, 1)),
        ]
    )
