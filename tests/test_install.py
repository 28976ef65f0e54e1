"""Installing the package makes ``--network_module=networks.aclora`` importable beside sd-scripts' own networks/.

sd-scripts puts its own folder on sys.path and imports ``networks.<name>``;
its ``networks/`` folder has no ``__init__.py``, so ``networks`` is a namespace
package whose portions are merged from every sys.path entry. Ours must be one
more portion: shipping a ``networks/__init__.py`` would hide sd-scripts' own
``networks.lora``. Each test runs a fresh interpreter from a fake sd-scripts
checkout, so the repository itself is not on sys.path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from helpers import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                       "out", ".whl", "results")

# What sd-scripts does before importing the network module: its own folder first on sys.path.
IMPORT_LIKE_SD_SCRIPTS = textwrap.dedent(
    """
    import importlib, json, os, sys
    {prelude}
    sys.path.insert(0, os.getcwd())
    modules = {{name: importlib.import_module(name) for name in {order!r}}}
    aclora, lora = modules["networks.aclora"], modules["networks.lora"]
    print(json.dumps({{
        "lora": os.path.realpath(lora.__file__),
        "aclora": os.path.realpath(aclora.__file__),
        "aclora_ext": os.path.realpath(sys.modules["aclora_ext"].__file__),
        "kohya_marker": getattr(lora, "KOHYA_LORA", None),
        "entry_points": [callable(getattr(aclora, n, None)) for n in ("create_network", "create_network_from_weights")],
        "heavy_imports": sorted(m for m in ("diffusers", "transformers", "accelerate") if m in sys.modules),
    }}))
    """
)

# For the wheel: leave out the editable install of the development venv, as a fresh environment would.
WITHOUT_EDITABLE_INSTALL = textwrap.dedent(
    """
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if "editable" not in p and os.path.realpath(p or ".") != {repo!r}]
    sys.path_importer_cache.clear()
    """
)


@pytest.fixture
def sd_scripts_checkout(tmp_path):
    """A fake sd-scripts folder: networks/lora.py and no networks/__init__.py, as in the real one."""
    root = tmp_path / "sd-scripts"
    (root / "networks").mkdir(parents=True)
    (root / "networks" / "lora.py").write_text("KOHYA_LORA = 'sd-scripts networks.lora'\n")
    (root / "train_network.py").write_text("# stand-in\n")
    return root


def run_python(code, cwd, extra_env=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(extra_env or {})
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"the interpreter failed:\n{done.stderr[-3000:]}"
    return done.stdout


def import_like_sd_scripts(cwd, order, prelude="", extra_env=None):
    out = run_python(IMPORT_LIKE_SD_SCRIPTS.format(order=list(order), prelude=prelude), cwd, extra_env)
    return json.loads(out.strip().splitlines()[-1])


def assert_both_import(found, checkout, aclora_root):
    assert found["lora"] == os.path.realpath(checkout / "networks" / "lora.py")
    assert found["kohya_marker"] == "sd-scripts networks.lora"
    assert found["aclora"] == os.path.realpath(aclora_root / "networks" / "aclora.py")
    assert found["aclora_ext"] == os.path.realpath(aclora_root / "aclora_ext" / "__init__.py")
    assert found["entry_points"] == [True, True]


def test_the_repository_ships_networks_as_a_namespace_package():
    assert (REPO / "networks" / "aclora.py").is_file()
    assert not (REPO / "networks" / "__init__.py").exists(), "networks/__init__.py would hide sd-scripts' networks/"


def install_is_editable(cwd):
    out = run_python(
        "import importlib.metadata as m, json\n"
        "try:\n    d = m.distribution('aclora')\nexcept m.PackageNotFoundError:\n    print('{}')\n"
        "else:\n    print(d.read_text('direct_url.json') or '{}')\n",
        cwd,
    )
    return bool(json.loads(out).get("dir_info", {}).get("editable"))


@pytest.mark.parametrize("order", [("networks.lora", "networks.aclora"), ("networks.aclora", "networks.lora")],
                         ids=["kohya-first", "aclora-first"])
def test_the_editable_install_imports_beside_sd_scripts_networks(sd_scripts_checkout, order):
    if not install_is_editable(sd_scripts_checkout):
        skip_or_fail("this environment does not hold an editable install of aclora (pip install -e .)")
    found = import_like_sd_scripts(sd_scripts_checkout, order)
    assert_both_import(found, sd_scripts_checkout, REPO)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree (the checkout stays free of build output).

    With setuptools here it is built offline with it; without (a fresh Python 3.12+ venv has none) as a user's
    ``pip wheel .`` builds it: pip fetches [build-system]'s requirements into an isolated build environment.
    Where that index cannot be reached the test skips, and fails under CI=true (CI reaches it)."""
    root = tmp_path_factory.mktemp("wheel")
    source, dist = root / "source", root / "dist"
    shutil.copytree(REPO, source, ignore=SOURCE_IGNORE)
    offline = importlib.util.find_spec("setuptools") is not None
    how = ["--no-build-isolation", "--no-index"] if offline else []
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *how, "--disable-pip-version-check",
                           "-q", "-w", str(dist), str(source)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and not offline:
        skip_or_fail(f"no setuptools here, and pip could not fetch it to build the wheel: {done.stderr[-1500:]}")
    assert done.returncode == 0, f"pip wheel failed:\n{done.stderr[-3000:]}"
    (built,) = dist.glob("aclora-*.whl")
    return built


def test_the_wheel_ships_networks_aclora_without_networks_init(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "networks/aclora.py" in names
    assert "networks/__init__.py" not in names
    assert "aclora_ext/__init__.py" in names


def test_the_wheel_needs_only_torch_and_safetensors_at_runtime(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    requirements = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                    if line.startswith("Requires-Dist:")]
    runtime = sorted(r.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip().lower()
                     for r in requirements if "extra ==" not in r)
    assert runtime == ["safetensors", "torch"]


def test_a_regular_install_imports_beside_sd_scripts_networks(wheel, sd_scripts_checkout, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                           "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip install failed:\n{done.stderr[-3000:]}"
    assert not (target / "networks" / "__init__.py").exists()
    prelude = WITHOUT_EDITABLE_INSTALL.format(repo=os.path.realpath(REPO))
    found = import_like_sd_scripts(sd_scripts_checkout, ("networks.lora", "networks.aclora"), prelude,
                                   {"PYTHONPATH": str(target)})
    assert_both_import(found, sd_scripts_checkout, target)
    assert found["heavy_imports"] == [], "importing the network module must not pull in diffusers/transformers"
