"""E10 (oracle: images known): how many directions of each layer's mean loss gradient (w.r.t. its weight) stand
above the image-level noise? Per-image gradients G_i (fixed-noise loss), mean G; the noise floor by a sign-flip
null (1/n) sum eps_i (G_i - G) (parallel analysis, 50 draws, the 95th percentile of the top singular value) and by
Gavish-Donoho's hard threshold with the image-level noise variance (entries of (G_i - G) / sqrt(n)).
At step 0 (nothing learned) and after training at a fixed rank."""
import sys, os, math
sys.path.insert(0, os.path.dirname(__file__))
import lab, torch
from torch import nn

def per_image_grads(task, adapters, images):
    out = []
    for i in images:
        ds = []
        for a in adapters:
            a.D = torch.zeros(a.layer.out_features, a.layer.in_features, requires_grad=True)
            ds.append(a.D)
        with torch.enable_grad():
            li = task.selection_loss([i]).mean()
            gs = torch.autograd.grad(li, ds)
        out.append([g.double() for g in gs])
        for a in adapters:
            a.D = None
    return out

def gd_lambda(beta):
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta ** 2 + 14 * beta + 1)))

def counts(task, adapters, images, g=torch.Generator().manual_seed(0)):
    grads = per_image_grads(task, adapters, images)
    n = len(images)
    res = []
    for li, a in enumerate(adapters):
        Gi = torch.stack([gr[li] for gr in grads])  # n, out, in
        G = Gi.mean(0)
        dev = Gi - G
        s = torch.linalg.svdvals(G)
        tops = []
        for _ in range(50):
            eps = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).double()
            null = (eps[:, None, None] * dev).sum(0) / n
            tops.append(float(torch.linalg.svdvals(null)[0]))
        edge = sorted(tops)[int(0.95 * len(tops))]
        pa = int((s > edge).sum())
        out_, in_ = G.shape
        sigma = math.sqrt(float(dev.pow(2).sum()) / (n - 1) / (out_ * in_) / n)  # per-entry noise sd of the mean
        m, N = min(out_, in_), max(out_, in_)
        gd = int((s > gd_lambda(m / N) * math.sqrt(N) * sigma).sum())
        res.append((pa, gd))
    return res

tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
ranks = [int(r) for r in (sys.argv[3] if len(sys.argv) > 3 else "0").split(",")]
for t in tasks:
    for s in seeds:
        for r in ranks:
            task = lab.make(t, s)
            holder = {}
            if r == 0:
                adapters = lab.attach(task, 1)
                for a in adapters:
                    a.D = None
                    orig = a.forward
                c = counts(task, adapters, list(range(15)))
                for a in adapters: a.remove()
            else:
                def at_end(adapters, ctx):
                    holder["c"] = counts(task, adapters, list(range(15)))
                lab.train(task, s, lab.Run(rank=r, at_end=at_end))
                c = holder["c"]
            print(t, s, f"after rank {r}" if r else "step 0", "parallel-analysis / GD counts per layer:", c, flush=True)
