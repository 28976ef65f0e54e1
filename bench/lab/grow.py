"""The growth mechanism on the lab adapters: train at the kept rank, open probe slots, accept them on evidence."""
import math
import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import torch
import lab



def evaluate_levels(adapters, ctx, imps, min_rank):
    """The held-out items of every distinct kept set over lab.LEVELS: ({signature: items}, {level: signature})."""
    seen, values = {}, {}
    for level in lab.LEVELS:
        keeps = lab.level_keeps(imps, level, min_rank)
        sig = tuple(int(k.sum()) for k in keeps.values())
        if sig not in seen:
            lab.set_masks(adapters, keeps)
            seen[sig] = ctx["heldout_items"]()
        values[level] = sig
    lab.set_masks(adapters, None)
    return seen, values

class Grow:
    """on_restart / at_end callbacks.

    start: active slots per module at the start. growth: probes opened per module = ceil(growth * kept) (at least 1).
    ref: 'all' (a cut must beat keeping everything by 1 SE) or 'prev' (any change must beat the candidate closest
    to the previous kept total by 1 SE). backoff: after a decision that grew nothing, train one interval without
    probes. judge: a callable(adapters, ctx, imps, candidates) -> level, replacing the held-out choice (no-held-out
    criteria).
    """

    def __init__(self, start=4, growth=1.0, ref="prev", backoff=False, se=1.0, judge=None, min_rank=1,
                 reset_opt=True, open_at_start=False):
        self.start, self.growth, self.ref, self.backoff, self.se = start, growth, ref, backoff, se
        self.judge, self.min_rank, self.reset_opt = judge, min_rank, reset_opt
        self.rec = None
        self.prev_total = None
        self.skip_next = False
        self.history = []
        self.g = torch.Generator().manual_seed(5)

    def setup(self, adapters, ctx):
        self.rec = lab.Recorder(adapters)
        for a in adapters:
            with torch.no_grad():
                a.mask.copy_((torch.arange(a.rank) < min(self.start, a.rank)).float())
        self.prev_total = sum(int(a.mask.sum()) for a in adapters)

    def on_step(self, adapters, ctx):
        if self.rec is None:
            self.setup(adapters, ctx)

    def decide(self, adapters, ctx):
        imps = {a.name: lab.analyse(a, self.rec) for a in adapters}
        if self.judge is not None:
            level, info = self.judge(adapters, ctx, imps, self)
        else:
            level, info = self.held_out_level(adapters, ctx, imps)
        keeps = lab.level_keeps(imps, level, self.min_rank)
        for a in adapters:
            lab.apply_keep(a, keeps[a.name], g=self.g)
        total = sum(int(k.sum()) for k in keeps.values())
        grew = total > self.prev_total
        self.history.append((ctx["epoch"], level, [int(k.sum()) for k in keeps.values()], info))
        ctx["log"].append(self.history[-1])
        self.prev_total = total
        self.rec.reset()
        if self.reset_opt:
            ctx["opt"].state.clear()
        return grew

    def held_out_level(self, adapters, ctx, imps):
        seen, values = evaluate_levels(adapters, ctx, imps, self.min_rank)
        if self.ref == "all":
            ref_sig = values[math.inf]
        else:
            ref_sig = min(seen, key=lambda s: (abs(sum(s) - self.prev_total), sum(s)))
        ref = seen[ref_sig]
        score = {sig: lab.pessimistic(items, ref, self.se) for sig, items in seen.items()}
        best_sig = min(score, key=lambda s: (score[s], sum(s)))
        level = next(lv for lv in lab.LEVELS if values[lv] == best_sig)
        return level, {"candidates": len(seen), "ref": sum(ref_sig)}

    def on_restart(self, adapters, ctx):
        grew = self.decide(adapters, ctx)
        if self.backoff and not grew and not self.skip_next:
            self.skip_next = True
            return
        self.skip_next = False
        for a in adapters:
            k = int(a.mask.sum())
            lab.open_slots(a, max(1, math.ceil(self.growth * k)))

    def at_end(self, adapters, ctx):
        ctx["epoch"] = ctx["epochs"]
        self.decide(adapters, ctx)

    def run(self, **kw):
        return lab.Run(on_step=self.on_step, on_restart=self.on_restart, at_end=self.at_end, **kw)


class Parsimony(Grow):
    """Cut-only search with masked training after each cut: at every RESTART the smallest candidate (fewest kept
    components) whose held-out loss is within `se` standard errors of the best candidate's (Breiman's one-standard-
    error rule), paired item by item with the best. `first_only`: decide once, at the first RESTART. `open`:
    probes opened after each decision (growth factor), 0 = none."""

    def __init__(self, first_only=False, open_=0.0, rule="parsimony", fold=None, cluster=False, fold_reset=False, **kw):
        kw.setdefault("start", 64)
        super().__init__(**kw)
        self.first_only, self.open_, self.rule, self.fold = first_only, open_, rule, fold
        self.decisions = 0
        self.folded = False
        self.cluster = cluster
        self.fold_reset = fold_reset

    def held_out_level(self, adapters, ctx, imps):
        seen, values = evaluate_levels(adapters, ctx, imps, self.min_rank)
        means = {sig: float(v.mean()) for sig, v in seen.items()}
        best = min(means, key=means.get)
        if self.rule == "parsimony":
            ok = [sig for sig in seen if float(seen[sig].mean()) - lab.F.pessimistic_loss(seen[sig], seen[best], self.se) + float(seen[sig].mean()) <= means[best] + 1e-12 or sig == best]
            # within se: mean - se*SE(diff) <= best mean
            ok = []
            groups = ctx.get("groups")
            for sig, items in seen.items():
                d = items - seen[best]
                if self.cluster and groups is not None:
                    d = torch.stack([d[groups == g].mean() for g in groups.unique()])
                se = float(d.std()) / len(d) ** 0.5 if len(d) > 1 else 0.0
                if float(d.mean()) <= self.se * se:
                    ok.append(sig)
            chosen = min(ok, key=lambda s: (sum(s), means[s]))
        else:
            chosen = best
        level = next(lv for lv in lab.LEVELS if values[lv] == chosen)
        return level, {"candidates": len(seen), "best": sum(best)}

    def on_restart(self, adapters, ctx):
        if self.first_only and self.decisions >= 1:
            return
        if self.fold is not None and ctx["epoch"] >= self.fold * ctx["epochs"]:
            if not self.folded:  # the held-out share joins training; ranks stay as last chosen
                self.folded = True
                ctx["train_ids"] = list(range(15))
                if self.fold_reset:  # a second sd-scripts run: a fresh optimiser
                    ctx["opt"].state.clear()
            return
        self.decisions += 1
        self.decide(adapters, ctx)
        if self.open_:
            for a in adapters:
                k = int(a.mask.sum())
                lab.open_slots(a, max(1, math.ceil(self.open_ * k)))

    def at_end(self, adapters, ctx):
        if self.first_only or self.folded:
            return
        ctx["epoch"] = ctx["epochs"]
        self.decide(adapters, ctx)
