"""Support for running sd-scripts' FLUX.1 and SD3 LoRA trainers (flux_train_network.py, sd3_train_network.py)
on a CPU, offline: the files they need, built once into a cache folder the caller gives, and their command lines.

The files come from ``tests/flux_sd3_tasks.py`` (subprocesses in sd-scripts' environment); see its
docstring for what each is and why it is small. What a run needs:

  * a FLUX.1 checkpoint of 1 double + 1 single block (sd-scripts fixes the width: 545 M parameters,
    1.1 GB in bfloat16), or an SD3 MMDiT of depth 2 (hidden 128, 1.9 M parameters, 7 MB);
  * a random-weight AE (FLUX.1's AutoEncoder; SD3's SDVAE has the same keys), 168 MB in bfloat16;
  * all-zero CLIP-L / CLIP-G / T5-XXL files (sparse: a few kB on disk each), in the dtype the run
    loads them in (``te_dtypes``): sd-scripts casts the text encoders to its weight dtype, and a cast
    reads every page (T5-XXL: 19.6 GB in float32);
  * pre-written text-encoder output caches, used through ``--cache_text_encoder_outputs_to_disk``, with
    ``--network_train_unet_only`` (otherwise CLIP-L would run);
  * tokenizers in ``--tokenizer_cache_dir`` (CLIP-L, CLIP-G, and a T5TokenizerFast built offline).

``run_timed`` runs a command and reports its wall time, peak RSS and per-step times (from sd-scripts'
own progress bars). ``tests/run_flux_sd3_smoke.py`` uses all of this to run both trainers.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import sd_scripts_fixtures as e2e

TESTS = Path(__file__).resolve().parent
TASKS = TESTS / "flux_sd3_tasks.py"
SD_SCRIPTS = e2e.SD_SCRIPTS

T5_TOKENS = 16  # --t5xxl_max_token_length, and the length of the cached T5 outputs
MAX_RANK, ALPHA = 4, 2
TIMEOUT = 1800

# dtypes of the text-encoder files per run: the weight dtype the run loads them in, so that nothing casts them
# (--mixed_precision no: float32; bf16 with --fp8_base: CLIP in bfloat16, T5 kept as stored, fp8 preferred)
TE_FLOAT32 = {"clip_l": "float32", "clip_g": "float32", "t5xxl": "float32"}
TE_FP8_BASE = {"clip_l": "bfloat16", "clip_g": "bfloat16", "t5xxl": "float8_e4m3fn"}

# what every run shares (networks.lora_flux / lora_sd3 or ours comes with the command)
COMMON_ARGS = ("--resolution", "64,64", "--caption_extension", ".txt", "--network_dim", str(MAX_RANK),
               "--network_alpha", str(ALPHA), "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
               "--train_batch_size", "1", "--save_model_as", "safetensors", "--seed", "0", "--cache_latents",
               "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only",
               "--max_data_loader_n_workers", "0", "--console_log_simple", "--t5xxl_max_token_length", str(T5_TOKENS))


def tasks_digest() -> str:
    """Changes whenever the builders change (names the cache folder)."""
    digest = hashlib.sha256(TASKS.read_bytes())
    digest.update(e2e.TASKS.read_bytes())  # the CLIP tokenizers come from there
    return digest.hexdigest()[:12]


def environment(home: Path, progress_bars: bool = True) -> dict[str, str]:
    """sd-scripts' environment (offline, one thread unless OMP_NUM_THREADS says otherwise); with
    ``progress_bars`` tqdm stays on, for the step times ``run_timed`` reads from it."""
    env = e2e.sd_scripts_environment(home, with_stand_ins=not e2e.torchvision_imports())
    if progress_bars:
        env.pop("TQDM_DISABLE", None)
    return env


# --- running and measuring ---------------------------------------------------------------------------
BAR = re.compile(r"^(steps|validation steps|epoch validation steps):\s+\d+%.*?\|\s*(\d+)/(\d+)")


@dataclass
class TimedRun:
    """A finished command: its output, wall time, peak RSS and what its progress bars show."""

    result: e2e.Result
    wall_s: float
    peak_rss_mb: float
    bars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # bar -> [(count, seconds since start)]

    def step_times(self) -> list[float]:
        """Seconds between successive training steps (the first from the bar's appearance)."""
        marks = self.bars.get("steps", [])
        return [b - a for (_, a), (_, b) in zip(marks, marks[1:])]

    def phase_seconds(self, bar: str) -> float:
        """From a bar's first to its last update (summed over its passes; 0 when it never showed)."""
        passes: list[list[float]] = []
        for count, t in self.bars.get(bar, []):
            if count == 0 or not passes:
                passes.append([])
            passes[-1].append(t)
        return sum(p[-1] - p[0] for p in passes)


def run_timed(command: Sequence[str], env: dict[str, str], log: Path, cwd: Path = SD_SCRIPTS,
              timeout: float = TIMEOUT) -> TimedRun:
    """Run ``command``; its output (timestamped per line or progress-bar update) goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    pieces: list[tuple[float, str]] = []
    pending = ""
    with open(log, "w", encoding="utf-8") as fh:
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.monotonic() - start
            parts = re.split(r"[\r\n]", pending + chunk.decode("utf-8", errors="replace"))
            pending = parts.pop()
            for part in parts:
                if part.strip():
                    pieces.append((now, part))
                    fh.write(f"[{now:8.2f}] {part}\n")
        if pending.strip():
            pieces.append((time.monotonic() - start, pending))
            fh.write(f"[{pieces[-1][0]:8.2f}] {pending}\n")
    _, status, usage = os.wait4(process.pid, 0)
    timer.cancel()
    wall = time.monotonic() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    bars: dict[str, list[tuple[int, float]]] = {}
    for t, text in pieces:
        match = BAR.match(text.strip())
        if match:
            marks = bars.setdefault(match[1], [])
            count = int(match[2])
            if not marks or marks[-1][0] != count:
                marks.append((count, t))
    output = "\n".join(text for _, text in pieces)
    return TimedRun(e2e.Result([str(c) for c in command], process.returncode, output), wall,
                    usage.ru_maxrss / 1024, bars)


def apparent_size(path: Path) -> int:
    """Bytes a file or folder's files claim (sparse files at their full length)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_usage(path: Path) -> int:
    """Bytes a file or folder takes on disk (allocated blocks: sparse files count what they hold)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


# --- the fixtures --------------------------------------------------------------------------------------
class FluxSd3Fixtures:
    """Everything the two trainers read, built on first use under ``cache`` (one folder per builder version)
    and reused afterwards; ``logs`` receives the builders' output."""

    def __init__(self, cache: Path, env: dict[str, str], logs: Path, python: str = sys.executable) -> None:
        self.cache = Path(cache) / tasks_digest()
        self.env = env
        self.logs = Path(logs)
        self.python = python
        self.build_seconds: dict[str, float] = {}  # what this object built, and how long each took

    def _build(self, name: str, task: str, *args: object, file: bool = False) -> Path:
        """``task`` into ``cache/name`` (a folder, or a file when ``file``), once."""
        target = self.cache / name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"build-{name.replace('/', '-')}.log"
        args = tuple(str(a) for a in args)
        start = time.monotonic()
        if file:  # the task writes FILE.partial and renames it when done
            e2e.run([self.python, str(TASKS), task, str(target), *args], self.env, log).check()
        else:
            e2e.build_once(target, lambda d: e2e.run([self.python, str(TASKS), task, str(d), *args], self.env,
                                                     log).check())
        self.build_seconds[name] = round(time.monotonic() - start, 1)
        return target

    def tokenizers(self) -> Path:
        return self._build("tokenizers", "tokenizers")

    def text_encoders(self, dtypes: dict[str, str] = TE_FLOAT32) -> dict[str, Path]:
        """{"clip_l": file, "clip_g": file, "t5xxl": file} in the given dtypes (sparse, all zeros)."""
        folders = {dtype: self._build(f"text-encoders-{dtype}", "text-encoders", dtype)
                   for dtype in set(dtypes.values())}
        return {name: folders[dtype] / f"{name}-{dtype}.safetensors" for name, dtype in dtypes.items()}

    def ae(self, dtype: str = "bfloat16") -> Path:
        return self._build(f"ae-{dtype}.safetensors", "ae", dtype, file=True)

    def flux(self, double: int = 1, single: int = 1, variant: str = "dev", dtype: str = "bfloat16") -> Path:
        return self._build(f"flux-{variant}-{double}d{single}s-{dtype}.safetensors", "flux", double, single, variant,
                           dtype, file=True)

    def sd3(self, depth: int = 2) -> Path:
        return self._build(f"sd3-depth{depth}.safetensors", "sd3", depth, file=True)

    def data(self) -> Path:
        return self._build(f"data-t5-{T5_TOKENS}", "data", T5_TOKENS)

    def identity_ae(self, dtype: str = "bfloat16") -> Path:
        return self._build(f"identity-ae-{dtype}.safetensors", "identity-ae", dtype, file=True)

    def identity_data(self) -> Path:
        return self._build(f"identity-data-t5-{T5_TOKENS}", "identity-data", T5_TOKENS)

    # --- command lines ---------------------------------------------------------------------------------
    def _common(self, out_dir: Path, name: str, network_module: str) -> list[str]:
        return ["--tokenizer_cache_dir", str(self.tokenizers()), "--train_data_dir", str(self.data()),
                "--output_dir", str(out_dir), "--output_name", name, "--network_module", network_module,
                *COMMON_ARGS]

    def flux_command(self, out_dir: Path, name: str, *args: str, network_module: str = "networks.lora_flux",
                     model: Optional[Path] = None, te_dtypes: dict[str, str] = TE_FLOAT32,
                     mixed_precision: str = "no") -> list[str]:
        te = self.text_encoders(te_dtypes)
        return [self.python, "flux_train_network.py", "--pretrained_model_name_or_path", str(model or self.flux()),
                "--ae", str(self.ae()), "--clip_l", str(te["clip_l"]), "--t5xxl", str(te["t5xxl"]),
                "--mixed_precision", mixed_precision, *self._common(out_dir, name, network_module), *args]

    def sd3_command(self, out_dir: Path, name: str, *args: str, network_module: str = "networks.lora_sd3",
                    model: Optional[Path] = None, te_dtypes: dict[str, str] = TE_FLOAT32,
                    mixed_precision: str = "no") -> list[str]:
        te = self.text_encoders(te_dtypes)
        return [self.python, "sd3_train_network.py", "--pretrained_model_name_or_path", str(model or self.sd3()),
                "--vae", str(self.ae()), "--clip_l", str(te["clip_l"]), "--clip_g", str(te["clip_g"]),
                "--t5xxl", str(te["t5xxl"]), "--mixed_precision", mixed_precision,
                *self._common(out_dir, name, network_module), *args]
