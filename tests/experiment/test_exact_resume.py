"""ExactResume: runs stopped at various points and resumed from their last checkpoint end
bit-identical to runs never stopped (in-process; the SIGKILL test is tests/test_resume_kill.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from scl_lightning import SCLModule
from scl_lightning.callbacks import MaskGradientNormalization, SparseConnectivityLearning
from scl_lightning.data import DigitsDataModule
from scl_lightning.experiment import ExactResume, SafeCheckpointIO, load_checkpoint
from scl_lightning.experiment.exact_resume import _skip_batches, _SkipFirst, rng_state

STEPS_PER_EPOCH = 12  # limit_train_batches


class _Stop(Exception):
    """Stands in for the process being killed."""


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise _Stop(f"stopped at step {self.step}")


def _backbone() -> nn.Module:
    # dropout: the training step draws from the global generator, so RNG restore matters
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 10)
    )


class _PlainModule(pl.LightningModule):
    """Someone else's module (no SCL in it), for the drop-in callback."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _backbone()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)]


def _fit(
    root: Path,
    stop_at: int | None = None,
    resume: bool = False,
    exact: bool = True,
    epochs: int = 3,
    variant: str = "module",
    every: int = 5,
    num_workers: int = 0,
    check_val_every_n_epoch: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    pl.seed_everything(0)
    module: pl.LightningModule
    callbacks: list[Callback] = []
    if variant == "drop-in":
        module = _PlainModule()
        callbacks.append(SparseConnectivityLearning(lam=1e-3, flops=False, target="net"))
    elif variant == "target":
        # lambda adapted by the controller: its state is part of what must resume exactly
        module = SCLModule(
            _backbone(), num_classes=10, input_shape=(1, 8, 8), target_sparsity=0.5, mask_lr=0.1
        )
    else:
        # "phases": dense warm-up in epoch 0, masks frozen from epoch 2 (a resume crosses both)
        phases = {"warmup_epochs": 1, "freeze_masks_epoch": 2} if variant == "phases" else {}
        module = SCLModule(_backbone(), num_classes=10, input_shape=(1, 8, 8), lam=1e-3, **phases)
        callbacks.append(MaskGradientNormalization())
    callbacks += [
        # mid-epoch on a step interval, and at every epoch end
        ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=every, save_top_k=0),
        ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0),
    ]
    if exact:
        callbacks.append(ExactResume())
    if stop_at is not None:
        callbacks.append(_StopAt(stop_at))
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=STEPS_PER_EPOCH,
        # validation mid-epoch too (unless only every other epoch)
        val_check_interval=6 if check_val_every_n_epoch == 1 else 1.0,
        check_val_every_n_epoch=check_val_every_n_epoch,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],
        default_root_dir=root,
    )
    datamodule = DigitsDataModule(batch_size=32, num_workers=num_workers)
    if stop_at is not None:
        with pytest.raises(_Stop):
            trainer.fit(module, datamodule=datamodule, ckpt_path="last" if resume else None)
        return {}, {}
    trainer.fit(module, datamodule=datamodule, ckpt_path="last" if resume else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if isinstance(module, SCLModule):
        metrics["lam"] = module.lam  # a Python float: compared exactly
    return {k: v.clone() for k, v in module.state_dict().items()}, metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _fit(tmp_path_factory.mktemp("ref"))


def _assert_same(a: Any, b: Any) -> None:
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert metrics_a == metrics_b


@pytest.mark.parametrize(
    "stop_at",
    [
        8,  # mid-epoch: last checkpoint at step 5, between two mid-epoch validations
        13,  # epoch 1, after the epoch-end checkpoint of step 12 (and before step 15's)
        26,  # epoch 2, one step after the step-25 checkpoint
    ],
)
def test_resumed_run_is_bit_identical(tmp_path: Path, reference: Any, stop_at: int) -> None:
    _fit(tmp_path, stop_at=stop_at)
    resumed = _fit(tmp_path, resume=True)
    _assert_same(resumed, reference)
    # the masks learned something, so the comparison covers them
    masks = [v for k, v in resumed[0].items() if k.endswith(".mask")]
    assert masks and any(bool((m <= 0).any()) for m in masks)


@pytest.mark.parametrize("variant", ["phases", "drop-in", "target"])
def test_resume_is_exact_across_phases_and_with_the_drop_in(tmp_path: Path, variant: str) -> None:
    reference = _fit(tmp_path / "ref", variant=variant)
    _fit(tmp_path / "run", stop_at=8, variant=variant)  # epoch 0
    _fit(tmp_path / "run", stop_at=20, resume=True, variant=variant)  # epoch 1
    _assert_same(_fit(tmp_path / "run", resume=True, variant=variant), reference)
    if variant == "target":  # the controller really moved lambda and the masks
        state, metrics = reference
        assert metrics["lam"] > 0
        assert any(bool((v <= 0).any()) for k, v in state.items() if k.endswith(".mask"))


def test_resume_with_persistent_workers(tmp_path: Path) -> None:
    # the loader keeps one iterator across epochs, holding the sampler it was created with
    reference = _fit(tmp_path / "ref", epochs=2, num_workers=1)
    _fit(tmp_path / "run", stop_at=8, epochs=2, num_workers=1)
    _assert_same(_fit(tmp_path / "run", resume=True, epochs=2, num_workers=1), reference)


def test_resume_from_a_step_checkpoint_at_an_epoch_end_without_validation(tmp_path: Path) -> None:
    # the step checkpoint falls on the epoch's last batch and that epoch does not validate:
    # Lightning re-creates the validation iterator on resume, which must not move the RNG
    kwargs = {"every": 6, "check_val_every_n_epoch": 2}
    reference = _fit(tmp_path / "ref", **kwargs)
    _fit(tmp_path / "run", stop_at=13, **kwargs)
    _assert_same(_fit(tmp_path / "run", resume=True, **kwargs), reference)


def test_resuming_twice_in_one_epoch_is_still_exact(tmp_path: Path, reference: Any) -> None:
    _fit(tmp_path, stop_at=7)
    _fit(tmp_path, stop_at=11, resume=True)
    _assert_same(_fit(tmp_path, resume=True), reference)


def test_without_exact_resume_the_resumed_run_differs(tmp_path: Path, reference: Any) -> None:
    # shows the test above can fail: without RNG restore and the data skip, dropout and the
    # batch order diverge
    _fit(tmp_path, stop_at=8, exact=False)
    state, _ = _fit(tmp_path, resume=True, exact=False)
    assert any(not torch.equal(state[k], reference[0][k]) for k in state)


def test_checkpoints_hold_rng_states_and_load_weights_only(tmp_path: Path) -> None:
    _fit(tmp_path, stop_at=8)
    checkpoint = load_checkpoint(tmp_path / "last.ckpt")  # weights_only=True
    states = checkpoint["scl_exact_resume"]["rng"]
    assert len(states) == 1 and set(states[0]) >= {"python", "numpy", "torch"}
    assert checkpoint["global_step"] == 5


def test_skip_first_skips_indices_once() -> None:
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=3)
    assert _skip_batches(loader, 2)
    assert [b.tolist() for b in loader] == [[6, 7, 8], [9]]
    assert len(loader) == 4 and next(b.tolist() for b in loader) == [0, 1, 2]
    assert isinstance(loader.batch_sampler, _SkipFirst)
    assert not _skip_batches(iter([1, 2]), 1)  # not a DataLoader: reported, not skipped


def test_rng_state_is_plain_data() -> None:
    state = rng_state()
    assert isinstance(state["torch"], torch.Tensor)
    assert isinstance(state["numpy"]["key"], torch.Tensor)
    assert not any(isinstance(v, np.ndarray) for v in state["numpy"].values())
