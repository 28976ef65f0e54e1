"""Honest probes: a base group (the kept slots) trained as if alone, and a probe group trained on its residual.

Each step is a base step (probability 1 - q: only the base is in the forward and updated) or a probe step
(probability q: base and probes in the forward, only the probes updated). The base never sees the probes, so at a
RESTART, "base" against "base + probes" is a comparison of two honestly trained models: the probes' value. The probes
join the base when a judge accepts them (held-out loss: beat the base by one standard error), else they restart.
"""
import math, os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch
import lab


class Probes:
    def __init__(self, start=4, growth=1.0, q=0.5, se=1.0, judge=None, cut=False, min_probe=1, seed=5,
                 reset_opt=False, stop=None):
        self.start, self.growth, self.q, self.se, self.judge, self.cut = start, growth, q, se, judge, cut
        self.min_probe, self.reset_opt, self.stop = min_probe, reset_opt, stop
        self.g = torch.Generator().manual_seed(seed)
        self.base = {}    # name -> bool (R,) base slots
        self.probe = {}   # name -> bool (R,) probe slots
        self.mode = "base"
        self.rec = None
        self.history = []

    # --- groups ---
    def setup(self, adapters, ctx):
        self.rec = lab.Recorder(adapters)
        for a in adapters:
            r = a.rank
            self.base[a.name] = torch.arange(r) < min(self.start, r)
            self.probe[a.name] = torch.zeros(r, dtype=torch.bool)
            self._open(a)
            with torch.no_grad():
                a.mask.fill_(1.0)
                a.B.zero_()

    def _open(self, a):
        k = int(self.base[a.name].sum())
        p = max(self.min_probe, math.ceil(self.growth * k))
        free = (~self.base[a.name]).nonzero().flatten()[:p]
        pr = torch.zeros(a.rank, dtype=torch.bool)
        pr[free] = True
        self.probe[a.name] = pr
        with torch.no_grad():
            a.B[:, pr] = 0
            if (pr.sum() > 0):
                std = float(a.A[self.base[a.name]].std()) if k > 1 else float(a.A.std())
                a.A[pr] = torch.randn(int(pr.sum()), a.A.shape[1], generator=self.g) * std

    def on_step(self, adapters, ctx):
        if self.rec is None:
            self.setup(adapters, ctx)
        stopped = self.stop is not None and ctx["step"] >= self.stop * ctx["total_steps"]
        self.mode = "probe" if (not stopped and torch.rand((), generator=self.g) < self.q) else "base"
        for a in adapters:
            m = self.base[a.name] | (self.probe[a.name] if self.mode == "probe" else False)
            a.step_mask = m.float()

    def after_step(self, adapters, ctx):
        for a in adapters:
            frozen = self.base[a.name] if self.mode == "probe" else self.probe[a.name]
            if a.A.grad is not None:
                a.A.grad[frozen] = 0
                a.B.grad[:, frozen] = 0

    # --- decisions ---
    def items(self, adapters, ctx, with_probes):
        for a in adapters:
            a.step_mask = (self.base[a.name] | (self.probe[a.name] if with_probes else False)).float()
        out = ctx["heldout_items"]()
        for a in adapters:
            a.step_mask = None
        return out

    def accept(self, adapters, ctx):
        if self.judge is not None:
            return self.judge(adapters, ctx, self)
        base = self.items(adapters, ctx, False)
        both = self.items(adapters, ctx, True)
        score_both = lab.pessimistic(both, base, self.se)
        return score_both < float(base.mean()), {"base": float(base.mean()), "both": float(both.mean()),
                                                 "pess": score_both}

    def on_restart(self, adapters, ctx, final=False):
        ok, info = self.accept(adapters, ctx)
        for a in adapters:
            if ok:
                self.base[a.name] = self.base[a.name] | self.probe[a.name]
            self.probe[a.name] = torch.zeros(a.rank, dtype=torch.bool)
        if ok and self.cut:
            pass
        ranks = [int(self.base[a.name].sum()) for a in adapters]
        self.history.append((ctx["epoch"], ok, ranks, info))
        ctx["log"].append(self.history[-1])
        for a in adapters:
            with torch.no_grad():
                a.B[:, ~self.base[a.name]] = 0
            if not final:
                self._open(a)
        if self.reset_opt:
            ctx["opt"].state.clear()

    def at_end(self, adapters, ctx):
        ctx["epoch"] = ctx["epochs"]
        self.on_restart(adapters, ctx, final=True)
        for a in adapters:
            with torch.no_grad():
                a.mask.copy_(self.base[a.name].float())
            a.step_mask = None

    def run(self, **kw):
        return lab.Run(on_step=self.on_step, after_step=self.after_step, on_restart=self.on_restart,
                       at_end=self.at_end, **kw)
