"""E6: held-out proxy (3 samples) of fixed-rank models (trained on 12) over epochs: when does it order the ranks?"""
import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import lab, torch
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
ranks = (1, 2, 4, 8, 16, 32, 64)
for t in tasks:
    for s in seeds:
        curves = {}
        for r in ranks:
            log = []
            def cb(adapters, ctx, log=log):
                log.append((float(ctx["heldout_items"]().mean()), ctx["task"].heldout_error()))
            run = lab.Run(rank=r, held_out=True, every=5, on_restart=cb, at_end=cb)
            lab.train(lab.make(t, s), s, run)
            curves[r] = log
        n = len(curves[1])
        for i in range(n):
            ep = (i + 1) * 5
            hb = min(ranks, key=lambda r: curves[r][i][0]); tb = min(ranks, key=lambda r: curves[r][i][1])
            print(t, s, "epoch", ep, "proxy best", hb, "true best", tb, " ".join(f"{r}:{curves[r][i][0]:.4f}" for r in ranks), flush=True)
