"""Run sd-scripts' FLUX.1 and SD3 LoRA trainers on this CPU, offline, and report what each run cost.

Not a pytest test: a driver to re-run by hand (minutes, GBs). It builds the fixtures of
``tests/flux_sd3_fixtures.py`` once into ``--cache`` and runs, for each family, 2 training steps with
sd-scripts' own network modules (or ``--flux-module`` / ``--sd3-module``):

  default          the options of flux_sd3_fixtures.COMMON_ARGS
  weights          --network_weights of the default run's file
  validation       --validation_split 0.5 (one image held out; 2 epochs of 1 step, validated after each)
  gradckpt         --gradient_checkpointing
  fp8              --mixed_precision bf16 --fp8_base
  swap             --blocks_to_swap 1 on the small model (expected to stop: too few blocks)
  swap-big         --blocks_to_swap 1 on a model with enough blocks (FLUX.1: 2 double + 4 single, a 2.6 GB
                   file and ~6 GB of memory: only with --with-big-swap; SD3: depth 3)
and, for FLUX.1, networks/flux_merge_lora.py merging the default run's file into the checkpoint, checked
against base + (alpha / rank) up @ down. Also an in-process check of what block swap does to the blocks'
weights on a CPU (tests/flux_sd3_tasks.py block-swap-check).

Run it with the Python of sd-scripts' pinned stack, from anywhere:
  OMP_NUM_THREADS=1 /work/main/.venv-ci-pinned/bin/python tests/run_flux_sd3_smoke.py --cache /work/cache16/flux-sd3

It prints one line per run and writes everything (logs, outputs, summary.json) under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flux_sd3_fixtures as fx  # noqa: E402
import sd_scripts_fixtures as e2e  # noqa: E402

METADATA_KEYS = ("ss_network_module", "ss_base_model_version", "modelspec.architecture", "modelspec.implementation",
                 "ss_num_validation_images", "ss_fp8_base", "ss_mixed_precision")


def last_error(output: str) -> str:
    lines = [line for line in output.splitlines() if re.search(r"(Error|error|assert)", line)]
    return lines[-1].strip()[:300] if lines else output.strip().splitlines()[-1][:300]


def summarise(name: str, run: fx.TimedRun, out_dir: Path, lora_name: str) -> dict:
    row = {"run": name, "exit": run.result.returncode, "wall_s": round(run.wall_s, 1),
           "step_s": [round(s, 3) for s in run.step_times()], "peak_rss_mb": round(run.peak_rss_mb),
           "validation_s": round(run.phase_seconds("epoch validation steps") + run.phase_seconds("validation steps"),
                                 1),
           "output_disk_mb": round(fx.disk_usage(out_dir) / 2**20, 1) if out_dir.exists() else 0,
           "command": " ".join(run.result.command)}
    lora_path = out_dir / f"{lora_name}.safetensors"
    if run.result.returncode == 0 and lora_path.exists():
        lora = e2e.LoRAFile.read(lora_path)
        row["modules"] = len(lora.modules)
        row["ranks"] = sorted(set(lora.ranks().values()))
        row["metadata"] = {k: lora.metadata.get(k) for k in METADATA_KEYS}
    elif run.result.returncode != 0:
        row["error"] = last_error(run.result.output)
    loaded = re.search(r"load network weights from \S+: (.*)", run.result.output)
    if loaded:
        row["load_weights"] = loaded[1][:200]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/work/cache16/flux-sd3"), help="fixture cache (reused)")
    parser.add_argument("--work", type=Path, default=None, help="logs and outputs (default: CACHE/runs-<time>)")
    parser.add_argument("--only", choices=("flux", "sd3"), default=None)
    parser.add_argument("--runs", default=None, help="comma-separated run names (default: all but swap-big for FLUX)")
    parser.add_argument("--with-big-swap", action="store_true", help="also FLUX.1 --blocks_to_swap on 2+4 blocks")
    parser.add_argument("--flux-module", default="networks.lora_flux")
    parser.add_argument("--sd3-module", default="networks.lora_sd3")
    parser.add_argument("--keep-big-files", action="store_true", help="keep the merged model and the 2+4 model")
    args = parser.parse_args()

    missing = e2e.missing_requirements()
    if missing:
        print("cannot run:", "; ".join(missing), file=sys.stderr)
        return 2
    work = args.work or args.cache / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    env = fx.environment(work)
    fixtures = fx.FluxSd3Fixtures(args.cache, env, work / "logs")
    wanted = set(args.runs.split(",")) if args.runs else None
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        shown = {k: v for k, v in row.items() if k != "command"}
        print(json.dumps(shown), flush=True)
        (work / "summary.json").write_text(json.dumps(rows, indent=1))

    def train(family: str, name: str, *extra: str, expect_ok: bool = True, **options) -> dict:
        out_dir = work / "out" / f"{family}-{name}"
        command_of = fixtures.flux_command if family == "flux" else fixtures.sd3_command
        module = args.flux_module if family == "flux" else args.sd3_module
        command = command_of(out_dir, f"{family}-{name}", "--max_train_steps", "2", *extra, network_module=module,
                             **options)
        run = fx.run_timed(command, env, work / "logs" / f"{family}-{name}.log")
        row = summarise(f"{family}-{name}", run, out_dir, f"{family}-{name}")
        row["expected"] = "success" if expect_ok else "failure"
        record(row)
        return row

    def selected(family: str, name: str) -> bool:
        if args.only and args.only != family:
            return False
        if wanted is not None:
            return name in wanted or f"{family}-{name}" in wanted
        return not (family == "flux" and name == "swap-big" and not args.with_big_swap)

    t0 = time.monotonic()
    print(f"fixtures: {fixtures.cache}; building what is missing", flush=True)
    if wanted is None or "block-swap-check" in wanted:
        check = e2e.run([sys.executable, str(fx.TASKS), "block-swap-check"], env,
                        work / "logs" / "block-swap-check.log")
        line = next((l for l in check.output.splitlines() if l.startswith("BLOCK-SWAP-CHECK ")), None)
        record({"run": "block-swap-check", "exit": check.returncode,
                "result": json.loads(line.split(" ", 1)[1]) if line else last_error(check.output)})

    for family in ("flux", "sd3"):
        if not any(selected(family, n) for n in ("default", "weights", "validation", "gradckpt", "fp8", "swap",
                                                 "swap-big", "merge")):
            continue
        default_file = work / "out" / f"{family}-default" / f"{family}-default.safetensors"
        if selected(family, "default") or (not default_file.exists() and (selected(family, "weights")
                                                                         or selected(family, "merge"))):
            train(family, "default")
        if selected(family, "weights"):
            train(family, "weights", "--network_weights", str(default_file))
        if selected(family, "validation"):
            train(family, "validation", "--validation_split", "0.5")
        if selected(family, "gradckpt"):
            train(family, "gradckpt", "--gradient_checkpointing")
        if selected(family, "fp8"):
            train(family, "fp8", "--fp8_base", mixed_precision="bf16", te_dtypes=fx.TE_FP8_BASE)
        if selected(family, "swap"):
            train(family, "swap", "--blocks_to_swap", "1", expect_ok=False)
        if selected(family, "swap-big"):
            big = fixtures.flux(double=2, single=4) if family == "flux" else fixtures.sd3(depth=3)
            train(family, "swap-big", "--blocks_to_swap", "1", model=big, expect_ok=family == "flux")
            if family == "flux" and not args.keep_big_files:
                big.unlink()
        if family == "flux" and selected(family, "merge"):
            merged = work / "out" / "flux-merged.safetensors"
            start = time.monotonic()
            merge = fx.run_timed([sys.executable, str(fx.SD_SCRIPTS / "networks" / "flux_merge_lora.py"),
                                  "--flux_model", str(fixtures.flux()), "--models", str(default_file),
                                  "--ratios", "1.0", "--save_to", str(merged), "--save_precision", "float"],
                                 env, work / "logs" / "flux-merge.log")
            row = {"run": "flux-merge", "exit": merge.result.returncode, "wall_s": round(merge.wall_s, 1),
                   "peak_rss_mb": round(merge.peak_rss_mb), "command": " ".join(merge.result.command)}
            if merge.result.returncode == 0:
                check = e2e.run([sys.executable, str(fx.TASKS), "flux-merge-check", str(fixtures.flux()),
                                 str(merged), str(default_file)], env, work / "logs" / "flux-merge-check.log")
                line = next((l for l in check.output.splitlines() if l.startswith("MERGE-CHECK ")), None)
                if line:
                    report = json.loads(line.split(" ", 1)[1])
                    row["max_relative_error"] = max(report["relative_error"].values())
                    row["modules_checked"] = len(report["relative_error"])
                    row["other_tensors_changed"] = report["other_tensors_changed"]
                else:
                    row["check_error"] = last_error(check.output)
                row["merged_file_mb"] = round(merged.stat().st_size / 2**20)
                if not args.keep_big_files:
                    merged.unlink()
            else:
                row["error"] = last_error(merge.result.output)
            row["seconds_with_check"] = round(time.monotonic() - start, 1)
            record(row)

    fixture_files = {p.name: {"size_mb": round(fx.apparent_size(p) / 2**20, 1),
                              "disk_mb": round(fx.disk_usage(p) / 2**20, 1)}
                     for p in sorted(fixtures.cache.iterdir())}
    record({"run": "fixtures", "cache": str(fixtures.cache), "files": fixture_files,
            "built_now_seconds": fixtures.build_seconds,
            "total_disk_mb": round(fx.disk_usage(fixtures.cache) / 2**20, 1),
            "total_wall_s": round(time.monotonic() - t0, 1)})
    unexpected = [r["run"] for r in rows if "expected" in r and (r["exit"] == 0) != (r["expected"] == "success")]
    if unexpected:
        print("unexpected outcome:", ", ".join(unexpected), file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
