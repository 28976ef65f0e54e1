"""A cut that trains like the rank it keeps: the one-standard-error rule, slots held out of training after a
held-out cut, the file's own cut at save time, a run without held-out data left whole, the sd-scripts
recorder's image groups, and ``ranks_from`` (the second run of the two-run recipe)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from aclora_ext import LoRAFileError, attach
from aclora_ext import functional as F
from aclora_ext.files.storage import save_state_dict
from aclora_ext.lora.export import export_modules
from aclora_ext.ranksearch.heldout import CALLS_PER_BATCH, SdScriptsValidation

IN, OUT, RANK = 24, 20, 8


# --- the rule -----------------------------------------------------------------------------------------------------
def test_training_takes_the_fewest_components_within_one_standard_error_of_the_best():
    best = torch.tensor([1.0, 1.1, 0.9, 1.0])
    candidates = {
        (8,): best,  # keep everything: the best
        (4,): best + torch.tensor([0.03, -0.03, 0.02, -0.01]),  # worse, but within the noise of the difference
        (1,): best + 0.5,  # clearly worse
    }
    assert F.parsimonious_choice(candidates) == (4,)
    candidates[(4,)] = best + 0.05  # worse on every item: beyond the band
    assert F.parsimonious_choice(candidates) == (8,)


def test_the_files_own_cut_must_beat_keeping_everything_by_one_standard_error():
    everything = torch.tensor([1.0, 1.1, 0.9, 1.0])
    within = {(8,): everything, (4,): everything + torch.tensor([0.02, -0.01, 0.03, 0.0])}
    assert F.parsimonious_choice(within, final=True) == (8,)  # training would cut here, the file does not
    better = {(8,): everything, (4,): everything - 0.1, (2,): everything - 0.05}
    assert F.parsimonious_choice(better, final=True) == (4,)  # the cut that beats it by most


def test_the_standard_error_counts_images_not_items_when_the_groups_are_given():
    best = torch.zeros(8)
    items = torch.tensor([0.3, 0.31, 0.29, 0.3, -0.2, -0.19, -0.21, -0.2])  # two images, four timesteps each
    per_item = F.paired_excess(items, best)
    per_image = F.paired_excess(items, best, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert per_item > per_image  # two images are two units: a wider band than eight independent items


def test_the_loss_scale_does_not_change_the_choice():
    rng = torch.Generator().manual_seed(0)
    candidates = {(k,): 1.0 + 0.05 * torch.rand(6, generator=rng) + 0.01 * (8 - k) for k in (8, 4, 2, 1)}
    assert F.parsimonious_choice(candidates) == F.parsimonious_choice({k: 10 * v for k, v in candidates.items()})


# --- a cut trains like the rank it keeps -----------------------------------------------------------------------------
def _task(seed: int = 0):
    """A layer whose truth has rank 2, 12 training samples with per-sample target noise (what a high rank
    memorises), a held-out set from the same truth."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g) * 0.1)
    truth = torch.randn(OUT, 2, generator=g) @ torch.randn(2, IN, generator=g) * 0.3
    x, held = torch.randn(12, IN, generator=g), torch.randn(256, IN, generator=g)
    y = x @ (base.weight + truth).T + 0.3 * torch.randn(12, OUT, generator=g)
    return base, truth, x, y, held


def _train(network, model, x, y, steps: int, lr: float = 3e-2) -> None:
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _error(model, base, truth, held) -> float:
    with torch.no_grad():
        return float((model(held) - held @ (base.weight + truth).T).pow(2).mean())


def _fresh_model(base):
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False))
    model[0].load_state_dict(base.state_dict())
    model.requires_grad_(False)
    return model


def test_after_a_held_out_cut_the_held_slots_stay_out_and_the_run_trains_like_a_lora_of_the_kept_rank():
    base, truth, x, y, held = _task()
    torch.manual_seed(1)
    model = _fresh_model(base)
    network = attach(model, max_rank=RANK, alpha=float(RANK), restart_mode="product")
    _train(network, model, x, y, 20)
    # a held-out judge that prefers two components: the parsimony rule cuts to 2, and the run trains at 2
    network.set_validation(lambda: (model(held) - held @ (base.weight + truth).T).pow(2).mean(dim=1))
    report = network.restart()
    module = network.loras[0]
    kept = report.ranks[module.lora_name]
    assert kept < RANK and int(module.held.sum()) == RANK - kept
    _train(network, model, x, y, 300)
    with torch.no_grad():  # the held slots are out of the forward: whatever their factors hold adds nothing
        before = model(held)
        module.lora_down.weight[module.held] += 1.0
        module.lora_up.weight[:, module.held] += 1.0
        assert torch.equal(model(held), before)
    module.clear_held()  # and the file does not carry them
    assert float(module.lora_up.weight.detach()[:, module.held].abs().sum()) == 0.0
    cut = _error(model, base, truth, held)
    # the same number of steps of a LoRA trained at that rank from the start
    torch.manual_seed(1)
    reference = _fresh_model(base)
    plain = attach(reference, max_rank=kept, alpha=float(RANK) * kept / RANK, restart_mode="off")
    _train(plain, reference, x, y, 320)
    assert cut <= 1.10 * _error(reference, base, truth, held)



def test_without_held_out_data_a_restart_leaves_training_whole_and_the_file_is_trimmed_at_save(tmp_path):
    base, truth, x, y, held = _task()
    model = _fresh_model(base)
    network = attach(model, max_rank=RANK, alpha=float(RANK), restart_mode="product", min_importance="0.6")
    _train(network, model, x, y, 30)
    before = [p.detach().clone() for p in network.parameters()]
    report = network.restart()
    assert report.p_source == "deferred" and report.ranks[network.loras[0].lora_name] == RANK
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters()))
    assert "training left whole" in report.line()
    _train(network, model, x, y, 5)  # what follows the last RESTART is what the file's rule measures
    path = tmp_path / "trimmed.safetensors"
    assert network.save_weights(str(path))
    with safe_open(str(path), framework="pt") as f:
        rank = f.get_slice(f"{network.loras[0].lora_name}.lora_down.weight").get_shape()[0]
    assert rank < RANK  # min_importance 0.6 at save time


# --- sd-scripts' validation pass: items grouped by image -------------------------------------------------------------
class _Recorded:
    def __init__(self, batch: int) -> None:
        self.target = torch.zeros(batch, 4, 8, 8)


def test_the_recorders_items_are_grouped_by_the_image_of_their_batch():
    recorder = SdScriptsValidation.__new__(SdScriptsValidation)
    recorder.calls = [_Recorded(2)] * CALLS_PER_BATCH + [_Recorded(1)] * CALLS_PER_BATCH
    assert recorder.groups.tolist() == [0, 1] * CALLS_PER_BATCH + [2] * CALLS_PER_BATCH
    recorder.calls = [_Recorded(2)] * (CALLS_PER_BATCH + 1)  # not the shape of sd-scripts' pass: items
    assert recorder.groups is None


# --- ranks_from: a fresh run at a file's ranks ---------------------------------------------------------------------
def test_ranks_from_trains_fresh_at_the_files_per_module_ranks(tmp_path):
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, OUT))
    network = attach(first, max_rank=RANK, alpha=float(RANK), restart_mode="off")
    with torch.no_grad():
        for m, k in zip(network.loras, (2, 5)):  # a file with ranks 2 and 5
            m.lora_up.weight.normal_()
            m.lora_up.weight[:, k:] = 0
    path = tmp_path / "ranks.safetensors"
    save_state_dict(str(path), export_modules(network.loras, [2, 5]).tensors, {})
    torch.manual_seed(1)
    second = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, OUT))
    fresh = attach(second, max_rank=RANK, alpha=float(RANK), restart_mode="off", ranks_from=str(path))
    assert fresh.ranks() == {m.lora_name: k for m, k in zip(fresh.loras, (2, 5))}
    assert all(float(m.lora_up.weight.detach().abs().sum()) == 0 for m in fresh.loras)  # fresh: nothing loaded
    x = torch.randn(16, IN)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    for _ in range(5):
        loss = second(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path / "second.safetensors"
    assert fresh.save_weights(str(out))
    with safe_open(str(out), framework="pt") as f:
        ranks = [f.get_slice(f"{m.lora_name}.lora_down.weight").get_shape()[0] for m in fresh.loras]
    assert ranks == [2, 5]


def test_ranks_from_keeps_the_files_ranks_at_save_even_below_min_importance(tmp_path):
    """The first run chose the ranks: the second run's file does not trim them again at min_importance."""
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(IN, OUT))
    network = attach(first, max_rank=RANK, alpha=float(RANK), restart_mode="off")
    with torch.no_grad():
        network.loras[0].lora_up.weight.normal_()
        network.loras[0].lora_up.weight[:, 3:] = 0
    path = tmp_path / "ranks.safetensors"
    save_state_dict(str(path), export_modules(network.loras, [3]).tensors, {})
    second = nn.Sequential(nn.Linear(IN, OUT))
    fresh = attach(second, max_rank=RANK, alpha=float(RANK), ranks_from=str(path))  # product mode, no held-out
    x = torch.randn(64, IN)
    for _ in range(3):  # activation statistics for the importances
        second(x)
    module = fresh.loras[0]
    with torch.no_grad():  # three components, the third a millionth of the first: far below min_importance
        module.lora_up.weight.zero_()
        module.lora_up.weight[:3, :3] = torch.diag(torch.tensor([1.0, 0.5, 1e-6]))
    out = tmp_path / "second.safetensors"
    assert fresh.save_weights(str(out))
    with safe_open(str(out), framework="pt") as f:
        assert f.get_slice(f"{module.lora_name}.lora_down.weight").get_shape()[0] == 3

    third = nn.Sequential(nn.Linear(IN, OUT))
    plain = attach(third, max_rank=RANK, alpha=float(RANK))  # without ranks_from
    plain.loras[0].lora_down.weight.data.copy_(module.lora_down.weight)
    plain.loras[0].lora_up.weight.data.copy_(module.lora_up.weight)
    for _ in range(3):
        third(x)
    assert plain.save_weights(str(tmp_path / "plain.safetensors"))
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:  # the same update is trimmed there
        assert f.get_slice(f"{plain.loras[0].lora_name}.lora_down.weight").get_shape()[0] == 2


def test_ranks_from_a_file_that_is_not_a_lora_is_refused_naming_the_key(tmp_path):
    bad = tmp_path / "not-a-lora.safetensors"
    bad.write_bytes(b"nonsense")
    with pytest.raises(LoRAFileError) as caught:
        attach(nn.Sequential(nn.Linear(IN, OUT)), max_rank=RANK, ranks_from=str(bad))
    assert "ranks_from=" in str(caught.value) and "allowed" in str(caught.value)


def test_ranks_from_a_missing_file_stops_at_start_up_naming_key_value_and_allowed(tmp_path):
    from aclora_ext.options import OptionError, parse_network_args

    missing = str(tmp_path / "first_run.safetensors")
    with pytest.raises(OptionError) as caught:
        parse_network_args({"ranks_from": missing})
    assert "ranks_from" in str(caught.value) and missing in str(caught.value) and "existing LoRA file" in str(caught.value)


def test_ranks_from_with_the_papers_restarts_is_refused_naming_both(tmp_path):
    from aclora_ext.options import OptionError, parse_network_args

    path = tmp_path / "first_run.safetensors"
    path.write_bytes(b"")  # exists; the combination is refused before the file is read
    with pytest.raises(OptionError) as caught:
        parse_network_args({"ranks_from": str(path), "restart_mode": "paper"})
    assert "ranks_from=" in str(caught.value) and "restart_mode=product or off" in str(caught.value)


@pytest.mark.parametrize("groups", [[0.5, 1.5], [[0, 1], [2, 3]], "images"])
def test_set_validation_refuses_groups_that_are_not_one_integer_per_item(groups):
    from aclora_ext.options import OptionError

    network = attach(nn.Sequential(nn.Linear(IN, OUT)), max_rank=RANK)
    with pytest.raises(OptionError) as caught:
        network.set_validation(lambda: torch.ones(4), groups=groups)
    assert "groups=" in str(caught.value) and "allowed: a 1-D sequence of integers" in str(caught.value)
