"""Old import paths keep working for one release: the same objects, and a DeprecationWarning
that names the new path, attributed to the caller's line (so Python shows it to the user's
own code and hides it for library code).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import scl_lightning
import scl_lightning.callbacks
from scl_lightning._deprecation import REMOVED_IN, deprecated_module, deprecated_names

SRC = Path(scl_lightning.__file__).resolve().parent

#: old module -> (its new home, the names of its ``__all__`` before the move)
MOVED_MODULES = {
    "scl_lightning.cli": (
        "scl_lightning.experiment.cli",
        ["SCLCLI", "SaveConfigToWandb", "flatten_config", "main"],
    ),
    "scl_lightning.checkpoint": (
        "scl_lightning.experiment.checkpoint",
        [
            "CheckpointError",
            "SafeCheckpointIO",
            "atomic_torch_save",
            "check_compatible",
            "load_checkpoint",
        ],
    ),
    "scl_lightning.export": (
        "scl_lightning.deploy.export",
        ["PRUNED_FORMAT", "PRUNED_METADATA_KEYS", "load_pruned", "save_pruned"],
    ),
    "scl_lightning.flops": (
        "scl_lightning.nn.flops",
        ["FlopCounts", "count_flops", "dense_view", "example_from_batch", "maskable_connectivity"],
    ),
    "scl_lightning.loggers": (
        "scl_lightning.experiment.loggers",
        [
            "CSVLogger",
            "WandbLogger",
            "active_wandb_loggers",
            "logs_this_step",
            "wandb_credentials_available",
        ],
    ),
    "scl_lightning.callbacks.exact_resume": (
        "scl_lightning.experiment.exact_resume",
        ["ExactResume", "rng_state", "set_rng_state"],
    ),
    "scl_lightning.callbacks.non_finite": (
        "scl_lightning.experiment.non_finite",
        ["NonFiniteError", "StopOnNonFinite", "finite_flag", "non_finite_kind"],
    ),
    "scl_lightning.callbacks.rank_agreement": (
        "scl_lightning.experiment.rank_agreement",
        [
            "RankAgreementCheck",
            "RankDivergenceError",
            "divergence_message",
            "parameter_fingerprints",
        ],
    ),
    "scl_lightning.callbacks.run_summary": (
        "scl_lightning.experiment.run_summary",
        ["RunSummary", "format_summary"],
    ),
    "scl_lightning.callbacks.wandb_artifacts": (
        "scl_lightning.experiment.wandb_artifacts",
        ["WandbArtifacts"],
    ),
}
#: names that went elsewhere than the module's new home
ELSEWHERE = {
    ("scl_lightning.loggers", "logs_this_step"): "scl_lightning.callbacks._logging",
    ("scl_lightning.loggers", "active_wandb_loggers"): "scl_lightning.callbacks._logging",
}
#: names that left ``scl_lightning.callbacks`` (the package keeps the method's own callbacks)
LEFT_CALLBACKS = [
    "ExactResume",
    "NonFiniteError",
    "RankAgreementCheck",
    "RankDivergenceError",
    "RunSummary",
    "StopOnNonFinite",
    "WandbArtifacts",
    "parameter_fingerprints",
]

OLD_NAMES = [
    (old, name, ELSEWHERE.get((old, name), new))
    for old, (new, names) in MOVED_MODULES.items()
    for name in names
]


def _only_deprecations(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize(
    ("old", "name", "new"), OLD_NAMES, ids=[f"{o}.{n}" for o, n, _ in OLD_NAMES]
)
def test_old_module_path_warns_and_gives_the_same_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning) as record:
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    (warning,) = _only_deprecations(record.list)
    message = str(warning.message)
    assert message == f"{old} is deprecated; import {name} from {new} (removed in {REMOVED_IN})"
    assert warning.filename == __file__  # the caller's line, not the shim's


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_from_import_statement_warns_at_the_importing_line(old):
    new, names = MOVED_MODULES[old]
    name = names[0]
    code = compile(f"from {old} import {name}\n", "<user code>", "exec")
    scope: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=re.escape(new)) as record:
        exec(code, scope)
    assert scope[name] is getattr(importlib.import_module(new), name)
    assert {w.filename for w in _only_deprecations(record.list)} == {"<user code>"}


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_module_keeps_its_names(old):
    new, names = MOVED_MODULES[old]
    module = importlib.import_module(old)
    assert set(names) <= set(module.__all__)
    # tools that get every name dir() lists (pytest's fixture discovery) see no old name
    assert not set(names) & set(dir(module))
    scope: dict[str, object] = {}
    with pytest.warns(DeprecationWarning):
        exec(f"from {old} import *", scope)
    for name in names:
        assert scope[name] is getattr(
            importlib.import_module(ELSEWHERE.get((old, name), new)), name
        )


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_importing_an_old_module_alone_is_silent_and_unknown_names_fail(old):
    """Documentation tools and pytest's doctest collection import every module: only a use of
    an old name warns. Dunders that import machinery and doctest probe raise AttributeError."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module = importlib.reload(importlib.import_module(old))
        assert not hasattr(module, "__test__")
        assert not hasattr(module, "__path__")
    assert not _only_deprecations(record)
    with pytest.raises(AttributeError, match=f"module '{re.escape(old)}' has no attribute 'nope'"):
        module.nope  # noqa: B018


@pytest.mark.parametrize("name", LEFT_CALLBACKS)
def test_names_that_left_callbacks_warn_and_resolve(name):
    import scl_lightning.experiment as experiment

    with pytest.warns(DeprecationWarning) as record:
        value = getattr(scl_lightning.callbacks, name)
    assert value is getattr(experiment, name)
    messages = {str(w.message) for w in _only_deprecations(record.list)}
    assert messages == {
        f"scl_lightning.callbacks.{name} is deprecated; import {name} from "
        f"scl_lightning.experiment (removed in {REMOVED_IN})"
    }
    assert name not in scl_lightning.callbacks.__all__


def test_from_callbacks_import_a_moved_name_warns_at_the_importing_line():
    # a package's `from ... import` also goes through importlib's _handle_fromlist; the warning
    # still points at the user's line
    code = compile("from scl_lightning.callbacks import ExactResume\n", "<user code>", "exec")
    scope: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=r"scl_lightning\.experiment") as record:
        exec(code, scope)
    assert {w.filename for w in _only_deprecations(record.list)} == {"<user code>"}
    from scl_lightning.experiment import ExactResume

    assert scope["ExactResume"] is ExactResume


def test_callbacks_keeps_the_method_and_its_submodules_import():
    assert scl_lightning.callbacks.__all__ == [
        "MaskGradientNormalization",
        "PlainProgressBar",
        "SparseConnectivityLearning",
        "SparseModelSummary",
        "SparsityMonitor",
    ]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        from scl_lightning.callbacks import (
            SparsityMonitor,  # noqa: F401
            sparsity_monitor,  # noqa: F401  (a submodule)
        )
    assert not _only_deprecations(record)
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        scl_lightning.callbacks.Nope  # noqa: B018


def test_the_helpers_on_a_module_of_their_own():
    getattr_, dir_, all_ = deprecated_module(
        "oldmath", "math", moved={"OrderedDict": "collections"}
    )
    assert "sqrt" in all_ and "OrderedDict" in all_ and dir_() == []  # no module "oldmath"
    import collections
    import math

    with pytest.warns(DeprecationWarning, match=r"^oldmath is deprecated; import sqrt from math "):
        assert getattr_("sqrt") is math.sqrt
    with pytest.warns(DeprecationWarning, match="import OrderedDict from collections"):
        assert getattr_("OrderedDict") is collections.OrderedDict
    with pytest.raises(AttributeError):
        getattr_("__wrapped__")
    with pytest.raises(AttributeError, match="module 'oldmath' has no attribute 'nope'"):
        getattr_("nope")
    getattr_ = deprecated_names("oldpkg", {"sqrt": "math"})
    with pytest.raises(AttributeError, match="module 'oldpkg' has no attribute 'cos'"):
        getattr_("cos")


# -- our own code uses the new paths -------------------------------------------------------------


def _shims() -> tuple[set[str], dict[str, set[str]]]:
    """Old module paths (``deprecated_module`` calls) and names that left a package
    (``deprecated_names`` calls), read from the source."""
    modules: set[str] = set()
    names: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id == "deprecated_module" and isinstance(node.args[0], ast.Constant):
                modules.add(node.args[0].value)
            elif node.func.id == "deprecated_names" and isinstance(node.args[0], ast.Constant):
                # the names: the strings of its mapping that are not module paths
                found = {
                    n.value
                    for n in ast.walk(node.args[1])
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)
                    if "." not in n.value
                }
                names.setdefault(node.args[0].value, set()).update(found)
    return modules, names


def test_the_package_imports_no_old_path():
    old_modules, left = _shims()
    assert set(MOVED_MODULES) <= old_modules
    assert set(LEFT_CALLBACKS) <= left["scl_lightning.callbacks"]
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                used = [a.name for a in node.names if a.name in old_modules]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                used = [node.module] if node.module in old_modules else []
                used += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if a.name in left.get(node.module, ())
                    or f"{node.module}.{a.name}" in old_modules
                ]
            else:
                continue
            problems += [f"{path.relative_to(SRC)}:{node.lineno}: imports {u}" for u in used]
    assert not problems, "\n".join(problems)


def test_importing_every_module_warns_nothing_of_ours():
    """Import the whole package (every module but the shims) in a fresh interpreter: none of
    our deprecation warnings fires, so users never see one caused by our own code."""
    old_modules, _ = _shims()
    script = f"""
import importlib, pkgutil, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    import scl_lightning
    for info in pkgutil.walk_packages(scl_lightning.__path__, "scl_lightning."):
        skip = info.name in {sorted(old_modules)!r}
        if not skip and not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
ours = [f"{{w.filename}}:{{w.lineno}}: {{w.message}}" for w in record
        if issubclass(w.category, DeprecationWarning) and "scl_lightning" in str(w.message)]
print("\\n".join(ours))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.stdout.strip(), result.stdout


def test_python_dash_m_old_cli_still_runs_and_says_where_it_went():
    result = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-m", "scl_lightning.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "python -m scl_lightning.experiment.cli" in result.stderr
    assert "scl report RUN_DIR" in result.stdout
