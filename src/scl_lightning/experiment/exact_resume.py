"""ExactResume: a run resumed from any checkpoint, even mid-epoch, continues exactly."""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

__all__ = ["ExactResume", "rng_state", "set_rng_state"]

#: key of this callback's data in a checkpoint
CHECKPOINT_KEY = "scl_exact_resume"


def rng_state() -> dict[str, Any]:
    """The process's random number generator states (Python, NumPy, torch CPU and CUDA) as
    tensors and plain Python data, so a checkpoint holding them loads with
    ``weights_only=True``."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`.

    Example::

        >>> saved = rng_state()
        >>> a = (random.random(), np.random.rand(), torch.rand(1).item())
        >>> set_rng_state(saved)
        >>> a == (random.random(), np.random.rand(), torch.rand(1).item())
        True
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SkipFirst:
    """A (batch) sampler whose next pass starts ``n`` items in; later passes are whole. Only
    indices are skipped, so no data is loaded for the batches already trained on."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner = inner
        self.n = n

    def __iter__(self) -> Iterator[Any]:
        n, self.n = self.n, 0
        return itertools.islice(iter(self.inner), n, None)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _skip_batches(loader: Any, n: int) -> bool:
    """Make the next pass over ``loader`` start at batch ``n``; ``False`` if it cannot."""
    if not isinstance(loader, DataLoader):
        return False
    inner = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    while isinstance(inner, _SkipFirst):  # an earlier resume in the same process
        inner = inner.inner
    attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    # DataLoader forbids reassigning its sampler after __init__; its iterators read it through
    # `_index_sampler` when they are created, so swapping the attribute is enough
    object.__setattr__(loader, attr, _SkipFirst(inner, n))
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        # persistent workers: the loader keeps one iterator, which holds on to the sampler it
        # was created with and reuses it on every later pass
        iterator._index_sampler = loader._index_sampler
    return True


def _set_epoch(loader: Any, epoch: int) -> None:
    for name in ("sampler", "batch_sampler"):
        sampler = getattr(loader, name, None)
        while isinstance(sampler, _SkipFirst):
            sampler = sampler.inner
        if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)


class ExactResume(Callback):
    """Resume a run from any checkpoint, even one saved mid-epoch, so that it continues exactly
    as if it had never stopped.

    Lightning restores the weights (and masks), the optimizers with their parameter groups, the
    schedulers, the loop counters and every callback's state. This callback adds the two things
    it leaves out:

    - **random number generators**: Python's, NumPy's, torch's CPU and CUDA generators are saved
      in every checkpoint (for every DDP rank) and restored when training resumes, so dropout
      and any other random draw in the training step repeat;
    - **the position in the data**: a run resumed mid-epoch skips the batches of the current
      epoch that it had already trained on (only their indices are drawn; nothing is loaded),
      then goes on with the same order. The training DataLoader's sampler must give an order
      that depends on the epoch only, as Lightning's ``DistributedSampler`` and
      :class:`~scl_lightning.data.sampling.EpochShuffleSampler` (used by every data module of
      this package) do; a plain ``shuffle=True`` DataLoader draws its order from the global
      generator and is reproducible only at epoch boundaries.

    With a fixed seed and deterministic kernels (on CPU), the resumed run ends with the same
    masks, weights and metrics, bit for bit. Two conditions, met by this package's data modules:
    the DataLoaders have a ``generator`` of their own
    (:func:`~scl_lightning.data.sampling.loader_generator`), since an iterator without one draws
    its workers' seed from the global generator, and Lightning creates iterators on resume that
    the uninterrupted run did not; and augmentation either runs in the training step or is seeded
    per batch. Randomness in DataLoader worker processes (per-image augmentation with
    ``num_workers > 0``) is re-seeded on resume and not repeated. Lightning itself does not
    repeat a validation that was due right after the checkpoint's step (the final metrics are the
    same; a monitored checkpoint or early stopping sees one validation fewer).

    ``scl fit`` adds this callback by itself. Pair it with a checkpoint on a step interval, e.g.
    ``ModelCheckpoint(save_last=True, every_n_train_steps=500)``, and resume with
    ``scl fit ... --ckpt_path last`` (``trainer.fit(..., ckpt_path="last")``).

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ExactResume()], logger=False)
    """

    def __init__(self) -> None:
        self._rng_states: list[dict[str, Any]] | None = None
        self._resuming = False

    @staticmethod
    def _all_rng_states(trainer: pl.Trainer) -> list[dict[str, Any]]:
        local = rng_state()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            return gathered
        return [local]

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # called on every rank (Lightning's save is collective); rank 0 writes the file
        checkpoint[CHECKPOINT_KEY] = {"rng": self._all_rng_states(trainer)}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resuming = True
        states = checkpoint.get(CHECKPOINT_KEY, {}).get("rng")
        if not states:
            rank_zero_warn(
                "ExactResume: the checkpoint holds no random generator states (it was saved "
                "without this callback); the run resumes with fresh ones"
            )
            self._rng_states = None
            return
        self._rng_states = list(states)

    def _own_rng_state(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        if not self._rng_states:
            return None
        if len(self._rng_states) != trainer.world_size:
            rank_zero_warn(
                f"ExactResume: the checkpoint was saved by {len(self._rng_states)} processes and "
                f"this run has {trainer.world_size}; every rank takes rank 0's generator states"
            )
            return self._rng_states[0]
        return self._rng_states[trainer.global_rank]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._resuming:
            return
        self._resuming = False
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        fetcher = fit_loop._data_fetcher
        state = self._own_rng_state(trainer)
        if combined is None or fetcher is None:
            if state is not None:
                set_rng_state(state)
            return
        # batches of the current epoch whose optimizer step is done (restored by Lightning)
        done = int(getattr(fit_loop.epoch_loop.batch_progress.current, "processed", 0))
        total = trainer.num_training_batches
        mid_epoch = 0 < done < total
        epoch = trainer.current_epoch
        for loader in combined.flattened:
            _set_epoch(loader, epoch)
        if mid_epoch:
            skipped = [_skip_batches(loader, done) for loader in combined.flattened]
            if all(skipped):
                # Lightning warns that a plain DataLoader cannot resume mid-epoch: this one can
                warnings.filterwarnings(
                    "ignore", message="You're resuming from a checkpoint that ended before"
                )
            else:
                rank_zero_warn(
                    "ExactResume: a training dataloader is not a torch DataLoader, so the resumed "
                    f"epoch cannot skip the {done} batches already trained on; it restarts the "
                    "epoch's data order"
                )
        elif state is not None:
            # at an epoch boundary the uninterrupted run drew the new epoch's DataLoader seed
            # from the restored state: draw it the same way
            set_rng_state(state)
            state = None
        # Lightning created the epoch's iterator before the sampler epoch was set and before the
        # skip was in place: create it again
        iter(fetcher)
        if state is not None:
            set_rng_state(state)
