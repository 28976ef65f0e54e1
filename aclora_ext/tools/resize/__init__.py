"""``aclora resize``: pick every module's rank of an existing kohya LoRA file and write the resized file.

``criteria``: how many components a module keeps; ``budget``: the ranks under ``--max-size``;
``inputs``: reading and checking the file;
``core``: the batched decomposition, the decision and the written factors (``resize_state_dict``,
``resize_file``); ``result``: what it did; ``cli``: the command.
"""

from .cli import main
from .core import resize_file, resize_state_dict, resized_metadata
from .criteria import CRITERIA, Criterion, ResizeError
from .inputs import check_kohya_lora
from .max_size import Budget
from .progress import Progress
from .result import BlockError, ModuleResize, ResizeResult, result_summary

__all__ = [
    "Budget",
    "CRITERIA",
    "Criterion",
    "ResizeError",
    "ResizeResult",
    "ModuleResize",
    "BlockError",
    "check_kohya_lora",
    "resize_state_dict",
    "resize_file",
    "resized_metadata",
    "result_summary",
    "Progress",
    "main",
]
