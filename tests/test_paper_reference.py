"""The paper mode is the paper's algorithm exactly as it was before the product mode's rank search:
a fixed-seed run gives the factors and RESTART history it gave at commit 74c87fa
(``tests/paper_reference.py`` says how the reference was made). On the machine that made it
the factors are bit-identical; the comparison allows float rounding (1e-5) so that another
CPU's LAPACK and vector units do not fail it, while any change of the algorithm moves ranks,
p or factors far beyond that."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors import safe_open

import paper_reference

REFERENCE = pathlib.Path(__file__).parent / "data" / "paper_mode_reference.safetensors"


def test_a_fixed_seed_paper_run_gives_the_factors_and_history_of_the_release_before_the_rank_search():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference was made on one thread: the same reductions in the same order
    try:
        factors, history = paper_reference.run()
    finally:
        torch.set_num_threads(threads)
    with safe_open(str(REFERENCE), "pt") as f:
        expected_history = json.loads(f.metadata()["history"])
        expected = {k: f.get_tensor(k) for k in f.keys()}
    assert [h["ranks"] for h in history] == [h["ranks"] for h in expected_history]
    assert [h["p"] for h in history] == pytest.approx([h["p"] for h in expected_history], rel=1e-6)
    assert [h["ranks"] for h in history] != [[16, 16]] * len(history)  # the run does cut: the comparison bites
    assert expected.keys() == factors.keys()
    for name, tensor in expected.items():
        assert torch.allclose(factors[name], tensor, rtol=1e-5, atol=1e-6), name
