"""Small helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn, Optional

import pytest
import torch

from aclora_ext import create_network


def in_ci() -> bool:
    """``CI=true`` (as CI sets it, and .ci/run too): every test must run, none may skip for want of something."""
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test (or the module, at module level) with ``reason``; under ``CI=true`` fail instead.

    For every skip that could hide a regression: a missing dependency, sd-scripts not where it should be, a
    module that does not import. CI installs all of them, so there the cause is a broken set-up or a regression.
    """
    if in_ci():
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    try:
        pytest.skip(reason, allow_module_level=True)
    except pytest.skip.Exception as skipped:
        skipped._use_item_location = True  # -rs names the test, not this line (as a skip mark does)
        raise


def import_or_fail(name: str, why: str = "") -> ModuleType:
    """``pytest.importorskip`` that fails under ``CI=true`` (see ``skip_or_fail``)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        skip_or_fail(f"{name} is not importable ({error}){': ' + why if why else ''}")


def text_encoder_of(models):
    """``text_encoder`` as sd-scripts passes it: one model (SD1.x) or a list of two (SDXL)."""
    return models["text_encoders"] if "text_encoders" in models else models["text_encoder"]


def lora_network(models, rank=4, alpha=2.0, apply_text_encoder=True, apply_unet=True, multiplier=1.0, **kwargs):
    """create_network + apply_to on an SD1.x-like or SDXL-like model set, as sd-scripts calls them."""
    text_encoder = text_encoder_of(models)
    network = create_network(multiplier, rank, alpha, None, text_encoder, models["unet"], **kwargs)
    network.apply_to(text_encoder, models["unet"], apply_text_encoder, apply_unet)
    return network


def pretend_trained(network, seed=0, scale=0.05):
    """Seeded non-zero lora_up weights: the network now changes the model as a trained one does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=generator) * scale)
    return network


def named_groups(network, groups, descriptions) -> list[tuple[str, Optional[float], frozenset]]:
    """An optimizer's param groups as (description, lr, names of its parameters), for either network."""
    loras = network.text_encoder_loras + network.unet_loras  # (sd-scripts registers its modules in apply_to)
    names = {id(p): f"{m.lora_name}.{n}" for m in loras for n, p in m.named_parameters()}
    return [(d.strip(), g.get("lr"), frozenset(names[id(p)] for p in g["params"])) for g, d in zip(groups, descriptions)]


def assert_the_replay_is_the_validation_pass(network, validation_pass, calls: int, multiplier: float = 0.5):
    """``validation_pass()`` runs a trainer's validation pass (between ``network.eval()`` and ``network.train()``)
    and returns its per-item losses: the network's recorder replays that pass's ``calls`` calls to the same losses,
    and follows the network when its multiplier changes (which changes the losses by far more than the tolerance)."""
    recorded = validation_pass()
    recorder = network.rank_search.loss_fn
    assert recorder.ready and len(recorder.calls) == calls and recorder.failed is None
    assert torch.allclose(recorder(), recorded, rtol=1e-6, atol=1e-8)
    network.set_multiplier(multiplier)
    assert torch.allclose(recorder(), validation_pass(), rtol=1e-6, atol=1e-8)
    changed = (recorder() - recorded).abs().max() / recorded.abs().max()
    assert changed > 1e-5, f"the multiplier changed the losses by {changed:.2e} of their size: nothing is checked"
