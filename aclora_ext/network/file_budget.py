"""``max_file_size``: every file a run saves is at most this size, metadata included.

At a save the run has already decided which components each module keeps: the rank search's
choice (product mode), the last RESTART's signal rank (paper mode), every component
(``restart_mode=off``). Those are the candidates, and the budget keeps, across the whole network, the
candidates of largest worth per byte (``files.fit.fit_ranks``; an optimum, ``functional.allocation``), so
a budget only ever cuts further. Worth, comparable across modules: in product mode a component's
importance squared (what the rank search ranks by: the RMS it adds to its layer's output, relative
to that output); in paper mode and ``restart_mode=off`` its squared singular value in the scaled
update alpha/R * up @ down. Cost: a row of lora_down and a column of lora_up in the saved dtype. The
metadata is sized as ``save_weights`` writes it, through the function it writes it with.

The ``save_full_rank`` companion file is not budgeted: it exists to continue training at rank R.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import functional as F
from ..files.fit import FileFit, fit_ranks
from ..files.sizes import FileLayout, ModuleLayout, layout_tensors, saved_file_size
from ..lora.module import ACLoRAModule
from ..lora.product_restart import Spectrum, analyse_modules
from ..options import OptionError, format_size

Keep = int | torch.Tensor  # a module's rank (its leading components) or a bool mask over its update's components
#: (ranks, truncation errors) -> the metadata the file will carry
MetadataOf = Callable[[dict[str, int], dict[str, float]], dict[str, str]]


@dataclass
class Candidates:
    """Per module: which of its update's components (SVD order) may be kept, their worth, the spectrum."""

    masks: list[torch.Tensor]  # (R,) bool
    worths: list[torch.Tensor]  # worth of each candidate, in component order (float64)
    spectra: list[torch.Tensor]  # (R,) singular values of the scaled update

    def keeps(self, modules: Sequence[ACLoRAModule], ranks: Sequence[int]) -> list[Keep]:
        """Each module's ``ranks[i]`` candidates of largest worth (ties: component order), as export takes
        them: a mask, or the module's rank when it keeps everything (then the file is its factors as they are)."""
        out: list[Keep] = []
        for m, mask, worth, k in zip(modules, self.masks, self.worths, ranks):
            chosen = mask.nonzero()[:, 0][torch.sort(worth, descending=True, stable=True).indices[:k]]
            keep = torch.zeros_like(mask)
            keep[chosen] = True
            out.append(m.rank if bool(keep.all()) else keep)
        return out

    def errors(self, modules: Sequence[ACLoRAModule], keeps: Sequence[Keep]) -> dict[str, float]:
        """Relative truncation error of every module (export's ``errors``), batched by rank; {} when every
        module keeps everything (then save writes the training factors and no error)."""
        if all(isinstance(k, int) and k == m.rank for m, k in zip(modules, keeps)):
            return {}
        by_rank: dict[int, list[int]] = {}
        for i, m in enumerate(modules):
            by_rank.setdefault(m.rank, []).append(i)
        errors: dict[str, float] = {}
        for rank, members in by_rank.items():
            s = torch.stack([self.spectra[i] for i in members])
            keep = torch.stack(
                [
                    F.as_keep(torch.tensor([k]), rank)[0] if isinstance(k, int) else k
                    for k in (keeps[i] for i in members)
                ]
            )
            errors.update(zip((modules[i].lora_name for i in members), F.truncation_error(s, keep).tolist()))
        return errors


def candidates(
    modules: Sequence[ACLoRAModule],
    keeps: Sequence[Keep],
    product_spectra: Optional[dict[int, Spectrum]],
) -> Candidates:
    """The candidates of every module: ``keeps`` are the run's decision; ``product_spectra`` the rank
    search's analysis of this save (product mode: worth = importance squared), or None (paper mode,
    ``restart_mode=off``: the updates are analysed here, worth = squared singular value)."""
    spectra = product_spectra
    if spectra is None:
        spectra, _ = analyse_modules(modules, {}, rebase=False)
    missing = [m.lora_name for i, m in enumerate(modules) if i not in spectra]
    if missing:
        raise ValueError(
            f"max_file_size: the update of {len(missing)} module(s) could not be decomposed (non-finite "
            f"weights?), e.g. {missing[0]}"
        )
    masks, worths, values = [], [], []
    for i, (m, keep) in enumerate(zip(modules, keeps)):
        mask = F.as_keep(torch.tensor([keep]), m.rank)[0] if isinstance(keep, int) else keep.cpu().bool()
        score = spectra[i].importance if product_spectra is not None else spectra[i].s
        masks.append(mask)
        worths.append(score.double()[mask].square())
        values.append(spectra[i].s.float())
    return Candidates(masks, worths, values)


def layouts(modules: Sequence[ACLoRAModule], dtype: Optional[torch.dtype]) -> list[ModuleLayout]:
    """The tensors every module writes (export and raw_modules: the saved dtype, else the module's)."""
    return [
        ModuleLayout(
            m.lora_name,
            int(m.lora_down.weight.shape[1]),
            m.out_dim,
            tuple(int(d) for d in m.lora_down.weight.shape[2:]),
            dtype or m.lora_down.weight.dtype,
        )
        for m in modules
    ]


def fit_keeps(
    modules: Sequence[ACLoRAModule],
    found: Candidates,
    max_size: int,
    min_rank: int,
    dtype: Optional[torch.dtype],
    metadata_of: MetadataOf,
) -> tuple[list[Keep], dict[str, float], FileFit]:
    """The keeps of a file of at most ``max_size`` bytes, the truncation errors its metadata carries, and
    the fit. Raises ``F.allocation.BudgetError`` (with ``smallest``) when no file fits."""

    def metadata(ranks: dict[str, int]) -> dict[str, str]:
        keeps = found.keeps(modules, [ranks[m.lora_name] for m in modules])
        return metadata_of({m.lora_name: int(ranks[m.lora_name]) for m in modules}, found.errors(modules, keeps))

    counts = [int(mask.sum()) for mask in found.masks]
    fit = fit_ranks(
        FileLayout(layouts(modules, dtype), metadata),
        found.worths,
        max_size,
        min_ranks=[min(min_rank, c) for c in counts],
        max_ranks=counts,
    )
    keeps = found.keeps(modules, [fit.ranks[m.lora_name] for m in modules])
    return keeps, found.errors(modules, keeps), fit


def smallest_bound(modules: Sequence[ACLoRAModule], min_rank: int, element_bytes: int) -> int:
    """A lower bound on the smallest file the network can save: every module at ``min_rank``, weights of
    ``element_bytes`` each, and of the metadata only what grows with the modules (their names and ranks);
    sd-scripts' ss_* keys and the rest of ours come on top."""
    dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[element_bytes]
    ranks = {m.lora_name: min(min_rank, m.rank) for m in modules}
    metadata = {
        "aclora_ranks": json.dumps(ranks, separators=(",", ":")),
        "aclora_modules": json.dumps(list(ranks), separators=(",", ":")),
    }
    return saved_file_size(layout_tensors(layouts(modules, dtype), list(ranks.values())), metadata)


def check_possible(
    modules: Sequence[ACLoRAModule], max_size: Optional[int], min_rank: int, save_precision: Optional[str]
) -> None:
    """Stop a run at start-up whose max_file_size no file can meet (OptionError naming the key and value).

    The bound counts weights of the saved precision when sd-scripts says it (``--save_precision``), else
    of 2 bytes (the smallest sd-scripts saves), so a budget some save could meet is never refused here.
    """
    if max_size is None or not modules:
        return
    element_bytes = 4 if save_precision == "float" else 2
    bound = smallest_bound(modules, min_rank, element_bytes)
    if bound > max_size:
        raise OptionError(
            f"network_args: max_file_size={format_size(max_size)} is too small: the smallest file this "
            f"network can save ({len(modules)} modules at min_rank={min_rank}, {element_bytes}-byte "
            f"weights, before sd-scripts' metadata) is at least {format_size(bound)}; allowed: a size of "
            f"at least that, or fewer modules (e.g. --network_train_unet_only)"
        )


__all__ = ["Candidates", "candidates", "layouts", "fit_keeps", "smallest_bound", "check_possible"]
