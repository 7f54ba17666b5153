"""LightningDataModules for CIFAR-10 and CIFAR-100, read from the official python-version archives.

Design, for speed and for DDP:

- The whole dataset lives in memory as one ``uint8`` tensor ``(N, 3, 32, 32)`` (150 MB for the
  50,000 training images). :class:`InMemoryImageDataset` implements ``__getitems__``, which
  PyTorch's DataLoader calls with the indices of a whole batch, so a batch is one ``index_select``
  and no per-image Python runs; the DataLoader's ``collate_fn`` passes that batch through.
- Training batches are ordered by an :class:`EpochShuffleSampler` (a ``RandomSampler``) and eval
  batches by a ``SequentialSampler``. Under DDP, Lightning (``use_distributed_sampler=True``, the
  default) replaces both by a ``DistributedSampler(seed=PL_GLOBAL_SEED)`` and calls its
  ``set_epoch`` every epoch, so each rank reads its own shard, reshuffled every epoch,
  reproducibly.
- Augmentation (pad-and-crop, flip, Cutout) and normalization run per batch, vectorized, on the
  device of the model, in :meth:`on_after_batch_transfer`, so the host only moves ``uint8`` bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from scl_lightning._utils import is_int

from ._archive import ArchiveError, check_md5, download_file, restricted_pickle_load, safe_extract
from ._memory import (
    InMemoryDataModule,
    InMemoryImageDataset,
    _is_bool,
    check_loader_args,
    holdout_split,
)
from .sampling import EpochShuffleSampler
from .transforms import BatchAugment

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "EpochShuffleSampler",
    "InMemoryImageDataset",
]

_IMAGE_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32


def _str_keys(obj: Any) -> Any:
    """Python 3 pickles of the CIFAR format have bytes keys, Python 2 ones (read as latin-1) str."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class CIFARDataModule(InMemoryDataModule):
    """Common base of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`; use those.

    Images are ``uint8`` tensors ``(N, 3, 32, 32)`` in memory; batches leave the DataLoaders as
    ``(uint8 images, int64 labels)`` and become float32, normalized (and augmented, in training)
    in :meth:`on_after_batch_transfer`, on the device of the model. So a model that reads batches
    from these DataLoaders outside a Trainer must apply ``dm.on_after_batch_transfer(batch, 0)``
    or ``dm.batch_transform`` itself.

    Args:
        data_dir: Folder holding the archive and the folder extracted from it; created on download.
        batch_size: Samples per batch and per device: under DDP with ``N`` processes, an
            optimizer step sees ``N * batch_size`` samples.
        num_workers: DataLoader worker processes. Batches are single tensor indexing operations
            from memory, so ``0`` (load in the main process) is usually fastest.
        download: Let :meth:`prepare_data` download the archive when neither it nor the extracted
            folder is in ``data_dir``.
        val_split: Fraction of the training set held out for validation, in ``[0, 1)``; ``0``
            (default) validates on the official test set.
        split_seed: Seed of the hold-out split (non-negative, below ``2**32``), independent of
            the global seed so that the validation set is the same across training seeds.
        seed: Seed of the training order (and of the augmentation noise) in a single process;
            ``None`` takes ``PL_GLOBAL_SEED``, set by ``seed_everything`` (0 when unset). Under
            DDP, Lightning's ``DistributedSampler`` orders the data, seeded by ``PL_GLOBAL_SEED``.
        augment: Augment training batches (random crop, flip, Cutout, as configured below).
        crop_padding: Zero padding before the random 32x32 crop; ``0`` disables the crop.
        flip: Random horizontal flips.
        cutout: Side of the Cutout square; ``0`` (default) disables it.
        normalize: Standardize with ``mean`` and ``std``; otherwise only scale to ``[0, 1]``.
        mean: Per-channel mean in ``[0, 1]`` units; ``None`` uses the dataset's training-set mean.
        std: Per-channel standard deviation; ``None`` uses the dataset's training-set value.
        pin_memory: Pin batches in page-locked memory (faster copies to the device) when an
            accelerator is present; ignored on CPU-only machines.

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Attributes:
        num_classes: Number of classes, available right after ``__init__``.
        input_shape: Shape of one image, ``(3, 32, 32)``, available right after ``__init__``.
        class_names: Class names from the dataset's meta file, set by :meth:`setup`.
        batch_transform: The :class:`~scl_lightning.data.transforms.BatchAugment` applied by
            :meth:`on_after_batch_transfer`.
    """

    # Filled in by the concrete subclasses.
    ARCHIVE_NAME: ClassVar[str]
    ARCHIVE_URL: ClassVar[str]
    ARCHIVE_MD5: ClassVar[str]
    FOLDER_NAME: ClassVar[str]
    TRAIN_FILES: ClassVar[tuple[str, ...]]
    TEST_FILES: ClassVar[tuple[str, ...]]
    META_FILE: ClassVar[str]
    LABEL_KEY: ClassVar[str]
    CLASS_NAMES_KEY: ClassVar[str]
    NUM_CLASSES: ClassVar[int]
    MEAN: ClassVar[tuple[float, float, float]]
    STD: ClassVar[tuple[float, float, float]]
    DISPLAY_NAME: ClassVar[str]

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = True,
        val_split: float = 0.0,
        split_seed: int = 0,
        seed: int | None = None,
        augment: bool = True,
        crop_padding: int = 4,
        flip: bool = True,
        cutout: int = 0,
        normalize: bool = True,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if type(self) is CIFARDataModule:
            raise TypeError(
                "CIFARDataModule is a base class: use CIFAR10DataModule or CIFAR100DataModule"
            )
        if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
            raise ValueError(f"data_dir must be a non-empty path, got {data_dir!r}")
        check_loader_args(
            batch_size=batch_size,
            num_workers=num_workers,
            split_seed=split_seed,
            seed=seed,
            download=download,
            augment=augment,
            flip=flip,
            normalize=normalize,
            pin_memory=pin_memory,
        )
        if (
            not isinstance(val_split, (int, float, np.floating))
            or _is_bool(val_split)
            or not 0.0 <= float(val_split) < 1.0
        ):
            raise ValueError(f"val_split must be a number in [0, 1), got {val_split!r}")
        if not is_int(crop_padding) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {crop_padding!r}")
        if not is_int(cutout) or not 0 <= cutout <= 32:
            raise ValueError(
                f"cutout must be an integer in [0, 32] (0 disables it), got {cutout!r}"
            )
        mean_t = self._check_stats("mean", mean, self.MEAN)
        std_t = self._check_stats("std", std, self.STD)
        if any(s <= 0 for s in std_t):
            raise ValueError(f"std must be positive in every channel, got {std!r}")
        self.save_hyperparameters()

        self.data_dir = Path(data_dir)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.download = bool(download)
        self.val_split = float(val_split)
        self.split_seed = int(split_seed)
        self.seed = None if seed is None else int(seed)
        self.augment = bool(augment)
        self.normalize = bool(normalize)
        self.pin_memory = bool(pin_memory)
        self.mean: tuple[float, ...] = mean_t if normalize else (0.0, 0.0, 0.0)
        self.std: tuple[float, ...] = std_t if normalize else (1.0, 1.0, 1.0)

        self.num_classes: int = self.NUM_CLASSES
        self.input_shape: tuple[int, int, int] = _IMAGE_SHAPE
        self.class_names: list[str] | None = None
        self.batch_transform = BatchAugment(
            self.mean,
            self.std,
            crop_padding=int(crop_padding) if augment else 0,
            flip=bool(flip) and bool(augment),
            cutout=int(cutout) if augment else 0,
        )

        self.train_dataset: InMemoryImageDataset | None = None
        self.val_dataset: InMemoryImageDataset | None = None
        self.test_dataset: InMemoryImageDataset | None = None
        self._reset_augment_rng()

    @staticmethod
    def _check_stats(
        name: str, value: Sequence[float] | None, default: tuple[float, float, float]
    ) -> tuple[float, ...]:
        if value is None:
            return tuple(default)
        if (
            isinstance(value, (str, bytes))
            or not isinstance(value, Sequence)
            or len(value) != 3
            or not all(
                isinstance(v, (int, float, np.number)) and not _is_bool(v) and math.isfinite(v)
                for v in value
            )
        ):
            raise ValueError(f"{name} must be None or three finite numbers, got {value!r}")
        return tuple(float(v) for v in value)

    @property
    def held_out_test(self) -> bool:
        """Whether the test set is read by nothing but ``test``/``predict`` (``val_split > 0``);
        ``scl fit`` then tests the final model on it."""
        return self.val_split > 0

    # ------------------------------------------------------------------ files

    @property
    def folder(self) -> Path:
        """The folder extracted from the archive."""
        return self.data_dir / self.FOLDER_NAME

    @property
    def archive(self) -> Path:
        """Where the archive is expected (and downloaded to)."""
        return self.data_dir / self.ARCHIVE_NAME

    def _missing_files(self) -> list[str]:
        names = (*self.TRAIN_FILES, *self.TEST_FILES, self.META_FILE)
        return [name for name in names if not (self.folder / name).is_file()]

    def _where_to_get_it(self) -> str:
        return (
            f"put {self.ARCHIVE_NAME} from {self.ARCHIVE_URL} (MD5 {self.ARCHIVE_MD5}) in "
            f"{self.data_dir.resolve()}"
        )

    def _raise_incomplete(self, missing: list[str]) -> None:
        raise FileNotFoundError(
            f"{self.folder.resolve()} is incomplete ({', '.join(missing)} missing): delete that "
            f"folder so that prepare_data() extracts {self.ARCHIVE_NAME} again"
        )

    def prepare_data(self) -> None:
        """Make sure the extracted dataset is in ``data_dir``: extract the archive if the folder
        is missing, downloading it first when it is missing too and ``download`` is set.

        Lightning calls this once per node, before :meth:`setup`. The archive's MD5 is checked
        before extraction; a bad archive is moved aside, never deleted (see ``_archive.py``).

        Raises:
            FileNotFoundError: If the data is missing and cannot be downloaded (``download=False``,
                or no network), or the extracted folder is incomplete; the message says which
                file to put where.
            NotADirectoryError: If ``data_dir`` is a file.
            ValueError: If the archive fails its checksum, is truncated or corrupt, or has a
                member that would land outside ``data_dir``.
        """
        root = self.data_dir
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"data_dir {root.resolve()} is not a directory")
        if self.folder.is_dir():
            missing = self._missing_files()
            if missing:
                self._raise_incomplete(missing)
            return
        if not self.archive.is_file():
            if not self.download:
                if not root.is_dir():
                    raise FileNotFoundError(
                        f"data_dir {root.resolve()} does not exist and download=False: create it "
                        f"and {self._where_to_get_it()}, or set download=True"
                    )
                raise FileNotFoundError(
                    f"{self.DISPLAY_NAME} not found in {root.resolve()} and download=False: "
                    f"{self._where_to_get_it()}, or set download=True"
                )
            download_file(self.ARCHIVE_URL, self.archive, self.ARCHIVE_MD5)
        else:
            check_md5(
                self.archive,
                self.ARCHIVE_MD5,
                hint=(
                    "run again to download a fresh copy"
                    if self.download
                    else f"{self._where_to_get_it()}, or set download=True"
                ),
            )
        safe_extract(self.archive, root)
        missing = self._missing_files()
        if missing:
            raise ArchiveError(
                f"{self.archive} did not provide {self.FOLDER_NAME}/ with {', '.join(missing)}: "
                f"it is not the official {self.DISPLAY_NAME} archive; {self._where_to_get_it()}"
            )

    def _load_batches(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        def validate(obj: Any) -> None:
            d = _str_keys(obj)
            data, labels = d.get("data"), d.get(self.LABEL_KEY)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
                raise ValueError("'data' must be a uint8 array of shape (N, 3072)")
            if data.shape[1] != _PIXELS:
                raise ValueError(f"'data' must have {_PIXELS} columns, found {data.shape[1]}")
            if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
                raise ValueError(f"{self.LABEL_KEY!r} must be a list of {len(data)} labels")
            y = np.asarray(labels)
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{self.LABEL_KEY!r} must hold integers")
            if len(y) and (y.min() < 0 or y.max() >= self.NUM_CLASSES):
                raise ValueError(
                    f"{self.LABEL_KEY!r} must lie in [0, {self.NUM_CLASSES}), found "
                    f"[{y.min()}, {y.max()}]"
                )

        images, labels = [], []
        for name in names:
            d = _str_keys(restricted_pickle_load(self.folder / name, validate=validate))
            images.append(d["data"])
            labels.append(np.asarray(d[self.LABEL_KEY], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(images)).reshape(-1, *_IMAGE_SHAPE)
        return x, torch.from_numpy(np.concatenate(labels))

    def _load_class_names(self) -> list[str]:
        def validate(obj: Any) -> None:
            names = _str_keys(obj).get(self.CLASS_NAMES_KEY)
            if not isinstance(names, list) or len(names) != self.NUM_CLASSES:
                raise ValueError(f"{self.CLASS_NAMES_KEY!r} must list {self.NUM_CLASSES} names")
            if not all(isinstance(n, (str, bytes)) for n in names):
                raise ValueError(f"{self.CLASS_NAMES_KEY!r} must hold strings")

        meta = _str_keys(restricted_pickle_load(self.folder / self.META_FILE, validate=validate))
        names = meta[self.CLASS_NAMES_KEY]
        return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs into memory (the training set for ``fit``, the test set for
        ``test``/``predict`` and for validation when ``val_split=0``); later calls reuse it.

        Raises:
            FileNotFoundError: If the extracted folder is missing or incomplete: run
                :meth:`prepare_data` first (the Trainer does).
            ValueError: If a data file is corrupt or not in the CIFAR format.
        """
        holdout = self.val_split > 0
        need_train = stage in (None, "fit") or (stage == "validate" and holdout)
        need_test = stage in (None, "test", "predict") or (
            stage in ("fit", "validate") and not holdout
        )
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"no {self.DISPLAY_NAME} in {self.data_dir.resolve()} ({self.FOLDER_NAME}/ is "
                f"missing): call prepare_data() first (the Trainer does), with download=True or "
                f"after you {self._where_to_get_it()}"
            )
        missing = self._missing_files()
        if missing:
            self._raise_incomplete(missing)
        if self.class_names is None:
            self.class_names = self._load_class_names()
        if need_train and self.train_dataset is None:
            x, y = self._load_batches(self.TRAIN_FILES)
            if holdout:
                num_val = math.ceil(self.val_split * len(y))
                if num_val >= len(y):
                    raise ValueError(
                        f"val_split={self.val_split} holds out all {len(y)} training images; "
                        f"use a smaller value"
                    )
                train_idx, val_idx = holdout_split(len(y), num_val, self.split_seed)
                self.val_dataset = InMemoryImageDataset(x[val_idx], y[val_idx])
                x, y = x[train_idx], y[train_idx]
            self.train_dataset = InMemoryImageDataset(x, y)
        if need_test and self.test_dataset is None:
            self.test_dataset = InMemoryImageDataset(*self._load_batches(self.TEST_FILES))
            if not holdout:
                self.val_dataset = self.test_dataset


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images of 10 classes, 32x32 RGB).

    Reads ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` extracted from the
    official ``cifar-10-python.tar.gz`` in ``data_dir``, downloading and checking it first if
    needed. The pickled batch files are loaded with a restricted unpickler that resolves only what
    numpy arrays need, so a tampered file cannot run code. Normalization defaults to the
    training-set per-channel mean ``(0.4914, 0.4822, 0.4465)`` and standard deviation
    ``(0.2470, 0.2435, 0.2616)``. All arguments are described in :class:`CIFARDataModule`.

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Example::

        >>> dm = CIFAR10DataModule(data_dir="data", batch_size=256, cutout=16)
        >>> dm.num_classes, dm.input_shape
        (10, (3, 32, 32))
        >>> dm.batch_transform.cutout, dm.mean
        (16, (0.4914, 0.4822, 0.4465))
    """

    ARCHIVE_NAME = "cifar-10-python.tar.gz"
    ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
    FOLDER_NAME = "cifar-10-batches-py"
    TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
    TEST_FILES = ("test_batch",)
    META_FILE = "batches.meta"
    LABEL_KEY = "labels"
    CLASS_NAMES_KEY = "label_names"
    NUM_CLASSES = 10
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)
    DISPLAY_NAME = "CIFAR-10"


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (50,000 training and 10,000 test images of 100 fine classes, 32x32 RGB).

    Reads ``cifar-100-python/{train, test, meta}`` extracted from the official
    ``cifar-100-python.tar.gz`` in ``data_dir``, downloading and checking it first if needed, and
    uses the 100 ``fine_labels``. The pickled files are loaded with a restricted unpickler that
    resolves only what numpy arrays need, so a tampered file cannot run code. Normalization
    defaults to the training-set per-channel mean ``(0.5071, 0.4865, 0.4409)`` and standard
    deviation ``(0.2673, 0.2564, 0.2762)``. All arguments are described in
    :class:`CIFARDataModule`.

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Example::

        >>> dm = CIFAR100DataModule(data_dir="data", val_split=0.1)
        >>> dm.num_classes, dm.input_shape
        (100, (3, 32, 32))
    """

    ARCHIVE_NAME = "cifar-100-python.tar.gz"
    ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
    FOLDER_NAME = "cifar-100-python"
    TRAIN_FILES = ("train",)
    TEST_FILES = ("test",)
    META_FILE = "meta"
    LABEL_KEY = "fine_labels"
    CLASS_NAMES_KEY = "fine_label_names"
    NUM_CLASSES = 100
    MEAN = (0.5071, 0.4865, 0.4409)
    STD = (0.2673, 0.2564, 0.2762)
    DISPLAY_NAME = "CIFAR-100"
