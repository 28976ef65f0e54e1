"""``aclora resize``: the ranks it picks, the file it writes, who reads that file, and what it refuses.

Expectations are computed independently: the update a file encodes is
alpha / down.shape[0] * up @ down (what every consumer adds), its best
rank-k approximation comes from a float64 ``torch.linalg.svd`` of that
explicit matrix, and resize_lora's choices come from running the real
sd-scripts script (its snapshot beside the repository; those tests skip, with
the reason, where it is absent).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aclora_ext import LoRAFileError, create_network, create_network_from_weights
from aclora_ext.harness import tiny
from aclora_ext import functional as F
from aclora_ext.tools.cli import main as cli_main
from aclora_ext.files.storage import model_hashes
from aclora_ext.tools.inspect import read_report
from aclora_ext.tools.resize import Criterion, ResizeError, resize_file, resize_state_dict
from helpers import lora_network, skip_or_fail, text_encoder_of
from test_consumers import assert_diffusers_fuses_it_like_our_merge, tokenizer  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import resize_speed  # noqa: E402  (the resize_lora.py loader and the speed benchmark)

# float32 QR + R x R SVD against a float64 SVD of the explicit update, relative Frobenius
RTOL = 1e-5


# --- building LoRA files with known spectra --------------------------------------------------------------
def planted_factors(out: int, fan_in: int, rank: int, spectrum, gen: torch.Generator):
    """(up (out, R), down (R, fan_in)) whose product has exactly the singular values ``spectrum``
    (len <= R; zero beyond), mixed by a random invertible R x R matrix so that neither factor is in
    SVD form."""
    spectrum = torch.as_tensor(spectrum, dtype=torch.float64)
    k = len(spectrum)
    u = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(fan_in, k, generator=gen, dtype=torch.float64))[0]
    up0 = torch.zeros(out, rank, dtype=torch.float64)
    down0 = torch.zeros(rank, fan_in, dtype=torch.float64)
    up0[:, :k] = u * spectrum.sqrt()
    down0[:k] = (v * spectrum.sqrt()).T
    mix = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))[0] * \
        torch.empty(rank, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    return (up0 @ mix).float(), (torch.linalg.inv(mix) @ down0).float()


def add_module(tensors: dict, name: str, out: int, fan_in: int, rank: int, spectrum, gen, kernel=None,
               alpha=None) -> None:
    """Kohya keys of one module whose update alpha/R * up @ down has singular values ``spectrum``
    (the factors are scaled by R / alpha so that the scaled update is the planted one)."""
    in_channels = fan_in // (kernel * kernel) if kernel else fan_in
    up, down = planted_factors(out, fan_in, rank, spectrum, gen)
    scale = (alpha if alpha is not None else rank) / rank
    up = up / scale
    if kernel:
        down = down.reshape(rank, in_channels, kernel, kernel)
        up = up.reshape(out, rank, 1, 1)
    tensors[f"{name}.lora_down.weight"] = down
    tensors[f"{name}.lora_up.weight"] = up
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))


def file_update(tensors: dict, name: str) -> torch.Tensor:
    """alpha / down.shape[0] * up @ down as an (out, in * kh * kw) float64 matrix (alpha missing: scale 1)."""
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    k = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(k)
    return alpha / k * (up.reshape(up.shape[0], k) @ down.reshape(k, -1))


def best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def modules_of(tensors: dict) -> list[str]:
    return sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})


def ranks_of(tensors: dict) -> dict[str, int]:
    return {k.rsplit(".", 2)[0]: v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight")}


# SD1.x/SD2.x-like names (diffusers U-Net, one text encoder) and SDXL-like names (sd-scripts' U-Net, two
# text encoders); linear, 1x1 conv (SD1's proj_in) and 3x3 conv (LoCon) modules
SD1_MODULES = [  # name, out, fan_in, kernel
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 48, 48, None),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 48, 48, 1),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 48, 48 * 9, 3),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", 64, 160, None),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k", 40, 96, None),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, None),
    ("lora_te_text_model_encoder_layers_3_mlp_fc1", 96, 32, None),
]
SDXL_MODULES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 40, 40, None),
    ("lora_unet_middle_block_1_proj_out", 80, 80, None),
    ("lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_0_proj", 120, 40, None),
    ("lora_te1_text_model_encoder_layers_11_self_attn_out_proj", 32, 32, None),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc2", 48, 96, None),
]


def planted_file(modules, rank: int, planted: dict[str, int], seed: int = 0, strength: float = 1.0,
                 tail: float = 0.0, alphas=None) -> dict:
    """Modules whose updates have ``planted[name]`` components of singular values in [0.3, 1] * strength,
    then ``tail`` (relative) noise components up to the rank. ``alphas``: name -> alpha (None: no alpha key)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict = {}
    for name, out, fan_in, kernel in modules:
        r = planted[name]
        signal = torch.linspace(1.0, 0.3, r) * strength
        noise = torch.full((min(rank, out, fan_in) - r,), tail * strength)
        alpha = rank / 2 if alphas is None else alphas.get(name)
        add_module(tensors, name, out, fan_in, rank, torch.cat([signal, noise]), gen, kernel, alpha)
    return tensors


# --- the math ------------------------------------------------------------------------------------------------
def test_product_core_gives_the_update_spectrum_and_its_best_rank_k_factors():
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(4, 30, 8, generator=gen)
    down = torch.randn(4, 8, 50, generator=gen)
    up[1, :, 5:] = 0  # a module whose update has only 5 components
    s, to_up, to_down = F.product_core(down, up)
    delta = (up @ down).double()
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(delta)[:, :8], rtol=1e-5, atol=1e-4)
    keep = torch.tensor([3, 8, 1, 6])
    new_down, new_up = F.component_factors(down, up, s, to_up, to_down, keep, 8)
    for b, k in enumerate(keep.tolist()):
        assert relative((new_up[b] @ new_down[b]).double(), best_rank_k(delta[b], k)) < RTOL
        # balanced: both factors carry sqrt(s_j) of each component
        torch.testing.assert_close(new_up[b, :, :k].norm(dim=0), s[b, :k].sqrt(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(new_down[b, :k].norm(dim=1), s[b, :k].sqrt(), rtol=1e-4, atol=1e-6)
    assert float(new_up[1, :, 5:].abs().max()) == 0.0  # components below rounding get zero factors
    # any kept set (not only a prefix): the sum of exactly those components of the explicit SVD
    mask = torch.rand(4, 8, generator=gen) < 0.5
    mask[1, 5:] = False
    got_down, got_up = F.component_factors(down, up, s, to_up, to_down, mask, 8)
    for b in range(4):
        u, sv, vh = torch.linalg.svd(delta[b])
        want = sum((sv[j] * u[:, j:j + 1] @ vh[j:j + 1] for j in range(8) if mask[b, j]), torch.zeros_like(delta[b]))
        assert torch.allclose((got_up[b] @ got_down[b]).double(), want, atol=1e-3 * float(sv[0]))


def test_product_core_pads_the_spectrum_when_the_rank_exceeds_a_side_of_the_layer():
    gen = torch.Generator().manual_seed(1)
    up, down = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 8, 20, generator=gen)
    s, to_up, to_down = F.product_core(down, up)
    assert s.shape == (2, 8) and float(s[:, 6:].abs().max()) == 0.0
    new_down, new_up = F.component_factors(down, up, s, to_up, to_down, torch.tensor([8, 8]), 8)
    assert relative((new_up @ new_down).double(), (up @ down).double()) < RTOL


# --- the real resize_lora.py --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resize_lora():
    """sd-scripts' networks/resize_lora.py functions, run from the snapshot's source."""
    if not resize_speed.RESIZE_LORA.is_file():
        skip_or_fail(f"sd-scripts' resize_lora.py is not at {resize_speed.RESIZE_LORA} (set ACLORA_SD_SCRIPTS to a "
                     "checkout): the comparison with the real script cannot run")
    return resize_speed.resize_lora_functions()


@pytest.mark.parametrize("method,targets", [
    ("sv_fro", [0.3, 0.5, 0.9, 0.95, 0.99, 0.999]),
    ("sv_cumulative", [0.2, 0.5, 0.8, 0.9, 0.99, 0.999]),
    ("sv_ratio", [1.5, 2.0, 4.0, 10.0, 100.0, 1e4]),
])
def test_index_functions_pick_what_resize_lora_picks_on_the_full_spectrum(resize_lora, method, targets):
    """resize_lora sees min(out, in) singular values, the nonzero part then zeros; ours gets the nonzero part
    and the full length. Spectra of several shapes (flat, decaying, a single dominant value, all zero, below
    MIN_SV), lengths where the clamp to len - 1 and the cap bite. A target of exactly 1 is left out: whether the
    script's float32 cumulative share reaches 1.0 or stops at 0.99999994 is decided by its own rounding."""
    gen = torch.Generator().manual_seed(0)
    real_index = {"sv_fro": resize_lora.index_sv_fro, "sv_cumulative": resize_lora.index_sv_cumulative,
                  "sv_ratio": resize_lora.index_sv_ratio}[method]
    ours_index = F.RESIZE_LORA_INDEX[method]
    cases = []
    for _ in range(40):
        r = int(torch.randint(1, 12, (1,), generator=gen))
        n = max(2, r + int(torch.randint(0, 6, (1,), generator=gen)))  # the script fails on a 1-wide layer
        s = torch.rand(r, generator=gen).sort(descending=True).values * 10 ** float(torch.randn(1, generator=gen))
        cases.append((s, n))
    cases += [(torch.ones(6), 6), (torch.ones(6), 20), (torch.tensor([5.0, 1e-3, 1e-4]), 40), (torch.zeros(4), 10),
              (torch.tensor([5e-7, 1e-7]), 8), (torch.tensor([3.0, 2.0]), 2)]
    for s, n in cases:
        full = torch.cat([s, torch.zeros(n - len(s))])
        for target in targets:
            for cap in (1, 3, len(s) + 1, n + 4):
                want = resize_lora.rank_resize(full, cap, method, target)["new_rank"]
                got = int(F.resize_lora_rank(s[None].double(), method, target, n, cap)[0])
                assert got == want, (method, target, cap, s.tolist(), n)
            if float(full.sum()) > 0:
                assert int(ours_index(s[None].double(), target, n)[0]) == real_index(full, target), (s.tolist(), n)


def sd1_conv_file(seed: int = 0, rank: int = 8) -> dict:
    """Linear, 1x1 and 3x3 conv modules with decaying spectra of different lengths, a zero module, one whose
    update is below resize_lora's MIN_SV, one whose rank exceeds its layer's width."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict = {}
    for i, (name, out, fan_in, kernel) in enumerate(SD1_MODULES):
        r = 2 + i % (rank - 1)
        spectrum = torch.rand(r, generator=gen).sort(descending=True).values + 0.05
        add_module(tensors, name, out, fan_in, rank, spectrum, gen, kernel, alpha=rank / (1 + i % 3))
    add_module(tensors, "lora_te_text_model_encoder_layers_5_mlp_fc2", 32, 96, rank, [0.0], gen, alpha=4.0)
    add_module(tensors, "lora_te_text_model_encoder_layers_6_mlp_fc2", 32, 96, rank, [4e-7, 1e-7], gen, alpha=rank)
    add_module(tensors, "lora_te_text_model_encoder_layers_7_self_attn_k_proj", 6, 32, rank, [1.0, 0.6, 0.5, 0.2],
               gen, alpha=1.0)
    return tensors


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_fro", 0.99), ("sv_cumulative", 0.7),
                                          ("sv_cumulative", 0.95), ("sv_ratio", 3.0), ("sv_ratio", 50.0)])
@pytest.mark.parametrize("caps", [(8, 8), (5, 3), (16, 16)])
def test_resize_lora_methods_pick_the_ranks_the_real_script_picks_and_the_same_updates(resize_lora, method, param,
                                                                                         caps):
    tensors = sd1_conv_file()
    new_rank, conv_rank = caps
    theirs_sd, theirs = resize_speed.resize_lora_ranks(tensors, new_rank, conv_rank, method, param, resize_lora)
    result = resize_state_dict(tensors, method, param=param, max_rank=new_rank, max_conv_rank=conv_rank)
    assert result.ranks == theirs
    assert ranks_of(result.tensors) == theirs
    assert any(k > 1 for k in theirs.values()) and any(k < 8 for k in theirs.values())
    for name in theirs:
        want = file_update(theirs_sd, name)
        if want.norm() > 1e-5:  # the zero and below-MIN_SV modules hold rounding noise in the script's file
            assert relative(file_update(result.tensors, name), want) < 1e-4, name


# --- the default criterion -----------------------------------------------------------------------------------
def test_one_threshold_for_the_whole_file_keeps_exactly_the_planted_components():
    planted = {name: 1 + i % 6 for i, (name, *_) in enumerate(SD1_MODULES)}
    tensors = planted_file(SD1_MODULES, rank=8, planted=planted, tail=1e-3)
    result = resize_state_dict(tensors)
    assert result.ranks == planted
    assert ranks_of(result.tensors) == planted
    # the threshold is min_importance x the largest singular value of any module's scaled update
    assert result.top == pytest.approx(1.0, rel=1e-4)
    assert result.threshold == pytest.approx(0.01, rel=1e-4)
    for name in planted:
        assert relative(file_update(result.tensors, name), best_rank_k(file_update(tensors, name), planted[name])) < RTOL
        assert result.errors[name] < 1e-2


def test_a_module_that_is_weak_next_to_the_others_keeps_min_rank_whatever_its_own_energy_shares():
    """Within the weak module its 5 components are equal (an energy share would keep all five); against the
    file they are all below one hundredth of the strongest component."""
    gen = torch.Generator().manual_seed(3)
    tensors: dict = {}
    add_module(tensors, "lora_unet_down_blocks_0_attentions_0_proj_in", 48, 48, 8, [1.0, 0.5], gen, alpha=4.0)
    add_module(tensors, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, 8, [0.005] * 5, gen,
               alpha=4.0)
    assert resize_state_dict(tensors).ranks == {"lora_unet_down_blocks_0_attentions_0_proj_in": 2,
                                                "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 1}
    assert resize_state_dict(tensors, min_rank=3).ranks == {"lora_unet_down_blocks_0_attentions_0_proj_in": 3,
                                                            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 3}
    assert resize_state_dict(tensors, min_importance=0.001).ranks == {
        "lora_unet_down_blocks_0_attentions_0_proj_in": 2, "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 5}


def test_max_rank_caps_linear_modules_and_max_conv_rank_the_conv_ones():
    planted = {name: 6 for name, *_ in SD1_MODULES}
    tensors = planted_file(SD1_MODULES, rank=8, planted=planted)
    result = resize_state_dict(tensors, max_rank=4, max_conv_rank=2)
    for name, _, _, kernel in SD1_MODULES:
        assert result.ranks[name] == (2 if kernel else 4)
        assert relative(file_update(result.tensors, name), best_rank_k(file_update(tensors, name), result.ranks[name])) \
            < RTOL


@pytest.mark.parametrize("modules", [SD1_MODULES, SDXL_MODULES], ids=["sd1", "sdxl"])
def test_resizing_at_or_above_every_rank_reproduces_every_update(modules):
    """Full-rank random factors (every component nonzero), ranks 4 and 8, alphas that differ per module and
    are missing on some: with every nonzero component kept nothing changes but the alpha convention."""
    gen = torch.Generator().manual_seed(5)
    tensors: dict = {}
    for i, (name, out, fan_in, kernel) in enumerate(modules):
        rank = 4 if i % 2 else 8
        up = torch.randn(out, rank, generator=gen) * 0.1
        down = torch.randn(rank, fan_in, generator=gen) * 0.1
        tensors[f"{name}.lora_down.weight"] = down.reshape((rank, fan_in // (kernel or 1) ** 2) + ((kernel,) * 2 if kernel else ()))
        tensors[f"{name}.lora_up.weight"] = up.reshape((out, rank) + ((1, 1) if kernel else ()))
        if i % 3:
            tensors[f"{name}.alpha"] = torch.tensor(float(1 + i))
    result = resize_state_dict(tensors, min_importance=0.0, max_rank=8)
    assert result.ranks == ranks_of(tensors)
    for name in ranks_of(tensors):
        assert relative(file_update(result.tensors, name), file_update(tensors, name)) < RTOL, name
        assert result.errors[name] < 1e-6
        assert result.tensors[f"{name}.lora_down.weight"].shape[1:] == tensors[f"{name}.lora_down.weight"].shape[1:]
        assert result.tensors[f"{name}.lora_up.weight"].shape[2:] == tensors[f"{name}.lora_up.weight"].shape[2:]
    alphas = {float(v) for k, v in result.tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == 1  # one alpha per file, the factors absorb the rest (export.py's convention)


def test_the_written_precision_is_the_input_one_or_the_one_asked_for():
    planted = {name: 3 for name, *_ in SDXL_MODULES}
    tensors = {k: v.half() for k, v in planted_file(SDXL_MODULES, rank=8, planted=planted).items()}
    assert {v.dtype for v in resize_state_dict(tensors).tensors.values()} == {torch.float16}
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        result = resize_state_dict(tensors, dtype=dtype)
        assert {v.dtype for v in result.tensors.values()} == {torch_dtype}
        for name in planted:
            assert relative(file_update(result.tensors, name), best_rank_k(file_update(tensors, name), 3)) < 1e-2


def test_weights_that_overflow_the_requested_precision_are_refused():
    planted = {name: 2 for name, *_ in SDXL_MODULES}
    tensors = planted_file(SDXL_MODULES, rank=8, planted=planted, strength=1e12)
    with pytest.raises(LoRAFileError, match="do not fit in float16.*bf16 or fp32"):
        resize_state_dict(tensors, dtype="fp16")


# --- the file -------------------------------------------------------------------------------------------------
SS_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
               "ss_base_model_version": "sd_v1", "ss_training_comment": "my style", "ss_num_epochs": "10",
               "ss_tag_frequency": json.dumps({"10_style": {"style": 15}}), "modelspec.title": "my style",
               "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "00000000"}


@pytest.fixture
def sd1_file(tmp_path):
    planted = {name: 1 + i % 6 for i, (name, *_) in enumerate(SD1_MODULES)}
    path = tmp_path / "in.safetensors"
    save_file(planted_file(SD1_MODULES, rank=8, planted=planted, tail=1e-3), str(path), SS_METADATA)
    return path, planted


def read_meta(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def test_metadata_is_kept_and_updated_the_way_resize_lora_does_with_our_rank_metadata(sd1_file, tmp_path):
    source, planted = sd1_file
    out = tmp_path / "out.safetensors"
    resize_file(str(source), str(out))
    meta, tensors = read_meta(out), load_file(str(out))
    for key in ("ss_network_module", "ss_base_model_version", "ss_num_epochs", "ss_tag_frequency", "modelspec.title"):
        assert meta[key] == SS_METADATA[key]
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == "Dynamic resize with importance: 0.01 from 8; my style"
    # the sshs hashes are those of the file as written (computed with the ss_* metadata only)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(tensors, meta)
    assert meta["sshs_model_hash"] != SS_METADATA["sshs_model_hash"]
    assert json.loads(meta["aclora_ranks"]) == ranks_of(tensors) == planted
    record = json.loads(meta["aclora_resize"])
    assert record["criterion"] == "importance" and record["param"] == 0.01 and record["min_rank"] == 1
    assert record["source_ranks"] == {"min": 8, "median": 8, "max": 8}
    assert float(meta["aclora_truncation_error_max"]) < 1e-2
    report = read_report(str(out))  # what `aclora inspect` shows
    assert report.max_rank == 8 and report.conv_max_rank == 8
    assert {m.name: m.rank for m in report.modules} == planted
    assert report.truncation_error_max == pytest.approx(float(meta["aclora_truncation_error_max"]))


def test_an_aclora_file_keeps_its_training_history_and_gets_new_ranks(tmp_path, sd1_models, planted_network):
    network, _ = planted_network(sd1_models, max_rank=8, alpha=4.0)
    source, out = tmp_path / "ours.safetensors", tmp_path / "out.safetensors"
    network.save_weights(str(source), None, {"ss_network_module": "networks.aclora"})
    before = read_meta(source)
    result = resize_file(str(source), str(out), min_importance=0.2)
    meta = read_meta(out)
    assert meta["aclora_history"] == before["aclora_history"] and meta["aclora_modules"] == before["aclora_modules"]
    assert json.loads(meta["aclora_ranks"]) == ranks_of(load_file(str(out))) == result.ranks
    assert meta["aclora_max_rank"] == before["aclora_max_rank"] == "8"
    assert read_report(str(out)).history  # the RESTART history is still shown


def test_the_cli_prints_the_rank_report_and_the_error_per_block(sd1_file, tmp_path, capsys):
    source, planted = sd1_file
    out = tmp_path / "out.safetensors"
    assert cli_main(["resize", str(source), str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""  # no progress bar off a terminal
    assert f"resized {source} -> {out}" in printed.out
    assert "ranks min/median/max 8/8/8 -> 1/3/6" in printed.out
    assert "rank min" in printed.out and "at max rank" in printed.out  # aclora inspect's table
    table = printed.out.split("relative error of the resized updates per block")[1].splitlines()[2:]
    blocks = {line.split()[-6]: line.split() for line in table if line.strip()}
    assert set(blocks) == {"down_blocks.0", "mid_block", "up_blocks.1", "te"}
    assert blocks["te"][-5:-2] == ["2", "8/8/8", "1/3.5/6"]  # modules, ranks before, ranks after
    assert all(0 < float(row[-2]) < 1e-2 for row in blocks.values())  # tail noise of 1e-3 dropped


def test_the_cli_json_gives_every_module_and_block(sd1_file, tmp_path, capsys):
    source, planted = sd1_file
    assert cli_main(["resize", str(source), str(tmp_path / "out.safetensors"), "--json", "--criterion", "sv_fro",
                     "--param", "0.9"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["name"]: m["rank_before"] for m in data["modules"]} == {n: 8 for n in planted}
    assert data["criterion"]["name"] == "sv_fro" and data["criterion"]["param"] == 0.9
    assert {b["block"] for b in data["blocks"]} >= {"down_blocks.0", "mid_block", "te"}


def test_the_progress_bar_goes_to_stderr_when_asked(sd1_file, tmp_path, capsys):
    source, _ = sd1_file
    assert cli_main(["resize", str(source), str(tmp_path / "out.safetensors"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "aclora resize: [" in err and "100%" in err and err.endswith("\n")


# --- who reads the file -----------------------------------------------------------------------------------
def tiny_file(models, tmp_path, conv: bool) -> tuple[Path, dict]:
    """A kohya LoRA for the tiny models (names and shapes from a network applied to them): planted ranks,
    per-module alphas as resize_lora writes them (alpha = k * alpha / R), tail noise."""
    extra = {"conv_dim": "8", "conv_alpha": "2"} if conv else {}
    network = lora_network(models, rank=8, alpha=4.0, restart_mode="off", **extra)
    gen = torch.Generator().manual_seed(0)
    tensors, planted = {}, {}
    for i, m in enumerate(network.loras):
        fan_in = m.lora_down.weight[0].numel()
        r = 1 + i % min(6, m.out_dim, fan_in)
        spectrum = torch.cat([torch.linspace(0.1, 0.04, r), torch.full((min(8, m.out_dim, fan_in) - r,), 1e-5)])
        kernel = m.lora_down.weight.shape[2] if m.lora_down.weight.dim() == 4 else None
        add_module(tensors, m.lora_name, m.out_dim, fan_in, 8, spectrum, gen, kernel, alpha=float(1 + i % 4))
        planted[m.lora_name] = r
    path = tmp_path / "input.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.lora"})
    return path, planted


def test_diffusers_fuses_a_resized_sd1_file_like_our_merge(tmp_path, tokenizer):
    source, planted = tiny_file(tiny.sd1_models(seed=0), tmp_path, conv=True)
    out = tmp_path / "resized.safetensors"
    result = resize_file(str(source), str(out))
    assert result.ranks == planted and len(set(planted.values())) > 1

    assert_diffusers_fuses_it_like_our_merge(out, False, tokenizer)


def test_diffusers_fuses_a_resized_sdxl_file_like_our_merge(tmp_path, tokenizer):
    source, planted = tiny_file(tiny.sdxl_models(seed=0), tmp_path, conv=False)
    out = tmp_path / "resized.safetensors"
    assert resize_file(str(source), str(out)).ranks == planted

    assert_diffusers_fuses_it_like_our_merge(out, True, tokenizer)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_networks_aclora_loads_a_resized_file_as_network_weights(family, tmp_path):
    """--dim_from_weights (create_network_from_weights) and --network_weights into a network at the
    original rank (load_weights pads): every module adds exactly the file's update."""
    make = tiny.sd1_models if family == "sd1" else tiny.sdxl_models
    source, planted = tiny_file(make(seed=0), tmp_path, conv=family == "sd1")
    out = tmp_path / "resized.safetensors"
    resize_file(str(source), str(out))
    tensors = load_file(str(out))
    input_tensors = load_file(str(source))

    models = make(seed=0)
    network, _ = create_network_from_weights(1.0, str(out), None, text_encoder_of(models), models["unet"])
    network.apply_to(text_encoder_of(models), models["unet"], True, True)
    network.load_weights(str(out))
    assert {m.lora_name: m.rank for m in network.loras} == planted

    models = make(seed=0)
    padded = create_network(1.0, 8, 4.0, None, text_encoder_of(models), models["unet"],
                            **({"conv_dim": "8", "conv_alpha": "2"} if family == "sd1" else {}))
    padded.apply_to(text_encoder_of(models), models["unet"], True, True)
    padded.load_weights(str(out))
    for net in (network, padded):
        for m in net.loras:
            got = m.delta_weight(torch.float64).detach().reshape(m.out_dim, -1)
            assert relative(got, file_update(tensors, m.lora_name)) < RTOL, m.lora_name
            want = best_rank_k(file_update(input_tensors, m.lora_name), planted[m.lora_name])
            assert relative(got, want) < RTOL, m.lora_name


# --- what it refuses ---------------------------------------------------------------------------------------
def _good() -> dict:
    return planted_file(SD1_MODULES[:2], rank=4, planted={n: 2 for n, *_ in SD1_MODULES[:2]})


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _with(**extra) -> dict:
    tensors = _good()
    tensors.update({f"{Q}.{k}": v for k, v in extra.items()})
    return tensors


def _without(part: str) -> dict:
    tensors = _good()
    del tensors[f"{Q}.{part}"]
    return tensors


def _nan(part: str) -> dict:
    tensors = _good()
    tensors[f"{Q}.{part}"] = tensors[f"{Q}.{part}"].clone()
    tensors[f"{Q}.{part}"].view(-1)[1] = float("nan")
    return tensors


def _lycoris(keys: dict) -> dict:
    return {f"{Q}.{k}": v for k, v in keys.items()} | {f"{Q}.alpha": torch.tensor(4.0)}


BAD_FILES = {
    "LoHa": (lambda: _lycoris({"hada_w1_a": torch.randn(48, 4), "hada_w1_b": torch.randn(4, 48),
                               "hada_w2_a": torch.randn(48, 4), "hada_w2_b": torch.randn(4, 48)}), "LoHa"),
    "LoKr": (lambda: _lycoris({"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(12, 12)}), "LoKr"),
    "LoCon Tucker": (lambda: _with(**{"lora_mid.weight": torch.randn(4, 4, 3, 3)}), "Tucker"),
    "OFT": (lambda: _lycoris({"oft_blocks": torch.randn(4, 12, 12)}), "OFT"),
    "GLoRA": (lambda: _lycoris({"a1.weight": torch.randn(4, 48), "a2.weight": torch.randn(48, 4),
                                "b1.weight": torch.randn(4, 48), "b2.weight": torch.randn(48, 4)}), "GLoRA"),
    "full diff": (lambda: _lycoris({"diff": torch.randn(48, 48)}), "diff"),
    "DoRA": (lambda: _with(dora_scale=torch.ones(1, 48)), "DoRA"),
    "peft format": (lambda: {"unet.down.0.to_q.lora_A.weight": torch.randn(4, 48),
                             "unet.down.0.to_q.lora_B.weight": torch.randn(48, 4)}, "lora_A/lora_B"),
    "a checkpoint": (lambda: {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)},
                     "not a LoRA file.*model.diffusion_model"),
    "no lora_up": (lambda: _without("lora_up.weight"), f"{Q} has lora_down but no lora_up"),
    "no lora_down": (lambda: _without("lora_down.weight"), f"{Q} has lora_up but no lora_down"),
    "NaN lora_down": (lambda: _nan("lora_down.weight"), f"NaN/Inf weights in 1 module.*{Q}"),
    "NaN lora_up": (lambda: _nan("lora_up.weight"), f"NaN/Inf weights in 1 module.*{Q}"),
    "NaN alpha": (lambda: _with(alpha=torch.tensor(float("nan"))), f"NaN/Inf weights: module {Q} has alpha nan"),
    "alpha 0": (lambda: _with(alpha=torch.tensor(0.0)), f"{Q} has alpha 0"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_file_it_cannot_handle_gets_one_line_naming_why_and_nothing_is_written(case, tmp_path, capsys):
    make, reason = BAD_FILES[case]
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(make(), str(source))
    out.write_bytes(b"the previous file")
    assert cli_main(["resize", str(source), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aclora resize: error: ")
    assert re.search(reason, err), err
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


def test_a_file_that_is_not_safetensors_or_is_truncated_is_refused(tmp_path, capsys):
    garbage, truncated = tmp_path / "garbage.safetensors", tmp_path / "truncated.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    save_file(_good(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    for path, reason in ((garbage, "not a safetensors file"), (truncated, "truncated file")):
        assert cli_main(["resize", str(path), str(tmp_path / "out.safetensors")]) == 1
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("args,reason", [
    (["--criterion", "sv_fro"], "criterion sv_fro needs param"),
    (["--criterion", "sv_fro", "--param", "1.5"], "param=1.5 is not valid for sv_fro"),
    (["--criterion", "sv_ratio", "--param", "0"], "param=0.0 is not valid for sv_ratio"),
    (["--param", "0.9"], "param=0.9 is for the resize_lora criteria"),
    (["--min-importance", "1"], "min_importance=1.0 is not valid; allowed: a number >= 0 and < 1"),
    (["--max-rank", "0"], "max_rank=0 is not valid; allowed: an integer >= 1"),
    (["--min-rank", "4", "--max-rank", "2"], "min_rank=4 is larger than max_rank=2"),
    (["--criterion", "sv_cumulative", "--param", "0.5", "--min-rank", "2"], "min_rank=2 is for criterion importance"),
])
def test_bad_parameters_are_named_with_their_value_and_what_is_allowed(args, reason, tmp_path, capsys):
    source = tmp_path / "in.safetensors"
    save_file(_good(), str(source))
    assert cli_main(["resize", str(source), str(tmp_path / "out.safetensors"), *args]) == 1
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # runs on a GPU machine too
    source = tmp_path / "in.safetensors"
    save_file(_good(), str(source))
    assert cli_main(["resize", str(source), str(tmp_path / "out.safetensors"), "--device", "cuda"]) == 1
    assert "no CUDA device is available" in capsys.readouterr().err


def test_an_existing_output_is_only_replaced_by_a_complete_file(sd1_file, tmp_path, monkeypatch, capsys):
    source, _ = sd1_file
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous file")

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    assert cli_main(["resize", str(source), str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]
    monkeypatch.undo()
    assert cli_main(["resize", str(source), str(out)]) == 0
    assert ranks_of(load_file(str(out)))


def test_the_api_refuses_an_output_that_is_not_safetensors(sd1_file, tmp_path):
    source, _ = sd1_file
    with pytest.raises(ResizeError, match="not a .safetensors path"):
        resize_file(str(source), str(tmp_path / "out.ckpt"))
    with pytest.raises(ResizeError, match="criterion 'svd' is not known; allowed: importance, sv_fro"):
        Criterion("svd")


# --- the real script, end to end ------------------------------------------------------------------------
@pytest.mark.sd_scripts  # runs sd-scripts' code, which imports its own requirements (cv2, ...)
def test_the_real_resize_lora_script_writes_the_ranks_and_training_comment_we_write(tmp_path):
    """sd-scripts' resize_lora.py run as a program (it needs sd-scripts' own dependencies; skipped where it
    cannot start) on the same file: per-module ranks and the training comment's form agree."""
    script = resize_speed.RESIZE_LORA
    if not script.is_file():
        skip_or_fail(f"sd-scripts' resize_lora.py is not at {script}")
    source = tmp_path / "in.safetensors"
    save_file(sd1_conv_file(), str(source), {"ss_training_comment": "my style", "ss_network_dim": "8"})
    theirs, ours = tmp_path / "theirs.safetensors", tmp_path / "ours.safetensors"
    stand_ins = ROOT / "tests" / "sd_scripts_stand_ins"  # a torchvision stand-in, where torchvision does not load
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    paths = ([str(stand_ins)] if stand_ins.is_dir() else []) + [str(script.parents[1])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    done = subprocess.run([sys.executable, str(script), "--model", str(source), "--save_to", str(theirs),
                           "--new_rank", "6", "--new_conv_rank", "3", "--dynamic_method", "sv_fro",
                           "--dynamic_param", "0.9"], cwd=script.parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 and ("ModuleNotFoundError" in done.stderr or "ImportError" in done.stderr):
        skip_or_fail("resize_lora.py cannot start in this environment (sd-scripts' dependencies): "
                     + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli_main(["resize", str(source), str(ours), "--criterion", "sv_fro", "--param", "0.9", "--max-rank", "6",
                     "--max-conv-rank", "3"]) == 0
    assert ranks_of(load_file(str(ours))) == ranks_of(load_file(str(theirs)))
    assert read_meta(ours)["ss_training_comment"] == read_meta(theirs)["ss_training_comment"]
    assert read_meta(ours)["ss_network_dim"] == read_meta(theirs)["ss_network_dim"] == "Dynamic"


# --- the benchmark and CUDA ------------------------------------------------------------------------------------
def test_the_speed_benchmark_times_both_tools_on_the_same_file_and_they_pick_the_same_ranks(tmp_path):
    out = tmp_path / "resize_speed.json"
    result = resize_speed.main(["--smoke", "--threads", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["machine"]["cpu_cores"] >= 1
    rows = {row["what"]: row for row in result["rows"]}
    ours = [name for name in rows if "(ours)" in name]
    assert len(ours) == 3 and all(rows[name]["seconds"] > 0 for name in ours)
    if resize_speed.RESIZE_LORA.is_file():
        real = rows[f"resize_lora.py, {resize_speed.METHOD} {resize_speed.PARAM}"]
        assert real["speedup"] == pytest.approx(1.0)
        basis = "cpu_seconds" if result["ratio_basis"] == "cpu" else "seconds"
        assert rows[ours[0]]["speedup"] == pytest.approx(real[basis] / rows[ours[0]][basis], rel=1e-6)
        info = result["ranks"][0]["resize_lora"]
        assert info["same_ranks"] == info["modules_run"] == len(resize_speed.SMOKE_SHAPES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resizing_on_cuda_gives_the_cpu_result():
    planted = {name: 1 + i % 6 for i, (name, *_) in enumerate(SD1_MODULES)}
    tensors = planted_file(SD1_MODULES, rank=8, planted=planted, tail=1e-3)
    cpu, cuda = resize_state_dict(tensors), resize_state_dict(tensors, device="cuda")
    assert cuda.ranks == cpu.ranks == planted
    for name in planted:
        assert relative(file_update(cuda.tensors, name), file_update(cpu.tensors, name)) < 1e-4
    assert all(t.device.type == "cpu" for t in cuda.tensors.values())



# --- resize_lora.py's rank rules, batched, against the rules written out on the full spectrum -----------------------
def _kohya_rank(spectrum: list[float], method: str, target: float, size: int, max_rank: int) -> int:
    """The rule resize_lora.py states, on the full min(out, in) spectrum (zeros past the computed part):
    searchsorted (left) of the cumulative shares, or the count above the largest / target; +1, clamped
    to [1, size - 1]; the rank is that + 1, at most max_rank, and 1 when the largest is at most MIN_SV."""
    import bisect

    full = [float(v) for v in spectrum] + [0.0] * (size - len(spectrum))
    if method == "sv_ratio":
        index = sum(1 for v in full if v > full[0] / target)
    else:
        weights = [v * v for v in full] if method == "sv_fro" else full
        total, running, shares = sum(weights), 0.0, []
        for v in weights:
            running += v
            shares.append(running / total)
        index = bisect.bisect_left(shares, target**2 if method == "sv_fro" else target) + 1
    index = max(1, min(index, size - 1))
    return 1 if full[0] <= F.RESIZE_LORA_MIN_SV else min(index + 1, max_rank)


@pytest.mark.parametrize("method, target", [("sv_cumulative", 0.5), ("sv_cumulative", 0.9), ("sv_fro", 0.5 ** 0.5),
                                            ("sv_fro", 0.95), ("sv_ratio", 4.0), ("sv_cumulative", 1.0)])
def test_the_batched_resize_rules_give_each_module_the_rank_of_resize_lora_s_rule(method, target):
    """Exact shares (equal singular values: cumulative shares 1/4, 1/2, ... hit the targets exactly), spectra whose
    last share reaches the target only past the computed part, a module of one component, one at MIN_SV, and
    one below it, batched; each module's rank against the rule computed on its own full spectrum."""
    spectra = [[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0], [1e-6, 5e-7, 0.0, 0.0],
               [9e-7, 1e-7, 0.0, 0.0], [3.0, 2.9, 0.1, 0.05], [2.0, 1.0, 1.0, 0.5]]
    sizes = [4, 12, 6, 8, 8, 5, 3]
    s = torch.tensor(spectra, dtype=torch.float64)
    for max_rank in (16, 2):
        got = F.resize_lora_rank(s, method, target, torch.tensor(sizes), max_rank).tolist()
        assert got == [_kohya_rank(sp, method, target, n, max_rank) for sp, n in zip(spectra, sizes)], max_rank
