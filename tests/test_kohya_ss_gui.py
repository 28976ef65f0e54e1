"""The kohya_ss GUI routes of sample_configs/kohya_ss_gui.md and its presets, replayed as the GUI builds a run.

The GUI (bmaltais/kohya_ss) is not installed here or in CI, so what it does at commit ``GUI_COMMIT`` is recorded
below as data and small functions, each naming where it is in the GUI's code: the field names a preset may set
(``open_configuration``, recorded as test_sample_configs.GUI_PRESET_FIELDS), the trainer a model checkbox starts
and the LoRA types it allows (``train_model``), the ``network_args`` each LoRA type writes into the GUI's config
file, and how "Additional parameters" reach sd-scripts (double quotes dropped, split on whitespace, each piece
through ``shlex.quote``, no shell). The last test runs sd-scripts' own parsers on that config file and command
line, for all seven LoRA trainers.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import sd_scripts_fixtures as e2e
from helpers import skip_or_fail
from test_sample_configs import (
    FAMILY_OF_SCRIPT,
    GUI_PRESET_FIELDS,
    SAMPLES,
    accepted_names,
    effective,
    load_toml,
    network_kwargs,
    settings_from_command_line,
)

from aclora_ext.options import OptionError, parse_network_args

GUI_COMMIT = "45088f04af78e11cec5407ff4652ea3ed2c14422"
GUI_DOC = SAMPLES / "kohya_ss_gui.md"

# Each preset: the trainer the GUI starts for it, the module the GUI writes into its config file (which the
# preset's Additional parameters replace), and the training config of this repository it mirrors.
PRESETS = {
    "kohya_ss_gui_aclora_sdxl.json": ("sdxl_train_network.py", "networks.lora", "sdxl_style_24gb.toml"),
    "kohya_ss_gui_aclora_flux.json": ("flux_train_network.py", "networks.lora_flux", "flux_style_24gb.toml"),
    "kohya_ss_gui_aclora_sd3.json": ("sd3_train_network.py", "networks.lora_sd3", "sd35_medium_style.toml"),
}

# --- what the GUI does, at GUI_COMMIT ---------------------------------------------------------------------

# train_model (lora_gui.py 1779-1792) starts the trainer of the first model checkbox that is on, in this order.
MODEL_CHECKBOXES = (
    ("sdxl", "sdxl_train_network.py"),
    ("flux1_checkbox", "flux_train_network.py"),
    ("sd3_checkbox", "sd3_train_network.py"),
    ("hunyuan_image_checkbox", "hunyuan_image_train_network.py"),
    ("anima_checkbox", "anima_train_network.py"),
    ("lumina_checkbox", "lumina_train_network.py"),
)
OTHER_TRAINER = "train_network.py"
# The GUI's module for each trainer with the LoRA type the doc names (lora_gui.py 1857-1987)
GUI_MODULE_OF_TRAINER = {
    "train_network.py": "networks.lora",
    "sdxl_train_network.py": "networks.lora",
    "flux_train_network.py": "networks.lora_flux",
    "sd3_train_network.py": "networks.lora_sd3",
    "hunyuan_image_train_network.py": "networks.lora_hunyuan_image",
    "anima_train_network.py": "networks.lora_anima",
    "lumina_train_network.py": "networks.lora_lumina",
}

DROPOUT_AND_LORAPLUS = (
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)
STANDARD_BLOCK_FIELDS = (
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
)
FLUX1_VALUE_FIELDS = (
    "img_attn_dim",
    "img_mlp_dim",
    "img_mod_dim",
    "single_dim",
    "txt_attn_dim",
    "txt_mlp_dim",
    "txt_mod_dim",
    "single_mod_dim",
    "in_dims",
    "train_double_block_indices",
    "train_single_block_indices",
)
# The preset fields each LoRA type turns into network_args entries of the GUI's config file
NETWORK_ARGS_FIELDS = {
    "Standard": STANDARD_BLOCK_FIELDS + DROPOUT_AND_LORAPLUS,
    "Flux1": FLUX1_VALUE_FIELDS + ("train_lora_ggpo", "split_mode", "split_qkv", "train_t5xxl") + DROPOUT_AND_LORAPLUS,
    # the types of the Anima, Lumina and HunyuanImage-2.1 checkboxes (lora_gui.py 1930-1946)
    **{lora_type: DROPOUT_AND_LORAPLUS for lora_type in ("Anima", "Lumina", "HunyuanImage-2.1")},
}  # (Flux1's ggpo_beta and ggpo_sigma enter only with train_lora_ggpo)


def gui_trainer(preset: dict[str, Any]) -> str:
    return next((script for box, script in MODEL_CHECKBOXES if preset.get(box)), OTHER_TRAINER)


def gui_refusal(preset: dict[str, Any]) -> Optional[str]:
    """The LoRA-type checks train_model makes before it starts (lora_gui.py 1461-1516), for a route's types."""
    lora_type = preset["LoRA_type"]
    if preset.get("flux1_checkbox") and lora_type not in ("Flux1", "Flux1 OFT") and "LyCORIS" not in lora_type:
        return "LoRA type must be set to 'Flux1', 'Flux1 OFT' or 'LyCORIS' if Flux1 checkbox is checked."
    if bool(preset.get("anima_checkbox")) != (lora_type == "Anima"):
        return "the Anima model checkbox goes with LoRA type 'Anima' only"
    if bool(preset.get("lumina_checkbox")) != (lora_type == "Lumina"):
        return "the Lumina model checkbox goes with LoRA type 'Lumina' only"
    return None


def gui_network_args(preset: dict[str, Any]) -> list[str]:
    """The ``network_args`` list the GUI writes into its config file (lora_gui.py 1857-2060, 2061-2066, 2275): a
    field enters as key=value only when its value is truthy; then the string loses its double quotes and is split."""
    lora_type = preset["LoRA_type"]
    value = preset.get
    entries: list[str] = []
    if lora_type == "Standard":
        entries += [f"{k}={value(k)}" for k in STANDARD_BLOCK_FIELDS + ("rank_dropout", "module_dropout") if value(k)]
    elif lora_type == "Flux1":
        fields = FLUX1_VALUE_FIELDS + (("ggpo_beta", "ggpo_sigma") if value("train_lora_ggpo") else ())
        entries += [f"{k}={value(k)}" for k in fields if value(k)]
        entries += ["train_blocks=single"] if value("split_mode") else []
        entries += ["split_qkv=True"] if value("split_qkv") else []
        entries += ["train_t5xxl=True"] if value("train_t5xxl") and value("flux1_checkbox") else []
        entries += [f"{k}={value(k)}" for k in ("rank_dropout", "module_dropout") if float(value(k) or 0) > 0]
    elif lora_type in ("Anima", "Lumina", "HunyuanImage-2.1"):
        entries += [f"{k}={value(k)}" for k in ("rank_dropout", "module_dropout") if float(value(k) or 0) > 0]
    else:
        raise AssertionError(f"LoRA type {lora_type!r} is no route of sample_configs/kohya_ss_gui.md")
    entries += [f"{k}={value(k)}" for k in DROPOUT_AND_LORAPLUS[2:] if value(k)]
    return " ".join(entries).replace('"', "").split()


def gui_additional_arguments(text: str) -> list[str]:
    """The arguments the GUI appends for its "Additional parameters" box (common_gui.py 1339-1342): double quotes
    dropped, split on whitespace, each piece through shlex.quote; the command runs without a shell
    (class_command_executor.py 156), so the quotes shlex.quote adds arrive."""
    return [shlex.quote(piece) for piece in text.replace('"', "").split()]


def load_preset(name: str) -> dict[str, Any]:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))


def preset_settings(preset: dict[str, Any]) -> dict[str, Any]:
    return settings_from_command_line(gui_additional_arguments(preset["additional_parameters"]))


def aclora_config(entries: list[str], preset: dict[str, Any], family: str):
    settings = {"network_args": entries, "network_dropout": preset.get("network_dropout") or None}
    return parse_network_args(network_kwargs(settings), max_rank=preset["network_dim"], family=family)


# --- the presets ------------------------------------------------------------------------------------------


def test_every_gui_preset_in_sample_configs_is_checked() -> None:
    assert sorted(p.name for p in SAMPLES.glob("kohya_ss_gui*.json")) == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sets_only_fields_the_gui_loads(name: str) -> None:
    unknown = sorted(set(load_preset(name)) - GUI_PRESET_FIELDS)
    hints = {key: difflib.get_close_matches(key, GUI_PRESET_FIELDS, n=1) for key in unknown}
    assert not unknown, f"not kohya_ss GUI fields at {GUI_COMMIT[:7]} (the GUI would ignore them): {hints}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sets_every_model_checkbox_and_the_gui_starts_its_trainer(name: str) -> None:
    preset = load_preset(name)
    # a checkbox the preset leaves out keeps the value it had, and SDXL's would win over the others
    missing = [box for box, _ in MODEL_CHECKBOXES if box not in preset]
    assert not missing, f"{name} leaves the model checkboxes {missing} at whatever they were"
    assert gui_trainer(preset) == PRESETS[name][0]
    assert gui_refusal(preset) is None


@pytest.mark.parametrize("name", PRESETS)
def test_preset_replaces_the_guis_module_with_networks_aclora(name: str) -> None:
    script, gui_module, _ = PRESETS[name]
    preset = load_preset(name)
    assert GUI_MODULE_OF_TRAINER[script] == gui_module
    settings = preset_settings(preset)
    assert settings["network_module"] == "networks.aclora"
    unknown = sorted(set(settings) - accepted_names(script))
    assert not unknown, f"Additional parameters that {script} does not accept: {unknown}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_network_args_parse_for_its_family(name: str) -> None:
    preset = load_preset(name)
    entries = preset_settings(preset)["network_args"]
    aclora_config(entries, preset, FAMILY_OF_SCRIPT[PRESETS[name][0]])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_leaves_every_gui_field_that_enters_network_args_at_a_value_aclora_accepts(name: str) -> None:
    # Additional parameters' --network_args replaces the GUI's list; these fields matter as soon as a user drops it
    preset = load_preset(name)
    missing = [field for field in NETWORK_ARGS_FIELDS[preset["LoRA_type"]] if field not in preset]
    assert not missing, f"{name} leaves {missing} at whatever they were"
    aclora_config(gui_network_args(preset), preset, FAMILY_OF_SCRIPT[PRESETS[name][0]])


@pytest.mark.parametrize(
    "name, fields, message",
    [
        ("kohya_ss_gui_aclora_flux.json", {"split_qkv": True}, "split_qkv=True is refused"),
        # GGPO sigma and beta at the GUI's defaults (lora_gui.py 3017-3028)
        (
            "kohya_ss_gui_aclora_flux.json",
            {"train_lora_ggpo": True, "ggpo_sigma": 0.03, "ggpo_beta": 0.01},
            "unknown key 'ggpo_beta'",
        ),
        ("kohya_ss_gui_aclora_sd3.json", {"block_dims": "4,4,4"}, "unknown key 'block_dims'"),
        ("kohya_ss_gui_aclora_sdxl.json", {"down_lr_weight": "0.5"}, "unknown key 'down_lr_weight'"),
    ],
    ids=["split_qkv", "ggpo", "sd3-block_dims", "sdxl-down_lr_weight"],
)
def test_a_gui_field_aclora_refuses_reaches_it_through_the_guis_network_args(name, fields, message) -> None:
    preset = {**load_preset(name), **fields}
    with pytest.raises(OptionError, match=re.escape(message)):
        aclora_config(gui_network_args(preset), preset, FAMILY_OF_SCRIPT[PRESETS[name][0]])


# GUI field -> the key of the training config the GUI writes it as (lora_gui.py 2147-2560), beyond equal names
GUI_TO_CONFIG = {
    "optimizer": "optimizer_type",
    "flux1_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sd3_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sd3_enable_scaled_pos_embed": "enable_scaled_pos_embed",
}
MIRRORED = (
    "network_dim",
    "network_alpha",
    "max_train_epochs",
    "save_every_n_epochs",
    "learning_rate",
    "optimizer",
    "lr_scheduler",
    "max_grad_norm",
    "seed",
    "fp8_base",
    "flux1_cache_text_encoder_outputs",
    "sd3_cache_text_encoder_outputs",
    "sd3_enable_scaled_pos_embed",
    "timestep_sampling",
    "discrete_flow_shift",
    "model_prediction_type",
    "guidance_scale",
)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_the_training_config_it_mirrors(name: str) -> None:
    preset = load_preset(name)
    twin = effective(load_toml(PRESETS[name][2]))
    for field in (f for f in MIRRORED if f in preset):
        assert preset[field] == twin.get(GUI_TO_CONFIG.get(field, field), False), field
    assert preset_settings(preset)["network_args"] == twin["network_args"]
    # a 0 text-encoder lr is how the GUI writes network_train_unet_only (lora_gui.py 2109-2115)
    assert (preset["text_encoder_lr"] == 0) == bool(twin.get("network_train_unet_only"))


# --- the doc's table of families ---------------------------------------------------------------------------


def doc_family_rows() -> list[list[str]]:
    """The rows of the table in section 2 of the GUI page (family, checkbox, LoRA type, trainer, module, preset)."""
    text = GUI_DOC.read_text(encoding="utf-8")
    table = text[text.index("| family | model checkbox |") :].split("\n\n", 1)[0].splitlines()[2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in table]


def test_the_docs_family_table_names_the_trainer_and_module_the_gui_uses_and_a_preset_or_config_that_exists():
    rows = doc_family_rows()
    assert len(rows) == len(GUI_MODULE_OF_TRAINER) + 1  # Chroma shares flux_train_network.py with FLUX.1
    for family, _, _, trainer, module, preset in rows:
        script = re.search(r"`(\w+\.py)`", trainer)[1]
        assert f"`{GUI_MODULE_OF_TRAINER[script]}`" == module, family
        named = re.findall(r"`([\w.]+\.(?:json|toml))`", preset)
        assert all((SAMPLES / n).is_file() for n in named), family
        for name in (n for n in named if n in PRESETS):
            assert PRESETS[name][0] == script, family
    assert {n for row in rows for n in re.findall(r"`(kohya_ss_gui\w+\.json)`", row[5])} == set(PRESETS)


def test_every_sample_file_the_page_names_is_in_sample_configs():
    named = set(re.findall(r"`(\w+\.(?:toml|json))`", GUI_DOC.read_text(encoding="utf-8")))
    assert {"dataset_style_15.toml", "sdxl_style_24gb.toml", *PRESETS} <= named
    # pyproject.toml: the one of this repository, which the install section names
    missing = sorted(n for n in named - {"pyproject.toml"} if not (SAMPLES / n).is_file())
    assert not missing


# --- the Additional parameters the doc gives ----------------------------------------------------------------


def doc_additional_parameters() -> list[str]:
    """Every fenced block of the GUI page that holds command-line options (starts with --)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", GUI_DOC.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return [block.strip() for block in blocks if block.strip().startswith("--")]


def test_the_doc_gives_additional_parameters_for_the_override_and_for_a_config_file() -> None:
    found = [settings_from_command_line(text.split()) for text in doc_additional_parameters()]
    assert any(any(e.startswith("ranks_from=") for e in s.get("network_args", [])) for s in found)
    assert any("config_file" in s for s in found)


@pytest.mark.parametrize("text", doc_additional_parameters())
def test_the_docs_additional_parameters_reach_sd_scripts_and_aclora_as_typed(text, tmp_path, monkeypatch) -> None:
    quoted, typed = gui_additional_arguments(text), text.split()
    settings, typed_settings = settings_from_command_line(quoted), settings_from_command_line(typed)
    # sd-scripts takes no quote off its own options, so those must come through shlex.quote unchanged
    assert {k: v for k, v in settings.items() if k != "network_args"} == {
        k: v for k, v in typed_settings.items() if k != "network_args"
    }
    assert not sorted(set(settings) - accepted_names("train_network.py")), settings
    monkeypatch.chdir(tmp_path)  # the ranks_from files the examples name, relative to here
    for entry in typed_settings.get("network_args", []):
        if entry.startswith("ranks_from="):
            Path(entry.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            Path(entry.split("=", 1)[1]).write_bytes(b"")
    if "network_args" in typed_settings:
        got = parse_network_args(network_kwargs(settings))
        assert got == parse_network_args(network_kwargs(typed_settings))


# --- sd-scripts reads the GUI's command line over the GUI's config file --------------------------------------

# In sd-scripts' folder: each case is (trainer module, the config files to write, argv); prints what the trainer's
# own setup_parser() and train_util.read_config_from_file make of it (read_config_from_file reads sys.argv).
READ_ARGS = r"""
import importlib, json, sys, toml
from library import train_util
out = []
for module, files, argv in json.loads(sys.argv[1]):
    for path, data in files.items():
        with open(path, "w", encoding="utf-8") as f:
            toml.dump(data, f)
    parser = importlib.import_module(module).setup_parser()
    sys.argv = [module + ".py", *argv]
    try:
        args = train_util.read_config_from_file(parser.parse_args(argv), parser)
    except SystemExit as stop:
        out.append({"exit": stop.code})
        continue
    names = ("network_module", "network_dim", "network_args", "learning_rate", "max_data_loader_n_workers")
    out.append({**{n: getattr(args, n) for n in names}, "defaults": {n: parser.get_default(n) for n in names}})
print("READ_ARGS " + json.dumps(out))
"""


def read_args(cases: list[tuple[str, dict[str, dict], list[str]]], tmp_path: Path) -> list[dict[str, Any]]:
    if e2e.switched_off():
        pytest.skip(f"{e2e.SWITCH}=0: the tests against sd-scripts are turned off")
    missing = e2e.missing_requirements()
    if missing:
        skip_or_fail(f"this test needs {'; '.join(missing)}. {e2e.INSTALL_HINT}")
    env = e2e.sd_scripts_environment(tmp_path, with_stand_ins=not e2e.torchvision_imports())
    done = subprocess.run(
        [sys.executable, "-c", READ_ARGS, json.dumps(cases)],
        cwd=e2e.SD_SCRIPTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("READ_ARGS "))
    return json.loads(line.removeprefix("READ_ARGS "))


@pytest.mark.sd_scripts
def test_every_trainer_reads_the_guis_command_line_over_its_config_file_and_only_the_last_config_file(tmp_path):
    gui, ours = str(tmp_path / "config_lora-20260101-000000.toml"), str(tmp_path / "ours.toml")
    trainers = sorted(GUI_MODULE_OF_TRAINER)
    assert all((e2e.SD_SCRIPTS / t).is_file() for t in trainers), f"sd-scripts at {e2e.SD_SCRIPTS} lacks a trainer"
    cases, expected = [], []
    for name, (script, gui_module, _) in PRESETS.items():  # each preset's own command line
        preset = copy.deepcopy(load_preset(name))
        refused = ["split_qkv=True", "ggpo_beta=0.01", "block_dims=4,4,4"]  # what GUI fields could have added
        files = {
            gui: {
                "network_module": gui_module,
                "network_dim": 1,
                "network_args": refused,
                "max_data_loader_n_workers": 3,
            }
        }
        argv = ["--config_file", gui, *gui_additional_arguments(preset["additional_parameters"])]
        cases.append((script.removesuffix(".py"), files, argv))
        expected.append(
            {
                "network_module": "networks.aclora",
                "network_dim": 1,
                "max_data_loader_n_workers": 3,
                "network_args": preset_settings(preset)["network_args"],
            }
        )
    for script in trainers:  # the override, a quoted entry, and the --config_file route, in every trainer
        files = {
            gui: {
                "network_module": GUI_MODULE_OF_TRAINER[script],
                "network_dim": 16,
                "learning_rate": 5e-4,
                "network_args": ["rank_dropout=0.1"],
                "max_data_loader_n_workers": 0,
            },
            ours: {"network_module": "networks.aclora", "network_dim": 32, "network_args": ["min_rank=2"]},
        }
        extra = gui_additional_arguments("--network_module=networks.aclora --network_args in_dims=[4,0,0,0,4]")
        cases.append((script.removesuffix(".py"), files, ["--config_file", gui, *extra]))
        expected.append(
            {
                "network_module": "networks.aclora",
                "network_dim": 16,
                "learning_rate": 5e-4,
                "network_args": ["'in_dims=[4,0,0,0,4]'"],
                "max_data_loader_n_workers": 0,
            }
        )
        cases.append((script.removesuffix(".py"), files, ["--config_file", gui, "--config_file", ours]))
        expected.append(
            {
                "network_module": "networks.aclora",
                "network_dim": 32,
                "network_args": ["min_rank=2"],
                "learning_rate": "default",
                "max_data_loader_n_workers": "default",
            }
        )
    # a path with a backslash (as on Windows; on Linux a file name) is found as typed, not as the GUI quotes it
    windows = f"{tmp_path}/runs\\ours.toml"
    files = {windows: {"network_module": "networks.aclora", "network_dim": 8}}
    cases.append(("train_network", files, ["--config_file", windows]))
    expected.append({"network_module": "networks.aclora", "network_dim": 8})
    cases.append(("train_network", files, gui_additional_arguments(f"--config_file {windows}")))
    expected.append({"exit": 1})
    got = read_args(cases, tmp_path)
    assert len(got) == len(expected)
    for (module, _, argv), want, have in zip(cases, expected, got):
        want = {k: (have["defaults"][k] if v == "default" else v) for k, v in want.items()}
        assert {k: have.get(k) for k in want} == want, f"{module} {argv}"
