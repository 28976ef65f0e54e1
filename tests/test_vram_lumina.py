"""``aclora vram`` on Lumina 2 (``lumina_train_network.py``).

What is pinned: the NextDiT layout is sd-scripts' own (every weight's name, shape and order, 2,609,771,456
parameters, checked against ``library.lumina_models`` built on the meta device) and computes what it computes (a
tiny one with the same weights gives sd-scripts' prediction); its LoRA modules are lora_lumina's (180 at full
size, Gemma2's when it trains); Gemma2 sits on the device only while its outputs are not cached or its LoRA
trains, in sd-scripts' dtypes; the frozen weights, LoRA, gradients and AdamW state are exactly their sizes;
fp8_base stores the DiT (and Gemma2, but its embedding) in fp8; block swap takes the last main blocks' weights off the device; the autoencoder sits on the device only
while latents are not cached; checkpointing, batch size and resolution change the activations as they should;
the activation peak of a tiny step agrees with the CPU's real allocations; sd-scripts' Lumina arguments are read,
or refused with the key, the value and what is allowed.
"""

from __future__ import annotations

import pytest
import torch

from aclora_ext.harness.lumina_dit import LUMINA_2B, LuminaConfig, NextDiT
from aclora_ext.tools import vram
from aclora_ext.tools.vram.lumina import LuminaTrainingStep, build_lumina_models, offloaded_weights, swapped_blocks
from helpers import import_or_fail
from vram_checks import assert_the_profiler_agrees

import_or_fail("transformers", "Lumina 2's text encoder is transformers' Gemma2Model")

TINY = LuminaConfig(dim=64, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16,
                    cap_feat_dim=32, axes_dims=(4, 6, 6))
TINY_GEMMA2 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 1000, "hidden_activation": "gelu_pytorch_tanh"}
TINY_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1,
            "latent_channels": 16, "norm_num_groups": 4, "use_quant_conv": False, "use_post_quant_conv": False}


def rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def storage_bytes(tensors) -> int:
    return sum(rounded(t.numel() * t.element_size()) for t in tensors)


def lumina_setup(**changes) -> vram.Setup:
    settings = dict(family="lumina", width=128, height=128, batch_size=2, rank=8, alpha=4.0, mixed_precision="no",
                    gradient_checkpointing=False, train_text_encoder=False, cache_text_encoder_outputs=True,
                    gemma2_tokens=16)
    settings.update(changes)
    return vram.Setup(**settings)


def tiny_models(setup: vram.Setup, device: str = "meta") -> vram.Models:
    return build_lumina_models(setup, device, TINY, TINY_GEMMA2, TINY_VAE)


def tiny_estimate(setup: vram.Setup, block_bytes: int = vram.BLOCK_BYTES):
    models = tiny_models(setup)
    return vram.estimate(setup, models=models, measure_restart=False, block_bytes=block_bytes), models


# --- against sd-scripts' own NextDiT -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lumina_models():
    """sd-scripts' library.lumina_models, imported from its folder."""
    import sd_scripts_fixtures as e2e

    e2e.import_sd_scripts_in_process()
    from library import lumina_models

    return lumina_models


@pytest.mark.sd_scripts
def test_the_full_nextdit_layout_is_sd_scripts_own_weight_for_weight(lumina_models):
    with torch.device("meta"):
        theirs = lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner()
        ours = NextDiT(LUMINA_2B)
    shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    assert list(shapes) == list(theirs.state_dict())  # the same order: the LoRA modules come in sd-scripts' order
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 2_609_771_456


@pytest.mark.sd_scripts
def test_gemma2_is_built_as_sd_scripts_load_gemma2_builds_it(lumina_models):
    from library import lumina_util
    from transformers import Gemma2Config, Gemma2Model

    from aclora_ext.harness.lumina_dit import GEMMA2_2B_CONFIG

    theirs = lumina_util.load_gemma2(None, torch.bfloat16, "cpu", state_dict={})  # its config, no weights
    with torch.device("meta"):
        ours = Gemma2Model(Gemma2Config(**GEMMA2_2B_CONFIG))
    assert {n: tuple(t.shape) for n, t in ours.state_dict().items()} == {
        n: tuple(t.shape) for n, t in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 2_614_341_888
    its = theirs.config.to_dict()
    assert {k: its[k] for k in GEMMA2_2B_CONFIG} == GEMMA2_2B_CONFIG
    assert ours.config._attn_implementation == theirs.config._attn_implementation  # the attention the step runs


@pytest.mark.sd_scripts
def test_a_tiny_nextdit_with_sd_scripts_weights_computes_its_prediction(lumina_models):
    """The same weights in both; every caption fills the Gemma2 length (the mask all ones), as the count assumes."""
    c = TINY
    torch.manual_seed(0)
    theirs = lumina_models.NextDiT(patch_size=2, in_channels=16, dim=c.dim, n_layers=c.n_layers,
                                   n_refiner_layers=c.n_refiner_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                                   multiple_of=c.multiple_of, qk_norm=True, cap_feat_dim=c.cap_feat_dim,
                                   axes_dims=list(c.axes_dims), axes_lens=list(c.axes_lens)).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # sd-scripts zeroes the modulation and final layer: make every path count
            p.normal_(std=0.2)
    ours = NextDiT(c).eval()
    ours.load_state_dict(theirs.state_dict())
    x, cap = torch.randn(2, 16, 8, 6), torch.randn(2, 5, c.cap_feat_dim)
    mask, t = torch.ones(2, 5, dtype=torch.int32), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        expected = theirs(x=x, t=t, cap_feats=cap, cap_mask=mask)
        got = ours(x=x, t=t, cap_feats=cap, cap_mask=mask)
    assert got.shape == x.shape and expected.abs().max() > 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --- the layout and what sits on the device ----------------------------------------------------------------------------
def test_lumina_lora_modules_are_lora_luminas_at_full_size():
    setup = vram.Setup(family="lumina", cache_text_encoder_outputs=True, rank=32)
    models = build_lumina_models(setup)
    run = LuminaTrainingStep(models, setup, "meta")
    run.close()
    names = {m.lora_name: tuple(m.org_module.weight.shape) for m in run.network.loras}
    assert len(names) == 26 * 6 + 2 * 6 + 2 * 5 + 2 == 180  # main, noise refiner, context refiner, final layer
    assert names["lora_unet_layers_0_attention_qkv"] == ((24 + 2 * 8) * 96, 2304)
    assert names["lora_unet_layers_25_feed_forward_w2"] == (2304, 9216)
    assert names["lora_unet_noise_refiner_1_adaLN_modulation_1"] == (4 * 2304, 1024)
    assert "lora_unet_context_refiner_0_adaLN_modulation_1" not in names
    assert names["lora_unet_final_layer_linear"] == (64, 2304)
    assert models.text_encoders == [] and "text_encoders" not in models.on_device and models.vae is None


@pytest.mark.parametrize("case", ["fp32", "bf16, checkpointing", "fp8", "fp8, Gemma2 run", "bf16, Gemma2 trained"])
def test_luminas_weights_gradients_and_adam_state_are_exactly_their_sizes(case):
    setup = {"fp32": lumina_setup(),
             "bf16, checkpointing": lumina_setup(mixed_precision="bf16", gradient_checkpointing=True),
             "fp8": lumina_setup(mixed_precision="bf16", fp8_base=True),
             "fp8, Gemma2 run": lumina_setup(mixed_precision="bf16", fp8_base=True, cache_text_encoder_outputs=False),
             "bf16, Gemma2 trained": lumina_setup(mixed_precision="bf16", train_text_encoder=True)}[case]
    result, models = tiny_estimate(setup)
    dit = models.unet
    assert all(p.dtype == setup.unet_dtype for p in dit.parameters())
    assert setup.unet_dtype == (torch.float8_e4m3fn if "fp8" in case else torch.float32 if case == "fp32"
                                else torch.bfloat16)
    assert result.largest[vram.FROZEN_UNET] == storage_bytes([*dit.parameters(), *dit.buffers()])
    assert result.largest.get(vram.FROZEN_VAE, 0) == 0
    gemma2 = "Gemma2" in case
    assert [type(te).__name__ for te in models.text_encoders] == (["Gemma2Model"] if gemma2 else [])
    text = [t for te in models.text_encoders for t in [*te.parameters(), *te.buffers()]]
    assert result.largest.get(vram.FROZEN_TE, 0) == storage_bytes(text) and (text != []) == gemma2
    for te in models.text_encoders:  # fp8_base: fp8 but the embedding (prepare_text_encoder_fp8)
        assert te.embed_tokens.weight.dtype == torch.bfloat16
        assert te.layers[0].mlp.up_proj.weight.dtype == setup.text_encoder_dtype
    run = LuminaTrainingStep(models, setup, "meta")
    run.close()
    layers = [m.org_module for m in run.network.loras]
    lora = sum(rounded(4 * setup.rank * layer.in_features) + rounded(4 * setup.rank * layer.out_features)
               for layer in layers)  # lora_down and lora_up in fp32
    te_modules = 2 * 7 if setup.train_text_encoder else 0  # Gemma2's q, k, v, o, gate, up, down per layer
    assert result.modules == len(layers) == 4 * 6 + 6 + 5 + 2 + te_modules
    assert sum(n.startswith("lora_te_layers_") for n in (m.lora_name for m in run.network.loras)) == te_modules
    assert result.largest[vram.LORA] == storage_bytes([*run.network.parameters(), *run.network.buffers()])
    # the DiT takes Gemma2's penultimate hidden states: its last layer's LoRA gets no gradient
    unused = sum(rounded(4 * setup.rank * m.org_module.in_features) + rounded(4 * setup.rank * m.org_module.out_features)
                 for m in run.network.loras if m.lora_name.startswith("lora_te_layers_1_"))
    assert (unused > 0) == setup.train_text_encoder
    assert result.largest[vram.GRADIENTS] == lora - unused
    assert result.largest[vram.OPTIMIZER_STATE] == 2 * (lora - unused)  # AdamW: two fp32 moments per LoRA parameter


def test_a_trained_gemma2_with_checkpointing_also_holds_its_embeddings_gradient():
    """lumina_train_network.py's checkpointing workaround makes embed_tokens require grad: a dense gradient."""
    setup = lumina_setup(mixed_precision="bf16", train_text_encoder=True, gradient_checkpointing=True)
    result, models = tiny_estimate(setup)
    embedding = models.text_encoders[0].embed_tokens.weight
    run = LuminaTrainingStep(models, setup, "meta")
    run.close()
    used = [p for m in run.network.loras if not m.lora_name.startswith("lora_te_layers_1_") for p in m.parameters()]
    assert result.largest[vram.GRADIENTS] == storage_bytes(used) + storage_bytes([embedding])


def test_block_swap_takes_the_last_main_blocks_weights_off_the_device():
    plain, _ = tiny_estimate(lumina_setup(mixed_precision="bf16"))
    setup = lumina_setup(mixed_precision="bf16", blocks_to_swap=2)
    swapped, models = tiny_estimate(setup)
    assert swapped_blocks(models.unet, setup) == list(models.unet.layers[2:])
    weights = offloaded_weights(models.unet, setup)
    assert len(weights) == 2 * (2 + 3 + 2 + 4 + 1)  # qkv, out, w1-3, q/k norms, 4 block norms, modulation
    assert plain.largest[vram.FROZEN_UNET] - swapped.largest[vram.FROZEN_UNET] == storage_bytes(weights)
    assert plain.largest[vram.LORA] == swapped.largest[vram.LORA]
    with pytest.raises(vram.VramError, match="blocks_to_swap=25 is not valid; allowed: an integer from 0 to 24 for "
                                             "Lumina 2"):
        vram.Setup(family="lumina", cache_text_encoder_outputs=True, blocks_to_swap=25)
    with pytest.raises(vram.VramError, match="blocks_to_swap=3 swaps 3 main blocks, but this model has 4"):
        tiny_models(lumina_setup(blocks_to_swap=3))


def test_the_autoencoder_sits_on_the_device_only_while_latents_are_not_cached():
    cached, _ = tiny_estimate(lumina_setup())
    encoded, models = tiny_estimate(lumina_setup(cache_latents=False))
    vae = models.vae
    assert vae is not None and "vae" in models.on_device
    assert encoded.largest[vram.FROZEN_VAE] == storage_bytes([*vae.parameters(), *vae.buffers()]) > 0
    assert vram.FROZEN_VAE not in cached.largest or cached.largest[vram.FROZEN_VAE] == 0
    assert "VAE encode" in encoded.phase_peaks and "VAE encode" not in cached.phase_peaks


def test_checkpointing_batch_and_resolution_change_the_activations():
    def activations(**changes) -> int:
        result, _ = tiny_estimate(lumina_setup(**changes))
        return result.peak_bytes - result.before_step_bytes

    base = activations()
    assert activations(gradient_checkpointing=True) < 0.7 * base
    assert 1.7 * base < activations(batch_size=4) < 2.3 * base
    assert activations(width=256) > 1.7 * base
    assert activations(gemma2_tokens=64) > base


@pytest.mark.parametrize("checkpointing, text", [(False, "cached"), (True, "cached"), (False, "Gemma2 run"),
                                                   (True, "Gemma2 trained")])
def test_the_lumina_activation_peak_agrees_with_real_cpu_allocations_measured_by_the_profiler(checkpointing, text):
    """The same tiny Lumina step counted on meta and run on the CPU under torch.profiler: the memory the step adds
    at its peak agrees within 5% (fp32, so that the CPU runs the operators the count sees)."""
    setup = lumina_setup(gradient_checkpointing=checkpointing, gemma2_tokens=64, width=256, height=256,
                         cache_text_encoder_outputs=text == "cached", train_text_encoder=text == "Gemma2 trained")
    result, _ = tiny_estimate(setup, block_bytes=1)
    counted = result.peak_bytes - result.before_step_bytes

    torch.manual_seed(0)
    run = LuminaTrainingStep(tiny_models(setup, "cpu"), setup, "cpu")
    assert_the_profiler_agrees(counted, run)


# --- reading sd-scripts' Lumina arguments ------------------------------------------------------------------------------
def setup_of(arguments: dict, family=None):
    return vram.setup_from_arguments({k: (v, "test.toml") for k, v in arguments.items()}, family, None, None)


LUMINA_RUN = {"pretrained_model_name_or_path": "/m/model.safetensors", "gemma2": "/m/gemma_2_2b.safetensors",
              "ae": "/m/ae.safetensors", "network_train_unet_only": True, "cache_text_encoder_outputs": True,
              "mixed_precision": "bf16", "timestep_sampling": "nextdit_shift", "system_prompt": "You are"}


def test_a_lumina_run_is_read_with_sd_scripts_defaults_and_its_options():
    setup, notes = setup_of(LUMINA_RUN)
    trained, _ = setup_of({**LUMINA_RUN, "network_train_unet_only": False, "cache_text_encoder_outputs": False})
    assert trained.train_text_encoder and not trained.cache_text_encoder_outputs
    assert (setup.family, setup.model_name, setup.gemma2_tokens, setup.blocks_to_swap) == ("lumina", "Lumina 2", 256, 0)
    assert (setup.width, setup.height, setup.attention, setup.train_text_encoder) == (1024, 1024, "sdpa", False)
    assert "family lumina (gemma2 is given; --family to change)" in notes
    assert "Lumina 2 trainer arguments that do not change the estimate: ae, gemma2, system_prompt, " \
           "timestep_sampling" in notes
    by_path, notes = setup_of({k: v for k, v in LUMINA_RUN.items() if k != "gemma2"}
                              | {"pretrained_model_name_or_path": "/m/lumina_2.safetensors"})
    assert by_path.family == "lumina" and any("'lumina' in '/m/lumina_2.safetensors'" in n for n in notes)
    options, _ = setup_of({**LUMINA_RUN, "blocks_to_swap": 6, "gemma2_max_token_length": 128, "fp8_base": True,
                           "gradient_checkpointing": True, "train_batch_size": 2, "resolution": "768,512"})
    assert (options.blocks_to_swap, options.gemma2_tokens, options.fp8_base, options.gradient_checkpointing) == (
        6, 128, True, True)
    assert (options.batch_size, options.width, options.height) == (2, 768, 512)


@pytest.mark.parametrize("changes, message", [
    ({"use_flash_attn": True}, "use_flash_attn=True is not modelled by aclora vram; allowed: leave it unset"),
    ({"use_sage_attn": True}, "use_sage_attn=True is not modelled by aclora vram; allowed: leave it unset"),
    ({"blocks_to_swap": 25}, "blocks_to_swap=25 is not valid; allowed: an integer from 0 to 24 for Lumina 2"),
    ({"gemma2_max_token_length": 0}, "gemma2_max_token_length=0 is not valid; allowed: an integer >= 1"),
    ({"t5xxl": "/m/t5xxl.sft"},
     "t5xxl='/m/t5xxl.sft' is an argument of flux_train_network.py and sd3_train_network.py, not of "
     "lumina_train_network.py (family 'lumina')"),
    ({"mixed_precision": "no", "fp8_base": True}, "fp8_base=True needs mixed_precision='fp16' or 'bf16'"),
])
def test_bad_lumina_arguments_are_refused_naming_key_value_and_what_is_allowed(changes, message):
    with pytest.raises(vram.VramError) as error:
        setup_of({**LUMINA_RUN, **changes})
    assert message in str(error.value)


def test_lumina_arguments_are_refused_for_another_family():
    with pytest.raises(vram.VramError, match="gemma2_max_token_length=128 is an argument of lumina_train_network.py, "
                                             "not of flux_train_network.py"):
        setup_of({"pretrained_model_name_or_path": "/m/flux1-dev.sft", "gemma2_max_token_length": 128})
    with pytest.raises(vram.VramError, match="gemma2_max_token_length=64 is not valid; allowed: unset"):
        vram.Setup(family="sdxl", gemma2_tokens=64)
