"""Speed of ``aclora resize`` next to kohya's resize_lora.py on the same SDXL LoRA (issue 10, speed part).

The file is an SDXL LoRA over kohya's full module set (986 modules: U-Net,
both text encoders, ``aclora_ext.harness.architectures.sdxl_module_shapes``) at R = 32 and
128, with trained-looking factors (lora_down a random init, lora_up a planted
low-rank signal with decaying strengths plus noise), alpha R/2. Timed on the
same in-memory float32 state dict, in one process:

- ours, ``resize_state_dict`` with the default criterion (importance 0.01);
- ours with resize_lora's ``sv_fro`` 0.9 and its cap (--new_rank R): the same
  rule as the script, so the ranks must come out identical (checked);
- resize_lora.py's own ``resize_lora_model`` (sd-scripts snapshot, its code
  run as it is; see :func:`resize_lora_functions`), ``sv_fro`` 0.9, cap R:
  merge, full SVD and re-split of every module;
- ours file to file (``resize_file``: read an fp16 file, resize, write with
  metadata and hashes), for the time a user waits.

resize_lora.py takes ~25 minutes per file on one CPU core, so ``--quick``
runs it on one module of every distinct shape (12) and extrapolates by the
shape counts (marked as such); ``--full`` runs it on every module.

``--model flux``: a FLUX.1 dev LoRA as sd-scripts' networks.lora_flux writes it
with --network_train_unet_only (304 modules: 19 double blocks x 10, 38 single
blocks x 3, ``harness.architectures.flux_module_shapes``; 8 distinct shapes up
to 21504 x 3072). resize_lora.py's full-matrices SVD of one such update takes
minutes on one core (a whole file would take hours), so it is always sampled
(one module per shape, ``--real-per-shape``) and extrapolated. ``--model sd35``:
SD3.5 medium's 263 DiT modules likewise.

    .venv/bin/python bench/resize_speed.py --quick --threads 1   # R=32, the script sampled (~2 minutes)
    .venv/bin/python bench/resize_speed.py --full --threads 1    # R=32 and 128, the whole file (~1 hour of CPU)
    .venv/bin/python bench/resize_speed.py --model flux --threads 1 --ranks 32,128   # FLUX.1 dev (~40 minutes)
    .venv/bin/python bench/resize_speed.py --full --device cuda

Target: ours >= 100x faster than resize_lora.py on the CPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ast
import functools
import logging
import math
import os
import tempfile
import types
from typing import Optional, Sequence

import torch

from aclora_ext import functional as F
from aclora_ext.tools.resize import resize_file, resize_state_dict
from aclora_ext.harness.architectures import ModuleShape
from bench import common

NAME = "resize_speed"
MODELS = {"sdxl": "SDXL module set", "flux": "FLUX.1 dev DiT module set", "sd35": "SD3.5 medium DiT module set"}
METHOD, PARAM = "sv_fro", 0.9  # the resize_lora method both tools run
TARGET_RATIO = 100.0
# sd-scripts beside the repository (CI lays a snapshot there), or wherever ACLORA_SD_SCRIPTS points
SD_SCRIPTS = Path(os.environ.get("ACLORA_SD_SCRIPTS") or common.REPO_ROOT.parent / "shared" / "sd-scripts").resolve()
RESIZE_LORA = SD_SCRIPTS / "networks" / "resize_lora.py"
# the script's functions that read, write or parse files (they need sd-scripts' library package)
_FILE_FUNCTIONS = {"load_state_dict", "save_to_file", "resize", "setup_parser"}

SMOKE_SHAPES = [
    ModuleShape("lora_unet_smoke_attn1_to_q", 64, 64, ()),
    ModuleShape("lora_unet_smoke_ff_net_0_proj", 256, 64, ()),
    ModuleShape("lora_unet_smoke_proj_in", 64, 64, (1, 1)),
    ModuleShape("lora_te1_smoke_mlp_fc1", 128, 32, ()),
]


# --- kohya's resize_lora.py ------------------------------------------------------------------------
def resize_lora_functions(path: Path = RESIZE_LORA) -> types.SimpleNamespace:
    """The functions of sd-scripts' networks/resize_lora.py, executed from the script's own source.

    Importing the script imports sd-scripts' ``library`` package (train_util and
    with it torchvision, opencv, ...), which only its file reading, writing and
    argument parsing use. Its rank and resize code (``index_sv_*``,
    ``rank_resize``, ``extract_*``, ``merge_*``, ``resize_lora_model`` and its
    constants) needs only torch, numpy and tqdm, so those definitions are
    compiled from the script as they are, under the script's file name, and run
    in a namespace with those modules (tqdm silenced). FileNotFoundError when
    the script is not there.
    """
    import numpy
    from tqdm import tqdm

    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    kept = [node for node in tree.body
            if (isinstance(node, ast.FunctionDef) and node.name not in _FILE_FUNCTIONS)
            or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets))]
    namespace = {"torch": torch, "np": numpy, "tqdm": functools.partial(tqdm, disable=True), "logging": logging,
                 "__name__": "resize_lora", "__file__": str(path)}
    exec(compile(ast.Module(body=kept, type_ignores=[]), str(path), "exec"), namespace)
    missing = {"index_sv_cumulative", "index_sv_fro", "index_sv_ratio", "rank_resize", "resize_lora_model",
               "MIN_SV"} - namespace.keys()
    if missing:
        raise RuntimeError(f"{path}: no {', '.join(sorted(missing))}: not the resize_lora.py this project knows")
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if not k.startswith("__")})


def resize_lora_ranks(state_dict: dict[str, torch.Tensor], rank: int, conv_rank: int, method: Optional[str],
                      param: Optional[float], functions: Optional[types.SimpleNamespace] = None,
                      device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """resize_lora_model on a float32 copy of ``state_dict`` (as the script loads it): (its state dict, its ranks)."""
    functions = functions or resize_lora_functions()
    lora_sd = {k: v.float() for k, v in state_dict.items()}
    resized, _, _ = functions.resize_lora_model(lora_sd, rank, conv_rank, torch.float32, device, method, param, False)
    ranks = {k.rsplit(".", 2)[0]: int(v.shape[0]) for k, v in resized.items() if k.endswith(".lora_down.weight")}
    return resized, ranks


# --- the file ------------------------------------------------------------------------------------------
def sdxl_lora(shapes: Sequence[ModuleShape], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya state dict (float32) with trained-looking factors: lora_down a random init; lora_up a
    planted rank 2..R/4 signal with strengths decaying over a decade, plus 10% noise; alpha R/2."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for shape in shapes:
        fan_in = shape.in_features * math.prod(shape.kernel_size or (1,))
        planted = int(torch.randint(2, max(3, rank // 4 + 1), (1,), generator=gen))
        down = torch.randn(rank, fan_in, generator=gen) * fan_in ** -0.5
        strengths = torch.logspace(0, -1, planted)
        signal = (torch.randn(shape.out_features, planted, generator=gen) * strengths) @ \
            torch.randn(planted, rank, generator=gen) / math.sqrt(planted * rank)
        up = (signal + torch.randn(shape.out_features, rank, generator=gen) * 0.1 * float(signal.std())) * 1e-2
        tail = tuple(shape.kernel_size)
        tensors[f"{shape.lora_name}.lora_down.weight"] = down.reshape((rank, shape.in_features) + tail)
        tensors[f"{shape.lora_name}.lora_up.weight"] = up.reshape((shape.out_features, rank) + (1,) * len(tail))
        tensors[f"{shape.lora_name}.alpha"] = torch.tensor(rank / 2)
    return tensors


def sample_modules(state_dict: dict[str, torch.Tensor], per_shape: Optional[int]) -> tuple[dict, dict[str, int]]:
    """The state dict of ``per_shape`` modules of each distinct factor shape (all when None), and how many
    modules of the whole file each sampled module stands for."""
    by_shape: dict[tuple, list[str]] = {}
    for key, value in state_dict.items():
        if key.endswith(".lora_down.weight"):
            name = key.rsplit(".", 2)[0]
            by_shape.setdefault((tuple(value.shape), tuple(state_dict[f"{name}.lora_up.weight"].shape)), []).append(name)
    picked, weight = [], {}
    for names in by_shape.values():
        chosen = names if per_shape is None else names[:per_shape]
        picked += chosen
        weight.update({n: len(names) / len(chosen) for n in chosen})
    keep = set(picked)
    return {k: v for k, v in state_dict.items() if k.rsplit(".", 2)[0] in keep}, weight


# --- one rank ------------------------------------------------------------------------------------------------
def measure_rank(shapes: Sequence[ModuleShape], rank: int, device: torch.device, rounds: int,
                 real_per_shape: Optional[int], basis: str, functions: Optional[types.SimpleNamespace]) -> dict:
    state_dict = sdxl_lora(shapes, rank)
    dev = str(device)
    ours = {
        "aclora resize, importance 0.01 (ours)": lambda: resize_state_dict(state_dict, "importance", device=dev),
        f"aclora resize, {METHOD} {PARAM} (ours)": lambda: resize_state_dict(state_dict, METHOD, param=PARAM,
                                                                             max_rank=rank, device=dev),
    }
    timings = common.interleaved({name: common.Case(fn) for name, fn in ours.items()}, rounds=rounds, warmup=1,
                                 device=device)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        source, target = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({k: v.half() for k, v in state_dict.items()}, source, {"ss_network_dim": str(rank)})
        file_timing = common.time_call(lambda: resize_file(source, target, device=dev, progress=False),
                                       repeats=rounds, warmup=1, device=device)
        file_mb = os.path.getsize(source) / 2**20
    timings["aclora resize IN OUT, importance, fp16 file to file (ours)"] = file_timing
    ours_fro = resize_state_dict(state_dict, METHOD, param=PARAM, max_rank=rank, device=dev)
    default = resize_state_dict(state_dict, "importance", device=dev)

    real = None
    if functions is not None:
        sample, weight = sample_modules(state_dict, real_per_shape)
        timing = common.Timing(extrapolated=real_per_shape is not None)
        theirs: dict[str, int] = {}
        # the script is timed module by module inside one call; the whole-file figure is its per-module
        # time scaled by how many modules of that shape the file has
        per_module: dict[str, tuple[float, float]] = {}
        for name in weight:
            one = {k: v for k, v in sample.items() if k.rsplit(".", 2)[0] == name}
            wall, cpu = common.timed_once(lambda: theirs.update(resize_lora_ranks(one, rank, rank, METHOD, PARAM,
                                                                                 functions, dev)[1]), None, device)
            per_module[name] = (wall, cpu)
        timing.add(sum(w * weight[n] for n, (w, _) in per_module.items()),
                   sum(c * weight[n] for n, (_, c) in per_module.items()))
        timings[f"resize_lora.py, {METHOD} {PARAM}"] = timing
        same = sum(theirs[n] == ours_fro.ranks[n] for n in theirs)
        real = {"modules_run": len(theirs), "same_ranks": same, "per_shape": real_per_shape,
                "differences": {n: [theirs[n], ours_fro.ranks[n]] for n in theirs if theirs[n] != ours_fro.ranks[n]}}

    reference = timings.get(f"resize_lora.py, {METHOD} {PARAM}")
    rows = []
    for name, t in timings.items():
        row = {"rank": rank, "what": name, "seconds": t.median, "cpu_seconds": t.cpu_median,
               "extrapolated": "yes" if t.extrapolated else "", "timing": t.as_dict()}
        row["speedup"] = common.ratio(reference.stat(basis), t.stat(basis)) if reference else float("nan")
        rows.append(row)
    info = {"rank": rank, "modules": len(shapes), "file_mb_fp16": file_mb,
            "importance_ranks": _stats(default.ranks.values()), f"{METHOD}_ranks": _stats(ours_fro.ranks.values()),
            "importance_error_mean": sum(default.errors.values()) / len(default.errors), "resize_lora": real}
    return {"rows": rows, "info": info}


def _stats(values) -> dict:
    values = sorted(values)
    return {"min": values[0], "median": F.median(values), "max": values[-1]}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--ranks", default=None, help="comma-separated ranks of the file (quick: 32; full: 32,128)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of ours (quick: 1; full: 3)")
    parser.add_argument("--real-per-shape", type=int, default=None,
                        help="run resize_lora.py on this many modules of each distinct shape and extrapolate "
                             "(quick: 1; full: every module, 0 = every module)")
    parser.add_argument("--model", choices=tuple(MODELS), default="sdxl",
                        help="the LoRA file's module set: sdxl (986 modules, default), flux (FLUX.1 dev, 304 DiT "
                             "modules), sd35 (SD3.5 medium, 263 DiT modules); flux and sd35 always sample "
                             "resize_lora.py (one module per shape unless --real-per-shape says otherwise)")
    args = parser.parse_args(argv)
    device = common.setup(args)
    full = args.mode == "full"
    if args.smoke:
        shapes, default_ranks, rounds, per_shape = SMOKE_SHAPES, "8", 1, 0
    else:
        from aclora_ext.harness import architectures

        shapes = {"sdxl": architectures.sdxl_module_shapes, "flux": lambda: architectures.flux_module_shapes(False),
                  "sd35": lambda: architectures.sd3_module_shapes(False)}[args.model]()
        default_ranks, rounds, per_shape = ("32,128", 3, 0) if full else ("32", 1, 1)
        if args.model != "sdxl":  # a whole DiT file through resize_lora.py takes hours: sampled
            per_shape = 1
    ranks = [int(r) for r in (args.ranks or default_ranks).split(",")]
    rounds = args.rounds or rounds
    per_shape = args.real_per_shape if args.real_per_shape is not None else per_shape
    per_shape = per_shape or None  # 0: every module
    basis = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    try:
        functions = resize_lora_functions()
        script = str(RESIZE_LORA)
    except FileNotFoundError:
        functions, script = None, None
        print(f"resize_lora.py not found at {RESIZE_LORA} (set ACLORA_SD_SCRIPTS): timing ours only", flush=True)
    counts = Counter((s.out_features, s.in_features, s.kernel_size) for s in shapes)
    print(f"{len(shapes)} modules, {len(counts)} distinct shapes; ranks {ranks}; device {device}; resize_lora.py on "
          f"{'every module' if per_shape is None else f'{per_shape} module(s) per shape, extrapolated'}; ratios from "
          f"{'CPU time (1 thread)' if basis == 'cpu' else 'wall time'}", flush=True)

    rows, infos = [], []
    for rank in ranks:
        result = measure_rank(shapes, rank, device, rounds, per_shape, basis, functions)
        rows += result["rows"]
        infos.append(result["info"])
        common.release_memory()
        print(f"R={rank}: done", flush=True)

    machine = common.machine_info(device)
    module_set = "smoke shapes" if args.smoke else MODELS[args.model]
    title = f"aclora resize vs resize_lora.py, {module_set} ({len(shapes)} modules) — {common.describe_machine(machine)}"
    common.print_table(title, rows, ["rank", "what", "seconds", "cpu_seconds", "extrapolated", "speedup"],
                       ["R", "what", "wall s (median)", "CPU s (median)", "extrapolated", "resize_lora.py / this"])
    checks = []
    for info in infos:
        real = info["resize_lora"]
        checks.append({"rank": info["rank"], "importance ranks": "{min}/{median:g}/{max}".format(**info["importance_ranks"]),
                       f"{METHOD} ranks (ours)": "{min}/{median:g}/{max}".format(**info[f"{METHOD}_ranks"]),
                       "same ranks as resize_lora.py": f"{real['same_ranks']}/{real['modules_run']}" if real else "n/a"})
    common.print_table("Ranks", checks, list(checks[0]))
    targets = [{"rank": row["rank"], "what": row["what"],
                "vs resize_lora.py": f"{common.fmt(row['speedup'])}x (target >= {TARGET_RATIO:g}x: "
                                     f"{common.verdict(row['speedup'] >= TARGET_RATIO)})"}
               for row in rows if "(ours)" in row["what"] and row["speedup"] == row["speedup"]]
    if targets:
        common.print_table("Targets", targets, ["rank", "what", "vs resize_lora.py"])
    notes = ("Both tools resize the same float32 state dict in memory; resize_lora.py runs its own resize_lora_model "
             "(merge, full SVD, re-split per module). 'extrapolated': resize_lora.py timed on a sample of modules of "
             "each distinct shape, scaled by the shape counts. The file-to-file row reads an fp16 safetensors file "
             "and writes the resized one (metadata, hashes, atomic write).")
    print(notes)
    result = common.payload(NAME, args, device, rows=rows, ranks=infos, ratio_basis=basis, method=METHOD,
                            param=PARAM, resize_lora_script=script, targets=targets, notes=notes,
                            model=None if args.smoke else args.model, module_set=module_set)
    name = NAME if args.smoke or args.model == "sdxl" else f"{NAME}_{args.model}"
    common.write_json(name, result, args.out)
    return result


if __name__ == "__main__":
    main()
