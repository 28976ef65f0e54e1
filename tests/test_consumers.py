"""The exported file is read unchanged by the programs people load LoRAs with.

1. diffusers: ``load_lora_weights`` + ``fuse_lora`` on tiny SD1.x-like and
   SDXL-like pipelines give the same U-Net and text-encoder weights as merging
   the file with our ``merge_to``, with diffusers-style U-Net names and with
   sd-scripts' SDXL names (``lora_unet_input_blocks_4_1_...``).
   Tolerance: rtol 1e-5 / atol 1e-6 (both add alpha/r * up @ down in float32;
   measured on CPU: bit-identical). This holds because every module of the file
   carries the same alpha: diffusers 0.42 turns per-module alphas into a peft
   ``alpha_pattern`` whose keys do not match the module names (U-Net attention
   keys keep the old ``processor.to_q_lora`` spelling, text-encoder keys are cut
   to the parent module), so a module whose alpha is not the file's most common
   one is scaled with the most common one (kohya resize_lora's alpha = k*alpha/R
   files were off by up to 25% here).
   diffusers 0.32 (sd-scripts' pinned stack) cannot read the U-Net part of any
   LoRA whose modules have different ranks at its alpha: its
   ``_maybe_adjust_config`` then sets every U-Net module's alpha to its rank
   (scale 1) whatever the file says (text encoders are not affected). No alpha
   convention is read right by both 0.32 and current releases, so where that
   behaviour is present (probed, not guessed from the version) the U-Net is
   checked against exactly that: the file merged at scale 1.
2. A1111 / ComfyUI: re-implemented here from what they do with a kohya file
   (layer found from the key by the kohya name; update alpha / down.shape[0] *
   up @ down, 3x3 convs composed as convolutions), checked for every key against
   the trained network's update at its signal rank (an SVD here) and against the
   output of the layer under a network built from the file; and no key of the
   file is one those loaders would leave unused.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from aclora_ext import create_network, create_network_from_weights
from aclora_ext.harness import tiny

# diffusers' fused weights against merge_to's.
FUSE_RTOL, FUSE_ATOL = 1e-5, 1e-6
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


# --- building the pipelines offline -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A CLIPTokenizer from a six-entry vocabulary and an empty merge list written to a temp dir."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                         layers_per_block=1)


def sd1_pipeline(models, tokenizer):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                   unet=models["unet"], scheduler=PNDMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(models, tokenizer):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te1, te2 = models["text_encoders"]
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=models["unet"], scheduler=EulerDiscreteScheduler())


def diffusers_forces_unit_scale_on_mixed_ranks() -> bool:
    """True where diffusers' U-Net loader sets alpha = rank for every module once ranks differ (0.32)."""
    import diffusers.loaders.peft as loader

    adjust = getattr(loader, "_maybe_adjust_config", None)
    if adjust is None:
        return False
    probe = adjust({"r": 4, "lora_alpha": 1.0, "rank_pattern": {"a": 2, "b": 8}, "alpha_pattern": {},
                    "target_modules": ["a", "b", "c"]})
    return probe["lora_alpha"] == 4


def as_diffusers_reads_the_unet(path) -> dict:
    """The file's tensors, with every U-Net alpha replaced by the scale diffusers applies to it."""
    tensors = load_file(path)
    ranks = {k.split(".")[0]: v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    unet = [r for name, r in ranks.items() if name.startswith("lora_unet_")]
    common = max(set(unet), key=unet.count) if unet else None
    # it adjusts when two or more U-Net modules have another rank than the most common one
    if not diffusers_forces_unit_scale_on_mixed_ranks() or sum(r != common for r in unet) < 2:
        return tensors
    return {k: torch.tensor(float(ranks[k.split(".")[0]])) if k.startswith("lora_unet_") and k.endswith(".alpha")
            else v for k, v in tensors.items()}


def fused_by_diffusers(pipe, path) -> None:
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, removes the LoRA layers


def merged_by_us(models, text_encoder, weights: dict):
    network, _ = create_network_from_weights(1.0, None, None, text_encoder, models["unet"], weights_sd=weights,
                                             for_inference=True)
    network.merge_to(text_encoder, models["unet"], weights, torch.float32, "cpu")
    return network


def assert_same_weights(got: nn.Module, want: nn.Module, base: nn.Module, adapted: set) -> None:
    """Every parameter equal within the tolerance; the changed ones are exactly the adapted layers' weights."""
    got_sd, want_sd, base_sd = got.state_dict(), want.state_dict(), base.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for key, value in want_sd.items():
        torch.testing.assert_close(got_sd[key], value, rtol=FUSE_RTOL, atol=FUSE_ATOL, msg=key)
    changed = {k for k, v in want_sd.items() if not torch.equal(v, base_sd[k])}
    assert changed == adapted


def adapted_weights(network, part_prefixes, layers: dict) -> set:
    """The state-dict keys of the weights of the network's layers whose LoRA name starts with a prefix."""
    by_layer = {id(module): path for path, module in layers.items()}
    return {by_layer[id(m.org_module)] + ".weight" for m in network.loras if m.lora_name.startswith(part_prefixes)}


def assert_diffusers_fuses_it_like_our_merge(path, sdxl: bool, tokenizer, ours=None) -> None:
    """diffusers' load_lora_weights + fuse_lora of ``path`` on a tiny pipeline gives, weight for weight, what
    our merge_to of ``ours`` (default: the same file) gives; the other weights stay the base's."""
    make = tiny.sdxl_models if sdxl else tiny.sd1_models
    pipe = (sdxl_pipeline if sdxl else sd1_pipeline)(make(seed=0), tokenizer)
    fused_by_diffusers(pipe, path)
    reference, base = make(seed=0), make(seed=0)
    text_encoders = reference["text_encoders"] if sdxl else [reference["text_encoder"]]
    merged = merged_by_us(reference, reference["text_encoders"] if sdxl else reference["text_encoder"],
                          as_diffusers_reads_the_unet(ours or path))
    assert_same_weights(pipe.unet, reference["unet"], base["unet"],
                        adapted_weights(merged, "lora_unet", dict(reference["unet"].named_modules())))
    pipe_encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    base_encoders = base["text_encoders"] if sdxl else [base["text_encoder"]]
    prefixes = ["lora_te1_", "lora_te2_"] if sdxl else ["lora_te_"]
    for got, want, before, prefix in zip(pipe_encoders, text_encoders, base_encoders, prefixes):
        assert_same_weights(got, want, before, adapted_weights(merged, prefix, dict(want.named_modules())))


# --- diffusers -------------------------------------------------------------------------------------------
def test_diffusers_fuses_an_sd1_file_like_merge_to(tmp_path, sd1_models, planted_network, tokenizer):
    network, _ = planted_network(sd1_models, conv_dim="4", conv_alpha="1")
    path = tmp_path / "sd1.safetensors"
    network.save_weights(str(path))
    assert len({v.shape[0] for k, v in load_file(path).items() if k.endswith("lora_down.weight")}) > 1
    assert_diffusers_fuses_it_like_our_merge(path, False, tokenizer)


@pytest.mark.parametrize("odd_rank", [2, 8], ids=["one-lower", "one-higher"])
def test_diffusers_fuses_an_sd1_file_with_one_odd_rank_per_part_like_merge_to(tmp_path, sd1_models, tokenizer,
                                                                               odd_rank):
    """One U-Net and one text-encoder module at another rank: the export pads each part to one rank (diffusers
    0.32 reads that case right for SD1 files anyway; the padding must not change what it loads)."""
    from helpers import pretend_trained

    network = pretend_trained(create_network(
        1.0, 4, 2.0, None, sd1_models["text_encoder"], sd1_models["unet"], restart_mode="off",
        network_reg_dims=f"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q={odd_rank},"
                         f"layers_0_self_attn_q_proj={odd_rank}"))
    path = tmp_path / "sd1.safetensors"
    network.save_weights(str(path))
    assert {v.shape[0] for k, v in load_file(path).items() if k.endswith("lora_down.weight")} == {max(4, odd_rank)}
    assert_diffusers_fuses_it_like_our_merge(path, False, tokenizer)


def sd_scripts_sdxl_name(name: str, layers_per_block: int) -> str:
    """A diffusers-layout U-Net module name in sd-scripts' SDXL (sgm) spelling.

    sgm numbers the blocks of each resolution consecutively: a down level has
    layers_per_block resnets plus its downsampler, an up level layers_per_block + 1
    resnets (with the upsampler), and index 1 inside a block is its attention.
    Real SDXL (layers_per_block 2): down_blocks.i.attentions.j <-> input_blocks.(3i+j+1).1,
    mid_block.attentions.0 <-> middle_block.1, up_blocks.i.attentions.j <-> output_blocks.(3i+j).1.
    """
    per_level = layers_per_block + 1
    name = re.sub(r"^lora_unet_down_blocks_(\d+)_attentions_(\d+)_",
                  lambda g: f"lora_unet_input_blocks_{int(g[1]) * per_level + int(g[2]) + 1}_1_", name)
    name = re.sub(r"^lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_", name)
    return re.sub(r"^lora_unet_up_blocks_(\d+)_attentions_(\d+)_",
                  lambda g: f"lora_unet_output_blocks_{int(g[1]) * per_level + int(g[2])}_1_", name)


def test_sd_scripts_sdxl_names_follow_the_real_sdxl_layout():
    assert sd_scripts_sdxl_name("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 2) == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert sd_scripts_sdxl_name("lora_unet_down_blocks_2_attentions_1_proj_in", 2) == \
        "lora_unet_input_blocks_8_1_proj_in"
    assert sd_scripts_sdxl_name("lora_unet_mid_block_attentions_0_proj_out", 2) == "lora_unet_middle_block_1_proj_out"
    assert sd_scripts_sdxl_name("lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_ff_net_2", 2) == \
        "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2"
    assert sd_scripts_sdxl_name("lora_unet_up_blocks_1_attentions_0_proj_in", 2) == \
        "lora_unet_output_blocks_3_1_proj_in"


@pytest.mark.parametrize("naming", ["diffusers", "sd-scripts"])
def test_diffusers_fuses_an_sdxl_file_like_merge_to(naming, tmp_path, sdxl_models, planted_network, tokenizer):
    """diffusers maps sd-scripts' input/middle/output block numbers back with the U-Net config's
    layers_per_block (1 in the tiny SDXL U-Net, so input_blocks.(2i+j+1) here)."""
    network, _ = planted_network(sdxl_models)
    path = tmp_path / "sdxl.safetensors"
    network.save_weights(str(path))
    layers_per_block = sdxl_models["unet"].config.layers_per_block
    if naming == "sd-scripts":
        renamed = {sd_scripts_sdxl_name(k, layers_per_block): v for k, v in load_file(path).items()}
        assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
        assert not any(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
                       for k in renamed)
        path = tmp_path / "sdxl-sgm.safetensors"
        save_file(renamed, str(path))

    assert_diffusers_fuses_it_like_our_merge(path, True, tokenizer, ours=tmp_path / "sdxl.safetensors")


# --- A1111 / ComfyUI -----------------------------------------------------------------------------------
def kohya_layer_map(unet: nn.Module, text_encoders: list) -> dict:
    """Kohya name -> layer, the way A1111/ComfyUI find a key's layer: the module path (transformers 4.x
    spelling, which both use) with "." turned into "_", behind lora_unet / lora_te / lora_te1 / lora_te2."""
    prefixes = ["lora_te"] if len(text_encoders) == 1 else ["lora_te1", "lora_te2"]
    roots = [("lora_unet", unet)] + [(p, tiny.as_transformers4_layout(te)) for p, te in zip(prefixes, text_encoders)]
    return {f"{prefix}_{path.replace('.', '_')}": module for prefix, root in roots
            for path, module in root.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


def consumer_update(tensors: dict, name: str, weight_shape: torch.Size) -> torch.Tensor:
    """The update A1111 and ComfyUI add: alpha / rank * up @ down, rank = down.shape[0]; a conv down
    kernel followed by a 1x1 up is the convolution of the two."""
    down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
    scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
    if down.dim() == 2:
        return scale * up @ down
    if down.shape[2:] == (1, 1):
        return scale * (up.flatten(1) @ down.flatten(1)).reshape(weight_shape)
    return scale * F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double().reshape(delta.shape[0], -1), full_matrices=False)
    return (u[:, :k] * s[:k] @ vh[:k]).reshape(delta.shape)


def layer_output(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)


def probe(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(1, layer.in_channels, 6, 6, generator=generator)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a1111_and_comfyui_formula_gives_the_network_update_for_every_key(family, tmp_path, planted_network):
    make = tiny.sd1_models if family == "sd1" else tiny.sdxl_models
    models = make(seed=0)
    extra = {"conv_dim": "4", "conv_alpha": "1"} if family == "sd1" else {}
    network, _ = planted_network(models, **extra)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path))
    tensors = load_file(path)
    trained = {m.lora_name: best_rank_k(m.delta_weight().detach(), network.ranks()[m.lora_name]) for m in network.loras}

    fresh = make(seed=0)
    text_encoders = fresh["text_encoders"] if family == "sdxl" else [fresh["text_encoder"]]
    layers = kohya_layer_map(fresh["unet"], text_encoders)
    names = {k.split(".", 1)[0] for k in tensors}
    assert names <= layers.keys()
    base_weights = {name: layers[name].weight.detach().clone() for name in names}
    rebuilt, _ = create_network_from_weights(1.0, str(path), None, fresh.get("text_encoders") or fresh["text_encoder"],
                                             fresh["unet"])
    rebuilt.apply_to(None, None, True, True)
    rebuilt.load_weights(str(path))
    kinds = set()
    with torch.no_grad():
        for name in sorted(names):
            layer = layers[name]
            update = consumer_update(tensors, name, layer.weight.shape)
            assert float((update - trained[name]).norm() / trained[name].norm()) < 1e-4, name
            x = probe(layer)
            consumer = layer_output(layer, base_weights[name] + update, x)
            torch.testing.assert_close(layer(x), consumer, rtol=1e-4, atol=1e-5, msg=name)
            kinds.add("linear" if isinstance(layer, nn.Linear) else "conv{}x{}".format(*layer.kernel_size))
    assert kinds == ({"linear", "conv1x1", "conv3x3"} if family == "sd1" else {"linear"})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_file_has_no_key_a_loader_would_leave_unused(family, tmp_path, planted_network):
    models = tiny.sd1_models(seed=0) if family == "sd1" else tiny.sdxl_models(seed=0)
    network, _ = planted_network(models, conv_dim="4")
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path))
    fresh = tiny.sd1_models(seed=0) if family == "sd1" else tiny.sdxl_models(seed=0)
    layers = kohya_layer_map(fresh["unet"], fresh.get("text_encoders") or [fresh["text_encoder"]])
    parts: dict[str, set] = {}
    for key in load_file(path):
        name, _, part = key.partition(".")
        assert part in KOHYA_PARTS, key
        assert name in layers, key
        parts.setdefault(name, set()).add(part)
    assert all(found == set(KOHYA_PARTS) for found in parts.values())
    assert set(parts) == {m.lora_name for m in network.loras}


# --- FLUX.1 in diffusers -------------------------------------------------------------------------------------
# kohya (BFL) module -> the diffusers modules whose updates, stacked on the output dimension, make it up
# (diffusers' kohya FLUX conversion splits qkv into q/k/v and the single blocks' linear1 into q/k/v/mlp)
FLUX_DIFFUSERS = {
    "double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks_0_img_attn_proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks_0_img_mlp_0": ["transformer_blocks.0.ff.net.0.proj"],
    "double_blocks_0_img_mlp_2": ["transformer_blocks.0.ff.net.2"],
    "double_blocks_0_img_mod_lin": ["transformer_blocks.0.norm1.linear"],
    "double_blocks_0_txt_attn_qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks_0_txt_attn_proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks_0_txt_mlp_0": ["transformer_blocks.0.ff_context.net.0.proj"],
    "double_blocks_0_txt_mlp_2": ["transformer_blocks.0.ff_context.net.2"],
    "double_blocks_0_txt_mod_lin": ["transformer_blocks.0.norm1_context.linear"],
    "single_blocks_0_linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "single_blocks_0_linear2": ["single_transformer_blocks.0.proj_out"],
    "single_blocks_0_modulation_lin": ["single_transformer_blocks.0.norm.linear"],
}
# FLUX.1's width (diffusers splits linear1 at hard-coded widths), one double and one single block
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
                        axes_dims_rope=(16, 56, 56))


def diffusers_flux_updates(path, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """kohya module -> what diffusers' FluxPipeline loaders add to its layer's output for the inputs ``probe``
    (in x n): scaling * B @ A @ probe, stacked over the diffusers layers the module maps to (a projection of
    the update: forming the 3072-wide updates themselves is slow on one thread)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.lora import LoraLayer

    loaded = FluxPipeline.lora_state_dict(str(path))
    state, alphas = loaded if isinstance(loaded, tuple) else (loaded, None)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    transformer = transformer.to_empty(device="cpu")  # only the LoRA layers are read
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer, adapter_name="t")
    outputs = {}
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, LoraLayer) and module.lora_A:
                a, b = module.lora_A["t"].weight.float(), module.lora_B["t"].weight.float()
                outputs[name] = b @ (a @ probe[: a.shape[1]]) * module.scaling["t"]
    return {kohya: torch.cat([outputs[p] for p in parts]) for kohya, parts in FLUX_DIFFUSERS.items()}


def diffusers_0_32() -> bool:
    import diffusers

    return tuple(int(v) for v in diffusers.__version__.split(".")[:2]) < (0, 33)


@pytest.mark.parametrize("network_dim, reg_dims, padded, odd_img_qkv", [
    (4, "txt_mlp=3,linear1=1,linear2=2", 0, False),
    (4, "img_attn=2,txt_mlp=3,linear1=1", 0, True),
    (4, "double_blocks_0_img_attn_proj=2", 1, False),
    (2, "single_blocks_0_linear2=4", 12, False),
], ids=["ranks-vary", "ranks-vary-img-qkv", "one-lower", "one-higher"])
def test_diffusers_loads_our_flux_file_with_every_modules_update(tmp_path, network_dim, reg_dims, padded,
                                                                 odd_img_qkv):
    """Every module at scale 1, in diffusers 0.32 (sd-scripts' pin: a part with exactly one odd rank is read
    at a wrong scale, so the export pads it) and in current releases. diffusers 0.32 cannot load a file
    whose double blocks' img_attn_qkv rank is not the most common rank at all: its rank pattern meets
    transformer_blocks.N.attn.to_q inside single_transformer_blocks.N.attn.to_q, and the load stops with
    a size mismatch (docs/files.md)."""
    import dit_stand_ins as st
    from safetensors import safe_open

    from helpers import pretend_trained

    network = pretend_trained(create_network(1.0, network_dim, 2.0, None, [None, None], st.flux(), restart_mode="off",
                                             network_reg_dims=reg_dims), scale=0.5)
    path = tmp_path / "flux.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_base_model_version": "flux1"})
    with safe_open(str(path), "pt") as fh:
        assert len(json.loads((fh.metadata() or {}).get("aclora_padded", "{}"))) == padded
    probe = torch.randn(5 * 3072, 8, generator=torch.Generator().manual_seed(0))
    if diffusers_0_32() and odd_img_qkv:
        with pytest.raises(RuntimeError, match="size mismatch for transformer_blocks.0.attn.to_"):
            diffusers_flux_updates(path, probe)
        return
    loaded = diffusers_flux_updates(path, probe)
    with torch.no_grad():
        for m in network.loras:
            want = m.lora_up.weight @ (m.lora_down.weight @ probe[: m.in_dim]) * m.scale
            got = loaded[m.lora_name.removeprefix("lora_unet_")]
            scale = float((got * want).sum() / (want * want).sum())
            assert scale == pytest.approx(1.0, abs=1e-4), f"{m.lora_name} read at {scale:.3g} x its update"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffusers_and_a_flux_file_with_t5_modules(tmp_path):
    """lora_te3 (T5-XXL) modules: diffusers 0.32 rejects the whole file; later releases drop them and load the
    rest (docs/files.md says so)."""
    import dit_stand_ins as st
    from diffusers import FluxPipeline
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu"))
    network = create_network(1.0, 4, 2.0, None, [None, t5], st.flux(), train_t5xxl="true", restart_mode="off")
    path = tmp_path / "flux-t5.safetensors"
    network.save_weights(str(path), torch.float32, {})
    if diffusers_0_32():
        with pytest.raises(ValueError, match="Incompatible keys"):
            FluxPipeline.lora_state_dict(str(path))
    else:
        loaded = FluxPipeline.lora_state_dict(str(path))
        state = loaded[0] if isinstance(loaded, tuple) else loaded
        assert state and not any("lora_te3" in k or k.startswith("text_encoder") for k in state)
