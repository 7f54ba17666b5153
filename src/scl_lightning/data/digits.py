"""LightningDataModule for scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from scl_lightning._utils import is_int

from .sampling import global_seed, resumable_loader_kwargs

__all__ = ["DigitsDataModule"]

# Size of scikit-learn's bundled digits set; fixed, so the split sizes can be checked in __init__.
_NUM_SAMPLES = 1797
_NUM_CLASSES = 10
_MAX_PIXEL = 16.0


def _split_indices(
    labels: np.ndarray, num_val: int, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation indices, stratified by class when both splits allow it.

    Uses its own ``numpy`` generator seeded with ``split_seed`` only, so the split does not depend
    on (or disturb) the global torch/numpy seeds that drive training.
    """
    num_samples = len(labels)
    num_train = num_samples - num_val
    classes = np.unique(labels)
    if min(num_val, num_train) >= len(classes):
        from sklearn.model_selection import StratifiedShuffleSplit

        splitter = StratifiedShuffleSplit(
            n_splits=1, test_size=num_val, train_size=num_train, random_state=split_seed
        )
        train_idx, val_idx = next(splitter.split(np.zeros(num_samples), labels))
    else:
        # Too few samples on one side to hold every class: fall back to a plain random split.
        perm = np.random.default_rng(split_seed).permutation(num_samples)
        train_idx, val_idx = perm[num_val:], perm[:num_val]
    return np.sort(train_idx), np.sort(val_idx)


class DigitsDataModule(LightningDataModule):
    """The 1797 8x8 handwritten digits bundled with scikit-learn, as a LightningDataModule.

    Images come as float32 tensors of shape ``(N, 1, 8, 8)`` scaled to ``[0, 1]`` (raw pixel
    values are 0..16) and, when ``normalize`` is set, standardized with one scalar mean and
    standard deviation computed on the training split only. Labels are int64 in ``0..9``.

    The split is stratified by class (falling back to a random split when one side is too small
    to hold every class) and depends only on ``split_seed``, never on the global seed, so the
    validation set is the same across training seeds. The validation split holds
    ``ceil(val_fraction * 1797)`` images; the training split holds the rest.

    The digits set has no separate test split: ``test_dataloader`` and ``predict_dataloader``
    return the validation split.

    Args:
        batch_size: Samples per batch, for every dataloader.
        val_fraction: Fraction of the 1797 images held out for validation, in ``(0, 1)``.
        split_seed: Seed of the train/validation split (a non-negative integer below ``2**32``).
        num_workers: DataLoader worker processes; ``0`` loads in the main process.
        normalize: Standardize pixels with the training split's mean and standard deviation.

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Attributes:
        num_classes: Number of classes (10), available right after ``__init__``.
        input_shape: Shape of one image, ``(1, 8, 8)``, available right after ``__init__``.

    Example::

        >>> dm = DigitsDataModule(batch_size=32, split_seed=0)
        >>> dm.num_classes, dm.input_shape
        (10, (1, 8, 8))
        >>> dm.setup("fit")
        >>> len(dm.train_dataset), len(dm.val_dataset)
        (1437, 360)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.shape, y.dtype
        (torch.Size([32, 1, 8, 8]), torch.float32, torch.Size([32]), torch.int64)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if (
            not isinstance(val_fraction, (int, float, np.floating))
            or isinstance(val_fraction, bool)
            or not 0.0 < float(val_fraction) < 1.0
        ):
            raise ValueError(
                f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}"
            )
        num_val = math.ceil(float(val_fraction) * _NUM_SAMPLES)
        if num_val >= _NUM_SAMPLES:
            raise ValueError(
                f"val_fraction={val_fraction!r} leaves no training samples out of {_NUM_SAMPLES}; "
                f"use a value of at most {(_NUM_SAMPLES - 1) / _NUM_SAMPLES:.6f}"
            )
        if not is_int(split_seed) or not 0 <= split_seed < 2**32:
            raise ValueError(f"split_seed must be an integer in [0, 2**32), got {split_seed!r}")
        if not is_int(num_workers) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not isinstance(normalize, (bool, np.bool_)):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.save_hyperparameters()

        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.num_workers = int(num_workers)
        self.normalize = bool(normalize)
        self.num_val = num_val
        self.num_train = _NUM_SAMPLES - num_val

        self.num_classes: int = _NUM_CLASSES
        self.input_shape: tuple[int, int, int] = (1, 8, 8)

        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        # Scalar statistics of the training split in [0, 1] pixel units, set by setup().
        self.mean: float | None = None
        self.std: float | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the images and build both splits; later calls do nothing."""
        if self.train_dataset is not None and self.val_dataset is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.asarray(digits.images, dtype=np.float32) / _MAX_PIXEL
        labels = np.asarray(digits.target, dtype=np.int64)
        if images.shape != (_NUM_SAMPLES, 8, 8):  # pragma: no cover - guards a changed dataset
            raise RuntimeError(
                f"scikit-learn's digits set has shape {images.shape}, expected "
                f"({_NUM_SAMPLES}, 8, 8); this DigitsDataModule does not support it"
            )
        train_idx, val_idx = _split_indices(labels, self.num_val, self.split_seed)

        x = torch.from_numpy(images).unsqueeze(1)
        y = torch.from_numpy(labels)
        x_train, x_val = x[train_idx], x[val_idx]
        # Statistics from the training split only, so nothing about the validation set leaks in.
        self.mean = float(x_train.mean())
        self.std = float(x_train.std())
        if self.normalize:
            x_train = (x_train - self.mean) / self.std
            x_val = (x_val - self.mean) / self.std

        self.train_dataset = TensorDataset(x_train.contiguous(), y[train_idx])
        self.val_dataset = TensorDataset(x_val.contiguous(), y[val_idx])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                "DigitsDataModule has no data yet: call setup() before asking for a dataloader"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=False,
            **resumable_loader_kwargs(
                dataset, shuffle=shuffle, seed=global_seed(), num_workers=self.num_workers
            ),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split (the last batch may be smaller)."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation split, in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The validation split: the digits set has no separate test split."""
        return self._loader(self.val_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation split, in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)
