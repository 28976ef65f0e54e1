"""The sd-scripts trainers ``aclora vram`` does not count yet, told by an argument only they have, and refused
with the key, the value and what is allowed (rather than estimated as another family)."""

from __future__ import annotations

from typing import Any, Mapping

from .setup import VramError

#: {an argument only that trainer has: the trainer and its model}
NOT_COUNTED: dict[str, str] = {}


def refuse_not_counted(arguments: Mapping[str, tuple[Any, str]]) -> None:
    for key, trainer in NOT_COUNTED.items():
        raw, origin = arguments.get(key, (None, ""))
        if raw not in (None, False, "", "false"):
            raise VramError(
                f"{origin}: {key}={raw!r} is an argument of {trainer}, which aclora vram does not count yet; "
                "allowed: the arguments of train_network.py, sdxl_train_network.py, flux_train_network.py or "
                "sd3_train_network.py"
            )
