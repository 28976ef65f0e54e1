"""How product mode chooses each module's rank: on a held-out loss, without one, or from an earlier run's file."""

from __future__ import annotations

from ..option import Option

CUT_RULES = ("parsimony", "beat")
FREED_SLOTS = ("hold", "relearn")

RANK_CHOICE_OPTIONS: tuple[Option, ...] = (
    Option(
        "cut_rule",
        "choice",
        "parsimony",
        "Product mode with a held-out loss: how it picks the threshold among its candidates. "
        "parsimony: the fewest components whose held-out loss is within one standard error of the best "
        "candidate's (paired item by item, or image by image when the held-out items' images are known); "
        "the file's own cut at save time must beat keeping everything by one standard error. "
        "beat: every cut must beat keeping everything by one standard error (running scores over RESTARTs; "
        "the rule before version 0.2).",
        choices=CUT_RULES,
        optional=False,
    ),
    Option(
        "freed_slots",
        "choice",
        "hold",
        "Product mode: what the slots a held-out cut frees do for the rest of the run. "
        "hold: they stay out of the forward, so the run trains at the kept rank and the next cut compares "
        "trained ranks, not cuts of a larger model. "
        "relearn: they restart like a fresh LoRA and learn again at once (the behaviour before version 0.2).",
        choices=FREED_SLOTS,
        optional=False,
    ),
    Option(
        "cut_without_heldout",
        "bool",
        False,
        "Product mode without a held-out loss: also cut at every RESTART during training, at min_importance "
        "(the behaviour before version 0.2). "
        "false: training is left alone until a held-out loss exists (nothing tells overfitting from learning: "
        "a plain LoRA at the maximum rank), and the file drops the components below min_importance at save time.",
        optional=False,
    ),
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
