"""Shared fixtures: tiny random-weight models and synthetic data from aclora_ext.harness.tiny.

Every model fixture is built fresh per test (a few milliseconds) because a
network patches the models it is applied to.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

try:
    import aclora_ext.harness.tiny  # noqa: F401  (the package is normally pip-installed editable)
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import in_ci

from aclora_ext.harness import tiny

# The tiny models are far too small to gain from intra-op threads, and on a
# shared 2-core machine several threaded processes spin against each other
# (measured: a 1 s replay took 30-140 s with 2 threads under load).
# OMP_NUM_THREADS, when set, still wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def sd_scripts_loss(model_pred, target, loss_type, reduction, huber_c=None):
    """sd-scripts' conditional_loss for l2 and huber (what the held-out tests need)."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(model_pred, target, reduction=reduction)
    huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
    return 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)


@pytest.fixture
def train_util(monkeypatch):
    """A stand-in for sd-scripts' library.train_util, as train_network.py has it imported (its
    conditional_loss); a test file may define its own."""
    import types

    module = types.ModuleType("library.train_util")
    module.conditional_loss = sd_scripts_loss
    monkeypatch.setitem(sys.modules, "library.train_util", module)
    return module


@pytest.fixture
def sd1_models():
    """A tiny SD1.x-like model set: dict(unet, text_encoder, vae=None)."""
    return tiny.sd1_models(seed=0)


@pytest.fixture
def sdxl_models():
    """A tiny SDXL-like model set: dict(unet, text_encoders=[te1, te2], vae=None)."""
    return tiny.sdxl_models(seed=0)


@pytest.fixture
def sd1_pretrained_models():
    """As ``sd1_models`` with a U-Net pretrained as a denoiser of generic latents
    (once per session, a few seconds), so losses start near 0.3 rather than above 1."""
    return tiny.sd1_models(seed=0, pretrained=True)


@pytest.fixture
def sdxl_pretrained_models():
    """As ``sdxl_models`` with a pretrained U-Net (see ``sd1_pretrained_models``)."""
    return tiny.sdxl_models(seed=0, pretrained=True)


@pytest.fixture
def style_data():
    """15 synthetic style latents (4x8x8) with trigger-token captions."""
    return tiny.style_dataset(n=15, seed=0)


@pytest.fixture
def sd_network_module():
    """The network module as sd-scripts imports it (``--network_module=networks.aclora``). An import error
    is an error of every test that uses it: the contract tests must fail on an import regression, not skip."""
    return importlib.import_module("networks.aclora")


def plant_ranks(network, seed: int = 0) -> dict:
    """Give module i of ``network`` an update of known rank 1 + i mod R (R its maximum rank).

    lora_up's first r columns and lora_down's first r rows are orthonormal, so
    the update up @ down has r equal singular values (a product-mode RESTART at
    p = 0.9 keeps exactly r); the other slots hold noise a thousand times smaller.
    Returns {module name: planted rank}.
    """
    generator = torch.Generator().manual_seed(seed)
    planted = {}
    with torch.no_grad():
        for i, m in enumerate(network.loras):
            r = 1 + i % m.rank
            up = torch.randn(m.out_dim, m.rank, generator=generator) * 1e-3
            down = torch.randn(m.rank, m.lora_down.weight[0].numel(), generator=generator) * 1e-3
            up[:, :r] = torch.linalg.qr(torch.randn(m.out_dim, r, generator=generator))[0]
            down[:r] = torch.linalg.qr(torch.randn(down.shape[1], r, generator=generator))[0].T
            m.lora_up.weight.copy_(up.reshape(m.lora_up.weight.shape))
            m.lora_down.weight.copy_(down.reshape(m.lora_down.weight.shape))
            planted[m.lora_name] = r
    return planted


def keep_training(network, scale: float = 0.02, seed: int = 1) -> None:
    """Stand-in for optimizer steps after a RESTART: perturb every factor by ``scale`` of its RMS."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            for weight in (m.lora_down.weight, m.lora_up.weight):
                rms = weight.pow(2).mean().sqrt()
                weight.add_(torch.randn(weight.shape, generator=generator) * rms * scale)


@pytest.fixture
def planted_network():
    """Factory: an applied product-mode AC-LoRA network on a tiny model set, with planted
    per-module ranks, one RESTART per entry of ``ps``, and "training" after each.

    ``build(models, max_rank=8, alpha=4.0, ps=(0.9,), **network_args)``: ``models``
    is a dict from the ``sd1_models`` / ``sdxl_models`` fixtures; ``network_args``
    are ``--network_args`` (e.g. ``conv_dim="4"``). Returns (network, planted ranks).
    """
    from aclora_ext import create_network

    def build(models, max_rank: int = 8, alpha: float = 4.0, ps=(0.9,), **network_args):
        text_encoder = models.get("text_encoders") or models.get("text_encoder")
        network_args.setdefault("restart_mode", "product")
        network = create_network(1.0, max_rank, alpha, None, text_encoder, models["unet"], **network_args)
        network.apply_to(text_encoder, models["unet"], True, True)
        planted = plant_ranks(network)
        for i, p in enumerate(ps):
            network.restart(p=p)
            keep_training(network, seed=i + 1)
        return network, planted

    return build


# --- under CI=true no test skips, except these ---------------------------------------------------------
# CI's machines have no GPU: the CUDA-only tests are the only ones allowed to skip there. Each entry is a node
# id (or a prefix of one ending in "::") and the start of the reason it must give; any other skip fails the run.
CI_SKIP_ALLOW_LIST = {
    "tests/test_cuda.py::": "needs a CUDA device",
    "tests/test_resize.py::test_resizing_on_cuda_gives_the_cpu_result": "needs a CUDA device",
}
_ci_skips: list[str] = []


def skip_allowed(nodeid: str, reason: str) -> bool:
    """Is a skip of ``nodeid`` with ``reason`` on ``CI_SKIP_ALLOW_LIST``?"""
    for where, why in CI_SKIP_ALLOW_LIST.items():
        here = nodeid.startswith(where) if where.endswith("::") else nodeid.split("[")[0] == where
        if here and reason.startswith(why):
            return True
    return False


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _note_skip(report) -> None:
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not skip_allowed(report.nodeid, reason):
            _ci_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):  # a module-level skip is reported at collection
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _ci_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _ci_skips:
        terminalreporter.section("CI=true: skips that are not on CI_SKIP_ALLOW_LIST (tests/conftest.py)", red=True)
        for line in _ci_skips:
            terminalreporter.line(line, red=True)
