"""The rank search's resumable state and held-out groups (``ranksearch/rank_search.py``), behaviour by behaviour.

Written for the survivors of the mutation run of 2026-12-08 (docs/mutation-survivors-lora-options-ranksearch.md,
"ranksearch"): each test names the promise it holds, on a two-layer network of rank 4 (milliseconds).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aclora_ext import OptionError, attach
from aclora_ext import functional as F
from aclora_ext.lora.product_restart import InputStats

R = 4


def two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 6, bias=False))
    return model, attach(model, max_rank=R, alpha=float(R))


def recorded(count: int, out_numel: int, out_sq: float = 2.5, seed: int = 0) -> InputStats:
    gram = torch.randn(R, R, generator=torch.Generator().manual_seed(seed))
    return InputStats(gram @ gram.T, count, torch.tensor(out_sq), out_numel)


def test_the_running_scores_and_the_frozen_level_are_the_state_in_level_order():
    """``state()``: each coarse level's score in F.LEVELS order (NaN: none), then the frozen level; it reads back."""
    _, network = two_layers()
    search = network.rank_search
    search.scores = {F.LEVELS[0]: 1.5, F.LEVELS[3]: 0.25}
    search.frozen_level = 2.0
    state = search.state()
    assert state.dtype == torch.float64 and state.shape == (len(F.LEVELS) + 1,)
    assert state[0] == 1.5 and state[3] == 0.25 and state[-1] == 2.0
    assert int(state[:-1].isnan().sum()) == len(F.LEVELS) - 2
    _, fresh = two_layers()
    fresh.rank_search.load_state(state)
    assert fresh.rank_search.scores == search.scores and fresh.rank_search.frozen_level == 2.0


def test_the_activation_statistics_state_is_float64_per_module_in_order_with_zeros_where_none():
    """``stats_state``: empty (float64) when nothing was recorded; else per module rank*rank Gram entries
    then count, output sum of squares, output count, zeros for a module that recorded nothing, even the
    first; counts above float32's exact integers come back exactly."""
    _, network = two_layers()
    search, (first, second) = network.rank_search, network.loras
    empty = search.stats_state(network.loras)
    assert empty.dtype == torch.float64 and empty.numel() == 0
    big = 2**24 + 1  # not a float32
    search.stats[second.lora_name] = recorded(big, big + 2)
    state = search.stats_state(network.loras)
    assert state.dtype == torch.float64 and state.numel() == 2 * (R * R + 3)
    assert torch.count_nonzero(state[: R * R + 3]) == 0
    tail = state[R * R + 3 :]
    assert torch.equal(tail[: R * R], search.stats[second.lora_name].gram.double().flatten())
    assert tail[-3:].tolist() == [big, 2.5, big + 2]
    _, fresh = two_layers()
    fresh.rank_search.load_stats_state(fresh.loras, state)
    restored = fresh.rank_search.stats
    assert first.lora_name not in restored
    assert (restored[second.lora_name].count, restored[second.lora_name].out_numel) == (big, big + 2)


def test_a_module_with_activations_but_no_output_yet_saves_zero_output_energy():
    """A record whose output hook has not run (out_sq None) saves 0 output energy, and does not come back."""
    _, network = two_layers()
    search, (first, second) = network.rank_search, network.loras
    search.stats[first.lora_name] = recorded(5, 6)
    search.stats[second.lora_name] = InputStats(torch.eye(R), 3)
    assert search.stats[second.lora_name].out_sq is None
    state = search.stats_state(network.loras)
    # not measured (no output count): written as zeros
    assert torch.count_nonzero(state[R * R + 3 :]) == 0
    search.stats[second.lora_name] = InputStats(torch.eye(R), 3, None, 7)  # output counted, energy not kept
    assert search.stats_state(network.loras)[-3:].tolist() == [3.0, 0.0, 7.0]


@pytest.mark.parametrize("count, out_numel, restored", [(1, 1, True), (3, 0, False), (0, 5, False)])
def test_a_resumed_record_comes_back_only_with_both_activations_and_outputs(count, out_numel, restored):
    """``load_stats_state`` restores a module's record when its count and output count are both > 0 (what
    ``measured`` asks of a record), with every field as saved."""
    _, network = two_layers()
    size = R * R + 3
    gram = torch.arange(R * R, dtype=torch.float64)
    state = torch.zeros(2 * size, dtype=torch.float64)
    state[size : size + R * R] = gram
    state[-3:] = torch.tensor([count, 0.75, out_numel], dtype=torch.float64)
    network.rank_search.load_stats_state(network.loras, state)
    stats = network.rank_search.stats
    assert network.loras[0].lora_name not in stats
    assert (network.loras[1].lora_name in stats) == restored
    if restored:
        back = stats[network.loras[1].lora_name]
        assert torch.equal(back.gram, gram.view(R, R).float()) and back.gram.dtype == torch.float32
        assert (back.count, float(back.out_sq), back.out_numel) == (count, 0.75, out_numel)
        assert back.out_sq.dtype == torch.float32


# --- the held-out groups -------------------------------------------------------------------------------------
class Recorder:
    """A loss function that knows its items' groups (as ``heldout.SdScriptsValidation`` does)."""

    groups = torch.tensor([0, 0, 1, 1])

    def __call__(self):
        return torch.zeros(4)


def test_the_loops_groups_win_over_the_recorders():
    """``item_groups``: the loop's ``set_validation(groups=...)``, else the loss function's own ``groups``."""
    _, network = two_layers()
    search = network.rank_search
    search.set_validation(Recorder(), None)
    assert torch.equal(search.item_groups(), Recorder.groups)
    search.set_validation(Recorder(), None, groups=(5, 5, 6, 7))
    assert search.item_groups().tolist() == [5, 5, 6, 7] and search.item_groups().dtype == torch.int64
    search.set_validation(lambda: torch.zeros(4), None)
    assert search.item_groups() is None


@pytest.mark.parametrize("groups", [[0.5, 1.0], [[0, 1]], "ab", object()])
def test_groups_that_are_not_a_1d_integer_sequence_are_refused_with_the_whole_message(groups):
    _, network = two_layers()
    with pytest.raises(OptionError) as error:
        network.rank_search.set_validation(Recorder(), None, groups=groups)
    assert str(error.value) == (
        f"set_validation: groups={groups!r} is not valid; allowed: a 1-D sequence of integers, "
        "the held-out unit (e.g. image) of each item the loss returns"
    )


# --- the held-out evaluation ---------------------------------------------------------------------------------
def trained_two_layers(loss_fn=None, groups=None):
    """Two layers whose factors hold an update, training forwards recorded, a held-out loss set."""
    model, network = two_layers()
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    network.train()
    with torch.enable_grad():
        model(x)
    target = model(x).detach() * 0.5
    network.set_validation(loss_fn or (lambda: (model(x) - target).pow(2).mean(dim=1)), None, groups=groups)
    return model, network, x


def test_a_scalar_held_out_loss_is_one_float64_item():
    """``held_out_losses``: a Python number becomes one float64 item (not rounded to float32)."""
    _, network = two_layers()
    network.rank_search.set_validation(lambda: 0.1, None)
    items = network.rank_search.held_out_losses()
    assert items.dtype == torch.float64 and items.tolist() == [0.1]


def test_training_records_again_after_a_held_out_decision():
    """The held-out evaluation stops the recording only while it runs: the training forwards after a
    RESTART chosen on the held-out loss are recorded (the next importances come from them)."""
    model, network, x = trained_two_layers()
    assert network.restart().p_source == "validation"
    network.train()
    with torch.enable_grad():
        model(x)
    assert all(network.rank_search.stats[m.lora_name].count == 64 for m in network.loras)


def test_the_held_out_choice_uses_the_window_of_the_last_choice_the_groups_and_final(monkeypatch):
    """After a held-out choice the coarse candidates are ``F.window_levels`` around it; the one-standard-error
    rule gets the items' groups, and ``final`` only for the file's own ranks (save time)."""
    windows, choices = [], []
    window_levels, parsimonious_choice = F.window_levels, F.parsimonious_choice

    def window_spy(center):
        windows.append(center)
        return window_levels(center)

    def choice_spy(candidates, groups=None, final=False):
        choices.append((None if groups is None else groups.tolist(), final))
        return parsimonious_choice(candidates, groups, final)

    monkeypatch.setattr(F, "window_levels", window_spy)
    monkeypatch.setattr(F, "parsimonious_choice", choice_spy)
    model, network, x = trained_two_layers(groups=[i // 2 for i in range(64)])
    network.restart()
    frozen = network.rank_search.frozen_level
    assert windows == [None] and frozen is not None
    network.train()
    with torch.enable_grad():
        model(x)
    network.restart()
    assert windows == [None, frozen]
    network.state_for_export()
    groups = [i // 2 for i in range(64)]
    assert choices == [(groups, False), (groups, False), (groups, True)]
