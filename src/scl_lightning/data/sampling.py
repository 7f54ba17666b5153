"""Samplers whose order is a function of ``(seed, epoch)`` only, so that a run resumed from a
checkpoint (even mid-epoch, see :class:`~scl_lightning.experiment.ExactResume`) reads its data in
the same order as a run that was never interrupted."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import RandomSampler

__all__ = [
    "EpochShuffleSampler",
    "accelerator_available",
    "global_seed",
    "loader_generator",
    "resumable_loader_kwargs",
]


def global_seed() -> int:
    """``PL_GLOBAL_SEED`` as set by ``seed_everything``, or 0."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) % 2**32
    except ValueError:
        return 0


class EpochShuffleSampler(RandomSampler):
    """A ``RandomSampler`` whose order is a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` on it at the start of every epoch, as it does for a
    ``DistributedSampler``, so a run resumed from a checkpoint sees the same orders as one that was
    not interrupted. Without ``set_epoch`` calls (a plain loop over the DataLoader), every pass
    advances the epoch by one, so successive passes still differ. Being a ``RandomSampler``, it is
    replaced under DDP by Lightning's ``DistributedSampler``.

    Args:
        data_source: The dataset (only its length is used).
        seed: Seed of the permutations.

    Example::

        >>> sampler = EpochShuffleSampler(range(6), seed=0)
        >>> first, second = list(sampler), list(sampler)
        >>> sorted(first) == list(range(6)), first != second
        (True, True)
        >>> sampler.set_epoch(0)
        >>> list(sampler) == first
        True
    """

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` on the next pass."""
        self.epoch = int(epoch)

    def __iter__(self) -> Any:
        generator = torch.Generator()
        # Mix (seed, epoch) rather than add them (torch's DistributedSampler adds, so seed s at
        # epoch e + 1 would repeat seed s + 1 at epoch e and multi-seed studies would share
        # orders).
        generator.manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        )
        self.epoch += 1
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


def loader_generator(seed: int) -> torch.Generator:
    """A generator of its own for a DataLoader (``DataLoader(generator=...)``).

    Every new DataLoader iterator draws its workers' base seed from the loader's generator, or
    from torch's global one when it has none: then each ``iter()`` (a new epoch, a validation
    run, Lightning re-creating an iterator on resume) moves the global generator that dropout and
    other training-step randomness draw from. With a generator of its own it does not.

    Example::

        >>> before = torch.get_rng_state()
        >>> loader = torch.utils.data.DataLoader(range(4), generator=loader_generator(0))
        >>> _ = iter(loader)
        >>> torch.equal(before, torch.get_rng_state())
        True
    """
    return torch.Generator().manual_seed(int(seed))


def resumable_loader_kwargs(
    dataset: Any, *, shuffle: bool, seed: int, num_workers: int
) -> dict[str, Any]:
    """The DataLoader arguments every data module of this package uses: an order that depends on
    ``(seed, epoch)`` only (:class:`EpochShuffleSampler`, or the dataset order), a generator of
    its own (:func:`loader_generator`) and persistent workers. A run resumed from any checkpoint
    then reads the same batches, and creating iterators never moves torch's global generator.

    Example::

        >>> kwargs = resumable_loader_kwargs(range(8), shuffle=True, seed=0, num_workers=0)
        >>> sorted(kwargs)
        ['generator', 'num_workers', 'persistent_workers', 'sampler']
    """
    return {
        "sampler": EpochShuffleSampler(dataset, seed=seed) if shuffle else None,
        "generator": loader_generator(seed),
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
    }


def accelerator_available() -> bool:
    """Whether an accelerator (CUDA, MPS, XPU...) is present: pinned host memory only helps
    copies to one, and warns without one."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()  # pragma: no cover - torch < 2.6
