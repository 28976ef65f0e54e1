"""Support for the end-to-end tests that run the real sd-scripts (tests/test_sd_scripts_e2e.py).

Where sd-scripts is, what it needs, how to start its scripts offline on a CPU,
and how to read what they leave behind (logs, LoRA files). The heavy work runs in
subprocesses (``tests/sd_scripts_tasks.py`` and sd-scripts' own scripts).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TASKS = TESTS / "sd_scripts_tasks.py"
STAND_INS = TESTS / "sd_scripts_stand_ins"
# sd-scripts beside the repository (CI lays a snapshot there), or wherever ACLORA_SD_SCRIPTS points
SD_SCRIPTS = Path(os.environ.get("ACLORA_SD_SCRIPTS") or REPO.parent / "shared" / "sd-scripts").resolve()
SWITCH = "ACLORA_SD_SCRIPTS_E2E"  # "0": skip these tests (CI deselects them instead: -m "not sd_scripts")

# What sd-scripts imports for LoRA training beyond torch (import name -> its requirements.txt line)
SD_SCRIPTS_IMPORTS = {"diffusers": "diffusers", "transformers": "transformers", "accelerate": "accelerate",
                      "safetensors": "safetensors", "einops": "einops", "cv2": "opencv-python-headless",
                      "voluptuous": "voluptuous", "imagesize": "imagesize", "toml": "toml", "PIL": "Pillow"}
# sd-scripts is written against the releases its requirements.txt pins; these must match in major.minor
PINNED_STACK = ("transformers", "diffusers", "accelerate")
INSTALL_HINT = ("Install them as .ci/run does for its sd-scripts venv (PINNED_STACK and SD_SCRIPTS_IMPORTS there), "
                "then pip install -e .")

SUBPROCESS_TIMEOUT = 900


# --- is everything there? (what is missing skips these tests, fails them under CI=true: helpers.skip_or_fail) --
def switched_off() -> bool:
    return os.environ.get(SWITCH, "") == "0"


def import_sd_scripts_in_process() -> None:
    """Before a test imports sd-scripts' own modules (``networks.*``, ``library.*``) in process: skip when the
    tests against sd-scripts are switched off; skip, or fail under CI=true, when its requirements are missing;
    then put sd-scripts first on ``sys.path`` (and the stand-ins, where torchvision does not import)."""
    import pytest

    from helpers import skip_or_fail

    if switched_off():
        pytest.skip(f"{SWITCH}=0: the tests against sd-scripts are turned off")
    missing = missing_requirements()
    if missing:
        skip_or_fail(f"these tests need {'; '.join(missing)}. {INSTALL_HINT}")
    for path in reversed([str(SD_SCRIPTS)] + ([] if torchvision_imports() else [str(STAND_INS)])):
        if path not in sys.path:
            sys.path.insert(0, path)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (SD_SCRIPTS / "requirements.txt").read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s;#]*)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def missing_requirements() -> list[str]:
    """What keeps sd-scripts from running here, in words (empty: all there)."""
    if not (SD_SCRIPTS / "train_network.py").is_file() or not (SD_SCRIPTS / "sdxl_train_network.py").is_file():
        return [f"sd-scripts at {SD_SCRIPTS} (a checkout with train_network.py; ACLORA_SD_SCRIPTS=path to use another)"]
    missing = []
    absent = [package for module, package in SD_SCRIPTS_IMPORTS.items() if importlib.util.find_spec(module) is None]
    if absent:
        missing.append(f"sd-scripts' Python packages: {', '.join(absent)}")
    pins = _pins()
    for name in PINNED_STACK:
        if name in pins and importlib.util.find_spec(name) is not None:
            have = importlib.metadata.version(name)
            if _major_minor(have) != _major_minor(pins[name]):
                missing.append(f"{name} {'.'.join(_major_minor(pins[name]))}.x as sd-scripts pins it (found {have})")
    try:
        importlib.metadata.version("aclora")
    except importlib.metadata.PackageNotFoundError:
        missing.append("this package installed (pip install -e .), as sd-scripts imports networks.aclora from "
                       "site-packages")
    return missing


def torchvision_imports() -> bool:
    """Does torchvision import here? (PyPI's CUDA builds do not load beside a CPU build of torch.)"""
    if importlib.util.find_spec("torchvision") is None:
        return False
    done = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True, timeout=120,
                          env=clean_environment())
    return done.returncode == 0


# --- running things ------------------------------------------------------------------------------
def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}


@functools.lru_cache(maxsize=None)
def installed_elsewhere() -> bool:
    """Does a clean interpreter import aclora_ext from somewhere else than this checkout? (An editable
    install of another checkout: then the scripts get this one first on their path, so that they run the
    code under test. CI installs the checkout it tests: nothing is added there.)"""
    done = subprocess.run([sys.executable, "-c", "import aclora_ext; print(aclora_ext.__file__)"], capture_output=True,
                          text=True, timeout=120, env=clean_environment(), cwd=str(SD_SCRIPTS))
    return done.returncode == 0 and not Path(done.stdout.strip()).resolve().is_relative_to(REPO)


def sd_scripts_environment(home: Path, with_stand_ins: bool) -> dict[str, str]:
    """Offline, quiet, and with sd-scripts' folder importable (its networks/*.py tools import ``library``)."""
    env = clean_environment()
    paths = ([str(REPO)] if installed_elsewhere() else []) + ([str(STAND_INS)] if with_stand_ins else []) \
        + [str(SD_SCRIPTS)]
    env.update({
        "PYTHONPATH": os.pathsep.join(paths),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(home / "hf-home"),  # no user-level accelerate or hub configuration
        "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        # one thread unless told otherwise: on the shared 2-core machine, two threads per process more than
        # doubled both the CPU time and the wall time of these tests (threads spinning against other work)
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    })
    return env


@dataclass
class Result:
    """A finished subprocess: its command, exit status and everything it printed."""

    command: list[str]
    returncode: int
    output: str

    def tail(self, chars: int = 6000) -> str:
        return f"$ {' '.join(self.command)}\n(exit {self.returncode})\n...{self.output[-chars:]}"

    def check(self) -> "Result":
        assert self.returncode == 0, f"sd-scripts failed:\n{self.tail()}"
        return self


def run(command: list[str], env: dict[str, str], log: Path, cwd: Path = SD_SCRIPTS) -> Result:
    """Run ``command`` from sd-scripts' folder; its output goes to ``log`` and into the result."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=SUBPROCESS_TIMEOUT, stdin=subprocess.DEVNULL)
    return Result([str(c) for c in command], done.returncode, log.read_text(encoding="utf-8", errors="replace"))


def task(name: str, *args: object, env: dict[str, str], log: Path) -> Result:
    return run([sys.executable, str(TASKS), name, *map(str, args)], env, log).check()


def tasks_digest() -> str:
    """Changes whenever the fixture builders change (names cached model folders)."""
    return hashlib.sha256(TASKS.read_bytes()).hexdigest()[:12]


LARGE_FILE = 64 * 1024**2


def free_disk(root: Path, builds: list[Path]) -> None:
    """Once a module's end-to-end tests are done, delete from its temporary folder ``root`` the model folders
    in ``builds`` (GBs: the SD1.x model and checkpoint 4 GB, the SDXL model 5 GB, FLUX.1 1-1.4 GB) and any other
    file over LARGE_FILE; the logs and LoRA files stay for a look at a failure. A build outside ``root``
    (ACLORA_E2E_CACHE) is kept for the next session."""
    root = root.resolve()
    for build in builds:
        if build.resolve().is_relative_to(root):
            shutil.rmtree(build, ignore_errors=True)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size > LARGE_FILE:
            path.unlink(missing_ok=True)


def build_once(folder: Path, build) -> Path:
    """``build(tmp)`` into a temporary sibling, then rename: a half-built fixture never looks finished."""
    if folder.exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    partial.rename(folder)
    return folder


def trainer_root(tmp_path_factory, what: str, script: str = "") -> Path:
    """A session's folder for one trainer's end-to-end tests: skip when they are switched off; skip, or fail under
    CI=true, when sd-scripts' requirements or its ``script`` are missing."""
    import pytest

    from helpers import skip_or_fail

    if switched_off():
        pytest.skip(f"{SWITCH}=0: the sd-scripts end-to-end tests are turned off")
    missing = missing_requirements()
    if missing:
        skip_or_fail(f"the {what} end-to-end tests need {'; '.join(missing)}. {INSTALL_HINT}")
    if script and not (SD_SCRIPTS / script).is_file():
        skip_or_fail(f"the {what} end-to-end tests need {script} in {SD_SCRIPTS}")
    return tmp_path_factory.mktemp(re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-") + "-e2e")


def tagged_json(output: str, tag: str) -> dict:
    """The JSON a launcher or task printed on its line starting with ``tag``."""
    line = next(line for line in output.splitlines() if line.startswith(tag + " "))
    return json.loads(line[len(tag) + 1:])


# --- reading what the scripts leave ---------------------------------------------------------------
RESTART_LINE = re.compile(r"AC-LoRA RESTART #(\d+) at epoch (\d+), step (\d+): .*?"
                          r"ranks min/median/max (\d+)/[\d.]+/(\d+) of (\d+) over (\d+) modules")


def restart_lines(output: str) -> list[dict]:
    """The applied RESTARTs as the log reports them."""
    return [{"index": int(m[1]), "epoch": int(m[2]), "step": int(m[3]), "rank_min": int(m[4]), "rank_max": int(m[5]),
             "max_rank": int(m[6]), "modules": int(m[7])} for m in RESTART_LINE.finditer(output)]


@dataclass
class TrainerRun:
    """One finished run of a trainer: what it printed, and the LoRA it saved as ``out_dir/name.safetensors``."""

    result: Result
    out_dir: Path
    name: str

    def file(self) -> "LoRAFile":
        return LoRAFile.read(self.out_dir / f"{self.name}.safetensors")

    def restarts(self) -> list[tuple[int, int, int]]:
        return [(r["index"], r["epoch"], r["step"]) for r in restart_lines(self.result.output)]

    def assert_restarts_match_the_file(self, schedule: list[tuple[int, int, int]], modules: int,
                                       max_rank: int) -> "LoRAFile":
        """The log's RESTART lines are ``schedule`` and agree with the file's history; the file has ``modules``
        modules, each saved at the rank it reports (1..max_rank), with sd-scripts' metadata and ours."""
        output = self.result.output
        assert "import network module: networks.aclora" in output
        assert self.restarts() == schedule, f"RESTART lines in the log:\n{self.result.tail()}"
        lora = self.file()
        assert len(lora.modules) == modules
        history = lora.history()
        assert [(h["index"], h["epoch"], h["step"]) for h in history] == schedule
        for line, entry in zip(restart_lines(output), history):
            assert (line["rank_min"], line["rank_max"], line["max_rank"], line["modules"]) == (
                min(entry["ranks"]), max(entry["ranks"]), max_rank, modules)
        assert lora.saved_ranks() == lora.ranks()
        assert all(1 <= rank <= max_rank for rank in lora.ranks().values())
        assert lora.metadata["ss_network_module"] == "networks.aclora" and "aclora_ranks" in lora.metadata
        return lora


@dataclass
class LoRAFile:
    """A saved LoRA file: tensors, metadata, and our own metadata fields decoded."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> "LoRAFile":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        return cls(Path(path), load_file(str(path)), metadata)

    @property
    def modules(self) -> list[str]:
        return sorted({key.split(".", 1)[0] for key in self.tensors})

    def rank(self, module: str) -> int:
        return self.tensors[f"{module}.lora_down.weight"].shape[0]

    def ranks(self) -> dict[str, int]:
        return {name: self.rank(name) for name in self.modules}

    def delta(self, module: str) -> torch.Tensor:
        """alpha/rank * up @ down, what every consumer adds to the layer (as an out x in[*k*k] matrix)."""
        down = self.tensors[f"{module}.lora_down.weight"].float()
        up = self.tensors[f"{module}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(self.tensors[f"{module}.alpha"]) if f"{module}.alpha" in self.tensors else float(rank)
        return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * (alpha / rank)

    def history(self) -> list[dict]:
        return json.loads(self.metadata["aclora_history"])

    def history_ranks(self, entry: dict) -> dict[str, int]:
        """A history entry's ranks by module name (they are stored in the order of ``aclora_modules``)."""
        return dict(zip(json.loads(self.metadata["aclora_modules"]), entry["ranks"]))

    def saved_ranks(self) -> dict[str, int]:
        return json.loads(self.metadata["aclora_ranks"])

    def subset(self, modules: list[str], path: Path) -> "LoRAFile":
        """The same file with only ``modules`` (metadata kept), written to ``path``."""
        from safetensors.torch import save_file

        keep = {k: v for k, v in self.tensors.items() if k.split(".", 1)[0] in modules}
        save_file(keep, str(path), metadata=self.metadata)
        return LoRAFile.read(path)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius): 0 for equal tensors, about 1e-7 for float32 rounding; |a - b| when b is 0."""
    scale = float(b.norm())
    difference = float((a - b).norm())
    return difference / scale if scale > 0 else difference


# --- training items' identities (tests/test_sd_scripts_e2e.py, tests/test_flux_sd3_e2e.py) ----------------------
# (width, height) of four smooth images in two buckets at --resolution 128,128 (SD needs steps of 64)
IDENTITY_IMAGES = ((128, 128), (128, 128), (192, 64), (192, 64))
IDENTITY_BUCKETS = ("--resolution", "128,128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso",
                    "256", "--bucket_reso_steps", "64", "--flip_aug", "--train_batch_size", "2")
IDENTITY_LINE = re.compile(r"epoch (\d+): (\d+) training items of (\d+) distinct images \((\d+) images so far, "
                           r"(\d+) cached views\)")


def write_identity_images(folder: Path) -> list[Path]:
    """Smooth random images (a VAE's latents of them keep their layout), with captions; their stems."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    stems = []
    for i, size in enumerate(IDENTITY_IMAGES):
        coarse = torch.rand(1, 3, 3, 3, generator=torch.Generator().manual_seed(i))
        image = torch.nn.functional.interpolate(coarse, size=size[::-1], mode="bicubic", align_corners=False)
        pixels = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().numpy().astype(np.uint8)
        stems.append(folder / f"image{i}")
        Image.fromarray(pixels).save(stems[-1].with_suffix(".png"))
        stems[-1].with_suffix(".txt").write_text(f"aclora_style, picture {i}")
    return stems


def identity_lines(output: str) -> list[tuple[int, ...]]:
    """(epoch, items, distinct images, images so far, cached views) of every epoch's identities line."""
    return [tuple(map(int, m.groups())) for m in IDENTITY_LINE.finditer(output)]


def assert_identities(output: str, lines: list[tuple[int, ...]], images: int) -> None:
    """The runs' epochs name exactly ``images`` images, the same every epoch, each drawn twice per epoch; the
    flipped views (a second cached latent per image) were drawn and joined their images."""
    assert re.search(r"bucket 1: resolution", output), "the run needs two buckets"
    found = identity_lines(output)
    assert [line[:4] for line in found] == lines, found
    assert images < found[-1][4] <= 2 * images, found
