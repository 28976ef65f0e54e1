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
    Option(
        "holdout",
        "float",
        None,
        "Product mode without a validation split: hold out this share of the images (recognised by their cached "
        "latents; needs --cache_latents) until holdout_until of the run, choose the ranks on their loss, then "
        "train on them too. Their items add nothing to the update while held; sd-scripts' logged loss keeps "
        "them. Unset: no split of the network's own (ranks without a held-out loss, see min_importance).",
        minimum=0,
        maximum=0.5,
        min_inclusive=False,
    ),
    Option(
        "holdout_until",
        "float",
        0.7,
        "With holdout: the fraction of the run after which the held images train again and the ranks stay as "
        "last chosen.",
        minimum=0,
        maximum=1,
        min_inclusive=False,
        optional=False,
    ),
)
