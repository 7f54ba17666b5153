"""Finding the images of a split: class folders, image files, and the layout checks that name
what is wrong with a ``data_dir``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_EXTENSIONS"]

#: File extensions (compared case-insensitively) that count as images; other files are ignored.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

_LAYOUT_HINT = (
    "expected data_dir/train/<class>/<image> and data_dir/val/<class>/<image> "
    "(ILSVRC2012 from image-net.org, validation images sorted into class folders)"
)


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``split_dir`` (symlinks followed)."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _count_class_dirs(split_dir: Path) -> int | None:
    """Number of class folders in ``split_dir``, or None when it cannot be listed."""
    try:
        return len(_class_dirs(split_dir))
    except OSError:
        return None


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; {_LAYOUT_HINT}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is not a directory; {_LAYOUT_HINT}")


def _split_classes(split_dir: Path) -> list[str]:
    """Class folder names of a split, with a clear error when there are none."""
    classes = _class_dirs(split_dir)
    if not classes:
        with os.scandir(split_dir) as entries:
            loose = any(_is_image_file(e.name) and e.is_file() for e in entries)
        hint = (
            "it holds image files directly: sort them into one sub-folder per class"
            if loose
            else _LAYOUT_HINT
        )
        raise ValueError(f"no class folders in {split_dir}; {hint}")
    return classes


def _scan_split(split_dir: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Relative paths (a fixed-width bytes array) and int64 labels of every image in a split.

    The paths are a numpy array rather than a list of ``str`` so that forked DataLoader workers
    share them: reference counting on a million Python objects would copy every page they live on
    into each worker.
    """
    paths: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        with os.scandir(class_dir) as entries:
            files = sorted(e.name for e in entries if _is_image_file(e.name) and e.is_file())
        if not files:
            raise ValueError(
                f"class folder {class_dir} holds no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}, any case); add its images or remove the folder "
                "from every split"
            )
        paths.extend(os.fsencode(os.path.join(name, f)) for f in files)
        labels.extend([label] * len(files))
    return np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64)
