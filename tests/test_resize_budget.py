"""``aclora resize --max-size``: the written file fits, metadata included; the kept update is the most the
size allows; a size no file meets is refused; the criteria cap it; ``aclora inspect``'s size/quality curve.

Expectations are independent of the code under test: sizes are ``os.path.getsize`` of the files written,
spectra come from a float64 SVD of the explicit update alpha/k * up @ down, and the optimum from brute
force over every rank combination.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from aclora_ext.files.storage import read_metadata
from aclora_ext.functional.allocation import BudgetError
from aclora_ext.options import format_size
from aclora_ext.tools.cli import main as cli_main
from aclora_ext.tools.resize import ResizeError, resize_file, resize_state_dict
from aclora_ext.tools.resize.curve import TABLE_SHARES, size_curve
from test_resize import SD1_MODULES, file_update, planted_file
from helpers import import_or_fail

RANK = 6
#: one module of each kind: linear, 1x1 conv, 3x3 conv, and two linear ones of other shapes
KINDS = [SD1_MODULES[0], SD1_MODULES[1], SD1_MODULES[2], SD1_MODULES[3], SD1_MODULES[5]]
DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}


def graded_file(seed: int = 0, rank: int = RANK) -> dict:
    """Every module's update has ``rank`` components of decaying strength, the modules 1-10x apart."""
    tensors = planted_file(KINDS, rank, {name: rank for name, *_ in KINDS}, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, *_ in KINDS:  # decaying spectra, modules of different strength
        tensors[f"{name}.lora_up.weight"] *= float(torch.empty(1).uniform_(1.0, 10.0, generator=gen))
        up = tensors[f"{name}.lora_up.weight"]
        tensors[f"{name}.lora_up.weight"] = up * torch.logspace(0, -1.5, rank).reshape((1, rank) + (1,) * (up.dim() - 2))
    return tensors


def write_input(tmp_path, tensors: dict, name: str = "in.safetensors") -> str:
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, {"ss_network_dim": str(RANK)})
    return path


def spectra(tensors: dict) -> dict[str, torch.Tensor]:
    return {name: torch.linalg.svdvals(file_update(tensors, name)) for name, *_ in KINDS}


def whole_error(tensors: dict, ranks: dict[str, int]) -> float:
    """||dW - dW'|| / ||dW|| over all modules of the best rank-k approximations, from the explicit SVDs."""
    dropped = total = 0.0
    for name, s in spectra(tensors).items():
        energy = s.square()
        dropped += float(energy[ranks[name]:].sum())
        total += float(energy.sum())
    return math.sqrt(dropped / total)


def file_size(path) -> int:
    return os.path.getsize(path)


# --- the bound -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_written_file_is_at_most_the_size_asked_for_in_every_dtype_and_module_kind(tmp_path, dtype):
    source = write_input(tmp_path, graded_file())
    out = tmp_path / "out.safetensors"
    full = resize_file(source, str(tmp_path / "full.safetensors"), dtype=dtype, min_importance=0.0)
    full_size = file_size(tmp_path / "full.safetensors")
    smallest = None
    for share in (1.0, 0.8, 0.6, 0.45, 0.3):
        max_size = int(share * full_size)
        try:
            result = resize_file(source, str(out), dtype=dtype, max_size=max_size)
        except BudgetError as err:
            smallest = err.smallest
            continue
        assert file_size(out) == result.budget.size <= max_size
        assert result.budget.exact
        written = load_file(str(out))
        assert {v.dtype for v in written.values()} == {full.tensors[next(iter(full.tensors))].dtype}
        # every kind of module is in the file, each within its own rank
        for name, *_ in KINDS:
            assert 1 <= written[f"{name}.lora_down.weight"].shape[0] <= RANK
    assert smallest is None or smallest > int(0.3 * full_size)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_size_that_holds_everything_cuts_nothing_and_a_wider_dtype_keeps_fewer_components(tmp_path, dtype):
    source = write_input(tmp_path, graded_file())
    full = resize_file(source, str(tmp_path / "full.safetensors"), dtype=dtype, min_importance=0.0)
    # the budgeted file's metadata records the budget: a few dozen bytes more than the unbudgeted one's
    roomy = resize_file(source, str(tmp_path / "same.safetensors"), dtype=dtype,
                        max_size=file_size(tmp_path / "full.safetensors") + 100)
    assert roomy.ranks == full.ranks
    half = resize_file(source, str(tmp_path / "half.safetensors"), dtype=dtype, max_size=16_000)
    narrow = resize_file(source, str(tmp_path / "narrow.safetensors"), dtype="fp16", max_size=16_000)
    kept, kept_narrow = sum(half.ranks.values()), sum(narrow.ranks.values())
    assert kept < kept_narrow if DTYPES[dtype] == 4 else kept == kept_narrow


# --- the choice ----------------------------------------------------------------------------------------------
def component_bytes(tensors: dict, name: str, element: int) -> int:
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    return (down[0].numel() + up.shape[0]) * element


#: bytes by which a rank combination's metadata may differ from the chosen one's (its truncation errors
#: printed to 6 significant digits lose trailing zeros); ranks here have one digit
METADATA_SLACK = 16


@pytest.mark.parametrize("seed", range(4))
def test_the_ranks_are_the_brute_force_optimum_for_the_room_the_header_leaves(tmp_path, seed):
    """The documented guarantee: of every rank combination whose components fit in the bytes the chosen
    file's header and alphas leave (less the few bytes its own metadata may differ by), none keeps more of
    the whole update than the chosen one; and the chosen one fits."""
    tensors = graded_file(seed, rank=4)
    source = write_input(tmp_path, tensors)
    sv = spectra(tensors)
    total = sum(float(s.square().sum()) for s in sv.values())
    costs = {name: component_bytes(tensors, name, 4) for name, *_ in KINDS}
    data = sum(4 * c for c in costs.values())
    resize_file(source, str(tmp_path / "full.safetensors"), dtype="fp32", max_size=10 ** 6)
    full = file_size(tmp_path / "full.safetensors")
    combos = [(sum(costs[n] * k for n, k in zip(costs, combo)),
               sum(float(sv[n][:k].square().sum()) for n, k in zip(costs, combo)))
              for combo in itertools.product(range(1, 5), repeat=len(costs))]

    def best(room: int) -> float:
        return max((worth for cost, worth in combos if cost <= room), default=0.0)

    for share in [i / 20 for i in range(5, 20)]:  # of the components' bytes
        out = tmp_path / f"out-{share}.safetensors"
        result = resize_file(source, str(out), dtype="fp32", max_size=full - int((1 - share) * data))
        size = file_size(out)
        assert size <= result.budget.max_size
        ranks = result.ranks
        room = result.budget.max_size - (size - sum(costs[n] * k for n, k in ranks.items()))
        kept = sum(float(sv[n][:k].square().sum()) for n, k in ranks.items())
        assert best(room - METADATA_SLACK) * (1 - 1e-6) <= kept <= best(room) * (1 + 1e-6)
        assert result.error == pytest.approx(math.sqrt(max(total - kept, 0.0) / total), rel=1e-4, abs=1e-6)
        assert result.error == pytest.approx(whole_error(tensors, ranks), rel=1e-4, abs=1e-6)


def test_max_rank_and_min_rank_bound_every_module_under_a_budget(tmp_path):
    source = write_input(tmp_path, graded_file())
    big = resize_file(source, str(tmp_path / "a.safetensors"), max_size=10 ** 6, max_rank=3)
    assert max(big.ranks.values()) == 3 and big.budget.criterion_caps is False
    small = resize_file(source, str(tmp_path / "b.safetensors"), max_size=14_000, min_rank=2)
    assert min(small.ranks.values()) >= 2 and file_size(tmp_path / "b.safetensors") <= 14_000


def test_a_criterion_given_with_a_budget_caps_it_and_without_one_only_the_ranks_do(tmp_path):
    source = write_input(tmp_path, graded_file())
    plenty = 10 ** 6
    default_cut = resize_file(source, str(tmp_path / "d.safetensors"))  # importance 0.01, no budget
    uncapped = resize_file(source, str(tmp_path / "u.safetensors"), max_size=plenty)
    assert sum(uncapped.ranks.values()) == RANK * len(KINDS) > sum(default_cut.ranks.values())
    for args in ({"min_importance": 0.05}, {"criterion": "sv_fro", "param": 0.9}):
        cut = resize_file(source, str(tmp_path / "c.safetensors"), **args)
        capped = resize_file(source, str(tmp_path / "cb.safetensors"), max_size=plenty, **args)
        assert capped.ranks == {n: min(k, RANK) for n, k in cut.ranks.items()} and capped.budget.criterion_caps
        tight = resize_file(source, str(tmp_path / "ct.safetensors"), max_size=12_000, **args)
        assert all(tight.ranks[n] <= capped.ranks[n] for n in cut.ranks) and tight.ranks != capped.ranks


def test_the_metadata_records_the_budget_and_the_api_reads_sizes_with_units(tmp_path):
    source = write_input(tmp_path, graded_file())
    out = tmp_path / "out.safetensors"
    result = resize_file(source, str(out), max_size="15KB")
    meta = read_metadata(str(out))
    record = json.loads(meta["aclora_resize"])
    assert record["max_size"] == 15_000 and record["caps"] == "max_rank"
    assert meta["ss_training_comment"].startswith("Dynamic resize with importance: 0.0, max_size: 15000 from 6; ")
    assert json.loads(meta["aclora_ranks"]) == result.ranks
    assert resize_state_dict(load_file(source), max_size="15KB", metadata={"ss_network_dim": "6"}).ranks \
        == result.ranks
    assert resize_file(source, str(tmp_path / "kib.safetensors"), max_size="15KiB").budget.max_size == 15 * 1024


# --- refusals ------------------------------------------------------------------------------------------------
def test_a_size_below_the_smallest_file_is_refused_with_that_size_and_nothing_is_written(tmp_path, capsys):
    source = write_input(tmp_path, graded_file())
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous file")
    with pytest.raises(BudgetError) as err:
        resize_file(source, str(out), max_size=2000)
    smallest = err.value.smallest
    assert format_size(smallest) in str(err.value) and out.read_bytes() == b"the previous file"
    assert cli_main(["resize", source, str(out), "--max-size", "2KB"]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "--max-size 2KB" in message and format_size(smallest) in message
    assert out.read_bytes() == b"the previous file"
    # the smallest size is the real one: a file of exactly that size, every module at rank 1
    result = resize_file(source, str(out), max_size=smallest)
    assert file_size(out) == smallest and set(result.ranks.values()) == {1}


@pytest.mark.parametrize("value", ["5XB", "-3MB", "0", "1e6", "5M"])
def test_a_bad_size_is_named_with_what_is_allowed(tmp_path, capsys, value):
    source = write_input(tmp_path, graded_file())
    assert cli_main(["resize", source, str(tmp_path / "out.safetensors"), f"--max-size={value}"]) == 1
    message = capsys.readouterr().err
    assert repr(value) in message and "allowed" in message and "MiB" in message
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ResizeError, match="max_size"):
        resize_state_dict(graded_file(), max_size=value)


def test_the_help_says_what_max_size_does(capsys):
    with pytest.raises(SystemExit):
        cli_main(["resize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--max-size", "metadata included", "MiB", "--max-rank", "criterion", "smallest possible"):
        assert words in text
    with pytest.raises(SystemExit):
        cli_main(["inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "size/quality curve" in text and "--no-curve" in text


# --- inspect's curve -----------------------------------------------------------------------------------------
def test_the_size_curve_is_what_resize_writes_at_each_share_and_its_error_the_direct_one(tmp_path):
    tensors = graded_file(rank=24)  # the factors, not the header, make most of the file
    source = write_input(tmp_path, tensors)
    curve = size_curve(source)
    assert [p.share for p in curve.points] == list(TABLE_SHARES) and curve.file_bytes == file_size(source)
    fitted = [p for p in curve.points if p.size is not None]
    assert len(fitted) >= 3
    for point in fitted:
        out = tmp_path / f"at-{point.share}.safetensors"
        result = resize_file(source, str(out), max_size=point.max_size)
        assert point.max_size == int(point.share * curve.file_bytes)
        assert point.size == file_size(out) <= point.max_size
        assert point.error == pytest.approx(whole_error(tensors, result.ranks), rel=1e-4, abs=1e-6)
    errors = [p.error for p in fitted]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]
    for point in curve.points:
        if point.size is None:
            assert point.max_size < curve.smallest


def test_inspect_prints_the_curve_gives_it_in_json_and_draws_it(tmp_path, capsys):
    source = write_input(tmp_path, graded_file())
    assert cli_main(["inspect", source]) == 0
    text = capsys.readouterr().out
    assert "size/quality" in text and "rel. error" in text and "25%" in text
    assert cli_main(["inspect", source, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["share"] for p in data["size_curve"]["points"]] == list(TABLE_SHARES)
    assert cli_main(["inspect", source, "--no-curve"]) == 0
    assert "size/quality" not in capsys.readouterr().out
    import_or_fail("matplotlib", "the plot needs pip install aclora[plot]")
    assert cli_main(["inspect", source, "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_file_resize_cannot_read_still_gets_its_report_with_the_reason_for_no_curve(tmp_path, capsys):
    tensors = graded_file()
    name = KINDS[0][0]
    tensors[f"{name}.alpha"] = torch.tensor(0.0)  # read_report accepts it, resize does not
    source = write_input(tmp_path, tensors)
    assert cli_main(["inspect", source]) == 0
    assert "size/quality curve: not available" in capsys.readouterr().out
