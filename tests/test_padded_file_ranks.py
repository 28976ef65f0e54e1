"""A file that export padded (a model part whose modules share one rank but one) gives back the ranks the
run chose: ``ranks_from``, ``load_weights`` and ``file_ranks`` read a padded module at its own rank
(``aclora_padded``), not at the rank it is stored at with zero components.

Built on planted data (no diffusers or transformers model), so the layout that pads is certain: the
tiny models of one library stack give it (sd-scripts' pin: SDXL's first text encoder) and of another not.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from torch import nn

from aclora_ext.network.factory import attach
from aclora_ext.network.saving import file_ranks

R = 8
SURE_P = 0.99  # every planted signal clears it, the noise floor does not
#: te1 has one module at 3 and the others at 2 (padded to 3); the U-Net's three ranks all differ (not padded)
PLANTED = {"lora_te1_0": 3, "lora_te1_1": 2, "lora_te1_2": 2, "lora_unet_0": 4, "lora_unet_1": 2, "lora_unet_2": 1}


def two_part_model(seed: int = 0) -> nn.Module:
    """Layers whose AC-LoRA names fall in two kohya parts (lora_te1_*, lora_unet_*)."""
    torch.manual_seed(seed)
    return nn.ModuleDict({"te1": nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 32), nn.Linear(32, 24)),
                          "unet": nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 32), nn.Linear(32, 24))})


def planted(rows: int, cols: int, k: int, seed: int) -> torch.Tensor:
    """A rank-k signal (singular values 2 .. 1) plus noise of std 1e-3."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    signal = (u * torch.linspace(2.0, 1.0, k, dtype=torch.float64)) @ v.T
    return (signal + 1e-3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).float()


def trained_at_planted_ranks():
    network = attach(two_part_model(), max_rank=R, restart_mode="paper")
    with torch.no_grad():
        for i, m in enumerate(network.loras):
            k = PLANTED[m.lora_name]
            m.lora_down.weight.copy_(planted(R, m.in_dim, k, seed=2 * i))
            m.lora_up.weight.copy_(planted(m.out_dim, R, k, seed=2 * i + 1))
    network.restart(p=SURE_P)
    assert network.ranks() == PLANTED  # the premise: paper mode found the planted ranks
    return network


def test_a_padded_file_gives_back_the_ranks_the_run_chose(tmp_path):
    path = str(tmp_path / "padded.safetensors")
    network = trained_at_planted_ranks()
    assert network.save_weights(path, torch.float32, {})
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        stored = {k[: -len(".lora_down.weight")]: f.get_slice(k).get_shape()[0] for k in f.keys()
                  if k.endswith(".lora_down.weight")}
    # the layout is padded: te1's rank-2 modules are stored at 3, as aclora_ranks says; the U-Net is not
    assert json.loads(meta["aclora_padded"]) == {"lora_te1_1": 2, "lora_te1_2": 2}
    assert stored == json.loads(meta["aclora_ranks"]) == {**PLANTED, "lora_te1_1": 3, "lora_te1_2": 3}

    assert file_ranks(path) == PLANTED
    second_run = attach(two_part_model(seed=1), max_rank=R, restart_mode="product", ranks_from=path)
    assert second_run.ranks() == PLANTED  # the two-run recipe trains at the chosen ranks
    continued = attach(two_part_model(seed=2), max_rank=R, restart_mode="off")
    continued.load_weights(path)
    assert continued.ranks() == PLANTED
