"""``--network_args max_file_size=...``: every file a run saves fits, metadata included; the run's own
decision caps what the budget keeps; a save no file can fit is refused and training goes on; a budget no
save could ever meet stops the run at start-up.

Sizes are ``os.path.getsize`` of the files sd-scripts' replayed loop (``harness.replay``) makes
``save_weights`` write, with sd-scripts' own ``ss_*`` metadata.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open

from aclora_ext import OptionError, parse_network_args
from aclora_ext.harness import replay
from aclora_ext.network.file_budget import smallest_bound
from aclora_ext.options import format_size
from helpers import lora_network, pretend_trained

EPOCHS = 4
SAMPLES = 4


def file_ranks(path: str) -> dict[str, int]:
    with safe_open(path, framework="pt") as f:
        return {k[: -len(".lora_down.weight")]: f.get_slice(k).get_shape()[0] for k in f.keys()
                if k.endswith(".lora_down.weight")}


def run(models, data, path, **network_args):
    return replay.replay_training(
        __import__("networks.aclora", fromlist=["create_network"]), models, data[:SAMPLES], sdxl=False,
        network=replay.NetworkSetup(dim=8, alpha=4.0, args=network_args),
        schedule=replay.Schedule(epochs=EPOCHS, batch_size=2, lr=1e-3),
        saving=replay.Saving(str(path), every_n_epochs=1, dtype=torch.float16))


# --- the option ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("50MB", 50_000_000), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2 ** 20),
                                        ("800kb", 800_000), ("123456", 123_456)])
def test_max_file_size_reads_decimal_and_binary_units(text, size):
    assert parse_network_args({"max_file_size": text}).max_file_size == size


@pytest.mark.parametrize("text", ["5XB", "50M", "-1MB", "0", "1e6", "1.5"])
def test_a_bad_max_file_size_is_named_with_its_value_and_what_is_allowed(text):
    with pytest.raises(OptionError) as caught:
        parse_network_args({"max_file_size": text})
    message = str(caught.value)
    assert "max_file_size" in message and repr(text) in message and "MB" in message and "MiB" in message


def test_a_budget_no_save_could_meet_stops_the_run_at_start_up(sd1_models):
    with pytest.raises(OptionError) as caught:
        lora_network(sd1_models, rank=4, max_file_size="10KB")
    message = str(caught.value)
    assert "max_file_size=10,000 bytes" in message and "at least" in message and "allowed" in message
    # the bound counts only the modules that are trained: the U-Net alone fits where everything does not
    assert lora_network(sd1_models, rank=4, max_file_size="40KB", apply_text_encoder=False).config.max_file_size \
        == 40_000


# --- every save ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["product", "paper", "off"])
def test_every_file_a_run_saves_fits_and_its_log_line_says_the_size_and_the_budget(
        mode, sd1_pretrained_models, style_data, tmp_path, caplog):
    budget = 80_000  # the files at rank 8 are ~115 KB
    args = {"max_file_size": str(budget)} if mode == "product" else {"max_file_size": str(budget), "restart_mode": mode}
    with caplog.at_level(logging.INFO, logger="aclora_ext"):
        result = run(sd1_pretrained_models, style_data, tmp_path / "style.safetensors", **args)
    assert len(result.saved_files) == EPOCHS
    saves = [r.getMessage() for r in caplog.records if "AC-LoRA: saved" in r.getMessage()]
    assert len(saves) == EPOCHS
    for path, line in zip(result.saved_files, saves):
        size = os.path.getsize(path)
        assert size <= budget
        assert f"{format_size(size)} of max_file_size {format_size(budget)}" in line
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        assert meta["aclora_max_file_size"] == str(budget) and json.loads(meta["aclora_ranks"]) == file_ranks(path)
    ranks = file_ranks(result.saved_files[-1])
    assert min(ranks.values()) >= 1 and len(set(ranks.values())) > 1
    if mode == "paper":  # the last RESTART's ranks are the caps
        assert all(ranks[name] <= k for name, k in result.network.ranks().items())


def test_the_rank_search_decision_caps_the_budget_in_product_mode(sd1_pretrained_models, style_data, tmp_path):
    result = run(sd1_pretrained_models, style_data, tmp_path / "style.safetensors")
    network = result.network
    free = str(tmp_path / "free.safetensors")
    assert network.save_weights(free, torch.float16, dict(result.metadata))
    decided = file_ranks(free)
    assert min(decided.values()) < 8  # the rank search did cut
    network.config = network.config.replace(max_file_size=os.path.getsize(free) + 200)
    roomy = str(tmp_path / "roomy.safetensors")
    assert network.save_weights(roomy, torch.float16, dict(result.metadata))
    assert file_ranks(roomy) == decided  # room to spare buys nothing the rank search dropped
    # a budget between the smallest file this network can save and the free file: how far the rank search
    # already cut depends on the data (the library stack's tiny models differ), so half the free size need not fit
    smallest = smallest_bound(network.loras, network.config.min_rank, element_bytes=2)
    budget = smallest + 3 * (os.path.getsize(free) - smallest) // 4
    network.config = network.config.replace(max_file_size=budget)
    tight = str(tmp_path / "tight.safetensors")
    assert network.save_weights(tight, torch.float16, dict(result.metadata))
    cut = file_ranks(tight)
    assert os.path.getsize(tight) <= budget
    assert all(cut[n] <= decided[n] for n in decided) and sum(cut.values()) < sum(decided.values())


# --- refusals -----------------------------------------------------------------------------------------------
def test_a_save_no_file_can_fit_is_refused_naming_the_smallest_and_the_previous_file_is_kept(sd1_models, tmp_path,
                                                                                             caplog):
    network = pretend_trained(lora_network(sd1_models, rank=4, max_file_size="60KB"))
    path = str(tmp_path / "style.safetensors")
    assert network.save_weights(path, torch.float16, {"ss_network_dim": "4"})
    before = open(path, "rb").read()
    assert len(before) <= 60_000
    with caplog.at_level(logging.ERROR, logger="aclora_ext"):
        assert not network.save_weights(path, torch.float16, {"ss_tag_frequency": "x" * 60_000})
    assert open(path, "rb").read() == before
    message = caplog.records[-1].getMessage()
    assert "NOT saving" in message and "max_file_size=60,000 bytes" in message and "smallest possible file" in message
    assert "training goes on" in message


def test_a_run_whose_saves_cannot_fit_trains_to_the_end_writing_nothing(sd1_pretrained_models, style_data,
                                                                         tmp_path, caplog):
    """Above the start-up bound (which cannot know sd-scripts' metadata) but below every real file."""
    with caplog.at_level(logging.ERROR, logger="aclora_ext"):
        result = run(sd1_pretrained_models, style_data, tmp_path / "style.safetensors", max_file_size="46KB")
    assert result.global_step == EPOCHS * SAMPLES // 2
    assert not any(os.path.exists(p) for p in result.saved_files)
    refusals = [r.getMessage() for r in caplog.records if "NOT saving" in r.getMessage()]
    assert len(refusals) == EPOCHS and all("smallest possible file" in m for m in refusals)


def test_the_full_rank_companion_file_is_not_budgeted(sd1_models, tmp_path):
    network = pretend_trained(lora_network(sd1_models, rank=4, max_file_size="60KB", save_full_rank="true"))
    path = str(tmp_path / "style.safetensors")
    assert network.save_weights(path, torch.float16, {})
    assert os.path.getsize(path) <= 60_000 < os.path.getsize(tmp_path / "style-fullrank.safetensors")


# --- the budget and the padding diffusers 0.32 needs ------------------------------------------------------------
def _three_layer_network(max_file_size):
    from aclora_ext import attach

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64, bias=False) for _ in range(3)))
    network = attach(model, max_rank=8, alpha=8.0, prefix="lora_unet", restart_mode="off", min_rank=1,
                     **({} if max_file_size is None else {"max_file_size": max_file_size}))
    with torch.no_grad():  # two strong modules, one weak: a budget cuts the weak one only
        for i, m in enumerate(network.loras):
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape) * (1.0 if i < 2 else 1e-3))
    return network


def test_a_budget_without_room_to_pad_the_lone_odd_rank_keeps_the_budget_and_says_so(tmp_path, caplog):
    unbudgeted = _three_layer_network(None)
    full = tmp_path / "full.safetensors"
    assert unbudgeted.save_weights(str(full), torch.float32)
    one_component = (64 + 64) * 4  # bytes a rank costs a 64x64 module in fp32
    budget = os.path.getsize(full) - 4 * one_component  # the weak module must give up ranks; padding it back cannot fit
    network = _three_layer_network(str(budget))
    path = tmp_path / "budgeted.safetensors"
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        assert network.save_weights(str(path), torch.float32)
    assert os.path.getsize(path) <= budget
    ranks = file_ranks(str(path))
    assert sorted(ranks.values())[0] < 8 and len(set(ranks.values())) == 2  # one lone odd rank, not padded
    with safe_open(str(path), framework="pt") as f:
        assert "aclora_padded" not in f.metadata()
    assert "no room to pad" in caplog.text
