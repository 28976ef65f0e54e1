"""Shared helpers of every bench script: arguments, timing, memory, machine description, tables, JSON.

A bench script is run from the repository root, either way::

    .venv/bin/python bench/<name>.py --quick
    .venv/bin/python -m bench.<name> --full --device cuda

and each one prints markdown tables and writes ``bench/results/<name>.json``
(the payload always carries :func:`machine_info`, the mode and the arguments,
so a number can be traced back to the machine it came from).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# --- arguments --------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """The common command line: ``--quick`` (default) or ``--full``, ``--device``, ``--out``."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes / samples, a minute or two on a 2-core CPU (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the sizes quoted in the README")
    p.set_defaults(mode="quick")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice). On a machine shared with other jobs, "
                        "--threads 1 gives stable CPU-time ratios")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one repeat: checks that the script runs (used by the test suite)")
    p.add_argument("--out", default=None,
                   help="JSON file to write (default bench/results/<name>.json; 'none' to skip)")
    return p


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``, with a clear error when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available on this machine")
    return device


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and return the device of ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


# --- timing ---------------------------------------------------------------------------------------
def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels so that wall-clock times mean something on an accelerator."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock and process CPU seconds of repeated calls (warm-up calls excluded).

    With one torch thread, CPU time is what the call costs on an idle core,
    whatever else the machine runs; wall time is what a user waits.
    """

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    extrapolated: bool = False  # True when the figure is scaled up from a sample

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")

    def stat(self, basis: str) -> float:
        """The figure ratios are computed from: ``"cpu"`` (median CPU time) or ``"wall"`` (median wall time)."""
        return self.cpu_median if basis == "cpu" else self.median

    def add(self, wall: float, cpu: float) -> None:
        self.seconds.append(wall)
        self.cpu_seconds.append(cpu)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.best, "max_s": max(self.seconds),
                "cpu_median_s": self.cpu_median, "repeats": len(self.seconds), "all_s": self.seconds,
                "all_cpu_s": self.cpu_seconds, "extrapolated": self.extrapolated}


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: Any = None,
              setup: Optional[Callable[[], Any]] = None) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls.

    ``setup`` (untimed) runs before every call, e.g. to restore weights that
    ``fn`` changes in place. On CUDA the device is synchronised around each call.
    """
    timing = Timing()
    for i in range(warmup + repeats):
        wall, cpu = timed_once(fn, setup, device)
        if i >= warmup:
            timing.add(wall, cpu)
    return timing


def timed_once(fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None,
               device: Any = None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one ``fn()``; ``setup()`` runs first, untimed."""
    if setup is not None:
        setup()
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


@dataclass
class Case:
    """One timed variant of an interleaved comparison: the call, and an untimed set-up before it."""

    fn: Callable[[], Any]
    setup: Optional[Callable[[], Any]] = None


def interleaved(cases: dict[str, Case], *, rounds: int = 3, warmup: int = 1, device: Any = None) -> dict[str, Timing]:
    """Time several variants round-robin (A B C A B C ...), so that a burst of load
    elsewhere on the machine hits every variant alike. ``warmup`` untimed rounds first."""
    timings = {name: Timing() for name in cases}
    for r in range(warmup + rounds):
        for name, case in cases.items():
            wall, cpu = timed_once(case.fn, case.setup, device)
            if r >= warmup:
                timings[name].add(wall, cpu)
    return timings


# --- memory -------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc), so RSS growth is measurable."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory growth over a block: CUDA allocator statistics, or sampled RSS on the CPU.

    On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry
    (``reset_peak_memory_stats`` first). On the CPU, torch allocations are
    invisible to tracemalloc, so a background thread samples the process RSS
    every ``interval`` seconds; very short-lived spikes between samples can be
    missed, which makes the CPU figure a lower bound.
    """

    def __init__(self, device: Any = "cpu", interval: float = 0.0005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = rss_bytes()
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, rss_bytes())
            self.peak_bytes = self._max - self._base

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


# --- machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Any = "cpu") -> dict:
    """What the numbers were measured on: CPU, cores, threads, memory, versions, CUDA device."""
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    for package in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        dev = torch.device(device)
        index = (dev.index or 0) if dev.type == "cuda" else 0
        props = torch.cuda.get_device_properties(index)
        info["cuda_device"] = props.name
        info["cuda_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
    return info


def describe_machine(info: dict) -> str:
    """One line for the table caption."""
    text = f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads), torch {info['torch']}"
    if info.get("cuda_device") and str(info.get("device", "")).startswith("cuda"):
        text += f", {info['cuda_device']} ({info['cuda_memory_gb']} GB)"
    return text


# --- output --------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits, everything else as str."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts) over ``columns``."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str],
                headers: Optional[Sequence[str]] = None) -> str:
    text = f"\n### {title}\n\n{markdown_table(rows, columns, headers)}\n"
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict, out: Optional[str] = None) -> Optional[Path]:
    """Write ``payload`` to ``out`` or ``bench/results/<name>.json``; ``out='none'`` writes nothing."""
    if out is not None and out.lower() == "none":
        return None
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)
    return path


def read_json(name: str) -> Optional[dict]:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def payload(name: str, args: argparse.Namespace, device: Any, **results: Any) -> dict:
    """The JSON envelope every script writes."""
    return {"benchmark": name, "mode": args.mode, "args": vars(args), "machine": machine_info(device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **results}


# --- subprocesses -------------------------------------------------------------------------------------------
#: glibc settings under which RSS follows the live tensors: every allocation of 64 KiB or
#: more gets its own mapping, returned to the OS when freed (slower: for memory passes only)
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def run_module_json(module: str, arguments: Iterable[str], timeout: Optional[float] = None,
                    env_overrides: Optional[dict[str, str]] = None) -> dict:
    """Run ``python -m <module> <arguments>`` from the repo root and parse the JSON on its last stdout line.

    Used to measure each variant in a fresh process (peak RSS is per process,
    and class-level patches such as the backward capture stay out of the others).
    """
    env = dict(os.environ)
    env.update(env_overrides or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(arguments)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{module} printed no JSON result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def paired_ratio_ci(values: Sequence[float], reference: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """The geometric-mean ratio of paired values (``values[i]`` and ``reference[i]`` from the same seed) and
    its percentile bootstrap confidence interval over the pairs: the seeds are resampled with replacement,
    the same resample for both recipes (so the pairing is kept), ``resamples`` times from a fixed RNG seed.

    Returns ``{"ratio", "low", "high", "seeds", "resamples", "level"}``. A reference chosen from the data
    (e.g. the best fixed rank) is held fixed inside the bootstrap: choose it before calling this."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired_ratio_ci: values ({len(values)}) and reference ({len(reference)}) must be "
                         "paired, one of each per seed, at least one pair")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"paired_ratio_ci: resamples={resamples}, level={level}; allowed: resamples >= 1, "
                         "0 < level < 1")
    for name, seq in (("values", values), ("reference", reference)):
        bad = [v for v in seq if not (v > 0 and math.isfinite(v))]
        if bad:
            raise ValueError(f"paired_ratio_ci: {name} has {bad[0]!r}; allowed: finite values > 0 (a ratio of "
                             "geometric means)")
    logs = torch.tensor([math.log(a / b) for a, b in zip(values, reference)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = logs[torch.randint(0, len(logs), (resamples, len(logs)), generator=g)].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"ratio": math.exp(float(logs.mean())), "low": math.exp(low), "high": math.exp(high),
            "seeds": len(logs), "resamples": resamples, "level": level}
