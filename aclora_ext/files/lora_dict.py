"""Reading the structure of a kohya LoRA state dict: modules, ranks, and shape checks."""

from __future__ import annotations

from typing import Mapping, Protocol

import torch

from .storage import LoRAFileError

PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


class _Factor(Protocol):
    @property
    def weight(self) -> torch.Tensor: ...


class _Layer(Protocol):
    """What ``check_shapes`` reads of a layer's module: its factors' weights (an ACLoRAModule has them)."""

    @property
    def lora_down(self) -> _Factor: ...

    @property
    def lora_up(self) -> _Factor: ...


def group_modules(weights: Mapping[str, torch.Tensor], source: str = "weights") -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_down.weight", "lora_up.weight", ["alpha"]}} of a kohya LoRA state dict.

    Raises LoRAFileError when a module has lora_down without lora_up (or the
    reverse), when factor ranks disagree, or when the file has no LoRA keys.
    Keys of other formats (e.g. LyCORIS ``hada_w1_a``) are reported by name.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in weights.items():
        for part in PARTS:
            if key.endswith("." + part):
                modules.setdefault(key[: -len(part) - 1], {})[part] = value
                break
        else:
            if not key.startswith("aclora_"):
                foreign.append(key)
    if not modules:
        raise LoRAFileError(
            f"{source}: no kohya LoRA keys (<name>.lora_down.weight / .lora_up.weight / .alpha) found"
            + (f"; it has e.g. {foreign[0]!r}" if foreign else "")
        )
    if foreign:
        raise LoRAFileError(
            f"{source}: {len(foreign)} key(s) that are not kohya LoRA keys, e.g. {foreign[0]!r}; "
            "only lora_down/lora_up/alpha are supported"
        )
    for name, parts in modules.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            has = "lora_down" if "lora_down.weight" in parts else "lora_up" if "lora_up.weight" in parts else "alpha"
            lacks = "lora_up" if has == "lora_down" else "lora_down"
            raise LoRAFileError(f"{source}: module {name} has {has} but no {lacks}")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise LoRAFileError(
                f"{source}: module {name} has lora_down {tuple(down.shape)} and lora_up "
                f"{tuple(up.shape)}, which do not multiply"
            )
        if "alpha" in parts and parts["alpha"].numel() != 1:
            raise LoRAFileError(
                f"{source}: module {name} has an alpha of shape {tuple(parts['alpha'].shape)}; expected a single number"
            )
    return modules


def module_rank(parts: Mapping[str, torch.Tensor]) -> int:
    return int(parts["lora_down.weight"].shape[0])


def module_alpha(parts: Mapping[str, torch.Tensor]) -> float:
    return float(parts["alpha"]) if "alpha" in parts else float(module_rank(parts))


def check_shapes(
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    layers: Mapping[str, _Layer],
    source: str,
    allow_smaller_rank: bool,
) -> None:
    """Every module's factors must fit its layer: in/out (and kernel) sizes, and rank <= the module's rank.

    ``layers`` maps names to ACLoRAModule-like objects (with ``lora_down``/``lora_up``).
    """
    problems = []
    for name, parts in modules.items():
        m = layers[name]
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        want_down, want_up = tuple(m.lora_down.weight.shape), tuple(m.lora_up.weight.shape)
        k = down.shape[0]
        if tuple(down.shape[1:]) != want_down[1:] or up.shape[0] != want_up[0] or tuple(up.shape[2:]) != want_up[2:]:
            problems.append(
                f"{name}: file has lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)}, "
                f"the model needs lora_down (r, {', '.join(map(str, want_down[1:]))}) / "
                f"lora_up ({want_up[0]}, r{''.join(', ' + str(s) for s in want_up[2:])})"
            )
        elif k > want_down[0] or (not allow_smaller_rank and k != want_down[0]):
            problems.append(
                f"{name}: file rank {k} does not fit this network's rank {want_down[0]} "
                "(use a network_dim at least as large, or --dim_from_weights)"
            )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LoRAFileError(
            f"{source}: {len(problems)} module(s) do not fit this model: " + "; ".join(problems[:5]) + more
        )
