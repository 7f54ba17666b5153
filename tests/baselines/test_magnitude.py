"""Magnitude pruning baselines: exact sparsity, the cubic schedule, one-shot timing, frozen masks,
resume, and use in a module written without SCL in mind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _helpers import TinyClassifier, quiet_trainer
from scl_lightning import SCLModule, global_sparsity, layer_sparsity, sparsify
from scl_lightning.baselines import (
    GradualMagnitudePruning,
    OneShotMagnitudePruning,
    cubic_sparsity,
    prune_by_magnitude,
)
from scl_lightning.callbacks import SparseConnectivityLearning
from scl_lightning.data import DigitsDataModule


def _net() -> nn.Module:
    torch.manual_seed(0)
    return sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 7)))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99])
def test_global_pruning_is_exact_and_keeps_the_largest(sparsity):
    net = _net()
    total = 20 * 30 + 30 * 7
    off = prune_by_magnitude(net, sparsity)
    assert off == round(sparsity * total)
    assert global_sparsity(net) == pytest.approx(off / total)
    kept, pruned = [], []
    for layer in (net[0], net[2]):
        on = layer.mask > 0
        kept.append(layer.raw_weight.abs()[on])
        pruned.append(layer.raw_weight.abs()[~on])
    if 0 < sparsity:
        assert torch.cat(pruned).max() <= torch.cat(kept).min()


def test_layer_scope_prunes_every_layer_alike():
    net = _net()
    prune_by_magnitude(net, 0.8, scope="layer")
    assert list(layer_sparsity(net).values()) == pytest.approx([0.8, 0.8], abs=1e-3)


def test_pruned_connections_stay_pruned_as_sparsity_rises():
    net = _net()
    prune_by_magnitude(net, 0.5)
    before = [layer.mask.clone() for layer in (net[0], net[2])]
    with torch.no_grad():  # a pruned weight that grew large must not come back
        net[0].raw_weight[net[0].mask <= 0] *= 1000
    prune_by_magnitude(net, 0.7)
    for layer, old in zip((net[0], net[2]), before, strict=True):
        assert not bool(((old <= 0) & (layer.mask > 0)).any())


def test_pruning_needs_masks_and_a_valid_sparsity():
    with pytest.raises(ValueError, match="no masked layers: sparsify it first"):
        prune_by_magnitude(nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        prune_by_magnitude(_net(), 1.0)
    with pytest.raises(ValueError, match="scope must be 'global' or 'layer'"):
        prune_by_magnitude(_net(), 0.5, scope="channel")


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.1, 0.9, 10, 20) == 0.1
    assert cubic_sparsity(10, 0.1, 0.9, 10, 20) == pytest.approx(0.1)
    assert cubic_sparsity(15, 0.0, 0.8, 10, 20) == pytest.approx(0.8 - 0.8 * 0.125)
    assert cubic_sparsity(25, 0.1, 0.9, 10, 20) == 0.9
    values = [cubic_sparsity(t, 0.0, 0.9, 0, 100) for t in range(101)]
    assert values == sorted(values)


def test_gradual_pruning_follows_the_schedule_in_any_module(tmp_path):
    seen = []

    class Record(GradualMagnitudePruning):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.global_step, global_sparsity(pl_module)))

    model = TinyClassifier(sparse=True, samples=80)  # 10 batches per epoch
    gmp = Record(final_sparsity=0.9, start_step=2, end_step=12, frequency=2)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=10, callbacks=[gmp])
    trainer.fit(model, model.train_dataloader())
    total = 64 * 16 + 16 * 10
    by_step = dict(seen)
    # global_step s is the step after s optimizer steps; pruning happens before the batch
    assert by_step[1] == 0.0  # before t_0
    assert by_step[3] == pytest.approx(round(cubic_sparsity(2, 0, 0.9, 2, 12) * total) / total)
    assert by_step[5] == pytest.approx(round(cubic_sparsity(4, 0, 0.9, 2, 12) * total) / total)
    assert by_step[6] == by_step[5]  # no pruning between steps
    assert by_step[13] == pytest.approx(round(0.9 * total) / total)
    assert by_step[20] == by_step[13]
    # the masks moved only by pruning: kept ones at their start value 1, pruned ones at -1
    masks = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("mask")])
    assert set(masks.unique().tolist()) == {-1.0, 1.0}


def test_gradual_pruning_with_fractions_and_warning_when_cut_short(tmp_path):
    model = TinyClassifier(sparse=True, samples=80)
    gmp = GradualMagnitudePruning(final_sparsity=0.5, end_fraction=0.5, frequency=1)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=10)
    trainer.fit(model, model.train_dataloader())
    assert gmp.window(trainer) == (0, 4)  # half of the last step, 9
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=10, callbacks=[gmp])
    trainer.fit(model, model.train_dataloader())
    assert global_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    short = GradualMagnitudePruning(final_sparsity=0.5, end_step=100, frequency=1)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[short])
    with pytest.warns(UserWarning, match="before the schedule's end"):
        trainer.fit(TinyClassifier(sparse=True), TinyClassifier().train_dataloader())


def test_one_shot_prunes_at_its_epoch_then_fine_tunes(tmp_path):
    seen = {}

    class Record(OneShotMagnitudePruning):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = global_sparsity(pl_module)

    model = TinyClassifier(sparse=True)
    trainer = quiet_trainer(tmp_path, max_epochs=4, callbacks=[Record(sparsity=0.75)])
    trainer.fit(model, model.train_dataloader())
    assert seen[0] == seen[1] == 0.0
    assert seen[2] == seen[3] == pytest.approx(0.75, abs=1e-3)


def test_with_scl_module_at_lam_zero_and_refused_with_a_learning_engine(tmp_path):
    dm = DigitsDataModule(batch_size=64)
    module = SCLModule(backbone="lenet_300_100", input_shape=(1, 8, 8), lam=0.0)
    gmp = GradualMagnitudePruning(final_sparsity=0.9, end_fraction=0.5, frequency=2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=10, callbacks=[gmp])
    trainer.fit(module, datamodule=dm)
    assert global_sparsity(module) == pytest.approx(0.9, abs=1e-4)
    learning = SCLModule(backbone="lenet_300_100", input_shape=(1, 8, 8), lam=1e-4)
    trainer = quiet_trainer(tmp_path, callbacks=[OneShotMagnitudePruning(0.5, epoch=0)])
    with pytest.raises(ValueError, match=r"decides the masks itself.*lam=0\.0001"):
        trainer.fit(learning, datamodule=dm)
    trainer = quiet_trainer(tmp_path, callbacks=[OneShotMagnitudePruning(0.5, epoch=0)])
    with pytest.raises(ValueError, match="needs masked layers"):
        trainer.fit(TinyClassifier(), TinyClassifier().train_dataloader())
    assert SparseConnectivityLearning  # the engine the refusal names


def test_one_shot_epoch_beyond_the_run_is_refused(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[OneShotMagnitudePruning(0.5, 2)])
    with pytest.raises(ValueError, match="prunes at epoch 2, but the run has max_epochs=2"):
        trainer.fit(TinyClassifier(sparse=True), TinyClassifier().train_dataloader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"final_sparsity": 1.0}, "final_sparsity must be a number in"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "must not exceed final_sparsity"),
        ({"final_sparsity": 0.5, "frequency": 0}, "frequency must be a positive integer"),
        ({"final_sparsity": 0.5, "end_fraction": 1.5}, "end_fraction must be a number in"),
        ({"final_sparsity": 0.5, "start_step": -1}, "start_step must be None or an integer"),
    ],
)
def test_gradual_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualMagnitudePruning(**kwargs)


def test_state_round_trips_for_resume():
    gmp = GradualMagnitudePruning(final_sparsity=0.9)
    gmp.applied = 0.42
    other = GradualMagnitudePruning(final_sparsity=0.9)
    other.load_state_dict(gmp.state_dict())
    assert other.applied == 0.42
    shot = OneShotMagnitudePruning(0.5)
    shot.done = True
    again = OneShotMagnitudePruning(0.5)
    again.load_state_dict(shot.state_dict())
    assert again.done


def test_end_fraction_one_reaches_the_final_sparsity(tmp_path):
    model = TinyClassifier(sparse=True, samples=80)
    gmp = GradualMagnitudePruning(final_sparsity=0.6, end_fraction=1.0, frequency=3)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=10, callbacks=[gmp])
    trainer.fit(model, model.train_dataloader())
    assert gmp.window(trainer) == (0, 9)
    assert global_sparsity(model) == pytest.approx(0.6, abs=1e-3)


def test_fractions_need_a_run_of_known_length(tmp_path):
    gmp = GradualMagnitudePruning(final_sparsity=0.5)
    trainer = quiet_trainer(tmp_path, max_epochs=-1, max_steps=-1, callbacks=[gmp])
    with pytest.raises(ValueError, match="needs a run of known length"):
        trainer.fit(TinyClassifier(sparse=True), TinyClassifier().train_dataloader())


def test_a_step_counter_that_jumps_still_prunes_on_schedule():
    # pruning steps at 0, 4, 8; the callback is called at odd steps only (two optimizers)
    gmp = GradualMagnitudePruning(final_sparsity=0.9, start_step=0, end_step=8, frequency=4)
    gmp._window = (0, 8)
    model = TinyClassifier(sparse=True)
    seen = []
    for step in (1, 3, 5, 7, 9):
        gmp.on_train_batch_start(SimpleNamespace(global_step=step), model, None, 0)
        seen.append(gmp.applied)
    assert seen[0] == seen[1] == pytest.approx(gmp.target(0))
    assert seen[2] == seen[3] == pytest.approx(gmp.target(4))
    assert seen[4] == pytest.approx(0.9)
    assert global_sparsity(model) == pytest.approx(0.9, abs=1e-3)


def test_resume_between_pruning_steps_ends_as_an_uninterrupted_run(tmp_path):
    def run(epochs, ckpt=None):
        torch.manual_seed(0)
        model = TinyClassifier(sparse=True, samples=40)  # 5 batches an epoch
        gmp = GradualMagnitudePruning(final_sparsity=0.8, start_step=1, end_step=10, frequency=3)
        trainer = quiet_trainer(
            tmp_path, max_epochs=epochs, limit_train_batches=None, callbacks=[gmp]
        )
        trainer.fit(model, model.train_dataloader(), ckpt_path=ckpt)
        return trainer, model, gmp

    _, whole, _ = run(3)
    with pytest.warns(UserWarning, match="before the schedule's end"):
        trainer, _, _ = run(1)  # stops at step 5, between pruning steps 4 and 7
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    _, resumed, gmp = run(3, ckpt=path)
    assert gmp.applied == pytest.approx(0.8)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
