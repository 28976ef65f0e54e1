"""The package's layout is its architecture: folders depend on each other one way, no module imports
itself back through a circle, no runtime file needs a table of contents, and the sd-scripts entry point
stays a namespace package of a few lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aclora_ext"

#: the folders (layers) of the package, lowest first: each may import only from those before it, and
#: from itself. ``options`` and ``version`` are leaves everyone may read.
LAYERS = ["version", "options", "functional", "files", "lora", "families", "ranksearch", "network", "harness",
          "tools"]
#: the most lines a runtime file may have (more needs a table of contents: make it two files)
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every aclora_ext module ``path`` imports, wherever in the file (function-level imports count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("aclora_ext"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("aclora_ext"):
                continue
            for alias in node.names:  # `from . import x` imports the module x
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return found - {name}


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_folder_imports_only_from_the_folders_below_it():
    wrong = []
    for name, path in _modules().items():
        layer = _layer(name)
        if layer == "":  # the facade (aclora_ext/__init__.py) re-exports the public API
            continue
        assert layer in LAYERS, f"{name}: folder {layer!r} is not in the layout's list of layers"
        for target in _imports(path):
            other = _layer(target)
            if other != layer and LAYERS.index(other) > LAYERS.index(layer):
                wrong.append(f"{name} imports {target} ({layer} -> {other})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_module_reaches_itself_through_its_imports():
    graph = {name: {t for t in _imports(path) if t in _modules()} for name, path in _modules().items()}
    # a package's __init__ re-exporting its own modules is not a circle between concepts
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") and _modules()[name].name == "__init__.py")}
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_runtime_file_needs_a_table_of_contents(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


def test_the_sd_scripts_entry_point_is_a_few_lines_of_a_namespace_package():
    assert not (ROOT / "networks" / "__init__.py").exists()
    entry = (ROOT / "networks" / "aclora.py").read_text().splitlines()
    assert len(entry) <= 15
    assert _imports(ROOT / "networks" / "aclora.py") == {"aclora_ext"}


def test_nothing_that_runs_inside_sd_scripts_imports_the_harness_or_the_tools():
    inside = ("functional", "files", "lora", "families", "ranksearch", "network")
    leaks = [f"{name} imports {t}" for name, path in _modules().items() if _layer(name) in inside
             for t in _imports(path) if _layer(t) in ("harness", "tools")]
    assert not leaks, leaks
