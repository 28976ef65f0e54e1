"""The sd-scripts network-module contract (issue #2), checked against what sd-scripts does with it.

Entry points and their signatures, every method train_network.py calls, the
layers and names of kohya's networks.lora, the LoRA forward, ``attach`` for
any model, and whole training runs replayed the way sd-scripts drives them.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from aclora_ext import ACLoRANetwork, attach, create_network, create_network_from_weights
from aclora_ext.harness import replay, sdcalls, tiny
from helpers import lora_network, pretend_trained, text_encoder_of

CONTRACT_METHODS = (
    "apply_to", "prepare_network", "prepare_optimizer_params", "prepare_optimizer_params_with_multiple_te_lrs",
    "set_multiplier", "set_enabled", "load_weights", "save_weights", "is_mergeable", "merge_to",
    "enable_gradient_checkpointing", "prepare_grad_etc", "on_epoch_start", "on_step_start", "get_trainable_params",
    "apply_max_norm_regularization",
)
KOHYA_UNET_BLOCKS = ("Transformer2DModel",)
KOHYA_UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


# --- helpers ---------------------------------------------------------------------------------


def owners(network):
    """id(parameter) -> (module name, 'lora_down' | 'lora_up')."""
    return {id(p): (m.lora_name, name.split(".")[0]) for m in network.loras for name, p in m.named_parameters()}


def group_contents(network, groups):
    """[(lr or None, {module names}, {'lora_down', 'lora_up'})] per param group."""
    owner = owners(network)
    return [(g.get("lr"), {owner[id(p)][0] for p in g["params"]}, {owner[id(p)][1] for p in g["params"]})
            for g in groups]


def kohya_names(root, prefix, block_classes, with_3x3=False):
    """kohya's networks.lora rule, re-implemented: {lora name: '3x3' | 'linear'} of the Linear and 1x1
    Conv2d layers (and with conv_dim the other Conv2d layers) inside blocks with these class names."""
    names = {}
    for path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_path, child in block.named_modules():
            linear = type(child).__name__ == "Linear"
            conv = type(child).__name__ == "Conv2d"
            one_by_one = conv and child.kernel_size == (1, 1)
            if linear or one_by_one or (conv and with_3x3):
                names[f"{prefix}.{path}.{child_path}".replace(".", "_")] = "linear" if linear or one_by_one else "3x3"
    return names


def kohya_reference(models, with_3x3):
    encoders = models.get("text_encoders") or [models["text_encoder"]]
    prefixes = ["lora_te"] if len(encoders) == 1 else ["lora_te1", "lora_te2"]
    names = {}
    for prefix, encoder in zip(prefixes, encoders):
        names.update(kohya_names(tiny.as_transformers4_layout(encoder), prefix, KOHYA_TEXT_ENCODER_BLOCKS))
    unet_blocks = KOHYA_UNET_BLOCKS + (KOHYA_UNET_CONV_BLOCKS if with_3x3 else ())
    names.update(kohya_names(models["unet"], "lora_unet", unet_blocks, with_3x3))
    return names


def text_outputs(models, data, sdxl):
    encoders = models.get("text_encoders") or [models["text_encoder"]]
    with torch.no_grad():
        return sdcalls.encode_text(encoders, sdcalls.collate(data[:2])["input_ids"], sdxl)


def unet_outputs(models, data, sdxl):
    return sdcalls.model_outputs(models, data[:2], sdxl)


class Toy(nn.Module):
    """A small conv + MLP model with nested module names, for attach() and per-layer checks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": nn.Linear(8, 8),
                           "mlp": nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))})
            for _ in range(2))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = h + block["attn"](h)
            h = h + block["mlp"](h)
        return self.head(self.norm(h).mean(1))


TOY_LAYERS = {"stem", "proj", "blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.attn", "blocks.1.mlp.0",
              "blocks.1.mlp.2", "head"}


def toy_input(seed=0, batch=4):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def lora_path(name: str) -> str:
    return name.removeprefix("lora_")


# --- entry points ------------------------------------------------------------------------------


def test_create_network_has_sd_scripts_signature(sd_network_module):
    parameters = inspect.signature(sd_network_module.create_network).parameters
    assert list(parameters)[:7] == ["multiplier", "network_dim", "network_alpha", "vae", "text_encoder", "unet",
                                    "neuron_dropout"]
    assert parameters["neuron_dropout"].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_create_network_from_weights_has_sd_scripts_signature(sd_network_module):
    parameters = inspect.signature(sd_network_module.create_network_from_weights).parameters
    assert list(parameters)[:7] == ["multiplier", "file", "vae", "text_encoder", "unet", "weights_sd", "for_inference"]
    assert parameters["weights_sd"].default is None and parameters["for_inference"].default is False
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_create_network_returns_a_module_with_every_method_sd_scripts_calls(sd_network_module, sd1_models):
    network = sd_network_module.create_network(1.0, 4, 1.0, None, sd1_models["text_encoder"], sd1_models["unet"],
                                               neuron_dropout=None, dropout=None)
    assert isinstance(network, nn.Module)
    missing = [name for name in CONTRACT_METHODS if not callable(getattr(network, name, None))]
    assert not missing
    assert network.is_mergeable() is True


@pytest.mark.parametrize("pass_weights", [False, True], ids=["from-file", "weights_sd-given"])
def test_create_network_from_weights_returns_the_network_and_the_weights(sd_network_module, sd1_models, tmp_path,
                                                                         pass_weights):
    path = str(tmp_path / "lora.safetensors")
    source = lora_network(tiny.sd1_models(seed=0), rank=3, alpha=1.5, restart_mode="off")
    source.save_weights(path, torch.float32, None)
    file_weights = load_file(path)
    given = dict(file_weights) if pass_weights else None
    result = sd_network_module.create_network_from_weights(1.0, path, None, sd1_models["text_encoder"],
                                                           sd1_models["unet"], weights_sd=given)
    assert isinstance(result, tuple) and len(result) == 2
    network, weights_sd = result
    assert isinstance(network, ACLoRANetwork)
    if pass_weights:
        assert weights_sd is given
    assert set(weights_sd) == set(file_weights)
    assert {m.lora_name: (m.rank, float(m.alpha)) for m in network.loras} == \
           {m.lora_name: (3, 1.5) for m in source.loras}


# --- apply_to flags ------------------------------------------------------------------------------


def test_unet_only_leaves_the_text_encoder_untouched(sd1_models, style_data):
    text_before = text_outputs(sd1_models, style_data, False)
    unet_before = unet_outputs(sd1_models, style_data, False)
    network = pretend_trained(lora_network(sd1_models, apply_text_encoder=False))
    assert network.text_encoder_loras == [] and network.unet_loras
    assert all(m.lora_name.startswith("lora_unet_") for m in network.loras)
    assert torch.equal(text_outputs(sd1_models, style_data, False)[0], text_before[0])
    assert not torch.allclose(unet_outputs(sd1_models, style_data, False), unet_before, atol=1e-4)
    groups, descriptions = network.prepare_optimizer_params(1e-4, 2e-4, 1e-3)
    assert descriptions == ["unet"]


def test_text_encoder_only_leaves_the_unet_untouched(sd1_models, style_data):
    text_before = text_outputs(sd1_models, style_data, False)
    latents = sdcalls.collate(style_data[:2])["latents"]
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        unet_before = sd1_models["unet"](latents, timesteps, text_before[0]).sample
    network = pretend_trained(lora_network(sd1_models, apply_unet=False))
    assert network.unet_loras == [] and network.text_encoder_loras
    assert all(m.lora_name.startswith("lora_te_") for m in network.loras)
    with torch.no_grad():
        assert torch.equal(sd1_models["unet"](latents, timesteps, text_before[0]).sample, unet_before)
    assert not torch.allclose(text_outputs(sd1_models, style_data, False)[0], text_before[0], atol=1e-4)
    groups, descriptions = network.prepare_optimizer_params(1e-4, 2e-4, 1e-3)
    assert descriptions == ["textencoder"]


# --- optimizer parameter groups --------------------------------------------------------------------


def assert_every_parameter_once(network, groups):
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in network.parameters()}


def test_three_argument_form_gives_text_encoder_and_unet_their_own_lr(sd1_models):
    network = lora_network(sd1_models)
    groups, descriptions = network.prepare_optimizer_params(1e-4, 2e-4, 1e-3)
    assert_every_parameter_once(network, groups)
    te_names = {m.lora_name for m in network.text_encoder_loras}
    unet_names = {m.lora_name for m in network.unet_loras}
    assert [(lr, names) for lr, names, _ in group_contents(network, groups)] == [(1e-4, te_names), (2e-4, unet_names)]
    assert descriptions == ["textencoder", "unet"]
    torch.optim.AdamW(groups, lr=1e-3)  # what sd-scripts does with them


def test_missing_lrs_fall_back_to_the_default_lr(sd1_models):
    network = lora_network(sd1_models)
    groups, _ = network.prepare_optimizer_params(None, None, 3e-4)
    assert [g["lr"] for g in groups] == [3e-4, 3e-4]


def test_two_argument_form_works(sd1_models):
    network = lora_network(sd1_models)
    result = network.prepare_optimizer_params(1e-4, 2e-4)
    groups = result[0] if isinstance(result, tuple) else result
    assert_every_parameter_once(network, groups)
    assert [g["lr"] for g in groups] == [1e-4, 2e-4]


@pytest.mark.parametrize("method", ["prepare_optimizer_params", "prepare_optimizer_params_with_multiple_te_lrs"])
def test_sdxl_text_encoders_get_one_lr_each_from_a_list(sdxl_models, method):
    network = lora_network(sdxl_models)
    groups, _ = getattr(network, method)([1e-4, 3e-4], 2e-4, 1e-3)
    assert_every_parameter_once(network, groups)
    by_part = {}
    for lr, names, _ in group_contents(network, groups):
        for name in names:
            by_part.setdefault(name.split("_")[1], set()).add(lr)
    assert by_part == {"te1": {1e-4}, "te2": {3e-4}, "unet": {2e-4}}


def test_sdxl_single_text_encoder_lr_applies_to_both(sdxl_models):
    network = lora_network(sdxl_models)
    groups, _ = network.prepare_optimizer_params([1e-4], 2e-4, 1e-3)
    lrs = {name.split("_")[1]: lr for lr, names, _ in group_contents(network, groups) for name in names}
    assert lrs == {"te1": 1e-4, "te2": 1e-4, "unet": 2e-4}


@pytest.mark.parametrize(
    "options, te_ratio, unet_ratio",
    [
        ({"loraplus_lr_ratio": "4"}, 4, 4),
        ({"loraplus_lr_ratio": "4", "loraplus_unet_lr_ratio": "8"}, 4, 8),
        ({"loraplus_lr_ratio": "4", "loraplus_text_encoder_lr_ratio": "2"}, 2, 4),
        ({"loraplus_unet_lr_ratio": "16"}, None, 16),
    ],
    ids=["shared", "unet-override", "text-encoder-override", "unet-only"],
)
def test_lora_plus_puts_lora_up_in_plus_groups_with_lr_times_ratio(sd1_models, options, te_ratio, unet_ratio):
    network = lora_network(sd1_models, **options)
    groups, descriptions = network.prepare_optimizer_params(1e-4, 2e-4, 1e-3)
    assert_every_parameter_once(network, groups)
    expected = {"textencoder": 1e-4, "unet": 2e-4}
    ratios = {"textencoder": te_ratio, "unet": unet_ratio}
    for (lr, _, kinds), description in zip(group_contents(network, groups), descriptions):
        part, _, plus = description.partition(" ")
        if plus:
            assert kinds == {"lora_up"} and lr == pytest.approx(expected[part] * ratios[part])
        else:
            assert lr == expected[part]
            assert kinds == ({"lora_down"} if ratios[part] else {"lora_down", "lora_up"})
    assert sum(" plus" in d for d in descriptions) == sum(r is not None for r in ratios.values())


@pytest.mark.parametrize("zero", ["text_encoder", "unet"])
def test_an_lr_of_zero_leaves_that_part_out_of_the_optimizer(sd1_models, zero):
    network = lora_network(sd1_models)
    te_lr, unet_lr = (0.0, 2e-4) if zero == "text_encoder" else (1e-4, 0.0)
    groups, descriptions = network.prepare_optimizer_params(te_lr, unet_lr, 1e-3)
    kept = network.unet_loras if zero == "text_encoder" else network.text_encoder_loras
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for m in kept for p in m.parameters()}
    assert descriptions == (["unet"] if zero == "text_encoder" else ["textencoder"])


# --- the other hooks --------------------------------------------------------------------------------


def test_prepare_grad_etc_makes_the_network_trainable_and_leaves_the_models_frozen(sd1_models):
    network = lora_network(sd1_models)
    network.requires_grad_(False)
    network.prepare_grad_etc(sd1_models["text_encoder"], sd1_models["unet"])
    assert all(p.requires_grad for p in network.parameters())
    assert not any(p.requires_grad for p in sd1_models["unet"].parameters())
    assert not any(p.requires_grad for p in sd1_models["text_encoder"].parameters())


def test_get_trainable_params_are_the_network_parameters_for_clipping(sd1_models):
    network = pretend_trained(lora_network(sd1_models))
    params = list(network.get_trainable_params())
    assert {id(p) for p in params} == {id(p) for p in network.parameters()}
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in network.parameters()))
    assert total == pytest.approx(1.0, rel=1e-4)


def test_on_epoch_start_puts_the_network_in_training_mode_and_on_step_start_runs(sd1_models):
    network = pretend_trained(lora_network(sd1_models, restart_mode="off"))
    before = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith("aclora_")}
    network.eval()
    network.on_epoch_start(sd1_models["text_encoder"], sd1_models["unet"])
    assert network.training and all(m.training for m in network.modules())
    network.on_step_start(sd1_models["text_encoder"], sd1_models["unet"])
    after = {k: v for k, v in network.state_dict().items() if not k.startswith("aclora_")}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_the_same_lora_gradients(sd1_models, style_data):
    network = pretend_trained(lora_network(sd1_models))
    network.enable_gradient_checkpointing()
    unet = sd1_models["unet"]
    batch = sdcalls.collate(style_data[:2])
    cond = text_outputs(sd1_models, style_data, False)[0]
    timesteps = torch.tensor([10, 500])

    def lora_gradients():
        network.zero_grad(set_to_none=True)
        noisy = batch["latents"].clone().requires_grad_(True)  # sd-scripts does this for checkpointing
        unet(noisy, timesteps, cond).sample.pow(2).mean().backward()
        return [p.grad.clone() for p in network.unet_loras[0].parameters()] + \
               [p.grad.clone() for p in network.unet_loras[-1].parameters()]

    plain = lora_gradients()
    unet.enable_gradient_checkpointing()
    unet.train()
    checkpointed = lora_gradients()
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def update_norm(module) -> float:
    """||alpha/r * up @ down||_F of one module, computed the plain way."""
    up = module.lora_up.weight.detach().double().reshape(module.lora_up.weight.shape[0], -1)
    down = module.lora_down.weight.detach().double().reshape(module.lora_down.weight.shape[0], -1)
    return float((up @ down).norm() * float(module.alpha) / module.lora_down.weight.shape[0])


def test_max_norm_regularization_scales_exactly_the_modules_above_the_limit(sd1_models):
    network = lora_network(sd1_models, rank=4, alpha=2.0, conv_dim="2", conv_alpha="1")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, m in enumerate(network.loras):  # a spread of update sizes
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=generator) * 0.02 * (1 + i % 7))
    norms = {m.lora_name: update_norm(m) for m in network.loras}
    ordered = sorted(norms.values())
    limit = (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2  # half the modules above it
    weights = {m.lora_name: (m.lora_down.weight.clone(), m.lora_up.weight.clone()) for m in network.loras}

    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(limit, torch.device("cpu"))

    capped = {name: min(n, limit) for name, n in norms.items()}
    assert keys_scaled == sum(n > limit for n in norms.values()) > 0
    assert mean_norm == pytest.approx(sum(capped.values()) / len(capped), rel=1e-4)
    assert max_norm == pytest.approx(max(capped.values()), rel=1e-4)
    for m in network.loras:
        down, up = weights[m.lora_name]
        if norms[m.lora_name] > limit:
            assert update_norm(m) == pytest.approx(limit, rel=1e-4)
            root = math.sqrt(limit / norms[m.lora_name])  # both factors scaled alike, directions kept
            torch.testing.assert_close(m.lora_down.weight, down * root, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(m.lora_up.weight, up * root, rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(m.lora_down.weight, down) and torch.equal(m.lora_up.weight, up)


# --- which layers, and their names ------------------------------------------------------------------


@pytest.mark.parametrize("conv_dim", [None, 2], ids=["default", "conv_dim"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_targets_are_exactly_those_of_kohyas_networks_lora(family, conv_dim, sd1_models, sdxl_models):
    models = sd1_models if family == "sd1" else sdxl_models
    options = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": "0.5"}
    network = lora_network(models, rank=4, alpha=2.0, **options)
    reference = kohya_reference(models, with_3x3=conv_dim is not None)
    assert {m.lora_name for m in network.loras} == set(reference)
    if conv_dim is not None:
        assert "3x3" in reference.values()
    for m in network.loras:
        expected = (4, 2.0) if reference[m.lora_name] == "linear" else (2, 0.5)
        assert (m.rank, float(m.alpha)) == expected, m.lora_name


@pytest.mark.parametrize("family, prefixes", [("sd1", {"lora_te", "lora_unet"}),
                                              ("sdxl", {"lora_te1", "lora_te2", "lora_unet"})])
def test_text_encoder_prefixes_follow_the_number_of_text_encoders(family, prefixes, sd1_models, sdxl_models):
    network = lora_network(sd1_models if family == "sd1" else sdxl_models)
    found = {m.lora_name.split("_text_model_")[0] if "_text_model_" in m.lora_name else "lora_unet"
             for m in network.loras}
    assert found == prefixes
    assert all(m.lora_name.startswith(tuple(p + "_" for p in prefixes)) for m in network.loras)


@pytest.mark.parametrize("layout", [tiny.as_transformers4_layout, tiny.as_transformers5_layout],
                         ids=["transformers4", "transformers5"])
def test_text_encoder_names_are_canonical_under_both_transformers_layouts(layout, sd1_models):
    encoder = layout(sd1_models["text_encoder"])
    network = create_network(1.0, 4, 2.0, None, encoder, sd1_models["unet"])
    names = {m.lora_name for m in network.text_encoder_loras}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert names == set(kohya_names(tiny.as_transformers4_layout(sd1_models["text_encoder"]), "lora_te",
                                    KOHYA_TEXT_ENCODER_BLOCKS))


def test_both_transformers_layouts_compute_the_same_with_the_same_file(sd1_models, style_data, tmp_path):
    path = str(tmp_path / "te.safetensors")
    old_layout = tiny.as_transformers4_layout(sd1_models["text_encoder"])
    other = tiny.sd1_models(seed=0)
    new_layout = tiny.as_transformers5_layout(other["text_encoder"])
    ids = sdcalls.collate(style_data[:2])["input_ids"]
    with torch.no_grad():
        base = other["text_encoder"](ids).last_hidden_state
    first = create_network(1.0, 4, 2.0, None, old_layout, sd1_models["unet"])
    first.apply_to(old_layout, sd1_models["unet"], True, False)
    pretend_trained(first).save_weights(path, torch.float32, None)
    second = create_network(1.0, 4, 2.0, None, new_layout, other["unet"])
    second.apply_to(new_layout, other["unet"], True, False)
    assert len(second.load_weights(path).loaded) == len(first.loras)
    with torch.no_grad():
        second.set_enabled(False)
        assert torch.equal(new_layout(ids).last_hidden_state, base)
        second.set_enabled(True)
        assert torch.equal(old_layout(ids).last_hidden_state, new_layout(ids).last_hidden_state)
        assert not torch.allclose(new_layout(ids).last_hidden_state, base, atol=1e-4)


def named(class_name, **children):
    """A module whose class has the given name (how kohya recognises blocks), holding ``children``."""
    module = type(class_name, (nn.Module,), {})()
    for key, child in children.items():
        module.add_module(key, child)
    return module


def sd_scripts_style_unet():
    """A stand-in shaped like sd-scripts' own SDXL U-Net (input_blocks / middle_block / output_blocks)."""
    attention = named("CrossAttention", to_q=nn.Linear(8, 8), to_k=nn.Linear(8, 8), to_v=nn.Linear(8, 8),
                      to_out=nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)]))
    transformer = named("Transformer2DModel", proj_in=nn.Linear(8, 8), proj_out=nn.Linear(8, 8),
                        transformer_blocks=nn.ModuleList([named("BasicTransformerBlock", attn1=attention)]))
    resnet = named("ResnetBlock2D",
                   in_layers=nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1)),
                   emb_layers=nn.Sequential(nn.SiLU(), nn.Linear(16, 8)))
    blocks = [nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))] + [nn.Identity() for _ in range(3)]
    blocks.append(nn.Sequential(resnet, transformer))
    return named("SdxlUNet2DConditionModel", input_blocks=nn.ModuleList(blocks),
                 middle_block=nn.Sequential(named("ResnetBlock2D", skip=nn.Conv2d(8, 8, 1))))


@pytest.mark.parametrize("conv_dim", [None, 2], ids=["default", "conv_dim"])
def test_sd_scripts_own_unet_is_recognised_by_class_name(conv_dim):
    unet = sd_scripts_style_unet()
    options = {} if conv_dim is None else {"conv_dim": str(conv_dim)}
    network = create_network(1.0, 4, 1.0, None, None, unet, **options)
    names = {m.lora_name for m in network.loras}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert names == set(kohya_names(unet, "lora_unet", KOHYA_UNET_BLOCKS + (KOHYA_UNET_CONV_BLOCKS if conv_dim else ()),
                                    with_3x3=conv_dim is not None))
    assert ("lora_unet_input_blocks_4_0_in_layers_2" in names) == (conv_dim is not None)


def test_network_state_dict_uses_kohyas_keys(sd1_models):
    network = lora_network(sd1_models)
    keys = set(network.state_dict())
    lora_keys = {f"{m.lora_name}.{part}" for m in network.loras
                 for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert lora_keys <= keys
    assert all(k.startswith("aclora_") for k in keys - lora_keys), "only our resumable state besides the LoRA keys"


@pytest.mark.parametrize("model", [nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), nn.Sequential(nn.Linear(4, 4))],
                         ids=["no-linear-at-all", "linear-outside-any-target-block"])
def test_a_model_with_no_targetable_layer_is_refused_clearly(model):
    with pytest.raises(ValueError, match="no layer to adapt"):
        create_network(1.0, 4, 1.0, None, None, model)


# --- the forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_fresh_network_leaves_every_output_unchanged(family, sd1_models, sdxl_models, style_data):
    models, sdxl = (sd1_models, False) if family == "sd1" else (sdxl_models, True)
    text_before, unet_before = text_outputs(models, style_data, sdxl), unet_outputs(models, style_data, sdxl)
    network = lora_network(models, rank=4, alpha=4.0, conv_dim="2")
    assert all(m.lora_up.weight.abs().sum() == 0 and m.lora_down.weight.abs().sum() > 0 for m in network.loras)
    for before, after in zip(text_before, text_outputs(models, style_data, sdxl)):
        assert torch.equal(before, after)
    assert torch.equal(unet_outputs(models, style_data, sdxl), unet_before)


def test_the_forward_is_base_plus_multiplier_times_scaled_up_of_down():
    model = Toy()
    base = {name: (layer.weight.detach().clone(), layer.bias.detach().clone())
            for name, layer in model.named_modules() if name in ("stem", "proj", "blocks.0.attn")}
    network = pretend_trained(attach(model, max_rank=3, alpha=1.5, include=list(base)), scale=0.3)
    network.set_multiplier(0.7)
    loras = {lora_path(m.lora_name): m for m in network.loras}
    scale = 0.7 * 1.5 / 3
    x = toy_input()
    with torch.no_grad():
        w, b = base["stem"]
        down, up = loras["stem"].lora_down.weight, loras["stem"].lora_up.weight
        expected = F.conv2d(x, w, b, stride=2, padding=1) + scale * F.conv2d(F.conv2d(x, down, stride=2, padding=1), up)
        torch.testing.assert_close(model.stem(x), expected, rtol=0, atol=1e-5)

        h = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(1))
        w, b = base["proj"]
        down, up = loras["proj"].lora_down.weight, loras["proj"].lora_up.weight
        torch.testing.assert_close(model.proj(h), F.conv2d(h, w, b) + scale * F.conv2d(F.conv2d(h, down), up),
                                   rtol=0, atol=1e-5)

        t = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(2))
        w, b = base["blocks.0.attn"]
        down, up = loras["blocks_0_attn"].lora_down.weight, loras["blocks_0_attn"].lora_up.weight
        torch.testing.assert_close(model.blocks[0]["attn"](t), t @ w.T + b + scale * (t @ down.T @ up.T),
                                   rtol=0, atol=1e-5)


def train_a_few_steps(network, model, steps=5):
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    x, target = toy_input(), torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_multiplier_zero_and_disabling_restore_the_base_output_after_training():
    model = Toy()
    x = toy_input(seed=5)
    with torch.no_grad():
        base = model(x)
    network = attach(model, max_rank=4, alpha=4.0)
    train_a_few_steps(network, model)
    with torch.no_grad():
        trained = model(x)
        assert not torch.allclose(trained, base, atol=1e-4)
        network.set_multiplier(0.0)
        assert torch.equal(model(x), base)
        network.set_multiplier(1.0)
        network.set_enabled(False)
        assert torch.equal(model(x), base)
        network.set_enabled(True)
        assert torch.equal(model(x), trained)


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_merge_to_bakes_in_exactly_what_the_adapter_adds(multiplier):
    model = Toy()
    x = toy_input(seed=6)
    network = attach(model, max_rank=4, alpha=2.0, multiplier=multiplier)
    train_a_few_steps(network, model)
    with torch.no_grad():
        adapted = model(x)
        network.merge_to(None, None, None, torch.float32, "cpu")
        network.set_enabled(False)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)


def single_layer_network(rank=8, **options):
    layer = nn.Linear(16, 8)
    network = pretend_trained(attach(nn.Sequential(layer), max_rank=rank, alpha=float(rank), **options), scale=0.3)
    return layer, network


@pytest.mark.parametrize("option", ["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_act_only_in_training_mode(option):
    layer, network = single_layer_network(**{option: "0.5"})
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        network.eval()
        first, second = layer(x), layer(x)
        network.set_enabled(False)
        base = layer(x)
        network.set_enabled(True)
        network.train()
        noisy = [layer(x) for _ in range(12)]
    assert torch.equal(first, second) and not torch.allclose(first, base, atol=1e-4)
    assert not all(torch.equal(noisy[0], n) for n in noisy[1:]), f"{option} had no effect while training"


def test_dropouts_work_on_conv_and_sequence_layers_and_vanish_in_eval_mode():
    plain, noisy = Toy(), Toy()
    reference = pretend_trained(attach(plain, max_rank=4, alpha=4.0), scale=0.3)
    network = attach(noisy, max_rank=4, alpha=4.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    network.load_state_dict(reference.state_dict())
    x = toy_input(seed=9)
    torch.manual_seed(0)
    with torch.no_grad():
        network.eval()
        torch.testing.assert_close(noisy(x), plain(x), rtol=0, atol=1e-6)
        network.train()
        draws = [noisy(x) for _ in range(6)]
    assert all(d.shape == x.shape[:1] + (3,) for d in draws)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])


def test_module_dropout_near_one_skips_the_module_only_while_training():
    layer, network = single_layer_network(module_dropout=str(1 - 1e-6))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        network.set_enabled(False)
        base = layer(x)
        network.set_enabled(True)
        network.eval()
        assert not torch.allclose(layer(x), base, atol=1e-4)
        network.train()
        for _ in range(10):
            assert torch.equal(layer(x), base)


@pytest.mark.parametrize("option", ["dropout", "rank_dropout"])
def test_dropouts_are_rescaled_so_the_expected_update_is_unchanged(option):
    """Each sample draws its own mask; the mean update over many samples is the eval-mode update."""
    layer, network = single_layer_network(**{option: "0.5"})
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)).expand(20000, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        network.set_enabled(False)
        base = layer(x[:1])
        network.set_enabled(True)
        network.eval()
        expected = layer(x[:1]) - base
        network.train()
        updates = layer(x) - base
    spread = updates.std(dim=0)
    assert (spread > 0).all(), "every sample should draw its own mask"
    error = (updates.mean(dim=0) - expected[0]).abs()
    assert (error < 5 * spread / math.sqrt(len(updates))).all()


def test_a_bfloat16_network_runs_on_the_cpu_and_the_output_keeps_the_base_dtype():
    model = Toy()
    x = toy_input(seed=7)
    network = pretend_trained(attach(model, max_rank=4, alpha=4.0), scale=0.2)
    with torch.no_grad():
        full = model(x)
        network.to(torch.bfloat16)
        assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
        half = model(x)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.02)


def test_a_float32_network_on_a_bfloat16_model_returns_bfloat16():
    model = Toy().to(torch.bfloat16)
    network = pretend_trained(attach(model, max_rank=4, alpha=4.0), scale=0.2)
    network.to(torch.float32)
    with torch.no_grad():
        out = model(toy_input(seed=8).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_a_bfloat16_network_on_the_sd1_unet(sd1_models, style_data):
    network = pretend_trained(lora_network(sd1_models))
    full = unet_outputs(sd1_models, style_data, False)
    network.to(torch.bfloat16)
    half = unet_outputs(sd1_models, style_data, False)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


# --- attach() on any model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (["*"], [], TOY_LAYERS),
        (["blocks.*.attn"], [], {"blocks.0.attn", "blocks.1.attn"}),
        ([r"blocks\.\d+\.mlp\.\d+"], [], {"blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"}),
        (["*"], ["head", "stem"], TOY_LAYERS - {"head", "stem"}),
        (["blocks.*"], [r"blocks\.1\..*", "*.mlp.2"], {"blocks.0.attn", "blocks.0.mlp.0"}),
    ],
    ids=["everything", "glob", "regex", "exclude", "exclude-wins"],
)
def test_attach_selects_linear_and_conv_layers_by_pattern(include, exclude, expected):
    model = Toy()
    network = attach(model, max_rank=2, include=include, exclude=exclude)
    assert isinstance(network, ACLoRANetwork)
    assert {m.lora_name for m in network.loras} == {"lora_" + p.replace(".", "_") for p in expected}
    layers = dict(model.named_modules())
    assert all(layers[p].forward.__self__ is not layers[p] for p in expected), "attach applies the network"


def test_attach_trains_through_the_model():
    model = Toy()
    network = attach(model, max_rank=2, include=["blocks.*"])
    F.mse_loss(model(toy_input()), torch.zeros(4, 3)).backward()
    assert all(m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().sum() > 0 for m in network.loras)


@pytest.mark.parametrize("include, exclude, message", [
    (["blocks.(["], [], "blocks.(["),
    ([""], [], "not a pattern"),
    (["*"], ["[unclosed"], "[unclosed"),
    (["decoder.*"], [], "decoder.*"),
    (["*"], ["*"], "no Linear/Conv2d layer"),
], ids=["bad-regex", "empty", "bad-exclude", "no-match", "all-excluded"])
def test_attach_refuses_bad_or_unmatched_patterns(include, exclude, message):
    with pytest.raises(ValueError) as caught:
        attach(Toy(), max_rank=2, include=include, exclude=exclude)
    assert message in str(caught.value)


def test_attach_refuses_a_model_without_linear_or_conv_layers():
    with pytest.raises(ValueError, match="no Linear/Conv2d layer"):
        attach(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), max_rank=2)


# --- whole runs, replayed as sd-scripts drives them ---------------------------------------------------

RUNS = {"sd1-off": (False, "off"), "sd1-paper": (False, "paper"), "sdxl-off": (True, "off"),
        "sdxl-paper": (True, "paper")}
RUN_DIM, RUN_ALPHA, RUN_EPOCHS, RUN_LR = 4, 4.0, 3, 1e-2


@dataclass
class Run:
    sdxl: bool
    mode: str
    models: Any
    data: list
    net_kwargs: dict
    base_outputs: torch.Tensor
    loss_before: float
    loss_after: float
    result: Any
    file: str

    def fresh_models(self):
        return tiny.sdxl_models(seed=0) if self.sdxl else tiny.sd1_models(seed=0)

    def outputs(self, models=None):
        return unet_outputs(models or self.models, self.data, self.sdxl)


class Runs:
    """Replayed sd-scripts training runs, each done once per test module and shared by the tests that inspect it."""

    def __init__(self, directory):
        self.directory = directory
        self.done: dict[str, Run] = {}

    def get(self, name: str) -> Run:
        if name not in self.done:
            self.done[name] = self._replay(name)
        return self.done[name]

    def _replay(self, name: str) -> Run:
        sdxl, mode = RUNS[name]
        module = importlib.import_module("networks.aclora")
        models = tiny.sdxl_models(seed=0) if sdxl else tiny.sd1_models(seed=0)
        data = tiny.style_dataset(n=4, seed=0)
        base_outputs = unet_outputs(models, data, sdxl)
        loss_before = sdcalls.fixed_batch_loss(None, models, data, sdxl, repeats=2)
        network_args = {"restart_mode": mode}
        path = str(self.directory / f"{name}.safetensors")
        result = replay.replay_training(module, models, data, sdxl=sdxl,
                                        network=replay.NetworkSetup(dim=RUN_DIM, alpha=RUN_ALPHA, args=network_args),
                                        schedule=replay.Schedule(epochs=RUN_EPOCHS, lr=RUN_LR, batch_size=2, seed=0),
                                        saving=replay.Saving(path))
        loss_after = sdcalls.fixed_batch_loss(result.network, models, data, sdxl, repeats=2)
        return Run(sdxl, mode, models, data, dict(network_args or {}), base_outputs, loss_before, loss_after, result,
                   result.saved_files[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(params=list(RUNS))
def run(request, runs):
    """One replayed sd-scripts training run (restart_mode=off, or the default paper mode) and its file."""
    return runs.get(request.param)


@pytest.fixture(params=[name for name, (_, mode) in RUNS.items() if mode == "off"])
def off_run(request, runs):
    """A replayed run without RESTART: its file holds the training factors themselves."""
    return runs.get(request.param)


def test_replayed_training_lowers_the_loss_on_a_fixed_batch(run):
    assert run.result.global_step == RUN_EPOCHS * 2
    assert run.loss_after < run.loss_before * 0.99


def test_replayed_training_restarts_only_in_paper_mode(run):
    restarts = len(run.result.network.history)
    assert (restarts > 0) == (run.mode == "paper")


def test_set_multiplier_zero_restores_the_base_output_after_training(run):
    network = run.result.network
    assert not torch.allclose(run.outputs(), run.base_outputs, atol=1e-4)
    try:
        network.set_multiplier(0.0)
        assert torch.equal(run.outputs(), run.base_outputs)
    finally:
        network.set_multiplier(1.0)


def test_the_saved_file_holds_only_lora_keys_and_sd_scripts_metadata(run):
    from safetensors import safe_open

    with safe_open(run.file, "pt") as fh:
        keys, metadata = set(fh.keys()), fh.metadata()
    assert keys and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert metadata["ss_network_module"] == "networks.aclora"
    assert metadata["ss_base_model_version"] == run.result.metadata["ss_base_model_version"]
    assert "sshs_model_hash" in metadata and "sshs_legacy_hash" in metadata


def reloaded_outputs(run):
    """A fresh network (create_network + apply_to + load_weights, as --network_weights does) on fresh models."""
    models = run.fresh_models()
    network = lora_network(models, rank=RUN_DIM, alpha=RUN_ALPHA, **run.net_kwargs)
    network.load_weights(run.file)
    return run.outputs(models)


def merged_outputs(run):
    """--base_weights: create_network_from_weights(for_inference=True) + merge_to into fresh models, no hooks."""
    models = run.fresh_models()
    text_encoder = text_encoder_of(models)
    network, weights_sd = create_network_from_weights(1.0, run.file, None, text_encoder, models["unet"],
                                                      for_inference=True)
    network.merge_to(text_encoder, models["unet"], weights_sd, torch.float32, "cpu")
    return run.outputs(models)


def test_the_saved_file_reloads_into_a_fresh_network_with_the_same_function(run):
    reloaded = reloaded_outputs(run)
    torch.testing.assert_close(reloaded, merged_outputs(run), rtol=0, atol=1e-5)
    if run.mode == "off":  # nothing is truncated: the file is the trained network
        torch.testing.assert_close(reloaded, run.outputs(), rtol=0, atol=1e-6)
    assert not torch.allclose(reloaded, run.base_outputs, atol=1e-4)


def test_base_weights_merge_equals_the_trained_adapter(off_run):
    torch.testing.assert_close(merged_outputs(off_run), off_run.outputs(), rtol=0, atol=1e-5)


def test_dim_from_weights_continues_training_at_the_files_ranks(runs):
    paper = runs.get("sd1-paper")
    path, data = paper.file, paper.data
    file_weights = load_file(path)
    file_ranks = {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in file_weights.items()
                  if k.endswith(".lora_down.weight")}
    assert max(file_ranks.values()) < RUN_DIM, "the paper-mode file should have ranks below the training rank"
    start_models = paper.fresh_models()
    text_encoder = text_encoder_of(start_models)
    network, weights_sd = create_network_from_weights(1.0, path, None, text_encoder, start_models["unet"],
                                                      for_inference=True)
    network.merge_to(text_encoder, start_models["unet"], weights_sd, torch.float32, "cpu")
    loss_of_file = sdcalls.fixed_batch_loss(None, start_models, data, False, repeats=2)

    models = paper.fresh_models()
    result = replay.replay_training(importlib.import_module("networks.aclora"), models, data, sdxl=False,
                                    network=replay.NetworkSetup(dim=None, alpha=None, args={"restart_mode": "off"},
                                                                weights=path, dim_from_weights=True),
                                    schedule=replay.Schedule(epochs=2, lr=RUN_LR, batch_size=2, seed=1))
    network = result.network
    assert {m.lora_name: m.rank for m in network.loras} == file_ranks
    assert sorted(result.load_info.loaded) == sorted(file_ranks)
    assert sdcalls.fixed_batch_loss(network, models, data, False, repeats=2) < loss_of_file
