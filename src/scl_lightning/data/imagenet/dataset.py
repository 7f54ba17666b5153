"""The images of one split as a Dataset that skips (or stops at) unreadable files, and the
DataLoader that reports the skipped ones once per pass."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["BadImageError", "BadImageWarning", "ImageFolderDataset"]

_NUM_EXAMPLES = 3  # example paths named in a bad-image warning


class BadImageError(ValueError):
    """A file with an image extension could not be decoded (raised with ``bad_images="error"``).

    When raised inside a DataLoader worker, PyTorch re-raises it in the main process with the
    worker's traceback as the message; the constructor keeps only the original one-line message,
    so the ``scl`` command still prints one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            _, sep, original = last.partition(f"{type(self).__name__}: ")
            message = original if sep else last
        super().__init__(message)


class BadImageWarning(UserWarning):
    """Unreadable image files were skipped (``bad_images="skip"``)."""


class ImageFolderDataset(Dataset):
    """Images of one split in class-folder layout, decoded lazily; bad files skipped or fatal.

    ``__getitem__`` decodes one file and returns ``(uint8 tensor (3, H, W), label)``. With
    ``bad_images="skip"`` a file that fails to decode is marked bad in a flag array in shared
    memory (visible to every DataLoader worker and the main process) and the next readable index
    (wrapping around) is returned in its place, so batches keep their size; marked files are not
    tried again. :meth:`report_bad_images` warns once about the files marked since its last call.
    With ``bad_images="error"`` the first unreadable file raises :class:`BadImageError` naming it.

    Args:
        root: The split's folder; ``paths`` are relative to it.
        paths: Relative file paths as a numpy bytes array (``os.fsencode``).
        labels: Class index of each path.
        pipeline: Object with ``decode(path)`` and ``transform(decoded) -> Tensor``.
        bad_images: ``"skip"`` or ``"error"``.

    Raises:
        ValueError: If ``paths`` and ``labels`` differ in length, are empty, or ``bad_images`` is
            not ``"skip"`` or ``"error"``.

    Example::

        >>> import numpy as np
        >>> ds = ImageFolderDataset("imgs", np.array([b"a/1.jpg", b"b/2.jpg"]), np.array([0, 1]),
        ...                         pipeline=None)
        >>> len(ds), ds.path(1), ds.bad_paths()
        (2, 'imgs/b/2.jpg', [])
    """

    def __init__(
        self,
        root: str | Path,
        paths: np.ndarray,
        labels: np.ndarray,
        pipeline: Any,
        bad_images: Literal["skip", "error"] = "skip",
    ) -> None:
        if len(paths) != len(labels) or len(paths) == 0:
            raise ValueError(
                f"paths and labels must be non-empty and of equal length, got {len(paths)} "
                f"and {len(labels)}"
            )
        if bad_images not in ("skip", "error"):
            raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
        self.root = os.fspath(root)
        self.paths = paths
        self.labels = labels
        self.pipeline = pipeline
        self.bad_images = bad_images
        # One flag per file, in shared memory so that workers' marks reach the main process. Each
        # worker only ever sets flags to True, so no lock is needed.
        self._bad = torch.zeros(len(paths), dtype=torch.bool).share_memory_()
        self._reported: Tensor | None = None  # main process: flags already warned about

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        """Full path of sample ``index``."""
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self.paths)
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:
                continue
            path = self.path(i)
            try:
                decoded = self.pipeline.decode(path)
            except MemoryError:
                raise
            except Exception as err:  # a corrupt file can make a decoder raise almost anything
                if self.bad_images == "error":
                    reason = " ".join(f"{type(err).__name__}: {err}".split())
                    raise BadImageError(
                        f"cannot decode image file {path} ({reason}); remove or replace it, or "
                        "pass bad_images='skip' to skip unreadable files"
                    ) from err
                self._bad[i] = True
                continue
            return self.pipeline.transform(decoded), int(self.labels[i])
        raise BadImageError(f"none of the {n} image files under {self.root} could be decoded")

    def bad_paths(self) -> list[str]:
        """Paths of every file found unreadable so far (by any process)."""
        return [self.path(int(i)) for i in self._bad.nonzero().flatten()]

    def report_bad_images(self) -> int:
        """Warn once about the files found unreadable since the last call; returns their count."""
        bad = self._bad.clone()
        new = bad if self._reported is None else bad & ~self._reported
        count = int(new.sum())
        if count:
            examples = ", ".join(self.path(int(i)) for i in new.nonzero().flatten()[:_NUM_EXAMPLES])
            more = ", ..." if count > _NUM_EXAMPLES else ""
            warnings.warn(
                f"skipped {count} unreadable image file(s) under {self.root} "
                f"({int(bad.sum())} of its {len(bad)} files so far): {examples}{more}; each was "
                "replaced by the next readable image. Remove or replace them, or pass "
                "bad_images='error' to stop at the first one",
                BadImageWarning,
                stacklevel=2,
            )
        self._reported = bad
        return count


class _ReportingIterator:
    """Wraps a DataLoader iterator: reports bad images when the pass ends, and stops the workers
    as soon as a :class:`BadImageError` comes out of them."""

    def __init__(self, iterator: Iterator[Any], loader: _ImageFolderLoader) -> None:
        self._iterator = iterator
        self._loader = loader
        self._served = 0
        try:
            self._length: int | None = len(iterator)  # type: ignore[arg-type]
        except TypeError:
            self._length = None

    def __iter__(self) -> _ReportingIterator:
        return self

    def _report(self) -> None:
        self._loader.dataset.report_bad_images()  # type: ignore[attr-defined]

    def __next__(self) -> Any:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._report()
            raise
        except BadImageError:
            # The traceback keeps this iterator alive in a reference cycle; left to the garbage
            # collector, its shutdown finds the queues already closed and waits 5 s per worker
            # for workers that never hear the stop signal. Stop them now, as Lightning does.
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            if getattr(self._loader, "_iterator", None) is self._iterator:
                self._loader._iterator = None  # persistent workers: start afresh next pass
            raise
        self._served += 1
        if self._served == self._length:
            # Every sample of the pass is decoded once its last batch is out. Lightning stops
            # after len(loader) batches and never asks for the StopIteration.
            self._report()
        return batch

    def __len__(self) -> int:
        return len(self._iterator)  # type: ignore[arg-type]


class _ImageFolderLoader(DataLoader):
    """A DataLoader whose passes end with one bad-image report of its dataset.

    A pass cut short (``limit_train_batches``) is reported when the next pass starts, or at
    teardown. Same constructor as DataLoader, so Lightning can rebuild it with a
    DistributedSampler.
    """

    def __iter__(self) -> Any:
        if not isinstance(self.dataset, ImageFolderDataset):
            return super().__iter__()
        # Leftovers from a pass that was cut short; before the workers start on the new pass.
        self.dataset.report_bad_images()
        return _ReportingIterator(super().__iter__(), self)
