"""The recorder of sd-scripts' validation pass (``ranksearch/heldout.py``), behaviour by behaviour.

Written for the survivors of the mutation run of 2026-12-08 (docs/mutation-survivors-lora-options-ranksearch.md,
"ranksearch"): each test names the promise it holds. They play sd-scripts' part as tests/test_heldout.py
does (a stand-in ``library.train_util``, the denoiser call, ``conditional_loss``), on a 6-wide linear
denoiser, so each runs in milliseconds.
"""

from __future__ import annotations

import logging
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from aclora_ext.families.base import Prediction
from aclora_ext.ranksearch import heldout


class Denoiser(torch.nn.Module):
    """Called with keywords only (as sd-scripts' DiTs are)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(6, 6)

    def forward(self, *, img, scale):
        return self.layer(img) * scale


def batch(seed: int, size: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 6, generator=g), torch.randn(size, 6, generator=g)


def run_pass(model, train_util, recording, batches: int = 2, pred=lambda out, img: out, size: int = 2):
    """One validation pass: per batch the denoiser, then conditional_loss on ``pred(output, input)``."""
    losses = []
    with torch.no_grad():
        for seed in range(batches):
            img, target = batch(seed, size)
            recording[0] = True
            out = model(img=img, scale=torch.tensor(2.0))
            losses.append(train_util.conditional_loss(pred(out, img).float(), target, "l2", "none").mean(dim=1))
    recording[0] = False
    return torch.cat(losses)


def recorder_of(model, prediction=None):
    recording = [False]
    return heldout.SdScriptsValidation.attach(lambda: recording[0], model, True, prediction), recording


# --- what is recorded ---------------------------------------------------------------------------------------
def test_a_pass_keeps_at_most_max_calls_calls(train_util):
    """MAX_CALLS bounds what the recorder holds (each call keeps a batch of latents)."""
    model = Denoiser()
    recorder, recording = recorder_of(model)
    run_pass(model, train_util, recording, batches=heldout.MAX_CALLS + 3)
    assert len(recorder.calls) == heldout.MAX_CALLS


def test_a_loss_after_the_recording_stopped_is_not_recorded(train_util):
    """Only a loss of the validation pass pairs with the pending denoiser call."""
    model = Denoiser()
    recorder, recording = recorder_of(model)
    img, target = batch(0)
    with torch.no_grad():
        recording[0] = True
        out = model(img=img, scale=torch.tensor(2.0))
        recording[0] = False
        train_util.conditional_loss(out, target, "l2", "none")
    assert recorder.calls == []


def test_the_first_recorded_call_says_so_in_the_log_once(train_util, caplog):
    message = "AC-LoRA: recording sd-scripts' validation calls; the product mode chooses ranks on them"
    for batches in (1, 3):
        model = Denoiser()
        recorder, recording = recorder_of(model)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aclora_ext"):
            run_pass(model, train_util, recording, batches=batches)
        assert [r.getMessage() for r in caplog.records].count(message) == 1
        recorder.remove()


def test_a_failed_check_drops_the_recording_for_good_with_one_warning(train_util, caplog):
    """The first call whose rebuilt prediction is wrong ends the recording (``failed`` says why); later calls
    of the pass are not recorded and warn no more."""
    model = Denoiser()
    recorder, recording = recorder_of(model)
    wrong = [True, False, False]  # only the first call's prediction differs from the rebuilt one
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        with torch.no_grad():
            for seed, bad in enumerate(wrong):
                img, target = batch(seed)
                recording[0] = True
                out = model(img=img, scale=torch.tensor(2.0))
                train_util.conditional_loss(out + 1.0 if bad else out, target, "l2", "none")
    recorder.end_pass()
    warnings_logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1 and warnings_logged[0].startswith(
        "AC-LoRA: cannot replay sd-scripts' validation pass (the rebuilt prediction differs from sd-scripts' by "
    )
    assert warnings_logged[0].endswith("(relative)); the rank search runs without a held-out loss")
    assert recorder.failed is not None and recorder.calls == [] and not recorder.ready


@pytest.mark.parametrize(
    "predict, problem",
    [
        (lambda out, a, k, c: (_ for _ in ()).throw(ValueError("no sigmas")),
         "the prediction could not be rebuilt from the recorded call: ValueError: no sigmas"),
        (lambda out, a, k, c: ([out], None), "the rebuilt prediction is a list, not a tensor"),
        (lambda out, a, k, c: (out[:, :3], None), "the rebuilt prediction has shape (2, 3), sd-scripts' (2, 6)"),
    ],
    ids=["raises", "not-a-tensor", "other-shape"],
)
def test_a_prediction_that_cannot_be_rebuilt_says_what_is_wrong(train_util, predict, problem):
    model = Denoiser()
    recorder, recording = recorder_of(model, Prediction((), predict))
    run_pass(model, train_util, recording, batches=1)
    assert recorder.failed == problem


@pytest.mark.parametrize("scale, error, accepted", [(1e4, 1e-6, True), (1e-4, 1e-2, False)])
def test_the_prediction_check_is_relative_to_sd_scripts_prediction(train_util, scale, error, accepted):
    """PREDICTION_TOLERANCE is relative (Frobenius): a large prediction off by 1e-6 of its size passes, a tiny
    one off by 1e-2 of its size fails, whatever their absolute differences."""
    model = Denoiser()
    with torch.no_grad():
        model.layer.weight.mul_(scale)
        model.layer.bias.mul_(scale)
    recorder, recording = recorder_of(model)
    run_pass(model, train_util, recording, batches=1, pred=lambda out, img: out.double() * (1 + error))
    assert (recorder.failed is None) == accepted and bool(recorder.calls) == accepted


def test_the_prediction_is_rebuilt_from_the_recorded_call_and_the_family_functions_record(train_util, monkeypatch):
    """A family's ``predict`` gets the denoiser call's args and kwargs and each function's arguments,
    keywords and result as recorded (the first call after the denoiser only); a function called outside a
    pending denoiser call is not recorded."""
    utils = types.ModuleType("library.fake_utils")

    def weigh(out, *, img):
        return out + img, img.abs() + 1

    utils.weigh = weigh
    monkeypatch.setitem(sys.modules, "library.fake_utils", utils)

    def predict(output, args, kwargs, calls):
        call = calls["weigh"]
        prediction, weighting = call.result
        assert args == () and torch.equal(call.kwargs["img"], kwargs["img"])
        return call.function(output, img=kwargs["img"])[0] * (kwargs["scale"] / 2), weighting

    model = Denoiser()
    recorder, recording = recorder_of(model, Prediction((("library.fake_utils", "weigh"),), predict))
    expected = []
    with torch.no_grad():
        for seed in range(2):
            img, target = batch(seed)
            recording[0] = True
            utils.weigh(img, img=img)  # before the denoiser: no pending call, nothing kept
            out = model(img=img, scale=torch.tensor(2.0))
            pred, weighting = utils.weigh(out, img=img)
            utils.weigh(out * 0, img=img * 0)  # a second call: only the first is kept
            loss = train_util.conditional_loss(pred, target, "l2", "none") * weighting
            expected.append(loss.mean(dim=1))
    recording[0] = False
    assert recorder.failed is None and len(recorder.calls) == 2
    with torch.no_grad():
        torch.testing.assert_close(recorder(), torch.cat(expected))


# --- autocast ---------------------------------------------------------------------------------------------------
def test_the_autocast_of_the_call_is_read_from_its_tensors_device():
    """``_autocast_state``: (device type, dtype) of the autocast the call runs under, None without one, None
    on the meta device; the CPU when no argument is a tensor. Read through the torch >= 2.4 API (the
    deprecated per-device functions warn)."""
    x = torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert heldout._autocast_state((x,), {}) is None
        with torch.autocast("cpu", dtype=torch.float16):
            assert heldout._autocast_state((x,), {}) == ("cpu", torch.float16)
            assert heldout._autocast_state((), {"img": x, "n": 3}) == ("cpu", torch.float16)
            assert heldout._autocast_state((1,), {"n": 3}) == ("cpu", torch.float16)
            assert heldout._autocast_state((), {"img": torch.zeros(1, device="meta")}) is None


def test_a_call_recorded_under_autocast_is_replayed_under_the_same_autocast(train_util):
    """The replay runs each call under the autocast (device, dtype) it was recorded with: float16 here,
    whose result differs from float32's."""
    model = Denoiser()
    recorder, recording = recorder_of(model)
    with torch.autocast("cpu", dtype=torch.float16):
        sd_loss = run_pass(model, train_util, recording)
    assert recorder.calls[0].autocast == ("cpu", torch.float16)
    with torch.no_grad():
        replayed = recorder()
        plain = run_pass(model, train_util, [False])
    assert torch.equal(replayed, sd_loss) and not torch.equal(replayed, plain)


# --- the replay's items -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2])
def test_a_loss_of_one_number_per_call_gives_one_item_per_call(train_util, size):
    """A loss function that reduces to a scalar yields one item per call; an elementwise one, one per sample."""
    model = Denoiser()
    recorder, recording = recorder_of(model)
    run_pass(model, train_util, recording, batches=3, size=size)
    with torch.no_grad():
        assert recorder().shape == (3 * size,)
        recorder.loss_fn = lambda pred, target, loss_type, reduction, huber_c: F.mse_loss(pred, target)
        items = recorder()
        assert items.shape == (3,)
        recorder.loss_fn = lambda pred, target, loss_type, reduction, huber_c: F.mse_loss(pred, target).reshape(1)
        torch.testing.assert_close(recorder(), items)
        recorder.loss_fn = lambda pred, target, *rest: (pred - target).pow(2).mean(dim=1)
        torch.testing.assert_close(recorder(), run_pass(model, train_util, [False], batches=3, size=size))


# --- installing the wrappers --------------------------------------------------------------------------------------
def test_a_family_function_is_wrapped_once_and_a_missing_one_is_said(monkeypatch):
    """``_install_function_wrapper``: False when the module or function is missing, True once wrapped, and
    a second install does not wrap the wrapper."""
    utils = types.ModuleType("library.fake_once")
    utils.f = lambda x: x + 1
    original = utils.f
    monkeypatch.setitem(sys.modules, "library.fake_once", utils)
    assert heldout._install_function_wrapper("library.not_loaded", "f") is False
    assert heldout._install_function_wrapper("library.fake_once", "g") is False
    assert heldout._install_function_wrapper("library.fake_once", "f") is True
    wrapper = utils.f
    assert wrapper is not original and wrapper.__wrapped__ is original and wrapper(1) == 2
    assert heldout._install_function_wrapper("library.fake_once", "f") is True
    assert utils.f is wrapper
