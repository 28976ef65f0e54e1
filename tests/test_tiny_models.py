"""Tests of the test harness itself: tiny models, SDXL module shapes, CLIP layouts,
and the sd-scripts replay driven by a minimal stand-in network module."""

from __future__ import annotations

import math
import types
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from aclora_ext.harness import architectures, replay, sdcalls, tiny

# ---------------------------------------------------------------------------
# A minimal kohya-contract LoRA on Linear layers, only for exercising the harness
# ---------------------------------------------------------------------------

TARGETS = {"lora_unet": ("Transformer2DModel",), "lora_te": ("CLIPAttention", "CLIPMLP")}


class StandInLoRA(nn.Module):
    """out = org(x) + up(down(x)) * alpha / dim; the original Linear's forward is replaced."""

    def __init__(self, org: nn.Linear, dim: int, alpha: float):
        super().__init__()
        self.lora_down = nn.Linear(org.in_features, dim, bias=False)
        self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim
        self.org_forward, self.org = org.forward, [org]

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.scale


class StandInNetwork(nn.Module):
    """Records every contract call it receives, in order, in ``calls``."""

    def __init__(self, text_encoders, unet, dim, alpha, calls):
        super().__init__()
        self.calls, self.dim, self.alpha, self.seen = calls, dim, alpha, {}
        te_prefixes = ["lora_te"] if len(text_encoders) == 1 else ["lora_te1", "lora_te2"]
        roots = [("lora_unet", unet, TARGETS["lora_unet"])]
        for prefix, te in zip(te_prefixes, text_encoders):
            roots.append((prefix, tiny.as_transformers4_layout(te), TARGETS["lora_te"]))
        self.candidates = {}
        for prefix, root, classes in roots:
            for shape in architectures.kohya_target_shapes(root, prefix, classes):
                if not shape.kernel_size:
                    self.candidates[shape.lora_name] = _find_linear(root, prefix, shape.lora_name)

    def prepare_network(self, args):
        self.calls.append("prepare_network")
        self.seen["max_train_steps_at_prepare"] = args.max_train_steps
        self.args = args

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        self.calls.append("apply_to")
        for name, org in self.candidates.items():
            if (apply_unet if name.startswith("lora_unet") else apply_text_encoder):
                lora = StandInLoRA(org, self.dim, self.alpha)
                org.forward = lora.forward
                self.add_module(name, lora)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        self.calls.append("prepare_optimizer_params")
        self.seen["lrs"] = (text_encoder_lr, unet_lr, default_lr)
        return [{"params": list(self.parameters()), "lr": unet_lr or default_lr}], ["all"]

    def prepare_grad_etc(self, text_encoder, unet):
        self.calls.append("prepare_grad_etc")
        self.seen["unet_frozen_at_prepare_grad"] = not any(p.requires_grad for p in unet.parameters())
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.calls.append("on_epoch_start")
        self.train()

    def on_step_start(self, text_encoder, unet):
        self.calls.append("on_step_start")

    def get_trainable_params(self):
        self.calls.append("get_trainable_params")
        return self.parameters()

    def apply_max_norm_regularization(self, max_norm, device):
        self.calls.append("apply_max_norm_regularization")
        return 0, 0.0, 0.0

    def load_weights(self, file):
        self.calls.append("load_weights")
        return self.load_state_dict(load_file(file), strict=False)

    def save_weights(self, file, dtype, metadata):
        self.calls.append("save_weights")
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, file, metadata)


def _find_linear(root, prefix, lora_name):
    for name, module in root.named_modules():
        if f"{prefix}.{name}".replace(".", "_") == lora_name:
            return module
    raise KeyError(lora_name)


def stand_in_module(calls=None):
    """A fake ``networks.xxx`` module exposing ``create_network`` that records calls."""
    calls = [] if calls is None else calls

    def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
        calls.append("create_network")
        encoders = text_encoder if isinstance(text_encoder, list) else [text_encoder]
        network = StandInNetwork(encoders, unet, network_dim, network_alpha, calls)
        network.seen["kwargs"] = dict(kwargs)
        return network

    return types.SimpleNamespace(create_network=create_network, calls=calls)


# ---------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------


def _class_counts(model):
    return Counter(type(module).__name__ for module in model.modules())


@pytest.mark.parametrize("builder", [tiny.tiny_sd1_unet, tiny.tiny_sdxl_unet])
def test_tiny_unets_have_the_classes_kohya_targets(builder):
    counts = _class_counts(builder())
    for name in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
        assert counts[name] > 0, name


def test_tiny_sdxl_unet_is_sdxl_shaped(sdxl_models):
    unet = sdxl_models["unet"]
    te1, te2 = sdxl_models["text_encoders"]
    assert unet.config.addition_embed_type == "text_time"
    assert max(unet.config.transformer_layers_per_block) > 1
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    added_dim = te2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    assert unet.config.projection_class_embeddings_input_dim == added_dim
    assert [type(te).__name__ for te in (te1, te2)] == ["CLIPTextModel", "CLIPTextModelWithProjection"]


def test_base_models_arrive_frozen(sd1_models):
    assert not any(p.requires_grad for p in sd1_models["unet"].parameters())
    assert not any(p.requires_grad for p in sd1_models["text_encoder"].parameters())


def test_style_dataset_is_deterministic_and_shares_a_style():
    data = tiny.style_dataset(n=6, seed=3)
    again = tiny.style_dataset(n=6, seed=3)
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(data, again))
    assert all(sample["input_ids"][0] == tiny.TRIGGER_TOKEN_ID for sample in data)
    assert all(sample["input_ids"][-1] == tiny.EOS_TOKEN_ID for sample in data)
    flat = torch.stack([sample["latents"].flatten() for sample in data])
    singular = torch.linalg.svdvals(flat)
    assert singular[0] ** 2 / singular.pow(2).sum() > 0.4, "a shared component should dominate"
    train, held_out = tiny.style_split(4, 2, seed=3)
    assert torch.equal(train[0]["latents"], data[0]["latents"])
    assert torch.equal(held_out[1]["latents"], data[5]["latents"])


def test_building_models_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny.sdxl_models(seed=2)
    assert torch.equal(torch.rand(3), expected)


def test_pretrained_base_denoises_and_is_built_once(sd1_pretrained_models, style_data):
    batch = sdcalls.collate(style_data[:8])
    random_loss = sdcalls.fixed_batch_loss(None, tiny.sd1_models(seed=0), batch, False, seed=1)
    pretrained_loss = sdcalls.fixed_batch_loss(None, sd1_pretrained_models, batch, False, seed=1)
    assert random_loss > 1.0 and pretrained_loss < 0.5, (random_loss, pretrained_loss)
    again = tiny.sd1_models(seed=0, pretrained=True)
    first_state, second_state = sd1_pretrained_models["unet"].state_dict(), again["unet"].state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    assert not any(p.requires_grad for p in again["unet"].parameters()) and not again["unet"].training


# ---------------------------------------------------------------------------
# the real SDXL module set
# ---------------------------------------------------------------------------


def test_sdxl_module_shapes_match_kohya_counts_and_shapes():
    shapes = architectures.sdxl_module_shapes()
    by_name = {shape.lora_name: shape for shape in shapes}
    assert len(shapes) == len(by_name) == 986
    parts = Counter(shape.lora_name.split("_")[1] for shape in shapes)
    assert parts == {"unet": 722, "te1": 72, "te2": 192}
    attn2_k = by_name["lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k"]
    assert (attn2_k.out_features, attn2_k.in_features, attn2_k.kernel_size) == (1280, 2048, ())
    assert by_name["lora_unet_mid_block_attentions_0_proj_in"][1:3] == (1280, 1280)
    assert by_name["lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_ff_net_0_proj"][1:3] == (10240, 1280)
    assert by_name["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"][1:3] == (768, 768)
    assert by_name["lora_te2_text_model_encoder_layers_31_mlp_fc1"][1:3] == (5120, 1280)


# ---------------------------------------------------------------------------
# both transformers spellings of CLIPTextModel
# ---------------------------------------------------------------------------


def test_clip_layouts_are_equivalent_and_spelled_as_each_version():
    base = tiny.tiny_clip_text_encoder(seed=1)
    old, new = tiny.as_transformers4_layout(base), tiny.as_transformers5_layout(base)
    assert type(old).__name__ == type(new).__name__ == "CLIPTextModel"
    assert tiny.has_text_model_level(old) and not tiny.has_text_model_level(new)
    assert "text_model.encoder.layers.0.self_attn.q_proj" in dict(old.named_modules())
    assert "encoder.layers.0.self_attn.q_proj" in dict(new.named_modules())
    assert tiny.as_transformers4_layout(old) is old and tiny.as_transformers5_layout(new) is new
    round_trip = tiny.as_transformers5_layout(old)
    assert not tiny.has_text_model_level(round_trip)
    ids = torch.tensor([[tiny.TRIGGER_TOKEN_ID, 20, 30, tiny.EOS_TOKEN_ID]])
    outputs = [m(ids, output_hidden_states=True) for m in (base, old, new, round_trip)]
    for out in outputs[1:]:
        assert torch.equal(out.last_hidden_state, outputs[0].last_hidden_state)
        assert len(out.hidden_states) == len(outputs[0].hidden_states)
    te2 = tiny.tiny_clip_text_encoder(with_projection=True)
    assert tiny.as_transformers4_layout(te2) is te2 and tiny.as_transformers5_layout(te2) is te2


# ---------------------------------------------------------------------------
# the replay of train_network.py
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_replay_trains_the_stand_in_and_loss_goes_down(sdxl, sd1_models, sdxl_models, style_data):
    models = sdxl_models if sdxl else sd1_models
    batch = sdcalls.collate(style_data[:8])
    before = sdcalls.fixed_batch_loss(None, models, batch, sdxl, seed=1, repeats=2)
    outputs_before = sdcalls.model_outputs(models, batch, sdxl, seed=1)
    result = replay.replay_training(stand_in_module(), models, style_data, sdxl=sdxl,
                                    network=replay.NetworkSetup(dim=4, alpha=4.0),
                                    schedule=replay.Schedule(epochs=6, batch_size=4, lr=1e-2))
    after = sdcalls.fixed_batch_loss(result.network, models, batch, sdxl, seed=1, repeats=2)
    # SDXL learns less: like the real one, its full-resolution level has no attention to adapt.
    assert after < (0.95 if sdxl else 0.9) * before, (before, after)
    assert not torch.equal(sdcalls.model_outputs(models, batch, sdxl, seed=1), outputs_before)
    assert not any(p.requires_grad for p in models["unet"].parameters())
    assert all(p.requires_grad for p in result.network.parameters())


def test_replay_calls_hooks_in_sd_scripts_order(sd1_models, style_data, tmp_path):
    module = stand_in_module()
    result = replay.replay_training(
        module,
        sd1_models,
        style_data,
        sdxl=False,
        network=replay.NetworkSetup(args={"foo": "1"}),
        schedule=replay.Schedule(epochs=2, batch_size=2, gradient_accumulation_steps=2, scale_weight_norms=1.0),
        saving=replay.Saving(str(tmp_path / "style.safetensors"), every_n_epochs=1),
    )
    batches, steps_per_epoch = 8, 4
    expected_epoch = ["on_epoch_start"]
    for i in range(batches):
        clip = ["get_trainable_params"] if i % 2 == 1 else []  # gradients sync every 2nd micro-batch
        expected_epoch += ["on_step_start", *clip, "apply_max_norm_regularization"]
    expected = ["create_network", "prepare_network", "apply_to", "prepare_optimizer_params", "prepare_grad_etc"]
    expected += expected_epoch + ["save_weights"] + expected_epoch + ["save_weights"]
    assert module.calls == expected
    network = result.network
    assert network.seen["max_train_steps_at_prepare"] == sdcalls.SD_SCRIPTS_DEFAULT_MAX_TRAIN_STEPS
    assert result.args.max_train_steps == result.global_step == 2 * steps_per_epoch
    assert network.seen["unet_frozen_at_prepare_grad"]
    assert network.seen["kwargs"] == {"foo": "1", "dropout": None}
    assert [p.split("/")[-1] for p in result.saved_files] == ["style-000001.safetensors", "style.safetensors"]
    with safe_open(result.saved_files[0], "pt") as handle:
        first = handle.metadata()
    with safe_open(result.saved_files[1], "pt") as handle:
        last = handle.metadata()
    assert (first["ss_epoch"], first["ss_steps"], last["ss_epoch"], last["ss_steps"]) == ("1", "4", "2", "8")
    assert last["ss_network_args"] == '{"foo": "1", "dropout": null}'
    assert last["ss_base_model_version"] == "sd_v1" and last["ss_num_epochs"] == "2"


def test_replay_stops_at_max_train_steps_and_is_deterministic(sd1_models, style_data):
    kwargs = {"sdxl": False, "schedule": replay.Schedule(max_train_steps=5, batch_size=4)}
    first = replay.replay_training(stand_in_module(), sd1_models, style_data, **kwargs)
    assert first.args.max_train_epochs is None and first.num_train_epochs == 2
    assert first.global_step == 5 and len(first.losses) == 5
    again = replay.replay_training(stand_in_module(), tiny.sd1_models(seed=0), style_data, **kwargs)
    assert again.losses == first.losses


def _with_network_patch(module, patch):
    """Wrap ``module.create_network`` so each network it returns is patched by ``patch(network)``."""
    original = module.create_network

    def create_network(*args, **kwargs):
        network = original(*args, **kwargs)
        patch(network)
        return network

    module.create_network = create_network
    return module


def test_replay_falls_back_to_two_argument_prepare_optimizer_params(sd1_models, style_data):
    received = []

    def two_arguments(network):
        def prepare(te_lr, unet_lr):
            received.append((te_lr, unet_lr))
            return [{"params": list(network.parameters())}]

        network.prepare_optimizer_params = prepare

    module = _with_network_patch(stand_in_module(), two_arguments)
    result = replay.replay_training(
        module, sd1_models, style_data, sdxl=False, network=replay.NetworkSetup(train_text_encoder=False),
        schedule=replay.Schedule(max_train_steps=1, text_encoder_lr=5e-4)
    )
    assert received == [(5e-4, None)] and result.args.text_encoder_lr == [5e-4]
    assert result.lr_descriptions is None and result.global_step == 1
    assert all(name.startswith("lora_unet") for name, _ in result.network.named_children())


def test_replay_prefers_multiple_te_lrs_and_passes_the_list(sdxl_models, style_data):
    received = []

    def multiple(network):
        def prepare(te_lrs, unet_lr, default_lr):
            received.append((te_lrs, unet_lr, default_lr))
            return network.prepare_optimizer_params(None, unet_lr, default_lr)

        network.prepare_optimizer_params_with_multiple_te_lrs = prepare

    module = _with_network_patch(stand_in_module(), multiple)
    replay.replay_training(
        module, sdxl_models, style_data, sdxl=True,
        schedule=replay.Schedule(max_train_steps=1, text_encoder_lr=[1e-4, 2e-4], unet_lr=3e-4)
    )
    assert received == [([1e-4, 2e-4], 3e-4, 1e-3)]


def test_replay_loads_network_weights_after_apply_to(sd1_models, style_data, tmp_path):
    path = str(tmp_path / "first.safetensors")
    first = replay.replay_training(
        stand_in_module(), sd1_models, style_data, sdxl=False, schedule=replay.Schedule(max_train_steps=2),
        saving=replay.Saving(path)
    )
    module = stand_in_module()
    second = replay.replay_training(
        module, tiny.sd1_models(seed=0), style_data, sdxl=False, network=replay.NetworkSetup(weights=path),
        schedule=replay.Schedule(max_train_steps=1, lr=0.0)
    )
    assert module.calls[:4] == ["create_network", "prepare_network", "apply_to", "load_weights"]
    assert not second.load_info.unexpected_keys
    for (name, trained), (_, loaded) in zip(first.network.state_dict().items(), second.network.state_dict().items()):
        assert torch.equal(trained, loaded), name
