"""sd-scripts' validation pass as the product mode's held-out loss (--validation_split).

sd-scripts computes its validation loss itself; the network records the pass's
U-Net calls and the targets of ``library.train_util.conditional_loss`` and
replays them. These tests play sd-scripts' part with its call order: a stand-in
``library.train_util`` module, ``network.eval()``, the U-Net call,
``conditional_loss(pred, target, loss_type, "none", huber_c)``, ``network.train()``.
"""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from aclora_ext import create_network
from aclora_ext.ranksearch import heldout
from aclora_ext.harness.sdcalls import add_noise

from helpers import text_encoder_of


def sd_network(models, validation_split: float, **network_args):
    """create_network, prepare_network, apply_to as sd-scripts calls them (a split in the dataset config
    leaves args.validation_split at 0: the recorder is there whatever the args say)."""
    text_encoder = text_encoder_of(models)
    network = create_network(1.0, 8, 8.0, None, text_encoder, models["unet"], **network_args)
    network.prepare_network(argparse.Namespace(validation_split=validation_split, max_train_steps=100))
    network.apply_to(text_encoder, models["unet"], True, True)
    return network


def unet_call(models, latents, seed: int):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    cond = torch.randn(latents.shape[0], 4, models["unet"].config.cross_attention_dim, generator=g)
    return (add_noise(latents, noise, t), t, cond), noise


def training_step(network, models, latents, optimizer, seed: int):
    network.train()
    (x, t, cond), noise = unet_call(models, latents, seed)
    loss = F.mse_loss(models["unet"](x, t, cond).sample, noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    network.record_loss(loss.detach())


def validation_pass(network, models, train_util, latents, loss_type="l2", huber_c=None):
    """What sd-scripts does for --validation_split: eval(), the U-Net call, conditional_loss, train().
    Returns each sample's loss (sd-scripts logs their mean)."""
    network.eval()
    losses = []
    with torch.no_grad():
        for seed, batch in enumerate(latents.split(2)):
            (x, t, cond), noise = unet_call(models, batch, 1000 + seed)
            prediction = models["unet"](x, t, cond).sample
            loss = train_util.conditional_loss(prediction.float(), noise.float(), loss_type, "none", huber_c)
            losses.append(loss.mean(dim=(1, 2, 3)))
    network.train()
    return torch.cat(losses)


def test_a_validation_split_makes_the_restart_choose_on_sd_scripts_validation_pass(sd1_pretrained_models, style_data,
                                                                                     train_util):
    network = sd_network(sd1_pretrained_models, 0.25)
    recorder = network.rank_search.loss_fn
    assert isinstance(recorder, heldout.SdScriptsValidation) and not network.validation_active
    latents = torch.stack([s["latents"] for s in style_data])
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    for step in range(3):
        training_step(network, sd1_pretrained_models, latents[:4], optimizer, step)
    sd_loss = validation_pass(network, sd1_pretrained_models, train_util, latents[4:8])
    assert len(recorder.calls) == 2 and network.validation_active
    # the replay is sd-scripts' own validation loss of the network as it is, sample by sample
    with torch.no_grad():
        replayed = recorder()
    assert replayed.shape == (4,) and torch.allclose(replayed, sd_loss, rtol=1e-5)
    assert float(replayed.mean()) == pytest.approx(float(sd_loss.mean()), rel=1e-5)
    training_step(network, sd1_pretrained_models, latents[:4], optimizer, 9)
    report = network.restart()
    assert report.p_source == "validation" and report.candidates > 1
    # training calls were never recorded, and a second pass adds nothing (it replays the same calls)
    validation_pass(network, sd1_pretrained_models, train_util, latents[4:8])
    assert len(recorder.calls) == 2


def test_the_replay_uses_the_loss_type_and_huber_c_sd_scripts_passed(sd1_pretrained_models, style_data, train_util):
    network = sd_network(sd1_pretrained_models, 0.25)
    latents = torch.stack([s["latents"] for s in style_data])
    huber_c = torch.full((2,), 0.1)
    sd_loss = validation_pass(network, sd1_pretrained_models, train_util, latents[4:8], "huber", huber_c)
    with torch.no_grad():
        assert torch.allclose(network.rank_search.loss_fn(), sd_loss, rtol=1e-5)


@pytest.mark.parametrize("network_args", [{"restart_mode": "paper"}, {"fixed_p": "0.9"}, {"restart_mode": "off"}])
def test_no_recording_where_a_held_out_loss_would_choose_nothing(sd1_models, train_util, network_args):
    network = sd_network(sd1_models, 0.25, **network_args)
    assert network.rank_search.loss_fn is None
    assert not getattr(train_util.conditional_loss, "_aclora_wrapped", False)


def test_a_run_without_a_validation_pass_records_nothing_and_leaves_training_whole(sd1_pretrained_models, style_data,
                                                                                   train_util):
    """No held-out loss: a RESTART changes nothing (a plain LoRA at R); the file is trimmed at save time."""
    network = sd_network(sd1_pretrained_models, 0.0)
    latents = torch.stack([s["latents"] for s in style_data])
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    for step in range(3):
        training_step(network, sd1_pretrained_models, latents[:4], optimizer, step)
    assert network.rank_search.loss_fn.calls == [] and not network.validation_active
    before = {k: v.clone() for k, v in network.state_dict().items() if k.endswith(".weight")}
    report = network.restart()
    assert report.p_source == "deferred" and report.level == float("inf")
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in before.items())
    network.state_for_export()
    assert network.rank_search.file_decision["source"] == "prior"


def test_without_sd_scripts_library_the_run_goes_on_without_a_held_out_loss(sd1_models, monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "library.train_util", raising=False)
    with caplog.at_level("INFO", logger="aclora_ext"):
        network = sd_network(sd1_models, 0.25)
    assert network.rank_search.loss_fn is None and "conditional_loss" in caplog.text


def test_remove_from_takes_the_recorder_off_the_unet(sd1_models, train_util):
    network = sd_network(sd1_models, 0.25)
    network.remove_from()
    assert not sd1_models["unet"]._forward_pre_hooks


# --- FLUX.1 / SD3: the prediction is made from the denoiser's output by sd-scripts' functions -------------
class KeywordDenoiser(torch.nn.Module):
    """Called with keywords only, like sd-scripts' FLUX.1 DiT, with the block-swap hook sd-scripts' DiTs have."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(6, 6)
        self.block_swap_preparations = 0

    def forward(self, *, img, timesteps):
        return self.layer(img) * (1 + timesteps.view(-1, 1))

    def prepare_block_swap_before_forward(self):
        self.block_swap_preparations += 1


@pytest.fixture
def flow_utils(monkeypatch):
    """A stand-in sd-scripts module with a prediction-type function (flux_train_utils' signature and role)."""
    module = types.ModuleType("library.fake_flow_utils")

    def to_prediction(args, model_pred, noisy_model_input, sigmas):
        return model_pred * (-sigmas.view(-1, 1)) + noisy_model_input, 1 / sigmas.view(-1, 1) ** 2

    module.to_prediction = to_prediction
    monkeypatch.setitem(sys.modules, "library.fake_flow_utils", module)
    return module


def flow_prediction():
    from aclora_ext.families.base import Prediction

    def predict(output, args, kwargs, calls):
        call = calls["to_prediction"]
        return call.function(call.args[0], output, *call.args[2:])

    return Prediction((("library.fake_flow_utils", "to_prediction"),), predict)


def flow_validation_pass(model, flow_utils, train_util, recording, prior_call=False):
    """sd-scripts' validation pass for a flow-matching trainer: the denoiser (and diff-output preservation's
    prior, network off), the prediction type, the weighted loss; returns the per-sample losses."""
    losses = []
    with torch.no_grad():
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            latents, noise = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
            sigmas = torch.rand(2, generator=g)
            noisy = (1 - sigmas.view(-1, 1)) * latents + sigmas.view(-1, 1) * noise
            recording[0] = True
            out = model(img=noisy, timesteps=sigmas)
            if prior_call:
                model(img=noisy * 0, timesteps=sigmas)
            pred, weighting = flow_utils.to_prediction(argparse.Namespace(), out, noisy, sigmas)
            loss = train_util.conditional_loss(pred.float(), (noise - latents).float(), "l2", "none", None) * weighting
            losses.append(loss.mean(dim=1))
            model.prepare_block_swap_before_forward()
    recording[0] = False
    return torch.cat(losses)


@pytest.mark.parametrize("prior_call", [False, True], ids=["plain", "with-diff-output-preservation"])
def test_a_family_prediction_is_rebuilt_through_sd_scripts_own_functions(train_util, flow_utils, prior_call):
    model, recording = KeywordDenoiser(), [False]
    recorder = heldout.SdScriptsValidation.attach(lambda: recording[0], model, True, flow_prediction())
    flow_validation_pass(model, flow_utils, train_util, recording, prior_call)
    recorder.end_pass()
    assert len(recorder.calls) == 2 and recorder.ready
    with torch.no_grad():
        model.layer.weight.add_(0.1)  # the network changed: the replay follows it
    swaps = model.block_swap_preparations
    expected = flow_validation_pass(model, flow_utils, train_util, [False])
    with torch.no_grad():
        torch.testing.assert_close(recorder(), expected, rtol=1e-6, atol=1e-7)
    # one preparation per replayed forward, as sd-scripts' on_validation_step_end does
    assert model.block_swap_preparations - swaps == 2 + 2


def test_a_prediction_that_cannot_be_rebuilt_drops_the_recording_with_a_warning(train_util, flow_utils, caplog):
    from aclora_ext.families.base import Prediction

    model, recording = KeywordDenoiser(), [False]
    recorder = heldout.SdScriptsValidation.attach(lambda: recording[0], model, True, Prediction())  # output as is
    with caplog.at_level("WARNING", logger="aclora_ext"):
        flow_validation_pass(model, flow_utils, train_util, recording)
    recorder.end_pass()
    assert not recorder.ready and recorder.calls == []
    assert "cannot replay sd-scripts' validation pass" in caplog.text and "differs from sd-scripts'" in caplog.text


def test_remove_takes_both_hooks_off(train_util, flow_utils):
    model = KeywordDenoiser()
    recorder = heldout.SdScriptsValidation.attach(lambda: True, model, True, flow_prediction())
    recorder.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
