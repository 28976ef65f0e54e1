"""Anima against sd-scripts' own code, in process: its ``Anima`` DiT and LLM adapter at tiny widths
(tests/anima_fixtures.py), a tiny transformers Qwen3, its ``networks.lora_anima``, and the functions
anima_train_network's validation pass makes its prediction and loss with.

Needs sd-scripts (``../shared/sd-scripts``) and its pinned stack, like tests/test_flux_sd3_sd_scripts.py:
skipped without them, a failure with ``CI=true`` (``ACLORA_SD_SCRIPTS_E2E=0`` turns them off).
"""

from __future__ import annotations

import argparse

import pytest
import torch

import anima_fixtures as af
import sd_scripts_fixtures as e2e
from aclora_ext import OptionError, create_network, create_network_from_weights
from aclora_ext.files.storage import LoRAFileError
from helpers import assert_the_replay_is_the_validation_pass, named_groups, pretend_trained

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only


@pytest.fixture(scope="module")
def sd():
    """sd-scripts' modules: library.* and networks.lora_anima, imported from its folder."""
    e2e.import_sd_scripts_in_process()
    import networks.lora_anima as lora_anima
    from library import anima_models, anima_train_utils, train_util

    return argparse.Namespace(lora_anima=lora_anima, anima_models=anima_models,
                              anima_train_utils=anima_train_utils, train_util=train_util)


@pytest.fixture(scope="module")
def models(sd):
    """(DiT, Qwen3): built once, shared read-only (every test removes what it applies)."""
    return af.anima(), af.qwen3()


def theirs(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.lora_dim, float(m.alpha)) for m in network.text_encoder_loras + network.unet_loras}


def ours(network) -> dict[str, tuple[int, float]]:
    return {m.lora_name: (m.rank, float(m.alpha)) for m in network.loras}


# --- the same layers, names, ranks and alphas as networks.lora_anima ---------------------------------------
CASES = {
    "defaults": {},
    "train_llm_adapter": {"train_llm_adapter": "true"},
    "include_patterns": {
        "include_patterns": r"['t_embedder.*', 'final_layer.*', r'blocks\.1\.adaln_modulation_mlp.*']"},
    "exclude_patterns": {"exclude_patterns": "'.*mlp.*'"},
    "exclude_and_include": {"exclude_patterns": "['.*cross_attn.*', 'layers.0.*']",
                            "include_patterns": r"['blocks\\.0\\.cross_attn\\.q_proj']"},
    "reg_dims": {"network_reg_dims": r"blocks\.0\..*=2,layers\.1\.mlp.*=0,llm_adapter\.blocks\.1\..*=3",
                 "train_llm_adapter": "true"},
    # re.fullmatch on the dotted path: "self_attn" alone matches no path in full, so it changes nothing
    # (re.search on the LoRA name, as network_reg_dims does for the other families, would match 14 modules)
    "reg_dims_fullmatch": {"network_reg_dims": "self_attn=1,.*mlp.layer2=3"},
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_anima_modules_are_lora_anima_modules(sd, models, args):
    dit, qwen3 = models
    expected = theirs(sd.lora_anima.create_network(1.0, 4, 2.0, None, [qwen3], dit, **args))
    assert ours(create_network(1.0, 4, 2.0, None, qwen3, dit, **args)) == expected


def test_the_default_targets_are_the_blocks_attention_and_mlp_and_the_qwen3_layers(models):
    dit, qwen3 = models
    names = set(ours(create_network(1.0, 4, 2.0, None, qwen3, dit)))
    block = {f"lora_unet_blocks_{i}_{attn}_{p}_proj" for i in range(2) for attn in ("self_attn", "cross_attn")
             for p in ("q", "k", "v", "output")}
    block |= {f"lora_unet_blocks_{i}_mlp_layer{j}" for i in range(2) for j in (1, 2)}
    te = {f"lora_te_layers_{i}_self_attn_{p}_proj" for i in range(2) for p in "qkvo"}
    te |= {f"lora_te_layers_{i}_mlp_{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert names == block | te


def test_the_trainers_text_encoder_switch_keeps_or_drops_the_qwen3_modules(models):
    """sd-scripts' apply_to(text_encoder, unet, train_text_encoder, ...): --network_train_unet_only drops lora_te."""
    dit, qwen3 = models
    for train_te, count in ((False, 0), (True, 14)):
        network = create_network(1.0, 4, 2.0, None, qwen3, dit, restart_mode="off")
        network.apply_to(qwen3, dit, train_te, True)
        try:
            assert len(network.text_encoder_loras) == count and len(network.unet_loras) == 20
        finally:
            network.remove_from()


def test_our_files_and_theirs_load_both_ways_at_every_modules_rank(sd, tmp_path):
    """Our variable-rank file (Qwen3, LLM adapter, blocks): lora_anima's create_network_from_weights builds each
    module at its rank and loads it. Their file: ours builds the same modules and applies the same update."""
    dit, qwen3 = af.anima(), af.qwen3()  # their apply_to cannot be undone: models of this test's own
    ours_file = str(tmp_path / "ours.safetensors")
    reg = r"blocks\.0\.self_attn\..*=2,llm_adapter\.blocks\.1\..*=3,layers\.0\.mlp\..*=1"
    source = pretend_trained(create_network(1.0, 4, 2.0, None, qwen3, dit, train_llm_adapter="true",
                                            network_reg_dims=reg, restart_mode="off"))
    source.save_weights(ours_file, torch.float32, {})
    network, weights = sd.lora_anima.create_network_from_weights(1.0, ours_file, None, [qwen3], dit)
    assert theirs(network) == ours(source) and len({r for r, _ in ours(source).values()}) == 4
    network.apply_to([qwen3], dit, True, True)
    info = network.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    their_file = str(tmp_path / "theirs.safetensors")
    kohya = sd.lora_anima.create_network(1.0, 4, 2.0, None, [qwen3], dit, train_llm_adapter="true",
                                         network_reg_dims=r"blocks\.1\..*=3")
    kohya.apply_to([qwen3], dit, True, True)
    with torch.no_grad():
        for m in kohya.text_encoder_loras + kohya.unet_loras:
            m.lora_up.weight.normal_()
    kohya.save_weights(their_file, torch.float32, {})
    loaded, _ = create_network_from_weights(1.0, their_file, None, qwen3, dit)
    loaded.load_weights(their_file)
    assert ours(loaded) == theirs(kohya)
    for m in loaded.loras:
        k = getattr(kohya, m.lora_name)
        expected = (k.lora_up.weight @ k.lora_down.weight) * (float(k.alpha) / k.lora_dim)
        torch.testing.assert_close(m.delta_weight(), expected, rtol=1e-5, atol=1e-6)


def test_a_file_of_another_family_is_refused_by_name(models, tmp_path):
    from safetensors.torch import save_file

    dit, qwen3 = models
    path = tmp_path / "sd15.safetensors"
    tensors = {}
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        tensors.update({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2),
                        f"{name}.alpha": torch.tensor(2.0)})
    save_file(tensors, str(path))
    with pytest.raises(LoRAFileError, match="this LoRA is for an SD1.x/2.x model, but the model given is Anima"):
        create_network_from_weights(1.0, str(path), None, qwen3, dit)


@pytest.mark.parametrize("key, value, theirs_", [("img_attn_dim", "4", "FLUX.1"),
                                                 ("train_block_indices", "0", "SD3/SD3.5"),
                                                 ("train_t5xxl", "true", "FLUX.1 and SD3/SD3.5")])
def test_an_option_of_another_family_is_refused_naming_key_value_and_anima_options(models, key, value, theirs_):
    dit, qwen3 = models
    with pytest.raises(OptionError) as raised:
        create_network(1.0, 4, 2.0, None, qwen3, dit, **{key: value})
    assert str(raised.value) == (
        f"network_args: {key}={value!r} is an option for {theirs_} models, and this model is Anima; the layer "
        "options allowed for Anima: train_llm_adapter, exclude_patterns, include_patterns, network_reg_dims")


# --- the held-out replay of anima_train_network's validation pass ---------------------------------------------
@pytest.mark.parametrize("weighting_scheme", ["sigma_sqrt", "cosmap", "uniform"])
def test_the_anima_replay_is_the_trainers_validation_loss(sd, weighting_scheme):
    """anima_train_network's get_noise_pred_and_target and process_batch for validation batches: the DiT on
    5-D latents with timesteps / 1000 and the LLM adapter's inputs, the output squeezed back to 4-D,
    conditional_loss against noise - latents, times compute_loss_weighting_for_anima's weighting."""
    dit = af.anima(seed=1)
    network = create_network(1.0, 4, 2.0, None, None, dit)
    network.prepare_network(argparse.Namespace(validation_split=0.5, max_train_steps=10))
    network.apply_to(None, dit, False, True)
    pretend_trained(network, scale=0.5)

    def validation_pass():
        losses = []
        network.eval()
        with torch.no_grad():
            for seed in range(2):
                g = torch.Generator().manual_seed(seed)
                latents, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
                sigmas = torch.rand(1, generator=g).view(-1, 1, 1, 1) * 0.9 + 0.05
                noisy = (1 - sigmas) * latents + sigmas * noise
                out = dit(noisy.unsqueeze(2), sigmas.flatten(), torch.randn(1, 5, af.QWEN3_HIDDEN, generator=g),
                          padding_mask=torch.zeros(1, 1, 8, 8),
                          target_input_ids=torch.randint(0, 32128, (1, 6), generator=g),
                          target_attention_mask=torch.ones(1, 6, dtype=torch.long),
                          source_attention_mask=torch.ones(1, 5, dtype=torch.long))
                pred = out.squeeze(2)
                weighting = sd.anima_train_utils.compute_loss_weighting_for_anima(
                    weighting_scheme=weighting_scheme, sigmas=sigmas)
                loss = sd.train_util.conditional_loss(pred.float(), (noise - latents).float(), "l2", "none", None)
                losses.append((loss * weighting).mean(dim=(1, 2, 3)))
        network.train()
        return torch.cat(losses)

    try:
        assert_the_replay_is_the_validation_pass(network, validation_pass, calls=2, multiplier=0.25)
    finally:
        network.remove_from()


# --- network_reg_lrs: lora_anima's optimizer groups (re.fullmatch on the dotted path) ----------------------
@pytest.mark.parametrize("args", [
    {"network_reg_lrs": r"blocks\.0\..*=1e-5,.*mlp.*=0,layers\.1\..*=2e-6"},
    {"network_reg_lrs": r"self_attn=3e-5,blocks\.1\.cross_attn.*=4e-6", "loraplus_lr_ratio": "8"},
])
def test_network_reg_lrs_makes_lora_animas_groups(sd, args):
    """The same groups (description, lr, parameters) as lora_anima's; "self_attn" alone matches no whole path."""
    dit, qwen3 = af.anima(), af.qwen3()  # fresh: apply_to patches the layers' forward
    theirs_ = sd.lora_anima.create_network(1.0, 4, 2.0, None, [qwen3], dit, **args)
    theirs_.apply_to([qwen3], dit, True, True)  # as the trainer does first (it drops org_module)
    ours_ = create_network(1.0, 4, 2.0, None, qwen3, dit, **args)
    expected = named_groups(theirs_, *theirs_.prepare_optimizer_params_with_multiple_te_lrs(5e-5, 1e-4, 1e-3))
    got = named_groups(ours_, *ours_.prepare_optimizer_params(5e-5, 1e-4, 1e-3))
    assert [g for g in got if g[0].startswith("unet")] == [g for g in expected if g[0].startswith("unet")]
    assert sorted((lr, names) for d, lr, names in got if d.startswith("text")) == sorted(
        (lr, names) for d, lr, names in expected if d.startswith("text"))
    assert any("reg_lr" in d for d, _, _ in got) == ("blocks" in args["network_reg_lrs"])
