"""E1: is a model cut to rank k and trained on at rank k as good as one trained at k?"""
import sys, json, statistics
sys.path.insert(0, __import__("os").path.dirname(__file__))
import lab
import torch

task_name = sys.argv[1] if len(sys.argv) > 1 else "mlp-mid"
k = int(sys.argv[2]) if len(sys.argv) > 2 else 8
seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1").split(",")]

def cut_at(epoch, k):
    def cb(adapters, ctx):
        if ctx["epoch"] == epoch:
            for a in adapters:
                lab.rebase(a); lab.cut(a, k)
            ctx["opt"].state.clear()
    return cb

def end_cut(k):
    def cb(adapters, ctx):
        for a in adapters:
            lab.rebase(a); lab.cut(a, k)
    return cb

def nested(p_low=True):
    # nested dropout: each step a truncation b per module, log-uniform over 1..R
    g = torch.Generator().manual_seed(99)
    def cb(adapters, ctx):
        for a in adapters:
            b = int(torch.exp(torch.rand((), generator=g) * torch.log(torch.tensor(float(a.rank))))) + 1
            b = min(b, a.rank)
            a.step_mask = (torch.arange(a.rank) < b).float()
    return cb

methods = {
    f"fixed {k}": lab.Run(rank=k),
    "fixed 64": lab.Run(rank=64),
    f"64, cut to {k} at end": lab.Run(rank=64, at_end=end_cut(k)),
}
for e in (10, 30, 50, 70):
    methods[f"64, cut to {k} at epoch {e}, masked"] = lab.Run(rank=64, on_restart=cut_at(e, k))
methods[f"64 nested dropout, cut to {k} at end"] = lab.Run(rank=64, on_step=nested(), at_end=end_cut(k))
methods["64 nested dropout, whole"] = lab.Run(rank=64, on_step=nested())
res = {}
for label, run in methods.items():
    errs = []
    for s in seeds:
        r = lab.train(lab.make(task_name, s), s, run)
        errs.append(r["heldout"])
    res[label] = errs
    print(f"{task_name} {label:<45} {statistics.fmean(errs):.5f} {[round(e,5) for e in errs]}", flush=True)
