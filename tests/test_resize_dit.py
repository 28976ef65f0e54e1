"""``aclora resize`` on FLUX.1 and SD3/SD3.5 LoRA files (sd-scripts' lora_flux / lora_sd3 names).

Pinned: resize_lora's three criteria pick on FLUX/SD3-named modules (fused qkv, linear1/linear2, mod,
embedders, CLIP-L/-G, T5) exactly the ranks the real resize_lora.py picks, with the same updates; the
metadata sd-scripts writes for these families (ss_base_model_version, modelspec.architecture, the FLUX/SD3
ss_* keys) is kept; the resized file reports as the same model, per DiT block; the real script end to end
agrees on a FLUX-named file.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aclora_ext.tools.cli import main as cli_main
from aclora_ext.tools.inspect import read_report
from aclora_ext.tools.resize import resize_file, resize_state_dict
from helpers import skip_or_fail
from test_resize import ROOT, add_module, file_update, ranks_of, relative, resize_speed

# FLUX.1 / SD3 names with the real layers' aspect (qkv 3:1, mlp 4:1, mod 6:1, linear1 7:1, linear2 1:5), scaled
# down 32x so that resize_lora.py's full SVDs stay quick
FLUX_MODULES = [  # name, out, in
    ("lora_unet_double_blocks_0_img_attn_qkv", 288, 96),
    ("lora_unet_double_blocks_0_img_attn_proj", 96, 96),
    ("lora_unet_double_blocks_0_txt_mlp_0", 384, 96),
    ("lora_unet_double_blocks_7_txt_mlp_2", 96, 384),
    ("lora_unet_double_blocks_18_img_mod_lin", 576, 96),
    ("lora_unet_single_blocks_0_linear1", 672, 96),
    ("lora_unet_single_blocks_21_linear2", 96, 480),
    ("lora_unet_single_blocks_37_modulation_lin", 288, 96),
    ("lora_unet_txt_in", 96, 128),
    ("lora_unet_time_in_in_layer", 96, 8),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 24, 24),
    ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", 320, 128),
]
SD3_MODULES = [
    ("lora_unet_joint_blocks_0_context_block_attn_qkv", 144, 48),
    ("lora_unet_joint_blocks_0_x_block_attn2_qkv", 144, 48),
    ("lora_unet_joint_blocks_5_x_block_mlp_fc1", 192, 48),
    ("lora_unet_joint_blocks_5_context_block_adaLN_modulation_1", 288, 48),
    ("lora_unet_joint_blocks_23_context_block_adaLN_modulation_1", 96, 48),
    ("lora_unet_context_embedder", 48, 128),
    ("lora_unet_final_layer_linear", 64, 48),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc2", 40, 160),
]
FLUX_META = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora",
             "modelspec.implementation": "https://github.com/black-forest-labs/flux", "ss_network_module":
             "networks.lora_flux", "ss_network_dim": "8", "ss_network_alpha": "4", "ss_model_prediction_type":
             "raw", "ss_guidance_scale": "1.0", "ss_timestep_sampling": "shift", "ss_apply_t5_attn_mask": "False",
             "ss_training_comment": "flux style"}
SD3_META = {"ss_base_model_version": "5-medium", "modelspec.architecture": "stable-diffusion-3-5-medium/lora",
            "modelspec.implementation": "diffusers", "modelspec.prediction_type": "epsilon",
            "ss_network_module": "networks.lora_sd3", "ss_network_dim": "8", "ss_apply_lg_attn_mask": "False",
            "ss_weighting_scheme": "uniform"}
FAMILIES = {"flux": (FLUX_MODULES, FLUX_META, "FLUX.1 dev"), "sd3": (SD3_MODULES, SD3_META, "SD3.5 medium")}


def dit_file(modules, rank: int = 8, seed: int = 0) -> dict:
    """Decaying spectra of different lengths per module, alphas that differ, one all-zero module."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict = {}
    for i, (name, out, fan_in) in enumerate(modules):
        r = 2 + i % (rank - 1)
        spectrum = torch.rand(r, generator=gen).sort(descending=True).values + 0.05
        add_module(tensors, name, out, fan_in, rank, [0.0] if i == 3 else spectrum, gen, alpha=rank / (1 + i % 3))
    return tensors


@pytest.fixture(scope="module")
def resize_lora():
    if not resize_speed.RESIZE_LORA.is_file():
        skip_or_fail(f"sd-scripts' resize_lora.py is not at {resize_speed.RESIZE_LORA}")
    return resize_speed.resize_lora_functions()


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 4.0)])
def test_resize_lora_methods_pick_the_real_scripts_ranks_on_flux_and_sd3_names(resize_lora, family, method, param):
    tensors = dit_file(FAMILIES[family][0])
    theirs_sd, theirs = resize_speed.resize_lora_ranks(tensors, 6, 6, method, param, resize_lora)
    result = resize_state_dict(tensors, method, param=param, max_rank=6)
    assert result.ranks == theirs == ranks_of(result.tensors)
    assert len(set(theirs.values())) > 1
    for name in theirs:
        want = file_update(theirs_sd, name)
        if want.norm() > 1e-5:
            assert relative(file_update(result.tensors, name), want) < 1e-4, name


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_resized_dit_file_keeps_sd_scripts_metadata_and_reports_as_the_same_model(family, tmp_path, capsys):
    modules, meta, model = FAMILIES[family]
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(dit_file(modules), str(source), meta)
    assert cli_main(["resize", str(source), str(target), "--min-importance", "0.2"]) == 0
    out = capsys.readouterr().out
    with safe_open(str(target), "pt") as f:
        written = f.metadata()
    for key, value in meta.items():
        if key not in ("ss_network_dim", "ss_network_alpha", "ss_training_comment"):
            assert written[key] == value, key
    assert written["ss_network_dim"] == written["ss_network_alpha"] == "Dynamic"
    report = read_report(str(target))
    assert report.model == model and f"file for {model}" in out
    assert {m.part for m in report.modules} >= ({"double", "single", "dit_in", "te1", "te3"} if family == "flux"
                                                else {"joint", "dit_in", "dit_out", "te2"})
    assert ("double blocks" if family == "flux" else "joint blocks") in out.split("relative error")[-1]
    assert ranks_of(load_file(str(target))) == resize_file(source, tmp_path / "again.safetensors",
                                                           min_importance=0.2).ranks


@pytest.mark.sd_scripts  # runs sd-scripts' code, which imports its own requirements (cv2, ...)
def test_the_real_resize_lora_script_agrees_on_a_flux_file_and_keeps_its_metadata(tmp_path):
    """sd-scripts' resize_lora.py run as a program on a FLUX-named file (skipped where it cannot start)."""
    script = resize_speed.RESIZE_LORA
    if not script.is_file():
        skip_or_fail(f"sd-scripts' resize_lora.py is not at {script}")
    source = tmp_path / "in.safetensors"
    save_file(dit_file(FLUX_MODULES), str(source), FLUX_META)
    theirs, ours = tmp_path / "theirs.safetensors", tmp_path / "ours.safetensors"
    stand_ins = ROOT / "tests" / "sd_scripts_stand_ins"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join(([str(stand_ins)] if stand_ins.is_dir() else []) + [str(script.parents[1])])
    done = subprocess.run([sys.executable, str(script), "--model", str(source), "--save_to", str(theirs),
                           "--new_rank", "6", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"],
                          cwd=script.parents[1], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and ("ModuleNotFoundError" in done.stderr or "ImportError" in done.stderr):
        skip_or_fail("resize_lora.py cannot start in this environment (sd-scripts' dependencies): "
                     + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli_main(["resize", str(source), str(ours), "--criterion", "sv_fro", "--param", "0.9",
                     "--max-rank", "6"]) == 0
    assert ranks_of(load_file(str(ours))) == ranks_of(load_file(str(theirs)))
    with safe_open(str(theirs), "pt") as a, safe_open(str(ours), "pt") as b:
        theirs_meta, ours_meta = a.metadata(), b.metadata()
    for key in ("ss_base_model_version", "modelspec.architecture", "modelspec.implementation", "ss_training_comment",
                "ss_network_dim", "ss_guidance_scale"):
        assert ours_meta[key] == theirs_meta[key], key
