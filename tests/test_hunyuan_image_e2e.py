"""AC-LoRA inside sd-scripts' real HunyuanImage-2.1 trainer (hunyuan_image_train_network.py), on a CPU, offline.

sd-scripts hard-codes HunyuanImage-2.1's 17 B DiT, Qwen2.5-VL-7B, byT5-small and its VAE, so
``tests/run_hunyuan_image_trainer.py`` runs the unmodified script's own ``__main__`` with only constructor and
configuration values narrowed (a DiT of 2 double + 3 single blocks 128 wide, a 2-layer Qwen2.5-VL 128 wide with
a one-block vision tower, a one-layer byT5, a VAE of 32/128 channels; two 64-pixel images; the two tokenizers in
the Hugging Face cache layout): sd-scripts' own code loads the checkpoints, caches the latents and the text
encoders' outputs (to disk), trains and saves. One run of 2 epochs of 2 steps (the RESTART after epoch 1, the
file trimmed per module at save time) pins the RESTART line, the per-module ranks in the file and sd-scripts'
own networks.lora_hunyuan_image reading the file back at those ranks; a second stops at start-up on split_qkv.

Not run here: --validation_split (the held-out replay). This sd-scripts snapshot's trainer cannot validate with
cached text-encoder outputs (it moves the text encoders to the meta device after caching the training set, then
caches the validation set with them), and without the cache, on a CPU, the text encoders' bfloat16/float16
outputs do not meet the DiT's weights (CPU autocast leaves its Linear and LayerNorm inputs as they are). The
replay's prediction is pinned in process (tests/test_hunyuan_image_sd_scripts.py).

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

import hunyuan_image_fixtures as hy
import run_hunyuan_image_trainer as trainer
import sd_scripts_fixtures as e2e

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only

LAUNCHER = e2e.TESTS / "run_hunyuan_image_trainer.py"
MAX_RANK, ALPHA = 4, 2
# lora_hunyuan_image's modules of the tiny DiT: per double block img_/txt_ mod.linear, attn_qkv, attn_proj,
# mlp.fc1, mlp.fc2 (10), per single block linear1, linear2, modulation.linear (3)
DOUBLE_BLOCKS, SINGLE_BLOCKS = hy.TINY[20], hy.TINY[40]
DIT_MODULES = DOUBLE_BLOCKS * 10 + SINGLE_BLOCKS * 3


Run = e2e.TrainerRun


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    files: dict[str, str]

    def train(self, name: str, *args: str, check: bool = True) -> Run:
        out_dir = self.root / "out" / name
        f = self.files
        command = [sys.executable, str(LAUNCHER), "train", "--pretrained_model_name_or_path", f["dit"],
                   "--text_encoder", f["qwen"], "--byt5", f["byt5"], "--vae", f["vae"], "--train_data_dir", f["train"],
                   "--output_dir", str(out_dir), "--output_name", name, "--resolution", "64,64",
                   "--caption_extension", ".txt", "--network_module", "networks.aclora", "--network_dim",
                   str(MAX_RANK), "--network_alpha", str(ALPHA), "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
                   "--train_batch_size", "1", "--save_model_as", "safetensors", "--seed", "0", "--cache_latents",
                   "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--mixed_precision", "no",
                   "--max_data_loader_n_workers", "0", *args]
        result = e2e.run(command, self.env, self.root / "logs" / f"{name}.log")
        if check:
            result.check()
        return Run(result, out_dir, name)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = e2e.trainer_root(tmp_path_factory, "HunyuanImage-2.1", "hunyuan_image_train_network.py")
    env = e2e.sd_scripts_environment(root, with_stand_ins=not e2e.torchvision_imports())
    built = e2e.run([sys.executable, str(LAUNCHER), "build", str(root / "fixtures")], env,
                    root / "logs" / "build.log").check()
    files = e2e.tagged_json(built.output, "HUNYUAN-IMAGE-FIXTURES")
    env["HF_HUB_CACHE"] = files["hub"]  # where the loaders' from_pretrained finds the two tokenizers
    return Workspace(root, env, files)


@pytest.fixture(scope="module")
def sd(workspace):
    """sd-scripts' networks.lora_hunyuan_image and its DiT class, in this process (its pinned stack)."""
    e2e.import_sd_scripts_in_process()
    import networks.lora_hunyuan_image as lora_hunyuan_image
    from library import hunyuan_image_models

    return argparse.Namespace(lora_hunyuan_image=lora_hunyuan_image, models=hunyuan_image_models)


@pytest.fixture(scope="session")
def dit_run(workspace) -> Run:
    """The DiT, 2 epochs of 2 steps (the default schedule: one RESTART, after epoch 1), no validation split."""
    return workspace.train("hunyuan-dit", "--max_train_epochs", "2")


def test_the_dit_run_saves_lora_hunyuan_image_modules_at_the_ranks_it_reports(sd, dit_run):
    output = dit_run.result.output
    assert f"AC-LoRA: 0 text-encoder and {DIT_MODULES} U-Net modules, maximum rank {MAX_RANK}" in output
    lora = dit_run.assert_restarts_match_the_file([(1, 1, 2)], DIT_MODULES, MAX_RANK)
    history = lora.history()
    # no held-out loss: the RESTART keeps every component, the save trims each module to its own rank
    assert "no held-out loss" in output and {h["source"] for h in history} == {"deferred"}
    assert json.loads(lora.metadata["aclora_file_decision"])["source"] == "prior"
    assert len(set(lora.ranks().values())) > 1, lora.ranks()
    assert f"saved {lora.path} ({DIT_MODULES} modules, ranks {min(lora.ranks().values())}.." \
           f"{max(lora.ranks().values())};" in output
    assert lora.metadata["ss_base_model_version"] == "hunyuan-image-2.1"
    assert lora.metadata["modelspec.architecture"] == "hunyuan-image-2.1/lora"

    # sd-scripts' own lora_hunyuan_image: the same module names, and create_network_from_weights builds every one
    # at the file's rank and loads it whole
    dit = hy.tiny_dit(sd.models, sizes=trainer.DIT)
    own = sd.lora_hunyuan_image.create_network(1.0, MAX_RANK, ALPHA, None, [], dit)
    assert lora.modules == sorted(m.lora_name for m in own.unet_loras)
    network, weights = sd.lora_hunyuan_image.create_network_from_weights(1.0, str(lora.path), None, [], dit)
    assert {m.lora_name: m.lora_dim for m in network.unet_loras} == lora.ranks()
    network.apply_to([], dit, False, True)
    info = network.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys


def test_split_qkv_stops_the_hunyuan_image_trainer_at_start_up(workspace):
    run = workspace.train("hunyuan-split-qkv", "--max_train_steps", "1", "--network_args", "split_qkv=True",
                          check=False)
    output = run.result.output
    assert run.result.returncode != 0
    assert "network_args: split_qkv=True is refused; allowed: false" in output, run.result.tail()
    assert "prepare optimizer" not in output and not list(run.out_dir.glob("*.safetensors"))
