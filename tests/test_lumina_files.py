"""Lumina 2 LoRA files (sd-scripts' lora_lumina names) outside training: which model a file is for,
``aclora inspect`` per Lumina block and Gemma2, and ``aclora resize``.

The files are small synthetic kohya files with the names lora_lumina writes (tests/test_lumina_sd_scripts.py
pins those names against sd-scripts' own module) and the metadata lumina_train_network writes.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aclora_ext.families import check_model_family, model_family
from aclora_ext.files.storage import LoRAFileError
from aclora_ext.tools.cli import main as cli_main
from aclora_ext.tools.inspect import read_report
from aclora_ext.tools.resize import resize_file, resize_state_dict
from test_report_dit import blocks_of, flux_names, rank_of, run, write
from test_resize import file_update, ranks_of, relative
from test_resize_dit import dit_file, resize_lora  # noqa: F401  (the fixture)

import test_resize_dit

BLOCK = ("attention_qkv", "attention_out", "feed_forward_w1", "feed_forward_w2", "feed_forward_w3",
         "adaLN_modulation_1")
GEMMA2 = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_o_proj", "mlp_gate_proj",
          "mlp_up_proj", "mlp_down_proj")
META = {"ss_base_model_version": "lumina2", "modelspec.architecture": "lumina-2/lora",
        "ss_network_module": "networks.lora_lumina", "ss_network_dim": "8", "ss_network_alpha": "4",
        "ss_model_prediction_type": "raw", "ss_discrete_flow_shift": "6.0", "ss_timestep_sampling": "shift"}


def lumina_names(layers=(0, 1, 25), refiners=(0, 1), embedders=True, te=True, final=True) -> list[str]:
    names = [f"lora_unet_layers_{i}_{layer}" for i in layers for layer in BLOCK]
    names += [f"lora_unet_noise_refiner_{i}_{layer}" for i in refiners for layer in BLOCK]
    names += [f"lora_unet_context_refiner_{i}_{layer}" for i in refiners for layer in BLOCK[:-1]]
    names += ["lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"] if final else []
    if embedders:
        names += ["lora_unet_x_embedder", "lora_unet_t_embedder_mlp_0", "lora_unet_t_embedder_mlp_2",
                  "lora_unet_cap_embedder_1"]
    if te:
        names += [f"lora_te_layers_{i}_{layer}" for i in (0, 25) for layer in GEMMA2]
    return names


# --- which model a file is for ---------------------------------------------------------------------------
def test_a_lumina_file_is_told_by_its_block_names_and_a_gemma2_file_alone_is_not_sd1():
    assert model_family(lumina_names()) == "Lumina 2"
    assert model_family(lumina_names(te=False, embedders=False)) == "Lumina 2"
    assert model_family(["lora_unet_cap_embedder_1"]) == "Lumina 2"
    gemma2_only = [n for n in lumina_names() if n.startswith("lora_te_")]
    assert model_family(gemma2_only) is None  # Gemma2's layers, not CLIP's text_model: not an SD1.x file
    assert model_family(["lora_te_text_model_encoder_layers_0_mlp_fc1"]) == "SD1.x/2.x"
    assert model_family(flux_names()) == "FLUX.1"


@pytest.mark.parametrize("file_names, model_names, message", [
    (lumina_names(), flux_names(), "this LoRA is for a Lumina 2 model, but the model given is FLUX.1"),
    (flux_names(), lumina_names(), "this LoRA is for a FLUX.1 model, but the model given is Lumina 2"),
    (["lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_down_blocks_0_attentions_0_proj_in"],
     lumina_names(), "this LoRA is for an SD1.x/2.x model, but the model given is Lumina 2"),
])
def test_a_file_of_another_family_is_refused_on_lumina_and_the_reverse(file_names, model_names, message):
    with pytest.raises(LoRAFileError, match=message):
        check_model_family(file_names, model_names, "x.safetensors")
    check_model_family(model_names, model_names, "x.safetensors")  # the same family passes


# --- aclora inspect ---------------------------------------------------------------------------------------
def test_a_lumina_file_is_reported_by_gemma2_embedders_refiners_main_blocks_and_final_layer(capsys, tmp_path):
    path = tmp_path / "lumina.safetensors"
    write(path, lumina_names(), META)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 0 and err == ""
    assert "kohya LoRA file for Lumina 2" in out
    assert blocks_of(out) == [
        ("text encoder (Gemma2)", "te"), ("DiT input layers", "embedders"),
        ("refiner blocks", "context_refiner.0"), ("refiner blocks", "noise_refiner.0"),
        ("refiner blocks", "context_refiner.1"), ("refiner blocks", "noise_refiner.1"),
        ("main blocks", "layers.0"), ("main blocks", "layers.1"), ("main blocks", "layers.25"),
        ("DiT final layer", "final_layer")]
    report = json.loads(run(capsys, "inspect", str(path), "--json")[1])
    assert report["model"] == "Lumina 2"
    assert {b["block"]: b["modules"] for b in report["blocks"]} == {
        "te": 14, "embedders": 4, "context_refiner.0": 5, "noise_refiner.0": 6, "context_refiner.1": 5,
        "noise_refiner.1": 6, "layers.0": 6, "layers.1": 6, "layers.25": 6, "final_layer": 2}
    assert {m["name"]: m["rank"] for m in report["modules"]} == {n: rank_of(n) for n in lumina_names()}


def test_the_metadata_names_lumina_where_the_names_do_not(tmp_path):
    path = tmp_path / "gemma2-only.safetensors"
    write(path, [n for n in lumina_names() if n.startswith("lora_te_")], META)
    assert read_report(str(path)).model == "Lumina 2"
    write(path, lumina_names(), {})
    assert read_report(str(path)).model == "Lumina 2"


# --- aclora resize ------------------------------------------------------------------------------------------
# Lumina 2's layers with their aspect (qkv 2304 -> 2304+768+768, feed-forward 2304 <-> 6144, modulation
# 256 -> 4*2304, Gemma2 2304 <-> 9216), scaled down 48x so that resize_lora.py's full SVDs stay quick
MODULES = [  # name, out, in
    ("lora_unet_layers_0_attention_qkv", 80, 48),
    ("lora_unet_layers_0_attention_out", 48, 48),
    ("lora_unet_layers_7_feed_forward_w1", 128, 48),
    ("lora_unet_layers_25_feed_forward_w2", 48, 128),
    ("lora_unet_noise_refiner_1_adaLN_modulation_1", 192, 8),
    ("lora_unet_context_refiner_0_attention_qkv", 80, 48),
    ("lora_unet_final_layer_linear", 64, 48),
    ("lora_unet_cap_embedder_1", 48, 48),
    ("lora_te_layers_3_mlp_down_proj", 48, 192),
    ("lora_te_layers_3_self_attn_q_proj", 42, 48),
]


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_ratio", 4.0)])
def test_resize_lora_methods_pick_the_real_scripts_ranks_on_lumina_names(resize_lora, method, param):  # noqa: F811
    tensors = dit_file(MODULES)
    theirs_sd, theirs = test_resize_dit.resize_speed.resize_lora_ranks(tensors, 6, 6, method, param, resize_lora)
    result = resize_state_dict(tensors, method, param=param, max_rank=6)
    assert result.ranks == theirs == ranks_of(result.tensors)
    assert len(set(theirs.values())) > 1
    for name in theirs:
        want = file_update(theirs_sd, name)
        if want.norm() > 1e-5:
            assert relative(file_update(result.tensors, name), want) < 1e-4, name


def test_a_resized_lumina_file_keeps_sd_scripts_metadata_and_reports_as_lumina(tmp_path, capsys):
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(dit_file(MODULES), str(source), META)
    assert cli_main(["resize", str(source), str(target), "--min-importance", "0.2"]) == 0
    out = capsys.readouterr().out
    with safe_open(str(target), "pt") as f:
        written = f.metadata()
    for key, value in META.items():
        if key not in ("ss_network_dim", "ss_network_alpha"):
            assert written[key] == value, key
    assert written["ss_network_dim"] == written["ss_network_alpha"] == "Dynamic"
    report = read_report(str(target))
    assert report.model == "Lumina 2" and "file for Lumina 2" in out
    assert {m.part for m in report.modules} == {"te", "dit_in", "refiners", "layers", "dit_out"}
    assert ranks_of(load_file(str(target))) == resize_file(source, tmp_path / "again.safetensors",
                                                           min_importance=0.2).ranks


# --- aclora vram ------------------------------------------------------------------------------------------------
def test_aclora_vram_counts_the_lumina_sample_config_as_the_figure_it_quotes(capsys):
    """The sample config's quoted line is what the tool prints for it (tests/test_vram_lumina.py pins the count)."""
    import re

    config = test_resize_dit.ROOT / "sample_configs" / "lumina2_style_24gb.toml"
    assert cli_main(["vram", "--config_file", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("AC-LoRA VRAM estimate: Lumina 2 1024x1024, batch 1, LoRA rank 32 on the DiT; DiT weights "
                          "bf16")
    assert "180 LoRA modules" in out
    peak = re.search(r"^ +([\d.]+) +peak allocated", out, re.MULTILINE)
    margin = re.search(r"^ +([\d.]+) +estimate with the margin", out, re.MULTILINE)
    assert peak and margin
    quoted = f"# aclora vram: peak {peak.group(1)} GiB, {margin.group(1)} GiB with the margin"
    assert quoted in config.read_text(encoding="utf-8").splitlines()
