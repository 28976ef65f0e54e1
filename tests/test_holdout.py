"""The network's own held-out split (network_args holdout=, holdout_until=): held items add nothing to the update
while held, the rank search judges on their recorded training calls, and every image trains by the end.

These tests play sd-scripts' training step with its call order, through a stand-in ``library.train_util``: the
clean latents into ``get_noise_noisy_latents_and_timesteps``, the U-Net call, ``conditional_loss(pred, target,
loss_type, "none", huber_c)``, the per-item mean, the batch mean, backward, the optimizer step.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from aclora_ext import attach, create_network
from aclora_ext.harness import tiny
from aclora_ext.harness.sdcalls import add_noise
from aclora_ext.options import OptionError
from aclora_ext.ranksearch import holdout as holdout_module
from aclora_ext.ranksearch.holdout import HeldCalls, held_by_rule, masked_loss
from aclora_ext.ranksearch.identities import fingerprint

SHARE = 0.5


@pytest.fixture
def train_util(monkeypatch):
    """sd-scripts' library.train_util as train_network.py calls it: the noise for each call comes from
    ``module.draws`` (one (noise, timesteps) per call), so two runs can give an item the same noise."""
    module = types.ModuleType("library.train_util")
    module.draws = []

    def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
        noise, t = module.draws.pop(0)
        return noise, add_noise(latents, noise, t), t

    module.get_noise_noisy_latents_and_timesteps = get_noise_noisy_latents_and_timesteps
    module.conditional_loss = lambda pred, target, loss_type, reduction, huber_c=None: F.mse_loss(
        pred, target, reduction=reduction
    )
    monkeypatch.setitem(sys.modules, "library.train_util", module)
    return module


def sd_network(models, steps: int = 100, **network_args):
    torch.manual_seed(0)  # the factors' initialisation
    network = create_network(1.0, 4, 4.0, None, models["text_encoder"], models["unet"], **network_args)
    network.prepare_network(argparse.Namespace(cache_latents=True, max_train_steps=steps))
    network.apply_to(models["text_encoder"], models["unet"], True, True)
    return network


def conditioning(models, images: list[int]) -> torch.Tensor:
    """A fixed text conditioning per image (its caption)."""
    width = models["unet"].config.cross_attention_dim
    return torch.stack([torch.randn(4, width, generator=torch.Generator().manual_seed(100 + i)) for i in images])


def draw(latents: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (latents.shape[0],), generator=g)


def sd_step(network, models, train_util, latents, images, optimizer, noise=None) -> torch.Tensor:
    """One sd-scripts training step on ``latents`` (items of ``images``); returns the loss it logs."""
    train_util.draws.append(noise if noise is not None else draw(latents, len(images)))
    target, noisy, t = train_util.get_noise_noisy_latents_and_timesteps(None, None, latents)
    prediction = models["unet"](noisy, t, conditioning(models, images)).sample
    loss = train_util.conditional_loss(prediction.float(), target.float(), "l2", "none", None)
    loss = loss.mean(dim=list(range(1, loss.ndim))).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    network.record_loss(loss.detach())
    return loss.detach()


def planted_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def rule_split(latents: torch.Tensor, view_share: float) -> tuple[list[int], list[int]]:
    """The first epoch's rule, computed independently of the network: (held, trained) item positions."""
    held = held_by_rule(fingerprint(latents), view_share).tolist()
    return [i for i, h in enumerate(held) if h], [i for i, h in enumerate(held) if not h]


def parameters(network) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.named_parameters()}


def test_the_masked_loss_keeps_its_value_and_has_the_gradient_of_the_trained_items_mean():
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    out = masked_loss(losses, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(out, losses.detach())  # what sd-scripts logs
    out.mean().backward()
    assert torch.allclose(losses.grad, torch.tensor([0.5, 0.0, 0.5, 0.0]))  # d/dl of (l0 + l2) / 2
    losses.grad = None
    masked_loss(losses, torch.zeros(4)).mean().backward()  # a batch of held items only
    assert torch.equal(losses.grad, torch.zeros(4))


def test_held_items_add_no_update_while_held_in_a_mixed_batch(train_util):
    """A batch mixing held and trained items moves the factors exactly as a batch of its trained items alone
    (same noise, plain SGD: the change is the gradient; AdamW's first step is its sign, which amplifies rounding),
    in the first epoch (the rule) and after the identities are resolved (the table);
    sd-scripts' logged loss still counts every item."""
    images = planted_images(16, seed=1)
    net = sd_network(tiny.sd1_models(seed=0), holdout=str(SHARE))
    held, trained = rule_split(images, net.holdout.view_share)
    assert held and trained
    mixed = [held[0], trained[0], held[1], trained[1]]
    runs = {}
    for name, items in (("mixed", mixed), ("trained only", [trained[0], trained[1]])):
        models = tiny.sd1_models(seed=0)
        network = sd_network(models, holdout=str(SHARE)) if name == "mixed" else sd_network(models)
        optimizer = torch.optim.SGD(network.parameters(), lr=1.0)
        before = parameters(network)
        noise_all = draw(images[mixed], 7)
        keep = [mixed.index(i) for i in items]
        noise = (noise_all[0][keep], noise_all[1][keep])
        logged = sd_step(network, models, train_util, images[items], items, optimizer, noise)
        runs[name] = ({k: v - before[k] for k, v in parameters(network).items()}, logged, network)
    (mixed_change, logged, network), (alone_change, _, _) = runs["mixed"], runs["trained only"]
    scale = max(float(v.abs().max()) for v in alone_change.values())
    assert scale > 1e-4  # the step does move the factors
    for key, change in alone_change.items():
        assert torch.allclose(mixed_change[key], change, rtol=1e-4, atol=1e-6 * scale), key
    # the logged loss is the mean over all four items, held ones included
    models = tiny.sd1_models(seed=0)
    plain = sd_network(models)
    with torch.no_grad():
        train_util.draws.append(draw(images[mixed], 7))
        target, noisy, t = train_util.get_noise_noisy_latents_and_timesteps(None, None, images[mixed])
        expected = F.mse_loss(models["unet"](noisy, t, conditioning(models, mixed)).sample, target)
    assert float(logged) == pytest.approx(float(expected), rel=1e-5)
    del plain


def test_after_resolution_held_images_stay_held_and_their_other_views_too(train_util, caplog):
    """An image is held only when every view the rule saw was held; views first seen later are held until known."""
    models = tiny.sd1_models(seed=0)
    images = planted_images(16, seed=2)
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        network = sd_network(models, holdout=str(SHARE))
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        network.on_epoch_start()
        for i in range(16):
            sd_step(network, models, train_util, images[i : i + 1], [i], optimizer)
        network.on_epoch_start()
    hold = network.holdout
    held_images = hold.held
    assert len(held_images) == round(SHARE * 16) and "holdout: 8 of 16 images held out" in caplog.text
    rule_held = set(rule_split(images, hold.view_share)[0])
    assert held_images <= rule_held  # ids count from 0 in the order seen: image i here
    trained = hold.trained(fingerprint(images)).tolist()
    assert [i for i, t in enumerate(trained) if t == 0.0] == sorted(held_images)
    # a view never seen (a flipped copy's cached tensor) is held until the identities know it
    assert hold.trained(fingerprint(images[:1].flip(-1) + 0.01)).tolist() == [0.0]


def test_a_step_of_held_items_only_moves_sgd_by_nothing_and_every_image_trains_after_until(train_util, caplog):
    """Batch size 1: a held item's step gives a zero gradient (plain SGD: no move); once holdout_until of the
    run is done, the same item trains."""
    models = tiny.sd1_models(seed=0)
    images = planted_images(8, seed=3)
    network = sd_network(models, steps=10, holdout=str(SHARE), holdout_until="0.5")
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    held, _ = rule_split(images, network.holdout.view_share)
    network.on_epoch_start()
    before = parameters(network)
    sd_step(network, models, train_util, images[held[:1]], held[:1], optimizer)
    assert all(torch.equal(before[k], v) for k, v in parameters(network).items())
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    network.clock.optimizer_steps = 5  # half the run done
    assert not network.holdout.active and not network.validation_active
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        sd_step(network, models, train_util, images[held[:1]], held[:1], optimizer)
        sd_step(network, models, train_util, images[held[:1]], held[:1], optimizer)
    assert any(not torch.equal(before[k], v) for k, v in parameters(network).items())
    # the log says once, at the first step after holdout_until, that the held images train again
    lines = [r.getMessage() for r in caplog.records if "train again" in r.getMessage()]
    assert lines == [f"AC-LoRA: holdout: the {len(network.holdout.held)} held image(s) train again from 50% of the run "
                     "(holdout_until=0.5)"]


def test_the_rank_search_judges_on_the_held_items_recorded_training_calls(train_util):
    """After the first epoch the held items' calls are kept (mask kept in mixed batches); the replay is the held
    items' loss as sd-scripts computes it, and RESTARTs choose on it until holdout_until."""
    models = tiny.sd1_models(seed=0, pretrained=True)
    images = planted_images(12, seed=4)
    network = sd_network(models, steps=12, holdout=str(SHARE))
    calls = network.rank_search.loss_fn
    assert isinstance(calls, HeldCalls) and not network.validation_active
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    network.on_epoch_start()
    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    noises = [draw(images[b], 50 + i) for i, b in enumerate(batches)]
    for b, noise in zip(batches, noises):
        sd_step(network, models, train_util, images[b], b, optimizer, noise)
    network.items.resolve()
    held = network.holdout.held
    assert held and network.validation_active
    kept = [(b, noise) for b, noise in zip(batches, noises) if set(b) & held]
    assert len(calls.kept) == len(kept)
    # independent: sd-scripts' per-item loss of each held item, through the network as it is
    network.eval()
    expected = []
    with torch.no_grad():
        for b, (noise, t) in kept:
            x = add_noise(images[b], noise, t)
            loss = F.mse_loss(models["unet"](x, t, conditioning(models, b)).sample, noise, reduction="none")
            per_item = loss.mean(dim=(1, 2, 3))
            expected += [per_item[i] for i, image in enumerate(b) if image in held]
        replayed = calls()
    network.train()
    assert replayed.shape == (len(expected),) and torch.allclose(replayed, torch.stack(expected), rtol=1e-5)
    assert calls.groups.tolist() == [image for b, _ in kept for image in b if image in held]
    report = network.restart()
    assert report.p_source == "validation" and report.candidates > 1


def test_the_options_are_checked_and_a_split_given_wins(train_util, caplog):
    models = tiny.sd1_models(seed=0)
    with pytest.raises(OptionError, match=r"holdout='0.7' is not valid; allowed: a number > 0 and <= 0.5"):
        create_network(1.0, 4, 4.0, None, models["text_encoder"], models["unet"], holdout="0.7")
    with pytest.raises(OptionError, match="holdout=0.2 chooses ranks on a held-out loss.*restart_mode=paper"):
        create_network(1.0, 4, 4.0, None, models["text_encoder"], models["unet"], holdout="0.2", restart_mode="paper")
    network = create_network(1.0, 4, 4.0, None, models["text_encoder"], models["unet"], holdout="0.2")
    network.prepare_network(argparse.Namespace(cache_latents=False, max_train_steps=10))
    with pytest.raises(OptionError, match="holdout=0.2 needs --cache_latents"):
        network.apply_to(models["text_encoder"], models["unet"], True, True)
    network = create_network(1.0, 4, 4.0, None, models["text_encoder"], models["unet"], holdout="0.2")
    network.prepare_network(argparse.Namespace(cache_latents=True, validation_split=0.2, max_train_steps=10))
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        network.apply_to(models["text_encoder"], models["unet"], True, True)
    assert network.holdout is None and "holdout=0.2 is not used: a validation split is given" in caplog.text


def test_an_own_loop_holds_items_by_their_ids_until_holdout_until():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6))
    network = attach(model, max_rank=2, holdout=SHARE)
    network.set_training_length(total_steps=10)
    ids = torch.arange(16)
    held = held_by_rule(ids, SHARE)
    assert 0 < int(held.sum()) < 16
    losses = ((model(torch.randn(16, 6)) - torch.randn(16, 6)) ** 2).mean(dim=1)
    probe = losses.detach().clone().requires_grad_(True)
    network.item_loss(probe, ids).backward()
    assert torch.equal(probe.grad == 0, held)
    network.clock.optimizer_steps = 7  # past holdout_until=0.7
    probe.grad = None
    network.item_loss(probe, ids).backward()
    assert torch.allclose(probe.grad, torch.full((16,), 1 / 16))
    with pytest.raises(ValueError, match="allowed with holdout: integer image ids"):
        network.clock.optimizer_steps = 0
        network.item_loss(probe, ["a"] * 16)
    assert holdout_module.loop_trained(network.holdout, [1, 2], torch.device("cpu")).shape == (2,)


# --- planted: the rank search cuts what helps only the trained images, keeps what helps the held ones too --------
def directions(matrix: torch.Tensor, away=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The singular pairs (u, v) of ``matrix``, largest first, orthogonal to the pair ``away`` when given."""
    if away is not None:
        u0, v0 = away
        matrix = matrix - torch.outer(u0, u0 @ matrix)
        matrix = matrix - torch.outer(matrix @ v0, v0)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return [(u[:, i], vh[i]) for i in range(min(8, u.shape[1]))]


def planted_run(train_util, plant: str):
    """Eight style latents, each with its own fixed noise and timestep (so the calls the gradients below are taken
    on are the calls the search replays), batches of 2, holdout=0.5, the factors frozen (lr 0). After the first
    epoch the held
    images are known; from the gradients of the held and of the trained items' losses on one U-Net layer
    (computed here, independently of the network's replay), that layer's LoRA gets two orthogonal components:
    the first lowers both losses; the second, smaller, lowers both too ("capacity") or lowers the trained items'
    loss while it raises the held ones' ("memorise"). A second epoch records the activations; the RESTART after
    it decides. Returns (the layer's kept rank, the report)."""
    models = tiny.sd1_models(seed=0, pretrained=True)
    data = tiny.style_dataset(n=8, seed=0)
    images = torch.stack([d["latents"] for d in data])
    network = sd_network(models, steps=40, holdout=str(SHARE), restart_every="2")
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(3)
    fixed = [draw(images[i : i + 1], 1000 + i) for i in range(8)]  # each image's noise and timestep, every epoch
    steps = []

    def epoch():
        network.on_epoch_start()
        for b in torch.randperm(8, generator=generator).view(4, 2).tolist():
            steps.append((b, (torch.cat([fixed[i][0] for i in b]), torch.cat([fixed[i][1] for i in b]))))
            sd_step(network, models, train_util, images[b], b, optimizer, steps[-1][1])

    epoch()
    ids = {i: image for (b, _), batch in zip(steps, network.items.batches) for i, image in zip(b, batch)}
    held = {i for i, image in ids.items() if image in network.holdout.held}  # in this test's numbering
    assert len(held) == 4
    module = next(m for m in network.unet_loras if isinstance(m.org_module, torch.nn.Linear) and m.rank >= 2)
    weight, scale = module.org_module.weight, module.multiplier * module.scale
    size = 0.2 * float(weight.norm())

    def gradients() -> tuple[torch.Tensor, torch.Tensor]:
        """The held and the trained items' loss gradients on the layer's weight (unit norm), on the epoch's calls."""
        network.eval()
        weight.requires_grad_(True)
        losses = {True: [], False: []}
        for b, (noise, t) in steps:
            x = add_noise(images[b], noise, t)
            per_item = F.mse_loss(models["unet"](x, t, conditioning(models, b)).sample, noise, reduction="none")
            for i, image in enumerate(b):
                losses[image in held].append(per_item[i].mean())
        g_held = torch.autograd.grad(torch.stack(losses[True]).mean(), weight, retain_graph=True)[0]
        g_trained = torch.autograd.grad(torch.stack(losses[False]).mean(), weight)[0]
        weight.requires_grad_(False)
        network.train()
        return g_held / g_held.norm(), g_trained / g_trained.norm()

    def plant_slot(slot: int, length: float, direction: tuple[torch.Tensor, torch.Tensor]) -> None:
        with torch.no_grad():
            module.lora_down.weight[slot] = direction[1]
            module.lora_up.weight[:, slot] = length * direction[0] / scale

    with torch.no_grad():
        module.lora_down.weight.zero_()
        module.lora_up.weight.zero_()
    g_held, g_trained = gradients()
    first = directions(-(g_held + g_trained))[0]
    plant_slot(0, size, first)
    g_held, g_trained = gradients()  # where the first component put the layer

    def slope(direction, gradient) -> float:  # the loss's first-order change along the component
        return float((torch.outer(*direction) * gradient).sum())

    if plant == "memorise":  # the trained items' loss falls, the held ones' rises
        candidates = directions(g_held - g_trained, first)
        second = next(d for d in candidates if slope(d, g_trained) < 0 < slope(d, g_held))
    else:
        candidates = directions(-(g_held + g_trained), first)
        second = next(d for d in candidates if max(slope(d, g_trained), slope(d, g_held)) < 0)
    plant_slot(1, 0.5 * size, second)
    epoch()
    # the second component's importance (the RMS it adds to the layer's output) half the first's, so that the
    # search's candidates cut it first: its length scaled by the inputs' energy along each direction
    energy = network.rank_search.stats[module.lora_name].gram.diagonal()
    with torch.no_grad():
        module.lora_up.weight[:, 1] *= float((energy[0] / energy[1]).sqrt())
    network.on_epoch_start()
    report = network.history[-1]
    return report.ranks[module.lora_name], report


@pytest.mark.parametrize("plant, kept", [("memorise", 1), ("capacity", 2)])
def test_a_planted_memorising_component_is_cut_and_a_capacity_one_kept_with_no_split_given(train_util, plant, kept):
    rank, report = planted_run(train_util, plant)
    assert report.p_source == "validation"
    assert rank == kept


def test_under_gradient_accumulation_a_micro_batch_of_held_items_adds_nothing_to_the_accumulated_gradient(train_util):
    """Two micro-batches accumulated into one optimizer step (sd-scripts' --gradient_accumulation_steps 2): one of
    held items only, one mixed; the accumulated gradient is the mixed one's trained items' gradient alone."""
    images = planted_images(16, seed=5)
    grads = {}
    for name in ("accumulated", "trained only"):
        models = tiny.sd1_models(seed=0)
        network = sd_network(models, holdout=str(SHARE)) if name == "accumulated" else sd_network(models)
        held, trained = rule_split(images, holdout_module.RULE_MARGIN * SHARE)  # the first epoch's rule
        mixed = [held[2], trained[0]]
        micro = [(held[:2], draw(images[held[:2]], 8)), (mixed, draw(images[mixed], 9))]
        if name == "trained only":
            noise, t = micro[1][1]
            micro = [([trained[0]], (noise[1:], t[1:]))]
        network.zero_grad()
        for items, noise in micro:
            train_util.draws.append(noise)
            target, noisy, t = train_util.get_noise_noisy_latents_and_timesteps(None, None, images[items])
            prediction = models["unet"](noisy, t, conditioning(models, items)).sample
            loss = train_util.conditional_loss(prediction.float(), target.float(), "l2", "none", None)
            (loss.mean(dim=(1, 2, 3)).mean() / len(micro)).backward()
        grads[name] = {k: p.grad.clone() for k, p in network.named_parameters() if p.grad is not None}
    # accelerate divides by the micro-batches: the step's gradient is the trained item's, halved (a smaller step)
    scale = max(float(g.abs().max()) for g in grads["trained only"].values())
    assert scale > 0
    for key, grad in grads["trained only"].items():
        assert torch.allclose(2 * grads["accumulated"][key], grad, rtol=1e-4, atol=1e-6 * scale), key
