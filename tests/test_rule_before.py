"""Version 0.1's rank-search rules, no longer options but kept in ``bench/rule_before.py`` for the benchmarks
that compare against them: each rule still does what the benchmarks' rows say it does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from test_rank_search import NOISY, R, Planted, held_out_loss, inputs, planted_setup, record_inputs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import rule_before  # noqa: E402


def test_relearn_lets_a_module_cut_at_one_restart_grow_back_when_it_earns_capacity():
    """RESTART 1: the truth has rank 2, so 2 of 12 slots stay. The freed slots (relearn: back in the forward)
    then learn three more truth components (written in as training would); the held-out truth now has rank 5:
    RESTART 2 keeps 5."""
    full = torch.tensor([2.0, 1.8, 1.6, 1.4, 1.2])
    model, network, _ = planted_setup([full], noise=0.5, seed=3)
    rule_before.use(network, cut_rule="beat", freed_slots="relearn")
    module = network.loras[0]
    first = Planted(full[:2], 0.5, seed=3)
    second = Planted(full, 0.0, seed=3)
    truth = [first.truth]
    network.set_validation(lambda: held_out_loss(model, truth)())
    assert network.restart().ranks[module.lora_name] == 2
    assert module.slot_mask is None  # relearn: nothing held
    learned = second.truth - first.truth  # the components 3-5, in the freed slots
    u, s, vh = torch.linalg.svd(learned / module.scale, full_matrices=False)
    free = [j for j in range(R) if torch.count_nonzero(module.lora_up.weight[:, j]) == 0][:3]
    with torch.no_grad():
        for col, j in enumerate(free):
            module.lora_up.weight[:, j] = u[:, col] * s[col].sqrt()
            module.lora_down.weight[j] = s[col].sqrt() * vh[col]
    record_inputs(network, model, inputs(256, 5))
    truth[0] = second.truth
    assert network.restart().ranks[module.lora_name] == 5


@pytest.mark.parametrize("difference, per_item, cuts", [
    (NOISY, True, False),  # lower on average, by less than its standard error: kept
    (torch.full((8,), -0.025), True, True),  # the same mean, the same on every item: cut
    (NOISY, False, True),  # one number (no noise to judge): the lower loss wins
])
def test_beat_cuts_only_where_it_beats_keeping_everything_by_more_than_the_held_out_noise(difference, per_item,
                                                                                       cuts):
    model, network, plants = planted_setup([torch.linspace(2.0, 1.0, 3)], noise=0.5)
    rule_before.use(network, cut_rule="beat")
    x = inputs(64, 5)
    with torch.no_grad():
        base = x @ model[0].weight.T
        full = float((model(x) - base).pow(2).sum())

    def loss_fn():  # 1 per item with every component, 1 + difference once anything is cut
        cut = float((model(x) - base).pow(2).sum()) < 0.999 * full
        items = torch.ones(8) + (difference if cut else 0.0)
        return items if per_item else items.mean()

    network.set_validation(loss_fn)
    report = network.restart()
    assert report.p_source == "validation"
    assert (report.ranks[network.loras[0].lora_name] < R) == cuts
    assert network.rank_search.scores  # its running scores: what the resumable state keeps of it


def test_cut_without_heldout_cuts_at_min_importance_at_every_restart():
    model, network, plants = planted_setup([torch.tensor([3.0, 1.0, 0.02, 0.01])], noise=0.002)
    assert network.restart().p_source == "deferred"  # the product: training left whole
    record_inputs(network, model, inputs(256, 1))
    rule_before.use(network, cut_without_heldout=True)
    report = network.restart()
    assert report.p_source == "prior" and report.ranks[network.loras[0].lora_name] == 2


def test_the_bench_attach_takes_the_old_keys_and_refuses_other_values():
    network = rule_before.attach(torch.nn.Sequential(torch.nn.Linear(8, 8)), max_rank=4, cut_rule="beat",
                                 freed_slots="relearn", cut_without_heldout=True)
    search = network.rank_search
    assert isinstance(search, rule_before.RuleBefore) and search.beat and search.relearn and search.cut_without_heldout
    with pytest.raises(ValueError, match="cut_rule='best'.*allowed: parsimony, beat"):
        rule_before.attach(torch.nn.Sequential(torch.nn.Linear(8, 8)), max_rank=4, cut_rule="best")
