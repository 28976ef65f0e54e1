"""Ranks under a size budget (issue 18): does ``aclora resize --max-size`` keep more than the alternatives?

At 25, 50 and 75 % of an input file's size, three files of at most that size (metadata included, as
each would really be written by ``aclora resize``):

* **ours**: ``--max-size`` (no criterion cap): every module's rank from one allocation over the whole
  file, worth = squared singular value of the module's scaled update;
* **uniform**: the same rank r in every module, the largest r whose file fits;
* **sv_fro**: kohya resize_lora's ``sv_fro`` rule (per module, the share p of the Frobenius norm, its +1
  and clamps; ``functional.resize_lora_rank``) at the largest p whose file fits, found by bisection.

Scores: the relative error of the whole update, ||dW - dW'||_F / ||dW||_F over all modules together;
and, on files trained here, the held-out error of the base model with the resized update merged in.

Files:

* ``sdxl``: the SDXL LoRA of the resize benchmark (986 modules, ``resize_speed.sdxl_lora``: lora_down a
  random init, lora_up a planted rank 2..R/4 signal decaying over a decade plus 10 % noise), fp16;
* ``flux``: a FLUX.1-dev-shaped LoRA built the same way (:func:`flux_module_shapes`: 19 double blocks x
  img/txt x (attn_qkv, attn_proj, mlp_0, mlp_2, mod_lin), 38 single blocks x (linear1, linear2,
  modulation_lin); 304 modules), fp16;
* ``trained <task>``: the rank-64 LoRA ``bench/quality_suite.py`` trains on its task (same code, same
  seed), written as a kohya file (fp16), with the suite's held-out error.

Ours is checked end to end (``resize_state_dict(max_size=...)``: the same ranks, a file of at most the
budget), and the allocation timed (SDXL: a few hundred ms at most is the target, like resize's speed).

    .venv/bin/python bench/budget_quality.py --quick --threads 1   # SDXL R=32, FLUX R=16, 2 trained tasks (~3 min)
    .venv/bin/python bench/budget_quality.py --full --threads 1    # SDXL R=32/128, FLUX R=32, 5 trained tasks, 3 seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from aclora_ext.functional.allocation import BudgetError
from aclora_ext.files.sizes import layout_tensors, safetensors_size, saved_file_size
from aclora_ext.harness.architectures import ModuleShape
from aclora_ext.tools.resize import Budget, Criterion, resize_state_dict
from aclora_ext.tools.resize.max_size import module_layouts
from aclora_ext.tools.resize.core import _accounts, _analyse, _decide, _dtype, _file_alpha, _fit_budget, resized_metadata
from aclora_ext.tools.resize.inputs import _modules
from aclora_ext.tools.resize.progress import Progress
from aclora_ext.tools.resize.result import ResizeResult
from bench import common, resize_speed

NAME = "budget_quality"
SHARES = (0.25, 0.5, 0.75)
METHODS = ("ours", "uniform", "sv_fro")


# --- files ---------------------------------------------------------------------------------------------------
def flux_module_shapes() -> list[ModuleShape]:
    """The transformer modules a kohya FLUX.1 [dev] LoRA trains (sd-scripts' lora_flux names), 304 Linear."""
    h = 3072
    shapes = []
    for block in range(19):
        for side in ("img", "txt"):
            p = f"lora_unet_double_blocks_{block}_{side}"
            shapes += [ModuleShape(f"{p}_attn_qkv", 3 * h, h, ()), ModuleShape(f"{p}_attn_proj", h, h, ()),
                       ModuleShape(f"{p}_mlp_0", 4 * h, h, ()), ModuleShape(f"{p}_mlp_2", h, 4 * h, ()),
                       ModuleShape(f"{p}_mod_lin", 6 * h, h, ())]
    for block in range(38):
        p = f"lora_unet_single_blocks_{block}"
        shapes += [ModuleShape(f"{p}_linear1", 7 * h, h, ()), ModuleShape(f"{p}_linear2", h, 5 * h, ()),
                   ModuleShape(f"{p}_modulation_lin", 3 * h, h, ())]
    return shapes


def synthetic_file(shapes: Sequence[ModuleShape], rank: int) -> dict[str, torch.Tensor]:
    """The resize benchmark's trained-looking factors, fp16 (a saved file's precision)."""
    return {k: v.half() for k, v in resize_speed.sdxl_lora(shapes, rank).items()}


# --- one analysed file -----------------------------------------------------------------------------------------
@dataclass
class Analysed:
    """A file analysed once (as ``aclora resize`` does), then sized and scored at any ranks."""

    modules: list
    spectra: dict
    dtype: torch.dtype
    alpha: float
    metadata: dict[str, str]
    input_size: int
    max_rank: int

    def plan(self, criterion: Criterion, budget: Optional[int] = None) -> tuple[ResizeResult, dict[int, int]]:
        """What ``resize_state_dict`` holds before writing: the result without tensors, and the criterion's ranks."""
        max_rank = criterion.max_rank or self.max_rank
        max_conv_rank = criterion.max_conv_rank or max_rank
        ranks, threshold, top = _decide(self.modules, self.spectra, criterion, max_rank, max_conv_rank)
        plan = ResizeResult({}, [], criterion, self.alpha, max_rank, max_conv_rank, threshold, top, 0.0,
                            str(self.dtype).replace("torch.", ""), {m.name: m.rank for m in self.modules},
                            None if budget is None else Budget(budget, False))
        return plan, ranks

    def size(self, plan: ResizeResult, ranks: dict[int, int]) -> int:
        """The exact size of the file ``aclora resize`` writes at ``ranks`` (its metadata included)."""
        scored = replace(plan, modules=_accounts(self.modules, self.spectra, ranks))
        tensors = layout_tensors(module_layouts(self.modules, self.dtype), [ranks[m.index] for m in self.modules])
        return saved_file_size(tensors, resized_metadata(self.metadata, scored, "bench"))

    def error(self, ranks: dict[int, int]) -> float:
        """The relative error of the whole update at ``ranks``."""
        accounts = _accounts(self.modules, self.spectra, ranks)
        total = sum(m.energy for m in accounts)
        return math.sqrt(sum(m.energy * m.error ** 2 for m in accounts) / total)


def analyse(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Analysed:
    modules = _modules(tensors, "bench")
    dtype = _dtype(None, modules)
    spectra = _analyse(modules, torch.device("cpu"), Progress(0, False), "bench")
    return Analysed(modules, spectra, dtype, _file_alpha(modules, dtype, "bench"), metadata,
                    safetensors_size(tensors, metadata), max(m.rank for m in modules))


# --- the three files at one budget ---------------------------------------------------------------------------
def ours(a: Analysed, budget: int) -> Optional[dict]:
    """``--max-size`` (None: no file fits)."""
    plan, caps = a.plan(Criterion("importance", min_importance=0.0), budget)
    cpu = time.process_time()
    try:
        ranks = _fit_budget(a.modules, a.spectra, caps, plan, a.dtype, a.metadata, "bench")
    except BudgetError:
        return None
    return {"ranks": ranks, "size": plan.budget.size, "seconds": plan.budget.seconds,
            "cpu_seconds": time.process_time() - cpu, "exact": plan.budget.exact, "gap": plan.budget.gap}


def uniform(a: Analysed, budget: int) -> Optional[dict]:
    """The largest rank r in every module whose file fits (None: not even rank 1 fits)."""
    best = None
    for r in range(1, a.max_rank + 1):
        plan, ranks = a.plan(Criterion("importance", min_importance=0.0, max_rank=r))
        size = a.size(plan, ranks)
        if size > budget:
            break
        best = {"ranks": ranks, "size": size, "param": r}
    return best


def largest_fitting(fits: Callable[[float], Optional[dict]], low: float, high: float, steps: int = 40) -> Optional[dict]:
    """Bisection for the largest parameter in [low, high] whose file fits (sizes grow with it)."""
    at_high = fits(high)
    if at_high is not None:
        return at_high
    best = fits(low)
    if best is None:
        return None
    for _ in range(steps):
        middle = (low + high) / 2
        found = fits(middle)
        if found is None:
            high = middle
        else:
            low, best = middle, found
    return best


def sv_fro(a: Analysed, budget: int) -> Optional[dict]:
    def fits(p: float) -> Optional[dict]:
        plan, ranks = a.plan(Criterion("sv_fro", param=p, max_rank=a.max_rank))
        size = a.size(plan, ranks)
        return {"ranks": ranks, "size": size, "param": p} if size <= budget else None

    return largest_fitting(fits, 1e-6, 1.0)


# --- held-out error of the trained files -----------------------------------------------------------------------
def truncated_updates(tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each module's best rank-k approximation of alpha/R * up @ down (a float64 SVD of the explicit update)."""
    out = {}
    for name, k in ranks.items():
        down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
        delta = float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        out[name] = (u[:, :k] * s[:k] @ vh[:k]).float()
    return out


def trained_file(task_name: str, seed: int, smoke: bool) -> tuple[dict[str, torch.Tensor], Callable]:
    """The quality suite's rank-64 LoRA on ``task_name`` (fp16 kohya tensors) and its held-out scorer."""
    from bench import quality_suite as suite

    task = suite.build_task(task_name, seed, "mse", 20 if smoke else 3000, smoke)
    training = suite.Training(epochs=3 if smoke else 100)
    with tempfile.TemporaryDirectory() as workdir:
        run = suite.train_ours(task, suite.Method(f"LoRA rank {suite.MAX_RANK}", "lora", suite.MAX_RANK), seed,
                               training, workdir)
    tensors = {}
    for name, (down, up, scale) in run["factors"].items():
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(scale * down.shape[0]).half()
    paths = dict(suite._module_paths(task, run["factors"]))

    def heldout(ranks: dict[str, int]) -> float:
        return suite.score_resized(task, paths, truncated_updates(tensors, ranks))["heldout"]

    return tensors, heldout


# --- one file ------------------------------------------------------------------------------------------------
def measure_file(label: str, tensors: dict[str, torch.Tensor], heldout: Optional[Callable] = None,
                 check: bool = True) -> list[dict]:
    metadata = {"ss_network_dim": str(max(v.shape[0] for k, v in tensors.items() if k.endswith("down.weight")))}
    start = time.perf_counter()
    a = analyse(tensors, metadata)
    analysis = time.perf_counter() - start
    cpu = time.process_time()
    resize_state_dict(tensors, metadata=metadata)  # today's resize (the default criterion), for its time
    plain_cpu = time.process_time() - cpu
    rows = []
    names = {m.index: m.name for m in a.modules}
    for share in SHARES:
        budget = int(share * a.input_size)
        found = {"ours": ours(a, budget), "uniform": uniform(a, budget), "sv_fro": sv_fro(a, budget)}
        row = {"file": label, "modules": len(a.modules), "rank": a.max_rank, "share": share, "budget": budget,
               "input_size": a.input_size, "analysis_s": analysis}
        for method, result in found.items():
            if result is None:
                row.update({f"{method}_error": float("nan"), f"{method}_size": None})
                if heldout is not None:
                    row[f"{method}_heldout"] = float("nan")
                continue
            row[f"{method}_error"] = a.error(result["ranks"])
            row[f"{method}_size"] = result["size"]
            row[f"{method}_params"] = sum(result["ranks"].values())
            if "param" in result:
                row[f"{method}_param"] = result["param"]
            if heldout is not None:
                row[f"{method}_heldout"] = heldout({names[i]: k for i, k in result["ranks"].items()})
        if heldout is not None:
            row["full_heldout"] = heldout({m.name: m.rank for m in a.modules})
        if found["ours"] is None:
            rows.append(row)
            continue
        row["allocation_s"], row["allocation_cpu_s"] = found["ours"]["seconds"], found["ours"]["cpu_seconds"]
        row["ours_exact"], row["ours_gap"] = found["ours"]["exact"], found["ours"]["gap"]
        if check:  # end to end: the public API gives the same ranks and a file of at most the budget
            cpu = time.process_time()
            real = resize_state_dict(tensors, max_size=budget, metadata=metadata)
            row["resize_cpu_s"] = time.process_time() - cpu
            row["resize_plain_cpu_s"] = plain_cpu
            assert real.budget.size <= budget and real.ranks == {names[i]: k for i, k in found["ours"]["ranks"].items()}
        rows.append(row)
        print(f"{label} {share:.0%}: ours {row['ours_error']:.4f}, uniform {row['uniform_error']:.4f}, "
              f"sv_fro {row['sv_fro_error']:.4f}", flush=True)
    return rows


def verdicts(rows: Sequence[dict]) -> list[dict]:
    """Per row: does ours have the lowest error (whole update, and held-out where there is one)?"""
    out = []
    for row in rows:
        entry = {"file": row["file"], "share": f"{row['share']:.0%}"}
        for score in ("error", "heldout"):
            if f"ours_{score}" not in row or row[f"ours_{score}"] != row[f"ours_{score}"]:
                continue
            others = [row[f"{m}_{score}"] for m in METHODS[1:] if row.get(f"{m}_{score}") == row.get(f"{m}_{score}")]
            entry[score] = common.verdict(all(row[f"ours_{score}"] <= other for other in others))
        out.append(entry)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds of each trained task (quick 1, full 3)")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1
    device = common.setup(args)
    logging.getLogger("aclora_ext").setLevel(logging.ERROR)
    full = args.mode == "full"
    if args.smoke:
        synthetic = [("smoke", resize_speed.SMOKE_SHAPES, 16)]
        tasks, seeds = ["mlp-small"], [0]
    else:
        from aclora_ext.harness.architectures import sdxl_module_shapes

        synthetic = [("sdxl", sdxl_module_shapes(), 32)] + ([("sdxl", sdxl_module_shapes(), 128)] if full else []) \
            + [("flux", flux_module_shapes(), 32 if full else 16)]
        tasks = ["mlp-small", "mlp-mid", "mlp-cliff", "mlp-large", "textures"] if full else ["mlp-mid", "mlp-cliff"]
        seeds = list(range(args.seeds or (3 if full else 1)))
    rows = []
    for label, shapes, rank in synthetic:
        rows += measure_file(f"{label} R={rank}", synthetic_file(shapes, rank))
        common.release_memory()
    for task in tasks:
        for seed in seeds:
            tensors, heldout = trained_file(task, seed, args.smoke)
            rows += measure_file(f"trained {task} s{seed}", tensors, heldout)
    machine = common.machine_info(device)
    title = f"Whole-update relative error at a share of the input's size — {common.describe_machine(machine)}"
    text = common.print_table(title, rows, ["file", "share", "ours_error", "uniform_error", "uniform_param",
                                            "sv_fro_error", "sv_fro_param", "ours_exact", "ours_gap"],
                              ["file", "size", "ours", "uniform", "uniform rank", "sv_fro", "sv_fro p",
                               "ours optimal", "certified gap (share of ||dW||^2)"])
    text += common.print_table("Time (CPU seconds, 1 thread): the allocation, and resize with and without the budget",
                               [row for row in rows if not row["file"].startswith("trained")],
                               ["file", "share", "allocation_cpu_s", "resize_cpu_s", "resize_plain_cpu_s"],
                               ["file", "size", "allocation (ours)", "resize --max-size", "resize (importance 0.01)"])
    trained = [row for row in rows if "ours_heldout" in row]
    if trained:
        text += common.print_table("Held-out error of the trained files (the rank-64 LoRA in full: full_heldout)",
                                   trained, ["file", "share", "ours_heldout", "uniform_heldout", "sv_fro_heldout",
                                             "full_heldout"],
                                   ["file", "size", "ours", "uniform", "sv_fro", "rank 64"])
    checks = verdicts(rows)
    text += common.print_table("Ours lowest?", checks, ["file", "share", "error", "heldout"],
                               ["file", "size", "whole-update error", "held-out error"])
    misses = [c for c in checks if "MISSED" in (c.get("error"), c.get("heldout"))]
    print(f"misses: {len(misses)} of {len(checks)} rows" + (": " + ", ".join(f"{m['file']} {m['share']}"
                                                                          for m in misses) if misses else ""))
    result = common.payload(NAME, args, device, rows=rows, checks=checks, misses=misses, shares=list(SHARES),
                            markdown=text)
    common.write_json(NAME, result, args.out)
    return result


if __name__ == "__main__":
    main()
