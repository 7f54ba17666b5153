"""Small helpers shared across the package (no Lightning, no project imports)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["free_paths", "fsync_directory", "is_int", "next_free_path", "validate_positive"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), but not a bool.

    ``bool`` is an ``int`` subclass, but ``batch_size=True`` is a mistake, not a batch size of 1.

    Example::

        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return False
    return isinstance(value, np.integer) and not isinstance(value, np.bool_)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside ``directory`` durable; a no-op where directories cannot be opened
    or synced (Windows, some file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


def free_paths(path: str | os.PathLike[str], *, numbered: bool = False) -> Iterator[Path]:
    """``path`` itself, then ``<stem>-1<suffix>``, ``<stem>-2<suffix>``, ... beside it;
    ``numbered=True`` leaves out ``path`` itself (for a name that is always numbered).

    Example::

        >>> [p.name for p, _ in zip(free_paths("runs/config.yaml"), range(3))]
        ['config.yaml', 'config-1.yaml', 'config-2.yaml']
        >>> next(free_paths("runs/config.resume.yaml", numbered=True)).name
        'config.resume-1.yaml'
    """
    path = Path(path)
    if not numbered:
        yield path
    n = 1
    while True:
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1


def next_free_path(
    path: str | os.PathLike[str], *, taken: Any = None, numbered: bool = False
) -> Path:
    """The first of :func:`free_paths` (``numbered`` as there) that is not ``taken`` (default:
    that does not exist).

    Example::

        >>> next_free_path("/nonexistent/dir/report").name
        'report'
    """
    is_taken = taken if taken is not None else (lambda p: p.exists() or p.is_symlink())
    for candidate in free_paths(path, numbered=numbered):
        if not is_taken(candidate):
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def validate_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A finite float > 0 (>= 0 with ``allow_zero``), or a ValueError naming ``name``.

    Example::

        >>> validate_positive("lam", 0, allow_zero=True)
        0.0
    """
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
