"""sd-scripts' hunyuan_image_train_network.py at tiny sizes, offline, on a CPU (run from sd-scripts' folder).

  python tests/run_hunyuan_image_trainer.py build FOLDER   the checkpoints, tokenizers and images (prints their paths)
  python tests/run_hunyuan_image_trainer.py train ARGS...  the trainer's own __main__ with ARGS

sd-scripts hard-codes HunyuanImage-2.1's 17 B DiT, Qwen2.5-VL-7B, byT5-small and its 32x VAE, so ``train`` runs
the unmodified script (``runpy``, as ``python hunyuan_image_train_network.py ARGS`` would) inside ``shrunk()``:
only constructor and configuration values change; its own code loads the files built here, caches the latents
and the text encoders' outputs, trains, validates and saves.

  * DiT: ``hunyuan_image_fixtures.TINY`` (hidden 128, one head of 128, 2 double + 3 single blocks), its byT5
    mapper still 1472 wide: for captions without quoted text the trainer's byT5 step returns zeros of that width;
  * Qwen2.5-VL: hidden 128 (the DiT's text width), 2 layers (the trainer takes the 3rd-last hidden states),
    both in its top-level config and its nested ``text_config``, and a one-block ``vision_config`` 32 wide;
  * byT5: one layer, d_model 1472 kept (never run for these captions);
  * VAE: 32 channels at its first 4 levels and 128 at its last 2 (still 32x down, 64 latent channels).

The two tokenizers the loaders take from the Hugging Face hub (Qwen2's byte-level BPE over the 256 byte symbols,
no merges; byT5's bytes) are written in the hub's cache layout under FOLDER/hub (HF_HUB_CACHE for the runs).
Run it in sd-scripts' environment (tests/sd_scripts_fixtures.sd_scripts_environment).
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hunyuan_image_fixtures as hy  # noqa: E402
import sd_scripts_fixtures as e2e  # noqa: E402

QWEN_TEXT = {"hidden_size": hy.HIDDEN, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_window_layers": 2, "vocab_size": 320}
QWEN_MROPE_SECTION = [8, 12, 12]  # half the head width 64, split as sd-scripts' [16, 24, 24] of 128
QWEN_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "out_hidden_size": hy.HIDDEN, "fullatt_block_indexes": [0]}
BYT5 = {"d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1, "num_decoder_layers": 1}
VAE_CHANNELS = {(128, 256, 512, 512, 1024, 1024): (32, 32, 32, 32, 128, 128)}  # the last must stay a multiple of 128
QWEN_ID, BYT5_ID = "Qwen/Qwen2.5-VL-7B-Instruct", "google/byt5-small"
#: the DiT's sizes: hunyuan_image_fixtures.TINY but the byT5 mapper's input width, 1472 as byT5-small's
DIT = {k: v for k, v in hy.TINY.items() if k != 1472}
# no quoted words: the trainer's byT5 is not run for them, it gives zeros 1472 wide (its width hard-coded there)
CAPTIONS = ("a red square on grey", "a blue circle on white")


def _tiny_qwen(config_class):
    def build(**config: Any):
        text = {**config["text_config"], **QWEN_TEXT}
        text["layer_types"] = text["layer_types"][: QWEN_TEXT["num_hidden_layers"]]
        for values in (config, text):
            values["rope_scaling"] = {**values["rope_scaling"], "mrope_section": QWEN_MROPE_SECTION}
        config = {**config, **QWEN_TEXT, "rope_scaling": text["rope_scaling"], "text_config": text,
                  "vision_config": {**config["vision_config"], **QWEN_VISION}}
        return config_class(**config)

    return build


def _literals(function, sizes: dict):
    """``function``'s code with ``sizes``' literals swapped (an error when none of them is there any more)."""
    code = function.__code__
    consts = tuple(sizes.get(c, c) if type(c) in (int, tuple) else c for c in code.co_consts)
    missing = [k for k in sizes if k not in code.co_consts]
    if missing:
        raise SystemExit(f"{function.__qualname__} no longer has the literals {missing}")
    return code.replace(co_consts=consts)


@contextlib.contextmanager
def shrunk() -> Iterator[None]:
    """sd-scripts' HunyuanImage-2.1 models built at the tiny sizes above while inside."""
    from library import hunyuan_image_models, hunyuan_image_text_encoder as te, hunyuan_image_vae

    vae_init = hunyuan_image_vae.HunyuanVAE2D.__init__
    qwen_config, t5_config = te.Qwen2_5_VLConfig, te.T5Config
    with hy.narrow(hunyuan_image_models, DIT):
        vae_init_code = vae_init.__code__
        vae_init.__code__ = _literals(vae_init, VAE_CHANNELS)
        te.Qwen2_5_VLConfig = _tiny_qwen(qwen_config)
        te.T5Config = lambda **config: t5_config(**{**config, **BYT5})
        try:
            yield
        finally:
            vae_init.__code__ = vae_init_code
            te.Qwen2_5_VLConfig, te.T5Config = qwen_config, t5_config


# --- build ---------------------------------------------------------------------------------------------
def _save(state: dict, path: Path, dtype) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, str(path))


def _hub_folder(hub: Path, repo_id: str) -> Path:
    """Where from_pretrained(repo_id) finds a model offline in the hub cache ``hub`` (refs/main names it)."""
    revision = "0" * 40
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def _tokenizers(hub: Path) -> None:
    from transformers import ByT5Tokenizer, Qwen2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    ByT5Tokenizer().save_pretrained(str(_hub_folder(hub, BYT5_ID)))
    qwen = _hub_folder(hub, QWEN_ID)
    qwen.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) <= QWEN_TEXT["vocab_size"]
    (qwen / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (qwen / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    Qwen2Tokenizer(str(qwen / "vocab.json"), str(qwen / "merges.txt")).save_pretrained(str(qwen))


def _loader_config(function, marker: str) -> dict:
    """The config JSON a loader function holds as a string literal."""
    return json.loads(next(c for c in function.__code__.co_consts if isinstance(c, str) and marker in c))


def build(folder: Path) -> dict[str, str]:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ByT5Tokenizer, Qwen2_5_VLForConditionalGeneration, T5ForConditionalGeneration

    from library import hunyuan_image_models, hunyuan_image_text_encoder as te, hunyuan_image_vae

    folder.mkdir(parents=True, exist_ok=True)
    hub = folder / "hub"
    _tokenizers(hub)
    _save(hy.tiny_dit(hunyuan_image_models, sizes=DIT).state_dict(), folder / "dit.safetensors", torch.bfloat16)
    with shrunk():
        torch.manual_seed(1)
        _save(hunyuan_image_vae.HunyuanVAE2D().state_dict(), folder / "vae.safetensors", torch.float16)
        torch.manual_seed(2)
        qwen = Qwen2_5_VLForConditionalGeneration._from_config(
            te.Qwen2_5_VLConfig(**_loader_config(te.load_qwen2_5_vl, '"vision_config"')))
        # the checkpoint's names, which load_qwen2_5_vl maps to the model's
        state = {}
        for key, value in qwen.state_dict().items():
            for model_key, file_key in (("model.language_model.", "model."), ("model.visual.", "visual.")):
                if key.startswith(model_key):
                    key = file_key + key[len(model_key):]
                    break
            state[key] = value
        _save(state, folder / "qwen.safetensors", torch.bfloat16)
        torch.manual_seed(3)
        byt5 = T5ForConditionalGeneration._from_config(
            te.T5Config(**_loader_config(te.load_byt5, '"d_model"'))).get_encoder()
        te.add_special_token(ByT5Tokenizer.from_pretrained(str(_hub_folder(hub, BYT5_ID))), byt5)
        state = dict(byt5.state_dict())
        state["shared.weight"] = state.pop("embed_tokens.weight")
        _save(state, folder / "byt5.safetensors", torch.float16)
    images = folder / "train" / "1_style"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption, encoding="utf-8")
    return {"dit": str(folder / "dit.safetensors"), "vae": str(folder / "vae.safetensors"),
            "qwen": str(folder / "qwen.safetensors"), "byt5": str(folder / "byt5.safetensors"),
            "train": str(folder / "train"), "hub": str(hub)}


def main() -> int:
    command, *rest = sys.argv[1:]
    if command == "build":
        print("HUNYUAN-IMAGE-FIXTURES " + json.dumps(build(Path(rest[0]))))
        return 0
    if command == "train":
        script = e2e.SD_SCRIPTS / "hunyuan_image_train_network.py"
        with shrunk():
            sys.argv = [str(script), *rest]
            runpy.run_path(str(script), run_name="__main__")
        return 0
    raise SystemExit(f"unknown command {command!r}; allowed: build, train")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
