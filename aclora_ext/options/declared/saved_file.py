"""What is written beside the normal file, and the most bytes every saved file may take."""

from __future__ import annotations

from ..option import Option

SAVED_FILE_OPTIONS: tuple[Option, ...] = (
    Option(
        "save_full_rank",
        "bool",
        False,
        "Also write '<name>-fullrank.safetensors' beside every saved file: the raw training factors at the "
        "maximum rank, for continuing a run. The normal file is always the variable-rank export.",
        optional=False,
    ),
    Option(
        "max_file_size",
        "size",
        None,
        "Every saved file (each save_weights, the final one included) is at most this size, metadata included: "
        "the ranks the run decided are the caps, and the components worth the least per byte go first. "
        "A budget no file can meet refuses the save (the previous file is kept). "
        "The save_full_rank file is not budgeted.",
    ),
)
