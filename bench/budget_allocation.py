"""Ranks under a file-size budget (issue 18): greedy vs exact allocation, gap and time.

Instances: the module shapes of an SDXL LoRA (kohya's 986 modules,
``aclora_ext.harness.architectures.sdxl_module_shapes``) and of a FLUX.1 LoRA (544 modules:
19 double blocks x 10, 38 single blocks x 3 with linear1 3072->21504 and
linear2 15360->3072, CLIP-L 72 and T5-XXL 168; built here, see
:func:`flux_shapes`), at R = 32, 64, 128, fp16, with synthetic spectra (the
worth of a component is its squared singular value): per module a scale
drawn log-normal (sigma 1, modules differ ~10x), half the modules a power law
j^-p (p in 0.5..2), half an exponential decay to a noise floor (1..10 % of
the first), 10 % jitter, sorted ("mixed"); and every module a power law
("power": smooth tails, many components near the cut, the exact method's
hardest case). Budgets: 5, 15, 30, 60 % of the file at
rank R. Every allocation is checked against the budget; the exact one is
checked to keep at least the greedy's worth.

Also: ``fit_ranks`` on the whole SDXL file (header, ``aclora_ranks``
metadata and sshs hashes included), and small adversarial instances (2..4
modules, ranks up to 6) against brute force.

    .venv/bin/python bench/budget_allocation.py --quick --threads 1   # 1 seed
    .venv/bin/python bench/budget_allocation.py --full --threads 1    # 3 seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools
import json
import math
import random
import statistics
import time
from typing import Optional

import torch

from aclora_ext.files import sizes
from aclora_ext.files.fit import fit_ranks
from aclora_ext.functional import allocation as knapsack
from bench import common

NAME = "budget_allocation"
FRACTIONS = (0.05, 0.15, 0.3, 0.6)


def flux_shapes() -> list[tuple[str, int, int]]:
    """(name, in, out) of a FLUX.1 LoRA with both text encoders (544 Linear modules)."""
    h = 3072
    out = []
    for b in range(19):
        for side in ("img", "txt"):
            p = f"lora_unet_double_blocks_{b}_{side}"
            out += [(f"{p}_attn_qkv", h, 3 * h), (f"{p}_attn_proj", h, h), (f"{p}_mlp_0", h, 4 * h),
                    (f"{p}_mlp_2", 4 * h, h), (f"{p}_mod_lin", h, 6 * h)]
    for b in range(38):
        p = f"lora_unet_single_blocks_{b}"
        out += [(f"{p}_linear1", h, 3 * h + 4 * h), (f"{p}_linear2", h + 4 * h, h), (f"{p}_modulation_lin", h, 3 * h)]
    for layer in range(12):  # CLIP-L
        p = f"lora_te1_text_model_encoder_layers_{layer}"
        out += [(f"{p}_self_attn_{x}_proj", 768, 768) for x in "qkv"] + [(f"{p}_self_attn_out_proj", 768, 768),
                                                                        (f"{p}_mlp_fc1", 768, 3072),
                                                                        (f"{p}_mlp_fc2", 3072, 768)]
    for layer in range(24):  # T5-XXL
        p = f"lora_te2_encoder_block_{layer}"
        out += [(f"{p}_layer_0_SelfAttention_{x}", 4096, 4096) for x in "qkvo"]
        out += [(f"{p}_layer_1_DenseReluDense_wi_0", 4096, 10240), (f"{p}_layer_1_DenseReluDense_wi_1", 4096, 10240),
                (f"{p}_layer_1_DenseReluDense_wo", 10240, 4096)]
    return out


def sdxl_layouts(dtype: torch.dtype) -> list[sizes.ModuleLayout]:
    from aclora_ext.harness.architectures import sdxl_module_shapes

    return [sizes.ModuleLayout(m.lora_name, m.in_features, m.out_features, tuple(m.kernel_size), dtype)
            for m in sdxl_module_shapes()]


def flux_layouts(dtype: torch.dtype) -> list[sizes.ModuleLayout]:
    return [sizes.ModuleLayout(name, i, o, (), dtype) for name, i, o in flux_shapes()]


def spectra(count: int, rank: int, generator: torch.Generator, family: str = "mixed") -> torch.Tensor:
    """(count, rank) synthetic squared singular values (see the module doc); ``family`` "power": every
    module a power law (long, smooth tails: the hardest case for the exact method's core)."""
    j = torch.arange(1, rank + 1, dtype=torch.float64)[None, :]
    scale = torch.exp(torch.randn(count, 1, generator=generator, dtype=torch.float64))
    power = 0.5 + 1.5 * torch.rand(count, 1, generator=generator, dtype=torch.float64)
    tau = torch.exp(torch.rand(count, 1, generator=generator, dtype=torch.float64) * math.log(max(rank / 4, 1.5)))
    floor = 10 ** (-2 + torch.rand(count, 1, generator=generator, dtype=torch.float64))
    law = j ** -power
    decay = torch.exp(-(j - 1) / tau) + floor
    kind = torch.rand(count, 1, generator=generator) < (0.5 if family == "mixed" else 1.0)
    s = scale * torch.where(kind, law, decay) * (1 + 0.1 * torch.rand(count, rank, generator=generator,
                                                                     dtype=torch.float64))
    return s.sort(dim=1, descending=True).values.square()


def measure(model: str, layouts: list[sizes.ModuleLayout], rank: int, fraction: float, seed: int,
            family: str = "mixed") -> dict:
    g = torch.Generator().manual_seed(seed)
    worths = spectra(len(layouts), rank, g, family)
    costs = [m.component_bytes for m in layouts]
    budget = int(sum(costs) * rank * fraction)
    rows = {}
    for method in ("greedy", "exact"):
        best = None
        for _ in range(3):  # best of 3: a shared machine
            allocation = knapsack.allocate(worths, costs, budget, method=method)
            best = allocation if best is None or allocation.seconds < best.seconds else best
        assert best.cost <= budget
        rows[method] = best
    greedy, exact = rows["greedy"], rows["exact"]
    assert exact.worth >= greedy.worth - 1e-12 * greedy.total_worth
    lost = exact.total_worth - exact.worth
    return {
        "model": model, "spectra": family, "modules": len(layouts), "rank": rank, "fraction": fraction, "seed": seed,
        "budget_bytes": budget, "components": len(layouts) * rank,
        "greedy_ms": 1000 * greedy.seconds, "exact_ms": 1000 * exact.seconds,
        "exact_proved": exact.exact, "core": exact.core, "dp_work": exact.dp_work,
        # gap of the greedy: in kept worth, relative to the best answer found; and relative to the dropped worth
        "gap_kept": (exact.worth - greedy.worth) / exact.worth,
        "gap_error": (exact.worth - greedy.worth) / lost if lost > 0 else 0.0,
        # certified: how far the returned answer of each method can be from the optimum (LP bound)
        "greedy_certified": (greedy.bound - greedy.worth) / greedy.worth,
        "exact_certified": exact.gap / exact.worth,
    }


def fit_file(layouts: list[sizes.ModuleLayout], rank: int, fraction: float, seed: int) -> dict:
    """fit_ranks on the whole file: time, and the size against the limit."""
    g = torch.Generator().manual_seed(seed)
    worths = spectra(len(layouts), rank, g)
    full = sizes.saved_file_size(sizes.layout_tensors(layouts, [rank] * len(layouts)), {})
    max_size = int(full * fraction)

    def metadata(ranks: dict) -> dict:
        return {"ss_network_dim": "Dynamic", "aclora_ranks": json.dumps(ranks, separators=(",", ":"))}

    seconds = cpu = math.inf
    for _ in range(3):  # best of 3: a shared machine
        start, start_cpu = time.perf_counter(), time.process_time()
        fit = fit_ranks(sizes.FileLayout(layouts, metadata), worths, max_size)
        seconds = min(seconds, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    assert fit.size <= max_size
    return {"rank": rank, "fraction": fraction, "max_size": max_size, "size": fit.size,
            "slack_bytes": max_size - fit.size, "header_bound": fit.header_bound, "tries": fit.tries, "seconds": seconds, "cpu_seconds": cpu, "exact": fit.allocation.exact}


def adversarial(trials: int, seed: int) -> dict:
    """Small instances (2..4 modules, ranks up to 6, costs 1..20, any budget): greedy vs brute force."""
    rng = random.Random(seed)
    gaps, exact_ok = [], 0
    for _ in range(trials):
        m = rng.randint(2, 4)
        worths = [torch.tensor(sorted((rng.random() ** 3 for _ in range(rng.randint(1, 6))), reverse=True),
                               dtype=torch.float64) for _ in range(m)]
        costs = [rng.randint(1, 20) for _ in range(m)]
        budget = rng.randint(1, sum(c * len(w) for c, w in zip(costs, worths)))
        best = max(sum(float(w[:k].sum()) for w, k in zip(worths, ks))
                   for ks in itertools.product(*[range(len(w) + 1) for w in worths])
                   if sum(c * k for c, k in zip(costs, ks)) <= budget)
        greedy = knapsack.allocate(worths, costs, budget, min_ranks=0, method="greedy")
        exact = knapsack.allocate(worths, costs, budget, min_ranks=0, method="exact")
        exact_ok += abs(exact.worth - best) <= 1e-9 * max(best, 1.0)
        gaps.append((best - greedy.worth) / best if best > 0 else 0.0)
    gaps.sort()
    return {"trials": trials, "exact_equals_brute_force": exact_ok, "greedy_suboptimal": sum(g > 1e-12 for g in gaps),
            "greedy_gap_median": statistics.median(gaps), "greedy_gap_p90": gaps[int(0.9 * len(gaps))],
            "greedy_gap_max": gaps[-1]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = common.parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = (0,) if args.mode == "quick" or args.smoke else (0, 1, 2)
    ranks = (32,) if args.smoke else (32, 64, 128)
    fractions = (0.15,) if args.smoke else FRACTIONS
    if args.smoke:  # building the SDXL shapes takes ~10 s: a few SDXL-like modules, linear and conv, instead
        models = {"sdxl-like": [sizes.ModuleLayout(f"m{i}", c, c, k, torch.float16)
                                for i, (c, k) in enumerate(itertools.product((320, 640, 1280), ((), (3, 3), (1, 1))))],
                  "flux": flux_layouts(torch.float16)[:40]}
    else:
        models = {"sdxl": sdxl_layouts(torch.float16), "flux": flux_layouts(torch.float16)}
    families = ("mixed",) if args.smoke else ("mixed", "power")
    rows = [measure(model, layouts, rank, fraction, seed, family) for family in families
            for model, layouts in models.items() for rank in ranks for fraction in fractions for seed in seeds]
    first = next(iter(models.values()))
    fits = [fit_file(first, rank, fraction, 0) for rank in ranks for fraction in fractions]
    small = adversarial(100 if args.smoke else 2000, 0)
    print("| spectra | model | R | budget | greedy ms | exact ms | proved optimal | core | greedy gap (kept) "
          "| greedy gap (error) | certified gap of the answer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spectra']} | {r['model']} | {r['rank']} | {r['fraction']:.0%} | {r['greedy_ms']:.0f} | {r['exact_ms']:.0f} | "
              f"{r['exact_proved']} | {r['core']} | {r['gap_kept']:.1e} | {r['gap_error']:.1e} | "
              f"{r['exact_certified']:.1e} |")
    print()
    print(f"| {next(iter(models))} file, R | limit | fit_ranks ms (CPU ms) | size | unused bytes | tries | exact |")
    print("|---|---|---|---|---|---|---|")
    for f in fits:
        print(f"| {f['rank']} | {f['fraction']:.0%} = {f['max_size']:,} | {1000 * f['seconds']:.0f} "
              f"({1000 * f['cpu_seconds']:.0f}) | {f['size']:,} | "
              f"{f['slack_bytes']:,} | {f['tries']} | {f['exact']} |")
    print()
    print("small adversarial instances:", json.dumps(small))
    payload = {"machine": common.machine_info("cpu"), "mode": "smoke" if args.smoke else args.mode,
               "rows": rows, "fit_ranks": fits, "adversarial": small}
    if args.out != "none":
        out = Path(args.out) if args.out else common.RESULTS_DIR / f"{NAME}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
