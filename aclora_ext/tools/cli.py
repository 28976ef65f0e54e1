"""The ``aclora`` command.

``aclora inspect FILE [--json] [--plot OUT.png] [--no-curve]``: the rank report
of a LoRA file (AC-LoRA or plain kohya) and its size/quality curve. ``aclora demo [...]``: a tiny end-to-end run on
synthetic data that ends with that report (see ``aclora demo --help``).
``aclora vram [...]``: the peak GPU memory of a training set-up, estimated on
the meta device from an sd-scripts config or its arguments (``aclora vram --help``).
``aclora resize IN OUT [...]``: pick the ranks of an existing LoRA file
(``aclora resize --help``).
``aclora options``: every ``--network_args`` option with its default and range.
A file that cannot be read gives one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..options import markdown_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aclora", description="AC-LoRA (Auto Component LoRA) tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="rank report of a LoRA file",
        description="Per-block ranks (min/median/max), parameter count and file size against the same LoRA at its "
        "maximum rank, and the RESTART history of a LoRA file. Plain kohya LoRA files work too. Then "
        "the size/quality curve: the relative error of the whole update of the file `aclora resize "
        "--max-size` writes at 10%%, 25%%, 50%% and 75%% of this file's size.",
    )
    inspect.add_argument("file", metavar="FILE", help="a LoRA file (.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    inspect.add_argument(
        "--plot",
        metavar="OUT.png",
        help="also draw ranks per module and over RESTARTs, and the size/quality curve beside them, "
        "to this image (needs matplotlib)",
    )
    inspect.add_argument(
        "--no-curve",
        action="store_true",
        help="skip the size/quality curve (it analyses every module: seconds for an SDXL file)",
    )
    commands.add_parser("options", help="list every --network_args option (a Markdown table, as in the README)")
    commands.add_parser(
        "demo",
        add_help=False,
        help="train a tiny AC-LoRA on synthetic data and show its rank report (aclora demo --help)",
    )
    commands.add_parser(
        "resize",
        add_help=False,
        help="pick the ranks of an existing LoRA file and write the resized file (aclora resize --help)",
    )
    commands.add_parser(
        "vram",
        add_help=False,
        help="estimate the peak GPU memory of a training set-up, without a GPU (aclora vram --help)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from . import demo  # heavy (diffusers, transformers): only when asked for

        return demo.main(argv[1:])
    if argv[:1] == ["resize"]:
        from . import resize

        return resize.main(argv[1:])
    if argv[:1] == ["vram"]:
        from . import vram  # builds the models with diffusers and transformers: only when asked for

        return vram.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "options":
            print(markdown_table())
            return 0
        from . import inspect
        from .resize.curve import PLOT_SHARES, TABLE_SHARES, size_curve

        shares = TABLE_SHARES + (PLOT_SHARES if args.plot else ())
        return inspect.run(
            args.file,
            as_json=args.json,
            plot_to=args.plot,
            curve=None if args.no_curve else (lambda path: size_curve(path, shares, bool(args.plot))),
        )
    except BrokenPipeError:  # `aclora inspect FILE | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
