"""Promised details of file shape checks, file metadata, rank fits, allocation input and held-out levels:
whole error messages, the fields results carry, and values against an independent computation."""

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from aclora_ext.files import sizes
from aclora_ext.files.fit import fit_ranks
from aclora_ext.files.lora_dict import check_shapes
from aclora_ext.files.storage import LoRAFileError, metadata_ranks
from aclora_ext.functional import allocation
from aclora_ext.functional.allocation import BudgetError, allocate
from aclora_ext.functional.levels import LEVELS, WINDOW_DECADES, paired_excess, pessimistic_loss, window_levels
from aclora_ext.functional.resize_rules import index_sv_fro


def _layer(down_shape, up_shape):
    return SimpleNamespace(
        lora_down=SimpleNamespace(weight=torch.zeros(down_shape)), lora_up=SimpleNamespace(weight=torch.zeros(up_shape))
    )


def _parts(down_shape, up_shape):
    return {"lora_down.weight": torch.zeros(down_shape), "lora_up.weight": torch.zeros(up_shape)}


def _shape_error(modules, layers, allow_smaller_rank=True) -> str:
    with pytest.raises(LoRAFileError) as err:
        check_shapes(modules, layers, "f.safetensors", allow_smaller_rank)
    return str(err.value)


def test_check_shapes_names_each_misfit_with_the_shapes_the_model_needs():
    layers = {"conv": _layer((4, 3, 3, 5), (7, 4, 1, 1)), "fc": _layer((4, 6), (9, 4))}
    conv = (
        "conv: file has lora_down (2, 3, 3, 6) / lora_up (7, 2, 1, 1), "
        "the model needs lora_down (r, 3, 3, 5) / lora_up (7, r, 1, 1)"
    )
    assert _shape_error({"conv": _parts((2, 3, 3, 6), (7, 2, 1, 1))}, layers) == (
        f"f.safetensors: 1 module(s) do not fit this model: {conv}"
    )
    # only the out size of a linear layer's lora_up differs
    fc = "fc: file has lora_down (2, 6) / lora_up (8, 2), the model needs lora_down (r, 6) / lora_up (9, r)"
    assert (
        _shape_error({"fc": _parts((2, 6), (8, 2))}, layers)
        == f"f.safetensors: 1 module(s) do not fit this model: {fc}"
    )
    rank = (
        "fc: file rank 2 does not fit this network's rank 4 "
        "(use a network_dim at least as large, or --dim_from_weights)"
    )
    assert _shape_error({"fc": _parts((2, 6), (9, 2))}, layers, allow_smaller_rank=False) == (
        f"f.safetensors: 1 module(s) do not fit this model: {rank}"
    )


@pytest.mark.parametrize("count", [5, 6, 7])
def test_check_shapes_lists_five_misfits_and_counts_the_rest(count):
    layers = {f"m{i}": _layer((4, 6), (9, 4)) for i in range(count)}
    modules = {f"m{i}": _parts((5, 6), (9, 5)) for i in range(count)}
    texts = [
        f"m{i}: file rank 5 does not fit this network's rank 4 (use a network_dim at least as large, "
        "or --dim_from_weights)"
        for i in range(5)
    ]
    more = f" (and {count - 5} more)" if count > 5 else ""
    assert _shape_error(modules, layers) == (
        f"f.safetensors: {count} module(s) do not fit this model: " + "; ".join(texts) + more
    )


def test_rank_metadata_is_positive_integers_per_module_and_an_empty_field_is_absent():
    meta = {"aclora_ranks": json.dumps({"a": 4, "b": 1}), "aclora_padded": json.dumps({"a": 2})}
    assert metadata_ranks(meta, "f") == {"a": 2, "b": 1}
    assert metadata_ranks({"aclora_ranks": ""}, "f") == {}
    for bad in (0, -1, True, 2.5, "3"):
        for key in ("aclora_ranks", "aclora_padded"):
            with pytest.raises(LoRAFileError) as err:
                metadata_ranks({key: json.dumps({"a": bad})}, "f.safetensors")
            assert str(err.value) == (
                f"f.safetensors: metadata field {key} should map module names to positive integer ranks"
            )
    with pytest.raises(LoRAFileError) as err:
        metadata_ranks({"aclora_ranks": "[1]"}, "f.safetensors")
    assert str(err.value) == "f.safetensors: metadata field aclora_ranks should be a JSON dict, found list"


def _ranks_metadata(ranks):
    return {"aclora_ranks": json.dumps(ranks, separators=(",", ":"))}


def test_fit_ranks_refuses_an_unknown_method_and_names_the_files_module_of_a_bad_worth():
    layouts = [sizes.ModuleLayout("lora_unet_a", 8, 8), sizes.ModuleLayout("lora_unet_b", 8, 8)]
    file = sizes.FileLayout(layouts, _ranks_metadata)
    worths = [torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    with pytest.raises(ValueError) as err:
        fit_ranks(file, worths, 10**6, method="best")
    assert str(err.value) == "method 'best' is not known; allowed: exact, greedy"
    with pytest.raises(ValueError) as err:
        fit_ranks(file, [worths[0], torch.tensor([1.0, -1.0])], 10**6)
    assert str(err.value) == "lora_unet_b: worths must be finite and >= 0"


def test_fit_ranks_reports_its_limit_and_the_header_bound_at_the_cap_ranks():
    layouts = [sizes.ModuleLayout("lora_unet_a", 8, 16), sizes.ModuleLayout("lora_unet_b", 24, 8, (3, 3))]
    file = sizes.FileLayout(layouts, _ranks_metadata)
    worths = [torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64)]
    caps = [3, 2]
    component_bytes = [(8 + 16) * 2, (24 * 3 * 3 + 8) * 2]  # (in * kh * kw + out) float16 elements
    size = sizes.saved_file_size(
        sizes.layout_tensors(layouts, caps), _ranks_metadata({"lora_unet_a": 3, "lora_unet_b": 2})
    )
    header_bound = size - sum(c * k for c, k in zip(component_bytes, caps))
    fit = fit_ranks(file, worths, 10**6)
    assert fit.max_size == 10**6
    assert fit.header_bound == header_bound
    assert fit.ranks == {"lora_unet_a": 3, "lora_unet_b": 2}


def test_allocation_input_messages_name_the_value_and_what_is_allowed():
    w = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 1.0])]
    cases = [
        (dict(min_ranks=True), "min_ranks: True is not a rank"),
        (dict(min_ranks=[1.0, 2.0]), "min_ranks: give one integer, or one integer per module (2)"),
        (dict(min_ranks=[1, 1, 1]), "min_ranks: give one integer, or one integer per module (2)"),
        (dict(max_ranks=[2]), "max_ranks: give one integer, or one integer per module (2)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            allocate(w, [10, 10], 100, **kwargs)
        assert str(err.value) == message
    with pytest.raises(BudgetError) as err:
        allocate(w, [10, 10], 0)
    assert str(err.value) == "the minimum ranks alone need 20 bytes, more than the budget of 0 bytes"


def test_solve_reports_the_total_worth_the_method_its_time_and_bool_masks():
    w = [torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.tensor([5.0, 1.0], dtype=torch.float64)]
    for method in allocation.METHODS:
        before = time.perf_counter()
        result = allocate(w, [10, 10], 35, method=method)
        elapsed = time.perf_counter() - before
        assert result.total_worth == 12.0 and result.method == method
        assert result.ranks == [2, 1] and result.cost == 30 and result.worth == 10.0
        assert 0.0 <= result.seconds <= elapsed
        masks = result.masks()
        assert [m.dtype for m in masks] == [torch.bool, torch.bool]
        assert [m.tolist() for m in masks] == [[True, True, False], [True, False]]
    result.order = None
    with pytest.raises(ValueError) as err:
        result.masks()
    assert str(err.value) == "Allocation.masks needs the components' order; an Allocation from solve() has it"


def test_greedy_breaks_ties_of_worth_per_byte_by_module_order():
    # three modules, every optional component of the same worth per byte: the first modules get them
    result = allocate([torch.full((4,), 1.0)] * 3, [10, 10, 10], 30 + 50, method="greedy")
    assert result.ranks == [4, 3, 1]


def _sample_std_error(d):
    n = len(d)
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)


def test_pessimistic_loss_is_the_mean_plus_one_standard_error_from_two_items_else_the_mean():
    items, ref = [1.0, 3.0], [0.5, 0.0]
    expected = 2.0 + _sample_std_error([0.5, 3.0])
    assert pessimistic_loss(torch.tensor(items), torch.tensor(ref)) == pytest.approx(expected, rel=1e-12)
    assert pessimistic_loss(torch.tensor(items), torch.tensor([0.5, 0.0, 1.0])) == 2.0  # does not pair
    assert pessimistic_loss(torch.tensor(items), torch.tensor([0.5, math.nan])) == 2.0
    assert pessimistic_loss(torch.tensor([4.0]), torch.tensor([1.0])) == 4.0
    assert pessimistic_loss(torch.tensor([]), torch.tensor([])) == math.inf


def test_paired_excess_of_items_that_do_not_pair_is_the_difference_of_means_or_inf():
    assert paired_excess(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5, 0.5])) == 1.5
    assert paired_excess(torch.tensor([1.0, math.inf]), torch.tensor([0.5, 0.5])) == math.inf
    assert paired_excess(torch.tensor([]), torch.tensor([0.5, 0.5])) == math.inf


def test_paired_excess_averages_the_difference_per_group_first():
    items, best = torch.tensor([1.0, 2.0, 4.0, 0.0, 3.0]), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([7, 7, 7, 3, 3])
    d = {7: [1.0, 2.0, 3.0], 3: [-1.0, 2.5]}
    per_group = [sum(v) / len(v) for v in (d[3], d[7])]
    expected = sum(per_group) / 2 - _sample_std_error(per_group)
    assert paired_excess(items, best, groups) == pytest.approx(expected, rel=1e-12)


def test_window_levels_are_everything_and_the_levels_within_one_decade_of_the_choice():
    for center in LEVELS[1:]:
        expected = [math.inf] + [lv for lv in LEVELS[1:] if abs(lv - center) <= WINDOW_DECADES + 1e-9]
        assert window_levels(center) == expected
    assert window_levels(3.5) == [math.inf, 4.0, 3.75, 3.5, 3.25, 3.0, 2.75, 2.5]


def _resize_lora_sv_fro(s, target):
    """resize_lora's rule written out: the count whose cumulative share of sum(s^2) reaches target^2, + 1,
    clamped to [1, len - 1]."""
    energy = [x * x for x in s]
    total, running, below = sum(energy), 0.0, 0
    for e in energy:
        running += e
        if running / total < target**2:
            below += 1
    return max(1, min(below + 1, len(s) - 1))


def test_index_sv_fro_gives_each_module_of_a_batch_its_own_rank_of_the_frobenius_share():
    s = torch.tensor(
        [[8.0, 4.0, 2.0, 1.0, 0.5, 0.25], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [3.0, 2.9, 0.1, 0.1, 0.1, 0.1]],
        dtype=torch.float64,
    )
    for target in (0.5, 0.9, 0.97, 0.999):
        expected = [_resize_lora_sv_fro(row.tolist(), target) for row in s]
        assert index_sv_fro(s, target, 6).tolist() == expected, target


def test_allocation_problem_messages_name_the_module_and_the_value():
    w = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([4.0, 1.0, 1.0, 1.0])]
    cases = [
        (dict(costs=[10, 10]), "2 costs and 3 names for 3 modules"),
        (dict(costs=[10, 10, 10], names=["a", "b"]), "3 costs and 2 names for 3 modules"),
        (dict(costs=[10, 2.5, 10]), "costs must be whole numbers of bytes"),
        (dict(costs=[10, True, 10]), "costs must be whole numbers of bytes"),
        (dict(costs=[1, 1, 0]), "module 2: cost per component 0 is not a positive number of bytes"),
        (
            dict(costs=[1, 1, 1], min_ranks=[0, 1, 3], max_ranks=[2, 1, 2]),
            "module 2: min rank 3 and max rank 2 allow no rank",
        ),
        (dict(costs=[1, 1, 1], min_ranks=[1, 2, -1]), "module 2: min rank -1 and max rank 4 allow no rank"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            allocation.allocation_problem(w, **kwargs)
        assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        allocation.allocation_problem(w, [1, 1, 1], names=["a", "b", "c"], max_ranks=[1, 1, 0])
    assert str(err.value) == "c: min rank 1 and max rank 0 allow no rank"


def test_no_modules_is_an_empty_allocation():
    problem = allocation.allocation_problem([], [])
    assert problem.worths.shape == (0, 0) and problem.order.shape == (0, 0) and problem.lengths == []
    assert problem.costs.tolist() == problem.lo.tolist() == problem.hi.tolist() == []
    for method in allocation.METHODS:
        result = allocate([], [], 0, method=method)
        assert (result.ranks, result.cost, result.worth, result.exact, result.masks()) == ([], 0, 0.0, True, [])


def _optimum(worths, costs, lo, budget):
    """The best total worth of prefix ranks k_i >= lo_i with sum c_i k_i <= budget: a knapsack over modules
    (one choice of rank per module) on integer capacity, in plain Python."""
    best = {0: 0.0}
    for w, c, low in zip(worths, costs, lo):
        new = {}
        for used, value in best.items():
            for k in range(low, len(w) + 1):
                cost = used + c * k
                if cost > budget:
                    break
                gain = value + sum(w[:k])
                if gain > new.get(cost, -1.0):
                    new[cost] = gain
        best = new
    return max(best.values())


@pytest.mark.parametrize("seed", range(4))
def test_exact_allocation_is_the_optimum_of_problems_beyond_the_core(seed):
    """More optional components than the first dynamic program decides (CORE_ITEMS), few byte costs, tight
    budgets: the exact method keeps the optimum's worth (an independent knapsack over the modules' ranks)."""
    g = torch.Generator().manual_seed(seed)
    modules, length = 40, 9
    assert modules * (length - 1) > allocation.CORE_ITEMS
    costs = [int(c) for c in torch.randint(1, 5, (modules,), generator=g)]
    worths = [
        (torch.rand(length, generator=g, dtype=torch.float64) * c * (1 + (i % 3))).sort(descending=True).values
        for i, c in enumerate(costs)
    ]
    lo = [1] * modules
    for share in (0.3, 0.55, 0.8):
        budget = int(share * sum(c * length for c in costs))
        result = allocate(worths, costs, budget)
        expected = _optimum([w.tolist() for w in worths], costs, lo, budget)
        assert result.exact and result.cost <= budget
        assert result.worth == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert sum(sum(w[:k].tolist()) for w, k in zip(worths, result.ranks)) == pytest.approx(expected, rel=1e-12)
        assert result.bound >= expected - 1e-9


def test_one_two_dimensional_tensor_of_worths_is_a_module_per_row_at_least_rank_one_by_default():
    rows = [[3.0, 1.0, 0.5], [2.0, 2.0, 0.0]]
    problem = allocation.allocation_problem(torch.tensor(rows, dtype=torch.float32), [4, 6])
    assert problem.worths.dtype == torch.float64 and problem.worths.tolist() == rows
    assert problem.lo.tolist() == [1, 1] and problem.hi.tolist() == [3, 2] and problem.lengths == [3, 3]
    listed = allocate([torch.tensor(r) for r in rows], [4, 6], 14)
    assert allocate(torch.tensor(rows), [4, 6], 14).ranks == listed.ranks == [2, 1]


def test_worths_are_float64_and_equal_worths_keep_their_order():
    problem = allocation.allocation_problem([torch.tensor([1.0, 3.0], dtype=torch.float32)], [2])
    assert problem.worths.dtype == torch.float64 and allocation.allocation_problem([], []).worths.dtype == torch.float64
    masks = allocate([torch.ones(6), torch.tensor([2.0, 1.0, 2.0])], [1, 1], 5, min_ranks=0).masks()
    assert [m.tolist() for m in masks] == [[True, True, True, False, False, False], [True, False, True]]


@pytest.mark.parametrize("seed", range(4))
def test_exact_allocation_is_the_optimum_when_the_first_core_proves_nothing(seed):
    """Every component near the same worth per byte, even costs and an odd budget (a byte always left over,
    so the LP bound stays above every answer): the first dynamic program's CORE_ITEMS cannot prove its answer
    and the retry decides more; the answer is still the optimum of an independent knapsack."""
    g = torch.Generator().manual_seed(seed)
    modules, length = 60, 8
    costs = [2 * int(c) for c in torch.randint(2, 6, (modules,), generator=g)]
    worths = [
        (c * (1 + 0.001 * torch.rand(length, generator=g, dtype=torch.float64))).sort(descending=True).values
        for c in costs
    ]
    budget = int(0.5 * sum(c * length for c in costs)) | 1
    result = allocate(worths, costs, budget)
    expected = _optimum([w.tolist() for w in worths], costs, [1] * modules, budget)
    assert result.core > allocation.CORE_ITEMS
    assert result.exact and result.cost <= budget
    assert result.worth == pytest.approx(expected, rel=1e-13)
    assert sum(sum(w[:k].tolist()) for w, k in zip(worths, result.ranks)) == pytest.approx(expected, rel=1e-13)


def test_exact_allocation_of_large_coprime_costs_is_the_brute_force_optimum():
    """Costs of about a thousand bytes with gcd 1: the dynamic program runs on ~10^5 byte cells, in several
    chunks of its rows; against every rank pair of the first two modules (the third takes what fits)."""
    g = torch.Generator().manual_seed(7)
    costs, length = [1000, 1001, 999], 60
    worths = [
        (c * (1 + 0.01 * torch.rand(length, generator=g, dtype=torch.float64))).sort(descending=True).values
        for c in costs
    ]
    sums = [[0.0] + torch.cumsum(w, 0).tolist() for w in worths]
    for budget in (60_537, 90_011, 120_999):
        result = allocate(worths, costs, budget)
        best = max(
            sums[0][a] + sums[1][b] + sums[2][min(length, (budget - a * 1000 - b * 1001) // 999)]
            for a in range(1, length + 1)
            for b in range(1, length + 1)
            if budget - a * 1000 - b * 1001 >= 999
        )
        assert result.exact and result.cost <= budget and result.dp_work > 4_000_000
        assert sum(sums[i][k] for i, k in enumerate(result.ranks)) == pytest.approx(best, rel=1e-13)
