"""When a RESTART runs, in which mode, and what it keeps of each module; the seed of its noise."""

from __future__ import annotations

from ..option import Option

RESTART_MODES = ("paper", "product", "off")
ENERGY_RULES = ("squared", "linear")

RESTART_OPTIONS: tuple[Option, ...] = (
    Option(
        "restart_mode",
        "choice",
        "product",
        "product: decide on each module's update up*down: keep the components whose importance (the RMS they add "
        "to the layer's output) clears one threshold shared by every module, chosen on a held-out loss when the "
        "training loop gives one (sd-scripts' --validation_split), else only at save time at min_importance; "
        "truncate exactly, and train at the kept rank after a held-out cut. "
        "paper: the paper's algorithm exactly (SVD of each factor, p = 1 - L^alpha from the training loss, "
        "Gaussian refill). "
        "off: never restart (a plain LoRA at the maximum rank).",
        choices=RESTART_MODES,
        optional=False,
    ),
    Option(
        "restart_every",
        "int",
        None,
        "Epochs between RESTARTs. Unset: a tenth of the run (at least 1), as in the paper (every 10 of 100 epochs).",
        minimum=1,
    ),
    Option(
        "restart_every_steps",
        "int",
        None,
        "Optimizer steps between RESTARTs, for runs counted in steps or with few epochs. Replaces restart_every.",
        minimum=1,
    ),
    Option(
        "energy",
        "choice",
        "squared",
        "What the threshold p is a fraction of: squared = cumulative energy of squared singular values; "
        "linear = cumulative sum of singular values.",
        choices=ENERGY_RULES,
        optional=False,
    ),
    Option(
        "min_rank",
        "int",
        1,
        "Fewest components a module keeps at a RESTART.",
        minimum=1,
        optional=False,
    ),
    Option(
        "fixed_p",
        "float",
        None,
        "Keep, in every module, the leading components carrying this share p of the energy at every RESTART "
        "(paper mode: instead of p = 1 - L^alpha, also what makes a RESTART run when no loss was captured; "
        "product mode: of the update's spectrum, instead of the importance threshold).",
        minimum=0,
        maximum=1,
        min_inclusive=False,
    ),
)

#: a RESTART option, listed in the table after the rank search's (its place since version 0.1)
SEED = Option(
    "seed",
    "int",
    0,
    "Seed of the RESTART noise (shared by all processes, so every GPU draws the same noise).",
    minimum=0,
    optional=False,
)
