"""The network's own held-out split, when the user gave none (``holdout=``, ``holdout_until=``; docs/training.md).

A share of the training images (by identity, ``training_items``) adds nothing to the update until
``holdout_until`` of the run; the rank search judges its cuts on them, replaying their recorded training
calls (the denoiser's inputs and target, as ``heldout`` records sd-scripts' validation pass); then they train
again. Everything in the step is decided on the device:

- **which items are held**: before the identities are first resolved (the first epoch), a deterministic rule
  on each item's fingerprint (``held_by_rule``); afterwards a lookup of the fingerprint in a table of every
  known cached view (unknown views: held). An image is held only if *every* view of it the rule saw was held,
  so no view of a held image was trained; the others train from then on (their rule-held items of the first
  epoch were lost to training, not leaked).
- **the loss**: sd-scripts' per-element loss keeps its value (what it logs) and its gradient is that of the
  mean over the batch's trained items (``masked_loss``): a batch mixing held and trained items updates as a
  batch of its trained items alone; a batch of held items only gives a zero gradient.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..families.base import Prediction
from ..options import OptionError
from .held_calls import HeldCalls
from .heldout import SdScriptsValidation, _install_function_wrapper, _install_loss_wrapper
from .identities import Recogniser, _mix, _shift_right, _signed

logger = logging.getLogger(__name__)

#: the layout of the ``aclora_holdout`` buffer (``Holdout.state``)
STATE_FORMAT = 1
#: the rule holds each view with this many times the share, so that enough images qualify (every view held)
RULE_MARGIN = 1.5


def held_by_rule(keys: torch.Tensor, share: float, seed: int = 0) -> torch.Tensor:
    """Whether each key (an item's fingerprint, or a loop's image id) is held by the first-epoch rule: its
    hash, mixed with ``seed``, read as a number in [0, 1), is below ``share`` (bool, on the keys' device)."""
    mixed = _mix(keys.to(torch.int64) ^ _signed(0x5851F42D4C957F2D * (seed + 1)))
    return (_shift_right(mixed, 11).double() / float(1 << 53)) < share


def masked_loss(loss: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """``loss`` (per item along dim 0) with its value kept and its gradient that of the mean over the items
    where ``trained`` is 1, as a share of the mean over all (no host read)."""
    weights = trained.to(loss.dtype) * (trained.shape[0] / trained.sum().clamp_min(1)).to(loss.dtype)
    weighted = loss * weights.view(-1, *([1] * (loss.dim() - 1)))
    return loss.detach() + (weighted - weighted.detach())


class Holdout:
    """Which items are held, and when (see the module docstring).

    ``share``: of the images; ``until``: the fraction of the run after which every image trains;
    ``flip``: the trainer draws two cached views of an image (``flip_aug``); ``progress()``: the fraction
    of the run done; ``training()``: whether the network trains now.
    """

    def __init__(
        self,
        share: float,
        until: float,
        progress: Callable[[], float],
        training: Callable[[], bool],
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.share = float(share)
        self.until = float(until)
        self.seed = int(seed)
        base = min(1.0, RULE_MARGIN * self.share)
        self.view_share = math.sqrt(base) if flip else base
        self._progress = progress
        self._training = training
        self.decided: dict[int, bool] = {}  # image -> held
        self._rule_era = True  # no identities resolved yet
        self._table: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # sorted known views, 1.0 trained / 0.0 held
        self._trained: Optional[torch.Tensor] = None  # the current batch's (device), until its loss
        self.fingerprints: Optional[torch.Tensor] = None  # the current batch's
        self.shape: tuple = ()  # the current batch's latent shape (one item)
        self.device: Optional[torch.device] = None
        self._warned = False
        self._released = False  # the line that the held images train again was logged

    @property
    def active(self) -> bool:
        """While the held images are held (before ``until`` of the run)."""
        return self._progress() < self.until

    @property
    def held(self) -> set[int]:
        return {image for image, held in self.decided.items() if held}

    # --- in the step (device only) --------------------------------------------------------------
    def trained(self, fingerprints: torch.Tensor) -> torch.Tensor:
        """1.0 for each item that trains now, 0.0 for a held one (float32, on the device)."""
        if self._table is None:
            return (~held_by_rule(fingerprints, self.view_share, self.seed)).float()
        keys, trained = self._table
        index = torch.searchsorted(keys, fingerprints).clamp_max(keys.shape[0] - 1)
        return torch.where(keys[index] == fingerprints, trained[index], torch.zeros_like(trained[index]))

    def observe(self, fingerprints: torch.Tensor, shape: tuple) -> None:
        """A training batch's fingerprints and latent shape (before its denoiser call): which items train."""
        self.fingerprints, self.shape = fingerprints, shape
        self.device = fingerprints.device
        active = self.active
        self._trained = self.trained(fingerprints) if active else None
        if not active and not self._released:
            self._released = True
            logger.info(
                "AC-LoRA: holdout: the %d held image(s) train again from %.0f%% of the run (holdout_until=%g)",
                len(self.held),
                100.0 * self._progress(),
                self.until,
            )

    def adjust_loss(self, loss: Any) -> Any:
        """sd-scripts' per-element training loss of the batch just observed, its held items masked."""
        trained, self._trained = self._trained, None
        if trained is None or not self._training() or not isinstance(loss, torch.Tensor):
            return loss
        if loss.dim() == 0 or loss.shape[0] != trained.shape[0]:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "AC-LoRA: holdout: the trainer's loss has shape %s, not one row per item of its %d latents; "
                    "its items are not held (the held images train)",
                    tuple(loss.shape),
                    trained.shape[0],
                )
            return loss
        return masked_loss(loss, trained.to(loss.device))

    # --- outside the step (host) ----------------------------------------------------------------
    def resolve(self, known: dict[tuple, int]) -> None:
        """The identities were resolved (``known``: (shape, fingerprint) -> image, every cached view so far):
        decide the images not decided yet and rebuild the device table."""
        views: dict[int, list[int]] = {}
        for (_, fp), image in known.items():
            views.setdefault(image, []).append(fp)
        new = [image for image in sorted(views) if image not in self.decided]
        if not new:
            return
        if self._rule_era:  # every view seen so far was held by the rule or trained
            rule = {fp: bool(h) for fp, h in zip(*self._rule(views))}
            eligible = [image for image in new if all(rule[fp] for fp in views[image])]
        else:  # views first seen after the first resolution were held (unknown)
            eligible = new
        total = len(views)
        target = min(max(round(self.share * total), 1 if total >= 2 else 0), total - 1)
        room = max(target - len(self.held), 0)
        order = sorted(eligible, key=lambda image: min(views[image]))  # the hashes: a fixed, arbitrary order
        chosen = set(order[:room])
        for image in new:
            self.decided[image] = image in chosen
        first, self._rule_era = self._rule_era, False
        self._build_table(known)
        if first and self.held:
            logger.info(
                "AC-LoRA: holdout: %d of %d images held out until %.0f%% of the run; the rank search judges on them",
                len(self.held),
                total,
                100 * self.until,
            )
        elif first:
            logger.warning(
                "AC-LoRA: holdout: none of %d images could be held out (an image qualifies when every view of it "
                "the first epoch drew was held by the rule; try another seed= or a larger holdout); the rank "
                "search has no held-out loss",
                total,
            )

    def _build_table(self, known: dict[tuple, int]) -> None:
        """The device table of every known view: its fingerprint, sorted, and 1.0 trained / 0.0 held."""
        keys = sorted((fp, 0.0 if self.decided.get(image, True) else 1.0) for (_, fp), image in known.items())
        device = self.device or torch.device("cpu")
        self._table = (
            torch.tensor([k for k, _ in keys], dtype=torch.int64, device=device),
            torch.tensor([t for _, t in keys], dtype=torch.float32, device=device),
        )

    # --- the resumable state (``aclora_holdout``, network/state.py) ---------------------------------
    def state(self, recogniser: Optional[Recogniser]) -> torch.Tensor:
        """The held set and what decides it, as one int64 tensor (at a save, on the host): whether the first
        resolution happened, every decided image (held or not), then the identities (``recogniser``)."""
        out = [STATE_FORMAT, int(not self._rule_era), len(self.decided)]
        for image, held in sorted(self.decided.items()):
            out += [image, int(held)]
        out += [1, *recogniser.state()] if recogniser is not None else [0]
        return torch.tensor(out, dtype=torch.int64)

    def load_state(self, values: torch.Tensor, recogniser: Optional[Recogniser], device: torch.device) -> None:
        """Restore what :meth:`state` wrote; the device table is rebuilt on ``device`` (the network's)."""
        it = iter(values.cpu().tolist())
        found = next(it)
        if found != STATE_FORMAT:
            raise ValueError(f"aclora_holdout: format {found}; allowed: {STATE_FORMAT} (a state saved by this version)")
        self._rule_era = not next(it)
        self.decided = {}
        for _ in range(next(it)):
            image, held = next(it), next(it)
            self.decided[image] = bool(held)
        if next(it) and recogniser is not None:
            recogniser.load_state(it)
        self.device = device
        self._table = None
        if not self._rule_era and recogniser is not None:
            self._build_table(recogniser.known)

    def _rule(self, views: dict[int, list[int]]) -> tuple[list[int], list[bool]]:
        fps = [fp for fps in views.values() for fp in fps]
        return fps, held_by_rule(torch.tensor(fps, dtype=torch.int64), self.view_share, self.seed).tolist()

    def held_images(self, known: dict[tuple, int], shape: tuple, fingerprints: list[int]) -> list[Optional[int]]:
        """The image of each item when it is held (None: trained or unknown)."""
        images = [known.get((shape, fp)) for fp in fingerprints]
        return [image if image is not None and self.decided.get(image, False) else None for image in images]


def loop_trained(holdout: Holdout, ids: Any, device: torch.device) -> torch.Tensor:
    """A loop of one's own: 1.0 for each id that trains now, 0.0 for a held one (the rule on the ids)."""
    if isinstance(ids, torch.Tensor):
        keys = ids.to(device=device, dtype=torch.int64)
    else:
        try:
            keys = torch.tensor([int(i) for i in ids], dtype=torch.int64, device=device)
        except (TypeError, ValueError):
            raise ValueError(f"ids={ids!r}; allowed with holdout: integer image ids, one per item") from None
    if not holdout.active:
        return torch.ones(keys.shape, device=device)
    return (~held_by_rule(keys, holdout.share, holdout.seed)).float()


def start(
    config: Any,
    rank_search: Any,
    items: Any,
    unet: Optional[nn.Module],
    args: Any,
    progress: Callable[[], float],
    training: Callable[[], bool],
    prediction: Optional[Prediction] = None,
) -> Optional[Holdout]:
    """The network's own split (``config.holdout``), or None: not asked for, or a held-out loss is given (sd-scripts'
    ``--validation_split``, or the loop's ``set_validation``). Under sd-scripts (``args``) it needs cached latents."""
    if config.holdout is None:
        return None
    split = getattr(args, "validation_split", None)
    given = rank_search.loss_fn is not None and not isinstance(rank_search.loss_fn, SdScriptsValidation)
    if given or (isinstance(split, (int, float)) and split > 0):
        logger.info("AC-LoRA: holdout=%s is not used: a validation split is given", config.holdout)
        return None
    holdout = Holdout(
        config.holdout, config.holdout_until, progress, training, bool(getattr(args, "flip_aug", False)), config.seed
    )
    if args is None:
        return holdout  # a loop of one's own (item_loss)
    if not (getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)):
        raise OptionError(
            f"network_args: holdout={config.holdout} needs --cache_latents (or --cache_latents_to_disk): the held "
            "images are recognised by their cached latents; allowed: add it, or remove holdout"
        )
    original = _install_loss_wrapper()
    if unet is None or original is None or items.recogniser is None:
        logger.warning("AC-LoRA: holdout: sd-scripts' loss or latents are not in reach; nothing is held out")
        return None
    for module_name, name in prediction.functions if prediction else ():
        _install_function_wrapper(module_name, name)
    calls = HeldCalls(holdout, lambda: training() and rank_search.recording, unet, original, prediction)
    calls.resolve_items = items.resolve

    def resolved(known: dict) -> None:
        holdout.resolve(known)
        calls.sort(known)

    items.on_batch, items.on_resolved = holdout.observe, resolved
    if isinstance(rank_search.loss_fn, SdScriptsValidation):
        rank_search.loss_fn.remove()  # no validation pass comes
    rank_search.set_validation(calls, config.holdout_until)
    return holdout
