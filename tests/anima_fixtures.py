"""Tiny Anima models for the tests against sd-scripts' own code (run in sd-scripts' pinned stack).

sd-scripts' Anima loaders hard-code the architecture (``anima_utils.load_anima_model``'s DiT config, the
LLM adapter's 1024 widths inside ``Anima.__init__``, ``qwen_image_autoencoder_kl.load_vae``'s config), so
``shrunk()`` changes only the constructor values of those three classes (the same classes, narrower):
sd-scripts' own code then builds, loads, trains and saves them as it would the real ones. The Qwen3 text
encoder comes from a folder (``--qwen3 DIR``: a tiny ``Qwen3ForCausalLM`` and a tokenizer built from
``configs/qwen3_06b``'s vocab.json and merges.txt, as the snapshot lacks its tokenizer.json).
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any, Iterator

import torch

#: the DiT's constructor values that change (the rest are anima_utils.load_anima_model's)
DIT = {"model_channels": 32, "num_blocks": 2, "num_heads": 2, "crossattn_emb_channels": 32, "adaln_lora_dim": 8}
#: Qwen3's hidden size: the LLM adapter's source width
QWEN3_HIDDEN = 32
ADAPTER = {"source_dim": QWEN3_HIDDEN, "target_dim": 32, "model_dim": 32, "num_layers": 2, "num_heads": 2}
VAE = {"base_dim": 8}
QWEN3 = {"hidden_size": QWEN3_HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16}
#: load_anima_model's config, with DIT's values (for models built in the test process)
DIT_CONFIG = {
    "max_img_h": 512, "max_img_w": 512, "max_frames": 128, "in_channels": 16, "out_channels": 16,
    "patch_spatial": 2, "patch_temporal": 1, "concat_padding_mask": True, "pos_emb_cls": "rope3d",
    "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True,
    "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
    "rope_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False, "use_llm_adapter": True, **DIT,
}


def _patch(cls: type, overrides: dict[str, Any]) -> Any:
    original = cls.__init__

    @functools.wraps(original)
    def init(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **{**kwargs, **overrides})

    cls.__init__ = init
    return original


@contextlib.contextmanager
def shrunk() -> Iterator[None]:
    """sd-scripts' Anima DiT, LLM adapter and VAE built at the tiny widths above while inside."""
    from library import anima_models, qwen_image_autoencoder_kl

    classes = [(anima_models.Anima, DIT), (anima_models.LLMAdapter, ADAPTER),
               (qwen_image_autoencoder_kl.AutoencoderKLQwenImage, VAE)]
    originals = [(cls, _patch(cls, values)) for cls, values in classes]
    try:
        yield
    finally:
        for cls, original in originals:
            cls.__init__ = original


def anima(seed: int = 0) -> torch.nn.Module:
    """sd-scripts' Anima at the tiny widths (LLM adapter included), random weights."""
    from library import anima_models

    torch.manual_seed(seed)
    with shrunk():
        return anima_models.Anima(**DIT_CONFIG)


def qwen3(seed: int = 0) -> torch.nn.Module:
    """A tiny Qwen3 text encoder as anima_utils loads it (Qwen3ForCausalLM(...).model)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config.from_pretrained(str(qwen3_config_dir()), **QWEN3)
    return transformers.Qwen3ForCausalLM(config).model


def qwen3_config_dir() -> Path:
    import sd_scripts_fixtures as e2e

    return e2e.SD_SCRIPTS / "configs" / "qwen3_06b"


def build(folder: Path) -> dict[str, str]:
    """The files a run of anima_train_network.py needs, into ``folder``: the DiT and VAE checkpoints, the
    Qwen3 folder, two 64-pixel images with captions. Returns their paths by name."""
    import numpy as np
    import transformers
    from PIL import Image
    from safetensors.torch import save_file

    from library import qwen_image_autoencoder_kl

    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"net.{k}": v.contiguous() for k, v in anima().state_dict().items()}, str(folder / "dit.safetensors"))
    torch.manual_seed(1)
    with shrunk():
        vae = qwen_image_autoencoder_kl.AutoencoderKLQwenImage()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    qwen_dir = folder / "qwen3"
    source = qwen3_config_dir()
    tokenizer = transformers.Qwen2TokenizerFast(vocab_file=str(source / "vocab.json"),
                                                merges_file=str(source / "merges.txt"),
                                                **_tokenizer_settings(source / "tokenizer_config.json"))
    tokenizer.save_pretrained(str(qwen_dir))
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config.from_pretrained(str(source), **QWEN3))
    model.save_pretrained(str(qwen_dir))
    images = folder / "train" / "1_anima"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(("a red square", "a blue circle")):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return {"dit": str(folder / "dit.safetensors"), "vae": str(folder / "vae.safetensors"), "qwen3": str(qwen_dir),
            "train": str(folder / "train")}


def _tokenizer_settings(config: Path) -> dict[str, Any]:
    """The special tokens of Qwen3's tokenizer_config.json (its added tokens and eos/pad)."""
    settings = json.loads(config.read_text())
    decoder = settings.get("added_tokens_decoder", {})
    added = [t["content"] for _, t in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    return {"eos_token": settings.get("eos_token"), "pad_token": settings.get("pad_token"),
            "additional_special_tokens": added, "errors": settings.get("errors", "replace")}
