"""The network's own held-out split (``--network_args holdout=``) in sd-scripts' real FLUX.1 trainer.

SD1.x's train_network.py runs it in tests/test_sd_scripts_e2e.py (``sd1_holdout``, two 64-pixel images). Here
``flux_train_network.py`` runs it under what the identities of training items must
survive: ``--cache_latents --flip_aug``, two buckets, batches of 2 (sd_scripts_fixtures.IDENTITY_BUCKETS: four
images, each twice per epoch, on the mirror-symmetric toy VAE / AE the identity tests use), no validation split.
Each run is 3 epochs of 4 steps with ``holdout=0.5 holdout_until=0.5``: the default schedule RESTARTs after epochs
1 (a third of the run: the held-out loss decides) and 2 (two thirds: the choice is kept), and epoch 3 trains every
image. What is pinned, from the log and the file: how many images were held, that the first RESTART chose on the
replayed training calls of the held items (the family's rebuilt prediction matched the trainer's: no "cannot
replay"), that the second kept that choice, and that the file's ranks are the network's.

The model is that of
tests/test_flux_sd3_e2e.py (FLUX.1-dev with one double and one single block), built by the same builders into this
module's temporary folder, or taken from ``ACLORA_E2E_CACHE`` (the same cache folders as those modules use).
Without sd-scripts or its packages the tests skip with what they need; with ``CI=true`` that is a failure.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import flux_sd3_fixtures as fx
import sd_scripts_fixtures as e2e

pytestmark = pytest.mark.sd_scripts  # CI runs them in sd-scripts' pinned stack only

MAX_RANK, ALPHA = 4, 2
IMAGES = 4  # sd_scripts_fixtures.IDENTITY_IMAGES
# 3 epochs: RESTARTs after epochs 1 and 2 (the default schedule; none after the last), the split lifted at half
HOLDOUT_ARGS = ("--max_train_epochs", "3", "--network_args", "holdout=0.5", "holdout_until=0.5")
# the share 0.5 holds round(0.5 x 4) = 2 images when the first epoch's rule lets enough qualify (an image
# qualifies when every view of it drawn in epoch 1 was held); with these seeds, on these fixtures' latents, it does
FLUX_SEED = "0"
HOLDOUT_LINE = re.compile(r"AC-LoRA: holdout: (\d+) of (\d+) images held out until (\d+)% of the run")
SCHEDULE = [(1, 1, 4), (2, 2, 8)]  # (RESTART, epoch, step)
FLUX_MODULES = 13  # tests/test_flux_sd3_e2e.py


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return e2e.trainer_root(tmp_path_factory, "holdout FLUX.1", "flux_train_network.py")


@pytest.fixture(scope="session")
def env(root) -> dict:
    return fx.environment(root, progress_bars=False)


def _cache(root: Path, folder: str) -> Path:
    """ACLORA_E2E_CACHE's folder of the module that builds these models too, else this module's own."""
    return Path(os.environ["ACLORA_E2E_CACHE"]) / folder if os.environ.get("ACLORA_E2E_CACHE") else root / folder


@pytest.fixture(scope="session")
def flux_fixtures(root, env) -> fx.FluxSd3Fixtures:
    return fx.FluxSd3Fixtures(_cache(root, "flux-sd3"), env, root / "logs")


@pytest.fixture(scope="module", autouse=True)
def _free_disk(root, flux_fixtures):
    """The models go when the module is done (FLUX.1 2.5 GB), whether its tests passed or not."""
    yield
    e2e.free_disk(root, [flux_fixtures.cache])


@pytest.fixture(scope="session")
def flux_holdout(root, flux_fixtures) -> e2e.TrainerRun:
    name, out_dir = "flux-holdout", root / "out" / "flux-holdout"
    command = flux_fixtures.flux_command(out_dir, name, "--ae", str(flux_fixtures.identity_ae()), "--train_data_dir",
                                         str(flux_fixtures.identity_data()), *e2e.IDENTITY_BUCKETS, *HOLDOUT_ARGS,
                                         f"seed={FLUX_SEED}", network_module="networks.aclora")
    return e2e.TrainerRun(e2e.run(command, flux_fixtures.env, root / "logs" / f"{name}.log").check(), out_dir, name)


def assert_holdout(run: e2e.TrainerRun, modules: int) -> None:
    output = run.result.output
    # the split: two of the four images (every view of each) held until half of the run
    assert HOLDOUT_LINE.findall(output) == [("2", str(IMAGES), "50")], run.result.tail()
    # the identities survived the flips and buckets: every epoch names the same four images, each drawn twice (the
    # last epoch is closed by no on_epoch_start)
    e2e.assert_identities(output, [(1, 8, 4, 4), (2, 8, 4, 4)], images=IMAGES)
    # the held items' training calls were replayed through the family's prediction, as the trainer computed it
    assert "cannot replay" not in output and "holdout: the trainer's loss has shape" not in output
    assert "nothing is held out" not in output and "could be held out" not in output
    lora = run.assert_restarts_match_the_file(SCHEDULE, modules, MAX_RANK)
    chosen, kept = lora.history()
    # RESTART 1 (a third of the run) chose on the held items' loss ...
    assert chosen["source"] == "validation" and chosen["validation_loss"] > 0, chosen
    assert output.count("chosen on held-out loss") == 1
    # ... RESTART 2 (two thirds, after holdout_until) and the file keep that choice
    assert kept["source"] == "frozen", kept
    assert lora.history_ranks(kept) == lora.history_ranks(chosen)
    decision = json.loads(lora.metadata["aclora_file_decision"])
    assert decision["source"] != "validation", decision
    assert lora.ranks() == lora.saved_ranks() == lora.history_ranks(kept)


def test_flux_holdout_chooses_on_the_held_images_under_flips_and_buckets(flux_holdout):
    assert_holdout(flux_holdout, FLUX_MODULES)

