"""E7: grouped DyLoRA-style honest prefixes: each step picks a level d, runs prefix 1..d, updates only group d.
Reports, at the end, the true error and 3-sample held-out proxy of every prefix (12 training samples)."""
import sys, os, math
sys.path.insert(0, os.path.dirname(__file__))
import lab, torch
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
mode = sys.argv[3] if len(sys.argv) > 3 else "uniform"
BOUNDS = [1, 2, 4, 8, 16, 32, 64]
def make_cbs(probs):
    g = torch.Generator().manual_seed(11)
    state = {}
    def on_step(adapters, ctx):
        d = int(torch.multinomial(torch.tensor(probs), 1, generator=g))
        state["d"] = d
        hi = BOUNDS[d]; lo = BOUNDS[d - 1] if d else 0
        for a in adapters:
            a.step_mask = (torch.arange(a.rank) < hi).float()
        state["lo"], state["hi"] = lo, hi
    def after_step(adapters, ctx):
        for a in adapters:
            frozen = torch.arange(a.rank) < state["lo"]
            a.A.grad[frozen] = 0; a.B.grad[:, frozen] = 0
    return on_step, after_step
if mode == "uniform":
    probs = [1 / 7] * 7
elif mode == "size":  # each slot equally often: P(d) proportional to group size
    sizes = [1, 1, 2, 4, 8, 16, 32]; probs = [s / 64 for s in sizes]
elif mode == "sqrt":
    sizes = [1, 1, 2, 4, 8, 16, 32]; w = [math.sqrt(s) for s in sizes]; probs = [x / sum(w) for x in w]
for t in tasks:
    for s in seeds:
        out = {}
        def at_end(adapters, ctx):
            for d, hi in enumerate(BOUNDS):
                for a in adapters:
                    a.step_mask = (torch.arange(a.rank) < hi).float()
                out[hi] = (float(ctx["heldout_items"]().mean()), ctx["task"].heldout_error())
            for a in adapters:
                a.step_mask = None
        on_step, after_step = make_cbs(probs)
        lab.train(lab.make(t, s), s, lab.Run(rank=64, held_out=True, on_step=on_step, after_step=after_step, at_end=at_end))
        print(t, s, mode, " ".join(f"{k}:{v[1]:.4f}/{v[0]:.4f}" for k, v in out.items()), flush=True)
