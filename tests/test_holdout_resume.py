"""The network's own held-out split survives ``--resume``: the held set, the identities it rests on and whether
the first epoch's rule still runs are in the network's state dict (``aclora_holdout``), as sd-scripts'
``--save_state`` keeps it; a resumed run holds exactly the images the first run held and judges on them.

The runs play sd-scripts' training step as tests/test_holdout.py does (its stand-in ``library.train_util``).
"""

from __future__ import annotations

import logging

import pytest
import torch

from aclora_ext.harness import tiny
from aclora_ext.ranksearch.identities import fingerprint
from test_holdout import SHARE, draw, planted_images, sd_network, sd_step, train_util  # noqa: F401 - a fixture

IMAGES = 16
STEPS = 1000  # holdout_until (0.7) far away: the split holds for the whole test


def step(network, models, train_util, latents, image, optimizer, index, trace) -> None:  # noqa: F811
    """One training step of one image, its noise fixed by ``index``; ``trace`` gets (image, trained) as the
    network's held set has it before the step."""
    batch = latents[image : image + 1]
    trace.append((image, float(network.holdout.trained(fingerprint(batch))[0])))
    sd_step(network, models, train_util, batch, [image], optimizer, draw(batch, 1000 + index))


def continue_run(network, models, train_util, latents, start: int, trace) -> None:  # noqa: F811
    """From item ``start`` of epoch 1 to the end of epoch 3 (16 items an epoch, in order), then a RESTART."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)  # no state of its own: the network's is the run's
    for index in range(start, 3 * IMAGES):
        if index % IMAGES == 0 and index > 0:
            network.on_epoch_start()
        step(network, models, train_util, latents, index % IMAGES, optimizer, index, trace)


def first_part(train_util, latents):  # noqa: F811
    """A run's first half epoch (items 0-7 of epoch 1, the rule era), then its state as --save_state keeps it."""
    models = tiny.sd1_models(seed=0, pretrained=True)
    network = sd_network(models, steps=STEPS, holdout=str(SHARE))
    network.on_epoch_start()
    trace: list = []
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    for index in range(IMAGES // 2):
        step(network, models, train_util, latents, index, optimizer, index, trace)
    saved = {k: v.clone() for k, v in network.state_dict().items()}
    return models, network, saved, trace


def resumed(saved: dict, models_state: dict):
    """A fresh process: the models as the first run left them (sd-scripts loads its own), a fresh network, the
    saved state loaded as accelerate's load_state does (then sd-scripts re-enters the epoch: on_epoch_start)."""
    models = tiny.sd1_models(seed=0, pretrained=True)
    models["unet"].load_state_dict(models_state)
    network = sd_network(models, steps=STEPS, holdout=str(SHARE))
    network.load_state_dict(saved)
    network.on_epoch_start()
    return models, network


def test_a_resumed_run_holds_the_same_images_none_switches_side_and_the_held_out_choice_continues(train_util):  # noqa: F811
    """Saved mid-epoch 1 (the rule era: the save resolves what the steps saw), resumed in a fresh network: every
    later item is held or trained exactly as in the uninterrupted run, no held image ever trained, and the
    RESTART after epoch 3 judges on the same held images with the same result."""
    latents = planted_images(IMAGES, seed=11)
    models, network, saved, before = first_part(train_util, latents)
    unet_state = {k: v.clone() for k, v in models["unet"].state_dict().items()}
    uninterrupted: list = []
    continue_run(network, models, train_util, latents, IMAGES // 2, uninterrupted)
    network.items.resolve()
    expected = network.restart()

    models, again = resumed(saved, unet_state)
    resumed_trace: list = []
    continue_run(again, models, train_util, latents, IMAGES // 2, resumed_trace)
    again.items.resolve()
    report = again.restart()

    held = network.holdout.held
    assert 0 < len(held) < IMAGES and again.holdout.held == held
    assert resumed_trace == uninterrupted  # every item on the side the uninterrupted run put it
    # ids count from 0 in the order first seen: image i here; a held image trained at no step, before or after
    for image, trained in before + resumed_trace:
        assert not (image in held and trained), image
    assert report.p_source == expected.p_source == "validation"
    assert set(again.rank_search.loss_fn.groups.tolist()) <= held
    assert report.validation_loss == pytest.approx(expected.validation_loss, rel=1e-5)
    assert report.ranks == expected.ranks


def test_the_held_set_buffer_survives_a_cast_and_holds_integers_only(train_util):  # noqa: F811
    latents = planted_images(IMAGES, seed=11)
    _, network, saved, _ = first_part(train_util, latents)
    assert saved["aclora_holdout"].dtype == torch.int64 and saved["aclora_holdout"].numel() > 0
    assert network.aclora_holdout.numel() == 0  # no memory held between saves
    network.to(torch.float16)
    assert torch.equal(network.state_dict()["aclora_holdout"], saved["aclora_holdout"])


def test_a_state_without_the_held_set_loads_and_says_once_that_the_held_set_restarts(train_util, caplog):  # noqa: F811
    latents = planted_images(IMAGES, seed=11)
    models, network, saved, _ = first_part(train_util, latents)
    network.on_epoch_start()  # the rest of the run is not needed: the state is an old one
    old = {k: v for k, v in saved.items() if k != "aclora_holdout"}  # saved before the held set was kept
    fresh = sd_network(tiny.sd1_models(seed=0), steps=STEPS, holdout=str(SHARE))
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        fresh.load_state_dict(old)
    assert caplog.text.count("the held set restarts with the first epoch's rule") == 1
    assert fresh.holdout.decided == {} and fresh.holdout._table is None  # the rule era again
    assert fresh.clock.optimizer_steps == IMAGES // 2  # the rest of the state did load
