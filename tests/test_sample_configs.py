"""The files in sample_configs/ are ones sd-scripts and the kohya_ss GUI accept as written.

sd-scripts itself is no help here: its ``--config_file`` reader takes any key,
including a misspelled one, and hands values to the script without argparse's
type conversion or choices check. So these tests hold the sample configs
against sd-scripts' own argument list (tests/data/sd_scripts_args.txt, made
from its real parsers), its dataset-config schema and the AC-LoRA option
declarations, and replay how sd-scripts and the GUI turn them into
``create_network`` keyword arguments.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import toml

from aclora_ext.options import OPTIONS, parse_network_args

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_configs"
ARGS_FILE = ROOT / "tests" / "data" / "sd_scripts_args.txt"

# Each training config and the sd-scripts script that reads it.
TRAINING_CONFIGS = {
    "sdxl_style_24gb.toml": "sdxl_train_network.py",
    "sdxl_style_12gb.toml": "sdxl_train_network.py",
    "sd15_style.toml": "train_network.py",
    "flux_style_24gb.toml": "flux_train_network.py",
    "flux_style_16gb.toml": "flux_train_network.py",
    "sd35_medium_style.toml": "sd3_train_network.py",
    "lumina2_style_24gb.toml": "lumina_train_network.py",
    "anima_style_24gb.toml": "anima_train_network.py",
    "hunyuan_image_style_24gb.toml": "hunyuan_image_train_network.py",
    "chroma_style_24gb.toml": "flux_train_network.py",
}
# the configs of models `aclora vram` does not model yet: they say so instead of quoting an estimate
# the model family each trainer gives create_network (options.FAMILIES keys)
FAMILY_OF_SCRIPT = {"train_network.py": "sd", "sdxl_train_network.py": "sd", "flux_train_network.py": "flux",
                    "sd3_train_network.py": "sd3", "lumina_train_network.py": "lumina",
                    "anima_train_network.py": "anima", "hunyuan_image_train_network.py": "hunyuan_image"}
DATASET_CONFIGS = ("dataset_style_15.toml",)

OPTION_NAMES = {o.name for o in OPTIONS}


# --- sd-scripts' argument list -----------------------------------------------


SCRIPTS = ("train_network.py", "sdxl_train_network.py", "flux_train_network.py", "sd3_train_network.py",
           "lumina_train_network.py", "anima_train_network.py", "hunyuan_image_train_network.py")


def load_sd_scripts_args() -> dict[str, dict[str, Any]]:
    """``{name: {"kind", "choices", "scripts"}}`` from tests/data/sd_scripts_args.txt (``scripts``: the trainers
    that accept the name)."""
    args = {}
    for line in ARGS_FILE.read_text(encoding="utf-8").splitlines():
        body, _, comment = line.partition("#")
        fields = body.split()
        if not fields:
            continue
        name, kind, *rest = fields
        choices = next((f.split("=", 1)[1].split("|") for f in rest if f.startswith("choices=")), None)
        only = comment.strip().removeprefix("only:").split() if comment.strip().startswith("only:") else SCRIPTS
        entry = args.setdefault(name, {"kind": kind, "choices": choices, "scripts": set(), "choices_of": {}})
        entry["scripts"] |= set(only)  # a name with per-trainer choices has a line per trainer group
        entry["choices_of"].update(dict.fromkeys(only, choices))
    return args


SD_SCRIPTS_ARGS = load_sd_scripts_args()


def accepted_names(script: str) -> set[str]:
    return {n for n, a in SD_SCRIPTS_ARGS.items() if script in a["scripts"]}


def flatten_config(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) pairs as sd-scripts' read_config_from_file sees them.

    It keeps top-level values and merges the keys of every table (section)
    one level deep into the same namespace; a later duplicate wins.
    """
    pairs = []
    for key, value in config.items():
        if isinstance(value, dict):
            pairs.extend(value.items())
        else:
            pairs.append((key, value))
    return pairs


def effective(config: dict[str, Any]) -> dict[str, Any]:
    return dict(flatten_config(config))


def value_matches(kind: str, value: Any) -> bool:
    """Whether a TOML value has the type sd-scripts' code expects for an argument of ``kind``."""
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(value_matches(kind[5:-1], v) for v in value)
    checks: dict[str, Callable[[Any], bool]] = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }
    return checks[kind](value)


def load_toml(name: str) -> dict[str, Any]:
    return toml.load(SAMPLES / name)


def network_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``**kwargs`` train_network.py passes to create_network for these settings."""
    kwargs: dict[str, Any] = {}
    for entry in settings.get("network_args") or []:
        key, value = entry.split("=", 1)
        kwargs[key] = value
    kwargs.setdefault("dropout", settings.get("network_dropout"))
    return kwargs


# --- the files exist, parse, and are all covered --------------------------------


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_sample_toml_parses(path: Path) -> None:
    assert isinstance(toml.load(path), dict)


def test_every_sample_toml_is_checked_as_a_training_or_dataset_config() -> None:
    present = {p.name for p in SAMPLES.glob("*.toml")}
    assert present == set(TRAINING_CONFIGS) | set(DATASET_CONFIGS), (
        "add new sample TOMLs to TRAINING_CONFIGS or DATASET_CONFIGS so they are checked"
    )


def test_the_argument_list_has_sd_scripts_names_we_rely_on() -> None:
    for name in ("network_module", "network_dim", "network_alpha", "network_args", "dataset_config", "config_file"):
        assert name in SD_SCRIPTS_ARGS
    assert "train_network.py" not in SD_SCRIPTS_ARGS["cache_text_encoder_outputs"]["scripts"]
    assert SD_SCRIPTS_ARGS["blocks_to_swap"]["scripts"] == {"flux_train_network.py", "sd3_train_network.py",
                                                            "lumina_train_network.py", "anima_train_network.py",
                                                            "hunyuan_image_train_network.py"}
    assert "nextdit_shift" in SD_SCRIPTS_ARGS["timestep_sampling"]["choices_of"]["lumina_train_network.py"]
    assert "nextdit_shift" not in SD_SCRIPTS_ARGS["timestep_sampling"]["choices_of"]["flux_train_network.py"]
    assert SD_SCRIPTS_ARGS["fp8_base"]["scripts"] == set(SCRIPTS)
    assert SD_SCRIPTS_ARGS["network_args"]["kind"] == "list[str]"
    assert SD_SCRIPTS_ARGS["mixed_precision"]["choices"] == ["no", "fp16", "bf16"]


# --- training configs ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_every_training_config_key_is_an_argument_of_its_script(name: str) -> None:
    script = TRAINING_CONFIGS[name]
    names = accepted_names(script)
    unknown = [key for key, _ in flatten_config(load_toml(name)) if key not in names]
    hints = {key: difflib.get_close_matches(key, names, n=1) for key in unknown}
    assert not unknown, f"{name}: not arguments of sd-scripts' {script} (sd-scripts would ignore them): {hints}"


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_no_training_config_key_is_set_twice_across_sections(name: str) -> None:
    keys = [key for key, _ in flatten_config(load_toml(name))]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    assert not repeated, f"{name}: set in more than one section (sd-scripts keeps only the last): {repeated}"


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_training_config_sections_are_one_level_deep(name: str) -> None:
    nested = [key for key, value in flatten_config(load_toml(name)) if isinstance(value, dict)]
    assert not nested, f"{name}: sd-scripts flattens one level of sections only; nested tables: {nested}"


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_training_config_values_have_the_types_and_choices_sd_scripts_expects(name: str) -> None:
    for key, value in flatten_config(load_toml(name)):
        arg = SD_SCRIPTS_ARGS.get(key)
        if arg is None:
            continue  # reported by the unknown-key test
        assert value_matches(arg["kind"], value), f"{name}: {key} = {value!r} should be a TOML {arg['kind']}"
        choices = arg["choices_of"].get(TRAINING_CONFIGS[name], arg["choices"])
        if choices is not None:
            assert str(value) in choices, f"{name}: {key} = {value!r} is not one of {choices}"


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_training_config_loads_the_aclora_network_module(name: str) -> None:
    assert effective(load_toml(name)).get("network_module") == "networks.aclora"


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_network_dim_the_maximum_rank_is_a_positive_integer(name: str) -> None:
    dim = effective(load_toml(name)).get("network_dim")
    assert isinstance(dim, int) and not isinstance(dim, bool) and dim > 0, f"{name}: network_dim = {dim!r}"


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_network_args_are_declared_aclora_options_with_accepted_values(name: str) -> None:
    settings = effective(load_toml(name))
    entries = settings.get("network_args")
    assert isinstance(entries, list) and entries, f"{name}: network_args should be a non-empty list of 'key=value'"
    keys = []
    for entry in entries:
        assert isinstance(entry, str) and "=" in entry, f"{name}: network_args entry {entry!r} is not 'key=value'"
        key = entry.split("=", 1)[0]
        assert key in OPTION_NAMES, f"{name}: network_args key {key!r} is not an AC-LoRA option"
        keys.append(key)
    assert len(keys) == len(set(keys)), f"{name}: a network_args key is repeated (sd-scripts keeps the last): {keys}"
    parse_network_args(network_kwargs(settings), max_rank=settings["network_dim"],
                       family=FAMILY_OF_SCRIPT[TRAINING_CONFIGS[name]])


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_dataset_config_points_at_a_sample_dataset_config_that_exists(name: str) -> None:
    path = effective(load_toml(name)).get("dataset_config")
    assert isinstance(path, str), f"{name}: no dataset_config"
    assert (ROOT / path).is_file(), f"{name}: dataset_config {path!r} does not exist (relative to the repository root)"
    assert Path(path).name in DATASET_CONFIGS


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_every_run_has_a_resolution_from_its_dataset_or_training_config(name: str) -> None:
    settings = effective(load_toml(name))
    dataset = toml.load(ROOT / settings["dataset_config"])
    in_dataset = "resolution" in dataset.get("general", {}) or all("resolution" in d for d in dataset["datasets"])
    assert in_dataset or "resolution" in settings, f"{name}: no resolution in it or in its dataset config"


@pytest.mark.parametrize("name", sorted(n for n, s in TRAINING_CONFIGS.items() if s != "train_network.py"))
def test_cached_text_encoder_outputs_come_with_what_the_trainers_assert(name: str) -> None:
    settings = effective(load_toml(name))
    if not (settings.get("cache_text_encoder_outputs") or settings.get("cache_text_encoder_outputs_to_disk")):
        return  # nothing to check: the text encoders run every step
    assert settings.get("network_train_unet_only") is True, f"{name}: caching needs network_train_unet_only"
    dataset = toml.load(ROOT / settings["dataset_config"])
    subsets = [s for d in dataset["datasets"] for s in d["subsets"]]
    layers = [dataset.get("general", {}), *dataset["datasets"], *subsets, settings]
    for option in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step"):
        assert not any(layer.get(option) for layer in layers), f"{name}: {option} cannot be used with cached outputs"


VRAM_QUOTED = re.compile(r"^# aclora vram: peak [\d.]+ GiB, [\d.]+ GiB with the margin$", re.MULTILINE)
# aclora vram counts every family's trainer: no config is left without its line
VRAM_NOT_COUNTED: set[str] = set()
VRAM_NOT_COUNTED_SAID = re.compile(r"^# Memory: `?aclora vram`? does not (?:count|model) ", re.MULTILINE)


@pytest.mark.parametrize("name", sorted(TRAINING_CONFIGS))
def test_every_training_config_quotes_its_aclora_vram_line(name: str) -> None:
    text = (SAMPLES / name).read_text(encoding="utf-8")
    if name in VRAM_NOT_COUNTED:
        assert not VRAM_QUOTED.findall(text) and VRAM_NOT_COUNTED_SAID.search(text), name
        return
    assert len(VRAM_QUOTED.findall(text)) == 1, (
        f"{name}: needs exactly one '# aclora vram: peak X GiB, Y GiB with the margin' line")


@pytest.mark.parametrize("name", sorted(n for n, s in TRAINING_CONFIGS.items() if s in ("flux_train_network.py",
                                                                                        "sd3_train_network.py")))
def test_flux_and_sd3_configs_give_the_trainer_its_text_encoders_and_cache_their_outputs(name: str) -> None:
    settings = effective(load_toml(name))
    needed = ["clip_l", "t5xxl"] + (["ae"] if TRAINING_CONFIGS[name] == "flux_train_network.py" else ["clip_g"])
    if settings.get("model_type") == "chroma":  # no CLIP-L; flux_train_network asserts apply_t5_attn_mask
        needed = ["t5xxl", "ae"]
        assert "clip_l" not in settings and settings.get("apply_t5_attn_mask") is True, name
    assert all(isinstance(settings.get(key), str) for key in needed), f"{name}: needs {needed}"
    assert settings.get("network_train_unet_only") is True and settings.get("cache_text_encoder_outputs") is True
    assert settings.get("mixed_precision") == "bf16"  # fp8_base and these models need bf16


# --- the dataset config ----------------------------------------------------------

# sd-scripts' dataset-config schema: library/config_util.py, ConfigSanitizer, at
# commit 48d368fa557731ad0488c07304dfeba8c07910eb, as train_network.py builds it
# (ConfigSanitizer(True, True, args.masked_loss, True)) for DreamBooth-style
# subsets (image_dir + caption files, no metadata_file) with masked_loss off.
# voluptuous rejects any key not listed.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_pair(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(check(x) for x in v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_float(v: Any) -> bool:
    return isinstance(v, float)


SUBSET_ASCENDABLE = {
    "color_aug": _is_bool,
    "face_crop_aug_range": _is_pair(_is_float),
    "flip_aug": _is_bool,
    "num_repeats": _is_int,
    "random_crop": _is_bool,
    "shuffle_caption": _is_bool,
    "keep_tokens": _is_int,
    "keep_tokens_separator": _is_str,
    "secondary_separator": _is_str,
    "caption_separator": _is_str,
    "enable_wildcard": _is_bool,
    "token_warmup_min": _is_int,
    "token_warmup_step": _is_number,
    "caption_prefix": _is_str,
    "caption_suffix": _is_str,
    "custom_attributes": lambda v: isinstance(v, dict),
    "resize_interpolation": _is_str,
}
DROPOUT_SUBSET_ASCENDABLE = {
    "caption_dropout_every_n_epochs": _is_int,
    "caption_dropout_rate": _is_number,
    "caption_tag_dropout_rate": _is_number,
}
DREAMBOOTH_SUBSET_ASCENDABLE = {"caption_extension": _is_str, "class_tokens": _is_str, "cache_info": _is_bool}
DREAMBOOTH_SUBSET_DISTINCT = {"image_dir": _is_str, "is_reg": _is_bool, "alpha_mask": _is_bool}
DATASET_ASCENDABLE = {
    "batch_size": _is_int,
    "bucket_no_upscale": _is_bool,
    "bucket_reso_steps": _is_int,
    "enable_bucket": _is_bool,
    "max_bucket_reso": _is_int,
    "min_bucket_reso": _is_int,
    "validation_seed": _is_int,
    "validation_split": _is_float,
    "resolution": lambda v: _is_int(v) or _is_pair(_is_int)(v),
    "network_multiplier": _is_float,
    "resize_interpolation": _is_str,
}
GENERAL_SCHEMA = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DREAMBOOTH_SUBSET_ASCENDABLE, **DROPOUT_SUBSET_ASCENDABLE}
DATASET_SCHEMA = {**GENERAL_SCHEMA, "subsets": lambda v: isinstance(v, list)}
SUBSET_SCHEMA = {
    **SUBSET_ASCENDABLE,
    **DREAMBOOTH_SUBSET_DISTINCT,
    **DREAMBOOTH_SUBSET_ASCENDABLE,
    **DROPOUT_SUBSET_ASCENDABLE,
}
SUBSET_REQUIRED = ("image_dir",)


def schema_errors(where: str, table: Any, schema: dict[str, Callable[[Any], bool]]) -> list[str]:
    if not isinstance(table, dict):
        return [f"{where} should be a table"]
    errors = []
    for key, value in table.items():
        if key not in schema:
            hint = difflib.get_close_matches(key, schema, n=1)
            errors.append(f"{where}: unknown key {key!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}")
        elif not schema[key](value):
            errors.append(f"{where}: {key} = {value!r} has the wrong type")
    return errors


def dataset_config_errors(config: dict[str, Any]) -> list[str]:
    """Everything sd-scripts' ConfigSanitizer would reject in a DreamBooth-style dataset config."""
    errors = [f"unknown top-level key {k!r} (allowed: general, datasets)" for k in config if k not in ("general", "datasets")]
    errors += schema_errors("[general]", config.get("general", {}), GENERAL_SCHEMA)
    datasets = config.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        return errors + ["needs at least one [[datasets]]"]
    for i, dataset in enumerate(datasets):
        errors += schema_errors(f"[[datasets]] #{i}", dataset, DATASET_SCHEMA)
        subsets = dataset.get("subsets") if isinstance(dataset, dict) else None
        if not isinstance(subsets, list) or not subsets:
            errors.append(f"[[datasets]] #{i} needs at least one [[datasets.subsets]]")
            continue
        for j, subset in enumerate(subsets):
            where = f"[[datasets.subsets]] #{i}.{j}"
            errors += schema_errors(where, subset, SUBSET_SCHEMA)
            errors += [f"{where}: {key} is required" for key in SUBSET_REQUIRED if key not in subset]
    return errors


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_dataset_config_follows_sd_scripts_dataset_schema(name: str) -> None:
    assert dataset_config_errors(load_toml(name)) == []


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"general": {"keep_token": 1}}, "unknown key 'keep_token'"),
        ({"general": {"enable_bucket": "true"}}, "enable_bucket = 'true' has the wrong type"),
        ({"datasets": [{"subsets": [{"num_repeats": 1}]}]}, "image_dir is required"),
        ({"datasets": [{"resolution": [1024]}]}, "resolution = [1024] has the wrong type"),
    ],
)
def test_the_dataset_schema_check_catches_mistakes(broken: dict[str, Any], message: str) -> None:
    config = load_toml(DATASET_CONFIGS[0])
    for section, value in broken.items():
        if section == "general":
            config["general"] = {**config.get("general", {}), **value}
        else:
            config["datasets"] = value
    assert any(message in e for e in dataset_config_errors(config))


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_dataset_config_keeps_the_trigger_token_first_and_reads_txt_captions(name: str) -> None:
    general = load_toml(name).get("general", {})
    assert general.get("keep_tokens") == 1
    assert general.get("caption_extension") == ".txt"


# --- the kohya_ss GUI preset -------------------------------------------------------

# Field names a kohya_ss GUI LoRA preset may set: the parameters of
# open_configuration in bmaltais/kohya_ss kohya_gui/lora_gui.py at commit
# 45088f04af78e11cec5407ff4652ea3ed2c14422 (less ask_for_file, apply_preset,
# file_path). The GUI ignores any other key and keeps the current value of
# every field a preset leaves out.
GUI_PRESET_FIELDS = frozenset(
    """
    pretrained_model_name_or_path v2 v_parameterization sdxl flux1_checkbox dataset_config
    save_model_as save_precision train_data_dir output_name model_list training_comment logging_dir
    reg_data_dir output_dir max_resolution learning_rate lr_scheduler lr_warmup lr_warmup_steps
    train_batch_size epoch save_every_n_epochs seed cache_latents cache_latents_to_disk
    train_inpainting caption_extension enable_bucket stop_text_encoder_training min_bucket_reso
    max_bucket_reso max_train_epochs max_train_steps lr_scheduler_num_cycles lr_scheduler_power
    optimizer optimizer_args lr_scheduler_args lr_scheduler_type max_grad_norm mixed_precision
    num_cpu_threads_per_process num_processes num_machines multi_gpu gpu_ids main_process_port
    dynamo_backend dynamo_mode dynamo_use_fullgraph dynamo_use_dynamic extra_accelerate_launch_args
    gradient_checkpointing fp8_base fp8_base_unet full_fp16 highvram lowvram xformers
    shuffle_caption save_state save_state_on_train_end resume prior_loss_weight color_aug flip_aug
    masked_loss clip_skip gradient_accumulation_steps mem_eff_attn max_token_length
    max_data_loader_n_workers keep_tokens persistent_data_loader_workers bucket_no_upscale
    random_crop bucket_reso_steps v_pred_like_loss caption_dropout_every_n_epochs
    caption_dropout_rate noise_offset_type noise_offset noise_offset_random_strength
    adaptive_noise_scale multires_noise_iterations multires_noise_discount ip_noise_gamma
    ip_noise_gamma_random_strength additional_parameters loss_type huber_schedule huber_c
    huber_scale vae_batch_size min_snr_gamma save_every_n_steps save_last_n_steps
    save_last_n_steps_state save_last_n_epochs save_last_n_epochs_state skip_cache_check log_with
    wandb_api_key wandb_run_name log_tracker_name log_tracker_config log_config
    scale_v_pred_loss_like_noise_pred full_bf16 min_timestep max_timestep vae weighted_captions
    debiased_estimation_loss sdxl_cache_text_encoder_outputs sdxl_no_half_vae text_encoder_lr
    t5xxl_lr unet_lr network_dim network_weights dim_from_weights network_alpha LoRA_type factor
    bypass_mode dora_wd use_cp use_tucker use_scalar rank_dropout_scale constrain rescaled
    train_norm decompose_both train_on_input conv_dim conv_alpha sample_every_n_steps
    sample_every_n_epochs sample_sampler sample_prompts down_lr_weight mid_lr_weight up_lr_weight
    block_lr_zero_threshold block_dims block_alphas conv_block_dims conv_block_alphas unit
    scale_weight_norms network_dropout rank_dropout module_dropout LyCORIS_preset loraplus_lr_ratio
    loraplus_text_encoder_lr_ratio loraplus_unet_lr_ratio train_lora_ggpo ggpo_sigma ggpo_beta
    huggingface_repo_id huggingface_token huggingface_repo_type huggingface_repo_visibility
    huggingface_path_in_repo save_state_to_huggingface resume_from_huggingface async_upload
    metadata_author metadata_description metadata_license metadata_tags metadata_title
    flux1_cache_text_encoder_outputs flux1_cache_text_encoder_outputs_to_disk model_type ae clip_l
    t5xxl discrete_flow_shift model_prediction_type timestep_sampling split_mode train_blocks
    t5xxl_max_token_length enable_all_linear guidance_scale mem_eff_save apply_t5_attn_mask
    split_qkv train_t5xxl cpu_offload_checkpointing blocks_to_swap single_blocks_to_swap
    double_blocks_to_swap show_timesteps show_timesteps_resolution img_attn_dim img_mlp_dim
    img_mod_dim single_dim txt_attn_dim txt_mlp_dim txt_mod_dim single_mod_dim in_dims
    train_double_block_indices train_single_block_indices sd3_cache_text_encoder_outputs
    sd3_cache_text_encoder_outputs_to_disk sd3_fused_backward_pass clip_g clip_g_dropout_rate
    sd3_clip_l sd3_clip_l_dropout_rate sd3_disable_mmap_load_safetensors sd3_enable_scaled_pos_embed
    logit_mean logit_std mode_scale pos_emb_random_crop_rate save_clip save_t5xxl
    sd3_t5_dropout_rate sd3_t5xxl t5xxl_device t5xxl_dtype sd3_text_encoder_batch_size
    weighting_scheme sd3_checkbox hunyuan_image_cache_text_encoder_outputs
    hunyuan_image_cache_text_encoder_outputs_to_disk hunyuan_text_encoder hunyuan_byt5 hunyuan_vae
    hunyuan_discrete_flow_shift hunyuan_model_prediction_type hunyuan_timestep_sampling
    hunyuan_sigmoid_scale hunyuan_attn_mode hunyuan_split_attn hunyuan_fp8_scaled hunyuan_fp8_vl
    hunyuan_text_encoder_cpu hunyuan_vae_chunk_size hunyuan_image_checkbox
    anima_cache_text_encoder_outputs anima_cache_text_encoder_outputs_to_disk anima_qwen3 anima_vae
    anima_llm_adapter_path anima_t5_tokenizer_path anima_discrete_flow_shift anima_timestep_sampling
    anima_sigmoid_scale anima_qwen3_max_token_length anima_t5_max_token_length anima_attn_mode
    anima_split_attn anima_vae_chunk_size anima_vae_disable_cache
    anima_unsloth_offload_checkpointing anima_qwen_image_vae_2d anima_compile anima_torch_compile
    anima_compile_backend anima_compile_mode anima_compile_dynamic anima_compile_fullgraph
    anima_compile_cache_size_limit anima_checkbox lumina_cache_text_encoder_outputs
    lumina_cache_text_encoder_outputs_to_disk lumina_gemma2 lumina_ae lumina_discrete_flow_shift
    lumina_model_prediction_type lumina_timestep_sampling lumina_sigmoid_scale
    lumina_gemma2_max_token_length lumina_system_prompt lumina_use_flash_attn lumina_use_sage_attn
    lumina_checkbox training_preset
    """.split()
)


def gui_command_line(additional_parameters: str) -> list[str]:
    """The arguments the GUI appends for its "Additional parameters" box: quotes dropped, split on spaces."""
    return additional_parameters.replace('"', "").split()


def settings_from_command_line(argv: list[str]) -> dict[str, Any]:
    """``--name=value`` / ``--name value`` / ``--network_args a=1 b=2`` as argparse would store them."""
    settings: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        assert token.startswith("--"), f"stray argument {token!r} in Additional parameters"
        name, eq, value = token[2:].partition("=")
        values = [value] if eq else []
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        settings[name] = values if name == "network_args" else (values[0] if values else True)
    return settings
