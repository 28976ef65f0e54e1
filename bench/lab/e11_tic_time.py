"""E11: the direction-TIC oracle's recommended cut on a rank-64 run (15 samples) at epochs 10..100 (not applied)."""
import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import lab, torch
from grow import Grow
from loo import direction_judge
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
for t in tasks:
    for s in seeds:
        rec = {}
        def cb(adapters, ctx):
            if "r" not in rec:
                rec["r"] = lab.Recorder(adapters); return
            saved = [(a.A.detach().clone(), a.B.detach().clone(), a.mask.clone()) for a in adapters]
            imps = {a.name: lab.analyse(a, rec["r"]) for a in adapters}
            g = Grow(); g.min_rank = 1
            level, info = direction_judge()(adapters, ctx, imps, g)
            keeps = lab.level_keeps(imps, level, 1)
            print(t, s, "epoch", ctx["epoch"], "TIC keeps", [int(k.sum()) for k in keeps.values()], flush=True)
            with torch.no_grad():
                for a, (A, B, m) in zip(adapters, saved):
                    a.A.copy_(A); a.B.copy_(B); a.mask.copy_(m)
            rec["r"].reset()
        def first(adapters, ctx):
            if "r" not in rec:
                rec["r"] = lab.Recorder(adapters)
        lab.train(lab.make(t, s), s, lab.Run(rank=64, on_step=first, on_restart=cb, every=20, at_end=lambda a, c: (c.__setitem__("epoch", 100), cb(a, c))))
