"""``aclora inspect``: the rank report of a LoRA file, as a table, as JSON and as a plot, and its errors.

Expected numbers are computed here from the file's tensors and the network
that wrote it: ranks per block from the module names as the issue defines the
blocks (text encoders; down/mid/up or input/middle/output blocks), sizes
against the same LoRA written at its maximum rank.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from aclora_ext.tools.cli import main
from aclora_ext.tools.inspect import DECIDED_BY
from helpers import import_or_fail

PS = (0.99, 0.9, 0.7)


def block_of(name: str) -> str:
    found = re.match(r"lora_(te[12]?)_|lora_unet_((?:down|up|input|output)_blocks_\d+|mid_block|middle_block)_", name)
    return found[1] or found[2].replace("_blocks_", "_blocks.")


def expected_blocks(path) -> dict[str, tuple]:
    """{block: (modules, rank min, median, max, params)} from the file's tensors."""
    tensors = load_file(path)
    ranks: dict[str, list] = {}
    params: dict[str, int] = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            up = tensors[f"{name}.lora_up.weight"]
            ranks.setdefault(block_of(name), []).append(down.shape[0])
            params[block_of(name)] = params.get(block_of(name), 0) + down.numel() + up.numel()
    return {b: (len(r), min(r), statistics.median(r), max(r), params[b]) for b, r in ranks.items()}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sdxl_file(tmp_path, sdxl_models, planted_network):
    """An SDXL-like AC-LoRA file after three RESTARTs, saved with its full-rank twin."""
    network, _ = planted_network(sdxl_models, ps=PS, save_full_rank="true")
    path = tmp_path / "sdxl.safetensors"
    network.save_weights(str(path), None, {"ss_base_model_version": "sdxl_base_v1-0"})
    return network, path


def kohya_file(path, names_and_shapes: dict, rank: int = 4) -> None:
    """A plain fixed-rank kohya LoRA file as sd-scripts' networks.lora writes it (no aclora_* metadata)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_dim, in_dim) in names_and_shapes.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), {"ss_network_dim": str(rank), "ss_network_alpha": "1",
                                   "ss_network_module": "networks.lora"})


SGM_SDXL = {  # sd-scripts' own SDXL U-Net names
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_input_blocks_4_1_proj_in": (640, 640),
    "lora_unet_input_blocks_7_1_transformer_blocks_3_ff_net_2": (1280, 5120),
    "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k": (1280, 2048),
    "lora_unet_output_blocks_3_1_proj_out": (1280, 1280),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280),
}


# --- the table and the JSON --------------------------------------------------------------------------
def saved_ranks(path) -> dict:
    """Each module's rank in the file, from its lora_down shapes."""
    return {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in load_file(path).items()
            if k.endswith(".lora_down.weight")}


def test_inspect_prints_ranks_params_and_size_per_block_of_an_sdxl_file(capsys, sdxl_file):
    network, path = sdxl_file
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 0 and err == ""
    blocks = expected_blocks(path)
    assert set(blocks) == {"te1", "te2", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"}
    for block, (count, lo, mid, hi, params) in blocks.items():
        assert re.search(rf" {re.escape(block)} +{count} +{lo} +{mid:g} +{hi} +{params:,} ", out), block
    ranks = list(saved_ranks(path).values())  # decided on the final update when the file was saved
    assert f"{len(ranks)} modules, ranks min/median/max {min(ranks)}/{statistics.median(ranks):g}/{max(ranks)}" in out
    assert "AC-LoRA file for SDXL, restart_mode product, 3 RESTARTs" in out
    for entry in network.history:
        stats = f"{min(entry['ranks'])}/{statistics.median(entry['ranks']):g}/{max(entry['ranks'])}"
        decided = re.escape(DECIDED_BY[entry["source"]])  # RESTARTs given a p: "p given"
        assert re.search(rf"^ +{entry['index']} .* {entry['p']:.4f} .* {stats} +{decided}$", out, re.M), entry["index"]


def test_json_holds_the_same_report_and_the_max_rank_size_matches_the_full_rank_file(capsys, sdxl_file, tmp_path):
    network, path = sdxl_file
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert code == 0
    report = json.loads(out)
    blocks = expected_blocks(path)
    assert {b["block"]: (b["modules"], b["rank_min"], b["rank_median"], b["rank_max"], b["params"])
            for b in report["blocks"]} == blocks
    assert {m["name"]: m["rank"] for m in report["modules"]} == saved_ranks(path)
    assert [(h["p"], h["rank_min"], h["rank_max"]) for h in report["history"]] == \
        [(pytest.approx(p), min(h["ranks"]), max(h["ranks"])) for p, h in zip(PS, network.history)]
    assert report["max_rank"] == 8 and report["model"] == "SDXL" and report["source"] == "AC-LoRA"
    full = tmp_path / "sdxl-fullrank.safetensors"
    full_params = sum(v.numel() for k, v in load_file(full).items() if not k.endswith(".alpha"))
    assert report["params_at_max_rank"] == full_params
    assert report["params"] < full_params
    assert report["file_bytes"] == path.stat().st_size
    assert report["file_bytes_at_max_rank"] == pytest.approx(full.stat().st_size, rel=0.02)


def test_an_sd1_file_is_reported_by_text_encoder_and_down_mid_up_blocks(capsys, tmp_path, sd1_models, planted_network):
    network, _ = planted_network(sd1_models, conv_dim="4")
    path = tmp_path / "sd1.safetensors"
    network.save_weights(str(path))
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["model"] == "SD1.x/2.x"
    assert [(b["part"], b["block"]) for b in report["blocks"]] == [
        ("te", "te"), ("input", "down_blocks.0"), ("input", "down_blocks.1"), ("middle", "mid_block"),
        ("output", "up_blocks.0"), ("output", "up_blocks.1")]
    assert {b["block"]: b["modules"] for b in report["blocks"]} == {b: v[0] for b, v in expected_blocks(path).items()}
    conv = [m for m in report["modules"] if m["kind"] == "conv3x3"]
    assert conv and {m["max_rank"] for m in conv} == {4} and report["conv_max_rank"] == 4


def test_a_plain_kohya_file_with_sd_scripts_sdxl_names_is_read_without_complaint(capsys, tmp_path, caplog):
    path = tmp_path / "kohya.safetensors"
    kohya_file(path, SGM_SDXL)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 0 and err == "" and not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert "kohya LoRA file for SDXL" in out
    assert "RESTART history: none in the metadata (a plain LoRA file)" in out
    for block, (count, lo, mid, hi, params) in expected_blocks(path).items():
        assert re.search(rf" {re.escape(block)} +{count} +{lo} +{mid:g} +{hi} +{params:,} +{params:,}$", out, re.M)
    assert {"input_blocks.4", "input_blocks.7", "middle_block", "output_blocks.3", "te1", "te2"} == \
        set(expected_blocks(path))
    report = json.loads(run(capsys, "inspect", str(path), "--json")[1])
    assert report["history"] == [] and report["max_rank"] == 4
    assert report["params"] == report["params_at_max_rank"]


# --- the plot --------------------------------------------------------------------------------------------
def test_plot_writes_a_png_with_and_without_history(capsys, sdxl_file, tmp_path):
    import_or_fail("matplotlib", "the plot needs pip install aclora[plot]")
    _, path = sdxl_file
    kohya = tmp_path / "kohya.safetensors"
    kohya_file(kohya, SGM_SDXL)
    for source, image in ((path, tmp_path / "ranks.png"), (kohya, tmp_path / "plain.png")):
        code, out, _ = run(capsys, "inspect", str(source), "--plot", str(image))
        assert code == 0 and f"plot written to {image}" in out
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    with_history, without = imread(tmp_path / "ranks.png"), imread(tmp_path / "plain.png")
    assert with_history.shape[0] > 1.5 * without.shape[0]  # the RESTART panel below the per-module panel


def test_plot_without_matplotlib_says_how_to_install_it(capsys, sdxl_file, tmp_path, monkeypatch):
    _, path = sdxl_file
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    code, out, err = run(capsys, "inspect", str(path), "--plot", str(tmp_path / "x.png"))
    assert code == 1 and "U-Net input" in out
    assert err == "aclora inspect: error: --plot needs matplotlib, which is not installed: pip install 'aclora[plot]'\n"
    assert not (tmp_path / "x.png").exists()


# --- bad input ----------------------------------------------------------------------------------------------
def make_bad(kind: str, folder, good) -> str:
    path = folder / "bad.safetensors"
    if kind == "not safetensors":
        path.write_text("this is a text file, not a LoRA\n" * 4)
    elif kind == "not a torch file either":
        path = folder / "bad.pt"
        path.write_text("this is a text file, not a LoRA\n" * 4)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "lora_down without lora_up":
        save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
                   "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)}, str(path))
    elif kind in ("aclora_ranks", "aclora_history"):
        save_file(load_file(good), str(path), {kind: '{"lora_unet_mid_block": 3,'})
    elif kind == "aclora_history without ranks":
        save_file(load_file(good), str(path), {"aclora_history": '[{"index": 1, "p": 0.5}]'})
    elif kind == "directory":
        path = folder
    elif kind == "missing":
        path = folder / "no-such-file.safetensors"
    return str(path)


BAD = {
    "not safetensors": "not a safetensors file",
    "not a torch file either": "neither a safetensors file nor a torch checkpoint",
    "truncated": "truncated file",
    "lora_down without lora_up": "module lora_unet_mid_block_attentions_0_proj_in has lora_down but no lora_up",
    "aclora_ranks": "metadata field aclora_ranks is not valid JSON",
    "aclora_history": "metadata field aclora_history is not valid JSON",
    "aclora_history without ranks": "metadata field aclora_history: restart 1 has no list of integer ranks",
    "directory": "is a directory",
    "missing": "no such file",
}


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "good.safetensors"
    kohya_file(path, SGM_SDXL)
    return path


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_gives_one_clear_line_and_a_failure_status(kind, capsys, tmp_path, small_file):
    folder = tmp_path / "bad"
    folder.mkdir()
    code, out, err = run(capsys, "inspect", make_bad(kind, folder, small_file))
    assert code == 1 and out == ""
    assert err.startswith("aclora inspect: error: ") and err.count("\n") == 1, err
    assert BAD[kind] in err
    assert "Traceback" not in err


def test_the_command_line_program_reports_and_fails_cleanly(tmp_path, small_file):
    """The real process: `python -m aclora_ext.tools.cli` (what the `aclora` console script runs)."""
    good = subprocess.run([sys.executable, "-m", "aclora_ext.tools.cli", "inspect", str(small_file), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and json.loads(good.stdout)["source"] == "kohya LoRA"
    truncated = make_bad("truncated", tmp_path, small_file)
    bad = subprocess.run([sys.executable, "-m", "aclora_ext.tools.cli", "inspect", truncated], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("aclora inspect: error: ") and "truncated file" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_demo_subcommand_hands_its_arguments_to_the_demo(monkeypatch):
    import aclora_ext.tools.demo

    seen = []
    monkeypatch.setattr(aclora_ext.tools.demo, "main", lambda argv: seen.append(list(argv)) or 7)
    assert main(["demo", "--steps", "3"]) == 7
    assert seen == [["--steps", "3"]]


def test_the_history_says_how_each_restart_decided(capsys, small_file, tmp_path):
    """Deferred RESTARTs (no held-out loss: training left whole) and held-out choices read apart in the table."""
    path = tmp_path / "sources.safetensors"
    history = [{"index": i + 1, "epoch": i + 1, "step": 10 * (i + 1), "p": None, "loss": 0.1, "ranks": [4, 4],
                "source": source} for i, source in enumerate(("deferred", "validation", "frozen"))]
    save_file(load_file(small_file), str(path), {"aclora_history": json.dumps(history)})
    code, out, _ = run(capsys, "inspect", str(path), "--no-curve")
    assert code == 0
    rows = [line for line in out.splitlines() if re.match(r"^ +[123] ", line)]
    assert [row.split("  ")[-1].strip() for row in rows] == \
        ["deferred (no held-out loss)", "held-out loss", "held ranks"]
