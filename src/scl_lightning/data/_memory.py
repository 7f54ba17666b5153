"""What the in-memory image DataModules (CIFAR, MNIST, Fashion-MNIST) share: a dataset fetched a
whole batch at a time, resumable DataLoaders, and per-batch augmentation and normalization on the
model's device.

- The whole dataset lives in memory as one ``uint8`` tensor ``(N, C, H, W)``.
  :class:`InMemoryImageDataset` implements ``__getitems__``, which PyTorch's DataLoader calls with
  the indices of a whole batch, so a batch is one ``index_select`` and no per-image Python runs.
- Training batches are ordered by an :class:`~scl_lightning.data.sampling.EpochShuffleSampler`
  and eval batches by a ``SequentialSampler``; under DDP Lightning replaces both by a
  ``DistributedSampler(seed=PL_GLOBAL_SEED)``.
- Augmentation and normalization run per batch, vectorized, on the device of the model, in
  :meth:`InMemoryDataModule.on_after_batch_transfer`, so the host only moves ``uint8`` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from scl_lightning._utils import is_int

from .sampling import accelerator_available, global_seed, resumable_loader_kwargs
from .transforms import BatchAugment

__all__ = ["InMemoryDataModule", "InMemoryImageDataset", "check_loader_args", "holdout_split"]


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_loader_args(
    *, batch_size: Any, num_workers: Any, split_seed: Any, seed: Any, **flags: Any
) -> None:
    """The argument checks every in-memory DataModule shares: ``batch_size``, ``num_workers``,
    ``split_seed``, ``seed`` (``None`` or a 32-bit seed) and the boolean ``flags``.

    Raises:
        ValueError: naming the first argument that is out of range or of the wrong type.
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    for name, value in flags.items():
        if not _is_bool(value):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if not is_int(split_seed) or not 0 <= split_seed < 2**32:
        raise ValueError(f"split_seed must be an integer in [0, 2**32), got {split_seed!r}")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**32):
        raise ValueError(f"seed must be None or an integer in [0, 2**32), got {seed!r}")


def _keep_batch(batch: Any) -> Any:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a collated batch.

    Module-level so that DataLoader worker processes can pickle it.
    """
    return batch


class InMemoryImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images and labels held in memory, fetched a whole batch at a time.

    ``dataset[i]`` returns one ``(image, label)`` pair; ``dataset.__getitems__(indices)``, which
    the DataLoader calls for each batch when it exists, returns the batch ``(images[indices],
    labels[indices])`` already stacked, so pair it with a pass-through ``collate_fn``.

    Args:
        images: ``(N, C, H, W)`` tensor, typically ``uint8``.
        labels: ``(N,)`` integer tensor.

    Raises:
        ValueError: If the shapes do not match.

    Example::

        >>> ds = InMemoryImageDataset(torch.zeros(5, 3, 2, 2, dtype=torch.uint8), torch.arange(5))
        >>> x, y = ds.__getitems__([4, 0])
        >>> x.shape, y.tolist()
        (torch.Size([2, 3, 2, 2]), [4, 0])
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(
                f"images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)


def holdout_split(num_samples: int, num_val: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """Sorted ``(train, val)`` indices: ``num_val`` samples drawn with a numpy generator seeded by
    ``split_seed`` only, so the split never depends on (or disturbs) the training seed."""
    perm = torch.from_numpy(np.random.default_rng(split_seed).permutation(num_samples))
    return perm[num_val:].sort().values, perm[:num_val].sort().values


class InMemoryDataModule(LightningDataModule):
    """Base of the DataModules whose splits are :class:`InMemoryImageDataset` of ``uint8`` images.

    Batches leave the DataLoaders as ``(uint8 images, int64 labels)`` and become float32,
    normalized (and augmented, in training) in :meth:`on_after_batch_transfer`. A subclass sets,
    in its ``__init__``: ``batch_size``, ``num_workers``, ``seed`` (``None`` for
    ``PL_GLOBAL_SEED``), ``pin_memory``, ``batch_transform`` (a
    :class:`~scl_lightning.data.transforms.BatchAugment`) and the three datasets (``None`` until
    ``setup``), then calls :meth:`_reset_augment_rng`.
    """

    batch_size: int
    num_workers: int
    seed: int | None
    pin_memory: bool
    batch_transform: BatchAugment
    train_dataset: InMemoryImageDataset | None
    val_dataset: InMemoryImageDataset | None
    test_dataset: InMemoryImageDataset | None

    def _reset_augment_rng(self) -> None:
        # Augmentation RNG: one per (device, epoch), see _augment_generator.
        self._aug_key: tuple[str, int, int, int] | None = None
        self._aug_generator: torch.Generator | None = None

    def _train_seed(self) -> int:
        return self.seed if self.seed is not None else global_seed()

    def _loader(self, dataset: InMemoryImageDataset | None, train: bool, split: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {split} data yet: call setup() before asking for "
                f"a dataloader"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=_keep_batch,
            pin_memory=self.pin_memory and accelerator_available(),
            drop_last=False,
            **resumable_loader_kwargs(
                dataset, shuffle=train, seed=self._train_seed(), num_workers=self.num_workers
            ),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Training batches ``(uint8 images, int64 labels)``, reshuffled every epoch."""
        return self._loader(self.train_dataset, train=True, split="training")

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order: the test set, or the held-out part of training."""
        return self._loader(self.val_dataset, train=False, split="validation")

    @override
    def test_dataloader(self) -> DataLoader:
        """The official test set, in a fixed order."""
        return self._loader(self.test_dataset, train=False, split="test")

    @override
    def predict_dataloader(self) -> DataLoader:
        """The official test set, in a fixed order."""
        return self._loader(self.test_dataset, train=False, split="test")

    # ------------------------------------------------------- batch transforms

    def _augment_generator(
        self, device: torch.device, rank: int, epoch: int, batch: int
    ) -> torch.Generator:
        """The augmentation RNG on ``device``, seeded for each batch from (seed, rank, epoch,
        batch index in the epoch): ranks draw different noise, and a run resumed from any
        checkpoint, even mid-epoch, draws the same noise as one never interrupted."""
        key = (str(device), rank, epoch, batch)
        if self._aug_generator is None or self._aug_key != key:
            words = np.random.SeedSequence([self._train_seed(), rank, epoch, batch])
            state = words.generate_state(2)
            if self._aug_generator is None or self._aug_generator.device != device:
                self._aug_generator = torch.Generator(device=device)
            self._aug_generator.manual_seed(int(state[0]) | int(state[1]) << 32)
            self._aug_key = key
        return self._aug_generator

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn a ``(uint8 images, labels)`` batch, already on the model's device, into float32
        normalized images: augmented too while the Trainer is training, normalized only otherwise
        (validation, test, predict, sanity check, or no Trainer attached). Anything else (such
        as the model's float ``example_input_array``, which Lightning also sends through this
        hook for its summary) passes unchanged."""
        if not (
            isinstance(batch, (list, tuple))
            and len(batch) == 2
            and isinstance(batch[0], Tensor)
            and batch[0].dtype == torch.uint8
        ):
            return batch
        x, y = batch
        transform = self.batch_transform
        if transform.mean.device != x.device:
            transform.to(x.device)
        trainer = self.trainer
        training = bool(trainer is not None and trainer.training)
        transform.train(training)
        generator = None
        if training and trainer is not None:
            rank, epoch = trainer.global_rank, trainer.current_epoch
            # index of the batch being transferred, restored by Lightning on resume
            index = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            generator = self._augment_generator(x.device, rank, epoch, index)
        batch = (transform(x, generator=generator), y)
        # Lightning converts inputs for "*-true" precisions before the transfer, when they were
        # still uint8: convert the float images now (a no-op for 32-true and *-mixed).
        plugin = getattr(trainer, "precision_plugin", None)
        if plugin is not None:
            batch = plugin.convert_input(batch)
        return batch
