"""E12: coherence of probe slots' gradients while they learn (identity-free epoch ANOVA vs the oracle with images).

Train at rank k (mask) to epoch T0, open p = k probe slots, record every draw's gradient of the probe slots'
parameters (per batch element: each element's loss backpropagated alone) for `span` epochs. Statistics:
  M = mean draw gradient, Q = mean |g|^2, noise variance from successive epoch sums, image variance = the rest;
  phi = |M|^2 / (|M|^2 + image var) (the served fraction), Z = n |M|^2 / image var (mean vs image noise).
  oracle: per-image sums G_i; alpha = |sum G_i|^2 / (n sum |G_i|^2)."""
import sys, os, math
sys.path.insert(0, os.path.dirname(__file__))
import lab, torch

def run(t, s, k, T0=50, span=10):
    task = lab.make(t, s)
    st = {"draws": [], "opened": False}
    def on_restart(adapters, ctx):
        if ctx["epoch"] == T0:
            for a in adapters:
                lab.open_slots(a, k)
            st["opened"] = True
            st["probe"] = {a.name: (torch.arange(a.rank) >= k) & (torch.arange(a.rank) < 2 * k) for a in adapters}
    def setup(adapters, ctx):
        if ctx["step"] == 0:
            for a in adapters:
                with torch.no_grad():
                    a.mask.copy_((torch.arange(a.rank) < k).float())
        if st["opened"] and T0 <= ctx["epoch"] < T0 + span:
            # per-element gradients of the probe slots (no update from this pass)
            idx = ctx["idx"]
            g = torch.Generator().manual_seed(1000 + ctx["step"])
            for b in idx.tolist():
                for a in adapters:
                    a.A.grad = None; a.B.grad = None
                loss = task.train_loss(torch.tensor([b]), g)
                loss.backward()
                vec = torch.cat([torch.cat([a.A.grad[st["probe"][a.name]].flatten(), a.B.grad[:, st["probe"][a.name]].flatten()]) for a in adapters])
                st["draws"].append((ctx["epoch"], b, vec.double()))
            for a in adapters:
                a.A.grad = None; a.B.grad = None
    lab.train(task, s, lab.Run(rank=64, on_step=setup, on_restart=on_restart))
    draws = st["draws"]
    n = 15
    X = torch.stack([d[2] for d in draws])
    M = X.mean(0); Q = X.pow(2).sum(1).mean()
    epochs = sorted({d[0] for d in draws})
    S = torch.stack([torch.stack([d[2] for d in draws if d[0] == e]).sum(0) for e in epochs])
    noise = float((S[1:] - S[:-1]).pow(2).sum(1).mean()) / (2 * n)
    within = float(sum(((torch.stack([d[2] for d in draws if d[0] == e]) - S[i] / n).pow(2).sum(1)).sum() for i, e in enumerate(epochs))) / (len(draws) - len(epochs))
    img = max(within - noise, 1e-30)
    m2 = float(M.pow(2).sum())
    phi = m2 / (m2 + img); Z = n * m2 / img
    G = torch.stack([torch.stack([d[2] for d in draws if d[1] == i]).sum(0) for i in range(n)])
    alpha = float(G.sum(0).pow(2).sum()) / (n * float(G.pow(2).sum(1).sum()))
    return phi, Z, alpha, noise / within

tasks = sys.argv[1].split(","); seeds = [int(x) for x in sys.argv[2].split(",")]
ks = [int(x) for x in sys.argv[3].split(",")]
for t in tasks:
    for s in seeds:
        for k in ks:
            phi, Z, alpha, nf = run(t, s, k)
            print(f"{t} seed {s} k {k} -> {2*k}: phi {phi:.3f}  n*phi {15*phi:.2f}  Z {Z:.2f}  oracle alpha {alpha:.3f} (n*alpha {15*alpha:.2f})  noise share {nf:.2f}", flush=True)
