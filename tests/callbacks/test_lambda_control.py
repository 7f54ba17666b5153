"""Budgets: target_sparsity / target_flops with lambda control, and penalty="flops"."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from _helpers import quiet_trainer
from scl_lightning import SCLModule, global_sparsity, masked_modules
from scl_lightning.baselines import GradualMagnitudePruning
from scl_lightning.callbacks import SparseConnectivityLearning
from scl_lightning.callbacks.lambda_control import (
    LAM_RANGE,
    LambdaController,
    cubic_schedule,
)
from scl_lightning.data import DigitsDataModule

# -- bad budgets: one clear error each ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": 1.0}, r"target_sparsity must be in \[0, 1\)"),
        ({"target_sparsity": -0.1}, r"target_sparsity must be in \[0, 1\)"),
        ({"target_sparsity": "0.9"}, "target_sparsity must be a number"),
        ({"target_sparsity": float("nan")}, "target_sparsity must be a number"),
        ({"target_flops": 0.0}, r"target_flops must be in \(0, 1\)"),
        ({"target_flops": 1.0}, r"target_flops must be in \(0, 1\)"),
        ({"target_sparsity": 0.9, "target_flops": 0.1}, "not both"),
        ({"target_sparsity": 0.9, "lam": 1e-5}, "drop lam"),
        ({"target_sparsity": 0.9, "lam": 0.0}, "drop lam"),
        ({"target_epoch": 3}, "without a target"),
        ({"target_sparsity": 0.9, "target_epoch": 3, "target_step": 10}, "not both"),
        ({"target_sparsity": 0.9, "target_epoch": 0}, "target_epoch must be an integer >= 1"),
        ({"target_sparsity": 0.9, "target_step": 2.5}, "target_step must be an integer >= 1"),
        ({"target_sparsity": 0.9, "target_tolerance": 0}, "target_tolerance"),
        ({"target_sparsity": 0.9, "control_gain": 0}, "control_gain"),
        (
            {"target_sparsity": 0.9, "target_epoch": 5, "freeze_masks_epoch": 4},
            "after freeze_masks_epoch",
        ),
        (
            {"target_sparsity": 0.9, "target_epoch": 1, "warmup_epochs": 1},
            "after warmup_epochs",
        ),
        ({"penalty": "macs"}, "penalty must be 'count', 'density' or 'flops'"),
    ],
)
def test_bad_budget_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConnectivityLearning(**kwargs)
    with pytest.raises(ValueError, match=match):
        SCLModule("lenet_300_100", input_shape=(1, 8, 8), **kwargs)


def test_lam_defaults_without_a_target_and_is_the_controllers_with_one():
    assert SparseConnectivityLearning().lam == 2e-5
    assert SparseConnectivityLearning(lam=0.0).lam == 0.0
    engine = SparseConnectivityLearning(target_sparsity=0.9)
    assert engine.controller is not None and engine.lam == 0.0  # not started yet
    with pytest.raises(ValueError, match="set by the controller"):
        engine.lam = 1e-4
    assert SparseConnectivityLearning(target_flops=0.2).penalty == "flops"
    assert SparseConnectivityLearning(target_flops=0.2, penalty="count").penalty == "count"
    assert SparseConnectivityLearning(target_sparsity=0.9).penalty == "count"


# -- the controller on its own ---------------------------------------------------------------


def test_cubic_schedule_ends_and_shape():
    assert cubic_schedule(0, 10, 110, 0.0, 0.9) == 0.0
    assert cubic_schedule(110, 10, 110, 0.0, 0.9) == 0.9
    assert cubic_schedule(500, 10, 110, 0.0, 0.9) == 0.9
    assert cubic_schedule(60, 10, 110, 0.0, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))


def _started(**kwargs) -> LambdaController:
    c = LambdaController(kind="sparsity", target=0.9, **kwargs)
    c.start(step=0, end_step=100, value=0.0, scale=1000.0, crossing_steps=100.0)
    return c


def test_controller_starts_a_decade_below_and_moves_lambda_the_right_way():
    c = _started()
    assert c.lam == pytest.approx(0.1 / 1000.0)
    assert c.lead == pytest.approx(50.0)
    up = c.update(50, 0.0)  # far below the schedule
    assert up > 1e-4
    c2 = _started()
    down = c2.update(50, 0.99)  # far above it
    assert down < 1e-4
    assert c.update(50, 0.0) == up  # one update per optimizer step (several optimizers)


def test_controller_stays_within_its_range():
    c = _started()
    for step in range(1, 2000):
        c.update(step, 0.0)
    assert c.lam == pytest.approx(1e-4 * LAM_RANGE)
    for step in range(2000, 6000):
        c.update(step, 1.0)
    assert c.lam == pytest.approx(1e-4 / LAM_RANGE)


def test_controller_error_is_relative_to_what_is_left():
    # 20% too many connections left is the same error at 90% (10% left) and at 99.5% (0.5%)
    for target in (0.9, 0.995):
        c = LambdaController(kind="sparsity", target=target)
        c.start(step=0, end_step=1, value=0.0, scale=1000.0, crossing_steps=100.0)
        left = 1 - target
        assert c.error(10, 1 - 1.2 * left) == pytest.approx(0.05 * math.log(1.2))
        assert c.error(10, target) == 0.0
    # a prediction far past the target is bounded: lambda drops, it does not collapse
    assert c.error(10, 1.5) == pytest.approx(-0.15)


def test_flops_target_is_a_reduction_and_its_gap_is_in_flops():
    c = LambdaController(kind="flops", target=0.1)
    assert c.goal == pytest.approx(0.9)
    assert c.gap(0.85) == pytest.approx(0.05)  # 15% of the FLOPs left, 10% asked


def test_controller_state_round_trips_exactly():
    c = _started()
    for step, value in enumerate([0.0, 0.05, 0.1, 0.2, 0.21], start=1):
        c.update(step, value)
    d = LambdaController(kind="sparsity", target=0.9)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    assert d.update(6, 0.3) == c.update(6, 0.3)


SMALL = {"hidden": [128, 64]}  # digits MLP, half the width: 900 steps in a few seconds


# -- in training -----------------------------------------------------------------------------


def _fit_digits(
    tmp_path, epochs=40, seed=0, logger=False, **kwargs
) -> tuple[SCLModule, pl.Trainer]:
    pl.seed_everything(seed, verbose=False)
    module = SCLModule("lenet_300_100", input_shape=(1, 8, 8), backbone_kwargs=SMALL, **kwargs)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=epochs,
        limit_train_batches=1.0,
        limit_val_batches=0,
        logger=logger,
        log_every_n_steps=5,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return module, trainer


def test_target_sparsity_is_reached_and_held(tmp_path):
    module, trainer = _fit_digits(tmp_path, target_sparsity=0.9)
    c = module.engine.controller
    assert abs(global_sparsity(module.model) - 0.9) < 0.01
    # reached by 20% of the run, from where the schedule holds the target
    assert c.end_step == round(0.2 * trainer.global_step)
    assert c.reference(c.end_step) == 0.9
    assert module.lam == c.lam > 0


def test_freeze_at_target_freezes_the_masks_once_held(tmp_path):
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            c = pl_module.engine.controller
            if c.frozen_step is not None and "at_freeze" not in snapshots:
                snapshots["at_freeze"] = [
                    m.mask.detach().clone() for _, m in masked_modules(pl_module)
                ]

    pl.seed_everything(0, verbose=False)
    module = SCLModule(
        "lenet_300_100",
        input_shape=(1, 8, 8),
        backbone_kwargs=SMALL,
        target_sparsity=0.8,
        freeze_at_target=True,
    )
    trainer = quiet_trainer(
        tmp_path, max_epochs=30, limit_train_batches=1.0, limit_val_batches=0, callbacks=[Snap()]
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    c = module.engine.controller
    assert c.frozen_step is not None and c.frozen_step >= c.end_step
    assert c.frozen_step < trainer.global_step  # frozen before the end: fine-tuning followed
    end = [m.mask.detach() for _, m in masked_modules(module)]
    assert all(torch.equal(a, b) for a, b in zip(snapshots["at_freeze"], end, strict=True))
    assert abs(global_sparsity(module.model) - 0.8) <= c.tolerance + 1e-3
    assert not module.masks_learning


def test_target_epoch_and_target_step_set_the_end_of_the_schedule(tmp_path):
    module, trainer = _fit_digits(tmp_path, epochs=4, target_sparsity=0.5, target_epoch=2)
    per_epoch = trainer.global_step // 4
    assert module.engine.controller.end_step == 2 * per_epoch
    module, _ = _fit_digits(tmp_path, epochs=2, target_sparsity=0.5, target_step=7)
    assert module.engine.controller.end_step == 7


def test_a_run_too_short_to_reach_the_target_says_so(tmp_path):
    with pytest.warns(UserWarning, match=r"target_sparsity=0.99 missed by -0\.\d+.*train longer"):
        _fit_digits(tmp_path, epochs=2, target_sparsity=0.99)


def test_run_without_an_end_needs_a_target_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = SCLModule("lenet_300_100", input_shape=(1, 8, 8), target_sparsity=0.5)
    trainer = quiet_trainer(tmp_path, max_epochs=-1, max_steps=-1, limit_val_batches=0)
    with pytest.raises(ValueError, match="give target_step or target_epoch"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))


def test_lambda_and_gap_are_logged_at_every_logging_step(tmp_path):
    logger = CSVLogger(tmp_path, name="budget")
    module, trainer = _fit_digits(tmp_path, epochs=3, logger=logger, target_sparsity=0.5)
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    logged = [r for r in rows if r.get("budget/lam")]
    assert len(logged) == trainer.global_step // 5
    c = module.engine.controller
    assert float(logged[-1]["budget/lam"]) > 0
    assert float(logged[-1]["budget/gap"]) == pytest.approx(c.gap(c.last_value), abs=0.01)
    assert [float(r["budget/reference"]) for r in logged] == sorted(
        float(r["budget/reference"]) for r in logged
    )
    assert float(logged[-1]["budget/reference"]) <= 0.5


def test_baselines_refuse_an_engine_with_a_target(tmp_path):
    module = SCLModule("lenet_300_100", input_shape=(1, 8, 8), target_sparsity=0.9)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[GradualMagnitudePruning(0.5)], limit_val_batches=0
    )
    with pytest.raises(ValueError, match="adapts lam to a target"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))


# -- penalty="flops" and target_flops --------------------------------------------------------


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # 8x8 outputs: 64 multiply-adds per weight
        self.fc = nn.Linear(4 * 8 * 8, 10)  # 1 per weight

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_flops_penalty_prices_each_connection_by_its_multiply_adds(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = SCLModule(_ConvNet(), input_shape=(1, 8, 8), lam=1e-6, penalty="flops")
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    engine = module.engine
    costs = {name: engine._cost[id(layer.mask)] for name, layer in masked_modules(module.model)}
    assert costs == {"conv": 64.0, "fc": 1.0}
    module.eval()
    module(torch.zeros(2, 1, 8, 8))  # a forward pass, for penalty_value's counts
    count, term = engine.penalty_value()
    active = {n: int((m.mask > 0).sum()) for n, m in masked_modules(module.model)}
    assert int(count) == sum(active.values())
    assert float(term) == pytest.approx(1e-6 * (64 * active["conv"] + active["fc"]), rel=1e-5)


def test_flops_penalty_gradient_is_lambda_times_the_price(tmp_path):
    """With a zero task loss, one step's mask gradient before normalization is the penalty's:
    lam * price * proxy(m) per connection."""

    class Zero(SCLModule):
        def training_step(self, batch, batch_idx):
            return (self(batch[0]) * 0).sum()

    pl.seed_everything(0, verbose=False)
    module = Zero(
        _ConvNet(), input_shape=(1, 8, 8), lam=1e-3, penalty="flops", mask_grad_norm="none"
    )
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    # one SGD step from m = 1 (momentum starts from the gradient itself): m - mask_lr * grad
    for name, layer in masked_modules(module.model):
        assert torch.allclose(
            layer.mask.detach(),
            torch.ones_like(layer.mask) - 0.01 * 1e-3 * {"conv": 64.0, "fc": 1.0}[name],
            atol=1e-9,
        ), name


def test_flops_target_below_what_unmasked_layers_need_is_refused(tmp_path):
    pl.seed_everything(0, verbose=False)
    # the convolution stays dense: it alone needs 2,304 of the 4,864 FLOPs
    module = SCLModule(_ConvNet(), input_shape=(1, 8, 8), target_flops=0.05, exclude=["conv"])
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"target_flops=0.05 is out of reach.*above 0\.4737"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))


def test_flops_target_is_reached(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = SCLModule(_ConvNet(), input_shape=(1, 8, 8), target_flops=0.3)
    trainer = quiet_trainer(tmp_path, max_epochs=30, limit_train_batches=1.0, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    engine = module.engine
    counts = engine._flop_counts
    fraction = 1.0 - engine.reduction()
    # the same figure as the monitor's effective FLOPs
    from scl_lightning.nn.stats import connectivity

    effective, _ = counts.effective(connectivity(module.model).densities())
    assert fraction == pytest.approx(effective / counts.total, rel=1e-6)
    assert abs(fraction - 0.3) / 0.3 < 0.1
    assert math.isfinite(module.lam) and module.lam > 0


class _Plain(pl.LightningModule):
    """Someone else's module, no SCL in it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_the_drop_in_takes_a_target_too(tmp_path):
    pl.seed_everything(0, verbose=False)
    engine = SparseConnectivityLearning(target_sparsity=0.8, target="net", flops=False)
    trainer = quiet_trainer(
        tmp_path, max_epochs=30, limit_train_batches=1.0, limit_val_batches=0, callbacks=[engine]
    )
    module = _Plain()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert abs(global_sparsity(module.net) - 0.8) < 0.01
    assert engine.lam == engine.controller.lam > 0
