"""A full replayed sd-scripts run (train_network.py's call sequence) on the tiny SDXL-like model.

The base U-Net is the pretrained tiny one (a random U-Net's loss is above 1,
which would clamp the paper's p to 0 and keep one component everywhere).
Nothing but the maximum rank (and, for the paper, the mode) is set: the default
schedule (a tenth of the run) and the mode's rule decide every module's rank.
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from aclora_ext.harness import replay
from aclora_ext.network import saving

MAX_RANK = 8
EPOCHS = 20
EVERY = 2  # the default: a tenth of the run, so RESTARTs follow epochs 2, 4, ..., 18 (none after the last)
SAMPLES = 4
BATCH = 2  # 2 optimizer steps per epoch


def file_contents(path: str) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """(lora_down rows per module, lora_up columns per module, metadata) of a saved LoRA file."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        down = {k[: -len(".lora_down.weight")]: f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_down.weight")}
        up = {k[: -len(".lora_up.weight")]: f.get_slice(k).get_shape()[1] for k in f.keys() if k.endswith(".lora_up.weight")}
    return down, up, meta


@pytest.mark.parametrize("mode", ["paper", "product"])
def test_a_replayed_sdxl_run_restarts_on_schedule_and_saves_per_module_ranks_below_the_maximum(
        mode, sdxl_pretrained_models, style_data, sd_network_module, tmp_path):
    path = str(tmp_path / "style.safetensors")
    result = replay.replay_training(sd_network_module, sdxl_pretrained_models, style_data[:SAMPLES], sdxl=True,
                                    network=replay.NetworkSetup(dim=MAX_RANK, alpha=4.0, args={"restart_mode": mode}),
                                    schedule=replay.Schedule(epochs=EPOCHS, batch_size=BATCH, lr=1e-3),
                                    saving=replay.Saving(path))
    network = result.network
    per_epoch = SAMPLES // BATCH
    assert result.global_step == EPOCHS * per_epoch

    # on schedule, with the mean training loss of each interval recorded
    assert [(h["epoch"], h["step"]) for h in network.history] == [(e, e * per_epoch) for e in range(EVERY, EPOCHS, EVERY)]
    for h in network.history:
        window = result.losses[(h["epoch"] - EVERY) * per_epoch: h["epoch"] * per_epoch]
        assert h["loss"] == pytest.approx(sum(window) / len(window), rel=1e-5)
        assert h["alpha"] == pytest.approx(1 + h["epoch"] / EPOCHS)
        if mode == "paper":  # p from the loss rule (the losses of a pretrained base are below 1)
            assert 0 < h["loss"] < 1 and h["p"] == pytest.approx(1 - h["loss"] ** h["alpha"])
        else:  # the default (product mode, no held-out loss): training left whole, the file decided at save
            assert h["source"] == "deferred" and h["level"] == math.inf and h["p"] != h["p"]

    # paper mode: the data chose the ranks, below R and not all the same; product mode: every module trains
    # at R until the save
    ranks = network.ranks()
    assert len(ranks) == len(network.loras) > 100
    if mode == "paper":
        assert max(ranks.values()) < MAX_RANK and len(set(ranks.values())) > 1
    else:
        assert set(ranks.values()) == {MAX_RANK}

    # the file holds its ranks (paper mode: those of the last RESTART; product mode: decided again on the
    # final update), and its metadata explains them
    down_rows, up_columns, meta = file_contents(path)
    file_ranks = json.loads(meta["aclora_ranks"])
    assert down_rows == up_columns == file_ranks
    assert max(file_ranks.values()) < MAX_RANK and len(set(file_ranks.values())) > 1
    if mode == "paper":  # as the file gives them back: a model part padded to one rank (aclora_padded) says
        assert saving.file_ranks(path) == ranks  # its modules' own ranks; aclora_ranks are the stored ones
    else:
        assert json.loads(meta["aclora_file_decision"]) == {"level": 2.0, "source": "prior"}
    assert meta["ss_network_dim"] == "Dynamic" and meta["aclora_mode"] == mode
    history = json.loads(meta["aclora_history"])
    assert meta["aclora_restarts"] == str(len(history)) == str(EPOCHS // EVERY - 1)
    assert [(h["epoch"], h["step"]) for h in history] == [(h["epoch"], h["step"]) for h in network.history]
    modules = json.loads(meta["aclora_modules"])
    assert dict(zip(modules, history[-1]["ranks"])) == ranks
    if mode == "product":
        assert all(h["level"] is None for h in history)  # inf (keep everything) is null in JSON
