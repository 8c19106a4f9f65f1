"""Serving stands on models and data alone: nothing under ``engine/`` imports ``srp4ctr.train``,
and the cache file format (``engine/cache.py``) is a leaf that never calls up into the engine.

Checked twice: statically, over every import statement of the package's source files (so an
import inside a function counts too), and at run time, in a fresh interpreter that imports every
engine module and must end with no ``srp4ctr.train`` module loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = package.split(".")
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _engine_modules() -> list[tuple[Path, str, str]]:
    """(file, its module name, the package it sits in) of every module under engine/."""
    out = []
    for path in sorted(ENGINE.rglob("*.py")):
        rel = path.relative_to(ENGINE)
        package = ".".join(["srp4ctr", "engine", *rel.parts[:-1]])
        name = package if path.stem == "__init__" else f"{package}.{path.stem}"
        out.append((path, name, package))
    return out


@pytest.mark.parametrize("path,name,package", _engine_modules(),
                         ids=[str(p.relative_to(ROOT)) for p, _, _ in _engine_modules()])
def test_engine_never_imports_training(path, name, package):
    bad = sorted(m for m in _imports(path, package)
                 if m == "srp4ctr.train" or m.startswith("srp4ctr.train."))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_cache_format_is_a_leaf():
    names = _imports(ENGINE / "cache.py", "srp4ctr.engine")
    up = sorted(m for m in names if m.startswith("srp4ctr.engine.") and m != "srp4ctr.engine.")
    assert not up, f"engine/cache.py imports {up}"
    assert not any(m.startswith("srp4ctr.models") or m.startswith("srp4ctr.train")
                   for m in names)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The static check must not be blind to a lazy import (it would pass vacuously)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from srp4ctr.train.loop import load_model\n"
                 "    from .engine import Engine\n", encoding="utf-8")
    names = _imports(f, "srp4ctr.engine")
    assert "srp4ctr.train.loop" in names and "srp4ctr.engine.engine" in names


def test_loading_every_engine_module_loads_no_training_code():
    mods = [name for _, name, _ in _engine_modules()]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('srp4ctr.train')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_checkout_imported_from_its_root_finds_engine_and_kernels():
    """With the clone root first on sys.path and no install mapping (the editable finder
    removed), ``srp4ctr.engine`` and ``srp4ctr.kernels`` still import, from this checkout."""
    code = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "for m in [m for m in sys.modules if m.startswith('srp4ctr')]:\n    del sys.modules[m]\n"
        "import srp4ctr.engine, srp4ctr.kernels\n"
        "from srp4ctr.engine import Engine\n"
        "print(srp4ctr.engine.__file__)\nprint(srp4ctr.kernels.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    engine_file, kernels_file = proc.stdout.split()
    assert engine_file == str(ROOT / "engine" / "__init__.py")
    assert kernels_file == str(ROOT / "kernels" / "__init__.py")
