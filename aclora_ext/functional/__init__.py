"""The AC-LoRA weight math as pure batched tensor functions: tensors in, tensors out, no modules, no I/O.

- ``paper``: the paper's RESTART (§3.2-3.4): threshold p, signal rank, factor SVD, truncation, refill.
- ``product``: the product mode: an update's components from the R x R core, their importance, the
  RESTART of freed slots.
- ``levels``: the product mode's candidate thresholds and how a held-out loss scores them.
- ``resize_rules``: kohya resize_lora.py's rank rules, batched.
- ``batching``: chunk sizes, finiteness checks.
- ``allocation``: ranks under a byte budget (a knapsack over every module's components), as ``F.allocation``.

Everything else is re-exported here, so ``from aclora_ext import functional as F; F.product_core(...)`` works.
"""

from . import allocation, batching, levels, paper, product, resize_rules
from .batching import *  # noqa: F401,F403
from .levels import *  # noqa: F401,F403
from .paper import *  # noqa: F401,F403
from .product import *  # noqa: F401,F403
from .resize_rules import *  # noqa: F401,F403

__all__ = ["allocation", *paper.__all__, *product.__all__, *levels.__all__, *resize_rules.__all__, *batching.__all__]
