"""pyproject.toml declares what the package imports, and builds with the setuptools it needs.

The installed environment hides a missing declaration (numpy, PyYAML and typing_extensions
arrive with torch, lightning and jsonargparse), so the imports are read from the source:
every third-party module imported under ``src/scl_lightning`` must come from a declared
distribution; one imported at module level, outside ``try: ... except ImportError``, from a
required one.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "scl_lightning"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: extras that hold tools, not code the package imports
TOOL_EXTRAS = {"dev"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert found, f"cannot parse requirement {requirement!r}"
    return _canonical(found.group(1))


def _is_import_error(handler: ast.ExceptHandler) -> bool:
    names = (
        handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    )  # `except (ImportError, OSError):` too
    return any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names
    )


class _Imports(ast.NodeVisitor):
    """Top-level module names a file imports: ``required`` at module level and unguarded,
    ``optional`` inside a function or ``try: ... except ImportError``."""

    def __init__(self) -> None:
        self.required: dict[str, int] = {}
        self.optional: dict[str, int] = {}
        self._depth = 0  # function bodies and ImportError guards we are inside

    def _add(self, module: str, line: int) -> None:
        top = module.split(".")[0]
        target = self.optional if self._depth else self.required
        target.setdefault(top, line)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            self._add(node.module, node.lineno)

    def _nested(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _nested

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_is_import_error(h) for h in node.handlers)
        self._depth += guarded
        for statement in node.body:
            self.visit(statement)
        self._depth -= guarded
        for statement in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(statement)

    def visit_If(self, node: ast.If) -> None:
        # `if TYPE_CHECKING:` imports never run
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for statement in node.orelse:
                self.visit(statement)
            return
        self.generic_visit(node)


def _third_party_imports() -> tuple[dict[str, str], dict[str, str]]:
    """``{module: "path:line"}`` of required and of optional third-party imports."""
    required: dict[str, str] = {}
    optional: dict[str, str] = {}
    ignored = set(sys.stdlib_module_names) | {"scl_lightning"}
    for path in sorted(SRC.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        where = path.relative_to(ROOT)
        for found, into in ((visitor.required, required), (visitor.optional, optional)):
            for module, line in found.items():
                if module not in ignored:
                    into.setdefault(module, f"{where}:{line}")
    return required, optional


def _distributions(module: str) -> set[str]:
    """The distributions that provide the import name ``module``; the name itself for one
    that is not installed here (torchvision on the CPU machines)."""
    found = importlib.metadata.packages_distributions().get(module)
    return {_canonical(d) for d in found} if found else {_canonical(module)}


def _declared() -> tuple[set[str], set[str]]:
    project = PYPROJECT["project"]
    required = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {
        _requirement_name(r)
        for extra, requirements in project.get("optional-dependencies", {}).items()
        if extra not in TOOL_EXTRAS
        for r in requirements
    }
    return required, extras


def test_the_scan_sees_the_imports_it_must():
    required, optional = _third_party_imports()
    # a module-level import of each kind, and the lazy ones, so the scan cannot pass vacuously
    assert {"torch", "lightning", "numpy", "yaml", "typing_extensions"} <= required.keys()
    assert {"fvcore", "torchvision"} <= optional.keys()
    assert "torchvision" not in required, required["torchvision"]


def test_every_imported_distribution_is_declared():
    required_imports, optional_imports = _third_party_imports()
    required, extras = _declared()
    problems = [
        f"{where}: imports {module} ({' or '.join(sorted(_distributions(module)))}), which is "
        "not in [project] dependencies"
        for module, where in required_imports.items()
        if not _distributions(module) & required
    ]
    problems += [
        f"{where}: imports {module} ({' or '.join(sorted(_distributions(module)))}), which is "
        "in neither dependencies nor an optional extra"
        for module, where in optional_imports.items()
        if not _distributions(module) & (required | extras)
    ]
    assert not problems, "\n".join(problems)


def test_declared_floors_are_consistent_with_the_tested_pins():
    """Every declared requirement with a pin in constraints.txt allows that pin."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.strip()
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = _requirement_name(requirement)
        floor = re.search(r">=\s*([0-9][0-9.]*)", requirement)
        assert name in pins, f"{name} is required but not pinned in constraints.txt"
        if floor:
            assert _version(pins[name]) >= _version(floor.group(1)), (requirement, pins[name])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_setuptools_floor_supports_an_spdx_license_string():
    requires = PYPROJECT["build-system"]["requires"]
    setuptools = [r for r in requires if _requirement_name(r) == "setuptools"]
    assert setuptools, f"build-system.requires names no setuptools: {requires}"
    if isinstance(PYPROJECT["project"].get("license"), str):
        # PEP 639 `license = "Apache-2.0"`: setuptools < 77 rejects the string form
        floor = re.search(r">=\s*([0-9][0-9.]*)", setuptools[0])
        assert floor and _version(floor.group(1)) >= (77,), (
            f"license is an SPDX string, which needs setuptools>=77; found {setuptools[0]!r}"
        )


def test_console_script_points_at_the_cli():
    target = PYPROJECT["project"]["scripts"]["scl"]
    assert target == "scl_lightning.experiment.cli:main"
    module, attr = target.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
