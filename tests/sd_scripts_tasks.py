"""Work the sd-scripts end-to-end tests run in subprocesses: building fixtures offline, checking merges.

Run as ``python tests/sd_scripts_tasks.py TASK ARGS...`` by ``tests/sd_scripts_fixtures.py``,
in sd-scripts' environment (its folder and the torchvision stand-in on PYTHONPATH for the
tasks that import sd-scripts). Subprocesses, because the models are large (the real SD1.x
and SDXL U-Net layouts) and their memory must go back to the system after each step.

Tasks:
  tokenizers DIR             CLIP tokenizers in the folders sd-scripts' --tokenizer_cache_dir looks for
  sd1 DIR TOKENIZERS         a random-weight SD1.x model (real U-Net, CLIP-L and VAE layouts): a diffusers
                             folder DIR/diffusers, and DIR/sd1.safetensors, the same model as a single-file
                             checkpoint written by sd-scripts' own converter (what merge_lora.py reads)
  sdxl DIR TOKENIZERS        a random-weight SDXL diffusers folder (real U-Net layout, toy text encoders and VAE)
  identity-vae DIR           the toy VAE made mirror-symmetric and nearly deterministic (what the identities of
                             flipped images rely on in a trained VAE: docs/identities.md), a diffusers folder for --vae
  sd1-merge-check BASE MERGED LORA
                             merge_lora.py's merged checkpoint against our merge_to on the base (JSON report)
  sdxl-merge-check DIR LORA  sdxl_merge_lora.py's merge against our merge_to on sd-scripts' SDXL models (JSON report)
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import torch

SEED = 0
CLIP_MAX_LENGTH = 77
# sd-scripts reads these from --tokenizer_cache_dir (the hub ids with "/" replaced by "_")
TOKENIZER_FOLDERS = ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")

# The published SD1.5 and SDXL-base configurations (the layouts sd-scripts converts to its own U-Nets)
SD1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# 8x downsampling and 4 latent channels are all sd-scripts asks of an SDXL VAE loaded from a diffusers folder
TOY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
               block_out_channels=(32, 32, 32, 32), sample_size=64,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def clip_config(hidden_size: int, layers: int, heads: int, intermediate: int, act: str, projection_dim: int,
                vocab_size: int = 49408):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=CLIP_MAX_LENGTH,
                          hidden_act=act, projection_dim=projection_dim, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2)


# SD1.x: CLIP ViT-L/14's text tower as sd-scripts' checkpoint loader builds it (its converter needs this exact shape)
SD1_TEXT_ENCODER = dict(hidden_size=768, layers=12, heads=12, intermediate=3072, act="quick_gelu", projection_dim=768)
# SDXL: the U-Net fixes the widths (768 + 1280 = its 2048-wide context, 1280 pooled); depth and MLP width are free,
# except that sd-scripts reads hidden_states[11] of the first encoder and the penultimate layer of the second
SDXL_TEXT_ENCODER_1 = dict(hidden_size=768, layers=12, heads=12, intermediate=64, act="quick_gelu", projection_dim=768)
SDXL_TEXT_ENCODER_2 = dict(hidden_size=1280, layers=2, heads=20, intermediate=64, act="gelu", projection_dim=1280)


def build_tokenizers(out_dir: str) -> None:
    """CLIP tokenizers over a byte-level vocabulary (every byte, alone and word-final; no merges).

    sd-scripts needs a CLIPTokenizer with CLIP's special tokens and a 77-token
    window, not CLIP's learned merges: words simply split into more tokens.
    The end-of-text token has the highest id, as in CLIP (pooling picks it by argmax).
    """
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(out_dir, exist_ok=True)
    vocab_file, merges_file = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as fh:
        json.dump(vocab, fh)
    with open(merges_file, "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=CLIP_MAX_LENGTH)
    for name in TOKENIZER_FOLDERS:
        tokenizer.save_pretrained(os.path.join(out_dir, name))
    os.remove(vocab_file)
    os.remove(merges_file)


@contextmanager
def half_precision():
    """Build and save in float16: half the memory, writes and reads (diffusers and transformers load it as float32)."""
    torch.set_default_dtype(torch.float16)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def build_sd1(out_dir: str, tokenizers: str) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from library import model_util
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    with half_precision():
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(clip_config(**SD1_TEXT_ENCODER)),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(tokenizers, TOKENIZER_FOLDERS[0])),
            unet=UNet2DConditionModel(**SD1_UNET), scheduler=DDPMScheduler(**SCHEDULER), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(os.path.join(out_dir, "diffusers"), safe_serialization=True)
    # sd-scripts' U-Net class has diffusers' parameter names: its converter takes the diffusers U-Net as it is
    model_util.save_stable_diffusion_checkpoint(False, os.path.join(out_dir, "sd1.safetensors"), pipeline.text_encoder,
                                                pipeline.unet, None, 0, 0, None, torch.float16, pipeline.vae)


def build_sdxl(out_dir: str, tokenizers: str) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(SEED)
    with half_precision():
        pipeline = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**TOY_VAE), text_encoder=CLIPTextModel(clip_config(**SDXL_TEXT_ENCODER_1)),
            text_encoder_2=CLIPTextModelWithProjection(clip_config(**SDXL_TEXT_ENCODER_2)),
            tokenizer=CLIPTokenizer.from_pretrained(os.path.join(tokenizers, TOKENIZER_FOLDERS[0])),
            tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(tokenizers, TOKENIZER_FOLDERS[1])),
            unet=UNet2DConditionModel(**SDXL_UNET), scheduler=EulerDiscreteScheduler(**SCHEDULER))
    pipeline.save_pretrained(out_dir, safe_serialization=True)


def build_identity_vae(out_dir: str) -> None:
    """A random VAE's kernels are not mirror-symmetric and its latent distribution's spread is as large as its
    mean, so a flipped image's latent is not the mirror of the image's: averaging each kernel with its mirror and
    setting the log-variance to -30 gives what a trained VAE has (up to the one-pixel shift of its padding)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    vae = AutoencoderKL(**TOY_VAE)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
        channels = TOY_VAE["latent_channels"]
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -30
    vae.save_pretrained(out_dir, safe_serialization=True)


def _targets(network) -> dict:
    """LoRA module name -> the base layer it adds to."""
    return {m.lora_name: m.org_module for m in network.loras}


def _report(errors: dict, merged_norms: dict) -> None:
    print("MERGE-CHECK " + json.dumps({"relative_error": errors, "merged_delta_norm": merged_norms}))


def sd1_merge_check(base: str, merged: str, lora: str) -> None:
    """Per module: |W_merge_lora.py - W_ours| / |W_ours - W_base| (Frobenius), W_ours = our merge_to on the base.

    Both models come from the checkpoint files through sd-scripts' loader, so they are
    laid out exactly as merge_lora.py saw them.
    """
    from library import model_util
    from networks import aclora

    with torch.no_grad():
        text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(False, base)
        network, weights = aclora.create_network_from_weights(1.0, lora, vae, text_encoder, unet, for_inference=True)
        layers = _targets(network)
        before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        network.merge_to(text_encoder, unet, weights, torch.float32, "cpu")
        ours = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        ours_delta = {name: float((ours[name] - before[name]).norm()) for name in layers}
        del text_encoder, vae, unet, network, layers, before
        text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(False, merged)
        reader, _ = aclora.create_network_from_weights(1.0, lora, vae, text_encoder, unet, for_inference=True)
        errors = {}
        for name, layer in _targets(reader).items():
            errors[name] = float((layer.weight - ours[name]).norm()) / max(ours_delta[name], 1e-30)
    _report(errors, ours_delta)


def sdxl_merge_check(model_dir: str, lora: str) -> None:
    """Per module: |delta_sd-scripts - delta_ours| / |delta_sd-scripts| (Frobenius) on sd-scripts' own SDXL models.

    The full SDXL model is loaded once (~10 GB in float32): the targeted base
    weights are set to zero, sdxl_merge_lora.py's ``merge_to_sd_model`` adds its
    delta, then our ``merge_to`` at multiplier -1 takes ours away. What is left
    is the difference of the two deltas, with no second copy of the model.
    """
    from library import sdxl_model_util, sdxl_train_util
    from networks import aclora

    sys.path.insert(0, os.path.join(os.getcwd(), "networks"))  # sdxl_merge_lora.py imports its neighbours by name
    import sdxl_merge_lora

    with torch.no_grad():
        _, te1, te2, vae, unet, _, _ = sdxl_train_util._load_target_model(
            model_dir, None, sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, torch.float32)
        network, weights = aclora.create_network_from_weights(-1.0, lora, vae, [te1, te2], unet, for_inference=True)
        modules = _targets(network)
        for layer in modules.values():
            layer.weight.zero_()
        sdxl_merge_lora.merge_to_sd_model(te1, te2, unet, [lora], [1.0], [], torch.float32)
        theirs = {name: float(layer.weight.norm()) for name, layer in modules.items()}
        network.merge_to([te1, te2], unet, weights, torch.float32, "cpu")
        errors = {name: float(layer.weight.norm()) / max(theirs[name], 1e-30) for name, layer in modules.items()}
    _report(errors, theirs)


TASKS = {
    "tokenizers": build_tokenizers,
    "sd1": build_sd1,
    "sdxl": build_sdxl,
    "identity-vae": build_identity_vae,
    "sd1-merge-check": sd1_merge_check,
    "sdxl-merge-check": sdxl_merge_check,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(TASKS)}}} ARGS...")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    TASKS[sys.argv[1]](*sys.argv[2:])
