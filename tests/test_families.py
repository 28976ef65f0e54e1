"""Model families: a FLUX.1 or SD3 DiT gets sd-scripts' layers and names, options select them as
sd-scripts' options do, an option of another family is refused, and the trainers' calls work.

The DiTs here are stand-ins with sd-scripts' class names and layer paths (tests/dit_stand_ins.py, on
the meta device); tests/test_flux_sd3_sd_scripts.py holds the same against sd-scripts' own models
and LoRA modules.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dit_stand_ins as st
from aclora_ext import OptionError, create_network, create_network_from_weights
from aclora_ext.families import FAMILIES, check_model_family, detect, model_family
from aclora_ext.files.storage import LoRAFileError
from aclora_ext.lora.export import pad_lone_ranks
from helpers import pretend_trained

FLUX_1D1S = {f"lora_unet_double_blocks_0_{s}_{layer}" for s in ("img", "txt")
             for layer in ("mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2")} | {
    f"lora_unet_single_blocks_0_{layer}" for layer in ("linear1", "linear2", "modulation_lin")}


def t5(layers: int = 2):
    """A tiny T5 encoder (gated feed-forward, as T5-XXL v1.1)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=layers, num_heads=2,
                                   feed_forward_proj="gated-gelu"))


def clip(width: int = 16, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=32, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def flux_network(model=None, text_encoders=None, dim=4, alpha=2.0, **args):
    return create_network(1.0, dim, alpha, None, text_encoders if text_encoders is not None else [None, None],
                          model if model is not None else st.flux(), **args)


def sd3_network(model=None, text_encoders=None, dim=4, alpha=2.0, **args):
    return create_network(1.0, dim, alpha, None, text_encoders if text_encoders is not None else [None, None, None],
                          model if model is not None else st.mmdit(), **args)


def ranks(network) -> dict[str, int]:
    return {m.lora_name: m.rank for m in network.loras}


# --- recognising the family ---------------------------------------------------------------------------
def test_each_family_is_recognised_from_the_model_it_is_given(sd1_models, sdxl_models):
    assert detect(st.flux(), [clip(), t5()]).key == "flux"
    assert detect(st.mmdit(), [clip(), clip(), t5()]).key == "sd3"
    assert detect(sd1_models["unet"], [sd1_models["text_encoder"]]).key == "sd"
    assert [f.key for f in FAMILIES][-1] == "sd"  # the fallback comes last


def test_flux_with_two_text_encoders_is_not_taken_for_sdxl():
    network = flux_network(text_encoders=[clip(), t5()])
    assert network.is_sdxl is False
    assert {m.lora_name.split("_")[1] for m in network.text_encoder_loras} == {"te1"}


# --- FLUX.1: layers, names, options -------------------------------------------------------------------
def test_a_flux_dit_gets_lora_flux_layers_and_names_and_nothing_else():
    network = flux_network()
    assert set(ranks(network)) == FLUX_1D1S
    assert set(ranks(network).values()) == {4} and {float(m.alpha) for m in network.loras} == {2.0}
    assert network.train_t5xxl is False


def test_clip_l_is_lora_te1_and_t5_is_lora_te3_only_with_train_t5xxl():
    without = flux_network(text_encoders=[clip(), t5()])
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in ranks(without)
    assert not any(n.startswith("lora_te3_") for n in ranks(without)) and without.train_t5xxl is False
    network = flux_network(text_encoders=[clip(), t5()], train_t5xxl="true")
    te3 = {n for n in ranks(network) if n.startswith("lora_te3_")}
    assert network.train_t5xxl is True
    assert te3 == {f"lora_te3_encoder_block_{b}_layer_{i}_{layer}" for b in range(2) for i, layers in
                   ((0, ("SelfAttention_q", "SelfAttention_k", "SelfAttention_v", "SelfAttention_o")),
                    (1, ("DenseReluDense_wi_0", "DenseReluDense_wi_1", "DenseReluDense_wo"))) for layer in layers}


def test_per_type_ranks_are_maximum_ranks_and_zero_means_no_lora():
    network = flux_network(img_attn_dim="2", txt_mlp_dim="0", single_dim="3", single_mod_dim="0")
    got = ranks(network)
    assert got["lora_unet_double_blocks_0_img_attn_qkv"] == got["lora_unet_double_blocks_0_img_attn_proj"] == 2
    assert "lora_unet_double_blocks_0_txt_mlp_0" not in got and "lora_unet_single_blocks_0_modulation_lin" not in got
    assert got["lora_unet_single_blocks_0_linear1"] == got["lora_unet_single_blocks_0_linear2"] == 3
    assert got["lora_unet_double_blocks_0_img_mod_lin"] == 4
    assert {float(m.alpha) for m in network.loras} == {2.0}  # network_alpha everywhere, as lora_flux


def test_block_selection_and_train_blocks_choose_blocks():
    model = st.flux(double=3, single=4)
    network = flux_network(model, train_double_block_indices="0,2", train_single_block_indices="1-2")
    blocks = {tuple(n.split("_")[2:5]) for n in ranks(network)}
    assert blocks == {("double", "blocks", "0"), ("double", "blocks", "2"), ("single", "blocks", "1"),
                      ("single", "blocks", "2")}
    single_only = flux_network(st.flux(double=3, single=4), train_blocks="single")
    assert all("single_blocks" in n for n in ranks(single_only))
    none = flux_network(st.flux(double=3, single=4), train_double_block_indices="none")
    assert not any("double_blocks" in n for n in ranks(none))


def test_in_dims_add_the_input_layers_at_their_ranks():
    network = flux_network(in_dims="[1,2,0,3,4]")
    got = ranks(network)
    assert {n: got[n] for n in got if "_in" in n and "blocks" not in n} == {
        "lora_unet_img_in": 1, "lora_unet_time_in_in_layer": 2, "lora_unet_time_in_out_layer": 2,
        "lora_unet_guidance_in_in_layer": 3, "lora_unet_guidance_in_out_layer": 3, "lora_unet_txt_in": 4}


def test_network_reg_dims_wins_over_types_and_block_selection():
    network = flux_network(st.flux(double=2, single=2), img_attn_dim="2", train_double_block_indices="0",
                           network_reg_dims="double_blocks_1_img_attn=6,single_blocks_0_=0")
    got = ranks(network)
    assert got["lora_unet_double_blocks_0_img_attn_qkv"] == 2
    assert got["lora_unet_double_blocks_1_img_attn_qkv"] == 6  # block 1 is not selected, the pattern wins
    assert "lora_unet_double_blocks_1_txt_attn_qkv" not in got
    assert not any("single_blocks_0_" in n for n in got)


# --- SD3 ----------------------------------------------------------------------------------------------------
def test_an_sd3_dit_gets_lora_sd3_layers_and_names():
    got = ranks(sd3_network())
    # 10 per joint block, 7 in the last (its context block is pre-only: qkv and modulation)
    assert len(got) == 17
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in got and "lora_unet_joint_blocks_1_context_block_attn_qkv" in got
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in got
    with_attn2 = ranks(sd3_network(st.mmdit(depth=2, self_attention_layers=(0,))))
    assert {"lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_0_x_block_attn2_proj"} <= set(with_attn2)


def test_sd3_text_encoders_are_te1_te2_and_te3_with_train_t5xxl():
    network = sd3_network(text_encoders=[clip(projection=True), clip(24, projection=True), t5()], train_t5xxl="1")
    prefixes = {n.split("_")[1] for n in ranks(network) if n.startswith("lora_te")}
    assert prefixes == {"te1", "te2", "te3"} and network.train_t5xxl is True
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in ranks(network)


def test_sd3_emb_dims_and_the_x_embedder_convolution():
    got = ranks(sd3_network(emb_dims="1,2,3,4,5,6", x_attn_dim="2", train_block_indices="1"))
    assert {n: r for n, r in got.items() if "joint_blocks" not in n} == {
        "lora_unet_context_embedder": 1, "lora_unet_t_embedder_mlp_0": 2, "lora_unet_t_embedder_mlp_2": 2,
        "lora_unet_x_embedder_proj": 3, "lora_unet_y_embedder_mlp_0": 4, "lora_unet_y_embedder_mlp_2": 4,
        "lora_unet_final_layer_adaLN_modulation_1": 5, "lora_unet_final_layer_linear": 6}
    assert not any("joint_blocks_0_" in n for n in got) and got["lora_unet_joint_blocks_1_x_block_attn_qkv"] == 2
    # with conv_dim the 2x2 convolution takes conv_dim and conv_alpha, even where emb_dims says 0 (as lora_sd3)
    network = sd3_network(emb_dims="0,0,0,0,0,0", conv_dim="5", conv_alpha="1.5")
    conv = next(m for m in network.loras if m.lora_name == "lora_unet_x_embedder_proj")
    assert (conv.rank, float(conv.alpha), tuple(conv.lora_down.weight.shape[2:])) == (5, 1.5, (2, 2))


# --- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, key, value, family", [
    (sd3_network, "img_attn_dim", "8", "SD3/SD3.5"),
    (flux_network, "emb_dims", "1,1,1,1,1,1", "FLUX.1"),
    (flux_network, "train_block_indices", "0", "FLUX.1"),
])
def test_an_option_of_another_family_is_refused_naming_key_value_and_what_is_allowed(build, key, value, family):
    with pytest.raises(OptionError) as caught:
        build(**{key: value})
    message = str(caught.value)
    assert key in message and repr(value) in message and f"this model is {family}" in message
    assert "network_reg_dims" in message  # the list of what this family accepts


def test_a_dit_option_on_an_sd_model_is_refused(sd1_models):
    with pytest.raises(OptionError, match=r"train_t5xxl='true' is an option for FLUX\.1 and SD3/SD3\.5 models"):
        create_network(1.0, 4, 1.0, None, sd1_models["text_encoder"], sd1_models["unet"], train_t5xxl="true")


def test_a_block_the_model_does_not_have_is_refused_naming_the_range():
    with pytest.raises(OptionError, match=r"train_single_block_indices=0,5 .* 2 single blocks; allowed: indices 0-1"):
        flux_network(st.flux(1, 2), train_single_block_indices="0,5")


def test_split_qkv_is_refused_saying_why():
    with pytest.raises(OptionError) as caught:
        flux_network(split_qkv="True")
    assert "split_qkv=True" in str(caught.value) and "a third" in str(caught.value)
    assert flux_network(split_qkv="false").loras


# --- files --------------------------------------------------------------------------------------------------
def test_model_family_reads_files_of_every_family():
    assert model_family(FLUX_1D1S | {"lora_te1_text_model_encoder_layers_0_mlp_fc1"}) == "FLUX.1"
    assert model_family({"lora_unet_joint_blocks_0_x_block_attn_qkv"}) == "SD3"
    assert model_family({"lora_te1_x", "lora_te2_x", "lora_te3_x"}) == "SD3"
    assert model_family({"lora_te1_x", "lora_te2_x"}) == "SDXL"
    assert model_family({"lora_te_x", "lora_unet_down_blocks_0_attentions_0_proj_in"}) == "SD1.x/2.x"
    assert model_family({"lora_te1_text_model_encoder_layers_0_mlp_fc1"}) is None  # SDXL, FLUX.1 or SD3


def test_a_flux_file_is_refused_by_an_sd3_model(tmp_path):
    path = str(tmp_path / "flux.safetensors")
    flux_network(restart_mode="off").save_weights(path, torch.float32, {})
    with pytest.raises(LoRAFileError, match="for a FLUX.1 model, but the model given is SD3"):
        sd3_network().load_weights(path)
    with pytest.raises(LoRAFileError, match="for a FLUX.1 model"):
        check_model_family(load_file(path), ["lora_unet_joint_blocks_0_x_block_attn_qkv"], "x")


def test_a_flux_file_builds_the_same_network_from_weights(tmp_path):
    path = str(tmp_path / "flux.safetensors")
    source = pretend_trained(flux_network(st.flux(1, 2), text_encoders=[clip(), t5()], train_t5xxl="true",
                                          single_dim="2", restart_mode="off"))
    source.save_weights(path, torch.float32, {"ss_base_model_version": "flux1"})
    network, weights = create_network_from_weights(1.0, path, None, [clip(), t5()], st.flux(1, 2))
    assert ranks(network) == ranks(source) and network.train_t5xxl is True
    assert len(weights) == 3 * len(ranks(source))


# --- what the trainers call ---------------------------------------------------------------------------------
def test_the_trainers_calls_work_with_cached_text_encoder_outputs():
    """flux/sd3_train_network read train_t5xxl unguarded, pass text_encoder=None to the hooks when the outputs
    are cached, and call set_multiplier unguarded around diff-output preservation's prior."""
    model = st.flux()
    network = flux_network(model, text_encoders=[clip(), t5()])
    assert network.train_t5xxl is False
    network.apply_to([clip(), t5()], model, False, True)
    network.prepare_grad_etc(None, model)
    network.on_epoch_start(None, model)
    network.on_step_start(None, model)
    network.set_multiplier(0.0)
    assert {m.multiplier for m in network.loras} == {0.0}
    network.set_multiplier(1.0)
    assert not hasattr(network, "weight_norms")  # else grad_norms and combined_weight_norms are called too
    assert network.text_encoder_loras == [] and len(network.unet_loras) == len(FLUX_1D1S)


def test_the_lora_modules_are_no_children_of_the_dit():
    """Block swap moves every submodule of a block: a LoRA inside a block would be swapped with it."""
    model = st.flux(double=2, single=2)
    network = flux_network(model)
    network.apply_to(None, model, False, True)
    inside = {id(p) for p in model.parameters()}
    assert not any(id(p) in inside for p in network.parameters())
    assert all(m.org_module.weight is dict(model.named_parameters())[_path(m.lora_name) + ".weight"]
               for m in network.loras)


def _path(name: str) -> str:
    model = st.flux(double=2, single=2)
    return next(p for p, _ in model.named_modules() if "lora_unet_" + p.replace(".", "_") == name)


# --- the export's padding -----------------------------------------------------------------------------------
def _kohya(ranks_by_name: dict[str, int], alpha: float = 2.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, rank in ranks_by_name.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, 6, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(5, rank, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def _updates(tensors):
    names = {k.split(".")[0] for k in tensors}
    return {n: tensors[f"{n}.lora_up.weight"] @ tensors[f"{n}.lora_down.weight"] * (
        float(tensors[f"{n}.alpha"]) / tensors[f"{n}.lora_down.weight"].shape[0]) for n in names}


@pytest.mark.parametrize("layout, padded, after", [
    ({"lora_unet_a": 4, "lora_unet_b": 4, "lora_unet_c": 2}, {"lora_unet_c": 2}, {4}),
    ({"lora_unet_a": 4, "lora_unet_b": 4, "lora_unet_c": 8}, {"lora_unet_a": 4, "lora_unet_b": 4}, {8}),
    ({"lora_unet_a": 2, "lora_unet_b": 4}, {"lora_unet_a": 2}, {4}),
    ({"lora_unet_a": 4, "lora_unet_b": 2, "lora_unet_c": 1}, {}, {4, 2, 1}),
    ({"lora_unet_a": 4, "lora_unet_b": 4, "lora_te1_c": 2}, {}, {4, 2}),
], ids=["one-lower", "one-higher", "two-modules", "two-differ", "parts-apart"])
def test_a_part_with_exactly_one_odd_rank_is_padded_to_one_rank_with_the_same_update(layout, padded, after):
    tensors = _kohya(layout)
    before = _updates(tensors)
    assert pad_lone_ranks(tensors) == padded
    assert {tensors[f"{n}.lora_down.weight"].shape[0] for n in layout} == after
    for name, update in _updates(tensors).items():
        torch.testing.assert_close(update, before[name], rtol=1e-6, atol=1e-6)
    assert {float(tensors[f"{n}.alpha"]) for n in layout} == {2.0}


def test_a_padded_file_says_so_and_loads_back_at_the_modules_own_rank(tmp_path):
    path = str(tmp_path / "padded.safetensors")
    source = pretend_trained(flux_network(img_attn_dim="2", network_reg_dims="double_blocks_0_img_attn_proj=2",
                                          img_mod_dim="4", restart_mode="off"))
    # only img_attn_qkv and img_attn_proj are at rank 2: two modules differ, no padding
    source.save_weights(path, torch.float32, {})
    assert json.loads(load_file_metadata(path).get("aclora_padded", "{}")) == {}
    lone = pretend_trained(flux_network(network_reg_dims="double_blocks_0_img_attn_proj=2", restart_mode="off"))
    lone.save_weights(path, torch.float32, {})
    assert json.loads(load_file_metadata(path)["aclora_padded"]) == {"lora_unet_double_blocks_0_img_attn_proj": 2}
    assert load_file(path)["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"].shape[0] == 4
    again = flux_network(network_reg_dims="double_blocks_0_img_attn_proj=2", restart_mode="off")
    again.load_weights(path)
    assert ranks(again) == ranks(lone)
    x = torch.randn(5 * 3072, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the updates on random inputs (forming the 3072-wide updates is slow)
        for a, b in zip(lone.loras, again.loras):
            torch.testing.assert_close(b.up_matrix() @ (b.down_matrix() @ x[: b.in_dim]) * b.scale,
                                       a.up_matrix() @ (a.down_matrix() @ x[: a.in_dim]) * a.scale,
                                       rtol=1e-5, atol=1e-6)


def load_file_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return dict(fh.metadata() or {})
