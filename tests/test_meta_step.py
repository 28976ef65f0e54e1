"""A whole SDXL training step runs on PyTorch's meta device without reading a device tensor back to the host.

On a GPU every host read in the step (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, a copy to or from the CPU, an operator whose output shape
depends on the data) makes the CPU wait for the device. The meta device has
shapes and no data, so the step runs in seconds on a CPU, and
:class:`HostReadGuard` (a dispatch mode under every operator of the step,
forward, checkpointed recomputation, backward and optimizer included) records
each host read and raises on it, so a read that some code catches and ignores
is still reported.

The step is ``aclora_ext.tools.vram.TrainingStep``: sd-scripts' order of calls
(``create_network`` → ``apply_to`` → optimizer groups; per step the network's
``on_step_start``, the text encoders, the U-Net, ``accelerate``'s
``Accelerator.backward`` where the network captures the loss, gradient
clipping on ``get_trainable_params()``, the optional ``update_grad_norms`` /
``update_norms`` hooks, the optimizer step). A per-step hook added to the
network later runs inside it, and so inside the guard.

The optimizer is ``torch.optim.AdamW`` as sd-scripts builds it for
``--optimizer_type AdamW`` on a CUDA device: torch then picks the multi-tensor
(``foreach``) implementation, not capturable, not fused. Its step counters
stay on the CPU, so the bias corrections it computes from them read host
memory only, never the device (what the guard checks); the meta device would
get the per-tensor loop by default, so the test asks for ``foreach`` as CUDA
gets it. ``fused=True`` and ``capturable=True`` keep the counters on the
device and read nothing either, but they are not what users run by default.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from aclora_ext.harness import architectures, tiny
from aclora_ext.tools import vram
from aclora_ext.lora.module import ACLoRAModule
from aclora_ext.network.schedule import LossMeter

aten = torch.ops.aten
# operators that hand a device tensor's value to the host, or whose output size depends on the data
READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select, aten._unique2,
         aten.unique_dim, aten.unique_consecutive, aten.repeat_interleave}
COPIES = {aten._to_copy, aten.copy_, aten._copy_from}


class HostReadError(RuntimeError):
    """A host read in the guarded code."""


@dataclass
class HostRead:
    op: str
    where: str


def _where() -> str:
    """The innermost frame of the project (or, failing that, outside torch) that led to the read."""
    machinery = ("__torch_function__", "__torch_dispatch__", "_where", "<listcomp>", "<genexpr>", "<dictcomp>")
    frames = [f for f in traceback.extract_stack() if f.name not in machinery]
    ours = [f for f in frames if "/aclora_ext/" in f.filename or "/networks/" in f.filename or "/tests/" in f.filename]
    others = [f for f in frames if "/torch/" not in f.filename]
    frame = (ours or others or frames)[-1]
    return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"


class HostReadGuard(TorchDispatchMode):
    """Record every host read of a tensor that is not on the CPU, and raise HostReadError on it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[HostRead] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._reads(func, args, kwargs):
            read = HostRead(str(func), _where())
            self.reads.append(read)
            raise HostReadError(f"host read in the training step: {read.op} at {read.where}")
        return func(*args, **kwargs)

    @staticmethod
    def _reads(func, args, kwargs) -> bool:
        packet = func.overloadpacket
        if packet in READS:
            return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves((args, kwargs)))
        if packet in COPIES:
            if packet is aten._to_copy:
                source, target = args[0].device, torch.device(kwargs.get("device") or args[0].device)
            else:  # copy_(destination, source)
                target, source = args[0].device, args[1].device
            # device -> host, and host -> device without non_blocking (a stream synchronisation on CUDA)
            return (source.type != "cpu") != (target.type != "cpu") and not kwargs.get("non_blocking", False)
        return False


# --- the real SDXL step ------------------------------------------------------------------------------------------------------
def test_an_sdxl_training_step_at_rank_128_with_both_text_encoders_reads_nothing_back_to_the_host():
    setup = vram.Setup(family="sdxl", width=1024, height=1024, rank=128, alpha=64, mixed_precision="bf16",
                       gradient_checkpointing=True, train_text_encoder=True, optimizer="AdamW")
    models = vram.build_models(setup)
    run = vram.TrainingStep(models, setup, "meta")
    network = run.network
    assert len(network.unet_loras) == architectures.SDXL_UNET_MODULES
    assert len(network.text_encoder_loras) == architectures.SDXL_TE1_MODULES + architectures.SDXL_TE2_MODULES
    assert max(m.rank for m in network.loras) == 128
    assert isinstance(run.optimizer, torch.optim.AdamW) and run.optimizer.defaults["foreach"]
    assert not run.optimizer.defaults["capturable"] and not run.optimizer.defaults["fused"]

    try:
        with HostReadGuard() as guard:
            run.step()
    finally:
        run.close()

    assert guard.reads == []
    # the step went through every part: the loss was captured (the clock counts it there) and AdamW stepped
    assert network.clock.optimizer_steps == 1
    # every module got a gradient and an AdamW update, except te1's last layer: SDXL reads te1's penultimate state
    unused = "lora_te1_text_model_encoder_layers_11_"
    for m in network.loras:
        states = [run.optimizer.state.get(p, {}) for p in m.parameters()]
        if m.lora_name.startswith(unused):
            assert states == [{}, {}], m.lora_name
        else:
            assert all(set(s) == {"exp_avg", "exp_avg_sq", "step"} for s in states), m.lora_name
            assert all(s["step"].device.type == "cpu" for s in states)  # why AdamW's bias correction reads no device


# --- the guard sees a host read wherever it is ---------------------------------------------------------------------------------
@pytest.fixture
def tiny_sdxl_step():
    """The same step on the tiny SDXL-like models (also on meta): seconds, for the checks below."""
    runs = []

    def build(**setup_changes) -> vram.TrainingStep:
        models = tiny.sdxl_models(seed=0)
        meta = vram.Models("sdxl", models["unet"].to("meta"), [te.to("meta") for te in models["text_encoders"]])
        setup = vram.Setup(family="sdxl", width=64, height=64, rank=8, alpha=4, train_text_encoder=True,
                           **setup_changes)
        vram.prepare_models(meta, setup)
        runs.append(vram.TrainingStep(meta, setup, "meta"))
        return runs[-1]

    yield build
    for run in runs:
        run.close()


def guarded_step(run: vram.TrainingStep) -> HostReadGuard:
    guard = HostReadGuard()
    with guard:
        try:
            run.step()
        except (HostReadError, RuntimeError, NotImplementedError):
            pass  # the guard's list says what happened
    return guard


@pytest.mark.parametrize("mode", ["paper", "product"])
def test_the_tiny_step_alone_reads_nothing_so_the_checks_below_see_only_what_they_inject(tiny_sdxl_step, mode):
    run = tiny_sdxl_step(network_args=(("restart_mode", mode),))
    assert guarded_step(run).reads == []
    assert run.network.clock.optimizer_steps == 1


def test_the_old_scale_read_from_the_alpha_buffer_in_every_forward_is_caught(tiny_sdxl_step, monkeypatch):
    monkeypatch.setattr(ACLoRAModule, "scale", property(lambda self: float(self.alpha) / self.rank))
    reads = guarded_step(tiny_sdxl_step()).reads
    assert reads and reads[0].op.startswith("aten._local_scalar_dense")
    assert "test_meta_step.py" in reads[0].where  # the lambda above, called from the module's forward


def test_a_read_in_on_step_start_is_caught(tiny_sdxl_step):
    run = tiny_sdxl_step()
    network = run.network
    original = network.on_step_start

    def on_step_start(*args):
        float(sum(p.detach().float().norm() for p in network.parameters()))  # e.g. a statistic logged per step
        original(*args)

    network.on_step_start = on_step_start
    reads = guarded_step(run).reads
    assert [r.op.split(".")[1] for r in reads] == ["_local_scalar_dense"]
    assert "on_step_start" in reads[0].where


def test_a_read_in_the_loss_capture_of_accelerator_backward_is_caught(tiny_sdxl_step, monkeypatch):
    original = LossMeter.add

    def add(self, loss):
        if bool(torch.as_tensor(loss).isfinite().all()):
            original(self, loss)

    monkeypatch.setattr(LossMeter, "add", add)
    reads = guarded_step(tiny_sdxl_step()).reads
    assert [r.op.split(".")[1] for r in reads] == ["_local_scalar_dense"]
    assert "in add" in reads[0].where


def test_a_read_in_a_per_step_hook_added_later_is_caught_even_when_the_hook_swallows_the_error(tiny_sdxl_step):
    run = tiny_sdxl_step()

    def update_grad_norms():  # sd-scripts calls it after clipping when a network has it
        try:
            run.network.grad_norm_log = [p.grad.norm().tolist() for p in run.network.parameters()]
        except Exception:
            run.network.grad_norm_log = None

    run.network.update_grad_norms = update_grad_norms
    reads = guarded_step(run).reads
    assert reads and "update_grad_norms" in reads[0].where
    assert run.optimizer.state  # the step went on to the optimizer: the read was swallowed, and still reported


@pytest.mark.parametrize("copy", ["cpu", "h2d"])
def test_copies_between_host_and_device_count_as_host_reads(tiny_sdxl_step, copy):
    run = tiny_sdxl_step()
    original = run.network.on_step_start

    def on_step_start(*args):
        p = next(run.network.parameters())
        if copy == "cpu":
            p.detach().cpu()
        else:
            p.detach().copy_(torch.zeros(p.shape))
        original(*args)

    run.network.on_step_start = on_step_start
    reads = guarded_step(run).reads
    assert len(reads) == 1 and "on_step_start" in reads[0].where


def test_dropouts_draw_without_reading_the_device(tiny_sdxl_step):
    run = tiny_sdxl_step(network_args=(("dropout", "0.1"), ("rank_dropout", "0.2"), ("module_dropout", "0.3")))
    assert run.network.loras[0].module_dropout == 0.3 and run.network.loras[0].rank_dropout == 0.2
    assert guarded_step(run).reads == []


def test_held_slots_mask_the_forward_without_reading_the_device(tiny_sdxl_step):
    run = tiny_sdxl_step()
    for m in run.network.loras:  # what a held-out cut leaves: the upper half of every module's slots held
        m.hold_slots(torch.arange(m.rank) >= m.rank // 2)
    assert all(m.slot_mask is not None and m.slot_mask.device.type == "meta" for m in run.network.loras)
    assert guarded_step(run).reads == []
    assert run.network.clock.optimizer_steps == 1


def test_the_simulated_steps_loss_reaches_no_other_network_that_listens_to_accelerator_backward(tiny_sdxl_step,
                                                                                                  sd1_models):
    from accelerate import Accelerator

    from aclora_ext.network import schedule
    from helpers import lora_network

    training = lora_network(sd1_models)  # e.g. a real training in the same process, listening to backward
    guarded_step(tiny_sdxl_step())
    assert training.clock.optimizer_steps == 0 and training.loss_meter.state().abs().sum() == 0
    assert training in schedule._listeners  # and it still hears its own losses
    Accelerator().backward(torch.ones((), requires_grad=True) * 0.5)
    assert training.clock.optimizer_steps == 1 and training.loss_meter.read()[0] == 0.5


def test_the_training_items_wrapper_summarises_the_clean_latents_in_the_step_without_reading_the_device(
        tiny_sdxl_step, monkeypatch):
    """The trainer's noising function wrapped as sd-scripts' would be: fingerprints stay on the device in the
    step; they are resolved to image ids afterwards, outside it."""
    import sys
    import types

    from aclora_ext.families.base import CleanLatents

    module = types.ModuleType("aclora_meta_trainer_utils")
    module.get_noise = lambda args, scheduler, latents: latents
    monkeypatch.setitem(sys.modules, module.__name__, module)
    run = tiny_sdxl_step()
    assert run.network.items.watch(CleanLatents(module.__name__, "get_noise", 2), types.SimpleNamespace(cache_latents=True))
    original = run._latents
    monkeypatch.setattr(run, "_latents", lambda: module.get_noise(None, None, original()))
    guard = guarded_step(run)
    assert guard.reads == [] and run.network.clock.optimizer_steps == 1
    pending = run.network.items._pending
    assert len(pending) == 1 and pending[0].fingerprints.device.type == "meta"


@pytest.mark.parametrize("era", ["first epoch", "resolved"])
def test_the_holdout_masks_held_items_and_records_their_calls_in_the_step_without_reading_the_device(
        tiny_sdxl_step, monkeypatch, era):
    """holdout=: the held items' weights (the first epoch's hash rule, or the lookup table of known views), the
    masked loss through sd-scripts' conditional_loss and the recording of the step's call stay on the device."""
    import sys
    import types

    from aclora_ext.families.base import CleanLatents
    from aclora_ext.ranksearch import holdout
    from aclora_ext.tools.vram import step as vram_step

    module = types.ModuleType("library.train_util")
    module.get_noise = lambda args, scheduler, latents: latents
    module.conditional_loss = lambda pred, target, loss_type, reduction, huber_c=None: torch.nn.functional.mse_loss(
        pred, target, reduction=reduction)
    monkeypatch.setitem(sys.modules, "library.train_util", module)
    # the step's loss through sd-scripts' conditional_loss, as train_network.py computes it
    monkeypatch.setattr(vram_step, "F", types.SimpleNamespace(
        mse_loss=lambda pred, target, reduction: module.conditional_loss(pred, target, "l2", reduction)))
    run = tiny_sdxl_step()
    network, args = run.network, types.SimpleNamespace(cache_latents=True, max_train_steps=10)
    assert network.items.watch(CleanLatents(module.__name__, "get_noise", 2), args)
    network.holdout = holdout.start(network.config.replace(holdout=0.5), network.rank_search, network.items,
                                    run.models.unet, args, lambda: 0.0, lambda: network.training)
    calls = network.rank_search.loss_fn
    assert isinstance(calls, holdout.HeldCalls)
    if era == "resolved":  # what the epoch's end builds from the resolved identities, on the device
        network.holdout._table = (torch.zeros(3, dtype=torch.int64, device="meta"), torch.ones(3, device="meta"))
    original = run._latents
    monkeypatch.setattr(run, "_latents", lambda: module.get_noise(None, None, original()))
    guard = guarded_step(run)
    assert guard.reads == [] and network.clock.optimizer_steps == 1
    assert network.holdout._trained is None  # the mask was made and used on this step's loss
    assert len(calls._fresh) == 1 and calls._fresh[0][0].target.device.type == "meta"
