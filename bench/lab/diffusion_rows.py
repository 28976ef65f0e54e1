"""Extra 3b rows on the same scenes as bench/quality_diffusion.py --full (deterministic on one thread): the main
run's JSON gives the sweep; this prints the extra rows' FD and held-out denoising loss per seed.

    PYTHONPATH=. python bench/lab/diffusion_rows.py --full --out /tmp/quality_diffusion_extra.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from aclora_ext.network import ACLoRANetwork  # noqa: E402
from bench import quality_diffusion as qd  # noqa: E402
from bench import rule_before  # noqa: E402
from bench.quality_lowrank import Method  # noqa: E402

EXTRA = [
    Method(
        "AC-LoRA product R=32, min_importance 0 (keep every component)",
        "aclora",
        32,
        (("restart_mode", "product"), ("min_importance", 0.0)),
    ),
    Method(
        "AC-LoRA product R=32, 3 of 15 held out then folded back, item-level SE",
        "aclora",
        32,
        (("restart_mode", "product"),),
        held_out=3,
        fold_back=0.7,
    ),
    Method(
        "AC-LoRA product R=32, 3 of 15 held out then folded back, issue-9 rule",
        "aclora",
        32,
        (("restart_mode", "product"), ("cut_rule", "beat"), ("freed_slots", "relearn")),
        held_out=3,
        fold_back=0.7,
    ),
]
qd.methods = lambda sweep, max_rank, adalora, ablation=(): EXTRA
qd.summarise = lambda runs, rows, sweep: {}
qd.print_tables = lambda *a, **k: ""
_train, _set = qd.train_ours, ACLoRANetwork.set_validation
state = {"item": False}


def train_ours(scene, method, settings, workdir):
    state["item"] = "item-level" in method.label
    return _train(scene, method, settings, workdir)


def set_validation(self, loss_fn, until=None, groups=None):
    return _set(self, loss_fn, until, None if state["item"] else groups)


qd.train_ours = train_ours
qd.attach = rule_before.attach  # the issue-9 row's cut_rule/freed_slots are version 0.1's rules, bench-local now
ACLoRANetwork.set_validation = set_validation

if __name__ == "__main__":
    qd.main(sys.argv[1:])
