"""LightningDataModule for ImageNet (ILSVRC2012) in the standard class-folder layout.

Decoding and augmentation run in the DataLoader worker processes with Pillow (or with
torchvision when it is importable); batches travel to the device as ``uint8`` and are
normalized there, in ``on_after_batch_transfer``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .sampling import global_seed, resumable_loader_kwargs

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "BadImageWarning",
    "ImageFolderDataset",
    "ImageNetDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File extensions (compared case-insensitively) that count as images; other files are ignored.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

_DEFAULT_NUM_CLASSES = 1000
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10
_NUM_EXAMPLES = 3  # example paths named in a bad-image warning
_LAYOUT_HINT = (
    "expected data_dir/train/<class>/<image> and data_dir/val/<class>/<image> "
    "(ILSVRC2012 from image-net.org, validation images sorted into class folders)"
)


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


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `batch_size=True` is a mistake, not a batch size of one.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _channel_stats(name: str, values: Any, positive: bool) -> tuple[float, float, float]:
    """Validate a per-channel mean or std: three finite numbers (positive for std)."""
    try:
        items = [] if isinstance(values, (str, bytes)) else list(values)
        floats = [float(v) for v in items if not isinstance(v, (bool, np.bool_))]
    except (TypeError, ValueError):
        items, floats = [], []
    ok = len(floats) == len(items) == 3 and all(math.isfinite(v) for v in floats)
    if not ok or (positive and min(floats) <= 0):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"{name} must be 3 {kind} (one per RGB channel), got {values!r}")
    return floats[0], floats[1], floats[2]


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


def _few(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


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


@functools.lru_cache(maxsize=1)
def _torchvision_import_error() -> str | None:
    """Why torchvision's decoding and v2 transforms cannot be imported; None if they can."""
    try:
        import torchvision.io
        import torchvision.transforms.v2  # noqa: F401
    except Exception as err:  # a broken install fails in many ways, not only ImportError
        return f"{type(err).__name__}: {err}"
    return None


# --------------------------------------------------------------------------------------------
# Decoding and augmentation. Each pipeline has `decode(path)`, whose failure marks the file as a
# bad image, and `transform(decoded) -> uint8 CHW tensor`, whose failure is a bug and propagates.
# --------------------------------------------------------------------------------------------


def _pil_decode(path: str) -> PILImage.Image:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")  # decodes the whole file: truncated data fails here


def _pil_to_tensor(image: PILImage.Image) -> Tensor:
    # np.array copies into a writable (H, W, 3) array; contiguous CHW so batches stack as NCHW.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` as torchvision's ``RandomResizedCrop`` picks it.

    Same algorithm and same torch RNG calls: up to 10 draws of an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, then a center crop clamped to ``ratio``.
    """
    area = width * height
    # float32 logs, as torchvision computes them, so the same seed gives the same crop.
    log_ratio = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class _PILPipeline:
    """Pillow decoding; torchvision's RandomResizedCrop + flip, or Resize + CenterCrop."""

    def __init__(
        self, train: bool, image_size: int, val_resize: int, min_scale: float, hflip: bool
    ) -> None:
        self.train = train
        self.image_size = image_size
        self.val_resize = val_resize
        self.scale = (min_scale, 1.0)
        self.hflip = hflip

    def decode(self, path: str) -> PILImage.Image:
        return _pil_decode(path)

    def transform(self, image: PILImage.Image) -> Tensor:
        from PIL import Image

        size = self.image_size
        if self.train:
            left, top, w, h = _random_resized_crop_box(
                image.width, image.height, self.scale, _CROP_RATIO
            )
            # Crop, then resize (antialiased), as torchvision does on PIL images. Not
            # resize(box=...): that filters across the box edges and gives other pixels there.
            image = image.crop((left, top, left + w, top + h))
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            if self.hflip and torch.rand(1).item() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            # Shorter side to val_resize (torchvision's Resize(int) rounding), then center crop.
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_long = int(self.val_resize * long / short)
            new_w, new_h = (
                (self.val_resize, new_long) if width <= height else (new_long, self.val_resize)
            )
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
            top = round((new_h - size) / 2.0)
            left = round((new_w - size) / 2.0)
            image = image.crop((left, top, left + size, top + size))
        return _pil_to_tensor(image)


class _TorchvisionPipeline:
    """torchvision.io decoding (Pillow for what it cannot decode) and transforms.v2."""

    def __init__(
        self, train: bool, image_size: int, val_resize: int, min_scale: float, hflip: bool
    ) -> None:
        from torchvision.transforms import v2

        steps: list[Any]
        if train:
            steps = [v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), ratio=_CROP_RATIO)]
            steps += [v2.RandomHorizontalFlip()] if hflip else []
        else:
            steps = [v2.Resize(val_resize), v2.CenterCrop(image_size)]
        self.steps = v2.Compose(steps)

    def decode(self, path: str) -> Tensor:
        from torchvision.io import ImageReadMode, decode_image, read_file

        try:
            return decode_image(read_file(path), mode=ImageReadMode.RGB)
        except Exception:  # e.g. BMP: Pillow decides whether the file is readable at all
            return _pil_to_tensor(_pil_decode(path))

    def transform(self, image: Tensor) -> Tensor:
        return self.steps(image).contiguous()


# --------------------------------------------------------------------------------------------


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


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()  # pragma: no cover - torch < 2.6


class ImageNetDataModule(LightningDataModule):
    """ImageNet (ILSVRC2012) from class folders, decoded in DataLoader workers.

    Expects ``data_dir/train/<class>/<image>`` and ``data_dir/val/<class>/<image>``; classes are
    the sorted folder names of ``train/`` (label = index), and ``val/`` must hold the same set.
    ImageNet cannot be downloaded automatically: get ILSVRC2012 from image-net.org and sort the
    validation images into class folders (e.g. with the widely used ``valprep.sh``). Files with
    extensions in :data:`IMAGE_EXTENSIONS` (any case) are images; other files and hidden entries
    (``.``-prefixed, such as macOS ``._*`` files) are ignored.

    Training samples get torchvision's ``RandomResizedCrop`` (area fraction in
    ``[min_scale, 1]``, aspect ratio in ``[3/4, 4/3]``, 10 attempts then a center crop) to
    ``image_size`` and, with ``hflip``, a random horizontal flip; validation samples are resized
    so the shorter side is ``val_resize``, then center-cropped to ``image_size``. Workers return
    ``uint8`` tensors; ``on_after_batch_transfer`` converts each batch on the device to float32
    ``(x / 255 - mean) / std``, so host-to-device traffic is a quarter of float32's. Call
    :meth:`normalize` yourself when iterating the loaders outside a Trainer.

    Files are listed in ``setup`` (``train/`` only for ``fit``) but only decoded when loaded, so a
    corrupt file is found when it is first read. With ``bad_images="skip"`` it is replaced by the
    next readable image, never tried again, and each pass over a dataset that found new bad files
    ends with one :class:`BadImageWarning` giving their count and a few paths (a pass cut short by
    ``limit_*_batches`` is reported when the next one starts, or at teardown; under DDP each
    process reports its own shard). With ``"error"`` the first one raises :class:`BadImageError`.

    Training batches are shuffled by an :class:`~scl_lightning.data.sampling.EpochShuffleSampler`
    (an order per ``(seed, epoch)``, so a resumed run reads the same batches); under DDP
    Lightning replaces it with a ``DistributedSampler``. Random crops and flips run in the
    DataLoader's workers, seeded per worker: a run resumed mid-epoch reads the same images in the
    same order but draws new crops for the rest of that epoch. ``test_dataloader`` and
    ``predict_dataloader`` return the validation split.

    Args:
        data_dir: Folder holding ``train/`` and ``val/``.
        batch_size: Images per batch on each device (process): the global batch under DDP is
            ``batch_size * world_size`` (times ``accumulate_grad_batches``).
        num_workers: Decoding worker processes per device (process); ``0`` decodes in the main
            process. JPEG decoding is CPU-bound: a GPU typically needs 8 or more.
        image_size: Side of the square crops the model sees.
        val_resize: Shorter side of validation images before the center crop; at least
            ``image_size``.
        min_scale: Smallest area fraction of a training crop, in ``(0, 1]``.
        hflip: Flip training images horizontally with probability 1/2.
        mean: Per-channel mean subtracted after scaling pixels to ``[0, 1]``.
        std: Per-channel standard deviation (positive) divided by after subtracting ``mean``.
        pin_memory: Pin batches in page-locked memory when an accelerator is present.
        bad_images: ``"skip"`` unreadable image files (warn), or ``"error"`` on the first one.
        use_torchvision: Decode with ``torchvision.io`` and augment with
            ``torchvision.transforms.v2`` (``True``), with Pillow (``False``), or with torchvision
            when it can be imported and Pillow otherwise (``None``). Resolved in ``setup``; the
            Pillow path reproduces torchvision's crop geometry and random draws.
        num_classes: Expected number of classes. ``None`` counts the class folders of ``train/``
            in ``__init__`` (1000 when it cannot be listed yet); a number must match that count.

    Raises:
        ValueError: In ``__init__``, if an argument is out of range or of the wrong type, or
            ``num_classes`` differs from the class folders found. In ``setup``, if a split has no
            class folders, a class folder holds no image files, ``val/`` classes differ from
            ``train/``, or ``use_torchvision=True`` and torchvision cannot be imported.
        FileNotFoundError: In ``setup``, if ``data_dir``, ``train/`` or ``val/`` is missing
            (``NotADirectoryError`` if it is a file).
        BadImageError: While loading, with ``bad_images="error"``, naming the unreadable file.

    Attributes:
        num_classes: Number of classes, available right after ``__init__``.
        input_shape: ``(3, image_size, image_size)``, available right after ``__init__``.
        classes: Sorted class folder names (``None`` before ``setup``).

    Example::

        >>> dm = ImageNetDataModule("/path/to/imagenet", batch_size=64, image_size=160)
        >>> dm.num_classes, dm.input_shape
        (1000, (3, 160, 160))
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> x.dtype, x.shape  # doctest: +SKIP
        (torch.uint8, torch.Size([64, 3, 160, 160]))
        >>> dm.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))[0, :, 0, 0]
        tensor([2.2489, 2.4286, 2.6400])
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        val_resize: int = 256,
        min_scale: float = 0.08,
        hflip: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        pin_memory: bool = True,
        bad_images: Literal["skip", "error"] = "skip",
        use_torchvision: bool | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)) or not os.fspath(data_dir):
            raise ValueError(f"data_dir must be a non-empty path, got {data_dir!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not _is_int(image_size) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if not _is_int(val_resize) or val_resize < image_size:
            raise ValueError(
                f"val_resize must be an integer of at least image_size={image_size}, "
                f"got {val_resize!r}"
            )
        if (
            not isinstance(min_scale, (int, float, np.floating))
            or isinstance(min_scale, bool)
            or not 0.0 < float(min_scale) <= 1.0
        ):
            raise ValueError(f"min_scale must be a number in (0, 1], got {min_scale!r}")
        for name, flag in (("hflip", hflip), ("pin_memory", pin_memory)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        mean_t = _channel_stats("mean", mean, positive=False)
        std_t = _channel_stats("std", std, positive=True)
        if bad_images not in ("skip", "error"):
            raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
        if use_torchvision is not None and not isinstance(use_torchvision, bool):
            raise ValueError(
                f"use_torchvision must be None, True or False, got {use_torchvision!r}"
            )
        if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive integer, got {num_classes!r}")
        # num_classes may be None here and is counted below; the CLI links the count into the
        # model, whose hparams record it. Saving the None here too would make Lightning refuse
        # to log the two together ("different values").
        self.save_hyperparameters(ignore=["num_classes"])

        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.image_size = int(image_size)
        self.val_resize = int(val_resize)
        self.min_scale = float(min_scale)
        self.hflip = bool(hflip)
        self.mean = mean_t
        self.std = std_t
        self.pin_memory = bool(pin_memory)
        self.bad_images: Literal["skip", "error"] = bad_images
        self.use_torchvision = use_torchvision

        # LightningCLI links num_classes into the model when it instantiates both, before setup:
        # count the class folders now (one directory listing), when they are already there.
        found = _count_class_dirs(self.data_dir / "train")
        if num_classes is not None and found and found != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but {self.data_dir / 'train'} holds {found} class "
                "folders; pass num_classes=None to use the folder count"
            )
        self.num_classes: int = int(num_classes or found or _DEFAULT_NUM_CLASSES)
        self.input_shape: tuple[int, int, int] = (3, self.image_size, self.image_size)

        self.classes: list[str] | None = None
        self.backend: Literal["pil", "torchvision"] | None = None  # resolved in setup
        self.train_dataset: ImageFolderDataset | None = None
        self.val_dataset: ImageFolderDataset | None = None
        self._stats_on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _resolve_backend(self) -> Literal["pil", "torchvision"]:
        if self.use_torchvision is False:
            return "pil"
        error = _torchvision_import_error()
        if error is None:
            return "torchvision"
        if self.use_torchvision:
            raise ValueError(
                f"use_torchvision=True but torchvision cannot be imported ({error}); install "
                "torchvision or pass use_torchvision=None to fall back to Pillow"
            )
        return "pil"

    def _pipeline(self, train: bool) -> _PILPipeline | _TorchvisionPipeline:
        cls = _TorchvisionPipeline if self.backend == "torchvision" else _PILPipeline
        return cls(train, self.image_size, self.val_resize, self.min_scale, self.hflip)

    def setup(self, stage: str | None = None) -> None:
        """List the files of the splits ``stage`` needs (``train/`` only for ``fit``).

        Checks the layout and the class sets first, so a wrong ``data_dir`` fails before the
        (possibly long) listing of ``train/``. Later calls only add what is missing.
        """
        need_train = stage in (None, "fit")
        if self.val_dataset is not None and (self.train_dataset is not None or not need_train):
            return
        _require_dir(self.data_dir, "data_dir")
        train_dir, val_dir = self.data_dir / "train", self.data_dir / "val"
        if need_train:
            _require_dir(train_dir, "training folder")
        _require_dir(val_dir, "validation folder")

        # Labels are defined by train/: a validate-only run may lack it and uses val/ instead.
        class_source = train_dir if train_dir.is_dir() else val_dir
        classes = _split_classes(class_source)
        if len(classes) != self.num_classes:
            raise ValueError(
                f"found {len(classes)} class folders in {class_source} but "
                f"num_classes={self.num_classes} (counted when the DataModule was created); "
                "create the DataModule after the data is in place"
            )
        val_classes = _split_classes(val_dir)
        if val_classes != classes:
            missing = sorted(set(classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(classes))
            raise ValueError(
                f"class folders of {val_dir} differ from those of {class_source}: "
                f"{len(missing)} missing ({_few(missing)}), {len(extra)} extra ({_few(extra)})"
            )
        self.classes = classes
        if self.backend is None:
            self.backend = self._resolve_backend()

        if self.val_dataset is None:
            paths, labels = _scan_split(val_dir, classes)
            self.val_dataset = ImageFolderDataset(
                val_dir, paths, labels, self._pipeline(train=False), self.bad_images
            )
        if need_train and self.train_dataset is None:
            paths, labels = _scan_split(train_dir, classes)
            self.train_dataset = ImageFolderDataset(
                train_dir, paths, labels, self._pipeline(train=True), self.bad_images
            )

    def teardown(self, stage: str | None = None) -> None:
        """Report bad images found in passes that were cut short (``limit_*_batches``)."""
        for dataset in (self.train_dataset, self.val_dataset):
            if dataset is not None:
                dataset.report_bad_images()

    def _loader(self, dataset: ImageFolderDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                "ImageNetDataModule has no data yet: call setup() before asking for a dataloader"
            )
        return _ImageFolderLoader(
            dataset,
            batch_size=self.batch_size,
            pin_memory=self.pin_memory and _accelerator_available(),
            **resumable_loader_kwargs(
                dataset, shuffle=shuffle, seed=global_seed(), num_workers=self.num_workers
            ),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches of ``(uint8 images, int64 labels)``."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (resize + center crop), in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The validation split: ILSVRC2012's test labels are not public."""
        return self._loader(self.val_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation split, in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8`` images ``(N, 3, H, W)`` to float32 ``(x / 255 - mean) / std``, on device."""
        stats = self._stats_on.get(images.device)
        if stats is None:
            mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
            # Fold the 1/255 in: x * (1 / (255 std)) - mean / std, one multiply-add per pixel.
            stats = self._stats_on[images.device] = (1.0 / (255.0 * std), mean / std)
        scale, shift = stats
        return torch.addcmul(-shift, images.float(), scale)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalize the ``uint8`` images of a ``(images, labels)`` batch, now on the device."""
        if (
            isinstance(batch, (list, tuple))
            and len(batch) == 2
            and isinstance(batch[0], Tensor)
            and batch[0].dtype == torch.uint8
        ):
            images, labels = batch
            normalized = [self.normalize(images), labels]
            batch = normalized if isinstance(batch, list) else tuple(normalized)
            # Lightning converts inputs for "*-true" precisions before the transfer, when they
            # were still uint8: convert the float images now (no-op for 32-true and *-mixed).
            plugin = getattr(self.trainer, "precision_plugin", None)
            if plugin is not None:
                batch = plugin.convert_input(batch)
        return batch
