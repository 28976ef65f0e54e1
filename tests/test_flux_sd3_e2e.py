"""AC-LoRA inside sd-scripts' real FLUX.1 and SD3 trainers (flux_train_network.py, sd3_train_network.py).

Each test runs the unmodified trainers as subprocesses from sd-scripts' folder, on random-weight models
built offline (tests/flux_sd3_fixtures.py: a FLUX.1-dev checkpoint of one double and one single block at
FLUX.1's real width, an SD3 MMDiT of depth 2; all-zero text encoders whose outputs are cached on disk; two
64-pixel images). Every run trains the DiT only (--network_train_unet_only with cached text-encoder
outputs), 2 to 4 steps. What is pinned: sd-scripts and AC-LoRA work together (RESTART schedules, the
held-out replay of the validation pass, --network_weights, a bad option), the file has the names sd-scripts'
own networks.lora_flux / lora_sd3 gives the same DiT, sd-scripts reads every module at its rank, and
flux_merge_lora.py merges it as our merge_to does. Block swap: FLUX.1 with --blocks_to_swap and --fp8_base
on a 2+4-block checkpoint (sd-scripts' CPU path of block swap aliases the swapped blocks' weights, so this
pins that the run works with us, not what a GPU computes); SD3's block swap fails on a CPU inside
sd-scripts itself (docs/development.md).

Without sd-scripts or its packages the tests skip with what they need; with ``CI=true`` that is a failure
(``ACLORA_SD_SCRIPTS_E2E=0`` turns them off). ``ACLORA_E2E_CACHE`` keeps the built models between sessions.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dit_stand_ins as st
import flux_sd3_fixtures as fx
import sd_scripts_fixtures as e2e

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only

MAX_RANK, ALPHA = fx.MAX_RANK, fx.ALPHA
MERGE_TOLERANCE = 1e-5
LOAD_INFO = re.compile(r"load network weights from (\S+): <AC-LoRA: (\d+) modules loaded \((\d+) padded")
# the fixtures' DiT modules (sd-scripts' networks.lora_flux / lora_sd3 on the same models give the same)
FLUX_MODULES, FLUX_SWAP_MODULES, SD3_MODULES = 13, 2 * 10 + 4 * 3, 17


@dataclass
class Run(e2e.TrainerRun):
    checkpoint: Path  # the model it trained on


@dataclass
class Workspace:
    root: Path
    fixtures: fx.FluxSd3Fixtures

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def train(self, kind: str, name: str, *args: str, model: Path | None = None, fp8: bool = False,
              check: bool = True) -> Run:
        out_dir = self.root / "out" / name
        options = dict(network_module="networks.aclora", model=model)
        if fp8:
            options.update(te_dtypes=fx.TE_FP8_BASE, mixed_precision="bf16")
            args = ("--fp8_base", *args)
        command = (self.fixtures.flux_command if kind == "flux" else self.fixtures.sd3_command)(
            out_dir, name, *args, **options)
        result = e2e.run(command, self.fixtures.env, self.log(name))
        if check:
            result.check()
        checkpoint = model or (self.fixtures.flux() if kind == "flux" else self.fixtures.sd3())
        return Run(result, out_dir, name, checkpoint)

    def task(self, name: str, *args: object, log: str) -> e2e.Result:
        return e2e.run([self.fixtures.python, str(fx.TASKS), name, *map(str, args)], self.fixtures.env,
                       self.log(log)).check()

    def report(self, tag: str, name: str, *args: object, log: str) -> dict:
        return e2e.tagged_json(self.task(name, *args, log=log).output, tag)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = e2e.trainer_root(tmp_path_factory, "FLUX.1/SD3")
    cache = Path(os.environ["ACLORA_E2E_CACHE"]) / "flux-sd3" if os.environ.get("ACLORA_E2E_CACHE") else root
    env = fx.environment(root, progress_bars=False)
    return Workspace(root, fx.FluxSd3Fixtures(cache, env, root / "logs"))


@pytest.fixture(scope="module", autouse=True)
def _free_disk(workspace):
    """The models go when the module is done (3 GB), whether its tests passed or not."""
    yield
    e2e.free_disk(workspace.root, [workspace.fixtures.cache])


# --- the runs (each once per session) ------------------------------------------------------------------
@pytest.fixture(scope="session")
def flux_default(workspace) -> Run:
    """Default options, 2 epochs of 2 steps: one RESTART, after epoch 1."""
    return workspace.train("flux", "flux-default", "--max_train_epochs", "2")


@pytest.fixture(scope="session")
def flux_steps(workspace, flux_default) -> Run:
    """flux_default's file loaded with --network_weights into a fresh rank-4 network, a RESTART every step."""
    return workspace.train("flux", "flux-steps", "--max_train_steps", "3", "--network_weights",
                           str(flux_default.out_dir / "flux-default.safetensors"),
                           "--network_args", "restart_every_steps=1")


@pytest.fixture(scope="session")
def flux_validation(workspace) -> Run:
    """--validation_split 0.5 (one image held out; 2 epochs of 1 step) with gradient checkpointing."""
    return workspace.train("flux", "flux-validation", "--max_train_epochs", "2", "--validation_split", "0.5",
                           "--gradient_checkpointing")


@pytest.fixture(scope="session")
def flux_swap(workspace) -> Run:
    """--blocks_to_swap 1 with --fp8_base (bf16) on 2 double + 4 single blocks stored in float8 (the least
    block swap accepts), a RESTART after step 1. (No validation split here: a forward of this model in
    bf16 on a CPU takes seconds, and the rank search replays the pass a dozen times.)"""
    model = workspace.fixtures.flux(double=2, single=4, dtype="float8_e4m3fn")
    return workspace.train("flux", "flux-swap", "--max_train_steps", "2", "--blocks_to_swap", "1",
                           "--network_args", "restart_every_steps=1", model=model, fp8=True)


@pytest.fixture(scope="session")
def flux_identities(workspace) -> Run:
    """Cached latents with flip_aug, two buckets, batches of 2 (four images twice per epoch): 4 steps and 1,
    through the mirror-symmetric AE (tests/flux_sd3_tasks.py identity-ae)."""
    fixtures = workspace.fixtures
    return workspace.train("flux", "flux-identities", "--ae", str(fixtures.identity_ae()), "--train_data_dir",
                           str(fixtures.identity_data()), *e2e.IDENTITY_BUCKETS, "--max_train_steps", "5",
                           "--network_args", "restart_mode=off")


@pytest.fixture(scope="session")
def sd3_default(workspace) -> Run:
    return workspace.train("sd3", "sd3-default", "--max_train_epochs", "2")


@pytest.fixture(scope="session")
def sd3_steps(workspace, sd3_default) -> Run:
    return workspace.train("sd3", "sd3-steps", "--max_train_steps", "3", "--network_weights",
                           str(sd3_default.out_dir / "sd3-default.safetensors"), "--network_args",
                           "restart_every_steps=1")


@pytest.fixture(scope="session")
def sd3_validation(workspace) -> Run:
    """--validation_split 0.5 with --fp8_base (bf16): the replay under the trainer's autocast."""
    return workspace.train("sd3", "sd3-validation", "--max_train_epochs", "2", "--validation_split", "0.5",
                           fp8=True)


# --- what every run must show ------------------------------------------------------------------------
def assert_consistent(run: Run, schedule: list[tuple[int, int, int]], modules: int) -> e2e.LoRAFile:
    return run.assert_restarts_match_the_file(schedule, modules, MAX_RANK)


def assert_sd_scripts_reads_it(workspace: Workspace, run: Run, kind: str) -> None:
    """The file's modules are those sd-scripts' own LoRA module gives the trainer's DiT, and its
    create_network_from_weights reads every one at its rank."""
    lora = run.file()
    report = workspace.report("KOHYA-CHECK", "kohya-check", kind, run.checkpoint, lora.path, log=f"kohya-{run.name}")
    assert lora.modules == report["own_names"]
    assert report["read_ranks"] == lora.ranks() and report["shapes_differ"] == []


# --- FLUX.1 -----------------------------------------------------------------------------------------------
def test_flux_default_options_restart_and_save_lora_flux_modules(workspace, flux_default):
    lora = assert_consistent(flux_default, [(1, 1, 2)], FLUX_MODULES)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in lora.modules and "lora_unet_single_blocks_0_linear1" in lora.modules
    assert lora.metadata["ss_base_model_version"] == "flux1"
    assert lora.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert_sd_scripts_reads_it(workspace, flux_default, "flux")


def test_flux_network_weights_then_a_restart_every_step_mid_epoch(workspace, flux_default, flux_steps):
    source = flux_default.file()
    match = LOAD_INFO.search(flux_steps.result.output)
    assert match, flux_steps.result.tail()
    assert (int(match[2]), int(match[3])) == (len(source.modules),
                                              sum(r < MAX_RANK for r in source.ranks().values()))
    # step 1 inside epoch 1 (on_step_start), step 2 at the start of epoch 2; none at the last step
    assert_consistent(flux_steps, [(1, 0, 1), (2, 1, 2)], FLUX_MODULES)
    assert_sd_scripts_reads_it(workspace, flux_steps, "flux")


def test_flux_validation_split_chooses_ranks_on_the_replayed_validation_pass(flux_validation):
    output = flux_validation.result.output
    assert "recording sd-scripts' validation calls" in output and "cannot replay" not in output
    lora = assert_consistent(flux_validation, [(1, 1, 1)], FLUX_MODULES)
    assert {h["source"] for h in lora.history()} == {"validation"}
    assert output.count("chosen on held-out loss") == 1
    assert json.loads(lora.metadata["aclora_file_decision"])["source"] == "validation"


def test_flux_block_swap_and_fp8_base_train_with_our_modules(workspace, flux_swap):
    output = flux_swap.result.output
    assert "FLUX: Block swap enabled. Swapping 1 blocks" in output and "Loaded fp8 FLUX model" in output
    lora = assert_consistent(flux_swap, [(1, 0, 1)], FLUX_SWAP_MODULES)
    assert lora.metadata["ss_fp8_base"] == "True"
    assert_sd_scripts_reads_it(workspace, flux_swap, "flux")


def test_flux_identities_of_cached_flipped_bucketed_items(flux_identities):
    e2e.assert_identities(flux_identities.result.output, [(1, 8, 4, 4)], images=4)


def test_flux_merge_lora_merges_our_file_as_our_merge_to_does(workspace, flux_default):
    lora = flux_default.file()
    merged = workspace.root / "flux-merged.safetensors"
    e2e.run([workspace.fixtures.python, "networks/flux_merge_lora.py", "--flux_model", str(flux_default.checkpoint),
             "--models", str(lora.path), "--ratios", "1.0", "--save_to", str(merged), "--save_precision", "float"],
            workspace.fixtures.env, workspace.log("flux-merge")).check()
    try:
        report = workspace.report("MERGE-OURS", "flux-merge-ours", flux_default.checkpoint, merged, lora.path,
                                  log="flux-merge-ours")
    finally:
        merged.unlink(missing_ok=True)  # 2 GB
    errors = report["relative_error"]
    assert set(errors) == set(lora.modules)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= MERGE_TOLERANCE, f"{worst}: {errors[worst]:.3g}"
    assert report["other_tensors_changed"] == 0


# --- SD3 ------------------------------------------------------------------------------------------------------
def test_sd3_default_options_restart_and_save_lora_sd3_modules(workspace, sd3_default):
    lora = assert_consistent(sd3_default, [(1, 1, 2)], SD3_MODULES)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in lora.modules
    assert lora.metadata["ss_base_model_version"] == "medium"
    assert lora.metadata["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert_sd_scripts_reads_it(workspace, sd3_default, "sd3")


def test_sd3_network_weights_then_a_restart_every_step_mid_epoch(workspace, sd3_default, sd3_steps):
    assert LOAD_INFO.search(sd3_steps.result.output), sd3_steps.result.tail()
    assert_consistent(sd3_steps, [(1, 0, 1), (2, 1, 2)], SD3_MODULES)
    assert_sd_scripts_reads_it(workspace, sd3_steps, "sd3")


def test_sd3_validation_split_with_fp8_base_chooses_on_the_replayed_pass(sd3_validation):
    output = sd3_validation.result.output
    assert "recording sd-scripts' validation calls" in output and "cannot replay" not in output
    lora = assert_consistent(sd3_validation, [(1, 1, 1)], SD3_MODULES)
    assert {h["source"] for h in lora.history()} == {"validation"}


# --- bad options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, key, value, message", [
    ("flux", "train_block_indices", "0", "is an option for SD3/SD3.5 models, and this model is FLUX.1"),
    ("sd3", "img_attn_dim", "8", "is an option for FLUX.1 models, and this model is SD3/SD3.5"),
])
def test_an_option_of_another_family_stops_the_trainer_at_start_up(workspace, kind, key, value, message):
    run = workspace.train(kind, f"{kind}-bad-args", "--max_train_steps", "1", "--network_args", f"{key}={value}",
                          check=False)
    output = run.result.output
    assert run.result.returncode != 0
    assert f"network_args: {key}='{value}' {message}" in output, run.result.tail()
    assert "prepare optimizer" not in output and not list(run.out_dir.glob("*.safetensors"))


# --- consumers: ComfyUI's key mapping and scale -----------------------------------------------------------
def comfyui_key_map(checkpoint: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """ComfyUI's map for a diffusion model: every ``diffusion_model.<path>.weight`` answers to the kohya name
    ``lora_unet_<path with _>`` (re-implemented from what it does; checkpoint prefixes stripped)."""
    mapping = {}
    with safe_open(str(checkpoint), "pt") as fh:
        for key in fh.keys():
            path = key.removeprefix("model.diffusion_model.")
            if path.endswith(".weight"):
                mapping["lora_unet_" + path[: -len(".weight")].replace(".", "_")] = (key, tuple(fh.get_slice(key).get_shape()))
    return mapping


@pytest.mark.parametrize("run_name, stand_in", [("flux_default", lambda: st.flux(1, 1)),
                                                ("sd3_default", lambda: st.mmdit(2))])
def test_comfyui_maps_every_module_to_its_layer_and_applies_our_update(request, run_name, stand_in):
    from aclora_ext import create_network_from_weights

    run = request.getfixturevalue(run_name)
    lora = run.file()
    mapping = comfyui_key_map(run.checkpoint)
    network, _ = create_network_from_weights(1.0, str(lora.path), None, [None, None, None], stand_in())
    network.load_weights(str(lora.path))
    ours = {m.lora_name: m for m in network.loras}
    for name in lora.modules:
        assert name in mapping, f"{name}: no layer of the checkpoint answers to it"
        key, shape = mapping[name]
        down, up = lora.tensors[f"{name}.lora_down.weight"].float(), lora.tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        assert (up.shape[0], down[0].numel()) == (shape[0], int(torch.tensor(shape[1:]).prod())), key
        # ComfyUI's update, alpha / rank * up @ down, against what our network applies: on random inputs
        # (the 3072-wide updates themselves are slow to form on one thread)
        x = torch.randn(down[0].numel(), 4, generator=torch.Generator().manual_seed(0))
        theirs = float(lora.tensors[f"{name}.alpha"]) / rank * (up.reshape(-1, rank) @ (down.reshape(rank, -1) @ x))
        m = ours[name]
        with torch.no_grad():
            mine = m.up_matrix() @ (m.down_matrix() @ x) * m.scale
        torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-7)
