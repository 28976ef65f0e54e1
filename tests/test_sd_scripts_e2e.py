"""AC-LoRA inside the real, unmodified sd-scripts: training, resuming, loading back, and sd-scripts' own LoRA tools.

Each test runs sd-scripts' scripts as subprocesses from its folder (``../shared/sd-scripts``
beside the repository, or ``ACLORA_SD_SCRIPTS``), with this package installed as a user
installs it, on random-weight models built offline: SD1.x in the real SD1.5 layout
(U-Net, CLIP-L, VAE), SDXL with the real U-Net layout and toy text encoders and VAE,
64-pixel images. The models come with random weights, so the training loss stays above 1;
what is pinned is how sd-scripts and AC-LoRA work together (schedules, files, resume,
equality with our own merge), not what the ranks are.

Without sd-scripts or its packages the tests skip with what they need; with ``CI=true``
that is a failure (``ACLORA_SD_SCRIPTS_E2E=0`` turns them off, as CI does in its venv
with current releases, which sd-scripts does not pin).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sd_scripts_fixtures as e2e
from helpers import skip_or_fail

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only

MAX_RANK = 4
ALPHA = 2
CONV_RANK = 2
# What kohya's layer selection gives on these layouts (and AC-LoRA must give the same):
# SD1.x: 12 CLIP layers x (q, k, v, out, fc1, fc2) + 16 transformer blocks x 12 layers
SD1_MODULES = 72 + 192
# with conv_dim, also every Linear/Conv2d of its 22 ResnetBlock2D (conv1, conv2, time_emb_proj; 14 conv_shortcut)
# and its 3 Downsample2D and 3 Upsample2D convolutions
SD1_CONV_MODULES = 22 * 3 + 14 + 6
# SDXL: the U-Net's 722 + 12 layers x 6 of the first text encoder + 2 layers x 6 of the (toy) second one
SDXL_MODULES = 722 + 72 + 12
# Differences are relative, in Frobenius norm, to the update itself (not to the layer's weight).
# Merges are float32 sums of the same products: anything above rounding is a different update.
MERGE_TOLERANCE = 1e-5
# resize_lora.py goes through a float32 SVD of each update and back
RESIZE_TOLERANCE = 1e-4
# resize_lora.py does a full SVD of every module's update (3.4 minutes for a whole SD1.x file here):
# it gets a sample, this many of the smallest modules of each kind (text encoder, Linear, 1x1 and 3x3 conv)
RESIZE_SAMPLE = 8
# one optimizer step at this learning rate moves the factors by ~1e-8: the loaded update is unchanged
LOAD_BACK_LR = "1e-8"
LOAD_BACK_TOLERANCE = 1e-4

COMMON_ARGS = ["--resolution", "64,64", "--caption_extension", ".txt", "--network_module", "networks.aclora",
               "--network_dim", str(MAX_RANK), "--network_alpha", str(ALPHA), "--learning_rate", "1e-3",
               "--optimizer_type", "AdamW", "--train_batch_size", "1", "--mixed_precision", "no",
               "--save_model_as", "safetensors", "--seed", "0", "--cache_latents", "--max_data_loader_n_workers", "0",
               "--console_log_simple"]
CAPTIONS = ("aclora_style, a red square on grey", "aclora_style, a blue circle on white")  # 2 steps per epoch
# training items' identities: cached, flipped, two buckets, batches of 2; one of the four images held out
IDENTITY_ARGS = (*e2e.IDENTITY_BUCKETS, "--validation_split", "0.25", "--max_train_epochs", "3",
                 "--network_args", "restart_mode=off")

@dataclass
class TrainingRun:
    result: e2e.Result
    out_dir: Path
    name: str

    def file(self, suffix: str = "") -> e2e.LoRAFile:
        return e2e.LoRAFile.read(self.out_dir / f"{self.name}{suffix}.safetensors")

    def restarts(self) -> list[tuple[int, int, int]]:
        """(index, epoch, step) of every RESTART line in the log."""
        return [(r["index"], r["epoch"], r["step"]) for r in e2e.restart_lines(self.result.output)]


@dataclass
class Workspace:
    root: Path
    cache: Path
    env: dict
    tokenizers: Path
    data: Path

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def task(self, name: str, *args: object, log: str) -> e2e.Result:
        return e2e.task(name, *args, env=self.env, log=self.log(log))

    def train(self, script: str, model: Path, name: str, *args: str, check: bool = True) -> TrainingRun:
        out_dir = self.root / "out" / name
        command = [sys.executable, script, "--pretrained_model_name_or_path", str(model),
                   "--tokenizer_cache_dir", str(self.tokenizers), "--train_data_dir", str(self.data),
                   "--output_dir", str(out_dir), "--output_name", name, *COMMON_ARGS, *args]
        result = e2e.run(command, self.env, self.log(name))
        if check:
            result.check()
        return TrainingRun(result, out_dir, name)

    def tool(self, script: str, *args: object, log: str) -> e2e.Result:
        return e2e.run([sys.executable, str(e2e.SD_SCRIPTS / "networks" / script), *map(str, args)], self.env,
                       self.log(log)).check()


# --- fixtures: built once per session, in subprocesses -------------------------------------------
@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    if e2e.switched_off():
        pytest.skip(f"{e2e.SWITCH}=0: the sd-scripts end-to-end tests are turned off")
    missing = e2e.missing_requirements()
    if missing:
        message = f"the sd-scripts end-to-end tests need {'; '.join(missing)}. {e2e.INSTALL_HINT}"
        skip_or_fail(message)
    root = tmp_path_factory.mktemp("sd-scripts-e2e")
    # ACLORA_E2E_CACHE keeps the models between sessions (the folder name changes with their builders)
    cache = Path(os.environ["ACLORA_E2E_CACHE"]) / e2e.tasks_digest() if os.environ.get("ACLORA_E2E_CACHE") else root
    env = e2e.sd_scripts_environment(root, with_stand_ins=not e2e.torchvision_imports())
    tokenizers = e2e.build_once(cache / "tokenizers", lambda d: e2e.task("tokenizers", d, env=env,
                                                                          log=root / "logs" / "tokenizers.log"))
    return Workspace(root, cache, env, tokenizers, _dataset(root / "data"))


@pytest.fixture(scope="module", autouse=True)
def _free_disk(workspace):
    """The models go when the module is done (9 GB), whether its tests passed or not."""
    yield
    e2e.free_disk(workspace.root, [workspace.cache / "sd1", workspace.cache / "sdxl"])


def _dataset(root: Path) -> Path:
    """Two 64x64 images with captions in sd-scripts' ``<repeats>_<name>`` folder layout."""
    import numpy as np
    from PIL import Image

    folder = root / "1_aclora"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(caption)
    return root


@pytest.fixture(scope="session")
def identity_vae(workspace) -> Path:
    return e2e.build_once(workspace.cache / "identity-vae",
                          lambda d: workspace.task("identity-vae", d, log="build-identity-vae"))


@pytest.fixture(scope="session")
def sd1_build(workspace) -> Path:
    return e2e.build_once(workspace.cache / "sd1", lambda d: workspace.task("sd1", d, workspace.tokenizers, log="build-sd1"))


@pytest.fixture(scope="session")
def sd1_model(sd1_build) -> Path:
    return sd1_build / "diffusers"


@pytest.fixture(scope="session")
def sd1_checkpoint(sd1_build) -> Path:
    return sd1_build / "sd1.safetensors"


@pytest.fixture(scope="session")
def sdxl_model(workspace) -> Path:
    return e2e.build_once(workspace.cache / "sdxl",
                          lambda d: workspace.task("sdxl", d, workspace.tokenizers, log="build-sdxl"))


@pytest.fixture(scope="session")
def sd1_default(workspace, sd1_model) -> TrainingRun:
    """Default options, 4 epochs of 2 steps, with a saved state and file after epoch 2."""
    return workspace.train("train_network.py", sd1_model, "sd1-default", "--max_train_epochs", "4",
                           "--save_every_n_epochs", "2", "--save_state")


@pytest.fixture(scope="session")
def sd1_steps(workspace, sd1_model) -> TrainingRun:
    """The paper's mode, RESTART every 3 optimizer steps (mid-epoch) over 7 steps, LoRA on 3x3 convolutions too."""
    return workspace.train("train_network.py", sd1_model, "sd1-steps", "--max_train_steps", "7", "--network_args",
                           "restart_mode=paper", "restart_every_steps=3", f"conv_dim={CONV_RANK}", "conv_alpha=1")


@pytest.fixture(scope="session")
def sd1_resumed(workspace, sd1_model, sd1_default) -> TrainingRun:
    """sd1_default again, resumed from the state it saved after epoch 2."""
    state = sd1_default.out_dir / "sd1-default-000002-state"
    return workspace.train("train_network.py", sd1_model, "sd1-resumed", "--max_train_epochs", "4",
                           "--save_every_n_epochs", "2", "--save_state", "--resume", str(state))


@pytest.fixture(scope="session")
def sd1_from_weights(workspace, sd1_model, sd1_default) -> TrainingRun:
    """A network built from sd1_default's file (--dim_from_weights), trained one step at a negligible rate.

    restart_mode=off saves the factors as they are, so the file written shows exactly what was loaded
    (the default mode would decide its ranks again on the final update).
    """
    return workspace.train("train_network.py", sd1_model, "sd1-from-weights", "--max_train_steps", "1",
                           "--network_weights", str(sd1_default.out_dir / "sd1-default.safetensors"),
                           "--dim_from_weights", "--learning_rate", LOAD_BACK_LR, "--network_args", "restart_mode=off")


@pytest.fixture(scope="session")
def sd1_validation(workspace, sd1_model) -> TrainingRun:
    """Default options with --validation_split 0.5: one image trained, one held out; 4 epochs of 1 step."""
    return workspace.train("train_network.py", sd1_model, "sd1-validation", "--max_train_epochs", "4",
                           "--validation_split", "0.5")


@pytest.fixture(scope="session")
def sd1_holdout(workspace, sd1_model) -> TrainingRun:
    """No validation split, holdout=0.5: the network holds one of the two images out itself; 4 epochs of 2 steps
    (seed=1: the first epoch's rule, a hash of the cached latents, holds an image of these two; with seed=0 neither)."""
    return workspace.train("train_network.py", sd1_model, "sd1-holdout", "--max_train_epochs", "4",
                           "--network_args", "holdout=0.5", "seed=1")


@pytest.fixture(scope="session")
def sd1_second_run(workspace, sd1_model, sd1_validation) -> TrainingRun:
    """The two-run recipe's second run: fresh at sd1_validation's per-module ranks, every image, no split."""
    return workspace.train("train_network.py", sd1_model, "sd1-second-run", "--max_train_epochs", "2",
                           "--network_args", f"ranks_from={sd1_validation.file().path}")


@pytest.fixture(scope="session")
def sdxl_default(workspace, sdxl_model) -> TrainingRun:
    """Default options, 2 epochs of 2 steps."""
    return workspace.train("sdxl_train_network.py", sdxl_model, "sdxl-default", "--max_train_epochs", "2")


@pytest.fixture(scope="session")
def sdxl_steps(workspace, sdxl_model, sdxl_default) -> TrainingRun:
    """sdxl_default's file loaded with --network_weights into a fresh rank-4 network, RESTART every step, 3 steps."""
    return workspace.train("sdxl_train_network.py", sdxl_model, "sdxl-steps", "--max_train_steps", "3",
                           "--network_weights", str(sdxl_default.out_dir / "sdxl-default.safetensors"),
                           "--network_args", "restart_every_steps=1")


@pytest.fixture(scope="session")
def sd1_identities(workspace, sd1_model, identity_vae) -> TrainingRun:
    """Cached latents with flip_aug, two buckets, batches of 2, one of the four images held out (3 epochs)."""
    data = workspace.root / "identity-data"
    e2e.write_identity_images(data / "2_aclora")
    return workspace.train("train_network.py", sd1_model, "sd1-identities", "--train_data_dir", str(data),
                           "--vae", str(identity_vae), *IDENTITY_ARGS)


@pytest.fixture(scope="session")
def sdxl_identities(workspace, sdxl_model, identity_vae) -> TrainingRun:
    """Cached latents with flip_aug, two buckets, batches of 2 (four images twice per epoch): 4 steps and 1."""
    data = workspace.root / "identity-data-sdxl"
    e2e.write_identity_images(data / "2_aclora")
    return workspace.train("sdxl_train_network.py", sdxl_model, "sdxl-identities", "--train_data_dir", str(data),
                           "--vae", str(identity_vae), *e2e.IDENTITY_BUCKETS, "--max_train_steps", "5",
                           "--network_args", "restart_mode=off")


# --- what every training run must show ----------------------------------------------------------
def rank_cap(lora: e2e.LoRAFile, module: str) -> int:
    down = lora.tensors[f"{module}.lora_down.weight"]
    return CONV_RANK if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else MAX_RANK


def assert_consistent(run: TrainingRun, schedule: list[tuple[int, int, int]], modules: int) -> e2e.LoRAFile:
    """sd-scripts imported our module; RESTARTs ran on ``schedule`` and the saved file tells the same story."""
    output = run.result.output
    assert "import network module: networks.aclora" in output
    assert run.restarts() == schedule, f"RESTART lines in the log:\n{run.result.tail()}"
    lora = run.file()
    assert len(lora.modules) == modules
    assert lora.metadata["ss_network_module"] == "networks.aclora"
    history = lora.history()
    assert [(h["index"], h["epoch"], h["step"]) for h in history] == schedule
    assert int(lora.metadata["aclora_restarts"]) == len(history)
    for line, entry in zip(e2e.restart_lines(output), history):
        ranks = entry["ranks"]
        assert (line["rank_min"], line["rank_max"], line["modules"]) == (min(ranks), max(ranks), modules)
    # the file's ranks are its tensors' shapes and its aclora_ranks; in paper mode, the last RESTART's ranks
    # (product mode decides them again on the final update when saving)
    assert lora.saved_ranks() == lora.ranks()
    if history and lora.metadata["aclora_mode"] == "paper":
        assert lora.history_ranks(history[-1]) == lora.ranks()
    assert all(1 <= rank <= rank_cap(lora, name) for name, rank in lora.ranks().items())
    return lora


def assert_same_restart(resumed: dict, uninterrupted: dict) -> None:
    """The same RESTART: every recorded field but its duration (numbers go through the saved state in steps of 1e-9)."""
    where = (resumed["index"], resumed["epoch"], resumed["step"])
    assert set(resumed) == set(uninterrupted)
    changed = sum(a != b for a, b in zip(resumed["ranks"], uninterrupted["ranks"]))
    assert len(resumed["ranks"]) == len(uninterrupted["ranks"]) and changed == 0, f"RESTART {where}: {changed} ranks differ"
    for key in set(resumed) - {"seconds", "ranks"}:
        a, b = resumed[key], uninterrupted[key]
        same = math.isclose(a, b, abs_tol=1e-8) if isinstance(a, float) and isinstance(b, float) else a == b
        assert same, f"RESTART {where}: {key} is {a!r} after the resume, {b!r} without it"


LOAD_INFO = re.compile(r"load network weights from (\S+): <AC-LoRA: (\d+) modules loaded \((\d+) padded")


# --- SD1.x: train_network.py ---------------------------------------------------------------------
def test_sd1_default_options_restart_every_tenth_of_the_run(sd1_default):
    # 4 epochs: a tenth of the run rounds up to one epoch; no RESTART after the last epoch
    lora = assert_consistent(sd1_default, [(1, 1, 2), (2, 2, 4), (3, 3, 6)], SD1_MODULES)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lora.modules
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in lora.modules
    # the file saved after epoch 2 holds the history up to then
    assert [h["index"] for h in sd1_default.file("-000002").history()] == [1]


def test_sd1_restart_every_steps_restarts_mid_epoch(sd1_steps):
    # step 3 falls inside epoch 2 (on_step_start), step 6 ends epoch 3 (on_epoch_start); none at the last step
    lora = assert_consistent(sd1_steps, [(1, 1, 3), (2, 3, 6)], SD1_MODULES + SD1_CONV_MODULES)
    conv3x3 = [name for name in lora.modules if rank_cap(lora, name) == CONV_RANK]
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv3x3 and "lora_unet_up_blocks_0_upsamplers_0_conv" in conv3x3


def test_sd1_resume_from_saved_state_continues_the_restart_history(sd1_default, sd1_resumed):
    output = sd1_resumed.result.output
    assert "resume training from local state" in output
    # RESTART 1 came before the state was saved; 2 and 3 run after the resume, on the same schedule
    assert sd1_resumed.restarts() == [(2, 2, 4), (3, 3, 6)]
    resumed, uninterrupted = sd1_resumed.file().history(), sd1_default.file().history()
    assert [(h["index"], h["epoch"], h["step"]) for h in resumed] == [(1, 1, 2), (2, 2, 4), (3, 3, 6)]
    # RESTART 1 comes back from the state; RESTART 2 decides from the loss of steps 3-4, seen before the
    # save, so the state must have carried that loss over too
    for before, after in zip(uninterrupted[:2], resumed[:2]):
        assert_same_restart(after, before)


def test_sd1_network_weights_and_dim_from_weights_load_our_file(sd1_default, sd1_from_weights):
    source = sd1_default.file()
    match = LOAD_INFO.search(sd1_from_weights.result.output)
    assert match, sd1_from_weights.result.tail()
    # --dim_from_weights builds every module at the file's rank: nothing to pad
    assert (int(match[2]), int(match[3])) == (len(source.modules), 0)
    loaded = sd1_from_weights.file()
    assert loaded.ranks() == source.ranks()
    worst = max(e2e.relative_difference(loaded.delta(m), source.delta(m)) for m in source.modules)
    assert worst <= LOAD_BACK_TOLERANCE


def test_sd1_validation_split_makes_the_restarts_choose_on_sd_scripts_validation_pass(sd1_validation):
    """sd-scripts holds one image out and runs it through the model after every epoch; the network records
    that pass and replays it for every candidate threshold: every RESTART and the file say so."""
    output = sd1_validation.result.output
    assert "recording sd-scripts' validation calls" in output
    lora = sd1_validation.file()
    history = lora.history()
    assert [(h["index"], h["epoch"]) for h in history] == [(1, 1), (2, 2), (3, 3)]
    assert {h["source"] for h in history} == {"validation"} and all(h["validation_loss"] > 0 for h in history)
    assert output.count("chosen on held-out loss") == len(history)
    decision = json.loads(lora.metadata["aclora_file_decision"])
    assert decision["source"] == "validation" and decision["candidates"] > 1
    assert lora.ranks() == lora.saved_ranks() and max(lora.ranks().values()) <= MAX_RANK


def test_sd1_holdout_makes_the_restarts_choose_on_the_networks_own_held_out_images(sd1_holdout):
    """Without a validation split, holdout=0.5 holds one of the two cached images out from the first epoch; the
    RESTARTs before holdout_until (0.7 of the run) choose on its recorded training calls, the next keeps that choice
    (the image trains again), and the file's ranks stay as chosen."""
    output = sd1_holdout.result.output
    assert "holdout: 1 of 2 images held out until 70% of the run" in output
    history = sd1_holdout.file().history()
    assert [(h["index"], h["epoch"], h["source"]) for h in history[:2]] == [(1, 1, "validation"), (2, 2, "validation")]
    assert all(h["validation_loss"] > 0 for h in history[:2])
    assert output.count("chosen on held-out loss") == 2
    assert all(h["source"] != "validation" for h in history[2:])
    assert json.loads(sd1_holdout.file().metadata["aclora_file_decision"])["source"] != "validation"


def test_the_second_run_of_the_two_run_recipe_trains_and_saves_at_the_first_runs_ranks(sd1_validation,
                                                                                      sd1_second_run):
    """ranks_from: the second run holds every module at the first file's rank from the first step; its
    RESTARTs (no held-out loss) change nothing and its file keeps exactly those ranks."""
    first, second = sd1_validation.file(), sd1_second_run.file()
    assert "training 264 modules at the ranks of" in sd1_second_run.result.output
    assert second.ranks() == first.ranks() and second.saved_ranks() == first.saved_ranks()
    assert {h["source"] for h in second.history()} == {"deferred"}
    assert json.loads(second.metadata["aclora_file_decision"])["source"] == "frozen"


def test_sd1_identities_of_cached_flipped_bucketed_items_without_the_validation_images(sd1_identities):
    """Three training images (the fourth is sd-scripts' validation split, run in eval mode through the same
    function): each epoch's six items name the same three; the last epoch is closed by no on_epoch_start."""
    e2e.assert_identities(sd1_identities.result.output, [(1, 6, 3, 3), (2, 6, 3, 3)], images=3)


def test_sdxl_identities_of_cached_flipped_bucketed_items(sdxl_identities):
    e2e.assert_identities(sdxl_identities.result.output, [(1, 8, 4, 4)], images=4)


def test_bad_network_args_stop_sd_scripts_at_start_up_with_our_message(workspace, sd1_model):
    from aclora_ext.options import OptionError, parse_network_args

    with pytest.raises(OptionError) as expected:
        parse_network_args({"restart_mode": "sometimes"})
    run = workspace.train("train_network.py", sd1_model, "sd1-bad-args", "--max_train_steps", "1",
                          "--network_args", "restart_mode=sometimes", check=False)
    output = run.result.output
    assert run.result.returncode != 0
    assert str(expected.value) in output, run.result.tail()
    assert "prepare optimizer" not in output and "epoch 1/" not in output
    assert not list(run.out_dir.glob("*.safetensors"))


# --- SDXL: sdxl_train_network.py -----------------------------------------------------------------
def test_sdxl_default_options_restart_every_tenth_of_the_run(sdxl_default):
    lora = assert_consistent(sdxl_default, [(1, 1, 2)], SDXL_MODULES)
    for name in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_mlp_fc2",
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"):
        assert name in lora.modules


def test_sdxl_network_weights_then_restart_every_steps(sdxl_default, sdxl_steps):
    source = sdxl_default.file()
    match = LOAD_INFO.search(sdxl_steps.result.output)
    assert match, sdxl_steps.result.tail()
    # the fresh network has rank 4 everywhere: the file's smaller modules are padded
    assert (int(match[2]), int(match[3])) == (len(source.modules), sum(r < MAX_RANK for r in source.ranks().values()))
    assert_consistent(sdxl_steps, [(1, 0, 1), (2, 1, 2)], SDXL_MODULES)


# --- sd-scripts' own LoRA tools on our files ------------------------------------------------------
@pytest.mark.parametrize("run_name", ["sd1_steps", "sdxl_default"])
def test_check_lora_weights_reads_every_module(workspace, request, run_name):
    lora = request.getfixturevalue(run_name).file()
    result = workspace.tool("check_lora_weights.py", lora.path, log=f"check-{run_name}")
    listed = dict(re.findall(r"^(\S+\.lora_(?:up|down)\.weight),\(([\d-]+)\),", result.output, re.M))
    assert f"number of LoRA modules: {2 * len(lora.modules)}" in result.output
    assert listed == {key: "-".join(map(str, t.shape)) for key, t in lora.tensors.items() if ".lora_" in key}


def test_merge_lora_into_an_sd1_checkpoint_equals_our_merge_to(workspace, sd1_steps, sd1_checkpoint):
    lora = sd1_steps.file()
    merged = workspace.root / "sd1-merged.safetensors"
    workspace.tool("merge_lora.py", "--sd_model", sd1_checkpoint, "--models", lora.path, "--ratios", "1.0",
                   "--save_to", merged, log="merge-sd1")
    try:
        report = merge_report(workspace.task("sd1-merge-check", sd1_checkpoint, merged, lora.path, log="merge-check-sd1"))
    finally:
        merged.unlink(missing_ok=True)  # 4 GB
    assert_merge_matches(report, lora)


def test_sdxl_merge_lora_merges_our_file_as_our_merge_to_does(workspace, sdxl_model, sdxl_default):
    lora = sdxl_default.file()
    # into the model: sdxl_merge_lora.py's merge_to_sd_model on sd-scripts' own SDXL models (its --sd_model
    # route needs a full-size SDXL checkpoint, text encoders included: too large for CI)
    report = merge_report(workspace.task("sdxl-merge-check", sdxl_model, lora.path, log="merge-check-sdxl"))
    assert_merge_matches(report, lora)
    # LoRA into LoRA: the command-line tool reads our ranks and alphas and keeps every update
    merged_path = workspace.root / "sdxl-merged-lora.safetensors"
    workspace.tool("sdxl_merge_lora.py", "--models", lora.path, "--ratios", "1.0", "--save_to", merged_path,
                   "--precision", "float", log="merge-sdxl-lora")
    merged = e2e.LoRAFile.read(merged_path)
    assert merged.modules == lora.modules
    assert max(e2e.relative_difference(merged.delta(m), lora.delta(m)) for m in lora.modules) <= MERGE_TOLERANCE


def merge_report(result: e2e.Result) -> dict:
    line = next(line for line in result.output.splitlines() if line.startswith("MERGE-CHECK "))
    return json.loads(line[len("MERGE-CHECK "):])


def assert_merge_matches(report: dict, lora: e2e.LoRAFile) -> None:
    errors, merged = report["relative_error"], report["merged_delta_norm"]
    assert set(errors) == set(lora.modules), "sd-scripts and AC-LoRA found different layers for the file's modules"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= MERGE_TOLERANCE, f"{worst}: relative difference {errors[worst]:.3g}"
    # a module changes the model exactly when its update in the file is not zero
    assert {m for m, v in merged.items() if v > 0} == {m for m in lora.modules if bool(lora.delta(m).any())}


@pytest.mark.parametrize("run_name", ["sd1_steps", "sdxl_default"])
def test_resize_lora_reads_our_ranks_and_alphas(workspace, request, run_name):
    lora = request.getfixturevalue(run_name).file()
    kinds: dict[tuple, list[str]] = {}
    for name in sorted(lora.modules, key=lambda m: lora.delta(m).numel()):
        kinds.setdefault((name.split("_", 2)[1], lora.tensors[f"{name}.lora_down.weight"].shape[2:]), []).append(name)
    part = lora.subset([m for names in kinds.values() for m in names[:RESIZE_SAMPLE]],
                       workspace.root / f"{run_name}-part.safetensors")
    resized_path = workspace.root / f"{run_name}-resized.safetensors"
    # to at least every module's rank: nothing is cut, so the update must come back unchanged
    # (--new_conv_rank covers 1x1 convolutions too, whose rank goes up to --network_dim)
    workspace.tool("resize_lora.py", "--model", part.path, "--save_to", resized_path, "--new_rank", MAX_RANK,
                   "--new_conv_rank", MAX_RANK, "--device", "cpu", log=f"resize-{run_name}")
    resized = e2e.LoRAFile.read(resized_path)
    assert resized.modules == part.modules
    worst = max(part.modules, key=lambda m: e2e.relative_difference(resized.delta(m), part.delta(m)))
    assert e2e.relative_difference(resized.delta(worst), part.delta(worst)) <= RESIZE_TOLERANCE, worst


# --- the torchvision stand-in these tests give sd-scripts when torchvision cannot load -------------
def test_torchvision_stand_in_turns_images_into_normalised_tensors_like_torchvision():
    import numpy as np

    spec = importlib.util.spec_from_file_location("stand_in_transforms",
                                                  e2e.STAND_INS / "torchvision" / "transforms.py")
    transforms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transforms)
    image = np.array([[[0, 255, 51], [102, 153, 204]]], dtype=np.uint8)  # 1 x 2 pixels, RGB
    # sd-scripts' IMAGE_TRANSFORMS: HWC uint8 -> CHW in [0, 1] -> (x - 0.5) / 0.5
    tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(image)
    expected = torch.tensor([[[0, 102]], [[255, 153]], [[51, 204]]], dtype=torch.float32) / 255 * 2 - 1
    assert tensor.shape == (3, 1, 2) and torch.allclose(tensor, expected)
    with pytest.raises(NotImplementedError, match="gaussian_blur"):
        transforms.functional.gaussian_blur(tensor, 3)
