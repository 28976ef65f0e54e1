"""E4: is the 3-sample held-out loss of a model trained at rank k (on 12) a good proxy for its true error?"""
import sys, os, statistics
sys.path.insert(0, os.path.dirname(__file__))
import lab, torch
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
for t in tasks:
    for s in seeds:
        row = []
        for r in (1, 2, 4, 8, 16, 32, 64):
            holder = {}
            def at_end(adapters, ctx, holder=holder):
                holder["items"] = ctx["heldout_items"]()
            res = lab.train(lab.make(t, s), s, lab.Run(rank=r, held_out=True, at_end=at_end))
            row.append((r, res["heldout"], float(holder["items"].mean())))
        tb = min(row, key=lambda x: x[1])[0]; hb = min(row, key=lambda x: x[2])[0]
        print(t, s, "true best", tb, "held-out best", hb, " ".join(f"r{r}:{e:.4f}/{h:.4f}" for r, e, h in row), flush=True)
