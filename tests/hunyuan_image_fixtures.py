"""sd-scripts' HunyuanImage-2.1 DiT at tiny widths, for the tests that run its own code.

``HYImageDiffusionTransformer.__init__`` hard-codes its 17 B architecture as literals (hidden size 3584,
28 heads, 20 double and 40 single blocks, the ByT5 mapper's 1472/2048 widths). ``narrow`` swaps those
literals of that one function's code for small ones (the Qwen2.5-VL text width is its hidden size), so
that everything else is sd-scripts' own code: its block classes, layer names and forward. Head width
stays 128 (its 2-D RoPE dims 64 + 64) and the latents 64 channels.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

#: the literals of HYImageDiffusionTransformer.__init__ -> their tiny values (hidden 128 = 1 head of 128)
TINY = {3584: 128, 28: 1, 20: 2, 40: 3, 1472: 32, 2048: 64}
HIDDEN, BYT5_WIDTH, LATENT_CHANNELS = TINY[3584], TINY[1472], 64


@contextlib.contextmanager
def narrow(models, sizes: dict = TINY) -> Iterator[None]:
    """Within the block, ``models.HYImageDiffusionTransformer()`` (``models``: sd-scripts'
    library.hunyuan_image_models) builds the DiT with ``sizes`` in place of its literals."""
    cls = models.HYImageDiffusionTransformer
    original = cls.__init__.__code__
    consts = tuple(sizes.get(c, c) if type(c) is int else c for c in original.co_consts)
    missing = set(sizes) - set(c for c in original.co_consts if type(c) is int)
    if missing:
        raise AssertionError(f"HYImageDiffusionTransformer.__init__ no longer has the literals {sorted(missing)}")
    cls.__init__.__code__ = original.replace(co_consts=consts)
    try:
        yield
    finally:
        cls.__init__.__code__ = original


def tiny_dit(models, seed: int = 0, sizes: dict = TINY):
    import torch

    torch.manual_seed(seed)
    with narrow(models, sizes):
        model = models.HYImageDiffusionTransformer(attn_mode="torch")
    with torch.no_grad():  # sd-scripts zero-initialises nothing, but make every layer matter at random init
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(std=0.02)
    return model


def dit_inputs(batch: int = 1, size: int = 4, tokens: int = 5, byt5_tokens: int = 3, seed: int = 0):
    """(hidden_states, timestep, text_states, text_mask, byt5_states, byt5_mask) as the trainer passes them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, LATENT_CHANNELS, size, size, generator=g)
    timesteps = torch.randint(1, 1000, (batch,), generator=g)
    text = torch.randn(batch, tokens, HIDDEN, generator=g)
    text_mask = torch.ones(batch, tokens, dtype=torch.long)
    text_mask[:, -1] = 0
    byt5 = torch.randn(batch, byt5_tokens, BYT5_WIDTH, generator=g)
    byt5_mask = torch.ones(batch, byt5_tokens, dtype=torch.long)
    return latents, timesteps, text, text_mask, byt5, byt5_mask
