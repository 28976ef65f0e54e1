"""HunyuanImage-2.1 and Chroma files read by name and metadata: which family a file is for (a HunyuanImage
file is not a FLUX.1 file, though both have double and single blocks), what ``aclora inspect`` says of it,
and ``aclora resize`` on it. The names are lora_hunyuan_image's (tests/test_hunyuan_image_sd_scripts.py
checks them against sd-scripts' own module).
"""

from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_report_dit import blocks_of, flux_names, run, write
from test_resize import ranks_of
from test_resize_dit import dit_file

from aclora_ext.families import model_family
from aclora_ext.tools.cli import main as cli_main
from aclora_ext.tools.dit_names import dit_model, family_from_names
from aclora_ext.tools.inspect import read_report
from aclora_ext.tools.resize import resize_file

DOUBLE_LAYERS = ("mod_linear", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")
SINGLE_LAYERS = ("linear1", "linear2", "modulation_linear")
HUNYUAN_META = {"ss_base_model_version": "hunyuan-image-2.1", "modelspec.architecture": "hunyuan-image-2.1/lora",
                "ss_network_module": "networks.lora_hunyuan_image", "ss_network_dim": "8", "ss_network_alpha": "4",
                "ss_model_prediction_type": "raw", "ss_discrete_flow_shift": "5.0"}


def hunyuan_names(double=(0, 1, 19), single=(0, 39)) -> list[str]:
    return [f"lora_unet_double_blocks_{i}_{s}_{layer}" for i in double for s in ("img", "txt")
            for layer in DOUBLE_LAYERS] + [f"lora_unet_single_blocks_{i}_{layer}" for i in single
                                           for layer in SINGLE_LAYERS]


# HunyuanImage-2.1's layer aspects (hidden 3584: qkv 3:1, mlp 4:1, mod 6:1, linear1 7:1, linear2 1:5), 1/32 size
HUNYUAN_MODULES = [
    ("lora_unet_double_blocks_0_img_attn_qkv", 336, 112),
    ("lora_unet_double_blocks_0_img_mod_linear", 672, 112),
    ("lora_unet_double_blocks_3_txt_mlp_fc1", 448, 112),
    ("lora_unet_double_blocks_19_txt_mlp_fc2", 112, 448),
    ("lora_unet_single_blocks_0_linear1", 784, 112),
    ("lora_unet_single_blocks_20_linear2", 112, 560),
    ("lora_unet_single_blocks_39_modulation_linear", 336, 112),
]


def test_a_hunyuan_image_file_is_told_from_a_flux_file_by_its_layer_names():
    assert model_family(hunyuan_names()) == "HunyuanImage-2.1"
    assert model_family(flux_names()) == "FLUX.1"
    # a FLUX.1 file with CLIP-L (whose mlp_fc1 is not HunyuanImage's) is still FLUX.1
    assert model_family([n for n in flux_names() if "mlp" not in n or n.startswith("lora_te")]) == "FLUX.1"
    # tensor keys, as check_model_family sees a loaded file
    assert model_family([f"{n}.lora_down.weight" for n in hunyuan_names(single=())]) == "HunyuanImage-2.1"
    # layers both have (attention, linear1/linear2): the names do not tell
    both = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"]
    assert model_family(both) is None
    assert family_from_names(hunyuan_names()) == "HunyuanImage-2.1"


def test_the_metadata_names_hunyuan_image_and_chroma_where_the_names_leave_it_open():
    both = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"]
    assert dit_model(hunyuan_names(), HUNYUAN_META) == "HunyuanImage-2.1"
    assert dit_model(hunyuan_names(), {}) == "HunyuanImage-2.1"
    assert dit_model(both, HUNYUAN_META) == "HunyuanImage-2.1"
    assert dit_model(both, {"aclora_model": "HunyuanImage-2.1"}) == "HunyuanImage-2.1"
    assert dit_model(both, {}) == "FLUX.1"
    assert dit_model(flux_names(), HUNYUAN_META) == "FLUX.1"  # FLUX.1's own layer names win over the metadata
    assert dit_model(hunyuan_names(), {"modelspec.architecture": "flux-1-dev/lora"}) == "HunyuanImage-2.1"
    # sd-scripts' flux_train_network.py --model_type chroma writes these; our file adds aclora_model
    chroma = [n for n in flux_names(te=False) if "mod_lin" not in n and "modulation" not in n]
    assert dit_model(chroma, {"ss_base_model_version": "chroma", "modelspec.architecture": "chroma/lora"}) == "Chroma"
    assert dit_model(chroma, {"aclora_model": "Chroma"}) == "Chroma"


def test_a_hunyuan_image_file_is_reported_by_double_then_single_blocks(capsys, tmp_path):
    path = tmp_path / "hunyuan.safetensors"
    write(path, hunyuan_names(), HUNYUAN_META)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 0 and err == ""
    assert "kohya LoRA file for HunyuanImage-2.1" in out
    assert blocks_of(out) == [("double blocks", "double_blocks.0"), ("double blocks", "double_blocks.1"),
                              ("double blocks", "double_blocks.19"), ("single blocks", "single_blocks.0"),
                              ("single blocks", "single_blocks.39")]
    report = json.loads(run(capsys, "inspect", str(path), "--json")[1])
    assert report["model"] == "HunyuanImage-2.1"
    assert {b["block"]: b["modules"] for b in report["blocks"]} == {
        "double_blocks.0": 10, "double_blocks.1": 10, "double_blocks.19": 10, "single_blocks.0": 3,
        "single_blocks.39": 3}


def test_a_resized_hunyuan_image_file_keeps_its_metadata_and_reports_as_hunyuan_image(tmp_path, capsys):
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = dit_file(HUNYUAN_MODULES)
    save_file(tensors, str(source), HUNYUAN_META)
    assert cli_main(["resize", str(source), str(target), "--min-importance", "0.2"]) == 0
    out = capsys.readouterr().out
    with safe_open(str(target), "pt") as f:
        written = f.metadata()
    for key in ("ss_base_model_version", "modelspec.architecture", "ss_network_module", "ss_discrete_flow_shift"):
        assert written[key] == HUNYUAN_META[key], key
    report = read_report(str(target))
    assert report.model == "HunyuanImage-2.1" and "file for HunyuanImage-2.1" in out
    assert {m.part for m in report.modules} == {"double", "single"}
    resized = ranks_of(load_file(str(target)))
    assert set(resized) == {n for n, _, _ in HUNYUAN_MODULES}
    assert resized != ranks_of(tensors) and len(set(resized.values())) > 1
    assert resized == resize_file(source, tmp_path / "again.safetensors", min_importance=0.2).ranks


# aclora vram counts HunyuanImage-2.1 runs: tests/test_vram_hunyuan_image.py (the sample config's figure included)
