"""Every LoRA module's scale is a Python number that stays equal to alpha / rank.

The forward multiplies by ``scale`` once per module and step; reading it from
the ``alpha`` buffer would be a device-to-host synchronisation each time on a
GPU. So the scale is kept as a Python float and must follow every way alpha or
the rank can change: construction, ``set_alpha``, ``load_state_dict`` (what
``--resume`` does), ``load_weights`` with padding, ``create_network_from_weights``,
RESTART, and a cast of the network (``--full_bf16``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aclora_ext import create_network_from_weights
from aclora_ext.lora.module import ACLoRAModule
from helpers import lora_network, pretend_trained


def in_step(network) -> bool:
    """Every module's scale equals the alpha its buffer holds over its rank (alpha 0 meaning the rank)."""
    return all(isinstance(m.scale, float)
               and math.isclose(m.scale, (float(m.alpha) or m.rank) / m.rank, rel_tol=1e-6) for m in network.loras)


def test_the_scale_is_a_python_float_computed_without_reading_the_buffer():
    module = ACLoRAModule("lora_x", nn.Linear(16, 8), rank=4, alpha=2.0)
    module.alpha = torch.empty((), device="meta")  # a buffer that cannot be read back
    assert module.scale == 0.5 and type(module.scale) is float


@pytest.mark.parametrize("alpha, expected", [(None, 1.0), (0, 1.0), (2.0, 0.5), (16.0, 4.0)])
def test_alpha_none_or_zero_means_the_rank_as_in_networks_lora(alpha, expected):
    module = ACLoRAModule("lora_x", nn.Linear(16, 8), rank=4, alpha=alpha)
    assert module.scale == expected and float(module.alpha) == expected * 4


def test_set_alpha_changes_the_buffer_and_the_scale_together():
    module = ACLoRAModule("lora_x", nn.Linear(16, 8), rank=4, alpha=2.0)
    module.set_alpha(6.0)
    assert float(module.alpha) == 6.0 and module.scale == 1.5


def test_resuming_a_state_with_another_alpha_gives_its_scale_and_its_function(sd1_models, style_data):
    from aclora_ext.harness import tiny
    from aclora_ext.harness.sdcalls import model_outputs

    source = pretend_trained(lora_network(sd1_models, rank=4, alpha=8.0))
    expected = model_outputs(sd1_models, style_data[:2], sdxl=False)
    other = tiny.sd1_models(seed=0)
    target = lora_network(other, rank=4, alpha=1.0)
    target.load_state_dict(source.state_dict())  # what accelerator.load_state does on --resume
    assert in_step(target) and {m.scale for m in target.loras} == {2.0}
    assert torch.allclose(model_outputs(other, style_data[:2], sdxl=False), expected, atol=1e-6)


def test_a_restart_leaves_every_scale_equal_to_alpha_over_rank(planted_network, sd1_models):
    network, _ = planted_network(sd1_models, max_rank=8, alpha=4.0, ps=(0.9, 0.8))
    assert in_step(network) and {m.scale for m in network.loras} == {0.5}


def test_loading_a_smaller_rank_file_pads_it_under_the_networks_own_scale(sd1_models, style_data, tmp_path):
    from aclora_ext.harness import tiny
    from aclora_ext.harness.sdcalls import model_outputs

    small = pretend_trained(lora_network(sd1_models, rank=2, alpha=1.0))
    path = str(tmp_path / "small.safetensors")
    small.save_weights(path)
    expected = model_outputs(sd1_models, style_data[:2], sdxl=False)
    other = tiny.sd1_models(seed=0)
    larger = lora_network(other, rank=8, alpha=4.0)
    assert len(larger.load_weights(path).padded) == len(larger.loras)
    assert in_step(larger) and {m.scale for m in larger.loras} == {0.5}
    for big, little in zip(larger.loras, small.loras):  # the file's alpha/k * up @ down, exactly
        assert torch.allclose(big.delta_weight(), little.delta_weight(), atol=1e-6)
    assert torch.allclose(model_outputs(other, style_data[:2], sdxl=False), expected, atol=1e-5)


def test_a_network_built_from_a_file_takes_each_modules_rank_and_alpha(sd1_models, tmp_path):
    from safetensors.torch import save_file

    source = pretend_trained(lora_network(sd1_models, rank=4, alpha=2.0))
    tensors = {k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("aclora_")}
    alphas = {}
    for i, m in enumerate(source.loras):  # a different alpha per module, as resized kohya files have
        alphas[m.lora_name] = float(i % 3 + 1)
        tensors[f"{m.lora_name}.alpha"] = torch.tensor(alphas[m.lora_name])
    path = str(tmp_path / "alphas.safetensors")
    save_file(tensors, path)
    network, _ = create_network_from_weights(1.0, path, None, sd1_models["text_encoder"], sd1_models["unet"])
    assert in_step(network)
    assert {m.lora_name: m.scale for m in network.loras} == {n: a / 4 for n, a in alphas.items()}


def test_a_bf16_network_keeps_the_exact_scale_as_networks_lora_does(sd1_models):
    network = lora_network(sd1_models, rank=3, alpha=0.7)
    network.to(torch.bfloat16)  # --full_bf16
    assert float(network.loras[0].alpha) != 0.7  # the buffer rounds ...
    assert network.loras[0].scale == 0.7 / 3  # ... the scale does not


# --- sd-scripts' --scale_weight_norms (apply_max_norm_regularization) --------------------------------------
def test_scale_weight_norms_caps_each_update_at_the_limit_by_scaling_both_factors_alike():
    """networks.lora's rule, computed here from each module's own update alpha/r * up @ down: a module whose
    update norm exceeds the limit has both factors scaled by sqrt(limit / norm) (its norm becomes the limit),
    every other module is left bit-identical (a fresh one, lora_up zero, included); the counts and norms
    returned are those of the capped updates. Two shape groups and a 3x3 conv, alpha/r != 1."""
    from aclora_ext.lora.norms import apply_max_norm

    limit = 1.0
    layers = [nn.Linear(12, 10), nn.Linear(12, 10), nn.Linear(12, 10), nn.Linear(6, 5), nn.Conv2d(4, 6, 3),
              nn.Linear(12, 10)]
    modules = [ACLoRAModule(f"lora_{i}", layer, rank=3 if i == 3 else 4, alpha=2.0) for i, layer in enumerate(layers)]
    targets = [0.05, 2.0, 0.8, 5.0, 3.0, 0.0]  # below half the limit, above, between half and the limit, ...

    def update_norm(m):
        up, down = (w.detach().reshape(n, -1).double() for w, n in ((m.lora_up.weight, m.out_dim), (m.lora_down.weight, m.rank)))
        return float((up @ down).norm()) * 2.0 / m.rank

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m, target in zip(modules, targets):
            if target == 0.0:
                continue  # a fresh module: lora_up stays zero
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=generator))
            m.lora_up.weight.mul_(target / update_norm(m))
    norms = [update_norm(m) for m in modules]
    before = [(m.lora_down.weight.clone(), m.lora_up.weight.clone()) for m in modules]

    keys_scaled, mean_norm, max_norm = apply_max_norm(modules, limit)

    capped = [min(n, limit) for n in norms]
    assert keys_scaled == 3
    assert mean_norm == pytest.approx(sum(capped) / len(capped), rel=1e-5)
    assert max_norm == pytest.approx(limit, rel=1e-5)
    for m, n, (down, up) in zip(modules, norms, before):
        if n > limit:
            root = math.sqrt(limit / n)
            assert torch.allclose(m.lora_down.weight, down * root, rtol=1e-5, atol=0)
            assert torch.allclose(m.lora_up.weight, up * root, rtol=1e-5, atol=0)
            assert update_norm(m) == pytest.approx(limit, rel=1e-5)
        else:
            assert torch.equal(m.lora_down.weight, down) and torch.equal(m.lora_up.weight, up), m.lora_name


@pytest.mark.parametrize("alpha", [None, 0])
def test_set_alpha_none_or_zero_means_the_rank(alpha):
    module = ACLoRAModule("lora_x", nn.Linear(16, 8), rank=4, alpha=2.0)
    module.set_alpha(alpha)
    assert float(module.alpha) == 4.0 and module.scale == 1.0


# --- routing the layer's forward through the module ----------------------------------------------------------
def test_remove_gives_the_layer_its_own_forward_back_and_apply_to_routes_it_again():
    """apply_to adds the LoRA to the layer's output; remove gives back exactly the layer's own output (twice is
    harmless); apply_to after remove routes it through the LoRA again."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    module = ACLoRAModule("lora_x", layer, rank=4, alpha=2.0)
    with torch.no_grad():
        module.lora_up.weight.normal_()
    x = torch.randn(3, 16)
    with torch.no_grad():
        own = nn.functional.linear(x, layer.weight, layer.bias)  # what Linear.forward computes
        lora = own + 0.5 * (x @ module.lora_down.weight.T) @ module.lora_up.weight.T
        module.apply_to()
        assert torch.allclose(layer(x), lora, atol=1e-6)
        module.remove()
        module.remove()
        assert torch.equal(layer(x), own)
        module.apply_to()
        assert torch.allclose(layer(x), lora, atol=1e-6)
