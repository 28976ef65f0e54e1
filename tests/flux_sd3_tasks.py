"""Building, offline, what sd-scripts' FLUX.1 and SD3 trainers need to run on a CPU (subprocess tasks).

Run as ``python tests/flux_sd3_tasks.py TASK ARGS...`` by ``tests/flux_sd3_fixtures.py``, in
sd-scripts' environment (its folder, and the torchvision stand-in where needed, on PYTHONPATH):
the model classes and loaders come from sd-scripts itself, so the files hold exactly the keys and
shapes the trainers build. Nothing is downloaded.

What keeps the files small:
  * FLUX.1's width is fixed by sd-scripts (hidden 3072, library/flux_utils.py builds from
    ``flux_models.configs``); only the depth comes from the checkpoint. One double and one single
    block is the least it accepts (it takes the max block index). The tensors are written one at
    a time (never the whole model in memory), in bfloat16 by default: half the disk of float32,
    and sd-scripts casts them to its weight dtype when it loads them.
  * The text encoders (CLIP-L, CLIP-G, T5-XXL: fixed configurations) are never run when their
    outputs are cached on disk and only the DiT is trained, so their files are all zeros, written
    as a header and then truncated to full length: a sparse file, a few kB on disk, whose pages
    are never read as long as sd-scripts does not cast them (it casts to its weight dtype: build
    them in the dtype of the run, see ``text-encoders``).
  * The text-encoder outputs are pre-written in the ``*_flux_te.npz`` / ``*_sd3_te.npz`` files
    sd-scripts' caching strategies read.

Tasks:
  tokenizers DIR                     CLIP-L, CLIP-G and T5 tokenizers in the folders --tokenizer_cache_dir is read from
  text-encoders DIR DTYPE            all-zero clip_l-DTYPE, clip_g-DTYPE, t5xxl-DTYPE.safetensors (sparse files)
  ae PATH DTYPE                      a random-weight FLUX.1 AutoEncoder (its keys are also those of SD3's SDVAE)
  flux PATH DOUBLE SINGLE VARIANT DTYPE
                                     a random-weight FLUX.1 checkpoint (BFL layout) with DOUBLE and SINGLE blocks;
                                     VARIANT dev (guidance embedder) or schnell
  sd3 PATH DEPTH                     a random-weight SD3 MMDiT checkpoint (hidden 64 * DEPTH, "medium" layout,
                                     keys under model.diffusion_model.)
  data DIR T5_TOKENS                 two captioned 64x64 images with their FLUX and SD3 text-encoder output caches
  identity-ae PATH DTYPE             the AutoEncoder made mirror-symmetric and nearly deterministic (what flipped
                                     images' identities rely on in a trained AE: docs/identities.md)
  identity-data DIR T5_TOKENS        four smooth captioned images in two buckets (sd_scripts_fixtures'), each twice
                                     per epoch, with their text-encoder output caches
Checks (one JSON line each): block-swap-check, flux-merge-check BASE MERGED LORA, flux-merge-ours BASE MERGED LORA,
  kohya-check flux|sd3 CHECKPOINT LORA (sd-scripts' own LoRA module's names and how it reads LORA).
"""

from __future__ import annotations

import json
import math
import os
import string
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional
from unittest import mock

import torch

SEED = 0
IMAGE_SIZE = 64
CAPTIONS = ("aclora_style, a red square on grey", "aclora_style, a blue circle on white")
IMAGE_FOLDER = "1_aclora"  # sd-scripts' "<repeats>_<name>" DreamBooth layout
# --tokenizer_cache_dir holds one folder per hub id, "/" replaced by "_" (library/strategy_base.py)
T5_TOKENIZER_FOLDER = "google_t5-v1_1-xxl"
# widths the trainers expect of cached text-encoder outputs (CLIP-L 768, CLIP-G 1280, T5-XXL 4096, 77 CLIP tokens)
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH, CLIP_TOKENS = 768, 1280, 4096, 77
# SD3: sd-scripts sets hidden = 64 * depth; latents of 64-pixel images are 8x8, 4x4 patches of 2x2
SD3_PATCH, SD3_POS_EMBED_MAX = 2, 8

# safetensors' names for the dtypes used here
DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"),
          "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3")}


# --- safetensors, one tensor at a time ------------------------------------------------------------
def write_safetensors(path: str, specs: Iterable[tuple[str, tuple[int, ...]]], dtype: str,
                      fill: Optional[Callable[[str, tuple[int, ...]], torch.Tensor]] = None,
                      metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file of ``specs`` (name, shape) in ``dtype``.

    ``fill(name, shape)`` gives each tensor's values, written as soon as they are made; without it the
    file is all zeros: the header, then the file truncated to its full length (a sparse file).
    """
    torch_dtype, code = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    specs = [(name, tuple(shape)) for name, shape in specs]
    header: dict = {}
    offset = 0
    for name, shape in specs:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path + ".partial"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        if fill is None:
            fh.truncate(8 + len(blob) + offset)
        else:
            for name, shape in specs:
                tensor = fill(name, shape).to(torch_dtype).contiguous()
                assert tuple(tensor.shape) == shape, (name, tensor.shape, shape)
                fh.write(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))
    os.replace(tmp, path)


def state_specs(model: torch.nn.Module, prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + name, tuple(t.shape)) for name, t in model.state_dict().items()]


def save_model(model: torch.nn.Module, path: str, dtype: str, prefix: str = "") -> None:
    """A built model's own values (a model small enough to build for real)."""
    state = {prefix + name: t for name, t in model.state_dict().items()}
    write_safetensors(path, [(n, tuple(t.shape)) for n, t in state.items()], dtype, lambda name, shape: state[name])


@contextmanager
def no_file_reads(*modules):
    """sd-scripts' loaders with ``load_safetensors`` answering an empty state dict: the models come back
    as their loaders build them (weights on the meta device), which gives their exact keys and shapes."""
    patches = [mock.patch.object(m, "load_safetensors", lambda *args, **kwargs: {}) for m in modules]
    for patch in patches:
        patch.start()
    try:
        yield
    finally:
        for patch in patches:
            patch.stop()


# --- tokenizers ------------------------------------------------------------------------------------
def build_t5_tokenizer(out_dir: str) -> None:
    """A T5TokenizerFast over printable characters (a Unigram model, no sentencepiece file needed).

    sd-scripts asks a T5 tokenizer for ids, a padding mask and </s>; with pre-written text-encoder
    outputs the ids are never used, but the strategies load the tokenizer all the same.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    marker = "\u2581"  # sentencepiece's word-start marker
    symbols = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (marker, -2.0)]
    vocab += [(c, -3.0) for c in symbols] + [(marker + c, -2.5) for c in symbols]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=marker, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=marker, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)
    fast.save_pretrained(os.path.join(out_dir, T5_TOKENIZER_FOLDER))


def build_tokenizers(out_dir: str) -> None:
    import sd_scripts_tasks  # the CLIP tokenizers the SD1/SDXL tests use (same folder names)

    sd_scripts_tasks.build_tokenizers(out_dir)
    build_t5_tokenizer(out_dir)


# --- text encoders: all zeros, never read ----------------------------------------------------------
def build_text_encoders(out_dir: str, dtype: str) -> None:
    """CLIP-L (with text_projection, so that one file serves FLUX's CLIPTextModel and SD3's
    CLIPTextModelWithProjection), CLIP-G and T5-XXL, as sd-scripts' loaders build them."""
    from library import flux_utils, sd3_utils

    os.makedirs(out_dir, exist_ok=True)
    with no_file_reads(sd3_utils, flux_utils):
        clip_l = sd3_utils.load_clip_l("unread", None, "cpu")
        clip_g = sd3_utils.load_clip_g("unread", None, "cpu")
        t5xxl = flux_utils.load_t5xxl("unread", None, "cpu")
    for name, model in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl)):
        write_safetensors(os.path.join(out_dir, f"{name}-{dtype}.safetensors"), state_specs(model), dtype)


# --- random-weight models ----------------------------------------------------------------------------
def build_ae(path: str, dtype: str) -> None:
    from library import flux_models

    torch.manual_seed(SEED)
    save_model(flux_models.AutoEncoder(flux_models.configs["dev"].ae_params), path, dtype)


def build_identity_ae(path: str, dtype: str) -> None:
    """A random AE's kernels are not mirror-symmetric and its latents' spread is as large as their mean: each
    kernel averaged with its mirror and the log-variance set to -30 give what a trained AE has."""
    from library import flux_models

    torch.manual_seed(SEED)
    ae = flux_models.AutoEncoder(flux_models.configs["dev"].ae_params)
    with torch.no_grad():
        for module in ae.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
        conv_out = ae.encoder.conv_out
        half = conv_out.out_channels // 2  # DiagonalGaussian: the mean, then the log-variance
        conv_out.weight[half:] = 0
        conv_out.bias[half:] = -30
    save_model(ae, path, dtype)


def linear_init(model: torch.nn.Module, generator: torch.Generator) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """nn.Linear's default initialisation (weight and bias uniform in +-1/sqrt(fan_in)), norm scales 1,
    produced per tensor on demand: the model itself stays on the meta device."""
    bounds = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            for kind in ("weight", "bias"):
                bounds[f"{path}.{kind}"] = 1.0 / math.sqrt(module.in_features)
    for name, _ in model.named_parameters():
        if name not in bounds and not name.endswith(".scale"):
            raise ValueError(f"no initialisation for {name}")

    def fill(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith(".scale"):  # RMSNorm
            return torch.ones(shape)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bounds[name]

    return fill


def build_flux(path: str, double: str, single: str, variant: str, dtype: str) -> None:
    import dataclasses

    from library import flux_models

    params = dataclasses.replace(flux_models.configs[variant].params, depth=int(double),
                                 depth_single_blocks=int(single))
    with torch.device("meta"):
        model = flux_models.Flux(params)
    write_safetensors(path, state_specs(model), dtype, linear_init(model, torch.Generator().manual_seed(SEED)))


def build_sd3(path: str, depth: str) -> None:
    """The MMDiT sd-scripts builds from such a checkpoint (library/sd3_utils.py reads depth, patch size,
    positional-embedding size and the embedders' widths from the keys), with nn.Linear's default
    initialisation and a sin-cos positional embedding (the model leaves that buffer uninitialised)."""
    import numpy as np

    from library import sd3_models

    depth = int(depth)
    hidden = 64 * depth
    params = sd3_models.SD3Params(patch_size=SD3_PATCH, depth=depth, num_patches=SD3_POS_EMBED_MAX ** 2,
                                  pos_embed_max_size=SD3_POS_EMBED_MAX, adm_in_channels=CLIP_L_WIDTH + CLIP_G_WIDTH,
                                  qk_norm=None, x_block_self_attn_layers=[], context_embedder_in_features=T5_WIDTH,
                                  context_embedder_out_features=hidden, model_type="medium")
    torch.manual_seed(SEED)
    model = sd3_models.create_sd3_mmdit(params)
    pos = sd3_models.get_2d_sincos_pos_embed(hidden, SD3_POS_EMBED_MAX).astype(np.float32)
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(pos).reshape(1, -1, hidden))
    save_model(model, path, "float32", prefix="model.diffusion_model.")


# --- data --------------------------------------------------------------------------------------------
def build_data(out_dir: str, t5_tokens: str) -> None:
    """Two images with captions, and for each the text-encoder outputs the FLUX and SD3 caching
    strategies would have written (random values: the encoders themselves are all zeros)."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(out_dir, IMAGE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for i, caption in enumerate(CAPTIONS):
        stem = os.path.join(folder, f"image{i}")
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(stem + ".png")
        _text_encoder_outputs(stem, caption, int(t5_tokens), rng)


def build_identity_data(out_dir: str, t5_tokens: str) -> None:
    """sd_scripts_fixtures' smooth images in two buckets, each twice per epoch, with their text-encoder outputs."""
    import numpy as np
    from sd_scripts_fixtures import write_identity_images

    rng = np.random.default_rng(SEED)
    for stem in write_identity_images(Path(out_dir) / "2_aclora"):
        _text_encoder_outputs(str(stem), stem.with_suffix(".txt").read_text(), int(t5_tokens), rng)


def _text_encoder_outputs(stem: str, caption: str, t5_tokens: int, rng) -> None:
    """The caption, and the text-encoder outputs the FLUX and SD3 caching strategies would have written."""
    import numpy as np

    def mask(n):  # the tokenizers' attention masks
        return np.ones(n, dtype=np.int64)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    with open(stem + ".txt", "w", encoding="utf-8") as fh:
        fh.write(caption)
    # library/strategy_flux.py FluxTextEncoderOutputsCachingStrategy
    np.savez(stem + "_flux_te.npz", l_pooled=normal(CLIP_L_WIDTH), t5_out=normal(t5_tokens, T5_WIDTH),
             txt_ids=np.zeros((t5_tokens, 3), dtype=np.float32), t5_attn_mask=mask(t5_tokens),
             apply_t5_attn_mask=False)
    # library/strategy_sd3.py Sd3TextEncoderOutputsCachingStrategy
    np.savez(stem + "_sd3_te.npz", lg_out=normal(CLIP_TOKENS, CLIP_L_WIDTH + CLIP_G_WIDTH),
             lg_pooled=normal(CLIP_L_WIDTH + CLIP_G_WIDTH), t5_out=normal(t5_tokens, T5_WIDTH),
             clip_l_attn_mask=mask(CLIP_TOKENS), clip_g_attn_mask=mask(CLIP_TOKENS),
             t5_attn_mask=mask(t5_tokens), apply_lg_attn_mask=False, apply_t5_attn_mask=False)


# --- checks ------------------------------------------------------------------------------------------
def _report(tag: str, value: dict) -> None:
    print(f"{tag} " + json.dumps(value))


def block_swap_check() -> None:
    """What sd-scripts' block swap does to the blocks' weights when its device is the CPU.

    A narrow FLUX.1 (hidden 64, 2 double + 4 single blocks) and a depth-3 SD3 MMDiT with
    ``--blocks_to_swap 1``'s set-up, one forward and backward, and the set-up again (as the trainer
    does before the next forward): per block, does each weight still hold its own values?
    """
    import dataclasses

    from library import flux_models, sd3_models

    torch.manual_seed(SEED)
    flux = flux_models.Flux(dataclasses.replace(flux_models.configs["dev"].params, hidden_size=64, num_heads=2,
                                                axes_dim=[8, 12, 12], depth=2, depth_single_blocks=4))
    sd3 = sd3_models.create_sd3_mmdit(sd3_models.SD3Params(
        patch_size=2, depth=3, num_patches=64, pos_embed_max_size=8, adm_in_channels=32, qk_norm=None,
        x_block_self_attn_layers=[], context_embedder_in_features=32, context_embedder_out_features=192,
        model_type="medium"))
    with torch.no_grad():
        sd3.pos_embed.normal_()

    def flux_step():
        img, txt = torch.randn(1, 16, 64), torch.randn(1, 4, 4096)
        out = flux(img=img, img_ids=torch.zeros(1, 16, 3), txt=txt, txt_ids=torch.zeros(1, 4, 3),
                   timesteps=torch.rand(1), y=torch.randn(1, 768), guidance=torch.full((1,), 3.5))
        out.float().pow(2).mean().backward()

    def sd3_step():
        out = sd3(torch.randn(1, 16, 8, 8), torch.rand(1) * 1000, y=torch.randn(1, 32), context=torch.randn(1, 4, 32))
        out.float().pow(2).mean().backward()

    report = {}
    for name, model, blocks, step in (("flux", flux, lambda: list(flux.double_blocks) + list(flux.single_blocks),
                                       flux_step),
                                      ("sd3", sd3, lambda: list(sd3.joint_blocks), sd3_step)):
        model.requires_grad_(True)
        before = [{k: v.detach().clone() for k, v in b.state_dict().items()} for b in blocks()]
        model.enable_block_swap(1, torch.device("cpu"))
        model.prepare_block_swap_before_forward()
        try:
            step()
        except Exception as error:  # noqa: BLE001  (reported: what the trainer would meet in its first step)
            report[name] = {"blocks": len(before), "error": f"{type(error).__name__}: {error}"}
            continue
        model.prepare_block_swap_before_forward()
        changed = []
        for index, (block, saved) in enumerate(zip(blocks(), before)):
            now = block.state_dict()
            differing = [k for k in saved if not torch.equal(now[k], saved[k])]
            if differing:
                changed.append({"block": index, "tensors_changed": len(differing), "of": len(saved),
                                "example": differing[0]})
        report[name] = {"blocks": len(before), "changed": changed}
    _report("BLOCK-SWAP-CHECK", report)


def flux_merge_check(base: str, merged: str, lora: str) -> None:
    """flux_merge_lora.py's output against base + (alpha / rank) up @ down, per module of the LoRA file
    (relative Frobenius difference of the updates), and that the other weights did not move."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = load_file(lora)
    names = sorted({k.split(".", 1)[0] for k in weights})
    errors, untouched = {}, 0
    with safe_open(base, "pt") as b, safe_open(merged, "pt") as m:
        targets = {}
        for key in b.keys():
            if key.endswith(".weight"):
                targets["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = key
        for name in names:
            down, up = weights[f"{name}.lora_down.weight"].float(), weights[f"{name}.lora_up.weight"].float()
            alpha = float(weights[f"{name}.alpha"]) if f"{name}.alpha" in weights else down.shape[0]
            expected = (up @ down) * (alpha / down.shape[0])
            key = targets[name]
            actual = m.get_tensor(key).float() - b.get_tensor(key).float()
            errors[name] = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
        merged_keys = {targets[n] for n in names}
        for key in b.keys():
            if key not in merged_keys and not torch.equal(b.get_tensor(key).float(), m.get_tensor(key).float()):
                untouched += 1
    _report("MERGE-CHECK", {"relative_error": errors, "other_tensors_changed": untouched})


def _dit(kind: str, checkpoint: str):
    """The DiT the trainer builds from this checkpoint: FLUX.1 on the meta device (no weight read), SD3 for real."""
    if kind == "flux":
        from library import flux_utils

        with no_file_reads(flux_utils):
            return flux_utils.load_flow_model(checkpoint, None, "cpu")[1]
    from safetensors.torch import load_file

    from library import sd3_utils

    return sd3_utils.load_mmdit(load_file(checkpoint), None, "cpu")


def kohya_check(kind: str, checkpoint: str, lora: str) -> None:
    """sd-scripts' own LoRA module for the family (networks.lora_flux / lora_sd3) on the trainer's DiT: the names
    it gives the DiT's layers by default, and how its create_network_from_weights reads ``lora`` (each module's
    rank and factor shapes)."""
    from safetensors.torch import load_file

    if kind == "flux":
        from networks import lora_flux as module
    else:
        from networks import lora_sd3 as module
    model = _dit(kind, checkpoint)
    text_encoders = [None, None] if kind == "flux" else []  # lora_sd3 has no None check: none given
    own = module.create_network(1.0, 4, 1.0, None, text_encoders, model)
    network, weights = module.create_network_from_weights(1.0, lora, None, text_encoders, model)
    read = network.text_encoder_loras + network.unet_loras
    file = load_file(lora)
    shapes_differ = [m.lora_name for m in read
                     if tuple(m.lora_down.weight.shape) != tuple(file[f"{m.lora_name}.lora_down.weight"].shape)
                     or tuple(m.lora_up.weight.shape) != tuple(file[f"{m.lora_name}.lora_up.weight"].shape)]
    _report("KOHYA-CHECK", {"own_names": sorted(m.lora_name for m in own.text_encoder_loras + own.unet_loras),
                            "read_ranks": {m.lora_name: m.lora_dim for m in read}, "shapes_differ": shapes_differ})


def flux_merge_ours(base: str, merged: str, lora: str) -> None:
    """flux_merge_lora.py's merged model against AC-LoRA's own merge_to of the same file (built with
    create_network_from_weights on the trainer's DiT, the adapted layers given the checkpoint's weights):
    per module the relative difference of the two updates, and whether any other tensor changed."""
    from safetensors import safe_open

    from aclora_ext import create_network_from_weights

    model = _dit("flux", base)
    network, weights = create_network_from_weights(1.0, lora, None, [None, None], model)
    paths = {id(layer): path for path, layer in model.named_modules()}
    errors, bases = {}, {}
    with safe_open(base, "pt") as b:
        for m in network.loras:
            key = paths[id(m.org_module)] + ".weight"
            bases[m.lora_name] = (key, b.get_tensor(key))
            m.org_module.weight = torch.nn.Parameter(bases[m.lora_name][1], requires_grad=False)
        network.merge_to(None, model, weights, torch.float32, "cpu")
        with safe_open(merged, "pt") as t:
            for m in network.loras:
                key, weight = bases[m.lora_name]
                ours, theirs = m.org_module.weight.float() - weight.float(), t.get_tensor(key).float() - weight.float()
                errors[m.lora_name] = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))
            merged_keys = {key for key, _ in bases.values()}
            changed = sum(1 for key in b.keys() if key not in merged_keys
                          and not torch.equal(b.get_tensor(key).float(), t.get_tensor(key).float()))
    _report("MERGE-OURS", {"relative_error": errors, "other_tensors_changed": changed})


TASKS = {
    "kohya-check": kohya_check,
    "flux-merge-ours": flux_merge_ours,
    "block-swap-check": block_swap_check,
    "flux-merge-check": flux_merge_check,
    "tokenizers": build_tokenizers,
    "text-encoders": build_text_encoders,
    "ae": build_ae,
    "flux": build_flux,
    "sd3": build_sd3,
    "data": build_data,
    "identity-ae": build_identity_ae,
    "identity-data": build_identity_data,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(TASKS)}}} ARGS...")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    TASKS[sys.argv[1]](*sys.argv[2:])
