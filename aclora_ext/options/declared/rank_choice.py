"""How product mode chooses each module's rank: on a held-out loss, without one, or from an earlier run's file."""

from __future__ import annotations

from ..option import Option

RANK_CHOICE_OPTIONS: tuple[Option, ...] = (
    Option(
        "ranks_from",
        "path",
        None,
        "Train at the per-module ranks of this LoRA file (its aclora_ranks, else its tensor shapes), starting "
        "fresh: the second run of the two-run recipe (a first run with a validation split chooses the ranks, "
        "this one trains on every image at them). Unlike --dim_from_weights, no weights are loaded. "
        "Modules the file lacks keep the maximum rank. Product mode or off, not paper.",
    ),
    Option(
        "min_importance",
        "float",
        0.01,
        "Product mode without a held-out loss: keep the components whose importance is at least this fraction "
        "of the largest component's in the whole network (0 keeps every component).",
        minimum=0,
        maximum=1,
        max_inclusive=False,
        optional=False,
    ),
)
