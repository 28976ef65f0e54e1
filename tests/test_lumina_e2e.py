"""AC-LoRA inside sd-scripts' real Lumina 2 trainer (lumina_train_network.py), end to end on a CPU.

sd-scripts hard-codes Lumina 2's architecture (the 2B NextDiT, Gemma2-2B, FLUX.1's AutoEncoder), so
tests/lumina_launcher.py shrinks those configuration values and then runs the unmodified script as
``__main__``: its loaders, training loop, validation pass and save are sd-scripts' own. The models are built
once per session (random weights: a NextDiT of width 64, a Gemma2 of width 32, two 64-pixel images). Runs:
Gemma2 and the DiT trained with a validation split (the held-out replay chooses the ranks); the DiT only with
cached text-encoder outputs and a RESTART every step; split_qkv, refused at start-up. Each checks what the
log and the file show, and sd-scripts' networks.lora_lumina reads the file back at every module's rank.

Without sd-scripts or its packages the tests skip with what they need; with ``CI=true`` that is a failure
(``ACLORA_SD_SCRIPTS_E2E=0`` turns them off).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import sd_scripts_fixtures as e2e

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only

LAUNCHER = Path(__file__).resolve().parent / "lumina_launcher.py"
MAX_RANK = 4
# the tiny models' modules (sd-scripts' networks.lora_lumina gives the same): Gemma2 2 layers x 7 Linears;
# 2 main blocks and 2 noise refiners x 6 (attention qkv/out, feed_forward w1-w3, adaLN_modulation), 2 context
# refiners x 5 (no modulation), the final layer's 2
GEMMA2_MODULES, DIT_MODULES = 14, 2 * 6 + 2 * 6 + 2 * 5 + 2


Run = e2e.TrainerRun


@dataclass
class Workspace:
    root: Path
    models: Path
    env: dict

    def launch(self, log: str, *args: object) -> e2e.Result:
        return e2e.run([sys.executable, str(LAUNCHER), *map(str, args)], self.env, self.root / "logs" / f"{log}.log")

    def train(self, name: str, *args: str, check: bool = True) -> Run:
        m, out_dir = self.models, self.root / "out" / name
        result = self.launch(
            name, "train", "--pretrained_model_name_or_path", m / "dit.safetensors", "--gemma2",
            m / "gemma2.safetensors", "--ae", m / "ae.safetensors", "--tokenizer_cache_dir", m / "hf-cache",
            "--train_data_dir", m / "data",
            "--output_dir", out_dir, "--output_name", name, "--network_module", "networks.aclora", "--network_dim",
            str(MAX_RANK), "--network_alpha", "2", "--resolution", "64,64", "--caption_extension", ".txt",
            "--learning_rate", "1e-3", "--optimizer_type", "AdamW", "--train_batch_size", "1", "--save_model_as",
            "safetensors", "--seed", "0", "--max_data_loader_n_workers", "0", "--console_log_simple",
            "--gemma2_max_token_length", "8", "--mixed_precision", "no", "--cache_latents", *args)
        if check:
            result.check()
        return Run(result, out_dir, name)

    def kohya_check(self, run: Run) -> dict:
        output = self.launch(f"kohya-{run.name}", "kohya-check", self.models, run.file().path).check().output
        return e2e.tagged_json(output, "KOHYA-CHECK")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = e2e.trainer_root(tmp_path_factory, "Lumina 2", "lumina_train_network.py")
    env = e2e.sd_scripts_environment(root, with_stand_ins=not e2e.torchvision_imports())
    workspace = Workspace(root, root / "models", env)
    e2e.build_once(workspace.models, lambda d: workspace.launch("build", "build", d).check())
    return workspace


@pytest.fixture(scope="session")
def lumina_validation(workspace) -> Run:
    """Gemma2 and the DiT trained (no --network_train_unet_only), --validation_split 0.5 (one image held out,
    2 epochs of 1 step: one RESTART, after epoch 1), the sigma_scaled prediction type."""
    return workspace.train("lumina-validation", "--max_train_epochs", "2", "--validation_split", "0.5",
                           "--model_prediction_type", "sigma_scaled")


@pytest.fixture(scope="session")
def lumina_unet_only(workspace) -> Run:
    """--network_train_unet_only with cached Gemma2 outputs, 2 steps, a RESTART after step 1."""
    return workspace.train("lumina-unet-only", "--max_train_steps", "2", "--network_train_unet_only",
                           "--cache_text_encoder_outputs", "--network_args", "restart_every_steps=1")


def assert_consistent(run: Run, schedule: list[tuple[int, int, int]], modules: int) -> e2e.LoRAFile:
    assert "AC-LoRA: Lumina 2, maximum rank 4" in run.result.output
    lora = run.assert_restarts_match_the_file(schedule, modules, MAX_RANK)
    # the trainer's metadata is kept, ours added
    assert lora.metadata["ss_base_model_version"] == "lumina2"
    assert lora.metadata["modelspec.architecture"] == "lumina-2/lora"
    return lora


def assert_lora_lumina_reads_it(workspace: Workspace, run: Run, with_gemma2: bool) -> None:
    """The file's modules are lora_lumina's (Gemma2's only when it was trained), and its
    create_network_from_weights reads every one at its rank, every tensor loaded."""
    lora = run.file()
    report = workspace.kohya_check(run)
    own = report["own_names"]
    assert lora.modules == (own if with_gemma2 else [n for n in own if not n.startswith("lora_te_")])
    assert report["read_ranks"] == lora.ranks() and report["shapes_differ"] == []
    assert report["missing"] == [] and report["unexpected"] == []


def test_gemma2_and_dit_with_a_validation_split_choose_ranks_on_the_replayed_pass(workspace, lumina_validation):
    output = lumina_validation.result.output
    assert "recording sd-scripts' validation calls" in output and "cannot replay" not in output
    lora = assert_consistent(lumina_validation, [(1, 1, 1)], GEMMA2_MODULES + DIT_MODULES)
    assert {h["source"] for h in lora.history()} == {"validation"}
    assert output.count("chosen on held-out loss") == 1
    assert json.loads(lora.metadata["aclora_file_decision"])["source"] == "validation"
    assert sum(n.startswith("lora_te_layers_") for n in lora.modules) == GEMMA2_MODULES
    assert lora.metadata["ss_model_prediction_type"] == "sigma_scaled"
    assert_lora_lumina_reads_it(workspace, lumina_validation, with_gemma2=True)


def test_unet_only_with_a_restart_every_step(workspace, lumina_unet_only):
    lora = assert_consistent(lumina_unet_only, [(1, 0, 1)], DIT_MODULES)
    assert not any(n.startswith("lora_te_") for n in lora.modules)
    assert_lora_lumina_reads_it(workspace, lumina_unet_only, with_gemma2=False)


def test_split_qkv_stops_the_trainer_at_start_up(workspace):
    run = workspace.train("lumina-split-qkv", "--max_train_steps", "1", "--network_args", "split_qkv=True",
                          check=False)
    output = run.result.output
    assert run.result.returncode != 0
    assert "network_args: split_qkv=True is refused; allowed: false" in output, run.result.tail()
    assert "Lumina 2's lora_lumina merges with the q/k/v widths of the 2B model hard-coded" in output
    assert "prepare optimizer" not in output and not list(run.out_dir.glob("*.safetensors"))
