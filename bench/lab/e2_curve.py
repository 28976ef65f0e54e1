"""E2: at epochs 10..90 of a rank-64 run (all 15 trained? no: 12 trained, 3 held out), the held-out loss of
uniform cuts k and the final held-out error of each task's fixed ranks: what would a held-out cut choose early?"""
import sys, statistics
sys.path.insert(0, __import__("os").path.dirname(__file__))
import lab, torch

task_name = sys.argv[1]; seeds = [int(s) for s in sys.argv[2].split(",")]
ks = [1, 2, 4, 8, 16, 32, 64]
def probe(adapters, ctx):
    saved = [(a.A.detach().clone(), a.B.detach().clone(), a.mask.clone()) for a in adapters]
    row = []
    for k in ks:
        for a in adapters:
            lab.rebase(a); lab.cut(a, k)
        row.append(float(ctx["heldout_items"]().mean()))
        with torch.no_grad():
            for a, (A, B, m) in zip(adapters, saved):
                a.A.copy_(A); a.B.copy_(B); a.mask.copy_(m)
    best = ks[min(range(len(ks)), key=row.__getitem__)]
    ctx["log"].append((ctx["epoch"], best, [round(v / row[-1], 3) for v in row]))
for s in seeds:
    r = lab.train(lab.make(task_name, s), s, lab.Run(rank=64, held_out=True, on_restart=probe, at_end=lambda a, c: (c.__setitem__("epoch", 100), probe(a, c))))
    for e, best, row in r["log"]:
        print(task_name, s, "epoch", e, "best k", best, "held-out / keep-all:", row, flush=True)
