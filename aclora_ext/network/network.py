"""The AC-LoRA network: kohya's network-module contract plus RESTART.

sd-scripts calls, in order: ``create_network`` → ``prepare_network(args)`` → ``apply_to`` → ``load_weights``
(optional) → ``prepare_optimizer_params`` → ``prepare_grad_etc`` → per epoch ``on_epoch_start`` → per
micro-batch ``on_step_start`` → ``save_weights``. RESTARTs run from the two hooks, between epochs (every
``restart_every`` epochs) or between optimizer steps (``restart_every_steps``). What a RESTART does is in
``restart_runner``, the files in ``saving``, the resumable state in ``state``: the network passes each what it needs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..families.base import CleanLatents, Prediction, Target
from ..files.storage import LoRAFileError
from ..lora.module import ACLoRAModule
from ..lora.norms import apply_max_norm
from ..lora.report import RestartReport
from ..options import ACLoRAConfig
from ..ranksearch import holdout
from ..ranksearch.rank_search import RankSearch
from ..ranksearch.training_items import TrainingItems
from . import file_budget, optimizer_groups, restart_runner, saving, schedule, state
from .saving import Export, LoadInfo, RunRecord

logger = logging.getLogger(__name__)


class ACLoRANetwork(nn.Module):
    """LoRA modules on a set of layers, with per-module signal ranks decided by RESTART."""

    def __init__(
        self,
        targets: Sequence[Target],
        ranks: dict[str, int],
        alphas: dict[str, float],
        multiplier: float = 1.0,
        config: Optional[ACLoRAConfig] = None,
        is_sdxl: bool = False,
        signal_ranks: Optional[dict[str, int]] = None,
        train_t5xxl: bool = False,
        prediction: Optional[Prediction] = None,
        model: Optional[str] = None,
        clean_latents: Optional[CleanLatents] = None,
    ) -> None:
        """``train_t5xxl``: whether it has T5-XXL modules (FLUX.1/SD3 trainers read it); ``prediction``:
        how the model family's trainer makes its prediction from the denoiser's output (held-out replay);
        ``model``: the model family as logs and the file's ``aclora_model`` name it; ``clean_latents``: where
        it hands over a training batch's clean latents (training items' identities)."""
        super().__init__()
        config = ACLoRAConfig() if config is None else config
        if not targets:
            raise ValueError("AC-LoRA: the model has no layers to adapt (no Linear/Conv2d inside the target blocks)")
        self.config = config
        self.multiplier = multiplier
        self.is_sdxl = is_sdxl
        self.model = model
        self.train_t5xxl = train_t5xxl  # read unguarded by flux_train_network.py and sd3_train_network.py
        self._prediction = prediction
        self._clean_latents = clean_latents
        self.items = TrainingItems(lambda: self.training)  # which image each training item is
        self.holdout: Optional[holdout.Holdout] = None  # the network's own split (network_args holdout=)
        self.text_encoder_loras: list[ACLoRAModule] = []
        self.unet_loras: list[ACLoRAModule] = []
        for t in targets:
            m = ACLoRAModule(
                t.lora_name,
                t.layer,
                ranks[t.lora_name],
                alphas[t.lora_name],
                multiplier,
                config.dropout,
                config.rank_dropout,
                config.module_dropout,
            )
            (self.text_encoder_loras if t.is_text_encoder else self.unet_loras).append(m)
            self.add_module(t.lora_name, m)
        self._targets = {t.lora_name: t for t in targets}  # parts and network_reg_lrs' learning rates
        self.clock = schedule.Clock()
        self.length = schedule.TrainingLength()
        self.loss_meter = schedule.LossMeter()
        self._args: Any = None
        self._accelerator: Optional[weakref.ref] = None
        self.warnings = schedule.OnceWarnings(logger)
        self._signal = {m.lora_name: m.rank for m in self.loras}
        if signal_ranks:
            self._signal.update({k: min(v, self._module(k).rank) for k, v in signal_ranks.items() if k in self._signal})
        self.history: list[RestartReport] = []  # the RESTARTs that ran (applied), oldest first
        self.rank_search = RankSearch(config, warn_once=self.warnings.warn)
        self.rank_search.watch(self.loras)
        self._register_state()

    # --- bookkeeping --------------------------------------------------------------
    @property
    def loras(self) -> list[ACLoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.loras)

    def _module(self, name: str) -> ACLoRAModule:
        return self._modules[name]  # type: ignore[return-value]

    def _register_state(self) -> None:
        state.register_buffers(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 - torch hook
        state.write_buffers(self)
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            state.clear_transient(self)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: D401 - torch hook
        variable = state.upgrade(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        state.read_buffers(self, state_dict, prefix, variable)

    # --- kohya contract: set-up ---------------------------------------------------------
    def prepare_network(self, args: Any) -> None:
        """Keep sd-scripts' args (the run length is final only before the loop, so read later)."""
        self._args = args
        schedule.listen(self)

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        if not self.loras:
            raise ValueError("AC-LoRA: apply_to left no modules (neither the text encoder nor the U-Net is trained)")
        file_budget.check_possible(
            self.loras, self.config.max_file_size, self.config.min_rank, getattr(self._args, "save_precision", None)
        )  # a hopeless max_file_size stops here
        for m in self.loras:
            m.apply_to()
        if self.config.ranks_from is not None:
            self.train_at_ranks(saving.file_ranks(self.config.ranks_from))
        self._register_state()
        schedule.listen(self)
        split = getattr(self._args, "validation_split", None)
        self.rank_search.record_sd_scripts_validation(
            unet, expected=isinstance(split, (int, float)) and split > 0, prediction=self._prediction
        )
        self.items.watch(self._clean_latents, self._args)
        self.holdout = holdout.start(self.config, self.rank_search, self.items, unet, self._args, self._progress,
                                     lambda: self.training, self._prediction)  # fmt: skip
        logger.info(
            "AC-LoRA: %d text-encoder and %d U-Net modules, maximum rank %d, restart_mode=%s",
            len(self.text_encoder_loras),
            len(self.unet_loras),
            self.max_rank,
            self.config.restart_mode,
        )

    def _drop(self, modules: Sequence[ACLoRAModule]) -> None:
        for m in modules:
            m.remove()
            delattr(self, m.lora_name)
            self._signal.pop(m.lora_name, None)
        self.rank_search.forget(modules)

    def remove_from(self) -> None:
        """Give every adapted layer its own forward back (undo ``apply_to``)."""
        for m in self.loras:
            m.remove()
        self.rank_search.forget(self.loras, validation=True)
        self.items.remove()
        schedule.forget(self)

    def train(self, mode: bool = True) -> "ACLoRANetwork":
        """nn.Module.train; back to training after sd-scripts' validation pass also ends its recording."""
        super().train(mode)
        if hasattr(self, "rank_search"):
            self.rank_search.set_mode(mode)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA modules run inside the checkpointed blocks."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def get_trainable_params(self):
        return self.parameters()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for m in self.loras:
            m.multiplier = multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for m in self.loras:
            m.enabled = is_enabled

    def is_mergeable(self) -> bool:
        return True

    # --- optimizer groups ----------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """Param groups per part (each text encoder, U-Net), LoRA+ groups for lora_up.

        ``text_encoder_lr`` may be a number, None, or a list (one per text
        encoder; a single value applies to both). Returns ``(groups, descriptions)``.
        """
        self.requires_grad_(True)
        return optimizer_groups.param_groups(
            self.text_encoder_loras, self.unet_loras, self._targets, self.config, text_encoder_lr, unet_lr, default_lr
        )

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    # --- the product mode's held-out loss ----------------------------------------------------
    def set_validation(
        self, loss_fn: Optional[Callable[[], Any]], until: Optional[float] = None, groups: Optional[Any] = None
    ) -> None:
        """Give the product mode a held-out loss to choose ranks with (``None`` removes it).

        ``loss_fn()``: the loss of the current model on data the training does not see (lower is better), best
        a 1-D tensor of per-item losses (per image and timestep, say; ``groups``: each item's image), so that the
        search cuts a component only where the held-out loss improves by more than one standard error of the
        paired difference from keeping everything; a float or 0-dim tensor is taken as it is. Called under
        ``torch.no_grad()``, the network in eval mode, about fifteen times per RESTART and per save. ``until``:
        the fraction of training after which it is no longer used and the last threshold stays, so that a loop
        may then train on the held-out share too (``validation_active``).
        """
        self.rank_search.set_validation(loss_fn, until, groups)

    @property
    def validation_active(self) -> bool:
        """True while the held-out loss decides the ranks: until then the loop must keep its held-out
        share out of training; afterwards it may train on it."""
        return self.rank_search.validation_active(self._progress())

    # --- training hooks --------------------------------------------------------------------
    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        """Called by sd-scripts before each epoch: count it and RESTART when one is due."""
        self.train()
        self.items.end_epoch()
        clock = self.clock
        if clock.resumed_mid_epoch:
            clock.resumed_mid_epoch = 0
            if not self._saved_epoch_was_complete():
                return  # sd-scripts re-enters the epoch the state was saved in, and calls this hook again
        if clock.epochs_started >= 1 and clock.steps_per_epoch == 0:
            clock.steps_per_epoch = clock.optimizer_steps - clock.steps_at_epoch_start
        clock.epochs_started += 1
        clock.steps_at_epoch_start = clock.optimizer_steps
        if self._epoch_restart_due() or self._step_restart_due():
            self.restart()

    def _saved_epoch_was_complete(self) -> bool:
        """After a resume: was the state saved at the end of an epoch (sd-scripts then starts the next one)?

        Needs the epoch length: observed after the first epoch, or from sd-scripts' args
        (max_train_steps / max_train_epochs). A state saved during the first epoch of a run
        counted in steps only is taken as saved mid-epoch.
        """
        per_epoch = self.clock.steps_per_epoch or self._length().steps_per_epoch()
        return per_epoch > 0 and self.clock.optimizer_steps - self.clock.steps_at_epoch_start >= per_epoch

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        """Called by sd-scripts before each micro-batch: RESTART at an optimizer-step boundary when due."""
        if self._step_restart_due():
            self.restart()

    def _on_backward(self, loss: Any, accelerator: Any) -> None:
        """Seen in ``accelerator.backward(loss)``: accumulate the loss, count optimizer steps."""
        if not self.training:
            return
        if isinstance(loss, torch.Tensor) or isinstance(loss, (int, float)):
            self.loss_meter.add(loss)
        self._accelerator = weakref.ref(accelerator)
        if getattr(accelerator, "sync_gradients", True):
            self.clock.optimizer_steps += 1

    def record_loss(self, loss: torch.Tensor | float, optimizer_step: bool = True) -> None:
        """For training loops that do not call ``accelerate.Accelerator.backward``: feed the loss here."""
        self.loss_meter.add(loss)
        if optimizer_step:
            self.clock.optimizer_steps += 1

    def item_loss(self, losses: torch.Tensor, ids: Any) -> torch.Tensor:
        """A loop of one's own: the batch's per-item losses (1-D) and image ids in, the loss to back-propagate
        out (their mean; with ``holdout``, its gradient that of the trained items' mean); the ids are recorded
        in ``self.items`` (docs/identities.md, docs/training.md)."""
        self.items.record(ids, losses)
        if self.holdout is None or not self.training:
            return losses.mean()
        return holdout.masked_loss(losses, holdout.loop_trained(self.holdout, ids, losses.device)).mean()

    def set_training_length(self, total_steps: Optional[int] = None, total_epochs: Optional[int] = None) -> None:
        """Tell a non-sd-scripts loop's length (sd-scripts' args provide it otherwise)."""
        self.length = schedule.TrainingLength(total_steps, total_epochs, 1)
        self._args = None

    def _length(self) -> schedule.TrainingLength:
        if self._args is not None:
            self.length = schedule.TrainingLength.from_args(self._args)
        return self.length

    def restart_interval_epochs(self) -> Optional[int]:
        """E: ``restart_every``, or a tenth of the run (at least 1) once the run length is known."""
        return schedule.interval_epochs(self.config, self.clock, self._length())

    def _epoch_restart_due(self) -> bool:
        return schedule.epoch_restart_due(self.config, self.clock, self._length(), self.warnings)

    def _step_restart_due(self) -> bool:
        return schedule.step_restart_due(self.config, self.clock, self._length(), self.warnings)

    def _progress(self) -> float:
        """Fraction of training done (Eq. 6's Epoch / TotalEpoch, in optimizer steps when known)."""
        return schedule.progress(self.clock, self._length())

    # --- RESTART --------------------------------------------------------------------------
    def restart(
        self, p: Optional[float] = None, loss: Optional[float] = None, progress: Optional[float] = None
    ) -> RestartReport:
        """Run one RESTART now on every module and return its report (see ``restart_runner.run``).

        Paper mode (and an explicit call with ``restart_mode=off``): ``p`` is the energy share, or
        ``fixed_p``, or p = 1 - L^alpha from ``loss`` or the mean training loss since the previous
        RESTART. Product mode: ``p`` or ``fixed_p`` keep that energy share of each module's update;
        otherwise one importance threshold over every module, from the rank search.
        """
        start = time.perf_counter()
        mean_loss = self._mean_loss() if loss is None else float(loss)
        done = self._progress()
        index = self.clock.restarts + 1
        inputs = restart_runner.RestartInputs(
            self.loras,
            self.config,
            index,
            self.clock.epochs_completed,
            self.clock.optimizer_steps,
            done if progress is None else progress,
            done,
            self.ranks(),
            [t.data for t in self.parameters()],
        )
        with self._deciding():
            report = restart_runner.run(inputs, p, mean_loss, self.rank_search, self.warnings.warn)
        self._signal.update(report.ranks)
        self.clock.mark_restart(index)
        self.loss_meter.reset()
        report.seconds = time.perf_counter() - start
        if report.applied:
            self.history.append(report)
        logger.info(report.line())
        accelerator = self._accelerator() if self._accelerator is not None else None
        restart_runner.log_to_trackers(accelerator, report, self.warnings.warn)
        return report

    def _mean_loss(self) -> Optional[float]:
        """The mean training loss since the last RESTART (the one host read of the loss bookkeeping)."""
        mean, _, bad = self.loss_meter.read()
        if bad:
            logger.warning("AC-LoRA: %d non-finite loss value(s) since the last RESTART were left out of L", bad)
        return mean

    @contextlib.contextmanager
    def _deciding(self) -> Iterator[None]:
        """Around a product-mode decision: the network in eval mode while the rank search may evaluate the
        held-out loss (the loop's ``loss_fn`` sees it so), then back in the mode it was in."""
        if self.config.restart_mode != "product":
            yield
            return
        was_training = self.training
        self.train(False)
        try:
            yield
        finally:
            self.train(was_training)

    def ranks(self) -> dict[str, int]:
        """Current signal rank of every module (its maximum rank before the first RESTART)."""
        return {m.lora_name: self._signal[m.lora_name] for m in self.loras}

    def train_at_ranks(self, ranks: dict[str, int]) -> None:
        """Train each named module at the given rank from now on: its slots beyond it are held out of the
        forward (``ACLoRAModule.hold_slots``), its lora_up starts at zero (a fresh LoRA at that rank). The
        second run of the two-run recipe (``ranks_from``). Modules not named keep every slot."""
        named = [m for m in self.loras if m.lora_name in ranks]
        if not named:
            raise LoRAFileError(
                f"network_args: ranks_from={self.config.ranks_from!r} names none of this model's "
                f"{len(self.loras)} modules (e.g. {self.loras[0].lora_name}); allowed: a file for "
                "this model"
            )
        for m in named:
            k = min(max(int(ranks[m.lora_name]), 1), m.rank)
            with torch.no_grad():
                m.lora_up.weight.zero_()
            m.hold_slots(torch.arange(m.rank) >= k)
            self._signal[m.lora_name] = k
        logger.info(
            "AC-LoRA: training %d modules at the ranks of %s (min/max %d/%d)",
            len(named),
            self.config.ranks_from,
            min(self._signal[m.lora_name] for m in named),
            max(self._signal[m.lora_name] for m in named),
        )

    # --- files -----------------------------------------------------------------------------
    def run_record(self) -> RunRecord:
        """What a file's metadata says about this run (``saving.metadata``)."""
        return RunRecord(self.config, tuple(self.history), self.rank_search.file_decision, self.model)

    def metadata(
        self, ranks: dict[str, int], errors: Optional[dict[str, float]] = None, padded: Optional[dict[str, int]] = None
    ) -> dict[str, str]:
        """Our own metadata keys: enough for a file to explain how its ranks came about."""
        return saving.metadata(self.loras, self.run_record(), ranks, errors, padded)

    def state_for_export(self, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None):
        """(tensors, metadata, truncation errors) of the variable-rank export; ValueError on NaN/Inf weights
        (and, with max_file_size, BudgetError when no file fits with sd-scripts' ``metadata``)."""
        exported = self._export(dtype, metadata)
        return exported.tensors, exported.metadata, exported.errors

    def _export(self, dtype: Optional[torch.dtype], sd_metadata: Optional[dict]) -> Export:
        """The file at the run's decision: the last RESTART's ranks, or (product mode) the rank search's
        decision on the final update, then ``max_file_size``."""
        for m in self.loras:  # held slots add nothing: the file must not carry what the optimiser left there
            m.clear_held()
        keeps: list = [self._signal[m.lora_name] for m in self.loras]
        self.rank_search.file_decision = None
        spectra = None
        if self.config.restart_mode == "product":
            with self._deciding():
                keeps = self.rank_search.file_keeps(self.loras, keeps, self._progress())
            spectra = self.rank_search.file_spectra
        exported = saving.export(self.loras, keeps, self.run_record(), dtype, sd_metadata, spectra)
        if exported.unpadded:
            self.warnings.warn(
                "pad-budget",
                "AC-LoRA: max_file_size leaves no room to pad %d module(s) to their "
                "part's common rank; diffusers 0.32 may read this file at a wrong scale (later "
                "releases read it right)",
                exported.unpadded,
            )
        return exported

    def save_weights(self, file: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> bool:
        """Write the variable-rank LoRA file (atomically). Returns False, keeping any old file, on NaN/Inf weights
        or when no file fits ``max_file_size`` (training goes on)."""
        max_size = self.config.max_file_size
        try:
            exported = self._export(dtype, metadata)
        except ValueError as err:  # non-finite weights; BudgetError (a ValueError): no file fits
            return saving.refuse(file, err, max_size)
        if not saving.write(file, exported, max_size):
            return False
        if self.config.save_full_rank:
            saving.write_full_rank(file, self.loras, self.run_record(), self.ranks(), dtype, metadata)
        return True

    def load_weights(self, file: str) -> LoadInfo:
        """Load a LoRA file into this network; smaller per-module ranks are padded to this network's rank."""
        weights, meta = saving.read_file(file)
        return self.load_state(weights, meta, source=str(file))

    def load_state(
        self, weights: dict[str, torch.Tensor], meta: Optional[dict] = None, source: str = "weights"
    ) -> LoadInfo:
        """Load LoRA ``weights`` (with the file's metadata ``meta``) into this network (``saving.load_into``)."""
        info, signal = saving.load_into(self.loras, weights, meta, source)
        self._signal.update(signal)
        return info

    def merge_to(
        self, text_encoder=None, unet=None, weights_sd: Optional[dict] = None, dtype=None, device=None
    ) -> None:
        """Add multiplier * alpha/rank * up @ down of ``weights_sd`` into the base layers; without
        ``weights_sd``, exactly what this network adds now (its training factors, nothing truncated)."""
        saving.merge_to(self.loras, self.multiplier, weights_sd, dtype, device)

    def apply_max_norm_regularization(self, max_norm_value: float, device=None):
        """sd-scripts' --scale_weight_norms: (keys_scaled, mean_norm, max_norm)."""
        return apply_max_norm(self.loras, max_norm_value)


__all__ = ["ACLoRANetwork", "LoadInfo"]
