"""LoRA files: what save_weights writes, and what load_weights accepts or refuses.

The file is the deliverable of a training run. It must be a plain kohya LoRA
(only lora_down / lora_up / alpha keys, the requested dtype, sd-scripts'
metadata and hashes), it must never replace a good file with a broken one, and
a file that cannot be used must be refused with a LoRAFileError that says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

from aclora_ext import LoRAFileError, attach, create_network_from_weights
from aclora_ext.harness import sdcalls, tiny
from helpers import lora_network, pretend_trained

LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
SS_METADATA = {
    "ss_network_module": "networks.aclora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sd_v1",
    "ss_num_epochs": "3",
    "ss_max_train_steps": "120",
}


def expected_keys(network):
    return {f"{m.lora_name}.{part}" for m in network.loras for part in LORA_PARTS}


def unet_outputs(models, data, sdxl=False):
    return sdcalls.model_outputs(models, data[:2], sdxl)


def files_in(directory):
    return sorted(os.listdir(directory))


def assert_clean_error(error):
    """A LoRAFileError of its own, not a re-raised library traceback."""
    assert type(error) is LoRAFileError
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


@pytest.fixture
def trained_sd1(sd1_models):
    return pretend_trained(lora_network(sd1_models))


@pytest.fixture
def fresh_sd1_models():
    """A second copy of the SD1.x-like models (same seed as the sd1_models fixture)."""
    return tiny.sd1_models(seed=0)


# --- what is written ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_file_holds_exactly_the_kohya_keys_of_every_module(trained_sd1, tmp_path, suffix):
    path = str(tmp_path / f"lora{suffix}")
    assert trained_sd1.save_weights(path, torch.float32, dict(SS_METADATA)) is True
    tensors = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert set(tensors) == expected_keys(trained_sd1)
    assert any(key.startswith("aclora_") for key in trained_sd1.state_dict()), "the resumable state exists ..."
    assert not any("aclora" in key for key in tensors), "... but never reaches the LoRA file"
    for m in trained_sd1.loras:
        assert torch.equal(tensors[f"{m.lora_name}.lora_down.weight"], m.lora_down.weight)
        assert torch.equal(tensors[f"{m.lora_name}.lora_up.weight"], m.lora_up.weight)
        assert tensors[f"{m.lora_name}.alpha"].dim() == 0 and float(tensors[f"{m.lora_name}.alpha"]) == 2.0


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_the_requested_save_dtype_is_honoured(trained_sd1, tmp_path, suffix, dtype):
    path = str(tmp_path / f"lora{suffix}")
    trained_sd1.save_weights(path, dtype, dict(SS_METADATA))
    tensors = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert {t.dtype for t in tensors.values()} == {dtype}
    m = trained_sd1.loras[0]
    assert torch.equal(tensors[f"{m.lora_name}.lora_up.weight"], m.lora_up.weight.to(dtype))


def test_no_save_dtype_keeps_the_network_dtype(trained_sd1, tmp_path):
    path = str(tmp_path / "lora.safetensors")
    trained_sd1.save_weights(path, None, None)
    assert {t.dtype for t in load_file(path).values()} == {torch.float32}


def test_sd_scripts_metadata_is_kept(trained_sd1, tmp_path):
    path = str(tmp_path / "lora.safetensors")
    trained_sd1.save_weights(path, torch.float16, dict(SS_METADATA))
    with safe_open(path, "pt") as fh:
        metadata = fh.metadata()
    for key, value in SS_METADATA.items():
        assert metadata[key] == value


def sd_scripts_hashes(path):
    """sshs_model_hash / sshs_legacy_hash computed independently, as sd-scripts defines them: over the
    safetensors serialisation of the file's tensors with only the ss_* metadata."""
    with safe_open(path, "pt") as fh:
        metadata = {k: v for k, v in fh.metadata().items() if k.startswith("ss_")}
    blob = save(load_file(path), metadata)
    header_length = struct.unpack("<Q", blob[:8])[0]
    model_hash = hashlib.sha256(blob[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[1024 * 1024:1024 * 1024 + 64 * 1024]).hexdigest()[:8]
    return model_hash, legacy_hash, len(blob)


def test_sshs_hashes_match_an_independent_computation_on_a_file_over_one_mebibyte(tmp_path):
    model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 256))
    network = attach(model, max_rank=200, alpha=8.0)
    pretend_trained(network)
    path = str(tmp_path / "big.safetensors")
    network.save_weights(path, torch.float32, dict(SS_METADATA))
    model_hash, legacy_hash, size = sd_scripts_hashes(path)
    assert size > 1024 * 1024 + 64 * 1024, "the legacy hash needs a file larger than 1 MiB + 64 KiB"
    with safe_open(path, "pt") as fh:
        metadata = fh.metadata()
    assert metadata["sshs_model_hash"] == model_hash
    assert metadata["sshs_legacy_hash"] == legacy_hash


def test_sshs_model_hash_matches_on_a_small_file_and_follows_the_weights(trained_sd1, tmp_path):
    first, second = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    trained_sd1.save_weights(first, torch.float32, dict(SS_METADATA))
    pretend_trained(trained_sd1, seed=1)
    trained_sd1.save_weights(second, torch.float32, dict(SS_METADATA))
    hashes = []
    for path in (first, second):
        with safe_open(path, "pt") as fh:
            hashes.append(fh.metadata()["sshs_model_hash"])
        assert hashes[-1] == sd_scripts_hashes(path)[0]
    assert hashes[0] != hashes[1]


# --- atomic writes ------------------------------------------------------------------------


@pytest.mark.parametrize("crash_in, crash", [("fsync", OSError("disk full")), ("replace", KeyboardInterrupt())],
                         ids=["write-fails", "interrupted-before-rename"])
def test_a_crash_while_saving_keeps_the_previous_file_and_leaves_no_temp_file(trained_sd1, tmp_path, monkeypatch,
                                                                             crash_in, crash):
    path = str(tmp_path / "lora.safetensors")
    trained_sd1.save_weights(path, torch.float32, dict(SS_METADATA))
    good = open(path, "rb").read()

    def crashing(*args, **kwargs):
        raise crash

    pretend_trained(trained_sd1, seed=1)
    monkeypatch.setattr(os, crash_in, crashing)
    with pytest.raises(type(crash)):
        trained_sd1.save_weights(path, torch.float32, dict(SS_METADATA))
    monkeypatch.undo()
    assert open(path, "rb").read() == good
    assert files_in(tmp_path) == ["lora.safetensors"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_not_saved_and_the_previous_file_is_kept(trained_sd1, tmp_path, caplog, bad):
    path = str(tmp_path / "lora.safetensors")
    trained_sd1.save_weights(path, torch.float32, dict(SS_METADATA))
    good = open(path, "rb").read()
    broken = trained_sd1.unet_loras[3]
    with torch.no_grad():
        broken.lora_up.weight[0, 0] = bad
    with caplog.at_level(logging.ERROR, logger="aclora_ext"):
        assert trained_sd1.save_weights(path, torch.float32, dict(SS_METADATA)) is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(path in e and broken.lora_name in e for e in errors)
    assert open(path, "rb").read() == good
    assert files_in(tmp_path) == ["lora.safetensors"]


# --- reading back ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_saved_file_reloads_into_a_fresh_network_with_identical_outputs(trained_sd1, sd1_models, fresh_sd1_models,
                                                                        style_data, tmp_path, suffix):
    path = str(tmp_path / f"lora{suffix}")
    trained_sd1.save_weights(path, torch.float32, dict(SS_METADATA))
    trained = unet_outputs(sd1_models, style_data)
    before = unet_outputs(fresh_sd1_models, style_data)
    reloaded = lora_network(fresh_sd1_models)
    info = reloaded.load_weights(path)
    assert sorted(info.loaded) == sorted(m.lora_name for m in trained_sd1.loras)
    after = unet_outputs(fresh_sd1_models, style_data)
    assert not torch.allclose(before, trained, atol=1e-4), "the trained network must change the output"
    torch.testing.assert_close(after, trained, rtol=0, atol=1e-6)


def test_a_file_of_smaller_rank_is_padded_into_a_larger_network(sd1_models, fresh_sd1_models, style_data, tmp_path):
    path = str(tmp_path / "rank2.safetensors")
    small = pretend_trained(lora_network(sd1_models, rank=2, alpha=1.0))
    small.save_weights(path, torch.float32, None)
    larger = lora_network(fresh_sd1_models, rank=6, alpha=3.0)
    info = larger.load_weights(path)
    assert len(info.padded) == len(small.loras)
    torch.testing.assert_close(unet_outputs(fresh_sd1_models, style_data), unet_outputs(sd1_models, style_data),
                               rtol=0, atol=1e-5)


def test_a_file_of_larger_rank_is_refused_naming_the_ranks(sd1_models, fresh_sd1_models, tmp_path):
    path = str(tmp_path / "rank8.safetensors")
    lora_network(sd1_models, rank=8, restart_mode="off").save_weights(path, torch.float32, None)
    with pytest.raises(LoRAFileError) as caught:
        lora_network(fresh_sd1_models, rank=4).load_weights(path)
    assert "rank 8" in str(caught.value) and "rank 4" in str(caught.value)


def test_unknown_modules_in_a_file_are_ignored_with_a_warning_listing_them(trained_sd1, fresh_sd1_models, sd1_models,
                                                                          style_data, tmp_path, caplog):
    path = str(tmp_path / "extra.safetensors")
    tensors = {}
    trained_sd1.save_weights(path, torch.float32, None)
    tensors.update(load_file(path))
    stranger = "lora_unet_down_blocks_7_attentions_0_proj_in"
    tensors[f"{stranger}.lora_down.weight"] = torch.zeros(4, 16)
    tensors[f"{stranger}.lora_up.weight"] = torch.zeros(16, 4)
    tensors[f"{stranger}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path)
    reloaded = lora_network(fresh_sd1_models)
    with caplog.at_level(logging.WARNING, logger="aclora_ext"):
        info = reloaded.load_weights(path)
    assert info.unexpected == [stranger]
    assert any(stranger in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    torch.testing.assert_close(unet_outputs(fresh_sd1_models, style_data), unet_outputs(sd1_models, style_data),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("file_for, model", [("sdxl", "sd1"), ("sd1", "sdxl")])
def test_a_file_for_the_other_model_family_is_refused_naming_both(file_for, model, sd1_models, sdxl_models, tmp_path):
    sets = {"sd1": sd1_models, "sdxl": sdxl_models}
    path = str(tmp_path / f"{file_for}.safetensors")
    lora_network(sets[file_for]).save_weights(path, torch.float32, None)
    network = lora_network(sets[model])
    with pytest.raises(LoRAFileError) as caught:
        network.load_weights(path)
    assert "SDXL" in str(caught.value) and "SD1" in str(caught.value)
    assert_clean_error(caught.value)


def test_a_file_whose_modules_none_exist_in_the_model_is_refused(sd1_models, tmp_path):
    path = str(tmp_path / "mlp.safetensors")
    attach(nn.Sequential(nn.Linear(8, 8)), max_rank=2).save_weights(path, torch.float32, None)
    with pytest.raises(LoRAFileError) as caught:
        lora_network(sd1_models).load_weights(path)
    assert "none of its" in str(caught.value) and "SD1.x vs SDXL" in str(caught.value)
    with pytest.raises(LoRAFileError, match="none of its"):
        create_network_from_weights(1.0, path, None, sd1_models["text_encoder"], sd1_models["unet"])


def test_a_module_whose_shape_does_not_fit_is_refused_naming_module_and_shapes(trained_sd1, fresh_sd1_models, tmp_path):
    path = str(tmp_path / "lora.safetensors")
    trained_sd1.save_weights(path, torch.float32, None)
    tensors = load_file(path)
    victim = trained_sd1.unet_loras[0]
    down = tensors[f"{victim.lora_name}.lora_down.weight"]
    wrong = torch.cat([down, down[:, :1]], dim=1)
    tensors[f"{victim.lora_name}.lora_down.weight"] = wrong
    save_file(tensors, path)
    with pytest.raises(LoRAFileError) as caught:
        lora_network(fresh_sd1_models).load_weights(path)
    message = str(caught.value)
    assert victim.lora_name in message and str(tuple(wrong.shape)) in message


# --- files that are not LoRA files ----------------------------------------------------------


def missing(directory, good):
    return str(directory / "no-such-file.safetensors")


def a_directory(directory, good):
    path = directory / "looks-like-a-file.safetensors"
    path.mkdir()
    return str(path)


def not_safetensors(directory, good):
    path = directory / "text.safetensors"
    path.write_bytes(b"this is a text file renamed to .safetensors, not a LoRA")
    return str(path)


def empty(directory, good):
    path = directory / "empty.safetensors"
    path.write_bytes(b"")
    return str(path)


def truncated(directory, good):
    path = directory / "truncated.safetensors"
    data = open(good, "rb").read()
    path.write_bytes(data[: len(data) - 1000])
    return str(path)


def down_without_up(directory, good):
    path = directory / "half.safetensors"
    tensors = {k: v for k, v in load_file(good).items() if ".lora_up." not in k}
    save_file(tensors, str(path))
    return str(path)


def garbage_pt(directory, good):
    path = directory / "garbage.pt"
    path.write_bytes(b"neither a zip archive nor a pickle")
    return str(path)


BAD_FILES = [
    (missing, "no such file"),
    (a_directory, "directory"),
    (not_safetensors, "not a safetensors file"),
    (empty, "not a safetensors file"),
    (truncated, "truncated"),
    (down_without_up, "no lora_up"),
    (garbage_pt, "neither a safetensors file nor a torch checkpoint"),
]


@pytest.mark.parametrize("make, reason", BAD_FILES, ids=[m.__name__ for m, _ in BAD_FILES])
@pytest.mark.parametrize("entry", ["load_weights", "create_network_from_weights"])
def test_an_unusable_file_raises_a_lora_file_error_saying_why(make, reason, entry, trained_sd1, sd1_models, tmp_path):
    good = str(tmp_path / "good.safetensors")
    trained_sd1.save_weights(good, torch.float32, None)
    path = make(tmp_path, good)
    with pytest.raises(LoRAFileError) as caught:
        if entry == "load_weights":
            trained_sd1.load_weights(path)
        else:
            create_network_from_weights(1.0, path, None, sd1_models["text_encoder"], sd1_models["unet"])
    assert reason in str(caught.value)
    assert os.path.basename(path) in str(caught.value)
    assert_clean_error(caught.value)


def test_the_data_bytes_are_elements_times_item_size_and_an_unstorable_dtype_is_named():
    from aclora_ext.files import sizes

    assert sizes.tensor_bytes({"a": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(5)}) == 24 + 20
    two = {"y": torch.zeros(2, dtype=torch.complex128), "x": torch.zeros(2, dtype=torch.complex32), "z": torch.zeros(2)}
    named = r"^dtype\(s\) torch\.complex128, torch\.complex32 cannot be stored in safetensors$"
    with pytest.raises(ValueError, match=named):
        sizes.safetensors_size(two)
