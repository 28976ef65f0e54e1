"""What the docs promise about the product mode's rank search, each pinned by a test that fails when it breaks.

docs/how-it-works.md: "a module with no recorded inputs (right after a resume or a RESTART) keeps its nonzero
components until the next decision"; the save-time decision changes nothing in training; held slots add nothing
to the file. Expected values come from the planted updates (``torch.linalg.svd`` of the explicit matrices).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from aclora_ext import attach

IN, OUT, R = 32, 24, 12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen(seed)))[0]


def planted(module, singular_values, noise: float, seed: int) -> torch.Tensor:
    """Load factors whose update is truth (the given spectrum) + noise components; returns the truth."""
    k = len(singular_values)
    basis_out, basis_in = orthonormal(module.out_dim, R, seed), orthonormal(IN, R, seed + 1)
    values = torch.cat([torch.as_tensor(singular_values, dtype=torch.float32), noise * torch.linspace(1.0, 0.6, R - k)])
    update = basis_out @ torch.diag(values) @ basis_in.T
    u, s, vh = torch.linalg.svd(update / module.scale, full_matrices=False)
    with torch.no_grad():
        module.lora_up.weight.copy_(u[:, :R] * s[:R].sqrt())
        module.lora_down.weight.copy_(s[:R].sqrt()[:, None] * vh[:R])
    return basis_out[:, :k] @ torch.diag(values[:k]) @ basis_in[:, :k].T


def two_layers(**options):
    """Two parallel layers (the model's output is their sum), with a cliff at rank 2 in each."""
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(IN, OUT, bias=False), nn.Linear(IN, OUT, bias=False)])
    network = attach(model, max_rank=R, alpha=float(R), **options)
    truths = [planted(m, torch.tensor([2.0, 1.5]), 0.5, seed=10 * i) for i, m in enumerate(network.loras)]
    x = torch.randn(512, IN, generator=gen(99))
    with torch.no_grad():
        target = sum(x @ (layer.weight + t).T for layer, t in zip(model, truths))

    def held_out():
        return (sum(layer(x) for layer in model) - target).pow(2).mean()

    return model, network, held_out


def train_forward(network, layers, seed: int = 1) -> None:
    """A training-mode forward with gradients on through ``layers`` only (what a step records)."""
    network.train()
    x = torch.randn(256, IN, generator=gen(seed))
    with torch.enable_grad():
        for layer in layers:
            layer(x)


def test_a_module_whose_inputs_were_not_recorded_keeps_every_nonzero_component_at_a_held_out_decision():
    model, network, held_out = two_layers()
    train_forward(network, [model[0]])  # model[1]'s module never sees a training input
    network.set_validation(held_out)
    report = network.restart()
    measured, unmeasured = (m.lora_name for m in network.loras)
    assert report.p_source == "validation"
    assert report.ranks[measured] == 2, "the recorded module is judged on the held-out loss (its cliff at 2)"
    assert report.ranks[unmeasured] == R, "a module without recorded inputs was cut before it could be judged"


def test_a_module_whose_inputs_were_not_recorded_keeps_every_component_in_the_file_too(tmp_path):
    model, network, held_out = two_layers()
    train_forward(network, [model[0]])
    network.set_validation(held_out)
    path = tmp_path / "unmeasured.safetensors"
    assert network.save_weights(str(path))
    tensors = load_file(path)
    measured, unmeasured = (m.lora_name for m in network.loras)
    assert tensors[f"{measured}.lora_down.weight"].shape[0] == 2
    assert tensors[f"{unmeasured}.lora_down.weight"].shape[0] == R, "the file cut a module nothing could judge"


def file_update(tensors: dict, name: str) -> torch.Tensor:
    """The update a consumer applies: alpha / rank * up @ down, rank = lora_down's rows."""
    down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
    return float(tensors[f"{name}.alpha"]) / down.shape[0] * up @ down


def test_held_slots_are_cleared_before_export_so_the_file_is_what_the_network_computes(tmp_path):
    model, network, held_out = two_layers()
    train_forward(network, list(model))
    network.set_validation(held_out)
    assert set(network.restart().ranks.values()) == {2}  # a held-out cut: 10 of 12 slots held in each module
    train_forward(network, list(model), seed=2)
    x = torch.randn(64, IN, generator=gen(5))
    with torch.no_grad():
        for m in network.loras:  # what momentum and weight decay leave in the held lora_up columns
            m.lora_up.weight[:, 2:] += torch.randn(m.out_dim, R - 2, generator=gen(7))
        network.eval()
        computed = [layer(x) - x @ layer.weight.T for layer in model]  # the held slots add nothing
    path = tmp_path / "held.safetensors"
    assert network.save_weights(str(path))
    tensors = load_file(path)
    for m, out in zip(network.loras, computed):
        written = x @ file_update(tensors, m.lora_name).T
        assert torch.allclose(written, out, atol=1e-4), f"{m.lora_name}: the file carries the held slots' values"


@pytest.mark.parametrize("restart_mode", ["off", "product"])
def test_slots_held_by_ranks_from_are_cleared_before_export(tmp_path, restart_mode):
    """The second run of the two-run recipe trains at the first run's ranks (the other slots held); whatever
    the optimiser leaves in the held columns must not reach the file."""
    model, first, held_out = two_layers()
    train_forward(first, list(model))
    first.set_validation(held_out)
    ranks_file = tmp_path / "first.safetensors"
    assert first.save_weights(str(ranks_file))
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(IN, OUT, bias=False), nn.Linear(IN, OUT, bias=False)])
    network = attach(model, max_rank=R, alpha=float(R), restart_mode=restart_mode, ranks_from=str(ranks_file))
    assert set(network.ranks().values()) == {2}
    x = torch.randn(64, IN, generator=gen(5))
    with torch.no_grad():
        for i, m in enumerate(network.loras):  # trained factors, plus what momentum left in the held columns
            planted(m, torch.tensor([2.0, 1.5]), 0.0, seed=10 * i)
            m.lora_up.weight[:, 2:] = torch.randn(m.out_dim, R - 2, generator=gen(7))
        network.eval()
        computed = [layer(x) - x @ layer.weight.T for layer in model]
    path = tmp_path / "second.safetensors"
    assert network.save_weights(str(path))
    tensors = load_file(path)
    for m, out in zip(network.loras, computed):
        written = x @ file_update(tensors, m.lora_name).T
        assert torch.allclose(written, out, atol=1e-4), f"{m.lora_name}: the file carries the held slots' values"
