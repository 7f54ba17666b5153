"""The package layout of DESIGN.md, as import rules read from the source (AST, not text)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "scl_lightning"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("scl_lightning", *path.relative_to(SRC).parent.parts))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _files(under: str = "") -> list[Path]:
    return sorted((SRC / under).rglob("*.py"))


def _module(path: Path) -> str:
    return ".".join(("scl_lightning", *path.relative_to(SRC).with_suffix("").parts))


def _importing(files: list[Path], prefix: str) -> list[str]:
    return [
        _module(f)
        for f in files
        if any(i == prefix or i.startswith(prefix + ".") for i in _imports(f))
    ]


def _shim(path: Path) -> bool:
    """A deprecation shim left at an old path (it forwards to the new one, by definition)."""
    return "scl_lightning._deprecation.deprecated_module" in _imports(path)


def test_only_experiment_imports_experiment():
    outside = [f for f in _files() if "experiment" not in f.relative_to(SRC).parts and not _shim(f)]
    assert outside
    assert _importing(outside, "scl_lightning.experiment") == []


def test_callbacks_never_import_the_module_or_experiment():
    files = _files("callbacks")
    assert _importing(files, "scl_lightning.module") == []
    assert _importing(files, "scl_lightning.experiment") == []


def test_nn_is_plain_torch():
    files = _files("nn")
    assert _importing(files, "lightning") == []
    assert _importing(files, "pytorch_lightning") == []
    for layer in ("callbacks", "module", "experiment", "data", "models", "deploy"):
        assert _importing(files, f"scl_lightning.{layer}") == [], layer


def test_the_old_grab_bag_is_gone():
    assert not (SRC / "training.py").read_text().count("def ")  # a deprecation shim only


@pytest.mark.parametrize("module", ["scl_lightning", "scl_lightning.callbacks"])
def test_importing_the_api_loads_no_experiment_tooling(module):
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.startswith('scl_lightning.experiment')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_baselines_are_callbacks_on_nn_only():
    files = _files("baselines")
    assert files
    for layer in ("module", "experiment", "data", "models", "deploy"):
        assert _importing(files, f"scl_lightning.{layer}") == [], layer
