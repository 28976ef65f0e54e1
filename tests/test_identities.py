"""Training items' identities: the recogniser on planted images, the sd-scripts wrapper, the own-loop call.

The planted "latents" are smooth random fields (what a VAE makes of a photo: structure at a coarse
scale), one per image; a flipped view is the mirror plus independent noise (sd-scripts encodes the
flipped image on its own), a crop is a shift by a latent pixel or two, colour a per-channel change.
"""

from __future__ import annotations

import ast
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from aclora_ext import attach
from aclora_ext.families import FAMILIES
from aclora_ext.families.base import CleanLatents
from aclora_ext.ranksearch import training_items
from aclora_ext.ranksearch.identities import Recogniser, descriptor, fingerprint, mirror
from aclora_ext.ranksearch.training_items import TrainingItems
from helpers import skip_or_fail

SHAPE = (4, 16, 16)


def planted(images: int, seed: int = 0, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(images, shape[0], 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    return smooth + 0.1 * torch.randn(images, *shape, generator=g)


def noise(like: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    return scale * torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


def first_seen(truth: list[int]) -> list[int]:
    """The planted images relabelled in the order they first appear (how the recogniser numbers them)."""
    order: dict[int, int] = {}
    return [order.setdefault(t, len(order)) for t in truth]


def resolve_batches(recogniser: Recogniser, batches: list[torch.Tensor]) -> list[int]:
    ids = []
    for batch in batches:
        ids += recogniser.resolve(batch.shape[1:], fingerprint(batch).tolist(), descriptor(batch))
    return ids


def sd_scripts_epochs(views: list[list[torch.Tensor]], epochs: int, repeats: int, batch_size: int, seed: int):
    """Batches as sd-scripts draws them: every image ``repeats`` times per epoch, shuffled, each draw picking
    one of the image's views at random (flip_aug's coin); returns (batches, the planted image of each item)."""
    rng = random.Random(seed)
    batches, truth = [], []
    for _ in range(epochs):
        draws = [i for i in range(len(views)) for _ in range(repeats)]
        rng.shuffle(draws)
        for start in range(0, len(draws), batch_size):
            chunk = draws[start : start + batch_size]
            batches.append(torch.stack([rng.choice(views[i]) for i in chunk]))
            truth += chunk
    return batches, truth


# --- the two summaries ---------------------------------------------------------------------------------
def test_the_fingerprint_is_equal_for_equal_latents_and_changes_with_one_bit_of_one_element():
    latents = planted(3)
    again = latents.clone()
    assert fingerprint(latents).tolist() == fingerprint(again).tolist()
    assert len(set(fingerprint(latents).tolist())) == 3
    nudged = latents.clone()
    nudged[1, 2, 7, 5] = torch.nextafter(nudged[1, 2, 7, 5], torch.tensor(float("inf")))
    changed = fingerprint(nudged).tolist()
    assert changed[0] == fingerprint(latents)[0] and changed[2] == fingerprint(latents)[2]
    assert changed[1] != fingerprint(latents)[1]
    # the same values in another position (two elements swapped) are another tensor
    swapped = latents.clone()
    swapped[0, 0, 0, 0], swapped[0, 0, 0, 1] = latents[0, 0, 0, 1], latents[0, 0, 0, 0]
    assert fingerprint(swapped)[0] != fingerprint(latents)[0]
    # half precision latents hash as their float32 values
    assert fingerprint(latents.half()).tolist() == fingerprint(latents.half().float()).tolist()


def test_the_descriptor_of_a_mirrored_latent_is_the_mirrored_descriptor_and_ignores_a_channel_offset():
    latents = planted(2)
    assert torch.allclose(descriptor(latents.flip(-1)), mirror(descriptor(latents)), atol=1e-6)
    assert torch.allclose(
        descriptor(latents + torch.tensor([1.0, -2.0, 0.5, 3.0])[None, :, None, None]), descriptor(latents), atol=1e-5
    )
    assert torch.allclose(descriptor(latents).norm(dim=1), torch.ones(2))
    # a video-like latent (batch, channels, frames, height, width) and a 1-D one are summarised too
    assert descriptor(torch.randn(2, 4, 3, 8, 8)).shape == (2, 12 * 16)
    assert descriptor(torch.randn(2, 64)).shape == (2, 16)


# --- exact identities (cached latents) ------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_latents_with_flip_aug_resolve_to_their_images_in_item_order(batch_size):
    images = planted(6, seed=1)
    # sd-scripts caches each image and, with flip_aug, its flipped copy encoded on its own: not an exact mirror
    views = [[images[i], images[i].flip(-1) + noise(images[i], 0.05, seed=i)] for i in range(6)]
    batches, truth = sd_scripts_epochs(views, epochs=4, repeats=2, batch_size=batch_size, seed=batch_size)
    recogniser = Recogniser(exact=True)
    assert resolve_batches(recogniser, batches) == first_seen(truth)
    drawn = {f for batch in batches for f in fingerprint(batch).tolist()}
    assert recogniser.images == 6 and recogniser.views == len(drawn) > 6  # flips were drawn, and paired


def test_cached_near_duplicates_stay_distinct_images_and_only_a_mirror_pairs_with_an_image_seen_once():
    a = planted(1, seed=2)[0]
    near = a + noise(a, 0.01, seed=3)  # another file, almost the same picture (not mirrored)
    recogniser = Recogniser(exact=True)
    ids = resolve_batches(recogniser, [torch.stack([a, near, a.flip(-1), near])])
    assert ids == [0, 1, 0, 1]
    # a third cached tensor near an image that already has its two (plain and flipped) is another image
    alone = Recogniser(exact=True)
    assert resolve_batches(alone, [torch.stack([a, a.flip(-1) + noise(a, 0.05, seed=4)])]) == [0, 0]
    assert resolve_batches(alone, [(a.flip(-1) + noise(a, 0.05, seed=5))[None]]) == [1]


def test_buckets_keep_images_of_different_latent_shapes_apart():
    square, wide = planted(2, seed=5), planted(2, seed=5, shape=(4, 16, 24))
    recogniser = Recogniser(exact=True)
    ids = resolve_batches(recogniser, [square, wide, square[1:], wide[:1].flip(-1)])
    assert ids == [0, 1, 2, 3, 1, 2]


# --- nearest neighbour (latents encoded afresh: VAE sampling, random_crop, color_aug) ---------------------
def augmented(canvas: torch.Tensor, rng: random.Random, seed: int) -> torch.Tensor:
    """A view of an image drawn without a cache: random_crop's window at an offset of up to a sixteenth of the
    width (sd-scripts trims less than a bucket step), colour (a per-channel gain and a shift), flip_aug's coin,
    and a fresh VAE sample."""
    offset = rng.choice([0, 1])
    view = canvas[..., offset : offset + SHAPE[-1]]
    scale = torch.tensor([rng.uniform(0.95, 1.05) for _ in range(canvas.shape[0])])[:, None, None]
    view = view * scale + rng.uniform(-0.2, 0.2)
    if rng.random() < 0.5:
        view = view.flip(-1)
    return view + noise(view, 0.05, seed)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_augmented_items_resolve_to_their_nearest_image(batch_size):
    images = planted(8, seed=6, shape=(4, 16, 17))  # each image's canvas: its crops are 16 wide
    rng = random.Random(batch_size)
    draws = [i for _ in range(5) for i in rng.sample(range(8), 8)]
    batches, truth = [], []
    for start in range(0, len(draws), batch_size):
        chunk = draws[start : start + batch_size]
        batches.append(torch.stack([augmented(images[i], rng, seed=start * 10 + k) for k, i in enumerate(chunk)]))
        truth += chunk
    recogniser = Recogniser(exact=False)
    assert resolve_batches(recogniser, batches) == first_seen(truth)
    assert recogniser.images == 8


def test_without_a_cache_near_duplicates_merge_and_similar_images_stay_apart_by_the_margin():
    a, b, other, third = planted(4, seed=7)
    near = a + noise(a, 0.01, seed=8)
    recogniser = Recogniser(exact=False)
    assert resolve_batches(recogniser, [torch.stack([a, b, near])]) == [0, 1, 0]
    # framed alike: `alike` is a new image (beyond match_distance from a); `closer` lies within match_distance
    # of a, but not within the margin of a's distance to `alike`: a third image, not a view of a
    alike, closer = 0.6 * a + 0.4 * other, 0.7 * a + 0.3 * third
    fresh = Recogniser(exact=False)

    def distance(x, y):
        return float((descriptor(x[None]) - descriptor(y[None])).norm())

    assert distance(a, alike) > fresh.match_distance
    assert fresh.margin * distance(a, alike) < distance(a, closer) < fresh.match_distance
    assert distance(alike, closer) > fresh.match_distance
    assert resolve_batches(fresh, [torch.stack([a, alike, closer])]) == [0, 1, 2]


def test_the_recogniser_refuses_a_threshold_that_is_not_a_positive_number():
    with pytest.raises(ValueError, match="match_distance=0"):
        Recogniser(exact=True, match_distance=0)
    with pytest.raises(ValueError, match="margin='x'"):
        Recogniser(exact=False, margin="x")  # type: ignore[arg-type]


# --- the wrapper around the trainer's function -----------------------------------------------------------
@pytest.fixture
def trainer_module(monkeypatch):
    """A stand-in for sd-scripts' library.train_util: a module whose function the trainer calls through it."""
    module = types.ModuleType("aclora_test_trainer_utils")
    calls = []

    def get_noise(args, noise_scheduler, latents):
        calls.append(latents)
        return latents + 1

    module.get_noise = get_noise
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module, CleanLatents(module.__name__, "get_noise", 2), calls


def test_the_wrapper_records_training_batches_only_and_hands_the_call_on_unchanged(trainer_module):
    module, where, calls = trainer_module
    training = [True]
    items = TrainingItems(lambda: training[0])
    assert items.watch(where, types.SimpleNamespace(cache_latents=True))
    images = planted(3, seed=9)
    out = module.get_noise(None, None, images[:2])  # looked up through the module, as the trainers do
    assert torch.equal(out, images[:2] + 1) and len(calls) == 1
    training[0] = False  # sd-scripts' validation pass: the network in eval mode
    module.get_noise(None, None, images[2:])
    training[0] = True
    module.get_noise(None, None, latents=images[1:].flip(0))  # by keyword too
    assert items.batches == [[0, 1], [2, 1]]
    items.end_epoch()
    assert items.per_epoch == [3] and items.images == 3
    # installing twice wraps once; a removed recorder no longer records
    assert training_items.install(where) and module.get_noise.__wrapped__.__name__ == "get_noise"
    items.remove()
    module.get_noise(None, None, images)
    assert items.batches == [[0, 1], [2, 1]]


def test_outside_sd_scripts_nothing_is_wrapped():
    items = TrainingItems(lambda: True)
    assert not items.watch(CleanLatents("aclora_no_such_module", "f", 0), None)
    assert not items.watch(None, None)


def test_every_family_declares_where_its_trainer_hands_over_the_clean_latents():
    """The snapshot's function must exist and take the latents at the declared position."""
    from sd_scripts_fixtures import SD_SCRIPTS

    if not (SD_SCRIPTS / "library" / "train_util.py").is_file():
        skip_or_fail(f"sd-scripts at {SD_SCRIPTS} (its library/ is read for the functions' signatures)")
    for family in FAMILIES:
        where = family.clean_latents
        assert where is not None, f"{family.key} declares no clean_latents"
        source = SD_SCRIPTS / (where.module.replace(".", "/") + ".py")
        functions = {n.name: n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}
        assert where.name in functions, f"{family.key}: {where.module}.{where.name} is not in the snapshot"
        assert functions[where.name].args.args[where.position].arg == where.keyword, family.key


# --- a loop of one's own ------------------------------------------------------------------------------------
def test_an_own_loop_passes_ids_and_per_item_losses_and_back_propagates_their_mean():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6))
    network = attach(model, max_rank=2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    losses = ((model(x) - y) ** 2).mean(dim=1)
    loss = network.item_loss(losses, torch.tensor([4, 7, 4]))
    assert torch.equal(loss, losses.mean())
    loss.backward()
    optimizer.step()
    network.eval()  # evaluation batches are not training items
    network.item_loss(losses.detach(), [1, 2, 3])
    network.train()
    network.item_loss(((model(x[:1]) - y[:1]) ** 2).mean(dim=1), [9])
    assert network.items.batches == [[4, 7, 4], [9]]
    assert network.items.losses[0] == pytest.approx(losses.tolist())
    with pytest.raises(ValueError, match=r"losses: \(2,\); allowed: a 1-D tensor with one loss per id \(3\)"):
        network.item_loss(losses[:2], [1, 2, 3])
    with pytest.raises(ValueError, match="ids: a tensor of shape"):
        network.item_loss(losses, torch.zeros(3))


# --- the network installs it for its family's trainer ----------------------------------------------------------
def test_an_sd_network_records_its_trainers_training_calls_and_logs_each_epoch(monkeypatch, caplog):
    """create_network → prepare_network → apply_to as sd-scripts calls them, with a stand-in for library.train_util
    (train_network.py calls train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents))."""
    import argparse
    import logging

    from aclora_ext import create_network
    from aclora_ext.harness import tiny

    module = types.ModuleType("library.train_util")
    module.get_noise_noisy_latents_and_timesteps = lambda args, scheduler, latents: (latents, latents, None)
    monkeypatch.setitem(sys.modules, "library.train_util", module)
    models = tiny.sd1_models(seed=0)
    network = create_network(1.0, 4, 4.0, None, models["text_encoder"], models["unet"])
    network.prepare_network(argparse.Namespace(cache_latents=True, max_train_steps=10))
    network.apply_to(models["text_encoder"], models["unet"], True, True)
    assert network.items.watching is not None and network.items.recogniser.exact
    images = planted(3, seed=10)
    noise_them = lambda latents: module.get_noise_noisy_latents_and_timesteps(None, None, latents)  # noqa: E731
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        network.on_epoch_start(models["text_encoder"], models["unet"])
        noise_them(images[:2])
        noise_them(images[2:])
        network.eval()  # sd-scripts' validation pass
        noise_them(planted(2, seed=11))
        network.train()
        network.on_epoch_start(models["text_encoder"], models["unet"])
        noise_them(images[[2, 0]])
        network.on_epoch_start(models["text_encoder"], models["unet"])
    assert network.items.batches == [[0, 1], [2], [2, 0]] and network.items.per_epoch == [3, 2]
    assert "epoch 1: 3 training items of 3 distinct images (3 images so far, 3 cached views)" in caplog.text
    assert "epoch 2: 2 training items of 2 distinct images (3 images so far, 3 cached views)" in caplog.text
    network.remove_from()
    noise_them(images)
    assert network.items.batches == [[0, 1], [2], [2, 0]]
