"""LightningDataModule for scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import math
from typing import Any

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
_NO_TEST_SPLIT = (
    "DigitsDataModule(test_fraction=0) has no test split: give test_fraction > 0 "
    "(e.g. --data.init_args.test_fraction 0.2), or evaluate on validation with `scl validate`"
)


def _split_indices(
    labels: np.ndarray, num_holdout: int, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(rest, holdout)`` indices into ``labels``, ``num_holdout`` of them held
    out, stratified by class when both sides can hold every class.

    Uses its own generator seeded with ``split_seed`` only, so the split does not depend on (or
    disturb) the global torch/numpy seeds that drive training.
    """
    num_samples = len(labels)
    num_rest = num_samples - num_holdout
    classes = np.unique(labels)
    if min(num_holdout, num_rest) >= len(classes):
        from sklearn.model_selection import StratifiedShuffleSplit

        splitter = StratifiedShuffleSplit(
            n_splits=1, test_size=num_holdout, train_size=num_rest, random_state=split_seed
        )
        rest_idx, holdout_idx = next(splitter.split(np.zeros(num_samples), labels))
    else:
        # Too few samples on one side to hold every class: fall back to a plain random split.
        perm = np.random.default_rng(split_seed).permutation(num_samples)
        rest_idx, holdout_idx = perm[num_holdout:], perm[:num_holdout]
    return np.sort(rest_idx), np.sort(holdout_idx)


def _three_way_split(
    labels: np.ndarray, num_val: int, num_test: int, split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint sorted ``(train, val, test)`` indices: the test split is drawn first, from all
    samples, so it depends on ``num_test`` and ``split_seed`` only (not on ``num_val``); the
    validation split is then drawn from the rest."""
    rest = np.arange(len(labels))
    test_idx = rest[:0]
    if num_test:
        rest, test_idx = _split_indices(labels, num_test, split_seed)
    train_pos, val_pos = _split_indices(labels[rest], num_val, split_seed)
    return rest[train_pos], rest[val_pos], test_idx


def _check_fraction(name: str, value: Any, zero_ok: bool) -> float:
    """``value`` as a float in ``(0, 1)`` (``[0, 1)`` when ``zero_ok``), or a ``ValueError``
    naming the argument."""
    if (
        isinstance(value, (int, float, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and (0.0 <= float(value) if zero_ok else 0.0 < float(value))
        and float(value) < 1.0
    ):
        return float(value)
    where = "in [0, 1)" if zero_ok else "strictly between 0 and 1"
    raise ValueError(f"{name} must be a number {where}, got {value!r}")


class DigitsDataModule(LightningDataModule):
    """The 1797 8x8 handwritten digits bundled with scikit-learn, as a LightningDataModule with a
    held-out test split.

    Images come as float32 tensors of shape ``(N, 1, 8, 8)`` scaled to ``[0, 1]`` (raw pixel
    values are 0..16) and, when ``normalize`` is set, standardized with one scalar mean and
    standard deviation computed on the training split only. Labels are int64 in ``0..9``.

    Three disjoint splits: the test split holds ``ceil(test_fraction * 1797)`` images, the
    validation split ``ceil(val_fraction * 1797)``, and the training split the rest (by default
    1077 / 360 / 360). Each is stratified by class (falling back to a random split when a side is
    too small to hold every class) and depends only on ``split_seed``, never on the global seed,
    so every training seed is validated and tested on the same images. The test split is drawn
    first, so changing ``val_fraction`` does not change it.

    ``test_dataloader`` and ``predict_dataloader`` serve the test split, which neither training
    nor validation reads: tune (``lam``, epochs, checkpoints) on validation, report test.
    ``test_fraction=0`` gives the earlier two-way split (1437 / 360 by default) and no test split.

    Args:
        batch_size: Samples per batch, for every dataloader.
        val_fraction: Fraction of the 1797 images held out for validation, in ``(0, 1)``.
        split_seed: Seed of the splits (a non-negative integer below ``2**32``).
        num_workers: DataLoader worker processes; ``0`` loads in the main process.
        normalize: Standardize pixels with the training split's mean and standard deviation.
        test_fraction: Fraction of the 1797 images held out for testing, in ``[0, 1)``;
            ``0``: no test split.

    Raises:
        ValueError: If an argument is out of range or of the wrong type, or the validation and
            test splits leave no training images.

    Attributes:
        num_classes: Number of classes (10), available right after ``__init__``.
        input_shape: Shape of one image, ``(1, 8, 8)``, available right after ``__init__``.
        num_train, num_val, num_test: Sizes of the splits, available right after ``__init__``.
        held_out_test: Whether there is a test split (``test_fraction > 0``); ``scl fit``
            evaluates the final model on it.

    Example::

        >>> dm = DigitsDataModule(batch_size=32, split_seed=0)
        >>> dm.num_classes, dm.input_shape
        (10, (1, 8, 8))
        >>> dm.setup("fit")
        >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
        (1077, 360, 360)
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
        test_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        num_val = math.ceil(
            _check_fraction("val_fraction", val_fraction, zero_ok=False) * _NUM_SAMPLES
        )
        num_test = math.ceil(
            _check_fraction("test_fraction", test_fraction, zero_ok=True) * _NUM_SAMPLES
        )
        if num_val + num_test >= _NUM_SAMPLES:
            if num_test:
                raise ValueError(
                    f"val_fraction={val_fraction!r} and test_fraction={test_fraction!r} leave no "
                    f"training samples out of {_NUM_SAMPLES} ({num_val} validation + {num_test} "
                    "test); make their sum smaller"
                )
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
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.num_workers = int(num_workers)
        self.normalize = bool(normalize)
        self.num_val = num_val
        self.num_test = num_test
        self.num_train = _NUM_SAMPLES - num_val - num_test

        self.num_classes: int = _NUM_CLASSES
        self.input_shape: tuple[int, int, int] = (1, 8, 8)

        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        # Scalar statistics of the training split in [0, 1] pixel units, set by setup().
        self.mean: float | None = None
        self.std: float | None = None

    @property
    def held_out_test(self) -> bool:
        """Whether the test split exists: images that neither training nor validation reads."""
        return self.num_test > 0

    def setup(self, stage: str | None = None) -> None:
        """Load the images and build the three splits, whatever ``stage``; later calls do
        nothing.

        Raises:
            ValueError: for ``stage`` ``"test"`` or ``"predict"`` with ``test_fraction=0``,
                before anything is loaded.
        """
        if stage in ("test", "predict") and not self.num_test:
            raise ValueError(_NO_TEST_SPLIT)
        if self.train_dataset is not None:
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
        splits = _three_way_split(labels, self.num_val, self.num_test, self.split_seed)

        x = torch.from_numpy(images).unsqueeze(1)
        y = torch.from_numpy(labels)
        x_train = x[splits[0]]
        # Statistics from the training split only, so nothing about validation or test leaks in.
        self.mean = float(x_train.mean())
        self.std = float(x_train.std())
        train, val, test = (
            TensorDataset(
                ((x[idx] - self.mean) / self.std if self.normalize else x[idx]).contiguous(),
                y[idx],
            )
            for idx in splits
        )
        self.val_dataset = val
        self.test_dataset = test if self.num_test else None
        self.train_dataset = train  # last: setup() is done once this is set

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

    def _test_loader(self) -> DataLoader:
        if not self.num_test:
            raise ValueError(_NO_TEST_SPLIT)
        return self._loader(self.test_dataset, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split (the last batch may be smaller)."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation split, in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the held-out test split, in a fixed order.

        Raises:
            ValueError: with ``test_fraction=0`` (there is no test split).
        """
        return self._test_loader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out test split, in a fixed order (as ``test_dataloader``)."""
        return self._test_loader()
