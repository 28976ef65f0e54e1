"""E13 (oracle): how many training images does each component of a rank-64 run serve, by its activations?
Per SVD component j of each layer, per training image i: e_ij = mean over the image's inputs of (t_j . h)^2
(the component's output energy); participation ratio PR_j = (sum_i e_ij)^2 / (n sum_i e_ij^2), n*PR = images served.
Printed: the served count of the components, in importance order (1-4, 5-8, 9-16, 17-32, 33-64), mean per band."""
import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import lab, torch
from aclora_ext import functional as F
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
for t in tasks:
    for s in seeds:
        task = lab.make(t, s)
        out = {}
        def at_end(adapters, ctx):
            n = 15
            acts = {a.name: [] for a in adapters}
            def hook(a, x, h):
                acts[a.name].append(h.detach())
            for a in adapters:
                a.hooks.append(hook)
            with torch.no_grad():
                for i in range(n):
                    task.selection_loss([i])
            for a in adapters:
                a.hooks.remove(hook)
                down = (a.A * a.mask[:, None])[None]; up = (a.B * a.mask[None, :])[None]
                sv, to_up, to_down = F.product_core(down, up)
                e = torch.stack([(h.reshape(-1, h.shape[-1]) @ to_down[0]).pow(2).mean(0) for h in acts[a.name][:n]])  # n, R
                pr = e.sum(0).pow(2) / (n * e.pow(2).sum(0).clamp(min=1e-30))
                served = (n * pr)
                bands = [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64)]
                out[a.name] = [round(float(served[lo:hi].mean()), 1) for lo, hi in bands]
        lab.train(task, s, lab.Run(rank=64, at_end=at_end))
        print(t, s, "images served by components 1-4 / 5-8 / 9-16 / 17-32 / 33-64:", list(out.values()), flush=True)
