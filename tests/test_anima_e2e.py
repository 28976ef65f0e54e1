"""AC-LoRA inside sd-scripts' real Anima trainer (anima_train_network.py), on a CPU, offline.

sd-scripts hard-codes Anima's architecture, so ``tests/run_anima_trainer.py`` runs the unmodified script's own
``__main__`` with only the constructor values of its DiT, LLM adapter and VAE classes narrowed
(tests/anima_fixtures.py: a 2-block DiT 32 wide, a 2-layer Qwen3 32 wide, a Qwen-Image VAE of base width 8,
two 64-pixel images): sd-scripts' own code loads the checkpoints, caches the latents, encodes the captions,
trains, validates and saves. Two runs of 2 epochs each: the DiT only with --validation_split 0.5 (the
held-out replay chooses the ranks at the RESTART), and the Qwen3 text encoder plus the LLM adapter
(train_llm_adapter). Pinned: the RESTART lines, the per-module ranks in the file, sd-scripts' own
networks.lora_anima reading each file back at its ranks, convert_anima_lora_to_comfy.py converting every module
at its rank, and an option of another family stopping the trainer at start-up.

Without sd-scripts or its packages the tests skip with what they need; with ``CI=true`` that is a failure
(``ACLORA_SD_SCRIPTS_E2E=0`` turns them off).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import anima_fixtures as af
import sd_scripts_fixtures as e2e

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only

LAUNCHER = e2e.TESTS / "run_anima_trainer.py"
MAX_RANK, ALPHA = 4, 2
DIT_MODULES, TE_MODULES, ADAPTER_MODULES = 2 * 10, 2 * 7, 2 * 10  # blocks x (attention 8 + mlp 2), Qwen3, adapter
COMFY_DIT, COMFY_QWEN3 = "diffusion_model.", "text_encoders.qwen3_06b.transformer.model."


Run = e2e.TrainerRun


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    files: dict[str, str]

    def train(self, name: str, *args: str, check: bool = True) -> Run:
        out_dir = self.root / "out" / name
        command = [sys.executable, str(LAUNCHER), "train", "--pretrained_model_name_or_path", self.files["dit"],
                   "--qwen3", self.files["qwen3"], "--vae", self.files["vae"], "--train_data_dir", self.files["train"],
                   "--output_dir", str(out_dir), "--output_name", name, "--resolution", "64,64",
                   "--caption_extension", ".txt", "--network_module", "networks.aclora", "--network_dim",
                   str(MAX_RANK), "--network_alpha", str(ALPHA), "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
                   "--train_batch_size", "1", "--save_model_as", "safetensors", "--seed", "0", "--cache_latents",
                   "--max_data_loader_n_workers", "0", "--qwen3_max_token_length", "16", "--t5_max_token_length", "16",
                   "--max_train_epochs", "2", *args]
        result = e2e.run(command, self.env, self.root / "logs" / f"{name}.log")
        if check:
            result.check()
        return Run(result, out_dir, name)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = e2e.trainer_root(tmp_path_factory, "Anima", "anima_train_network.py")
    env = e2e.sd_scripts_environment(root, with_stand_ins=not e2e.torchvision_imports())
    built = e2e.run([sys.executable, str(LAUNCHER), "build", str(root / "fixtures")], env,
                    root / "logs" / "build.log").check()
    return Workspace(root, env, e2e.tagged_json(built.output, "ANIMA-FIXTURES"))


@pytest.fixture(scope="module")
def sd(workspace):
    """sd-scripts' networks.lora_anima and the conversion script, in this process (its pinned stack)."""
    e2e.import_sd_scripts_in_process()
    import networks.convert_anima_lora_to_comfy as convert
    import networks.lora_anima as lora_anima

    return argparse.Namespace(lora_anima=lora_anima, convert=convert)


@pytest.fixture(scope="session")
def dit_validation(workspace) -> Run:
    """The DiT only, --validation_split 0.5 (one image held out; 2 epochs of 1 step, validated after each)."""
    return workspace.train("anima-validation", "--network_train_unet_only", "--validation_split", "0.5")


@pytest.fixture(scope="session")
def te_adapter(workspace) -> Run:
    """Qwen3 and the LLM adapter too (no --network_train_unet_only; 2 epochs of 2 steps), no validation split."""
    return workspace.train("anima-te", "--network_args", "train_llm_adapter=true")


def assert_consistent(run: Run, schedule: list[tuple[int, int, int]], modules: int) -> e2e.LoRAFile:
    assert "AC-LoRA: Anima, maximum rank 4" in run.result.output
    lora = run.assert_restarts_match_the_file(schedule, modules, MAX_RANK)
    assert lora.metadata["ss_base_model_version"] == "anima"
    assert lora.metadata["modelspec.architecture"] == "anima-preview/lora"
    return lora


def assert_lora_anima_reads_it(sd, lora: e2e.LoRAFile, **options: str) -> None:
    """The file's modules are those lora_anima gives the trainer's models with the run's options, and its
    create_network_from_weights builds every one at its rank and loads it whole."""
    dit, qwen3 = af.anima(), af.qwen3()
    own = sd.lora_anima.create_network(1.0, MAX_RANK, ALPHA, None, [qwen3], dit, **options)
    te = any(name.startswith("lora_te_") for name in lora.modules)
    own_names = sorted(m.lora_name for m in own.unet_loras + (own.text_encoder_loras if te else []))
    assert lora.modules == own_names
    network, weights = sd.lora_anima.create_network_from_weights(1.0, str(lora.path), None, [qwen3], dit)
    assert {m.lora_name: m.lora_dim for m in network.text_encoder_loras + network.unet_loras} == lora.ranks()
    network.apply_to([qwen3], dit, True, True)
    info = network.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys


def test_the_dit_run_chooses_ranks_on_the_replayed_validation_pass(sd, dit_validation):
    output = dit_validation.result.output
    assert "recording sd-scripts' validation calls" in output and "cannot replay" not in output
    lora = assert_consistent(dit_validation, [(1, 1, 1)], DIT_MODULES)
    assert {h["source"] for h in lora.history()} == {"validation"}
    assert output.count("chosen on held-out loss") == 1
    assert json.loads(lora.metadata["aclora_file_decision"])["source"] == "validation"
    assert all(name.startswith("lora_unet_blocks_") for name in lora.modules)
    assert_lora_anima_reads_it(sd, lora)


def test_the_text_encoder_and_llm_adapter_run_saves_lora_anima_modules_at_their_ranks(sd, te_adapter):
    lora = assert_consistent(te_adapter, [(1, 1, 2)], DIT_MODULES + TE_MODULES + ADAPTER_MODULES)
    assert sum(n.startswith("lora_te_layers_") for n in lora.modules) == TE_MODULES
    assert sum(n.startswith("lora_unet_llm_adapter_blocks_") for n in lora.modules) == ADAPTER_MODULES
    assert len(set(lora.ranks().values())) > 1  # the file is trimmed per module
    assert_lora_anima_reads_it(sd, lora, train_llm_adapter="true")


def test_convert_anima_lora_to_comfy_converts_every_module_at_its_rank(sd, te_adapter, tmp_path):
    lora = te_adapter.file()
    target = tmp_path / "comfy.safetensors"
    sd.convert.main(argparse.Namespace(src_path=str(lora.path), dst_path=str(target), reverse=False))
    converted = e2e.LoRAFile.read(target)
    paths = {}  # our module names -> the dotted paths of the layers in the trainer's models
    for prefix, comfy, model in (("lora_unet", COMFY_DIT, af.anima()), ("lora_te", COMFY_QWEN3, af.qwen3())):
        paths.update({f"{prefix}_{p}".replace(".", "_"): comfy + p for p, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)})
    expected = {f"{paths[n]}.{part}" for n in lora.modules for part in ("lora_A.weight", "lora_B.weight", "alpha")}
    assert set(converted.tensors) == expected
    for name in lora.modules:
        rank = lora.rank(name)
        down, up = converted.tensors[f"{paths[name]}.lora_A.weight"], converted.tensors[f"{paths[name]}.lora_B.weight"]
        assert down.shape[0] == rank and up.shape[1] == rank, name
        assert torch.equal(converted.tensors[f"{paths[name]}.alpha"], lora.tensors[f"{name}.alpha"])


def test_an_option_of_another_family_stops_the_anima_trainer_at_start_up(workspace):
    run = workspace.train("anima-bad-args", "--network_train_unet_only", "--max_train_steps", "1", "--network_args",
                          "img_attn_dim=8", check=False)
    output = run.result.output
    assert run.result.returncode != 0
    assert "network_args: img_attn_dim='8' is an option for FLUX.1 models, and this model is Anima" in output, \
        run.result.tail()
    assert "prepare optimizer" not in output and not list(run.out_dir.glob("*.safetensors"))
