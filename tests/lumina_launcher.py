"""sd-scripts' real Lumina 2 trainer (lumina_train_network.py) on a CPU with a tiny model (subprocess tasks).

Run as ``python tests/lumina_launcher.py TASK ARGS...`` from sd-scripts' folder, in its environment (its folder,
and the torchvision stand-in where needed, on PYTHONPATH), by tests/test_lumina_e2e.py.

sd-scripts hard-codes Lumina 2's architecture: the 2B NextDiT (``LuminaParams.get_2b_config``), Gemma2-2B
(the config dict inside ``lumina_util.load_gemma2``) and FLUX.1's AutoEncoder (``flux_models.configs``).
``shrink()`` changes those configuration values only, to a NextDiT of width 64 and 2 blocks (2 refiners of
each kind), a Gemma2 of width 32 and 2 layers and an AutoEncoder of 32 channels; every loader, the training
loop, the validation pass and the save stay sd-scripts' own (``train`` runs the script as ``__main__``).

Tasks:
  build DIR             the tiny checkpoints (dit, gemma2, ae .safetensors, random weights), a Gemma tokenizer in
                        the Hugging Face cache layout under DIR/hf-cache (for --tokenizer_cache_dir), and two
                        captioned 64x64 images in DIR/data
  train ARGS...         lumina_train_network.py ARGS, after shrink()
  kohya-check DIR LORA  sd-scripts' networks.lora_lumina on the trainer's models: the names it gives them by
                        default and how its create_network_from_weights reads LORA (one JSON line)
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import sys

import torch

SEED = 0
IMAGE_SIZE = 64
CAPTIONS = ("aclora_style, a red square on grey", "aclora_style, a blue circle on white")
IMAGE_FOLDER = "1_aclora"  # sd-scripts' "<repeats>_<name>" DreamBooth layout
GEMMA_ID = "google/gemma-2-2b"  # library/strategy_lumina.py loads its tokenizer by this id
GEMMA_WIDTH = 32
DIT = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, axes_dims=[4, 6, 6], cap_feat_dim=GEMMA_WIDTH)
GEMMA2 = dict(hidden_size=GEMMA_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, vocab_size=128)
AE = dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)  # 8x down, 16 latent channels as the real one


def shrink() -> None:
    """The three hard-coded architectures, tiny: configuration values only."""
    import transformers

    from library import flux_models, lumina_models, lumina_util

    real_2b = lumina_models.LuminaParams.get_2b_config

    def tiny_2b(cls):
        return dataclasses.replace(real_2b(), **DIT)

    lumina_models.LuminaParams.get_2b_config = classmethod(tiny_2b)
    lumina_util.Gemma2Config = lambda **config: transformers.Gemma2Config(**{**config, **GEMMA2})
    schnell = flux_models.configs["schnell"]
    flux_models.configs["schnell"] = dataclasses.replace(
        schnell, ae_params=dataclasses.replace(schnell.ae_params, **AE))


def _save(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def build_tokenizer(cache_dir: str) -> None:
    """A GemmaTokenizerFast over printable characters, where from_pretrained(GEMMA_ID, cache_dir=...) finds it
    offline (models--google--gemma-2-2b/snapshots/<revision>, refs/main naming the revision)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GemmaTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= GEMMA2["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = GemmaTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                              pad_token="<pad>")
    revision = "0" * 40
    repo = os.path.join(cache_dir, "models--" + GEMMA_ID.replace("/", "--"))
    fast.save_pretrained(os.path.join(repo, "snapshots", revision))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(revision)


def build(out_dir: str) -> None:
    import numpy as np
    from PIL import Image

    shrink()
    from library import flux_models, lumina_models, lumina_util

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(SEED)
    dit = lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner()
    with torch.no_grad():  # sd-scripts zero-initialises the modulations: random ones make every layer count
        for name, p in dit.named_parameters():
            if "adaLN_modulation" in name:
                p.normal_(0, 0.02)
    _save(dit, os.path.join(out_dir, "dit.safetensors"))
    gemma2 = transformers_gemma2()
    _save(gemma2, os.path.join(out_dir, "gemma2.safetensors"))
    _save(flux_models.AutoEncoder(flux_models.configs["schnell"].ae_params), os.path.join(out_dir, "ae.safetensors"))
    build_tokenizer(os.path.join(out_dir, "hf-cache"))
    folder = os.path.join(out_dir, "data", IMAGE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for i, caption in enumerate(CAPTIONS):
        stem = os.path.join(folder, f"image{i}")
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as fh:
            fh.write(caption)


def transformers_gemma2():
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(SEED + 1)
    return Gemma2Model(Gemma2Config(**GEMMA2))


def train(argv: list[str]) -> None:
    shrink()
    sys.argv = ["lumina_train_network.py", *argv]
    runpy.run_path("lumina_train_network.py", run_name="__main__")


def kohya_check(model_dir: str, lora: str) -> None:
    shrink()
    from networks import lora_lumina
    from safetensors.torch import load_file

    from library import lumina_util

    dit = lumina_util.load_lumina_model(os.path.join(model_dir, "dit.safetensors"), torch.float32, torch.device("cpu"))
    gemma2 = lumina_util.load_gemma2(os.path.join(model_dir, "gemma2.safetensors"), torch.float32, "cpu")
    own = lora_lumina.create_network(1.0, 4, 1.0, None, [gemma2], dit)
    network, weights = lora_lumina.create_network_from_weights(1.0, lora, None, [gemma2], dit)
    network.apply_to([gemma2], dit, True, True)
    info = network.load_state_dict(weights, strict=False)
    read = network.text_encoder_loras + network.unet_loras
    file = load_file(lora)
    shapes_differ = [m.lora_name for m in read
                     if tuple(m.lora_down.weight.shape) != tuple(file[f"{m.lora_name}.lora_down.weight"].shape)
                     or tuple(m.lora_up.weight.shape) != tuple(file[f"{m.lora_name}.lora_up.weight"].shape)]
    print("KOHYA-CHECK " + json.dumps({
        "own_names": sorted(m.lora_name for m in own.text_encoder_loras + own.unet_loras),
        "read_ranks": {m.lora_name: m.lora_dim for m in read}, "shapes_differ": shapes_differ,
        "missing": list(info.missing_keys), "unexpected": list(info.unexpected_keys)}))


if __name__ == "__main__":
    task, *rest = sys.argv[1:]
    if task == "build":
        build(*rest)
    elif task == "train":
        train(rest)
    elif task == "kohya-check":
        kohya_check(*rest)
    else:
        raise SystemExit(f"unknown task {task!r}; allowed: build, train, kohya-check")
