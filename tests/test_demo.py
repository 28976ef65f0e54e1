"""``aclora demo`` shows the rank search: by default it runs with the network's ``holdout`` option, so its
RESTARTs choose ranks on the held-out loss until ``holdout_until`` (0.7), later ones keep that choice while
the held images train again, and the file's ranks are the chosen ones; ``--no-holdout`` is the network's
default without a validation split (every RESTART deferred, training at the maximum rank).

The holdout run is the demo as a newcomer runs it (20 epochs of 5 steps, RESTART every 2 epochs), ~15 s on one core.
"""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
from safetensors import safe_open

from tests.helpers import import_or_fail

for _name in ("diffusers", "transformers", "accelerate"):
    import_or_fail(_name, "the demo builds a tiny diffusers U-Net and a transformers CLIP text encoder")

from aclora_ext.harness.train_util import MODULE  # noqa: E402
from aclora_ext.tools import demo  # noqa: E402

STEPS = 100  # 15 images, batches of 3, 20 epochs
RANK = 32
RESTART = re.compile(r"AC-LoRA RESTART #(\d+) at epoch \d+, step (\d+): (.*)")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run(tmp_path_factory, **options):
    # the handler sits on the project's logger itself, at INFO, with logging enabled: whatever earlier tests of a
    # full run left on the root logger, on this one or in logging.disable, the demo's lines reach it
    handler, ours = _Lines(), logging.getLogger("aclora_ext")
    level, disabled, module_before = ours.level, logging.root.manager.disable, sys.modules.get(MODULE)
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    logging.disable(logging.NOTSET)
    try:
        path = demo.run(str(tmp_path_factory.mktemp("demo")), **options)
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)
        logging.disable(disabled)
    assert sys.modules.get(MODULE) is module_before  # the stand-in library.train_util is gone after the run
    with safe_open(path, "pt") as file:
        meta = file.metadata()
    restarts = [RESTART.match(line) for line in handler.lines]
    return {
        "restarts": [(int(m.group(1)), int(m.group(2)), m.group(3)) for m in restarts if m],
        "log": handler.lines,
        "ranks": json.loads(meta["aclora_ranks"]),
        "modules": json.loads(meta["aclora_modules"]),  # the order of each history entry's ranks
        "history": json.loads(meta["aclora_history"]),
        "meta": meta,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo with its default holdout, and with --no-holdout (shorter: nothing in it depends on the length)."""
    return {
        "holdout": _run(tmp_path_factory, holdout=demo.HOLDOUT),
        "none": _run(tmp_path_factory, holdout=None, epochs=6),  # RESTART every epoch: 5
    }


def test_the_demo_chooses_ranks_on_held_out_loss_until_holdout_until_then_gives_the_images_back(runs):
    run = runs["holdout"]
    assert (
        "AC-LoRA: holdout: 3 of 15 images held out until 70% of the run; the rank search judges on them" in run["log"]
    )
    restarts = run["restarts"]
    assert [index for index, _, _ in restarts] == list(range(1, 10))
    held = [r for r in restarts if r[1] < 0.7 * STEPS]
    given_back = [r for r in restarts if r[1] >= 0.7 * STEPS]
    assert len(held) == 6 and len(given_back) == 3
    assert all("chosen on held-out loss" in text for _, _, text in held), held
    assert all("held-out choice frozen" in text and "chosen on held-out loss" not in text for _, _, text in given_back)
    sources = [(entry["step"], entry["source"]) for entry in run["history"]]
    assert sources == [(step, "validation") for _, step, _ in held] + [(step, "frozen") for _, step, _ in given_back]


def test_the_demo_file_has_the_ranks_the_held_out_search_chose(runs):
    run = runs["holdout"]
    ranks = [run["ranks"][name] for name in run["modules"]]
    frozen = [entry for entry in run["history"] if entry["source"] == "frozen"]
    # after holdout_until the RESTARTs keep the held-out choice (a module may gain a component once the held
    # images train again: not pinned, it differs between CPUs); the save keeps the last RESTART's ranks
    assert len(ranks) == 60 and len(frozen) == 3 and frozen[-1]["ranks"] == ranks
    assert json.loads(run["meta"]["aclora_file_decision"])["source"] == "frozen"  # the last held-out level
    assert 1 <= min(ranks) and max(ranks) <= RANK and sum(ranks) < 0.75 * RANK * len(ranks)  # the search cut


def test_the_no_holdout_demo_is_the_networks_default_every_restart_deferred_at_the_maximum_rank(runs):
    run = runs["none"]
    assert not any("holdout" in line for line in run["log"])
    assert len(run["restarts"]) == 5
    assert all("no held-out loss" in text for _, _, text in run["restarts"])
    assert [entry["source"] for entry in run["history"]] == ["deferred"] * 5
    assert all(entry["ranks"] == [RANK] * 60 for entry in run["history"])


def test_the_demo_says_it_uses_the_holdout_option_and_that_the_default_is_unchanged(tmp_path, capsys, monkeypatch):
    """The line is printed before training starts (the run itself is stubbed out after it)."""

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    import aclora_ext.harness.replay

    monkeypatch.setattr(aclora_ext.harness.replay, "replay_training", stop)
    with pytest.raises(Stop):
        demo.run(str(tmp_path))
    out = capsys.readouterr().out
    assert "uses the network's holdout=0.2 option" in out and "plain LoRA at network_dim" in out
    with pytest.raises(Stop):
        demo.run(str(tmp_path), holdout=None)
    assert "holdout" not in capsys.readouterr().out
    assert demo.build_parser().parse_args(["--no-holdout"]).holdout is None
    assert demo.build_parser().parse_args([]).holdout == demo.HOLDOUT
