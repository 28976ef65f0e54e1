"""Anima files and options without sd-scripts: a file's family from lora_anima's names or sd-scripts' metadata,
``aclora inspect`` and ``aclora resize`` on Anima names, include/exclude_patterns parsing, and ``aclora vram``
counting the sample config. (The layers themselves: tests/test_anima_sd_scripts.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aclora_ext.families import check_model_family, model_family
from aclora_ext.files.storage import LoRAFileError
from aclora_ext.options import OptionError, parse_network_args
from aclora_ext.tools.cli import main as cli_main
from aclora_ext.tools.inspect import read_report
from test_resize import add_module, ranks_of

ROOT = Path(__file__).resolve().parents[1]
ATTN = [f"{a}_{p}_proj" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "output")]
QWEN3 = [f"self_attn_{p}_proj" for p in "qkvo"] + [f"mlp_{p}_proj" for p in ("gate", "up", "down")]
META = {"ss_base_model_version": "anima", "modelspec.architecture": "anima-preview/lora",
        "ss_network_module": "networks.lora_anima", "ss_network_dim": "8", "ss_network_alpha": "8",
        "ss_timestep_sampling": "sigmoid", "ss_discrete_flow_shift": "1.0"}


def anima_names(blocks=(0, 1, 27), adapter=(0, 5), te=(0, 27), extra=True) -> list[str]:
    names = [f"lora_unet_blocks_{i}_{layer}" for i in blocks for layer in ATTN + ["mlp_layer1", "mlp_layer2"]]
    names += [f"lora_unet_llm_adapter_blocks_{i}_self_attn_q_proj" for i in adapter]
    names += [f"lora_te_layers_{i}_{layer}" for i in te for layer in QWEN3]
    if extra:  # include_patterns' layers
        names += ["lora_unet_x_embedder_proj_1", "lora_unet_t_embedder_1_linear_1", "lora_unet_final_layer_linear"]
    return names


# --- which model a file is for ---------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [anima_names(), anima_names(te=(), extra=False), anima_names(blocks=(), te=()),
                                   ["lora_unet_final_layer_adaln_modulation_1", "lora_unet_t_embedder_1_linear_2"]],
                         ids=["all", "blocks", "adapter-only", "include-patterns-only"])
def test_lora_anima_names_tell_an_anima_file(names):
    assert model_family(names) == "Anima"


def test_a_qwen3_text_encoder_file_is_not_read_as_sd1_but_its_names_alone_do_not_tell():
    assert model_family([f"lora_te_layers_{i}_{layer}" for i in (0, 3) for layer in QWEN3]) is None
    assert model_family(["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]) == "SD1.x/2.x"


@pytest.mark.parametrize("file_names, model_names, message", [
    (anima_names(), ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"],
     "this LoRA is for an Anima model, but the model given is SD1.x/2.x"),
    (["lora_unet_double_blocks_0_img_mod_lin"], anima_names(), "this LoRA is for a FLUX.1 model, but the model "
                                                                "given is Anima"),
])
def test_a_file_of_one_family_is_refused_for_a_model_of_another(file_names, model_names, message):
    with pytest.raises(LoRAFileError, match=message):
        check_model_family(file_names, model_names, "x.safetensors")
    check_model_family(anima_names(te=()), anima_names(), "x.safetensors")  # the same family: accepted


# --- aclora inspect -------------------------------------------------------------------------------------------
def write(path: Path, names: list[str], meta: dict[str, str]) -> None:
    tensors = {}
    for i, name in enumerate(names):
        rank = 1 + i % 4
        tensors.update({f"{name}.lora_down.weight": torch.zeros(rank, 16),
                        f"{name}.lora_up.weight": torch.zeros(16, rank),
                        f"{name}.alpha": torch.tensor(float(rank))})
    save_file(tensors, str(path), meta)


def test_an_anima_file_is_reported_by_text_encoder_adapter_embedders_blocks_and_final_layer(capsys, tmp_path):
    path = tmp_path / "anima.safetensors"
    write(path, anima_names(), META)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kohya LoRA file for Anima preview" in out
    rows = re.findall(r"^(text encoder \(Qwen3\)|LLM adapter|DiT input layers|DiT blocks|DiT final layer) +(\S+)", out,
                      re.M)
    assert rows == [("text encoder (Qwen3)", "te"), ("LLM adapter", "llm_adapter.blocks.0"),
                    ("LLM adapter", "llm_adapter.blocks.5"), ("DiT input layers", "embedders"),
                    ("DiT blocks", "blocks.0"), ("DiT blocks", "blocks.1"), ("DiT blocks", "blocks.27"),
                    ("DiT final layer", "final_layer")]
    assert cli_main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {b["block"]: b["modules"] for b in report["blocks"]} == {
        "te": 14, "llm_adapter.blocks.0": 1, "llm_adapter.blocks.5": 1, "embedders": 2, "blocks.0": 10,
        "blocks.1": 10, "blocks.27": 10, "final_layer": 1}


def test_an_anima_file_without_metadata_is_told_by_its_names(tmp_path):
    path = tmp_path / "anima.safetensors"
    write(path, anima_names(adapter=(), te=()), {})
    assert read_report(str(path)).model == "Anima"


# --- aclora resize ---------------------------------------------------------------------------------------------
def test_aclora_resize_cuts_an_anima_file_at_the_planted_ranks_and_keeps_its_metadata(tmp_path, capsys):
    """Planted spectra: --min-importance 0.2 keeps the components above 0.2 x the file's largest (1.0)."""
    gen = torch.Generator().manual_seed(0)
    planted = {"lora_unet_blocks_0_self_attn_q_proj": ([1.0, 0.5, 0.1, 0.01], 2),
               "lora_unet_blocks_1_mlp_layer1": ([0.9, 0.3, 0.25, 0.05], 3),
               "lora_unet_llm_adapter_blocks_0_cross_attn_v_proj": ([0.6, 0.15, 0.1, 0.0], 1),
               "lora_te_layers_0_mlp_gate_proj": ([0.8, 0.7, 0.4, 0.3], 4)}
    tensors: dict = {}
    for name, (spectrum, _) in planted.items():
        add_module(tensors, name, 24, 16, 4, spectrum, gen, alpha=2.0)
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(source), META)
    assert cli_main(["resize", str(source), str(target), "--min-importance", "0.2"]) == 0
    assert ranks_of(load_file(str(target))) == {name: rank for name, (_, rank) in planted.items()}
    with safe_open(str(target), "pt") as f:
        written = f.metadata()
    assert written["modelspec.architecture"] == "anima-preview/lora" and written["ss_network_dim"] == "Dynamic"
    assert read_report(str(target)).model == "Anima preview"
    assert "DiT blocks" in capsys.readouterr().out


# --- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, patterns", [("'.*mlp.*'", (".*mlp.*",)), ("['.*mlp.*', r'blocks\\.0\\..*']",
                                                                          (".*mlp.*", r"blocks\.0\..*")),
                                           (" ('a.*',) ", ("a.*",))])
def test_patterns_are_read_as_python_literals_as_lora_anima_reads_them(raw, patterns):
    config = parse_network_args({"exclude_patterns": raw, "include_patterns": raw}, family="anima")
    assert config.exclude_patterns == config.include_patterns == patterns


@pytest.mark.parametrize("raw", [".*mlp.*", "['(']", "[1]", "[]", "''"])
def test_a_pattern_that_is_no_quoted_regular_expression_is_refused_naming_key_value_and_allowed(raw):
    with pytest.raises(OptionError) as raised:
        parse_network_args({"exclude_patterns": raw}, family="anima")
    assert str(raised.value) == (
        f"network_args: exclude_patterns={raw!r} is not valid; allowed: a Python literal: a quoted regular "
        "expression or a list of them, e.g. ['.*mlp.*'] (or none)")


@pytest.mark.parametrize("key, value", [("train_llm_adapter", "true"), ("include_patterns", "['x']")])
def test_an_anima_option_is_refused_for_another_family(key, value):
    with pytest.raises(OptionError, match=re.escape(f"{key}={value!r} is an option for Anima models, and this "
                                                    "model is FLUX.1")):
        parse_network_args({key: value}, family="flux")


# --- aclora vram ---------------------------------------------------------------------------------------------
def test_aclora_vram_counts_the_anima_sample_config_and_its_quoted_figure_is_the_count(capsys):
    from helpers import import_or_fail

    import_or_fail("transformers", "Anima's text encoder is transformers' Qwen3Model")
    config = ROOT / "sample_configs" / "anima_style_24gb.toml"
    assert cli_main(["vram", "--config_file", str(config)]) == 0
    out = capsys.readouterr().out
    counted = (re.search(r"^ *([\d.]+)  peak allocated", out, re.M), re.search(r"^ *([\d.]+)  estimate with", out, re.M))
    quoted = re.search(r"^# aclora vram: peak ([\d.]+) GiB, ([\d.]+) GiB with the margin$", config.read_text(), re.M)
    assert quoted, "the sample config quotes its aclora vram line"
    assert tuple(m.group(1) for m in counted if m) == quoted.groups()
    assert out.startswith("AC-LoRA VRAM estimate: Anima 1024x1024") and "280 LoRA modules" in out