"""The variable-rank export: what ``save_weights`` writes, and how files come back in.

Every expectation is computed independently here: the best rank-k
approximation from ``torch.linalg.svd`` of the explicit update of each module,
the update a file encodes as alpha / down.shape[0] * up @ down.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from aclora_ext import LoRAFileError, create_network, create_network_from_weights
from aclora_ext.harness import tiny

MAX_RANK = 8
CONV_RANK = 4
# float32 QR + R x R SVD against a float64 SVD of the full update, relative Frobenius.
EXPORT_RTOL = 1e-4


def module_kind(m) -> str:
    shape = tuple(m.lora_down.weight.shape[2:])
    return "linear" if not shape else "conv1x1" if shape == (1, 1) else "conv3x3"


def file_update(tensors: dict, name: str) -> torch.Tensor:
    """What every consumer adds to the layer: alpha / rank * up @ down, as an (out, in * kh * kw) matrix."""
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    k = down.shape[0]
    return float(tensors[f"{name}.alpha"]) / k * (up.reshape(up.shape[0], k) @ down.reshape(k, -1))


def training_update(m) -> torch.Tensor:
    return m.delta_weight(torch.float64).detach().reshape(m.out_dim, -1)


def best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def saved(tmp_path, sd1_models, planted_network):
    """An SD1.x-like network with linear, 1x1 and 3x3 conv modules of planted ranks, RESTARTed and saved."""
    network, planted = planted_network(sd1_models, max_rank=MAX_RANK, alpha=4.0, conv_dim=str(CONV_RANK),
                                       conv_alpha="1")
    path = tmp_path / "style.safetensors"
    assert network.save_weights(str(path), None, {"ss_network_module": "networks.aclora", "ss_num_epochs": "10"})
    return network, planted, path


def test_each_module_is_the_best_rank_k_approximation_of_its_training_update(saved):
    network, _, path = saved
    tensors = load_file(path)
    kinds = set()
    for m in network.loras:
        k = network.ranks()[m.lora_name]
        expected = best_rank_k(training_update(m), k)
        assert relative(file_update(tensors, m.lora_name), expected) < EXPORT_RTOL, m.lora_name
        kinds.add(module_kind(m))
    assert kinds == {"linear", "conv1x1", "conv3x3"}


def test_file_ranks_are_the_network_signal_ranks_and_differ(saved):
    network, planted, path = saved
    tensors = load_file(path)
    file_ranks = {m.lora_name: tensors[f"{m.lora_name}.lora_down.weight"].shape[0] for m in network.loras}
    assert file_ranks == network.ranks() == planted
    assert len(set(file_ranks.values())) > 1
    for m in network.loras:
        k = file_ranks[m.lora_name]
        assert tensors[f"{m.lora_name}.lora_up.weight"].shape[:2] == (m.out_dim, k)
        assert tensors[f"{m.lora_name}.lora_down.weight"].shape[1:] == m.lora_down.weight.shape[1:]


def test_every_module_carries_the_same_alpha(saved):
    """diffusers scales modules whose alpha differs from the file's most common one wrongly (see export.py),
    so the per-module factor lives in the factors and alpha is one number: the training alpha."""
    network, _, path = saved
    tensors = load_file(path)
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {4.0}
    assert len([k for k in tensors if k.endswith(".alpha")]) == len(network.loras)


def test_metadata_explains_the_file(saved):
    network, _, path = saved
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "networks.aclora" and meta["ss_num_epochs"] == "10"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert json.loads(meta["aclora_ranks"]) == network.ranks()
    assert json.loads(meta["aclora_modules"]) == [m.lora_name for m in network.loras]
    history = json.loads(meta["aclora_history"])
    assert len(history) == int(meta["aclora_restarts"]) == 1
    assert history[0]["ranks"] == [network.ranks()[m.lora_name] for m in network.loras]
    assert float(meta["aclora_last_p"]) == pytest.approx(0.9)
    assert meta["aclora_mode"] == "product"
    assert (meta["aclora_max_rank"], meta["aclora_conv_max_rank"]) == (str(MAX_RANK), str(CONV_RANK))


def test_a_file_cut_to_one_rank_below_the_maximum_is_dynamic_not_the_training_dim(tmp_path, sd1_models,
                                                                                   planted_network):
    """A p ~ 0 RESTART (a clamped high-loss p) leaves every module at min_rank: one rank, but not
    sd-scripts' --network_dim, so its ss_network_dim/alpha must not survive; an untruncated file keeps them."""
    trained_dims = {"ss_network_dim": str(MAX_RANK), "ss_network_alpha": "4.0"}
    cut, _ = planted_network(sd1_models, max_rank=MAX_RANK, ps=(1e-9,))
    cut_path = tmp_path / "cut.safetensors"
    assert cut.save_weights(str(cut_path), None, trained_dims)
    assert set(json.loads(safe_open(str(cut_path), "pt").metadata()["aclora_ranks"]).values()) == {1}
    plain, _ = planted_network(sd1_models, max_rank=MAX_RANK, ps=(), restart_mode="off")
    plain_path = tmp_path / "plain.safetensors"
    assert plain.save_weights(str(plain_path), None, trained_dims)
    for path, (dim, alpha) in [(cut_path, ("Dynamic", "Dynamic")), (plain_path, (str(MAX_RANK), "4.0"))]:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (dim, alpha), path.name


def test_truncation_error_in_metadata_matches_an_independent_svd(saved):
    network, _, path = saved
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    errors = []
    for m in network.loras:
        delta = training_update(m)
        errors.append(relative(best_rank_k(delta, network.ranks()[m.lora_name]), delta))
    assert max(errors) > 1e-3  # the "training" after the RESTART left something to truncate
    assert float(meta["aclora_truncation_error_mean"]) == pytest.approx(sum(errors) / len(errors), rel=1e-3)
    assert float(meta["aclora_truncation_error_max"]) == pytest.approx(max(errors), rel=1e-3)


def test_sshs_hashes_are_those_of_the_file_as_written(saved):
    """sd-scripts hashes the file body (tensors) and the 64 KiB at 1 MiB of the file saved with ss_* metadata only."""
    _, _, path = saved
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header_len:]).hexdigest()
    ss_only = save(load_file(path), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_a_saved_file_rebuilds_a_network_that_matches_merging_it(saved):
    network, _, path = saved
    conditioning = torch.randn(1, 8, tiny.TINY_TE1_HIDDEN, generator=torch.Generator().manual_seed(3))
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    input_ids = torch.tensor([[tiny.BOS_TOKEN_ID, tiny.TRIGGER_TOKEN_ID, 40, tiny.EOS_TOKEN_ID]])

    def outputs(models):
        with torch.no_grad():
            return (models["unet"](sample, 10, encoder_hidden_states=conditioning).sample,
                    models["text_encoder"](input_ids).last_hidden_state)

    def rebuilt(load):
        """Fresh models with a network built from the file (sd-scripts' --dim_from_weights), weights loaded."""
        models = tiny.sd1_models(seed=0)
        rebuilt, weights = create_network_from_weights(1.0, str(path), None, models["text_encoder"], models["unet"])
        rebuilt.apply_to(models["text_encoder"], models["unet"], True, True)
        assert {m.lora_name: m.rank for m in rebuilt.loras} == network.ranks()
        load(rebuilt, weights)
        assert rebuilt.ranks() == network.ranks()
        return models

    merged = tiny.sd1_models(seed=0)
    into, weights = create_network_from_weights(1.0, str(path), None, merged["text_encoder"], merged["unet"],
                                                for_inference=True)
    into.merge_to(merged["text_encoder"], merged["unet"], weights, torch.float32, "cpu")
    merged_out = outputs(merged)
    for load in (lambda net, _: net.load_weights(str(path)), lambda net, weights: net.load_state_dict(weights, False)):
        for hooked_out, want in zip(outputs(rebuilt(load)), merged_out):
            assert torch.allclose(hooked_out, want, rtol=1e-4, atol=1e-5)
    base = tiny.sd1_models(seed=0)
    assert not torch.allclose(outputs(base)[0], outputs(merged)[0], atol=1e-3)  # the LoRA does change the output


def test_merge_to_adds_exactly_the_file_update(saved):
    network, _, path = saved
    tensors = load_file(path)
    models = tiny.sd1_models(seed=0)
    into, weights = create_network_from_weights(1.0, str(path), None, models["text_encoder"], models["unet"],
                                                for_inference=True)
    before = {m.lora_name: m.org_module.weight.detach().clone() for m in into.loras}
    into.merge_to(models["text_encoder"], models["unet"], weights, torch.float32, "cpu")
    assert {m.lora_name for m in into.loras} == set(network.ranks())
    for m in into.loras:
        added = (m.org_module.weight - before[m.lora_name]).double().reshape(m.out_dim, -1)
        assert relative(added, file_update(tensors, m.lora_name)) < 1e-5, m.lora_name


def test_load_weights_into_a_max_rank_network_pads_and_keeps_every_update(saved, tmp_path):
    network, _, path = saved
    tensors = load_file(path)
    models = tiny.sd1_models(seed=0)
    fresh = create_network(1.0, MAX_RANK, 4.0, None, models["text_encoder"], models["unet"], conv_dim=str(CONV_RANK),
                           conv_alpha="1", restart_mode="product")
    fresh.apply_to(models["text_encoder"], models["unet"], True, True)
    info = fresh.load_weights(str(path))
    trained = {m.lora_name: m for m in network.loras}
    smaller = {n for n, k in network.ranks().items() if k < trained[n].rank}
    assert set(info.padded) == smaller and smaller
    assert not info.missing and not info.unexpected
    assert fresh.ranks() == network.ranks()
    for m in fresh.loras:
        assert m.rank == trained[m.lora_name].rank
        assert relative(training_update(m), file_update(tensors, m.lora_name)) < 1e-5, m.lora_name
    again = tmp_path / "again.safetensors"
    fresh.save_weights(str(again))
    assert {k: v.shape for k, v in load_file(again).items()} == {k: v.shape for k, v in tensors.items()}


def test_save_full_rank_also_writes_the_raw_training_factors(tmp_path, sd1_models, planted_network):
    network, _ = planted_network(sd1_models, max_rank=MAX_RANK, save_full_rank="true")
    path = tmp_path / "run.safetensors"
    network.save_weights(str(path), None, {"ss_network_dim": str(MAX_RANK)})
    full_path = tmp_path / "run-fullrank.safetensors"
    full = load_file(full_path)
    for m in network.loras:
        assert torch.equal(full[f"{m.lora_name}.lora_down.weight"], m.lora_down.weight.detach())
        assert torch.equal(full[f"{m.lora_name}.lora_up.weight"], m.lora_up.weight.detach())
        assert float(full[f"{m.lora_name}.alpha"]) == float(m.alpha)
    with safe_open(str(full_path), "pt") as fh:
        assert fh.metadata()["aclora_full_rank"] == "true"
    variable = load_file(path)
    assert {variable[f"{n}.lora_down.weight"].shape[0] for n in network.ranks()} != {MAX_RANK}
    with safe_open(str(path), "pt") as fh:
        assert "aclora_full_rank" not in fh.metadata()


def test_without_save_full_rank_only_the_variable_rank_file_is_written(tmp_path, sd1_models, planted_network):
    network, _ = planted_network(sd1_models, max_rank=MAX_RANK)
    network.save_weights(str(tmp_path / "run.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]


def test_fp16_export_stores_fp16_and_keeps_the_update(tmp_path, sd1_models, planted_network):
    network, _ = planted_network(sd1_models, max_rank=MAX_RANK, conv_dim=str(CONV_RANK))
    path = tmp_path / "half.safetensors"
    network.save_weights(str(path), torch.float16)
    tensors = load_file(path)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    for m in network.loras:
        expected = best_rank_k(training_update(m), network.ranks()[m.lora_name])
        assert relative(file_update(tensors, m.lora_name), expected) < 2e-3, m.lora_name


def test_an_sd1_file_given_to_an_sdxl_model_is_refused(saved, sdxl_models):
    _, _, path = saved
    with pytest.raises(LoRAFileError, match=r"for an SD1\.x/2\.x model, but the model given is SDXL"):
        create_network_from_weights(1.0, str(path), None, sdxl_models["text_encoders"], sdxl_models["unet"])
    network = create_network(1.0, MAX_RANK, 4.0, None, sdxl_models["text_encoders"], sdxl_models["unet"])
    network.apply_to(sdxl_models["text_encoders"], sdxl_models["unet"], True, True)
    with pytest.raises(LoRAFileError, match=r"for an SD1\.x/2\.x model, but the model given is SDXL"):
        network.load_weights(str(path))


def test_a_chunk_whose_float32_decomposition_fails_is_exported_through_float64_module_by_module(
        tmp_path, sd1_models, planted_network, monkeypatch, caplog):
    """The export shares RESTART's batching (lora.batching.decompose_in_batches): when LAPACK fails on a float32
    chunk, each module is decomposed alone in float64 and the file is the same best rank-k approximation."""
    from aclora_ext import functional as F
    from aclora_ext.lora import export

    network, planted = planted_network(sd1_models, max_rank=MAX_RANK, alpha=4.0)
    real_core = F.product_core
    seen = []

    def core_failing_in_float32(down, up):
        seen.append(down.dtype)
        if down.dtype == torch.float32:
            raise torch.linalg.LinAlgError("planted float32 failure")
        return real_core(down, up)

    monkeypatch.setattr(export.F, "product_core", core_failing_in_float32)
    path = tmp_path / "float64.safetensors"
    with caplog.at_level("WARNING", logger="aclora_ext"):
        assert network.save_weights(str(path), None, {})
    assert torch.float64 in seen and "retrying one by one in float64" in caplog.text
    tensors = load_file(path)
    for m in network.loras:
        k = network.ranks()[m.lora_name]
        assert tensors[f"{m.lora_name}.lora_down.weight"].shape[0] == k == planted[m.lora_name]
        expected = best_rank_k(training_update(m), k)
        assert relative(file_update(tensors, m.lora_name), expected) < EXPORT_RTOL, m.lora_name


def test_export_leaves_out_only_the_non_finite_module_of_a_chunk():
    """A module with NaN weights is reported by name; the finite modules of its shape group are still exported."""
    from aclora_ext.lora.export import export_modules
    from aclora_ext.network.factory import attach

    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
    network = attach(model, max_rank=4, restart_mode="off")
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.normal_()
        network.loras[1].lora_down.weight[0, 0] = float("nan")
    result = export_modules(network.loras, [2, 2, 2], torch.float32)
    names = [m.lora_name for m in network.loras]
    assert result.non_finite == [names[1]]
    assert set(result.ranks) == {names[0], names[2]}
    assert f"{names[0]}.lora_down.weight" in result.tensors and f"{names[1]}.lora_down.weight" not in result.tensors


# --- pad_lone_ranks: the one rank layout diffusers 0.32 misreads -----------------------------------------------
def lora_tensors(name: str, rank: int, out_dim: int, in_dim: int, kernel: tuple, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_down.weight": torch.randn((rank, in_dim) + kernel, generator=g),
            f"{name}.lora_up.weight": torch.randn((out_dim, rank) + ((1, 1) if kernel else ()), generator=g),
            f"{name}.alpha": torch.tensor(2.0)}


def test_a_part_with_one_lone_rank_is_padded_to_the_common_rank_with_the_same_updates():
    """Per model part: exactly one module's rank differs -> the lower-rank module(s) are stored at the higher rank,
    zero rows in lora_down and zero columns in lora_up (conv shapes kept), and every update alpha/k * up @ down
    the file encodes is unchanged. A lone module of the higher rank pads the others; a part with more than two
    ranks, or with one rank, is left alone."""
    from aclora_ext.lora.export import pad_lone_ranks

    tensors = {}
    # lora_unet: two rank-4 modules (a Linear, a 3x3 conv) and one 3x3 conv at rank 2: the conv is padded to 4
    tensors |= lora_tensors("lora_unet_a", 4, 6, 5, (), 1) | lora_tensors("lora_unet_b", 4, 6, 3, (3, 3), 2)
    tensors |= lora_tensors("lora_unet_c", 2, 6, 3, (3, 3), 3)
    # lora_te1: one module at rank 5, two at rank 3: the two are padded to 5
    tensors |= lora_tensors("lora_te1_a", 5, 4, 4, (), 4) | lora_tensors("lora_te1_b", 3, 4, 4, (), 5)
    tensors |= lora_tensors("lora_te1_c", 3, 4, 4, (), 6)
    # lora_te2: three ranks, none lone against one common rank: left alone
    for i, rank in enumerate((1, 2, 3)):
        tensors |= lora_tensors(f"lora_te2_{i}", rank, 4, 4, (), 7 + i)
    names = sorted({key.rsplit(".", 2)[0] for key in tensors if key.endswith(".weight")})
    before = {name: file_update(tensors, name) for name in names}
    stored = {key: value.clone() for key, value in tensors.items()}

    padded = pad_lone_ranks(tensors)

    assert padded == {"lora_unet_c": 2, "lora_te1_b": 3, "lora_te1_c": 3}
    for name in names:
        assert torch.allclose(file_update(tensors, name), before[name], rtol=1e-6, atol=1e-7), name
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.dtype == up.dtype == torch.float32
        if name not in padded:
            assert torch.equal(down, stored[f"{name}.lora_down.weight"]), name
            assert torch.equal(up, stored[f"{name}.lora_up.weight"]), name
            continue
        rank, target = padded[name], {"lora_unet_c": 4}.get(name, 5)
        old_down = stored[f"{name}.lora_down.weight"]
        assert down.shape == (target,) + tuple(old_down.shape[1:]) and up.shape[1] == target
        assert up.dim() == stored[f"{name}.lora_up.weight"].dim()
        assert torch.equal(down[:rank], old_down) and float(down[rank:].abs().sum()) == 0.0
        assert float(up[:, rank:].abs().sum()) == 0.0
        assert float(tensors[f"{name}.alpha"]) == 2.0
