import csv
import functools
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import quiet_trainer
from scl_lightning import SCLModule, global_sparsity, masked_modules
from scl_lightning.callbacks import MaskGradientNormalization, SparsityMonitor
from scl_lightning.callbacks.mask_group import MASK_GROUP_KEY
from scl_lightning.data import DigitsDataModule
from scl_lightning.models import LeNet300100

# LeNet-300-100 shrunk to 64-16-10: same code path, a fraction of the time
SMALL = {"input_shape": (1, 8, 8), "backbone_kwargs": {"hidden": [16]}}


def _trainer(tmp_path, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, **{"limit_val_batches": 2, **kwargs})


def _random_loader(num_classes: int = 10, n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _digits_batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule()
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    return x[:n], y[:n]


class MaskSnapshots(Callback):
    """Copies of every mask (and one weight) at the start of fit and at each epoch's end."""

    def __init__(self):
        self.masks: list[list[torch.Tensor]] = []
        self.weights: list[torch.Tensor] = []

    def _snapshot(self, pl_module):
        self.masks.append([layer.mask.detach().clone() for _, layer in masked_modules(pl_module)])
        self.weights.append(next(iter(masked_modules(pl_module)))[1].weight.detach().clone())

    def on_fit_start(self, trainer, pl_module):
        self._snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._snapshot(pl_module)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- construction ---------------------------------------------------------------------------------


def test_from_registry_name():
    module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    assert isinstance(module.model, LeNet300100)
    assert [name for name, _ in masked_modules(module)] == [
        "model.layers.1",
        "model.layers.3",
        "model.layers.5",
    ]
    assert module.total_connections == 64 * 300 + 300 * 100 + 100 * 10
    assert len(module.masks) == 3
    assert module.example_input_array.shape == (1, 1, 8, 8)
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    hp = module.hparams
    assert hp.backbone == "lenet_300_100"
    # the arguments as given (lam and penalty default to None: "not asked for"), and what
    # they resolve to without a target
    assert (hp.num_classes, hp.lam, hp.mask_lr, hp.penalty, hp.ste) == (
        10,
        None,
        0.01,
        None,
        "identity",
    )
    assert (module.lam, module.penalty) == (2e-5, "count")
    for ignored in ("task_loss", "optimizer", "lr_scheduler"):
        assert ignored not in hp


def test_from_registry_name_with_backbone_kwargs():
    module = SCLModule("lenet_300_100", num_classes=3, **SMALL)
    assert module.total_connections == 64 * 16 + 16 * 3
    assert module.hparams.backbone_kwargs == {"hidden": [16]}
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_from_module_sparsifies_it_in_place():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))
    weight = net[1].weight.detach().clone()
    module = SCLModule(net, num_classes=4, exclude=["3"], mask_init=0.5, ste="leaky_relu")
    assert module.model is net
    assert [name for name, _ in masked_modules(net)] == ["1"]
    assert type(net[3]) is nn.Linear
    assert torch.equal(net[1].weight, weight)  # weights kept
    assert torch.all(net[1].mask == 0.5)
    assert net[1].ste.name == "leaky_relu"
    # a module is not a hyper-parameter: only its class is recorded, for a clear error on load
    assert module.hparams["backbone"] == "<module>:Sequential"
    assert module.hparams.mask_init == 0.5
    assert module.total_connections == 64 * 8  # the masked layers only (nn.stats.connectivity)


def test_ste_kwargs_reach_the_estimator():
    module = SCLModule("lenet_300_100", ste="leaky_relu", ste_kwargs={"alpha": 0.25}, **SMALL)
    assert all(layer.ste.alpha == 0.25 for _, layer in masked_modules(module))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
        ({"num_classes": True}, r"num_classes must be an integer >= 2, got True"),
        ({"num_classes": 10.0}, r"num_classes must be an integer >= 2, got 10.0"),
        ({"lam": -1}, r"lam must be a finite number >= 0, got -1"),
        ({"lam": "x"}, r"lam must be a finite number >= 0, got 'x'"),
        ({"lam": float("nan")}, r"lam must be a finite number >= 0, got nan"),
        ({"mask_lr": 0}, r"mask_lr must be a finite number > 0, got 0"),
        ({"mask_lr": -0.1}, r"mask_lr must be a finite number > 0, got -0.1"),
        ({"penalty": "foo"}, r"penalty must be 'count', 'density' or 'flops', got 'foo'"),
        ({"ste": "foo"}, r"unknown STE 'foo'; choose one of: .*identity"),
        ({"ste": "leaky_relu", "ste_kwargs": {"alpha": 2.0}}, r"alpha must be in \(0, 1\]"),
        ({"mask_init": 0.0}, r"mask_init must be a finite number > 0"),
        ({"warmup_epochs": -1}, r"warmup_epochs must be an integer >= 0, got -1"),
        (
            {"warmup_epochs": 2, "freeze_masks_epoch": 2},
            r"freeze_masks_epoch \(2\) must be greater than warmup_epochs \(2\)",
        ),
        (
            {"warmup_epochs": 3, "freeze_masks_epoch": 1},
            r"freeze_masks_epoch \(1\) must be greater than warmup_epochs \(3\)",
        ),
        ({"backbone": "nope"}, r"unknown model 'nope'; available: .*lenet_300_100"),
        ({"backbone": 42}, r"backbone must be an nn.Module or a model name, got 42"),
        (
            {"backbone": nn.Linear(64, 10), "backbone_kwargs": {"hidden": [4]}},
            r"backbone_kwargs only applies when backbone is a registry name",
        ),
        ({"backbone_kwargs": {"hidden": [0]}}, r"every hidden width must be a positive integer"),
        ({"exclude": ["*"]}, r"has no Linear or convolution layer to mask"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SCLModule(**kwargs)


# -- optimizers and schedules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "optimizer_cls", "weight_decay"),
    [
        (None, torch.optim.SGD, 5e-4),
        (functools.partial(torch.optim.Adam, lr=1e-3), torch.optim.Adam, 0.0),
        (functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), torch.optim.AdamW, 0.1),
        (
            functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5, weight_decay=1e-3),
            torch.optim.SGD,
            1e-3,
        ),
    ],
)
def test_configure_optimizers_param_groups(tmp_path, factory, optimizer_cls, weight_decay):
    module = SCLModule(optimizer=factory, constant_lr=True, mask_lr=0.03, **SMALL)
    module.model.layers[1].bias.requires_grad_(False)  # frozen parameters are left out
    (group,) = module.configure_optimizers().param_groups  # the engine adds the mask group
    assert {id(p) for p in group["params"]} == {
        id(p) for p in module.parameters() if p.requires_grad
    }
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule())
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is optimizer_cls
    weights, masks = optimizer.param_groups
    mask_ids = {id(m) for m in module.masks}
    assert [id(p) for p in masks["params"]] == [id(m) for m in module.masks]
    assert masks["lr"] == 0.03
    assert masks["weight_decay"] == 0.0
    assert masks[MASK_GROUP_KEY] is True
    assert weights["weight_decay"] == weight_decay
    assert weights["lr"] == (factory.keywords["lr"] if factory else 0.05)
    weight_ids = [id(p) for p in weights["params"]]
    assert len(weight_ids) == len(set(weight_ids))
    assert set(weight_ids).isdisjoint(mask_ids)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert set(weight_ids) | mask_ids == trainable
    assert id(module.model.layers[1].bias) not in set(weight_ids)
    assert len(weight_ids) == 3  # two weights, one bias (the other one is frozen)
    if factory is None:
        assert (weights["momentum"], masks["momentum"]) == (0.9, 0.9)


def test_dense_baseline_has_one_group_and_trains(tmp_path):
    module = SCLModule("lenet_300_100", sparsify=False, lam=1.0, **SMALL)
    assert module.masks == []
    assert not any(name.endswith("mask") for name, _ in module.named_parameters())
    weight = module.model.layers[1].weight.detach().clone()
    trainer = _trainer(tmp_path, log_every_n_steps=1)
    trainer.fit(module, DigitsDataModule())
    assert len(trainer.optimizers[0].param_groups) == 1
    assert not torch.equal(module.model.layers[1].weight, weight)
    metrics = trainer.callback_metrics
    assert metrics["sparsity/global"] == 0.0
    assert metrics["train/connections"] == module.total_connections
    assert metrics["train/loss"] == metrics["train/task_loss"]  # no penalty, whatever lam is


def test_default_schedule_is_cosine_per_step(tmp_path):
    module = SCLModule("lenet_300_100", mask_lr=0.02, **SMALL)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule())
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config.interval == "step"
    assert config.scheduler.T_max == 4  # the whole run, in optimizer steps
    assert config.scheduler.base_lrs == [0.05, 0.02]  # both groups are scheduled
    # 4 steps of a 4-step cosine: both learning rates reached 0
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([0.0, 0.0])


def test_constant_lr(tmp_path):
    module = SCLModule("lenet_300_100", constant_lr=True, mask_lr=0.02, **SMALL)
    assert isinstance(module.configure_optimizers(), torch.optim.SGD)
    trainer = _trainer(tmp_path, limit_val_batches=0, callbacks=[MaskGradientNormalization()])
    trainer.fit(module, DigitsDataModule())
    assert trainer.lr_scheduler_configs == []
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [0.05, 0.02]


def test_custom_scheduler_schedules_both_groups(tmp_path):
    module = SCLModule(
        "lenet_300_100",
        mask_lr=0.02,
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        constant_lr=True,  # ignored: a scheduler was given
        **SMALL,
    )
    trainer = _trainer(
        tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[MaskGradientNormalization()]
    )
    trainer.fit(module, DigitsDataModule())
    assert trainer.lr_scheduler_configs[0].interval == "epoch"
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lrs == pytest.approx([0.05 * 0.25, 0.02 * 0.25])


# -- the objective --------------------------------------------------------------------------------


def _prune_some(module: SCLModule) -> int:
    """Turn some connections off; returns the number still on."""
    with torch.no_grad():
        for i, mask in enumerate(module.masks):
            mask.view(-1)[: 7 * (i + 1)] = -0.5
    return sum(int((m > 0).sum()) for m in module.masks)


@pytest.mark.parametrize("penalty", ["count", "density"])
def test_loss_is_task_loss_plus_lam_times_connections(penalty):
    lam = 1e-3
    module = SCLModule("lenet_300_100", lam=lam, penalty=penalty, **SMALL)
    active = _prune_some(module)
    assert active < module.total_connections
    x, y = _digits_batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.trainer.*")  # no trainer: no logging
        loss = module.training_step((x, y), 0)
    task_loss = F.cross_entropy(module(x), y)
    count = torch.tensor(float(active))
    if penalty == "density":
        count = count / module.total_connections
    torch.testing.assert_close(loss, task_loss + lam * count, rtol=0, atol=1e-6)

    # The value is the objective's; its gradient is the task loss's only: the penalty's
    # gradient is added by the engine before the optimizer step (the same code as the drop-in
    # callback's, tested there), never twice.
    loss.backward()
    from_loss = [m.grad.clone() for m in module.masks]
    module.zero_grad()
    F.cross_entropy(module(x), y).backward()
    for total, mask in zip(from_loss, module.masks, strict=True):
        torch.testing.assert_close(total, mask.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "penalized"),
    [
        ({"lam": 0.0}, False),
        ({"lam": 1e-3, "warmup_epochs": 1}, False),  # epoch 0 is the dense warm-up
        ({"lam": 1e-3, "sparsify": False}, False),
        ({"lam": 1e-3}, True),
    ],
)
def test_no_penalty_when_masks_do_not_learn(kwargs, penalized):
    module = SCLModule("lenet_300_100", **SMALL, **kwargs)
    x, y = _digits_batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.trainer.*")
        loss = module.training_step((x, y), 0)
    task_loss = F.cross_entropy(module(x), y)
    assert torch.equal(loss, task_loss) is not penalized


@pytest.mark.parametrize("penalty", ["count", "density"])
def test_logged_loss_terms_with_a_trainer(tmp_path, penalty):
    lam = 1e-4 if penalty == "count" else 0.5
    module = SCLModule("lenet_300_100", lam=lam, penalty=penalty, **SMALL)
    _prune_some(module)
    trainer = _trainer(
        tmp_path,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[MaskGradientNormalization()],
    )
    trainer.fit(module, DigitsDataModule())
    m = trainer.callback_metrics  # the last step's values
    connections = m["train/connections"]
    assert connections == sum(int((mask > 0).sum()) for mask in module.masks)
    term = connections if penalty == "count" else connections / module.total_connections
    torch.testing.assert_close(m["train/loss"], m["train/task_loss"] + lam * term)
    torch.testing.assert_close(m["sparsity/global"], 1 - connections / module.total_connections)


# -- fitting --------------------------------------------------------------------------------------


def test_fit_on_digits_logs_metrics(tmp_path):
    module = SCLModule("lenet_300_100", **SMALL)
    trainer = _trainer(tmp_path, log_every_n_steps=1, callbacks=[MaskGradientNormalization()])
    trainer.fit(module, DigitsDataModule())
    expected = {
        "train/loss",
        "train/task_loss",
        "train/connections",
        "train/acc",
        "sparsity/global",
        "val/acc",
        "val/loss",
        "val/acc_top5",
    }
    assert expected <= set(trainer.callback_metrics)
    assert expected <= set(trainer.logged_metrics)
    for key in expected:
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert 0.0 <= trainer.callback_metrics["val/acc"] <= trainer.callback_metrics["val/acc_top5"]


def test_fit_with_sparsity_monitor_leaves_sparsity_to_it(tmp_path):
    module = SCLModule("lenet_300_100", **SMALL)
    monitor = SparsityMonitor(log_every_n_steps=1)
    trainer = _trainer(tmp_path, callbacks=[MaskGradientNormalization(), monitor])
    trainer.fit(module, DigitsDataModule())
    assert not module.engine._monitoring  # the engine's own monitor stands down
    # traced from example_input_array: 64*16 + 16*10 multiply-adds
    assert trainer.callback_metrics["flops/dense"] == 64 * 16 + 16 * 10
    assert "sparsity/model.layers.1" in trainer.callback_metrics


def test_normalization_is_built_in(tmp_path):
    """Masks learn with no MaskGradientNormalization callback (the engine normalizes; without
    normalization the digits masks barely move) and nobody warns that one is missing."""
    torch.manual_seed(0)
    module = SCLModule("lenet_300_100", lam=1e-3, mask_lr=0.1, constant_lr=True, **SMALL)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, DigitsDataModule())
    assert not [w for w in record if "MaskGradientNormalization" in str(w.message)]
    assert all(not torch.all(m == 1.0) for m in module.masks), "every layer's masks moved"


def test_a_mask_gradient_normalization_callback_is_taken_over_not_run_twice(tmp_path, monkeypatch):
    """With a MaskGradientNormalization in the Trainer, the engine normalizes (once per layer
    and step, after adding the penalty) and the callback itself does nothing."""
    import scl_lightning.callbacks.mask_grad_norm as mgn_module
    import scl_lightning.callbacks.sparse_connectivity_learning as engine_module

    calls = {"engine": 0, "callback": 0}

    def counting(who, original):
        def normalize(*args, **kwargs):
            calls[who] += 1
            return original(*args, **kwargs)

        return normalize

    monkeypatch.setattr(
        engine_module,
        "normalize_mask_gradient",
        counting("engine", engine_module.normalize_mask_gradient),
    )
    monkeypatch.setattr(
        mgn_module,
        "normalize_mask_gradient",
        counting("callback", mgn_module.normalize_mask_gradient),
    )
    callback = MaskGradientNormalization("rms")
    module = SCLModule("lenet_300_100", lam=1e-3, constant_lr=True, **SMALL)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, DigitsDataModule())
    assert calls == {"engine": 3 * len(module.masks), "callback": 0}
    assert callback._owner is None  # released at the end of fit: usable on its own again


def test_mask_gradient_normalization_mode_overrides_the_engines(tmp_path):
    def run(**kwargs):
        torch.manual_seed(0)
        callbacks = kwargs.pop("callbacks", [])
        module = SCLModule("lenet_300_100", lam=1e-3, constant_lr=True, **SMALL, **kwargs)
        trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(module, DigitsDataModule())
        return [m.detach().clone() for m in module.masks]

    with_callback = run(callbacks=[MaskGradientNormalization("max")])
    assert _same(with_callback, run(mask_grad_norm="max"))
    assert not _same(with_callback, run(mask_grad_norm="rms"))


def test_warmup_and_freeze_phases(tmp_path):
    module = SCLModule(
        "lenet_300_100", lam=1e-3, mask_lr=0.05, warmup_epochs=1, freeze_masks_epoch=2, **SMALL
    )
    snapshots = MaskSnapshots()
    trainer = _trainer(
        tmp_path,
        max_epochs=3,
        limit_val_batches=0,
        callbacks=[MaskGradientNormalization(), snapshots],
    )
    trainer.fit(module, DigitsDataModule())
    start, epoch0, epoch1, epoch2 = snapshots.masks
    assert _same(epoch0, start), "masks must not move during the dense warm-up"
    assert not _same(epoch1, epoch0), "masks must learn between warm-up and freeze"
    assert _same(epoch2, epoch1), "masks must not move once frozen (no momentum drift either)"
    weights = snapshots.weights
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(weights)), "weights train"


def test_masks_learn_and_prune(tmp_path):
    torch.manual_seed(0)
    module = SCLModule("lenet_300_100", lam=1e-3, mask_lr=0.1, constant_lr=True, **SMALL)
    trainer = _trainer(
        tmp_path, max_epochs=2, limit_train_batches=10, callbacks=[MaskGradientNormalization()]
    )
    trainer.fit(module, DigitsDataModule())
    # measured 0.85-0.89 after these 20 steps (seeds 0-2)
    assert trainer.callback_metrics["sparsity/global"] > 0.3


@pytest.mark.parametrize(("num_classes", "top5"), [(4, False), (5, True), (10, True)])
def test_top5_only_with_five_classes_or_more(tmp_path, num_classes, top5):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    module = SCLModule(net, num_classes=num_classes)
    assert hasattr(module, "val_acc_top5") is top5
    assert hasattr(module, "train_acc_top5") is top5
    trainer = _trainer(tmp_path, callbacks=[MaskGradientNormalization()])
    trainer.fit(module, _random_loader(num_classes), _random_loader(num_classes))
    assert ("val/acc_top5" in trainer.callback_metrics) is top5
    assert "val/acc" in trainer.callback_metrics


# -- clipping, schedules and batch-size scaling, checkpoints --------------------------------------


def test_digits_recipe_still_prunes_with_gradient_clipping(tmp_path):
    module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=2e-5)
    trainer = _trainer(
        tmp_path,
        max_epochs=8,
        limit_train_batches=None,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[MaskGradientNormalization()],
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    assert global_sparsity(module.model) > 0.3


def test_one_cycle_schedules_the_mask_group_relative_to_mask_lr(tmp_path):
    """mask_lr is the masks' learning rate when training starts; from there the mask group
    follows the weights' schedule proportionally, whatever the scheduler does (OneCycleLR
    rewrites every group's lr when it is built: the weights start at max_lr / 25 = 0.02)."""
    module = SCLModule(
        "lenet_300_100",
        num_classes=10,
        input_shape=(1, 8, 8),
        mask_lr=0.01,
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.OneCycleLR, max_lr=0.5, total_steps=100
        ),
        lr_scheduler_config={"interval": "step"},
    )
    ratios = []

    class Ratios(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights, masks = trainer.optimizers[0].param_groups
            ratios.append((weights["lr"], masks["lr"]))

        def on_train_start(self, trainer, pl_module):
            weights, masks = trainer.optimizers[0].param_groups
            ratios.append((weights["lr"], masks["lr"]))

    trainer = _trainer(tmp_path, limit_train_batches=30, limit_val_batches=0, callbacks=[Ratios()])
    trainer.fit(module, DigitsDataModule())
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert ratios[0] == pytest.approx((0.02, 0.01))
    for weight_lr, mask_lr in ratios:
        assert mask_lr / weight_lr == pytest.approx(0.01 / 0.02)
    assert ratios[-1][0] > 0.3  # the cycle is under way: near its peak of 0.5


def test_reduce_on_plateau_with_monitor(tmp_path):
    module = SCLModule(
        "lenet_300_100",
        num_classes=10,
        input_shape=(1, 8, 8),
        lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau,
        lr_scheduler_config={"monitor": "val/loss"},
    )
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[MaskGradientNormalization()])
    trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.lr_scheduler_configs[0].monitor == "val/loss"


@pytest.mark.parametrize(("batch", "accumulate", "factor"), [(64, 1, 0.25), (32, 4, 0.5)])
def test_lr_reference_batch_size_scales_every_group(tmp_path, batch, accumulate, factor):
    module = SCLModule(
        "lenet_300_100",
        num_classes=10,
        input_shape=(1, 8, 8),
        mask_lr=0.01,
        constant_lr=True,
        lr_reference_batch_size=256,
    )
    trainer = _trainer(tmp_path, accumulate_grad_batches=accumulate, max_steps=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=batch))
    weights, masks = trainer.optimizers[0].param_groups
    assert weights["lr"] == pytest.approx(0.05 * factor)
    assert masks["lr"] == pytest.approx(0.01 * factor)


def test_lr_reference_batch_size_needs_a_batch_size(tmp_path):
    module = SCLModule("lenet_300_100", num_classes=10, lr_reference_batch_size=256)
    with pytest.raises(ValueError, match="per-device `batch_size`"):
        _trainer(tmp_path).fit(module, train_dataloaders=_random_loader())


def test_load_from_checkpoint_restores_masks(tmp_path):
    module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    _prune_some(module)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=DigitsDataModule())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = SCLModule.load_from_checkpoint(path)
    for a, b in zip(module.masks, loaded.masks, strict=True):
        assert torch.equal(a, b)
    assert global_sparsity(loaded.model) == global_sparsity(module.model) > 0


def test_load_from_checkpoint_of_a_module_backbone_asks_for_it(tmp_path):
    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))

    module = SCLModule(net(), num_classes=10)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=_random_loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"backbone module \(Sequential\).*backbone=MyNet"):
        SCLModule.load_from_checkpoint(path)
    loaded = SCLModule.load_from_checkpoint(path, backbone=net())
    assert torch.equal(loaded.masks[0], module.masks[0])


def test_progress_bar_shows_lam_and_sparsity(tmp_path):
    module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=3e-5)
    trainer = _trainer(tmp_path, callbacks=[MaskGradientNormalization()])
    trainer.fit(module, datamodule=DigitsDataModule())
    shown = trainer.progress_bar_metrics
    assert shown["lam"] == pytest.approx(3e-5)
    assert "sparsity/global" in shown
    assert "lam" not in trainer.logged_metrics  # progress bar only, not sent to the loggers


def test_default_optimizer_is_fused_and_trains_exactly_like_the_plain_sgd(tmp_path):
    """The fused SGD kernel (one pass per tensor) computes the same update as the for-loop
    one: equal here to the last bit or two (over a long run such rounding differences can grow,
    as any kernel change's do)."""
    plain = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    results = []
    for optimizer in (None, plain):
        seed_everything(0, verbose=False)
        module = SCLModule("lenet_300_100", optimizer=optimizer, lam=1e-3, **SMALL)
        trainer = _trainer(
            tmp_path,
            limit_train_batches=6,
            limit_val_batches=0,
            callbacks=[MaskGradientNormalization()],
        )
        trainer.fit(module, DigitsDataModule())
        fused = bool(trainer.optimizers[0].defaults.get("fused"))
        results.append((fused, {k: v.clone() for k, v in module.state_dict().items()}))
    (fused, fused_state), (unfused, plain_state) = results
    assert fused and not unfused
    masks = [v for k, v in fused_state.items() if k.endswith("mask")]
    assert masks and all((m != 1.0).any() for m in masks)  # the masks did learn
    assert fused_state.keys() == plain_state.keys()
    for key in fused_state:
        torch.testing.assert_close(fused_state[key], plain_state[key], rtol=1e-6, atol=1e-7)


def test_default_optimizer_is_not_fused_where_torch_has_no_fused_kernel():
    from scl_lightning.module import _fusable

    assert _fusable([nn.Parameter(torch.zeros(2))])
    assert not _fusable([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])
    assert not _fusable([])
    assert not _fusable([nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])  # bf16-true
    assert _fusable([nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def test_logger_only_values_are_logged_at_lightnings_logging_steps_only(tmp_path):
    """``train/task_loss`` and ``train/connections`` are logged where Lightning writes step
    metrics to the loggers (every ``log_every_n_steps``), and not on the other steps, where
    Lightning would drop them; ``train/loss`` and ``train/task_loss`` (progress bar) and
    ``lam`` are still shown."""

    class CountLogs(Callback):
        def __init__(self):
            self.keys = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.keys.append(set(trainer.callback_metrics))

    class Recorder(SCLModule):
        def log(self, name, *args, **kwargs):
            self.logged.append((self.trainer.global_step, name))
            super().log(name, *args, **kwargs)

    module = Recorder("lenet_300_100", **SMALL)
    module.logged = []
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(
        tmp_path,
        limit_train_batches=6,
        limit_val_batches=0,
        log_every_n_steps=3,
        logger=logger,
        callbacks=[MaskGradientNormalization()],
    )
    trainer.fit(module, DigitsDataModule())
    steps = {name: [s for s, n in module.logged if n == name] for _, name in module.logged}
    assert steps["train/loss"] == [0, 1, 2, 3, 4, 5]
    # Lightning logs steps 2 and 5 (0-based: the 3rd and 6th) to the loggers
    assert steps["train/task_loss"] == steps["train/connections"] == [2, 5]
    assert steps["train/penalty"] == [2, 5]
    assert steps["lam"] == [1]  # once per epoch, by the engine after the first step: it stays
    assert steps["train/acc"] == steps["train/acc_top5"] == [0]  # metric objects: per epoch
    assert trainer.progress_bar_metrics["lam"] == pytest.approx(module.lam)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]
    assert all(r["train/task_loss"] and r["train/connections"] for r in rows)
    for r in rows:  # the objective, logged: task + lam * C
        assert float(r["train/loss"]) == pytest.approx(
            float(r["train/task_loss"]) + module.lam * float(r["train/connections"]), rel=1e-5
        )
        assert float(r["train/penalty"]) == pytest.approx(
            module.lam * float(r["train/connections"]), rel=1e-6
        )


def test_progress_bar_shows_the_task_loss_next_to_the_total(tmp_path):
    """Issue 15, item 5: the total ``train/loss`` alone hides how much of it is the penalty;
    the bar also shows ``train/task_loss``, as of the last logging step."""
    module = SCLModule("lenet_300_100", lam=1e-3, **SMALL)
    trainer = _trainer(tmp_path, limit_train_batches=5, log_every_n_steps=2)
    trainer.fit(module, DigitsDataModule())
    shown = trainer.progress_bar_metrics
    assert {"train/loss", "train/task_loss"} <= set(shown)
    assert shown["train/loss"] > shown["train/task_loss"] > 0  # lam * C on top


def test_train_accuracy_is_over_every_batch_of_the_epoch(tmp_path):
    """The accuracy metric is registered with Lightning once per epoch but updated on every
    batch: the epoch value is the accuracy over all of the epoch's batches, per epoch."""
    module = SCLModule(
        "lenet_300_100",
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        mask_lr=1e-12,
        **SMALL,
    )
    data = DigitsDataModule(batch_size=64)
    trainer = _trainer(
        tmp_path, max_epochs=2, limit_train_batches=5, limit_val_batches=2, log_every_n_steps=1
    )
    seen = []

    class Batches(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                seen.append((pl_module(batch[0]).argmax(1) == batch[1]).float())

        def on_train_epoch_end(self, trainer, pl_module):
            epoch = torch.cat(seen[-5:])
            self.expected = float(epoch.mean())
            self.got = float(trainer.callback_metrics["train/acc"])
            assert self.got == pytest.approx(self.expected, abs=1e-6)
            self.checked = getattr(self, "checked", 0) + 1

    checker = Batches()
    trainer.callbacks.append(checker)
    trainer.fit(module, data)
    assert checker.checked == 2


def test_exclude_counts_the_masked_layers_only(tmp_path):
    """With a layer left dense, sparsity/global and train/connections are over the masked
    layers (they counted the dense layer too: 0.5676 where 512 of 1,024 masked connections are
    pruned), and the whole network's figure has its own name."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    module = SCLModule(net, lam=0.0, exclude=["3"], mask_grad_norm="none", constant_lr=True)
    with torch.no_grad():
        module.model[1].mask[:8] = -1.0  # 512 of the 1,024 masked connections
    assert module.total_connections == 1024
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, log_every_n_steps=1)
    module.engine.mask_lr = 1e-12  # masks keep their values (lam is 0 and no normalization)
    trainer.fit(module, DigitsDataModule())
    metrics = trainer.callback_metrics
    assert metrics["train/connections"] == 512
    assert metrics["sparsity/global"] == pytest.approx(0.5)
    assert metrics["sparsity/global_including_dense"] == pytest.approx(512 / (1024 + 160))
    assert global_sparsity(module.model) == pytest.approx(0.5)


def test_predict_from_a_labelled_batch(tmp_path):
    module = SCLModule("lenet_300_100", **SMALL)
    trainer = _trainer(tmp_path)
    x, y = _digits_batch(8)
    (out,) = trainer.predict(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert out.shape == (8, 10)
    torch.testing.assert_close(out, module(x))
