"""LightningDataModules for MNIST and Fashion-MNIST, read from the four official IDX files.

Both read ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (or the same names without
``.gz``) through one reader (:mod:`scl_lightning.data.idx`), keep the images as ``uint8`` in
memory, and normalize (and optionally augment) per batch on the model's device, as the CIFAR
DataModules do (:class:`~scl_lightning.data._memory.InMemoryDataModule`).

Where the files are looked for, when ``data_dir`` is not given (the first folder holding all four
files wins):

1. ``$SCL_DATA_DIR/<name>`` when ``SCL_DATA_DIR`` is set;
2. ``~/.cache/scl-lightning/<name>``;
3. for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist``, where Debian's
   ``dataset-fashion-mnist`` package puts them (``make data`` installs it when run as root).

``<name>`` is ``mnist`` or ``fashion-mnist``. Downloads (``download=True``) go to the first
folder of that list, from the upstream URLs, each checked against its published MD5 before it is
renamed into place.

Each file is verified when it is read: its IDX header and size, and, where the SHA-256 of the
decompressed content is known (Fashion-MNIST, see DESIGN.md), that checksum, so the upstream
``.gz`` files and Debian's re-compressed ones are both accepted. A bad file is one error naming it
and is never deleted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from typing_extensions import override

from scl_lightning._utils import is_int

from ._archive import ArchiveError, DownloadError, download_file
from ._memory import (
    InMemoryDataModule,
    InMemoryImageDataset,
    check_loader_args,
    holdout_split,
)
from .idx import read_idx
from .transforms import BatchAugment

__all__ = ["FashionMNISTDataModule", "IDXDataModule", "MNISTDataModule", "default_data_dirs"]

_SPLITS = ("train", "t10k")


def _files(split: str) -> tuple[str, str]:
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def default_data_dirs(name: str, system_dirs: tuple[str, ...] = ()) -> list[Path]:
    """Where a dataset called ``name`` is looked for, in order (see the module docstring)."""
    dirs = []
    root = os.environ.get("SCL_DATA_DIR")
    if root:
        dirs.append(Path(root).expanduser() / name)
    dirs.append(Path("~/.cache/scl-lightning").expanduser() / name)
    dirs.extend(Path(d) for d in system_dirs)
    return dirs


class IDXDataModule(InMemoryDataModule):
    """Common base of :class:`MNISTDataModule` and :class:`FashionMNISTDataModule`; use those.

    Batches leave the DataLoaders as ``(uint8 images (N, 1, 28, 28), int64 labels)`` and become
    float32, normalized (and augmented, when ``augment`` is set, in training) in
    :meth:`on_after_batch_transfer` on the model's device. A model fed from these DataLoaders
    outside a Trainer must apply ``dm.on_after_batch_transfer(batch, 0)`` itself.

    Splits: ``val_size`` images of the 60,000 training images are held out for validation (a
    permutation seeded by ``split_seed`` only: the same split for every training seed); ``fit``
    trains on the rest. ``test``/``predict`` use the official 10,000 test images, which nothing
    else reads. ``val_size=0`` validates on the test set (then do not tune on it).

    Args:
        data_dir: Folder with the four files; ``None`` looks in the default folders (module
            docstring) and downloads to the first of them.
        batch_size: Samples per batch and per device.
        num_workers: DataLoader worker processes; ``0`` (batches are one tensor index from memory)
            is usually fastest.
        download: Let :meth:`prepare_data` download missing files from the upstream URLs.
        val_size: Training images held out for validation (default 5,000: 55,000 / 5,000).
        split_seed: Seed of the hold-out split, in ``[0, 2**32)``.
        seed: Seed of the training order and augmentation noise; ``None`` takes
            ``PL_GLOBAL_SEED`` (set by ``seed_everything``).
        augment: Augment training batches: random crop after ``crop_padding`` zero pixels, and
            horizontal flips when ``flip`` (Fashion-MNIST only makes sense; digits are not
            mirror-symmetric).
        crop_padding: Padding of the random 28x28 crop when augmenting; ``0`` disables it.
        flip: Random horizontal flips when augmenting.
        normalize: Standardize with the training set's mean and standard deviation; otherwise
            only scale to ``[0, 1]``.
        pin_memory: Pin batches when an accelerator is present; ignored on CPU-only machines.

    Raises:
        ValueError: If an argument is out of range or of the wrong type.
    """

    NAME: ClassVar[str]
    DISPLAY_NAME: ClassVar[str]
    URLS: ClassVar[tuple[str, ...]]
    # file name (without .gz) -> MD5 of the upstream .gz file (checked on download)
    GZ_MD5: ClassVar[dict[str, str]]
    # file name -> SHA-256 of the decompressed content; None where it is not pinned
    CONTENT_SHA256: ClassVar[dict[str, str] | None]
    SYSTEM_DIRS: ClassVar[tuple[str, ...]] = ()
    MEAN: ClassVar[float]
    STD: ClassVar[float]
    CLASS_NAMES: ClassVar[tuple[str, ...]]
    # images per file: the official counts (a subclass for a smaller IDX dataset may change them)
    NUM_SAMPLES: ClassVar[dict[str, int]] = {"train": 60_000, "t10k": 10_000}

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int | None = None,
        augment: bool = False,
        crop_padding: int = 2,
        flip: bool = False,
        normalize: bool = True,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if type(self) is IDXDataModule:
            raise TypeError("IDXDataModule is a base class: use MNISTDataModule or FashionMNIST")
        if data_dir is not None and (
            not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir)
        ):
            raise ValueError(f"data_dir must be None or a non-empty path, got {data_dir!r}")
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
        if not is_int(val_size) or not 0 <= val_size < self.NUM_SAMPLES["train"]:
            raise ValueError(
                f"val_size must be an integer in [0, {self.NUM_SAMPLES['train']}), got {val_size!r}"
            )
        if not is_int(crop_padding) or not 0 <= crop_padding <= 14:
            raise ValueError(f"crop_padding must be an integer in [0, 14], got {crop_padding!r}")
        self.save_hyperparameters()

        self.data_dir = None if data_dir is None else Path(data_dir)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.download = bool(download)
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        self.seed = None if seed is None else int(seed)
        self.augment = bool(augment)
        self.normalize = bool(normalize)
        self.pin_memory = bool(pin_memory)
        self.mean = self.MEAN if normalize else 0.0
        self.std = self.STD if normalize else 1.0

        self.num_classes: int = len(self.CLASS_NAMES)
        self.input_shape: tuple[int, int, int] = (1, 28, 28)
        self.class_names: list[str] = list(self.CLASS_NAMES)
        self.batch_transform = BatchAugment(
            (self.mean,),
            (self.std,),
            crop_padding=int(crop_padding) if augment else 0,
            flip=bool(flip) and bool(augment),
        )
        self.train_dataset: InMemoryImageDataset | None = None
        self.val_dataset: InMemoryImageDataset | None = None
        self.test_dataset: InMemoryImageDataset | None = None
        self._reset_augment_rng()

    # ------------------------------------------------------------------ files

    @classmethod
    def file_names(cls) -> list[str]:
        """The four file names, without ``.gz``."""
        return [name for split in _SPLITS for name in _files(split)]

    def candidate_dirs(self) -> list[Path]:
        """The folders looked in, in order: ``[data_dir]`` when given, else the defaults."""
        if self.data_dir is not None:
            return [self.data_dir]
        return default_data_dirs(self.NAME, self.SYSTEM_DIRS)

    @staticmethod
    def _find(folder: Path, name: str) -> Path | None:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
        return None

    def _missing_in(self, folder: Path) -> list[str]:
        return [n for n in self.file_names() if self._find(folder, n) is None]

    @property
    def folder(self) -> Path | None:
        """The first candidate folder holding all four files, or ``None``."""
        for folder in self.candidate_dirs():
            if folder.is_dir() and not self._missing_in(folder):
                return folder
        return None

    def _not_found(self, why: str, downloaded: bool = False) -> FileNotFoundError:
        where = ", ".join(str(d) for d in self.candidate_dirs())
        advice = (
            "run `make data` to install it, or pass data_dir= a folder with the four *-ubyte.gz "
            "files"
        )
        if downloaded:
            advice = (
                "without network access, put the four *-ubyte.gz files in one of those folders "
                "(as root on Debian/Ubuntu, `make data` installs Fashion-MNIST's package)"
            )
        elif not self.download:
            advice += ", or download=True"
        return FileNotFoundError(
            f"{self.DISPLAY_NAME} not found ({why}; looked in {where}): {advice}"
        )

    def prepare_data(self) -> None:
        """Make sure the four files are in a candidate folder, downloading the missing ones into
        the first candidate when ``download`` is set. Lightning calls this once per node.

        Raises:
            FileNotFoundError: If the files are missing and cannot be downloaded; the message
                says to run ``make data``.
            NotADirectoryError: If ``data_dir`` is a file.
            ValueError: If a downloaded file fails its MD5 (kept aside as ``*.bad``).
        """
        if self.data_dir is not None and self.data_dir.exists() and not self.data_dir.is_dir():
            raise NotADirectoryError(f"data_dir {self.data_dir.resolve()} is not a directory")
        if self.folder is not None:
            return
        if not self.download:
            raise self._not_found("download=False")
        target = self.candidate_dirs()[0]
        for name in self._missing_in(target):
            self._download(name, target)

    def _download(self, name: str, target: Path) -> None:
        errors: list[Exception] = []
        for base in self.URLS:  # the next mirror after a failure or a wrong checksum
            try:
                download_file(f"{base}{name}.gz", target / f"{name}.gz", self.GZ_MD5[name])
                return
            except (DownloadError, ArchiveError) as err:
                errors.append(err)
        raise self._not_found(f"the download failed: {errors[-1]}", downloaded=True) from errors[-1]

    def _read(self, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images_name, labels_name = _files(split)
        n = self.NUM_SAMPLES[split]
        hint = (
            f"it was left in place: replace it with the official {self.DISPLAY_NAME} file "
            f"(`make data`, or {self.URLS[0]})"
        )
        sha = self.CONTENT_SHA256 or {}
        paths = [self._find(folder, images_name), self._find(folder, labels_name)]
        if paths[0] is None or paths[1] is None:
            raise self._not_found(f"{split} files missing in {folder}")
        images = read_idx(paths[0], sha256=sha.get(images_name), shape=(n, 28, 28), hint=hint)
        labels = read_idx(paths[1], sha256=sha.get(labels_name), shape=(n,), hint=hint)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise ArchiveError(f"{paths[0]} / {paths[1]} must hold uint8 values; {hint}")
        if labels.max() >= self.num_classes:
            raise ArchiveError(
                f"{paths[1]} has label {int(labels.max())}, outside 0..{self.num_classes - 1}; "
                f"{hint}"
            )
        x = torch.from_numpy(images).unsqueeze(1)
        return x, torch.from_numpy(labels.astype(np.int64))

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read what ``stage`` needs into memory; later calls reuse it.

        Raises:
            FileNotFoundError: If the files are missing (run ``make data``).
            ValueError: If a file is corrupt, truncated, not IDX, or fails its checksum.
        """
        folder = self.folder
        if folder is None:
            raise self._not_found("run prepare_data() first, or the files are missing")
        holdout = self.val_size > 0
        need_train = stage in (None, "fit") or (stage == "validate" and holdout)
        need_test = stage in (None, "test", "predict") or (
            stage in ("fit", "validate") and not holdout
        )
        if need_train and self.train_dataset is None:
            x, y = self._read(folder, "train")
            if holdout:
                train_idx, val_idx = holdout_split(len(y), self.val_size, self.split_seed)
                self.val_dataset = InMemoryImageDataset(x[val_idx], y[val_idx])
                x, y = x[train_idx], y[train_idx]
            self.train_dataset = InMemoryImageDataset(x, y)
        if need_test and self.test_dataset is None:
            self.test_dataset = InMemoryImageDataset(*self._read(folder, "t10k"))
            if not holdout:
                self.val_dataset = self.test_dataset

    @property
    def num_train(self) -> int:
        """Training images after the hold-out."""
        return self.NUM_SAMPLES["train"] - self.val_size

    @property
    def held_out_test(self) -> bool:
        """Whether the test set is read by nothing but ``test``/``predict`` (``val_size > 0``);
        ``scl fit`` then tests the final model on it."""
        return self.val_size > 0


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test 28x28 grayscale images
    of 10 kinds of clothing. All arguments are described in :class:`IDXDataModule`; by default
    55,000 images train, 5,000 validate and the official 10,000 test.

    Normalization uses the training set's mean 0.2860 and standard deviation 0.3530. The
    decompressed content of each file is checked against its SHA-256, so Debian's
    ``dataset-fashion-mnist`` files are accepted as well as the upstream ones.

    Example::

        >>> dm = FashionMNISTDataModule(data_dir="data/fashion-mnist", download=False)
        >>> dm.num_classes, dm.input_shape, dm.num_train
        (10, (1, 28, 28), 55000)
    """

    NAME = "fashion-mnist"
    DISPLAY_NAME = "Fashion-MNIST"
    URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    GZ_MD5 = {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    CONTENT_SHA256 = {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    }
    SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
    MEAN = 0.2860
    STD = 0.3530
    CLASS_NAMES = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )


class MNISTDataModule(IDXDataModule):
    """MNIST (LeCun et al. 1998): 60,000 training and 10,000 test 28x28 handwritten digits. All
    arguments are described in :class:`IDXDataModule`; by default 55,000 images train, 5,000
    validate and the official 10,000 test.

    Normalization uses the training set's mean 0.1307 and standard deviation 0.3081. Downloads
    are checked against the upstream ``.gz`` MD5s; files already on disk are checked for their IDX
    header, shape and labels (no content checksum is pinned for MNIST). No system package
    provides MNIST: ``make data`` does not fetch it; ``download=True`` does.

    Example::

        >>> dm = MNISTDataModule(data_dir="data/mnist", download=False)
        >>> dm.num_classes, dm.class_names[:3]
        (10, ['0', '1', '2'])
    """

    NAME = "mnist"
    DISPLAY_NAME = "MNIST"
    URLS = (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    )
    GZ_MD5 = {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    CONTENT_SHA256 = None
    MEAN = 0.1307
    STD = 0.3081
    CLASS_NAMES = tuple(str(i) for i in range(10))
