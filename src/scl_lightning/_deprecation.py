"""Old import paths that keep working for one release, with a warning that names the new one.

A module that moved leaves a shim at its old path made of one call::

    # scl_lightning/checkpoint.py
    from scl_lightning._deprecation import deprecated_module

    __getattr__, __dir__, __all__ = deprecated_module(
        "scl_lightning.checkpoint", "scl_lightning.experiment.checkpoint"
    )

and a package whose names moved elsewhere gets a module ``__getattr__`` for them::

    # scl_lightning/callbacks/__init__.py
    __getattr__ = deprecated_names(
        "scl_lightning.callbacks", {"ExactResume": "scl_lightning.experiment"}
    )

Every access through an old path (``from scl_lightning.checkpoint import load_checkpoint``,
``scl_lightning.callbacks.ExactResume``, a config's ``class_path``) gives the very object of the
new path and warns ``DeprecationWarning`` at the line of the caller, so Python's default filters
show it in ``__main__`` and pytest shows it anywhere. Importing the shim alone warns nothing
(documentation tools and pytest's doctest collection import every module).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["REMOVED_IN", "DeprecatedModule", "deprecated_module", "deprecated_names"]

#: the release that removes the old import paths
REMOVED_IN = "0.3"


def _warn(message: str) -> None:
    # stacklevel 3: past this helper and the module __getattr__, to the line that named the old
    # path (the warnings module itself skips importlib's frames in between)
    warnings.warn(message, DeprecationWarning, stacklevel=3)


def _lookup(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _public_names(module: str) -> list[str]:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    return list(names)


def deprecated_names(old: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that left the module ``old``: ``moved`` maps each name
    to the module that holds it now. Any other name raises ``AttributeError`` as usual.

    Example::

        >>> __getattr__ = deprecated_names("mypkg", {"sqrt": "math"})
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     f = __getattr__("sqrt")
        >>> f(4.0), str(caught[0].message)
        (2.0, 'mypkg.sqrt is deprecated; import sqrt from math (removed in 0.3)')
    """
    moved = dict(moved)

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        new = moved[name]
        _warn(f"{old}.{name} is deprecated; import {name} from {new} (removed in {REMOVED_IN})")
        return _lookup(new, name)

    return __getattr__


class DeprecatedModule(NamedTuple):
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of a shim left at a moved module's path."""

    getattr: Callable[[str], Any]
    dir: Callable[[], list[str]]
    all: list[str]


def deprecated_module(
    old: str, new: str, moved: Mapping[str, str] | None = None
) -> DeprecatedModule:
    """Make the module ``old`` an alias of ``new`` that warns on every use.

    Args:
        old: the old dotted module path (given literally, not ``__name__``, which is
            ``"__main__"`` under ``python -m``).
        new: the module that holds the code now; every attribute of it is reachable through
            ``old`` (private ones too: tests and power users reach into modules), and its
            ``__all__`` is ``old``'s (``dir(old)`` lists the shim's own names only).
        moved: names of ``old`` that went to another module than ``new``, with that module.

    Example::

        >>> __getattr__, __dir__, __all__ = deprecated_module("mymath", "math")
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     pi = __getattr__("pi")
        >>> import math
        >>> pi is math.pi, str(caught[0].message)
        (True, 'mymath is deprecated; import pi from math (removed in 0.3)')
    """
    moved = dict(moved or {})

    def __getattr__(name: str) -> Any:
        # dunders (``__path__``, ``__test__``, ``__wrapped__``...) are probed by the import
        # system, doctest and inspect: answer them as a plain module would, and silently
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        target = moved.get(name, new)
        try:
            value = _lookup(target, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None
        _warn(f"{old} is deprecated; import {name} from {target} (removed in {REMOVED_IN})")
        return value

    def __dir__() -> list[str]:
        # the shim's own names only: tools that walk dir() and get every attribute (pytest's
        # fixture discovery, IDEs) must not trip the warning; ``import *`` reads __all__
        module = sys.modules.get(old)
        return sorted(vars(module)) if module is not None else []

    return DeprecatedModule(__getattr__, __dir__, sorted({*_public_names(new), *moved}))
