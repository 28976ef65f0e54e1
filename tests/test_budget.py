"""Ranks under a file-size budget (issue 18): size strings (``options``), exact file sizes (``files.sizes``),
the allocation (``functional.allocation``) and a whole file's ranks (``files.fit``).

Expectations are independent of the code under test: file sizes are those of
files really written (``safetensors.torch.save`` and the project's
``files.save_state_dict``), optima come from brute force over every rank
combination or from a plain dynamic program over modules and bytes.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import save

from aclora_ext import options
from aclora_ext.files import sizes
from aclora_ext.files.fit import fit_ranks
from aclora_ext.files.storage import save_state_dict
from aclora_ext.functional import allocation
from aclora_ext.tools.resize import resize_state_dict, resized_metadata
from aclora_ext.tools.resize.core import DTYPES as DTYPE_BY_NAME  # aclora resize --dtype names



# --- size strings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("50MB", 50_000_000), ("50 MB", 50_000_000), ("50mb", 50_000_000), ("1.5GB", 1_500_000_000),
    ("800KB", 800_000), ("123456", 123_456), ("100B", 100), (" 7 kB ", 7_000),
    ("512MiB", 512 * 2 ** 20), ("1GiB", 2 ** 30), ("2.5KiB", 2_560), ("0.3MB", 300_000),  # exact decimal
    ("1.0000005KB", 1_000),  # fractions of a byte round down: the size is a maximum
    (".5GB", 500_000_000), (4096, 4096),
])
def test_parse_size_reads_decimal_and_binary_units(text, size):
    assert options.parse_size(text) == size


@pytest.mark.parametrize("text", ["-5MB", "abc", "0", "5XB", "", "0MB", "0.0001KB", "1.5", "5M", "5 K", "1e6",
                                  "nan", "inf", "5 MB MB", "5,000", "\uff15MB", 0, -1, True, None, 1.5])
def test_parse_size_refuses_bad_input_naming_the_value_and_what_is_allowed(text):
    with pytest.raises(ValueError) as err:
        options.parse_size(text)
    message = str(err.value)
    assert repr(text) in message
    assert "allowed" in message and "MB" in message and "MiB" in message


def test_format_size_uses_the_decimal_units_parse_size_reads():
    assert options.format_size(49_912_345) == "49,912,345 bytes (49.91 MB)"
    assert options.parse_size("49.91MB") == 49_910_000
    assert options.format_size(999) == "999 bytes"


# --- exact file sizes --------------------------------------------------------------------------------------
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
METADATA = (None, {}, {"ss_network_dim": "Dynamic", "aclora_ranks": json.dumps({"a": 3, "b": 12}),
                       "odd": 'quote " backslash \\ newline \n tab \t cr \r bs \b ff \f nul \x00 '
                                                   '\x01 \x1f del \x7f é ü 😀 \u2028 /'})


def lora_tensors(dtype, rank=5, conv=True, alpha=True, seed=0):
    """A small kohya LoRA: one Linear module and, with ``conv``, a 3x3 and a 1x1 conv module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"lora_te1_mlp_fc1": ((rank, 96), (384, rank))}
    if conv:
        shapes["lora_unet_conv_in"] = ((rank, 8, 3, 3), (20, rank, 1, 1))
        shapes["lora_unet_proj_in"] = ((rank, 24, 1, 1), (24, rank, 1, 1))
    out = {}
    for name, (down, up) in shapes.items():
        out[f"{name}.lora_down.weight"] = torch.randn(down, generator=g).to(dtype)
        out[f"{name}.lora_up.weight"] = torch.randn(up, generator=g).to(dtype)
        if alpha:
            out[f"{name}.alpha"] = torch.tensor(2.0).to(dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metadata", METADATA)
@pytest.mark.parametrize("conv", (False, True))
def test_predicted_header_and_size_equal_what_safetensors_writes(dtype, metadata, conv):
    tensors = lora_tensors(dtype, conv=conv)
    blob = save(tensors, metadata)
    (length,) = struct.unpack("<Q", blob[:8])
    header = sizes.safetensors_header(tensors, metadata)
    assert sizes.safetensors_size(tensors, metadata) == len(blob)
    assert len(header) == length
    if metadata is None or len(metadata) <= 1:  # one key: no map order to differ in
        assert header == blob[8:8 + length]
    else:
        assert json.loads(header) == json.loads(blob[8:8 + length])
    # the same from (dtype, shape) pairs, as the allocation uses it
    assert sizes.safetensors_size({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata) == len(blob)


def test_tensor_order_of_every_dtype_matches_the_installed_serializer():
    """Offsets depend on the order safetensors lays tensors out (dtype, then name)."""
    from safetensors.torch import _TYPES

    names = [f"t{i:02d}" for i in range(len(sizes.DTYPE_NAMES))]
    random.Random(0).shuffle(names)
    tensors = {}
    for name, (dtype, label) in zip(names, sizes.DTYPE_NAMES.items()):
        if label in _TYPES:
            tensors[name] = torch.zeros(3, dtype=dtype)
            tensors[name + "b"] = torch.zeros((2, 1), dtype=dtype)
    blob = save(tensors)
    (length,) = struct.unpack("<Q", blob[:8])
    assert sizes.safetensors_header(tensors) == blob[8:8 + length]


def test_mixed_dtypes_and_padding_to_eight_bytes_are_exact():
    for extra in range(12):  # names of every length mod 8: every amount of padding
        tensors = {"x" * (1 + extra): torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(5),
                   "a": torch.zeros((), dtype=torch.bfloat16), "e": torch.zeros(0, 4)}
        blob = save(tensors, {"k": "v" * extra})
        assert sizes.safetensors_size(tensors, {"k": "v" * extra}) == len(blob)
        assert len(sizes.safetensors_header(tensors, {"k": "v" * extra})) % 8 == 0
    assert sizes.safetensors_size({}) == len(save({}))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metadata", METADATA)
def test_predicted_size_equals_the_file_save_state_dict_writes(tmp_path, dtype, metadata):
    """save_state_dict adds the sshs hashes (fixed lengths), also replacing hashes already in the metadata."""
    tensors = lora_tensors(dtype)
    meta = None if metadata is None else {**metadata, "sshs_model_hash": "stale", "ss_int": 7}
    path = tmp_path / "f.safetensors"
    save_state_dict(str(path), tensors, meta)
    assert os.path.getsize(path) == sizes.saved_file_size(tensors, meta)


def test_predicted_size_is_exact_beyond_one_mebibyte(tmp_path):
    """The legacy hash reads the bytes at 1 MiB: still 8 hex digits."""
    tensors = {"m.lora_down.weight": torch.randn(8, 70_000).half(), "m.lora_up.weight": torch.randn(3_000, 8).half(),
               "m.alpha": torch.tensor(4.0).half()}
    path = tmp_path / "big.safetensors"
    save_state_dict(str(path), tensors, {"ss_x": "y"})
    assert os.path.getsize(path) > 2 ** 20
    assert os.path.getsize(path) == sizes.saved_file_size(tensors, {"ss_x": "y"})


@pytest.mark.parametrize("dtype", ("fp16", "bf16", "fp32"))
def test_layouts_match_the_resized_file_and_its_size(tmp_path, dtype):
    """ModuleLayout gives the keys, dtypes and shapes resize writes; the size of its file is predicted."""
    source = lora_tensors(torch.float32, rank=6, seed=3)
    result = resize_state_dict(source, "importance", min_importance=0.3, dtype=dtype)
    names = sorted({key.rsplit(".", 2)[0] for key in source})
    layouts = [sizes.ModuleLayout.from_shapes(n, source[f"{n}.lora_down.weight"].shape,
                                          source[f"{n}.lora_up.weight"].shape, DTYPE_BY_NAME[dtype])
               for n in names]
    ranks = [result.ranks[n] for n in names]
    assert len(set(ranks)) > 1  # the case is one of different ranks
    predicted = sizes.layout_tensors(layouts, ranks)
    assert predicted == {k: (v.dtype, tuple(v.shape)) for k, v in result.tensors.items()}
    metadata = resized_metadata({"ss_network_dim": "6"}, result)
    path = tmp_path / "resized.safetensors"
    save_state_dict(str(path), result.tensors, metadata)
    assert os.path.getsize(path) == sizes.saved_file_size(predicted, metadata)
    for layout, k in zip(layouts, ranks):  # a component costs a row of down and a column of up
        one = sizes.tensor_bytes(layout.tensors(k + 1)) - sizes.tensor_bytes(layout.tensors(k))
        assert layout.component_bytes == one


# --- the allocation ----------------------------------------------------------------------------------------
def brute_force(worths, costs, budget, lo, hi):
    """The best worth over all rank combinations (None when none fits); ranks keep the largest worths."""
    ordered = [sorted(w.tolist(), reverse=True) for w in worths]
    ranges = [range(min(lo, len(w)), min(hi, len(w)) + 1) for w in ordered]
    values = [sum(sum(w[:k]) for w, k in zip(ordered, ks)) for ks in itertools.product(*ranges)
              if sum(c * k for c, k in zip(costs, ks)) <= budget]
    return max(values, default=None)


def reference_dp(worths, costs, budget, lo, hi):
    """The optimum by a plain DP over modules on every byte of the budget."""
    neg = float("-inf")
    dp = [0.0] + [neg] * budget
    for w, c in zip(worths, costs):
        w = sorted(w.tolist(), reverse=True)
        prefix = list(itertools.accumulate(w, initial=0.0))
        new = [neg] * (budget + 1)
        for s, value in enumerate(dp):
            if value == neg:
                continue
            for k in range(min(lo, len(w)), min(hi, len(w)) + 1):
                if s + k * c > budget:
                    break
                new[s + k * c] = max(new[s + k * c], value + prefix[k])
        dp = new
    return max(dp)


def planted(rng: random.Random, modules=(2, 4), longest=6, shuffle=0.3, zeros=0.2):
    count = rng.randint(*modules)
    worths = []
    for _ in range(count):
        w = torch.tensor(sorted((rng.random() ** 3 for _ in range(rng.randint(1, longest))), reverse=True),
                         dtype=torch.float64)
        if rng.random() < zeros:
            w[rng.randrange(len(w)):] = 0.0
        if rng.random() < shuffle:
            w = w[torch.randperm(len(w), generator=torch.Generator().manual_seed(rng.randrange(1000)))]
        worths.append(w)
    costs = [rng.randint(1, 20) for _ in range(count)]
    return worths, costs


def test_exact_equals_brute_force_and_greedy_is_within_one_component():
    rng = random.Random(0)
    checked = greedy_worse = 0
    for _ in range(600):
        worths, costs = planted(rng)
        lo, hi = rng.choice((0, 1, 2)), rng.choice((2, 3, 6))
        budget = rng.randint(0, 90)
        best = brute_force(worths, costs, budget, lo, hi)
        if best is None:
            with pytest.raises(allocation.BudgetError):
                allocation.allocate(worths, costs, budget, min_ranks=lo, max_ranks=hi)
            continue
        exact = allocation.allocate(worths, costs, budget, min_ranks=lo, max_ranks=hi, method="exact")
        greedy = allocation.allocate(worths, costs, budget, min_ranks=lo, max_ranks=hi, method="greedy")
        assert exact.exact and exact.gap == 0.0
        assert exact.worth == pytest.approx(best, abs=1e-12)
        assert exact.cost == sum(c * k for c, k in zip(costs, exact.ranks)) <= budget
        # greedy: below the optimum by less than one component, and the reported bound holds
        optional = [float(v) for w, l, h in zip(worths, [lo] * len(worths), [hi] * len(worths))
                    for v in sorted(w.tolist(), reverse=True)[min(l, len(w)):min(h, len(w))]]
        assert greedy.worth <= best + 1e-12 <= greedy.bound + 2e-12
        assert greedy.bound - greedy.worth <= max(optional, default=0.0) + 1e-12
        greedy_worse += greedy.worth < best - 1e-12
        checked += 1
    assert checked > 400 and greedy_worse > 10  # the instances do separate the two methods


def test_exact_reduction_and_second_dp_match_a_reference_dp(monkeypatch):
    """With a core of 1 or 2 items the first DP cannot prove optimality: the reduction and the second,
    exact DP do the work (on 5..25 modules, beyond brute force)."""
    rng = random.Random(1)
    for core in (1, 2, 5):
        monkeypatch.setattr(allocation, "CORE_ITEMS", core)
        second = 0
        for _ in range(40):
            worths, costs = planted(rng, modules=(5, 25), longest=10, shuffle=0.0, zeros=0.0)
            costs = [rng.choice((3, 5, 6, 8, 9, 12, 20)) for _ in costs]
            lo, hi = rng.choice((0, 1)), rng.choice((4, 10))
            full = sum(c * min(hi, len(w)) for c, w in zip(costs, worths))
            base = sum(c * min(lo, len(w)) for c, w in zip(costs, worths))
            budget = rng.randint(base, full)
            result = allocation.allocate(worths, costs, budget, min_ranks=lo, max_ranks=hi)
            assert result.exact
            assert result.worth == pytest.approx(reference_dp(worths, costs, budget, lo, hi), abs=1e-10)
            assert result.cost <= budget
            second += result.core > core
        assert second > 0  # the second DP did run


def test_exact_over_its_work_limit_returns_the_greedy_answer_with_its_certified_gap():
    rng = random.Random(2)
    worths, costs = planted(rng, modules=(8, 8), longest=10, shuffle=0.0, zeros=0.0)
    budget = sum(costs) * 3
    greedy = allocation.allocate(worths, costs, budget, method="greedy")
    limited = allocation.allocate(worths, costs, budget, method="exact", dp_limit=0)
    assert not limited.exact and limited.ranks == greedy.ranks
    assert limited.gap == pytest.approx(greedy.bound - greedy.worth) and limited.gap > 0


def test_budget_is_never_exceeded_and_rank_limits_hold():
    rng = random.Random(3)
    for _ in range(400):
        worths, costs = planted(rng, modules=(1, 30), longest=16)
        count = len(worths)
        lo = [rng.randint(0, 4) for _ in range(count)]
        hi = [rng.randint(max(l, 1), 20) for l in lo]
        base = sum(c * min(l, len(w)) for c, l, w in zip(costs, lo, worths))
        budget = base + rng.randint(0, 400)
        for method in allocation.METHODS:
            result = allocation.allocate(worths, costs, budget, min_ranks=lo, max_ranks=hi, method=method)
            assert result.cost == sum(c * k for c, k in zip(costs, result.ranks)) <= budget
            for k, l, h, w, c in zip(result.ranks, lo, hi, worths, costs):
                assert min(l, len(w)) <= k <= min(h, len(w))
                # zero-worth components are never bought beyond the minimum rank
                assert k <= max(min(l, len(w)), int((w > 0).sum()))
                # a component that fits is taken (greedy skips what does not fit and goes on)
                if k < min(h, len(w)) and float(w.sort(descending=True).values[k]) > 0:
                    assert result.cost + c > budget


def test_greedy_skips_a_component_that_does_not_fit_and_takes_later_ones():
    worths = [torch.tensor([10.0, 9.0], dtype=torch.float64), torch.tensor([0.5, 0.4], dtype=torch.float64)]
    result = allocation.allocate(worths, [10, 1], 5, min_ranks=0, method="greedy")
    assert result.ranks == [0, 2] and result.cost == 2
    assert result.bound == pytest.approx(5.0)  # the LP: half of the first component


def test_unsorted_worths_keep_the_components_of_largest_worth():
    worths = [torch.tensor([0.1, 5.0, 0.2, 3.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64)]
    result = allocation.allocate(worths, [2, 2], 6, min_ranks=0)
    assert result.ranks == [2, 1]
    masks = result.masks()
    assert masks[0].tolist() == [False, True, False, True] and masks[1].tolist() == [False, True]
    sorted_result = allocation.allocate([w.sort(descending=True).values for w in worths], [2, 2], 6, min_ranks=0)
    assert [m.tolist() for m in sorted_result.masks()] == [[True, True, False, False], [True, False]]  # prefixes


def test_a_budget_below_the_minimum_ranks_is_refused_with_the_smallest_cost():
    with pytest.raises(allocation.BudgetError) as err:
        allocation.allocate([torch.ones(4), torch.ones(4)], [100, 30], 259, min_ranks=2)
    assert err.value.smallest == 260 and "260 bytes" in str(err.value)
    assert allocation.allocate([torch.ones(4), torch.ones(4)], [100, 30], 260, min_ranks=2).ranks == [2, 2]


@pytest.mark.parametrize("bad, match", [
    (dict(worths=[torch.tensor([1.0, -1.0])]), "finite and >= 0"),
    (dict(worths=[torch.tensor([1.0, float("nan")])]), "finite and >= 0"),
    (dict(costs=[0]), "not a positive number of bytes"),
    (dict(min_ranks=3, max_ranks=2), "allow no rank"),
    (dict(method="dp"), "not known"),
])
def test_allocate_refuses_bad_input(bad, match):
    args = dict(worths=[torch.ones(4)], costs=[10], budget=100, min_ranks=1, max_ranks=None, method="exact")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        allocation.allocate(args.pop("worths"), args.pop("costs"), args.pop("budget"), **args)


# --- a whole file -----------------------------------------------------------------------------------------
def random_layouts(rng: random.Random, count: int, dtype=torch.float16):
    layouts = []
    for i in range(count):
        kernel = rng.choice(((), (), (3, 3), (1, 1)))
        layouts.append(sizes.ModuleLayout(f"lora_unet_block_{i}_{'conv' if kernel else 'fc'}", rng.choice((16, 40, 96)),
                                      rng.choice((16, 64, 120)), kernel, dtype))
    return layouts


def ranks_metadata(ranks: dict) -> dict:
    return {"ss_network_dim": "Dynamic", "aclora_ranks": json.dumps(ranks, separators=(",", ":"))}


def write(path, layouts, ranks, metadata):
    tensors = {k: torch.zeros(shape, dtype=dtype) for k, (dtype, shape) in sizes.layout_tensors(layouts, ranks).items()}
    save_state_dict(str(path), tensors, metadata)
    return os.path.getsize(path)


def test_fit_ranks_files_are_at_most_the_limit_and_their_size_is_predicted(tmp_path):
    rng = random.Random(4)
    for case in range(30):
        layouts = random_layouts(rng, rng.randint(1, 12), rng.choice(DTYPES))
        worths = [torch.rand(rng.randint(1, 12), dtype=torch.float64).sort(descending=True).values ** 2
                  for _ in layouts]
        lo, hi = rng.randint(0, 2), rng.randint(2, 12)
        caps = [rng.randint(max(lo, 1), hi) for _ in layouts]
        smallest = write(tmp_path / "s.safetensors", layouts, [min(lo, len(w)) for w in worths],
                         ranks_metadata({l.name: min(lo, len(w)) for l, w in zip(layouts, worths)}))
        full = write(tmp_path / "f.safetensors", layouts, [min(c, len(w)) for c, w in zip(caps, worths)],
                     ranks_metadata({l.name: min(c, len(w)) for l, c, w in zip(layouts, caps, worths)}))
        max_size = rng.randint(smallest, max(smallest, full))
        fit = fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, max_size, min_ranks=lo, max_ranks=caps,
                        method=rng.choice(allocation.METHODS))
        size = write(tmp_path / f"{case}.safetensors", layouts, [fit.ranks[l.name] for l in layouts],
                     ranks_metadata(fit.ranks))
        assert size == fit.size <= max_size
        assert fit.smallest == smallest


def test_fit_ranks_leaves_no_room_for_one_more_component():
    """The exact allocation with the chosen file's own header: adding any component breaks the limit."""
    rng = random.Random(5)
    for _ in range(40):
        layouts = random_layouts(rng, rng.randint(2, 10))
        worths = [torch.rand(8, dtype=torch.float64).sort(descending=True).values + 0.01 for _ in layouts]
        smallest = sizes.saved_file_size(sizes.layout_tensors(layouts, [1] * len(layouts)),
                                     ranks_metadata({layout.name: 1 for layout in layouts}))
        full = sizes.saved_file_size(sizes.layout_tensors(layouts, [8] * len(layouts)),
                                 ranks_metadata({layout.name: 8 for layout in layouts}))
        max_size = rng.randint(smallest, full)
        fit = fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, max_size)
        assert fit.allocation.exact
        for i, layout in enumerate(layouts):
            if fit.ranks[layout.name] < 8:
                more = dict(fit.ranks, **{layout.name: fit.ranks[layout.name] + 1})
                size = sizes.saved_file_size(sizes.layout_tensors(layouts, list(more.values())), ranks_metadata(more))
                assert size > max_size


def test_fit_ranks_keeps_everything_when_it_fits_and_the_minimum_at_the_smallest_size():
    rng = random.Random(6)
    layouts = random_layouts(rng, 6)
    worths = [torch.rand(5, dtype=torch.float64) + 0.1 for _ in layouts]
    full = sizes.saved_file_size(sizes.layout_tensors(layouts, [5] * 6), ranks_metadata({l.name: 5 for l in layouts}))
    assert list(fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, full).ranks.values()) == [5] * 6
    assert fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, full - 1).size <= full - 1
    smallest = fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, full, min_ranks=2).smallest
    fit = fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, smallest, min_ranks=2)
    assert list(fit.ranks.values()) == [2] * 6 and fit.size == smallest


def test_fit_ranks_refuses_a_limit_below_the_smallest_file_saying_its_size(tmp_path):
    rng = random.Random(7)
    layouts = random_layouts(rng, 5)
    worths = [torch.rand(6, dtype=torch.float64) for _ in layouts]
    smallest = write(tmp_path / "s.safetensors", layouts, [1] * 5, ranks_metadata({l.name: 1 for l in layouts}))
    with pytest.raises(allocation.BudgetError) as err:
        fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, smallest - 1)
    assert err.value.smallest == smallest
    message = str(err.value)
    assert options.format_size(smallest) in message and "smallest possible file" in message and "\n" not in message
    assert fit_ranks(sizes.FileLayout(layouts, ranks_metadata), worths, smallest).size == smallest


def test_fit_ranks_survives_metadata_that_grows_as_ranks_shrink(tmp_path):
    """The header bound assumes metadata grows with the ranks; the exact check catches the opposite."""
    rng = random.Random(8)
    layouts = random_layouts(rng, 6)
    worths = [torch.rand(8, dtype=torch.float64).sort(descending=True).values for _ in layouts]

    def perverse(ranks):
        return {"pad": "x" * (40 * sum(8 - k for k in ranks.values()))}

    full = sizes.saved_file_size(sizes.layout_tensors(layouts, [8] * 6), perverse({l.name: 8 for l in layouts}))
    for max_size in (full * 2 // 3, full // 2):
        fit = fit_ranks(sizes.FileLayout(layouts, perverse), worths, max_size)
        assert fit.tries > 1 and sum(fit.ranks.values()) > len(layouts)  # tightened, not the minimum-rank fallback
        assert write(tmp_path / "p.safetensors", layouts, list(fit.ranks.values()), perverse(fit.ranks)) \
            == fit.size <= max_size



# --- the allocation's input and messages (aclora_ext.functional.allocation) ---------------------------------------
def test_allocate_names_the_module_of_a_bad_worth_and_lists_the_methods():
    from aclora_ext.functional.allocation import allocate

    with pytest.raises(ValueError, match=r"^unet\.mid: worths must be finite and >= 0$"):
        allocate([torch.tensor([1.0]), torch.tensor([-1.0])], [4, 4], 100, names=["unet.down", "unet.mid"])
    with pytest.raises(ValueError, match=r"^method 'best' is not known; allowed: exact, greedy$"):
        allocate([torch.tensor([1.0])], [4], 100, method="best")


def test_update_worths_are_the_squared_singular_values_of_the_scaled_update_in_float64():
    from aclora_ext.functional.allocation import update_worths

    worths = update_worths(torch.tensor([3.0, 1.0, 0.1]), scale=-0.5)
    assert worths.dtype == torch.float64
    assert worths.tolist() == pytest.approx([2.25, 0.25, 0.0025], rel=1e-7)  # (0.5 s)^2: float32 0.1, squared
