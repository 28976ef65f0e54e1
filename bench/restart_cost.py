"""What a RESTART and an export cost on SDXL's LoRA module set, next to the alternatives (issue 5, section 1).

The module set is SDXL's: the 986 LoRA modules kohya's networks.lora trains on
the U-Net and both text encoders, with their real shapes
(``aclora_ext.harness.architectures.sdxl_module_shapes``). Each is a real :class:`ACLoRAModule`
around a meta-device layer (the layer only gives the shapes), with factors
that look trained: lora_down a random init, lora_up a low-rank signal plus
noise (planted rank 2 .. R/4 per module). Timed, round-robin in one process:

- our RESTART, ``restart_modules`` in paper mode and product mode (p = 0.9),
- our export, ``export_modules`` (the variable-rank file's factors),
- a per-factor SVD loop: ``torch.linalg.svd(full_matrices=False)`` of every
  lora_down and lora_up, module by module (the decomposition alone: a lower
  bound of a naive implementation),
- a naive RESTART loop: the paper's Algorithm 1 module by module (that SVD,
  truncation, Gaussian refill, write-back), the same work as our paper mode,
- the full update SVD: ``torch.linalg.svd`` of each module's out x in update
  up @ down, what kohya's resize_lora does after training (it even asks for
  full matrices; we time the cheaper thin SVD). Timed on a sample of modules of
  every distinct shape and extrapolated by shape counts (marked as such).

Targets: RESTART >= 3x faster than the per-factor loop and >= 100x faster than
the full-update SVD; on CUDA, a RESTART under 1% of an SDXL epoch of 15 images
at 1024^2.

    .venv/bin/python bench/restart_cost.py --quick            # R=32, one round
    .venv/bin/python bench/restart_cost.py --full --threads 1 # R=32 and 128, three rounds
    .venv/bin/python bench/restart_cost.py --full --device cuda
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math
from typing import Optional, Sequence

import torch
from torch import nn

from aclora_ext import functional as F
from aclora_ext.lora.export import export_modules
from aclora_ext.lora.module import ACLoRAModule
from aclora_ext.options import ACLoRAConfig
from aclora_ext.lora.product_restart import keeps_at_level, restart_product
from aclora_ext.lora.paper_restart import restart_modules
from aclora_ext.harness.architectures import ModuleShape
from bench import common

NAME = "restart_cost"
P = 0.9  # the threshold of every timed RESTART (a mid-run value of p = 1 - L^alpha)
EPOCH_IMAGES = 15  # the paper's training-set size: an epoch is 15 steps at batch 1
# Assumed SDXL LoRA step at 1024^2, batch 1, bf16, gradient checkpointing when no
# measured step time is at hand: ~1-2 s on a 24 GB card (RTX 3090/4090 class);
# taking the low end makes the fraction conservative.
ASSUMED_STEP_SECONDS = 1.0
TARGET_LOOP_RATIO = 3.0
TARGET_FULL_SVD_RATIO = 100.0
TARGET_EPOCH_FRACTION = 0.01

# A few small shapes for --smoke: the same code path in well under a second.
SMOKE_SHAPES = [
    ModuleShape("lora_unet_smoke_attn_to_q", 64, 64, ()),
    ModuleShape("lora_unet_smoke_attn_to_k", 64, 96, ()),
    ModuleShape("lora_unet_smoke_ff_net_0_proj", 256, 64, ()),
    ModuleShape("lora_unet_smoke_proj_in", 64, 64, (1, 1)),
    ModuleShape("lora_te1_smoke_mlp_fc1", 128, 32, ()),
]


# --- the module set -------------------------------------------------------------------------------
def meta_layer(shape: ModuleShape) -> nn.Module:
    if shape.kernel_size:
        return nn.Conv2d(shape.in_features, shape.out_features, shape.kernel_size, device="meta")
    return nn.Linear(shape.in_features, shape.out_features, device="meta")


def build_modules(shapes: Sequence[ModuleShape], rank: int, device: torch.device, seed: int = 0) -> list[ACLoRAModule]:
    """Real ACLoRAModules at rank ``rank`` around meta layers, with trained-looking factors on ``device``."""
    with torch.device("meta"):
        modules = [ACLoRAModule(s.lora_name, meta_layer(s), rank, alpha=rank / 2) for s in shapes]
    gen = torch.Generator(device=device).manual_seed(seed)
    for m in modules:
        m.to_empty(device=device)
        m.alpha.fill_(rank / 2)
        fill_trained_looking(m, gen)
    return modules


@torch.no_grad()
def fill_trained_looking(m: ACLoRAModule, gen: torch.Generator) -> None:
    """lora_down: its kaiming-like init; lora_up: a rank-k signal with decaying strengths plus 10% noise."""
    rank, device = m.rank, m.lora_down.weight.device
    planted = int(torch.randint(2, max(3, rank // 4 + 1), (1,), generator=gen, device=device))
    m.lora_down.weight.normal_(0.0, m.down_matrix().shape[1] ** -0.5, generator=gen)
    left = torch.randn(m.out_dim, planted, generator=gen, device=device)
    right = torch.randn(planted, rank, generator=gen, device=device)
    strengths = torch.logspace(0, -1, planted, device=device)
    signal = (left * strengths) @ right / math.sqrt(planted * rank)
    noise = torch.randn(m.out_dim, rank, generator=gen, device=device) * (0.1 * float(signal.std()))
    m.lora_up.weight.copy_((signal + noise).reshape(m.lora_up.weight.shape) * 1e-2)


class Snapshot:
    """The factors as built, put back before every timed call (RESTART changes them in place)."""

    def __init__(self, modules: Sequence[ACLoRAModule]) -> None:
        self.modules = modules
        self.saved = [(m.lora_down.weight.detach().clone(), m.lora_up.weight.detach().clone()) for m in modules]

    @torch.no_grad()
    def restore(self) -> None:
        for m, (down, up) in zip(self.modules, self.saved):
            m.lora_down.weight.copy_(down)
            m.lora_up.weight.copy_(up)


def factor_bytes(modules: Sequence[ACLoRAModule]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in (m.lora_down.weight, m.lora_up.weight))


# --- what is timed -----------------------------------------------------------------------------------------
def our_restart(modules: Sequence[ACLoRAModule], mode: str) -> list[int]:
    """A RESTART as training runs it: paper mode at p = P, product mode at the default importance level
    (no held-out loss; the modules carry no recorded inputs, so importances are singular values)."""
    if mode == "paper":
        ranks, _ = restart_modules(modules, p=P, energy="squared", min_rank=1, seed=0)
        return ranks
    level = -math.log10(ACLoRAConfig().min_importance)
    new, _ = restart_product(modules, {}, lambda spectra: keeps_at_level(spectra, level, 1), seed=0)
    return [new.get(i, m.rank) for i, m in enumerate(modules)]


@torch.no_grad()
def per_factor_svd_loop(modules: Sequence[ACLoRAModule]) -> None:
    """The decomposition a naive per-factor implementation starts with, module by module."""
    for m in modules:
        torch.linalg.svd(m.down_matrix().detach(), full_matrices=False)
        torch.linalg.svd(m.up_matrix().detach(), full_matrices=False)


@torch.no_grad()
def naive_restart_loop(modules: Sequence[ACLoRAModule], gen: torch.Generator) -> None:
    """Algorithm 1 of the paper written module by module: SVD each factor, keep the larger
    signal count of the two, truncate, refill with N(0, sigma^2) of the residual, write back."""
    for m in modules:
        factors = (m.down_matrix().detach(), m.up_matrix().detach())
        svds = [torch.linalg.svd(f, full_matrices=False) for f in factors]
        k = max(int(F.signal_rank(s[None], P)[0]) for _, s, _ in svds)
        for f, (u, s, vh) in zip(factors, svds):
            kept = (u[:, :k] * s[:k]) @ vh[:k]
            sigma = (f - kept).std()
            f.copy_(kept + torch.randn(f.shape, generator=gen, device=f.device) * sigma)


@torch.no_grad()
def full_update_svd(m: ACLoRAModule) -> None:
    """What kohya's resize_lora does per module: form the out x in update, decompose it."""
    torch.linalg.svd(m.up_matrix().detach() @ m.down_matrix().detach(), full_matrices=False)


def full_update_svd_extrapolated(modules: Sequence[ACLoRAModule], samples: int, device: torch.device) -> tuple[common.Timing, list[dict]]:
    """Time ``samples`` modules of every distinct shape; the total is sum(count x median time per shape)."""
    by_shape: dict[tuple, list[ACLoRAModule]] = {}
    for m in modules:
        by_shape.setdefault((m.out_dim, m.down_matrix().shape[1]), []).append(m)
    total_wall = total_cpu = 0.0
    detail = []
    sampled = 0
    for (out_dim, in_dim), members in sorted(by_shape.items(), key=lambda kv: -len(kv[1])):
        picks = members[:samples]
        timing = common.Timing()
        for m in picks:
            timing.add(*common.timed_once(lambda: full_update_svd(m), None, device))
        sampled += len(picks)
        total_wall += timing.median * len(members)
        total_cpu += timing.cpu_median * len(members)
        detail.append({"shape": f"{out_dim}x{in_dim}", "modules": len(members), "sampled": len(picks),
                       "median_s": timing.median, "cpu_median_s": timing.cpu_median})
    result = common.Timing(extrapolated=sampled < len(modules))
    result.add(total_wall, total_cpu)
    return result, detail


def peak_memory(fn, snapshot: Snapshot, device: torch.device) -> float:
    """Peak memory growth (MiB) of one call, after putting the factors back."""
    snapshot.restore()
    common.release_memory()
    with common.PeakMemory(device) as mem:
        fn()
    return mem.peak_mb


# --- one rank -----------------------------------------------------------------------------------------------
def measure_rank(shapes: Sequence[ModuleShape], rank: int, device: torch.device, rounds: int, warmup: int,
                 full_svd_samples: int, basis: str) -> dict:
    modules = build_modules(shapes, rank, device)
    snapshot = Snapshot(modules)
    gen = torch.Generator(device=device).manual_seed(1)
    ranks = our_restart(modules, "product")  # signal ranks for the export, as after a RESTART
    snapshot.restore()
    cases = {
        "RESTART, paper mode (ours)": common.Case(lambda: our_restart(modules, "paper"), snapshot.restore),
        "RESTART, product mode (ours)": common.Case(lambda: our_restart(modules, "product"), snapshot.restore),
        "export to signal ranks (ours)": common.Case(lambda: export_modules(modules, ranks), snapshot.restore),
        "per-factor SVD loop": common.Case(lambda: per_factor_svd_loop(modules), snapshot.restore),
        "naive per-module RESTART loop": common.Case(lambda: naive_restart_loop(modules, gen), snapshot.restore),
    }
    timings = common.interleaved(cases, rounds=rounds, warmup=warmup, device=device)
    full, full_detail = full_update_svd_extrapolated(modules, full_svd_samples, device)
    timings["full update SVD (resize_lora)"] = full
    memory = {
        "RESTART, paper mode (ours)": peak_memory(lambda: our_restart(modules, "paper"), snapshot, device),
        "RESTART, product mode (ours)": peak_memory(lambda: our_restart(modules, "product"), snapshot, device),
        "export to signal ranks (ours)": peak_memory(lambda: export_modules(modules, ranks), snapshot, device),
    }
    rows = []
    for name, t in timings.items():
        rows.append({"rank": rank, "what": name, "seconds": t.median, "cpu_seconds": t.cpu_median,
                     "extrapolated": "yes" if t.extrapolated else "", "peak_mb": memory.get(name),
                     "timing": t.as_dict()})
    loop = timings["per-factor SVD loop"].stat(basis)
    naive = timings["naive per-module RESTART loop"].stat(basis)
    full_s = full.stat(basis)
    for row in rows:
        own = timings[row["what"]].stat(basis)
        row["loop_x"] = common.ratio(loop, own)
        row["naive_x"] = common.ratio(naive, own)
        row["full_svd_x"] = common.ratio(full_s, own)
    ranks_sorted = sorted(ranks)
    info = {"rank": rank, "modules": len(modules), "factor_mb": factor_bytes(modules) / 2**20,
            "product_mode_signal_ranks": {"min": ranks_sorted[0], "median": ranks_sorted[len(ranks_sorted) // 2],
                                          "max": ranks_sorted[-1]},
            "full_svd_sample": full_detail}
    del snapshot, modules
    common.release_memory()
    return {"rows": rows, "info": info}


def step_seconds_for_epoch(args, device: torch.device) -> tuple[float, str]:
    """The SDXL step time the epoch fraction is computed from, and where it came from."""
    if args.step_seconds:
        return args.step_seconds, "given with --step-seconds"
    measured = common.read_json("sdxl_24gb")
    if measured and measured.get("machine", {}).get("cuda_device") == common.machine_info(device).get("cuda_device"):
        step = measured.get("sdxl_step_seconds")
        if step:
            return float(step), "measured by bench/sdxl_24gb.py on this GPU"
    return ASSUMED_STEP_SECONDS, f"assumed ({ASSUMED_STEP_SECONDS:g} s per step; measure it with bench/sdxl_24gb.py)"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--ranks", default=None, help="comma-separated maximum ranks (quick: 32; full: 32,128)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (quick: 1; full: 3)")
    parser.add_argument("--full-svd-samples", type=int, default=None,
                        help="modules timed per distinct shape for the full-update SVD (quick: 1; full: 2)")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="SDXL training step time on this GPU, for the epoch fraction (CUDA only)")
    args = parser.parse_args(argv)
    device = common.setup(args)
    machine_before = common.machine_info(device)
    full = args.mode == "full"
    if args.smoke:
        shapes, default_ranks, rounds, warmup, samples = SMOKE_SHAPES, "4", 1, 0, 1
    else:
        from aclora_ext.harness.architectures import sdxl_module_shapes

        shapes = sdxl_module_shapes()
        default_ranks, rounds, warmup, samples = ("32,128", 3, 1, 2) if full else ("32", 1, 0, 1)
    ranks = [int(r) for r in (args.ranks or default_ranks).split(",")]
    rounds = args.rounds or rounds
    samples = args.full_svd_samples or samples
    basis = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    counts = Counter((s.out_features, s.in_features) for s in shapes)
    print(f"{len(shapes)} modules, {len(counts)} distinct shapes; ranks {ranks}; {rounds} round(s); device {device}; "
          f"ratios from {'CPU time (1 thread)' if basis == 'cpu' else 'wall time'}", flush=True)

    rows, infos = [], []
    for rank in ranks:
        result = measure_rank(shapes, rank, device, rounds, warmup, samples, basis)
        rows += result["rows"]
        infos.append(result["info"])
        print(f"R={rank}: done", flush=True)

    epoch = None
    if device.type == "cuda":
        step, source = step_seconds_for_epoch(args, device)
        epoch_seconds = EPOCH_IMAGES * step
        epoch = {"step_seconds": step, "step_source": source, "epoch_seconds": epoch_seconds, "fractions": []}
        for row in rows:
            if row["what"].startswith("RESTART"):
                fraction = row["seconds"] / epoch_seconds
                row["epoch_fraction"] = fraction
                epoch["fractions"].append({"rank": row["rank"], "what": row["what"], "fraction": fraction,
                                           "target_met": fraction < TARGET_EPOCH_FRACTION})

    machine = common.machine_info(device)
    module_set = "smoke shapes" if args.smoke else "SDXL module set"
    title = f"RESTART and export cost, {module_set} ({len(shapes)} modules) — {common.describe_machine(machine)}"
    columns = ["rank", "what", "seconds", "cpu_seconds", "extrapolated", "loop_x", "naive_x", "full_svd_x", "peak_mb"]
    headers = ["R", "what", "wall s (median)", "CPU s (median)", "extrapolated", "per-factor SVD loop / this",
               "naive RESTART loop / this", "full-update SVD / this", "peak memory growth MiB"]
    if epoch:
        columns.append("epoch_fraction")
        headers.append(f"share of a {EPOCH_IMAGES}-image epoch")
    common.print_table(title, rows, columns, headers)

    targets = []
    for row in rows:
        if row["what"].startswith("RESTART"):
            targets.append({"rank": row["rank"], "what": row["what"],
                            "vs per-factor SVD loop": f"{common.fmt(row['loop_x'])}x (target >= {TARGET_LOOP_RATIO:g}x: "
                                                      f"{common.verdict(row['loop_x'] >= TARGET_LOOP_RATIO)})",
                            "vs full-update SVD": f"{common.fmt(row['full_svd_x'])}x (target >= {TARGET_FULL_SVD_RATIO:g}x: "
                                                  f"{common.verdict(row['full_svd_x'] >= TARGET_FULL_SVD_RATIO)})"})
    common.print_table("Targets", targets, ["rank", "what", "vs per-factor SVD loop", "vs full-update SVD"])
    if epoch:
        print(f"Epoch = {EPOCH_IMAGES} steps x {epoch['step_seconds']:.3g} s ({epoch['step_source']}); "
              f"target: a RESTART < {TARGET_EPOCH_FRACTION:.0%} of it.")
    if device.type == "cpu":
        print("Memory on the CPU: growth of the sampled process RSS during one call (a lower bound: spikes "
              "shorter than the sampling interval are missed). Export's figure includes the returned tensors.")
    notes = ("Times of one whole pass over every module. 'extrapolated': the full-update SVD is timed on "
             f"{samples} module(s) of each distinct shape and scaled by the shape counts. kohya's resize_lora "
             "asks for full_matrices=True, slower than the thin SVD timed here.")
    print(notes)
    result = common.payload(NAME, args, device, rows=[{k: v for k, v in r.items()} for r in rows], ranks=infos,
                            p=P, ratio_basis=basis, epoch=epoch, targets=targets, notes=notes,
                            machine_before=machine_before)
    common.write_json(NAME, result, args.out)
    return result


if __name__ == "__main__":
    main()
