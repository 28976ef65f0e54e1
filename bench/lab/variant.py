"""A task the suite does not contain, to check the rank search is not tuned to the suite: another MLP (widths
64 -> 200 -> 80 -> 144), 20 training samples of which 4 are held out, other feature strengths and vector counts,
other seeds (100+). Three regimes built the suite's way; runs quality_suite's own rows on them.

    PYTHONPATH=. python bench/lab/variant.py --full --no-adalora --only "defaults,issue-9" --out /tmp/variant.json
"""
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench import quality_suite as qs  # noqa: E402

qs.N_TRAIN, qs.N_VAL = 20, 4
BASE = qs.MLPConfig(dims=(64, 200, 80, 144), input_dim=40, content_dim=12)
qs.MLP_REGIMES.clear()
qs.MLP_REGIMES.update({
    "var-overfit": replace(BASE, beta=1.2, components=(12, 12, 12), sample_scale=1.2, sample_offset=0.05, vectors=24),
    "var-mid": replace(BASE, beta=0.8, sample_scale=0.5, sample_offset=0.01, vectors=48),
    "var-capacity": replace(BASE, beta=0.4, sample_scale=0.2, sample_offset=0.003, vectors=160),
})
_build = qs.build_task
qs.build_task = lambda name, seed, loss, pretrain, smoke: _build(name, seed + 100, loss, pretrain, smoke)

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--tasks" not in argv:
        argv += ["--tasks", ",".join(qs.MLP_REGIMES)]
    if "--losses" not in argv:
        argv += ["--losses", "mse"]
    qs.main(argv)
