"""``aclora inspect`` on FLUX.1 and SD3/SD3.5 LoRA files (sd-scripts' lora_flux / lora_sd3 names).

The files are small synthetic kohya files written here with the real name patterns (r16 facts §1.2, §2):
the report names the model (from the names, or the metadata sd-scripts writes), puts every module in its
DiT block (double / single blocks, joint blocks' context and x halves, the input and final layers) and its
text encoder (CLIP-L, CLIP-G, T5-XXL), in the model's order; --json and --plot keep working.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from aclora_ext.tools.cli import main
from aclora_ext.tools.dit_names import dit_model, family_from_names, locate_dit, model_from_metadata
from aclora_ext.tools.inspect import read_report
from helpers import import_or_fail

FLUX_DOUBLE = ("img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
               "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")
FLUX_SINGLE = ("linear1", "linear2", "modulation_lin")
FLUX_IN = ("img_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer", "vector_in_out_layer",
           "guidance_in_in_layer", "guidance_in_out_layer", "txt_in")
SD3_BLOCK = ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1")
SD3_EMB = ("context_embedder", "t_embedder_mlp_0", "t_embedder_mlp_2", "x_embedder_proj", "y_embedder_mlp_0",
           "y_embedder_mlp_2")


def flux_names(double=(0, 1, 2, 10), single=(0, 1, 9, 37), in_layers=True, te=True) -> list[str]:
    names = [f"lora_unet_double_blocks_{i}_{layer}" for i in double for layer in FLUX_DOUBLE]
    names += [f"lora_unet_single_blocks_{i}_{layer}" for i in single for layer in FLUX_SINGLE]
    names += [f"lora_unet_{layer}" for layer in FLUX_IN] if in_layers else []
    if te:
        names += [f"lora_te1_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in (0, 11) for p in "kvq"]
        names += [f"lora_te3_encoder_block_{i}_layer_0_SelfAttention_{p}" for i in (0, 23) for p in "qkvo"]
        names += ["lora_te3_encoder_block_5_layer_1_DenseReluDense_wi_0"]
    return names


def sd3_names(blocks=(0, 1, 2, 10, 23), last=23, attn2=(0, 1), emb=True, te=True) -> list[str]:
    names = []
    for i in blocks:
        context = ("attn_qkv", "adaLN_modulation_1") if i == last else SD3_BLOCK
        names += [f"lora_unet_joint_blocks_{i}_context_block_{layer}" for layer in context]
        names += [f"lora_unet_joint_blocks_{i}_x_block_{layer}" for layer in SD3_BLOCK]
        if i in attn2:
            names += [f"lora_unet_joint_blocks_{i}_x_block_attn2_{layer}" for layer in ("qkv", "proj")]
    if emb:
        names += [f"lora_unet_{layer}" for layer in SD3_EMB]
        names += ["lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear"]
    if te:
        names += [f"lora_te{k}_text_model_encoder_layers_0_mlp_fc{j}" for k in (1, 2) for j in (1, 2)]
        names += ["lora_te3_encoder_block_0_layer_1_DenseReluDense_wo"]
    return names


def rank_of(name: str) -> int:
    """A rank that differs by block: the block number (or a text encoder's number) mod 7, plus 1."""
    numbers = re.findall(r"_(\d+)_", name)
    return 1 + (int(numbers[0]) % 7 if numbers else len(name) % 7)


def write(path, names, meta=None) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name in names:
        r = rank_of(name)
        tensors[f"{name}.lora_down.weight"] = torch.randn(r, 16, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(24, r, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), {"ss_network_dim": "8", **(meta or {})})


def blocks_of(out: str) -> list[tuple[str, str]]:
    """(part label, block) of each row of the printed table."""
    rows = []
    for line in out.splitlines():
        found = re.match(r"^(\S.*?)  +(\S+)  +\d+  +\d+  +[\d.]+  +\d+  +[\d,]+  +[\d,]+$", line)
        if found and found[1] != "total":
            rows.append((found[1], found[2]))
    return rows


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- names --------------------------------------------------------------------------------------------------
def test_flux_and_sd3_names_are_placed_in_their_blocks():
    assert locate_dit("lora_unet_double_blocks_18_txt_mlp_2") == ("double", "double_blocks.18")
    assert locate_dit("lora_unet_single_blocks_37_modulation_lin") == ("single", "single_blocks.37")
    assert locate_dit("lora_unet_joint_blocks_4_context_block_attn_qkv") == ("joint", "joint_blocks.4.context")
    assert locate_dit("lora_unet_joint_blocks_12_x_block_attn2_proj") == ("joint", "joint_blocks.12.x")
    for layer in FLUX_IN + SD3_EMB:
        assert locate_dit(f"lora_unet_{layer}") == ("dit_in", "embedders"), layer
    assert locate_dit("lora_unet_final_layer_linear") == ("dit_out", "final_layer")
    for sd_name in ("lora_unet_down_blocks_1_attentions_0_proj_in", "lora_unet_time_embedding_linear_1",
                    "lora_unet_conv_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        assert locate_dit(sd_name) is None, sd_name


@pytest.mark.parametrize("names, meta, model", [
    (flux_names(), {}, "FLUX.1"),
    (flux_names(), {"modelspec.architecture": "flux-1-dev/lora", "ss_base_model_version": "flux1"}, "FLUX.1 dev"),
    (flux_names(), {"modelspec.architecture": "flux-1-schnell/lora"}, "FLUX.1 schnell"),
    (flux_names(), {"ss_base_model_version": "flux1"}, "FLUX.1"),
    (flux_names(double=(), single=(), te=False), {}, "FLUX.1"),  # in_dims layers only
    (sd3_names(), {}, "SD3.5 medium"),  # x_block attn2: SD3.5 medium
    (sd3_names(attn2=()), {}, "SD3"),
    (sd3_names(attn2=()), {"ss_base_model_version": "medium",
                           "modelspec.architecture": "stable-diffusion-3-medium/lora"}, "SD3 medium"),
    (sd3_names(attn2=()), {"modelspec.architecture": "stable-diffusion-3-5-large/lora"}, "SD3.5 large"),
    (sd3_names(attn2=()), {"ss_base_model_version": "5-large"}, "SD3.5 large"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"], {},
     "FLUX.1"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
      "lora_te3_encoder_block_0_layer_0_SelfAttention_q"], {}, "SD3"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1"], {"modelspec.architecture": "flux-1-dev/lora"}, "FLUX.1 dev"),
])
def test_the_model_is_named_from_the_names_and_the_metadata(names, meta, model):
    assert dit_model(names, meta) == model


def test_a_file_that_is_not_flux_or_sd3_is_left_to_the_sd_rules():
    sdxl = ["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    assert family_from_names(sdxl) is None and dit_model(sdxl, {"ss_base_model_version": "sdxl_base_v1-0"}) is None
    assert family_from_names(["lora_te1_text_model_encoder_layers_0_mlp_fc1"]) is None  # CLIP-L alone: not told
    assert model_from_metadata({"ss_base_model_version": "sd_v1"}) is None
    # a file whose names say SD3 while its metadata says FLUX.1: the names win
    assert dit_model(sd3_names(attn2=()), {"modelspec.architecture": "flux-1-dev/lora"}) == "SD3"


# --- the report ---------------------------------------------------------------------------------------------------
def test_a_flux_file_is_reported_by_text_encoder_input_layers_double_and_single_blocks_in_model_order(capsys, tmp_path):
    path = tmp_path / "flux.safetensors"
    write(path, flux_names(), {"modelspec.architecture": "flux-1-dev/lora", "ss_base_model_version": "flux1"})
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 0 and err == ""
    assert "kohya LoRA file for FLUX.1 dev" in out
    assert blocks_of(out) == [
        ("text encoder 1 (CLIP-L)", "te1"), ("text encoder 3 (T5-XXL)", "te3"), ("DiT input layers", "embedders"),
        ("double blocks", "double_blocks.0"), ("double blocks", "double_blocks.1"),
        ("double blocks", "double_blocks.2"), ("double blocks", "double_blocks.10"),
        ("single blocks", "single_blocks.0"), ("single blocks", "single_blocks.1"),
        ("single blocks", "single_blocks.9"), ("single blocks", "single_blocks.37")]
    assert re.search(r"^double blocks +double_blocks\.10 +10 +4 +4 +4 ", out, re.M)  # 10 modules at rank 1 + 10 % 7
    report = json.loads(run(capsys, "inspect", str(path), "--json")[1])
    assert report["model"] == "FLUX.1 dev"
    assert {b["block"]: b["modules"] for b in report["blocks"]} == {
        "te1": 6, "te3": 9, "embedders": 8, "double_blocks.0": 10, "double_blocks.1": 10, "double_blocks.2": 10,
        "double_blocks.10": 10, "single_blocks.0": 3, "single_blocks.1": 3, "single_blocks.9": 3,
        "single_blocks.37": 3}
    assert {m["name"]: m["rank"] for m in report["modules"]} == {n: rank_of(n) for n in flux_names()}


def test_an_sd3_file_is_reported_by_joint_blocks_context_then_x_the_emb_and_final_layers(capsys, tmp_path):
    path = tmp_path / "sd3.safetensors"
    write(path, sd3_names(), {"ss_base_model_version": "5-medium",
                              "modelspec.architecture": "stable-diffusion-3-5-medium/lora"})
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and "kohya LoRA file for SD3.5 medium" in out
    rows = blocks_of(out)
    assert rows[:4] == [("text encoder 1 (CLIP-L)", "te1"), ("text encoder 2 (CLIP-G)", "te2"),
                        ("text encoder 3 (T5-XXL)", "te3"), ("DiT input layers", "embedders")]
    assert [b for _, b in rows[4:-1]] == [f"joint_blocks.{i}.{half}" for i in (0, 1, 2, 10, 23)
                                          for half in ("context", "x")]
    assert rows[-1] == ("DiT final layer", "final_layer")
    report = json.loads(run(capsys, "inspect", str(path), "--json")[1])
    modules = {b["block"]: b["modules"] for b in report["blocks"]}
    assert modules["joint_blocks.0.x"] == 7 and modules["joint_blocks.2.x"] == 5  # attn2 in block 0 only here
    assert modules["joint_blocks.23.context"] == 2  # the last context block is pre-only
    assert modules["embedders"] == 6 and modules["final_layer"] == 2


def test_a_dit_file_is_plotted(capsys, tmp_path):
    import_or_fail("matplotlib", "the plot needs pip install aclora[plot]")
    for name, names in (("flux", flux_names()), ("sd3", sd3_names())):
        path, png = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.png"
        write(path, names)
        code, _, _ = run(capsys, "inspect", str(path), "--plot", str(png))
        assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_of_a_flux_file_holds_every_module_once():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flux.safetensors"
        write(path, flux_names())
        report = read_report(str(path))
    assert sum(b.modules for b in report.blocks) == len(report.modules) == len(flux_names())
    assert report.model == "FLUX.1" and {m.part for m in report.modules} == {"te1", "te3", "dit_in", "double",
                                                                            "single"}
