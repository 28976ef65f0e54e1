"""The estimate: one training step of a set-up counted on the meta device, with the optimizer state a
first step leaves, plus the RESTART transient measured on the CPU; what is not counted, and the margin
assumed for it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ... import functional as Fn
from ...families.base import Target
from ...lora import batching as restart_module
from ...network.network import ACLoRANetwork
from .anima import anima_notes, build_anima_models
from .anima_step import AnimaTrainingStep
from .counter import (
    ACTIVATIONS,
    BLOCK_BYTES,
    FROZEN_TE,
    FROZEN_UNET,
    FROZEN_VAE,
    GRADIENTS,
    LORA,
    OPTIMIZER_STATE,
    StorageCounter,
)
from .cuda import CudaPolicy
from .dit import build_dit_models, describe_swap, dit_notes
from .dit_step import DitTrainingStep
from .hunyuan_image import HunyuanImageTrainingStep, build_hunyuan_image_models, hunyuan_image_notes
from .lumina import LuminaTrainingStep, build_lumina_models, lumina_notes
from .models import Models, build_models
from .setup import Setup
from .step import TrainingStep

GiB = 1024**3
#: what the estimate leaves out, as a fixed allowance plus a share of the estimate (see NOT_COUNTED)
MARGIN_FIXED_BYTES = int(0.75 * GiB)
MARGIN_FRACTION = 0.10
CARD_SIZES_GIB = (8, 12, 16, 24, 32, 48, 80)

NOT_COUNTED = (
    "Not counted, so added as a margin of 0.75 GiB + 10% of the estimate (an assumption: no GPU has checked it "
    "yet): the CUDA context (0.3-0.5 GiB outside PyTorch's allocator, by GPU, driver and CUDA version); cuDNN and "
    "cuBLAS workspaces and the fused-attention backward's scratch buffers (transient, up to a few hundred MiB for "
    "the largest convolutions); the caching allocator's fragmentation and cached free blocks (nvidia-smi shows "
    "reserved memory, typically 5-15% above the allocated peak for a fixed image size, more with buckets of "
    "varying sizes). Also outside the step: sample-image generation (--sample_every_n_*), saving, and other "
    "programs on the same GPU."
)


@dataclass
class Estimate:
    """Peak allocated bytes of a training step and what they are, plus the RESTART between steps."""

    setup: Setup
    peak_bytes: int
    breakdown: dict[str, int]  # per category at the peak
    peak_phase: str
    phase_peaks: dict[str, int]  # the peak within each part of the step
    largest: dict[str, int]  # the most each category held during the step (all the gradients, ...)
    before_step_bytes: int  # live when the step starts: weights, LoRA, optimizer state
    persistent_bytes: int  # live after the step (what a RESTART finds)
    restart_transient_bytes: int
    modules: int
    lora_parameters: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def restart_peak_bytes(self) -> int:
        return self.persistent_bytes + self.restart_transient_bytes

    @property
    def margin_bytes(self) -> int:
        return MARGIN_FIXED_BYTES + int(MARGIN_FRACTION * max(self.peak_bytes, self.restart_peak_bytes))

    @property
    def with_margin_bytes(self) -> int:
        return max(self.peak_bytes, self.restart_peak_bytes) + self.margin_bytes

    def fits(self, card_gib: float) -> bool:
        return self.with_margin_bytes <= card_gib * GiB

    def as_dict(self) -> dict:
        gib = lambda n: round(n / GiB, 3)  # noqa: E731
        return {
            "setup": asdict(self.setup),
            "peak_gib": gib(self.peak_bytes),
            "peak_phase": self.peak_phase,
            "breakdown_gib": {k: gib(v) for k, v in self.breakdown.items()},
            "phase_peaks_gib": {k: gib(v) for k, v in self.phase_peaks.items()},
            "largest_gib": {k: gib(v) for k, v in self.largest.items()},
            "before_step_gib": gib(self.before_step_bytes),
            "persistent_gib": gib(self.persistent_bytes),
            "restart_transient_gib": gib(self.restart_transient_bytes),
            "restart_peak_gib": gib(self.restart_peak_bytes),
            "margin_gib": gib(self.margin_bytes),
            "with_margin_gib": gib(self.with_margin_bytes),
            "modules": self.modules,
            "lora_parameters": self.lora_parameters,
            "fits_gib": {str(c): self.fits(c) for c in CARD_SIZES_GIB},
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
            "not_counted": NOT_COUNTED,
        }


class Counted(TrainingStep):
    """A training step with its gradients and optimizer state labelled for the counter (a mixin, first in the
    bases of :class:`CountedStep` and :class:`CountedDitStep`)."""

    def __init__(
        self,
        counter: StorageCounter,
        models: Models,
        setup: Setup,
        device: str = "meta",
        policy: Optional[CudaPolicy] = None,
    ) -> None:
        self.counter = counter
        self.with_gradient: set[int] = set()  # ids of the parameters the step gave a gradient
        super().__init__(models, setup, device, policy, phase=self._phase)

    def _phase(self, name: str) -> None:
        self.counter.phase = name

    def after_backward(self) -> None:
        params = list(self.network.parameters()) + [p for m, _ in self.device_models() for p in m.parameters()]
        self.counter.label((p.grad for p in params), GRADIENTS)
        self.with_gradient = {id(p) for p in params if p.grad is not None}

    def drop_unused_state(self) -> None:
        """Take out of the count the state :meth:`warm_optimizer` made for parameters the step gave no gradient
        (e.g. the LoRA of SDXL te1's last layer, whose output is not used): a real first step makes none."""
        for p, state in self.optimizer.state.items():
            if id(p) not in self.with_gradient:
                for t in tree_leaves(state):
                    block = self.counter.see(t) if isinstance(t, torch.Tensor) else None
                    if block is not None:
                        block.nbytes = 0

    def after_optimizer(self) -> None:
        self.counter.label((t for state in self.optimizer.state.values() for t in tree_leaves(state)), OPTIMIZER_STATE)


class CountedStep(Counted, TrainingStep):
    """SD1.x/2.x and SDXL's step, counted."""


class CountedDitStep(Counted, DitTrainingStep):
    """FLUX.1 and SD3's step, counted."""


class CountedLuminaStep(Counted, LuminaTrainingStep):
    """Lumina 2's step, counted."""


class CountedHunyuanImageStep(Counted, HunyuanImageTrainingStep):
    """HunyuanImage-2.1's step, counted."""


class CountedAnimaStep(Counted, AnimaTrainingStep):
    """Anima's step, counted."""


def estimate(
    setup: Setup, measure_restart: bool = True, models: Optional[Models] = None, block_bytes: int = BLOCK_BYTES
) -> Estimate:
    """Count one training step of ``setup`` on the meta device, with the optimizer state a first step leaves (the
    first step's optimizer step allocates that state while the gradients live: the same peak); the RESTART
    transient is measured on the CPU (see :func:`restart_transient`). ``models``: other models than the real
    architecture (on the meta device, prepared with :func:`prepare_models`), e.g. tiny ones for tests."""
    start = time.perf_counter()
    counter = StorageCounter("meta", block_bytes)
    policy = CudaPolicy("meta")
    notes: list[str] = []
    step_class: type[Counted] = CountedDitStep if setup.is_dit else CountedStep
    if setup.family == "anima":  # anima_train_network.py
        models, step_class = models or build_anima_models(setup), CountedAnimaStep
    if setup.is_lumina:  # lumina_train_network.py
        models, step_class = models or build_lumina_models(setup), CountedLuminaStep
    if setup.is_hunyuan_image:  # hunyuan_image_train_network.py
        models, step_class = models or build_hunyuan_image_models(setup), CountedHunyuanImageStep
    models = models or (build_dit_models(setup) if setup.is_dit else build_models(setup))
    run = step_class(counter, models, setup, "meta", policy)
    run.warm_optimizer()
    # what exists before the first step: only what sits on the device is labelled, and so counted
    for model, category in run.device_models():
        counter.label(list(model.parameters()) + list(model.buffers()), category)
    counter.offload(run.offloaded_tensors())  # block swap: these weights wait on the CPU
    counter.label(list(run.network.parameters()) + list(run.network.buffers()), LORA)
    counter.label(run.constants(), ACTIVATIONS)
    counter.label((t for state in run.optimizer.state.values() for t in tree_leaves(state)), OPTIMIZER_STATE)
    try:
        with counter:
            run.step()
        run.drop_unused_state()
        persistent = counter.live_bytes()
    finally:
        run.close()
    summary = counter.replay()
    persistent_bytes = sum(persistent[c] for c in (FROZEN_UNET, FROZEN_TE, FROZEN_VAE, LORA, OPTIMIZER_STATE))
    transient = restart_transient(run.network) if measure_restart else 0
    if run.accelerator is None:
        notes.append(
            "accelerate is not installed: the loss went to network.record_loss instead of Accelerator.backward"
        )
    if setup.mixed_precision == "fp16":
        notes.append("fp16: the GradScaler's own tensors (a few bytes per step) are not simulated")
    if setup.attention == "none":
        notes.append("attention=none: the U-Net's eager attention stands in for sd-scripts' own (same L x L scores)")
    if setup.family == "anima":
        notes += anima_notes(models, setup)
    elif setup.is_hunyuan_image:
        notes += hunyuan_image_notes(setup, models)
    elif setup.is_dit:
        notes += dit_notes(setup) + [n for n in [describe_swap(models.unet, setup)] if n]
    elif setup.is_lumina:
        notes += lumina_notes(setup)
    else:
        notes.append(
            "the diffusers U-Net stands in for sd-scripts' own (same layers; both checkpoint every ResNet "
            "and transformer block, sd-scripts also its down- and upsamplers)"
        )
    lora_params = sum(p.numel() for p in run.network.parameters())
    return Estimate(
        setup,
        summary.peak,
        summary.at_peak,
        summary.phase,
        summary.by_phase,
        summary.largest,
        summary.before,
        persistent_bytes,
        transient,
        len(run.network.loras),
        lora_params,
        time.perf_counter() - start,
        notes,
    )


def restart_transient(network: Any, p: float = 0.9) -> int:
    """Extra bytes a RESTART of ``network`` allocates on the device.

    RESTART runs between steps (activations and gradients freed) and works
    through the modules in chunks of one shape, one chunk after another, each
    bounded by the device's chunk budget; so its transient is that of its
    largest chunk. It is measured by running ``ACLoRANetwork.restart`` for real
    on the CPU, on a network holding one chunk's worth of modules of every
    shape of ``network`` (the CPU's smaller chunk budget raised to the
    device's for the purpose).
    """
    from unittest import mock

    if network.config.restart_mode == "off":
        return 0
    targets, ranks, alphas = [], {}, {}
    for (rank, cols, rows, _), indices in restart_module.shape_groups(network.loras).items():
        sample = network.loras[indices[0]]
        layer = sample.org_module
        for i in range(min(len(indices), Fn.chunk_size(rows, cols, rank, restart_module.CHUNK_BYTES))):
            with torch.device("meta"):  # the base layer is never run: no memory for it
                org: nn.Module
                if isinstance(layer, nn.Conv2d):
                    kh, kw = layer.kernel_size
                    org = nn.Conv2d(layer.in_channels, layer.out_channels, (kh, kw), bias=False)
                else:
                    org = nn.Linear(layer.in_features, layer.out_features, bias=False)
            name = f"{sample.lora_name}_sample_{i}"
            targets.append(Target(name, org, "unet"))
            ranks[name], alphas[name] = rank, sample.alpha_value
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        samples = ACLoRANetwork(targets, ranks, alphas, 1.0, network.config)
        with torch.no_grad():
            for m in samples.loras:  # a trained-looking update, so that the RESTART has components to sort
                nn.init.normal_(m.lora_up.weight, std=0.01)
    counter = StorageCounter("cpu")
    counter.label(list(samples.parameters()) + list(samples.buffers()), LORA)
    counter.phase = "RESTART"
    with mock.patch.object(restart_module, "CPU_CHUNK_BYTES", restart_module.CHUNK_BYTES), counter:
        samples.restart(p=p)
    summary = counter.replay()
    return max(summary.peak - summary.at_peak[LORA], 0)
