"""The ImageNet LightningDataModule: argument checks, the layout checks of ``setup``, the loaders,
and normalization on the device."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from scl_lightning._utils import is_int

from ..sampling import accelerator_available, global_seed, resumable_loader_kwargs
from .dataset import ImageFolderDataset, _ImageFolderLoader
from .folders import _count_class_dirs, _require_dir, _scan_split, _split_classes
from .pipelines import _PILPipeline, _torchvision_import_error, _TorchvisionPipeline

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageNetDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DEFAULT_NUM_CLASSES = 1000


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


def _few(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


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
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not is_int(num_workers) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not is_int(image_size) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if not is_int(val_resize) or val_resize < image_size:
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
        if num_classes is not None and (not is_int(num_classes) or num_classes < 1):
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
            pin_memory=self.pin_memory and accelerator_available(),
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
