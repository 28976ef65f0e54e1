"""The product mode's rank search: what it keeps, what decides it, and what reaches the file.

Every expectation is computed here independently: updates from the explicit
matrices with ``torch.linalg.svd``, input energies from the inputs the test fed,
held-out losses from a planted truth the adapter is compared with.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from aclora_ext import OptionError, attach
from aclora_ext.files.storage import read_metadata

IN, OUT, R = 32, 24, 12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen(seed)))[0]


def layer_model(layers: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(IN, OUT if i == layers - 1 else IN, bias=False) for i in range(layers)))


class Planted:
    """One layer's truth (a planted update) and an adapter holding it plus noise components of its own."""

    def __init__(self, singular_values: torch.Tensor, noise: float, seed: int, out_dim: int = OUT,
                 in_dim: int = IN) -> None:
        k = len(singular_values)
        basis_out, basis_in = orthonormal(out_dim, R, seed), orthonormal(in_dim, R, seed + 1)
        self.truth = basis_out[:, :k] @ torch.diag(singular_values) @ basis_in[:, :k].T
        noise_values = noise * torch.linspace(1.0, 0.6, R - k)
        self.adapter = self.truth + basis_out[:, k:] @ torch.diag(noise_values) @ basis_in[:, k:].T
        self.rank = k

    def load_into(self, module) -> None:
        """Factors whose update (with the module's alpha/R) is the adapter's matrix."""
        u, s, vh = torch.linalg.svd(self.adapter / module.scale, full_matrices=False)
        with torch.no_grad():
            module.lora_up.weight.copy_(u[:, :R] * s[:R].sqrt())
            module.lora_down.weight.copy_(s[:R].sqrt()[:, None] * vh[:R])


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, IN, generator=gen(seed))


def record_inputs(network, model: nn.Module, x: torch.Tensor) -> None:
    """Training-mode forwards with gradients on (what a training step does), without changing the weights."""
    network.train()
    with torch.enable_grad():
        model(x)


def held_out_loss(model: nn.Module, truths: list, seed: int = 99):
    """The held-out loss: the adapted model against base + truth on fresh inputs."""
    x = inputs(512, seed)
    with torch.no_grad():
        target = x
        for layer, truth in zip(model, truths):
            target = target @ (layer.weight + truth).T
    return lambda: (model(x) - target).pow(2).mean()


def planted_setup(spectra: list, noise: float, seed: int = 0, **options):
    model = layer_model(len(spectra), seed)
    network = attach(model, max_rank=R, alpha=float(R), **options)
    plants = [Planted(torch.as_tensor(s, dtype=torch.float32), noise, seed + 10 * i,
                      in_dim=IN, out_dim=m.out_dim) for i, (s, m) in enumerate(zip(spectra, network.loras))]
    for plant, m in zip(plants, network.loras):
        plant.load_into(m)
    record_inputs(network, model, inputs(256, seed + 1))
    return model, network, plants


# --- with a held-out loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [(2, 5), (1, 7)])
def test_planted_cliff_ranks_are_found_with_a_held_out_loss(ranks):
    spectra = [torch.linspace(2.0, 1.0, k) for k in ranks]
    model, network, plants = planted_setup(spectra, noise=0.5)
    network.set_validation(held_out_loss(model, [p.truth for p in plants]))
    report = network.restart()
    assert [report.ranks[m.lora_name] for m in network.loras] == list(ranks)
    assert report.p_source == "validation" and report.candidates > 1


def test_a_planted_smooth_spectrum_keeps_what_the_held_out_loss_can_tell_from_the_noise():
    """Power-law signal s_j = 2 j^-1 over every slot, noise components of 0.3: the components above the
    noise help the held-out loss, the tail below it cannot be told apart; the rank lands between."""
    singular_values = 2.0 * torch.arange(1, 9, dtype=torch.float32).pow(-1.0)  # 2, 1, 0.67, ..., 0.25
    model, network, plants = planted_setup([singular_values], noise=0.3)
    network.set_validation(held_out_loss(model, [plants[0].truth]))
    report = network.restart()
    kept = report.ranks[network.loras[0].lora_name]
    above_noise = int((singular_values > 0.3).sum())  # 6
    assert above_noise - 1 <= kept <= len(singular_values)
    # and it is the best of the prefixes the held-out loss could judge, within the grid's resolution
    best = min(prefix_loss(model, network.loras[0], plants[0], k) for k in range(1, R + 1))
    assert prefix_loss(model, network.loras[0], plants[0], kept) <= best * 1.02


def prefix_loss(model, module, plant: Planted, k: int) -> float:
    """Held-out loss with the module's update cut to its k largest components (computed with torch.linalg.svd)."""
    delta = (module.up_matrix() @ module.down_matrix()).detach() * module.scale
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    x = inputs(512, 99)
    with torch.no_grad():
        cut = (u[:, :k] * s[:k]) @ vh[:k]
        return float((x @ (model[0].weight + cut).T - x @ (model[0].weight + plant.truth).T).pow(2).mean())


@pytest.mark.parametrize("min_rank", [1, 2])
def test_noise_only_updates_keep_min_rank(min_rank):
    model, network, plants = planted_setup([torch.zeros(0), torch.zeros(0)], noise=0.4, min_rank=str(min_rank))
    network.set_validation(held_out_loss(model, [torch.zeros(OUT if i else IN, IN) for i in range(2)]))
    report = network.restart()
    assert set(report.ranks.values()) == {min_rank}


def test_the_held_out_choice_reaches_the_file_and_its_metadata(tmp_path):
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    network.set_validation(held_out_loss(model, [plants[0].truth]))
    path = tmp_path / "held-out.safetensors"
    before = [(m.lora_down.weight.detach().clone(), m.lora_up.weight.detach().clone()) for m in network.loras]
    assert network.save_weights(str(path))
    assert load_file(path)[f"{network.loras[0].lora_name}.lora_down.weight"].shape[0] == 3
    decision = json.loads(read_metadata(str(path))["aclora_file_decision"])
    assert decision["source"] == "validation" and decision["candidates"] > 1
    # deciding at save time changes nothing in training: the factors are the same as before (the analysis
    # rebases them on their update's SVD to judge the candidates, and must put the trained ones back)
    assert network.ranks()[network.loras[0].lora_name] == R
    for m, (down, up) in zip(network.loras, before):
        assert torch.equal(m.lora_down.weight, down), f"{m.lora_name}: save_weights left lora_down changed"
        assert torch.equal(m.lora_up.weight, up), f"{m.lora_name}: save_weights left lora_up changed"


def test_the_held_out_loss_never_sees_the_training_statistics_or_the_training_mode():
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    seen = []

    def loss_fn():
        seen.append((network.training, torch.is_grad_enabled()))
        return held_out_loss(model, [plants[0].truth])()

    network.set_validation(loss_fn)
    stats = network.rank_search.stats[network.loras[0].lora_name]
    count = stats.count
    network.restart()
    assert seen and set(seen) == {(False, False)}
    assert stats.count == 0 and count > 0  # reset by the RESTART, and nothing recorded while evaluating
    assert network.training


def test_until_hands_the_held_out_share_back_and_freezes_the_chosen_level():
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    network.set_training_length(total_steps=10)
    network.set_validation(held_out_loss(model, [plants[0].truth]), until=0.5)
    network.clock.optimizer_steps = 4
    assert network.validation_active
    chosen = network.restart()
    assert chosen.p_source == "validation"
    network.clock.optimizer_steps = 6
    assert not network.validation_active
    record_inputs(network, model, inputs(256, 7))
    frozen = network.restart()
    # the run trains at the chosen ranks (their freed slots held): no further cut without held-out evidence
    assert frozen.p_source == "frozen" and frozen.ranks == chosen.ranks
    assert network.rank_search.frozen_level == chosen.level


def test_the_level_scores_survive_save_state_and_resume():
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3), torch.linspace(1.0, 0.5, 6)], noise=0.5)
    network.set_validation(held_out_loss(model, [p.truth for p in plants]))
    network.restart()
    state = network.state_dict()
    _, fresh, _ = planted_setup([torch.linspace(2.0, 1.0, 3), torch.linspace(1.0, 0.5, 6)], noise=0.5)
    fresh.load_state_dict(state)
    assert fresh.rank_search.scores == pytest.approx(network.rank_search.scores)
    assert fresh.rank_search.frozen_level == network.rank_search.frozen_level
    assert [h["level"] for h in fresh.history] == pytest.approx([h["level"] for h in network.history], abs=1e-8)


def test_activation_sums_cover_every_training_forward_and_the_output_scale_one_in_every_few():
    from aclora_ext.functional import OUTPUT_SAMPLE_EVERY

    model = layer_model(1)
    network = attach(model, max_rank=R, alpha=float(R))
    module = network.loras[0]
    batches = [inputs(8, 40 + i) for i in range(2 * OUTPUT_SAMPLE_EVERY + 1)]
    for x in batches:
        record_inputs(network, model, x)
    stats = network.rank_search.stats[module.lora_name]
    with torch.no_grad():
        hidden = [module.lora_down(x) for x in batches]
        outputs = [model(x) for x in batches]
    assert stats.count == sum(h.shape[0] for h in hidden)
    assert torch.allclose(stats.gram, sum(h.T @ h for h in hidden), rtol=1e-5, atol=1e-5)
    sampled = outputs[::OUTPUT_SAMPLE_EVERY]  # the first forward, then one in every OUTPUT_SAMPLE_EVERY
    assert len(sampled) == 3 and stats.out_numel == sum(o.numel() for o in sampled)
    assert float(stats.out_sq) == pytest.approx(float(sum(o.pow(2).sum() for o in sampled)), rel=1e-5)


# --- the held-out noise: a cut must beat keeping everything by more than it -----------------------------------------
NOISY = torch.tensor([-0.3, 0.25] * 4)  # a paired difference of mean -0.025 and standard error ~0.1


def test_the_pessimistic_loss_is_the_mean_plus_one_standard_error_of_the_paired_difference():
    from aclora_ext.functional import pessimistic_loss

    reference = torch.rand(10, generator=gen(1))
    items = reference + torch.randn(10, generator=gen(2)) * 0.1
    difference = (items - reference).double()
    expected = float(items.double().mean()) + float(difference.std()) / math.sqrt(10)
    assert pessimistic_loss(items, reference) == pytest.approx(expected, rel=1e-12)
    assert pessimistic_loss(reference, reference) == pytest.approx(float(reference.double().mean()), rel=1e-12)
    assert pessimistic_loss(7.0 * items, 7.0 * reference) == pytest.approx(7.0 * expected, rel=1e-6)  # units
    assert pessimistic_loss(items[:1], reference[:1]) == pytest.approx(float(items[0]), rel=1e-6)  # one item
    assert pessimistic_loss(torch.tensor([1.0, math.nan]), reference[:2]) == math.inf


# --- without a held-out loss ----------------------------------------------------------------------------------------
def test_without_a_held_out_loss_components_below_min_importance_of_the_largest_go():
    """Importance = s_j x rms(x . v_j) / rms(layer output), computed here from the inputs the test fed."""
    model, network, plants = planted_setup([torch.tensor([3.0, 1.0, 0.02, 0.01])], noise=0.002)
    module = network.loras[0]
    x = inputs(256, 1)  # what planted_setup recorded
    delta = (module.up_matrix() @ module.down_matrix()).detach() * module.scale
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    with torch.no_grad():
        out_rms = model(x).pow(2).mean().sqrt()
    importance = s * (x @ vh.T).pow(2).mean(dim=0).sqrt() / out_rms
    expected = int((importance > 0.01 * importance.max()).sum())
    _, metadata, _ = network.state_for_export()  # without a held-out loss the rule decides the file
    assert json.loads(metadata["aclora_ranks"])[module.lora_name] == expected == 2


def test_min_importance_zero_keeps_every_nonzero_component():
    model, network, plants = planted_setup([torch.tensor([3.0, 1.0, 0.05, 0.01])], noise=0.002,
                                           min_importance="0")
    assert network.restart().ranks[network.loras[0].lora_name] == R


def test_the_file_ranks_are_the_rule_applied_to_the_final_update(tmp_path):
    """Decided again at save time: what the adapter learned after the last RESTART is judged too."""
    model, network, plants = planted_setup([torch.tensor([3.0, 1.0, 0.02])], noise=0.001)
    module = network.loras[0]
    assert network.restart().ranks[module.lora_name] == R  # no held-out loss: training left whole
    # after the RESTART the weakest slot (noise) learns a component as strong as the second one
    j = R - 1
    direction_out, direction_in = orthonormal(OUT, 1, 40), orthonormal(IN, 1, 41)
    with torch.no_grad():
        module.lora_up.weight[:, j] = direction_out[:, 0] / module.scale
        module.lora_down.weight[j] = direction_in[:, 0]
    record_inputs(network, model, inputs(256, 1))
    path = tmp_path / "final.safetensors"
    network.save_weights(str(path))
    tensors = load_file(path)
    assert tensors[f"{module.lora_name}.lora_down.weight"].shape[0] == 3
    file_delta = float(tensors[f"{module.lora_name}.alpha"]) / 3 * \
        tensors[f"{module.lora_name}.lora_up.weight"] @ tensors[f"{module.lora_name}.lora_down.weight"]
    delta = (module.up_matrix() @ module.down_matrix()).detach() * module.scale
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    assert torch.allclose(file_delta, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)


# --- scale invariance: the loss's units do not choose the ranks -------------------------------------------------------
def train_run(loss_scale: float, validate: bool, steps: int = 60) -> tuple[list, dict]:
    """A small noisy regression trained with restarts every 20 steps (AdamW): ranks of every RESTART and of the
    file. Without a held-out loss, min_importance 0.1 makes the default rule cut something here."""
    torch.manual_seed(0)
    model = layer_model(2, seed=0)
    network = attach(model, max_rank=R, alpha=float(R), restart_every_steps="20",
                     **({} if validate else {"min_importance": "0.1"}))
    network.set_training_length(total_steps=steps)
    teacher = [Planted(torch.linspace(2.0, 1.0, k), 0.0, seed=20 + k, out_dim=m.out_dim).truth
               for k, m in zip((2, 4), network.loras)]
    x_train, g = inputs(64, 30), gen(31)
    with torch.no_grad():
        y_train = x_train
        for layer, truth in zip(model, teacher):
            y_train = y_train @ (layer.weight + truth).T
    if validate:
        check = held_out_loss(model, teacher)
        network.set_validation(lambda: loss_scale * check())
    # Adam is invariant to the loss's scale but for its eps: a negligible one keeps the runs the same up to
    # rounding, so what is pinned is the rank rule's own invariance
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-2, weight_decay=0.0, eps=1e-16)
    history = []
    for _ in range(steps):
        network.on_step_start()
        idx = torch.randint(0, 64, (16,), generator=g)
        loss = loss_scale * (model(x_train[idx]) - y_train[idx] - 0.3 * torch.randn(16, OUT, generator=g)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        network.record_loss(loss.detach())
    history = [h["ranks"] for h in network.history]
    _, metadata, _ = network.state_for_export()
    return history, json.loads(metadata["aclora_ranks"])


@pytest.mark.parametrize("validate", [False, True], ids=["no held-out loss", "held-out loss"])
def test_scaling_the_loss_changes_no_rank(validate):
    """x8 and x1/8 scale every loss exactly (powers of two), so the runs differ only if the rule reads the
    loss's units: the ranks must be identical. x10 and x0.1 also round differently, which moves the
    weights by rounding noise: a component at the threshold may flip, no more."""
    reference = train_run(1.0, validate)
    # with a held-out loss the RESTARTs cut; without one they leave training whole and the file is cut
    cut = [r for ranks in reference[0] for r in ranks] if validate else list(reference[1].values())
    assert len(reference[0]) == 2 and any(r < R for r in cut)
    for scale in (0.125, 8.0):
        assert train_run(scale, validate) == reference
    for scale in (0.1, 10.0):
        history, file_ranks = train_run(scale, validate)
        assert all(abs(a - b) <= 1 for h, ref in zip(history, reference[0]) for a, b in zip(h, ref))
        assert all(abs(file_ranks[k] - reference[1][k]) <= 1 for k in file_ranks)


def test_the_paper_rule_is_the_one_that_reads_the_loss_units():
    """The contrast that makes the test above meaningful: p = 1 - L^alpha moves with the loss's scale."""
    network = attach(layer_model(), max_rank=R, restart_mode="paper")
    assert network.restart(loss=0.1, progress=0.5).p != network.restart(loss=0.8, progress=0.5).p


# --- bad input -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "-0.1", "lots", "nan"])
def test_a_bad_min_importance_is_refused_naming_the_key_and_the_range(value):
    with pytest.raises(OptionError) as caught:
        attach(layer_model(), max_rank=4, min_importance=value)
    assert "min_importance" in str(caught.value) and repr(value) in str(caught.value) and ">= 0" in str(caught.value)


@pytest.mark.parametrize("until", [0, 1.5, "half"])
def test_set_validation_refuses_a_bad_until(until):
    network = attach(layer_model(), max_rank=4)
    with pytest.raises(OptionError, match="until"):
        network.set_validation(lambda: 0.0, until=until)


def test_set_validation_refuses_something_that_is_not_a_function():
    with pytest.raises(OptionError, match="loss_fn"):
        attach(layer_model(), max_rank=4).set_validation(0.5)


@pytest.mark.parametrize("options, named", [({"restart_mode": "paper"}, "restart_mode=paper"),
                                            ({"restart_mode": "off"}, "restart_mode=off"),
                                            ({"fixed_p": "0.9"}, "fixed_p=0.9")])
def test_a_held_out_loss_that_could_choose_nothing_is_refused(options, named):
    with pytest.raises(OptionError, match=named):
        attach(layer_model(), max_rank=4, **options).set_validation(lambda: 0.0)


def test_a_held_out_loss_that_is_never_finite_falls_back_to_the_default_level_with_a_warning(caplog):
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    network.set_validation(lambda: float("nan"))
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        report = network.restart()
    assert report.p_source == "prior" and report.level == pytest.approx(2.0)
    assert any("never finite" in r.getMessage() for r in caplog.records)


def test_each_product_restart_logs_one_line_with_the_threshold_and_how_it_was_chosen(caplog):
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    network.set_validation(held_out_loss(model, [plants[0].truth]))
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        report = network.restart()
    lines = [r.getMessage() for r in caplog.records if "RESTART #" in r.getMessage()]
    assert lines == [report.line()]
    assert "chosen on held-out loss" in lines[0] and "ranks min/median/max 3/3/3" in lines[0]
    assert math.isfinite(report.level)


def test_the_activation_statistics_survive_save_state_and_resume_so_the_next_restart_decides_the_same():
    """--save_state between RESTARTs, --resume: the resumed network decides from what the whole interval saw."""
    spectra = [torch.tensor([3.0, 1.0, 0.02, 0.01])]
    model, network, plants = planted_setup(spectra, noise=0.002)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    assert state["aclora_input_stats"].numel() > 0 and network.aclora_input_stats.numel() == 0  # filled for saving only
    _, fresh, _ = planted_setup(spectra, noise=0.002, seed=5)  # other weights and statistics
    fresh.load_state_dict(state)
    name = network.loras[0].lora_name
    recorded, restored = network.rank_search.stats[name], fresh.rank_search.stats[name]
    assert torch.equal(recorded.gram, restored.gram) and recorded.count == restored.count
    assert float(recorded.out_sq) == float(restored.out_sq) and recorded.out_numel == restored.out_numel
    assert fresh.restart().ranks == network.restart().ranks


# --- issue 17: the one-standard-error parsimony rule, and freed slots held out of the forward -----------------------
@pytest.mark.parametrize("difference, cuts", [
    (NOISY, True),  # a cut no worse than keeping everything beyond the held-out noise: the fewer components win
    (torch.full((8,), 0.1), False),  # a cut worse on every item: kept
])
def test_parsimony_takes_the_fewest_components_that_the_held_out_loss_cannot_tell_from_the_best(difference, cuts):
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    x = inputs(64, 5)
    with torch.no_grad():
        base = x @ model[0].weight.T
        full = float((model(x) - base).pow(2).sum())

    def loss_fn():
        cut = float((model(x) - base).pow(2).sum()) < 0.999 * full
        return torch.ones(8) + (difference if cut else 0.0)

    network.set_validation(loss_fn)
    report = network.restart()
    assert report.p_source == "validation"
    assert (report.ranks[network.loras[0].lora_name] < R) == cuts


def test_the_standard_error_counts_images_when_the_items_groups_are_given():
    from aclora_ext.functional import paired_excess

    best = torch.zeros(8)
    items = torch.tensor([0.1, 0.1, 0.1, 0.1, -0.1, -0.1, -0.1, -0.1]) + 0.02  # two images of four items each
    per_item = paired_excess(items, best)
    per_image = paired_excess(items, best, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert per_item > per_image  # items of one image are not independent: the band is wider per image


def test_slots_freed_by_a_held_out_cut_stay_out_of_the_forward_and_learn_nothing():
    """After a held-out cut the module trains at its kept rank; its held slots add nothing to the
    output, get no gradient, and the file and the next RESTART see only the kept components."""
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    network.set_validation(held_out_loss(model, [plants[0].truth]))
    kept = network.restart().ranks[network.loras[0].lora_name]
    module = network.loras[0]
    held = module.held
    assert held is not None and int(held.sum()) == R - kept
    x = inputs(32, 9)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert float(module.lora_down.weight.grad[held].abs().sum()) == 0.0
        assert float(module.lora_up.weight.grad[:, held].abs().sum()) == 0.0
        optimizer.step()
    with torch.no_grad():
        hidden = module.lora_down(x) * (~held).float()
        assert torch.allclose(model(x), x @ model[0].weight.T + module.lora_up(hidden) * module.scale, atol=1e-5)
    module.clear_held()
    assert float(module.lora_up.weight[:, held].abs().sum()) == 0.0


def test_held_slots_survive_save_state_and_resume():
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    network.set_validation(held_out_loss(model, [plants[0].truth]))
    network.restart()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    _, fresh, _ = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.loras[0].held, network.loras[0].held)


# --- the one-standard-error rule and the fine levels at their edges (aclora_ext.functional.levels) ---------------
TWO_IMAGES = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
#: a paired difference of mean 0.15: beyond one standard error of eight items (0.094), within one of two images (0.25)
IMAGE_SHIFT = torch.tensor([0.4, 0.41, 0.39, 0.4, -0.1, -0.09, -0.11, -0.1], dtype=torch.float64)


def test_training_keeps_the_fewest_components_within_the_band_by_default_and_counts_images_when_grouped():
    from aclora_ext.functional import parsimonious_choice

    best = torch.tensor([1.0, 1.1, 0.9, 1.0], dtype=torch.float64)
    within = {(8,): best, (4,): best + torch.tensor([0.03, -0.03, 0.02, -0.01], dtype=torch.float64)}
    assert parsimonious_choice(within) == (4,)  # the default is the training rule, not the file's
    assert parsimonious_choice(within, final=True) == (8,)
    tied = {(8,): best, (4,): best.clone()}  # an excess of exactly 0 is within the band
    assert parsimonious_choice(tied) == (4,)
    ones = torch.ones(8, dtype=torch.float64)
    grouped = {(8,): ones, (4,): ones + IMAGE_SHIFT}
    assert parsimonious_choice(grouped) == (8,)  # eight items: the cut is beyond the band
    assert parsimonious_choice(grouped, TWO_IMAGES) == (4,)  # two images: within it
    # signatures that do not nest: the fewest components in total, not the first in tuple order
    flat = torch.ones(3, dtype=torch.float64)
    assert parsimonious_choice({(4, 4): flat, (1, 5): flat.clone(), (3, 1): flat.clone()}) == (3, 1)


def test_the_files_own_cut_edges_one_candidate_an_exact_tie_equal_margins_and_image_groups():
    from aclora_ext.functional import parsimonious_choice

    x = torch.tensor([1.0, 1.1, 0.9, 1.0], dtype=torch.float64)
    assert parsimonious_choice({(8,): x}, final=True) == (8,)  # nothing to cut
    assert parsimonious_choice({(8,): x, (4,): x.clone()}, final=True) == (8,)  # a margin of 0 is no win
    same = x - 0.1
    assert parsimonious_choice({(8,): x, (4,): same, (2,): same.clone()}, final=True) == (2,)  # tie: fewer
    ones = torch.ones(8, dtype=torch.float64)
    grouped = {(8,): ones + IMAGE_SHIFT, (4,): ones}
    assert parsimonious_choice(grouped, final=True) == (4,)
    assert parsimonious_choice(grouped, TWO_IMAGES, final=True) == (8,)
    # "everything" is the signature of the largest total: (3, 5), not (5, 1), which comes first in tuple order
    band = torch.tensor([0.0, 0.4, -0.4, 0.0], dtype=torch.float64)
    candidates = {(3, 5): x, (5, 1): x - 0.05 + band, (1, 1): x - 0.03}
    assert parsimonious_choice(candidates, final=True) == (1, 1)


def test_no_finite_candidate_is_an_error_naming_the_rule():
    from aclora_ext.functional import parsimonious_choice

    with pytest.raises(ValueError, match=r"^parsimonious_choice: no candidate has a finite held-out loss$"):
        parsimonious_choice({(8,): torch.tensor([math.nan])})


def test_fine_levels_edges_strictly_inside_the_window_never_the_level_itself_and_four_by_default():
    from aclora_ext.functional import refine_levels

    assert refine_levels([], 1.0) == [] and refine_levels([torch.zeros(3)], 1.0) == []  # nothing to cut
    pair = [torch.tensor([100.0, 60.0])]  # two importances: one cut, at log10(100/60) / 2
    assert refine_levels(pair, 0.25) == pytest.approx([0.5 * math.log10(100 / 60)], abs=1e-6)
    apart = [torch.tensor([100.0, 1.0])]  # levels 0 and 2: the cut at exactly 1.0
    assert refine_levels(apart, 1.0) == []  # the level itself
    assert refine_levels(apart, 1.25) == [] and refine_levels(apart, 0.75) == []  # a coarse neighbour
    assert refine_levels(apart, 1.1) == [1.0]
    # levels 0, 0.05, ..., 0.5: ten cuts 0.025 .. 0.475 inside (0, 0.5); four of them by default, evenly spread
    ladder = [torch.tensor([100.0 * 10 ** (-0.05 * j) for j in range(11)], dtype=torch.float64)]
    assert refine_levels(ladder, 0.25) == pytest.approx([0.025, 0.175, 0.325, 0.475], abs=1e-9)


def test_held_slots_are_one_int64_entry_per_slot_and_a_module_holding_none_reads_zeros():
    """The state's held-slot tensor: every module's slots in order, 1 where held, 0 where in use (a module that
    holds none: all zeros); ``hold_from`` reads it back into the same held slots."""
    from aclora_ext.lora.batching import held_slots, hold_from
    from aclora_ext.lora.module import ACLoRAModule

    modules = [ACLoRAModule("lora_a", nn.Linear(8, 6), rank=4, alpha=4.0),
               ACLoRAModule("lora_b", nn.Linear(8, 6), rank=3, alpha=3.0),
               ACLoRAModule("lora_c", nn.Conv2d(4, 6, 3), rank=2, alpha=2.0)]
    modules[0].hold_slots(torch.tensor([False, True, False, True]))
    modules[2].hold_slots(torch.tensor([True, False]))
    row = held_slots(modules)
    assert row.dtype == torch.int64 and row.tolist() == [0, 1, 0, 1, 0, 0, 0, 1, 0]
    fresh = [ACLoRAModule(m.lora_name, layer, rank=m.rank, alpha=float(m.rank))
             for m, layer in zip(modules, (nn.Linear(8, 6), nn.Linear(8, 6), nn.Conv2d(4, 6, 3)))]
    hold_from(fresh, row)
    assert [None if m.held is None else m.held.tolist() for m in fresh] == [
        [False, True, False, True], None, [True, False]]


# --- the RESTART history: what a resume and a file's metadata give back ------------------------------------
def test_the_restart_history_survives_save_state_and_resume_field_by_field():
    """Every field the resumable state keeps comes back as the RESTART recorded it (the product mode's
    held-out choice: its source, level and held-out loss; its time to the microsecond; the mode and maximum rank
    the network has); only the energy share, none in product mode, reads back as None."""
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3), torch.linspace(1.0, 0.5, 6)], noise=0.5)
    network.set_validation(held_out_loss(model, [p.truth for p in plants]))
    network.restart()
    _, fresh, _ = planted_setup([torch.linspace(2.0, 1.0, 3), torch.linspace(1.0, 0.5, 6)], noise=0.5)
    fresh.load_state_dict(network.state_dict())
    (was,), (back,) = network.history, fresh.history
    assert was.p_source == "validation" and was.validation_loss is not None and was.seconds > 0
    assert (back.index, back.epoch, back.step, back.loss, back.ranks) == (was.index, was.epoch, was.step, was.loss,
                                                                         was.ranks)
    assert back.p is None and math.isnan(was.p)
    assert (back.alpha, back.mode, back.max_rank, back.p_source) == (was.alpha, "product", R, "validation")
    assert back.seconds == pytest.approx(was.seconds, abs=1e-6)
    assert back.level == pytest.approx(was.level, abs=1e-8)
    assert back.validation_loss == pytest.approx(was.validation_loss, abs=1e-8)


def test_a_history_entry_reads_back_as_the_restart_it_records():
    """``RestartReport.from_entry`` on ``entry()`` gives the same RESTART; an entry without the optional keys
    reads as 0 s and the loss rule, without a level; without a mode and maximum rank given, the mode is unnamed
    and the maximum rank is the largest rank listed (0 with none)."""
    from aclora_ext.lora.report import RestartReport

    report = RestartReport(index=3, epoch=2, step=40, p=None, loss=0.25, alpha=0.5, mode="product",
                           ranks={"lora_a": 3, "lora_b": 5}, max_rank=8, seconds=1.5, p_source="validation",
                           level=1.25, validation_loss=0.125)
    back = RestartReport.from_entry(json.loads(json.dumps(report.entry())), ["lora_a", "lora_b"], "product", 8)
    assert back.entry() == report.entry()
    assert (back.mode, back.max_rank, back.ranks) == ("product", 8, {"lora_a": 3, "lora_b": 5})
    bare = {"index": 1, "epoch": 0, "step": 10, "p": 0.9, "loss": 0.5, "alpha": 1.0, "ranks": [2, 4]}
    old = RestartReport.from_entry(bare, ["lora_a", "lora_b"])
    assert (old.seconds, old.p_source, old.level, old.validation_loss) == (0.0, "loss", None, None)
    assert (old.mode, old.max_rank) == ("", 4)
    assert RestartReport.from_entry({**bare, "ranks": []}, []).max_rank == 0
