"""The rank-search lab: a minimal LoRA on the suite's tasks, to measure rank mechanisms quickly.

Not the package: a small adapter (factors A, B, a per-slot mask) wrapped around the
suite's frozen models, trained exactly like ``bench/quality_suite.train_ours`` (AdamW,
lr 2e-3, 3 samples a step, 100 epochs, alpha = rank so the scale is 1, the same
seeds, the same data order). Mechanisms are callbacks at epoch boundaries and
per-step hooks, so each can be measured before it is ported into ``aclora_ext``.

Run from the repository root: ``python -m bench.lab.lab --tasks mlp-mid --seeds 0,1`` trains the lab's
fixed-rank sweep (every rank, on all 15 samples and on the 12 a held-out share leaves) and prints one line per run.
The experiments built on it (version 0.2's research, listed in README.md) are in the project's history.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from aclora_ext import functional as F
from bench import quality_suite as qs


class Adapter(nn.Module):
    """y = W0 x + B diag(mask * gate) A x (scale 1), recording what the rank search may read."""

    def __init__(self, layer: nn.Linear, rank: int, name: str) -> None:
        super().__init__()
        self.name = name
        self.layer = layer
        self.rank = rank
        self.A = nn.Parameter(torch.empty(rank, layer.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(layer.out_features, rank))
        self.register_buffer("mask", torch.ones(rank))
        self.step_mask: Optional[torch.Tensor] = None  # per-step extra mask (nested dropout)
        self.hooks: list[Callable] = []  # called with (adapter, x, h) in training forwards
        self._forward = layer.forward
        layer.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._forward(x)
        h = x @ self.A.T
        m = self.mask if self.step_mask is None else self.mask * self.step_mask
        h = h * m
        for hook in self.hooks:
            h = hook(self, x, h) or h
        out = base + h @ self.B.T
        if getattr(self, "D", None) is not None:
            out = out + x @ self.D.T
        return out

    def delta(self) -> torch.Tensor:
        return (self.B * self.mask) @ self.A

    def remove(self) -> None:
        self.layer.forward = self._forward


def attach(task: qs.Task, rank: int) -> list[Adapter]:
    targets = qs._targets(task)
    out = []
    for name, module in task.model.named_modules():
        if isinstance(module, nn.Linear) and any(_match(name, t) for t in targets):
            out.append(Adapter(module, rank, name))
    return out


def _match(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


@dataclass
class Run:
    """One training run's knobs (defaults: the suite's)."""

    rank: int = 64
    epochs: int = 100
    per_step: int = 3
    lr: float = 2e-3
    held_out: bool = False  # last 3 of 15 out of training
    every: int = 10  # epochs between callbacks
    on_restart: Optional[Callable] = None  # (adapters, ctx) at every `every` epochs (not after the last)
    on_step: Optional[Callable] = None  # (adapters, ctx) before each step
    after_step: Optional[Callable] = None
    at_end: Optional[Callable] = None  # (adapters, ctx) before scoring
    extra: dict = field(default_factory=dict)


def train(task: qs.Task, seed: int, run: Run) -> dict:
    torch.manual_seed(seed + 7919)
    adapters = attach(task, run.rank)
    ids = list(range(qs.N_TRAIN))
    train_ids = ids[: qs.N_TRAIN - qs.N_VAL] if run.held_out else ids
    held = ids[qs.N_TRAIN - qs.N_VAL :]
    params = [p for a in adapters for p in (a.A, a.B)]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 104729)
    ctx = {
        "task": task,
        "opt": opt,
        "held": held,
        "train_ids": train_ids,
        "epoch": 0,
        "step": 0,
        "epochs": run.epochs,
        "seed": seed,
        "run": run,
        "log": [],
    }
    ctx["steps_per_epoch"] = math.ceil(len(train_ids) / run.per_step)
    ctx["total_steps"] = ctx["steps_per_epoch"] * run.epochs

    def heldout_items() -> torch.Tensor:
        with torch.no_grad():
            return task.selection_loss(held).detach().double().flatten()

    ctx["heldout_items"] = heldout_items
    with torch.no_grad():
        n_items = task.selection_loss(held).numel()
    if isinstance(task, qs.TextureTask):
        ctx["groups"] = torch.arange(n_items) % len(held)
    else:
        ctx["groups"] = torch.arange(n_items) // (n_items // len(held))
    start = time.process_time()
    for epoch in range(run.epochs):
        ctx["epoch"] = epoch
        if epoch and epoch % run.every == 0 and run.on_restart is not None:
            run.on_restart(adapters, ctx)
        order = torch.as_tensor(ctx["train_ids"])[torch.randperm(len(ctx["train_ids"]), generator=g)]
        for idx in order.split(run.per_step):
            ctx["idx"] = idx
            if run.on_step is not None:
                run.on_step(adapters, ctx)
            loss = task.train_loss(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if run.after_step is not None:
                run.after_step(adapters, ctx)
            opt.step()
            ctx["step"] += 1
    for a in adapters:
        a.step_mask = None
    if run.at_end is not None:
        run.at_end(adapters, ctx)
    cpu = time.process_time() - start
    with torch.no_grad():
        err = task.heldout_error()
    ranks = [int(a.mask.sum()) for a in adapters]
    for a in adapters:
        a.remove()
    return {"heldout": err, "ranks": ranks, "cpu": cpu, "log": ctx["log"]}


# --- SVD utilities on the adapters -----------------------------------------------------------------
def rebase(a: Adapter) -> torch.Tensor:
    """Rewrite the adapter's active slots in its update's SVD basis (descending, packed first; inactive slots
    keep their A rows and zero B). Returns the singular values (R,)."""
    with torch.no_grad():
        down = (a.A * a.mask[:, None])[None]
        up = (a.B * a.mask[None, :])[None]
        s, to_up, to_down = F.product_core(down, up)
        k = int(a.mask.sum())
        new_down, new_up = F.component_factors(down, up, s, to_up, to_down, torch.tensor([k]), a.rank)
        active = torch.arange(a.rank) < k
        a.A.copy_(torch.where(active[:, None], new_down[0], a.A))
        a.B.copy_(new_up[0])
        a.mask.copy_(active.float())
        return s[0]


def cut(a: Adapter, k: int, opt: Optional[torch.optim.Optimizer] = None, reset_state: bool = True) -> None:
    """Keep the adapter's first k (rebased) slots, mask the others (B column zeroed)."""
    with torch.no_grad():
        keep = torch.arange(a.rank) < k
        a.mask.copy_(keep.float())
        a.B.mul_(keep.float()[None, :])
        if opt is not None and reset_state:
            for p in (a.A, a.B):
                opt.state.pop(p, None)


def heldout(task: qs.Task, held: Sequence[int]) -> float:
    with torch.no_grad():
        return float(task.selection_loss(held).mean())


TASKS = ("mlp-small", "mlp-mid", "mlp-cliff", "mlp-large", "textures")


def make(name: str, seed: int, loss: str = "mse") -> qs.Task:
    return qs.build_task(name, seed, loss, 3000, False)


# --- the product mode's analysis, on the lab adapters ------------------------------------------------
class Recorder:
    """Per adapter: sum of h h^T over training forwards (masked h), count, and the layer output's mean square."""

    def __init__(self, adapters: Sequence[Adapter]) -> None:
        self.gram = {a.name: torch.zeros(a.rank, a.rank) for a in adapters}
        self.count = {a.name: 0 for a in adapters}
        self.out_sq = {a.name: 0.0 for a in adapters}
        self.out_n = {a.name: 0 for a in adapters}
        for a in adapters:
            a.hooks.append(self._hook)
            a.layer.register_forward_hook(self._out_hook(a))

    def _hook(self, a: Adapter, x: torch.Tensor, h: torch.Tensor):
        if torch.is_grad_enabled():
            hd = h.detach().reshape(-1, h.shape[-1])
            self.gram[a.name].addmm_(hd.T, hd)
            self.count[a.name] += hd.shape[0]
        return None

    def _out_hook(self, a: Adapter):
        def hook(layer, inputs, output):
            if torch.is_grad_enabled():
                self.out_sq[a.name] += float(output.detach().pow(2).sum())
                self.out_n[a.name] += output.numel()

        return hook

    def reset(self) -> None:
        for k in self.gram:
            self.gram[k].zero_()
            self.count[k] = 0
            self.out_sq[k] = 0.0
            self.out_n[k] = 0


def analyse(a: Adapter, rec: Recorder) -> torch.Tensor:
    """Rebase the adapter's active slots into its update's SVD basis (packed first) and return each slot's
    importance (RMS added to the layer's output / the output's RMS; 0 for inactive slots)."""
    with torch.no_grad():
        m = a.mask
        down = (a.A * m[:, None])[None]
        up = (a.B * m[None, :])[None]
        s, to_up, to_down = F.product_core(down, up)
        gram = rec.gram[a.name][None] * m[None, :, None] * m[None, None, :]
        count = torch.tensor([max(rec.count[a.name], 1)])
        imp = F.component_importance(to_down, gram, count)[0]
        rms = math.sqrt(rec.out_sq[a.name] / max(rec.out_n[a.name], 1)) or 1.0
        imp = imp / rms
        k = int(m.sum())
        new_down, new_up = F.component_factors(down, up, s, to_up, to_down, torch.tensor([k]), a.rank)
        active = torch.arange(a.rank) < k
        a.A.copy_(torch.where(active[:, None], new_down[0], a.A))
        a.B.copy_(new_up[0])
        a.mask.copy_(active.float())
        imp = torch.where(active, imp, torch.zeros_like(imp))
        # the SVD orders by s; importance may order differently: sort slots by importance
        order = torch.argsort(imp, descending=True)
        a.A.copy_(a.A[order])
        a.B.copy_(a.B[:, order])
        a.mask.copy_(a.mask[order])
        return imp[order]


def level_keeps(imps: dict, level: float, min_rank: int = 1) -> dict:
    top = max(float(v.max()) for v in imps.values())
    thr = 0.0 if level == math.inf else top * 10.0**-level
    out = {}
    for name, v in imps.items():
        keep = (v > thr) & (v > 0)
        keep[:min_rank] = True  # slots sorted by importance
        out[name] = keep
    return out


def set_masks(adapters: Sequence[Adapter], keeps: dict) -> None:
    for a in adapters:
        a.step_mask = keeps[a.name].float() if keeps is not None else None


def apply_keep(
    a: Adapter, keep: torch.Tensor, row_std: Optional[float] = None, g: Optional[torch.Generator] = None
) -> None:
    """Keep the slots in ``keep`` (a prefix after analyse), mask the others: B column zero, A row fresh."""
    with torch.no_grad():
        k = int(keep.sum())
        active = torch.arange(a.rank) < k
        std = float(a.A[:k].std()) if row_std is None else row_std
        fresh = torch.randn(a.A.shape, generator=g) * std
        a.A.copy_(torch.where(active[:, None], a.A, fresh))
        a.B.mul_(active.float()[None, :])
        a.mask.copy_(active.float())


def open_slots(a: Adapter, count: int) -> None:
    """Unmask ``count`` more slots after the active ones (B zero: they start contributing nothing)."""
    with torch.no_grad():
        k = int(a.mask.sum())
        n = min(a.rank, k + count)
        a.B[:, k:n] = 0
        a.mask[:n] = 1.0


LEVELS = F.LEVELS


def pessimistic(items: torch.Tensor, ref: torch.Tensor, se: float = 1.0) -> float:
    return F.pessimistic_loss(items, ref, se)


# --- the fixed-rank sweep -------------------------------------------------------------------------------------------
SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64)


def sweep(
    tasks: Sequence[str], seeds: Sequence[int], ranks: Sequence[int] = SWEEP_RANKS, epochs: int = 100
) -> dict[str, dict]:
    """Held-out error of a plain LoRA at every rank, trained on every sample ("on 15") and without the held-out
    share ("on 12"): the reference that README.md's tables divide by, and the cost of holding images out."""
    results = {}
    for task in tasks:
        for seed in seeds:
            for held in (False, True):
                for rank in ranks:
                    key = f"{task}|{seed}|fixed {rank}{' on 12' if held else ''}"
                    run = train(make(task, seed), seed, Run(rank=rank, epochs=epochs, held_out=held))
                    results[key] = {"heldout": run["heldout"], "cpu": run["cpu"], "ranks": run["ranks"]}
                    print(f"{key}: held-out error {run['heldout']:.5f} ({run['cpu']:.1f} s CPU)", flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description="The rank-search lab's fixed-rank sweep on the quality suite's tasks.")
    p.add_argument("--tasks", default="mlp-mid", help="comma-separated task names of bench/quality_suite.py")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--ranks", default=",".join(map(str, SWEEP_RANKS)), help="comma-separated ranks")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in qs.MLP_REGIMES and task not in qs.VARIANT_REGIMES and task != "textures":
            raise SystemExit(
                f"--tasks: unknown task {task!r}; allowed: "
                + ", ".join([*qs.MLP_REGIMES, "textures", *qs.VARIANT_REGIMES])
            )
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError as error:
        raise SystemExit(f"--seeds/--ranks: comma-separated integers expected ({error})") from None
    results = sweep(tasks, seeds, ranks, args.epochs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
