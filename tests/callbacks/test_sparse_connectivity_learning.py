"""The drop-in callback on a LightningModule written with no SCL in mind."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import quiet_trainer
from scl_lightning import SCLModule, global_sparsity, masked_modules, sparsify
from scl_lightning.callbacks import MaskGradientNormalization, SparseConnectivityLearning
from scl_lightning.callbacks.mask_group import MASK_GROUP_KEY
from scl_lightning.data import DigitsDataModule

WEIGHT_LR = 0.05


class PlainMLP(LightningModule):
    """What someone writes without SCL: an MLP classifier, SGD with momentum and weight decay,
    a StepLR schedule."""

    def __init__(self, net: nn.Module | None = None, scheduler: bool = True):
        super().__init__()
        self.net = net or nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
        )
        self.scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            self.parameters(), lr=WEIGHT_LR, momentum=0.9, weight_decay=5e-4
        )
        if not self.scheduler:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def _trainer(tmp_path, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, **{"limit_val_batches": 0, **kwargs})


def _digits_loader(n: int = 320) -> DataLoader:
    """The first n training digits in a fixed order: the same batches for every run."""
    dm = DigitsDataModule()
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=32)


def _masks(module: nn.Module) -> list[torch.Tensor]:
    return [layer.mask for _, layer in masked_modules(module)]


class MaskGradCapture(Callback):
    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(
            [m.grad.clone() if m.grad is not None else None for m in _masks(pl_module)]
        )


class MaskSnapshots(Callback):
    def __init__(self):
        self.masks: list[list[torch.Tensor]] = []

    def _snapshot(self, pl_module):
        self.masks.append([m.detach().clone() for m in _masks(pl_module)])

    def on_train_start(self, trainer, pl_module):
        self._snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._snapshot(pl_module)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- the drop-in demonstration --------------------------------------------------------------------


def test_drop_in_sparsifies_someone_elses_module(tmp_path):
    torch.manual_seed(0)
    model = PlainMLP()
    scl = SparseConnectivityLearning(lam=1e-3, mask_lr=0.1, log_every_n_steps=5)
    trainer = _trainer(
        tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=None, callbacks=[scl]
    )
    trainer.fit(model, DigitsDataModule())

    # the network was sparsified in place
    assert [name for name, _ in masked_modules(model)] == ["net.1", "net.3"]
    # the module's own optimizer gained a mask group; its StepLR schedules both groups
    (optimizer,) = trainer.optimizers
    weights, masks = optimizer.param_groups
    assert {id(p) for p in masks["params"]} == {id(m) for m in _masks(model)}
    assert {id(p) for p in weights["params"]}.isdisjoint({id(m) for m in _masks(model)})
    assert masks[MASK_GROUP_KEY] is True
    assert (masks["weight_decay"], weights["weight_decay"]) == (0.0, 5e-4)
    assert masks["momentum"] == weights["momentum"] == 0.9
    assert weights["lr"] == pytest.approx(WEIGHT_LR * 0.5**3)
    assert masks["lr"] == pytest.approx(0.1 * 0.5**3)
    # it learned a sparse network that still classifies (measured over seeds 0-3: sparsity
    # 0.93-0.94, validation accuracy 0.87-0.90; a dense run of this MLP reaches about 0.95)
    sparsity = global_sparsity(model)
    assert sparsity > 0.8
    assert trainer.callback_metrics["val_acc"] > 0.75
    # and logged it, FLOPs included, to the module's logger
    metrics = trainer.callback_metrics
    assert metrics["sparsity/global"] == pytest.approx(sparsity)
    assert {"sparsity/net.1", "sparsity/net.3", "flops/dense", "flops/effective"} <= set(metrics)
    assert metrics["flops/ratio"] < 0.2
    assert "train_loss" in metrics  # the module's own logs are untouched


# (config of SCLModule, matching config of the callback, epochs)
EQUIVALENT = {
    "count": ({}, {}, 2),
    "density": ({"lam": 0.5, "penalty": "density"}, {"lam": 0.5, "penalty": "density"}, 2),
    "leaky_relu": (
        {"ste": "leaky_relu", "ste_kwargs": {"alpha": 0.2}},
        {"ste": "leaky_relu", "ste_kwargs": {"alpha": 0.2}},
        2,
    ),
    "phases": (
        {"warmup_epochs": 1, "freeze_masks_epoch": 2},
        {"warmup_epochs": 1, "freeze_masks_epoch": 2},
        3,
    ),
}


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_same_masks_as_scl_module(tmp_path, case):
    """SCLModule and the callback on a plain module are the same algorithm: same gradients
    (task + lam * proxy on the masks, task only on the weights), same groups, same steps."""
    module_kwargs, callback_kwargs, epochs = EQUIVALENT[case]
    lam, mask_lr = 1e-3, 0.1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    reference = SCLModule(
        copy.deepcopy(net),
        **{"lam": lam, **module_kwargs},
        mask_lr=mask_lr,
        optimizer=functools.partial(torch.optim.SGD, lr=WEIGHT_LR, momentum=0.9, weight_decay=5e-4),
        constant_lr=True,
    )
    trainer = _trainer(tmp_path, max_epochs=epochs, callbacks=[MaskGradientNormalization()])
    trainer.fit(reference, _digits_loader())

    plain = PlainMLP(copy.deepcopy(net), scheduler=False)
    scl = SparseConnectivityLearning(**{"lam": lam, **callback_kwargs}, mask_lr=mask_lr)
    trainer = _trainer(tmp_path, max_epochs=epochs, callbacks=[scl])
    trainer.fit(plain, _digits_loader())

    # Bit-for-bit: the penalty's gradient is lam * proxy(m) either way (autograd through
    # lam * C, or added by hand), float addition is commutative, and both optimizers apply the
    # same per-tensor SGD updates.
    for (name, expected), (_, actual) in zip(
        reference.model.named_parameters(), plain.net.named_parameters(), strict=True
    ):
        assert torch.equal(actual, expected), name
    assert 0.0 < global_sparsity(plain) < 1.0


# -- options --------------------------------------------------------------------------------------


class WithProbe(PlainMLP):
    """A module with a layer outside its network (say, a probe head)."""

    def __init__(self):
        super().__init__(scheduler=False)
        self.probe = nn.Linear(4, 4)


@pytest.mark.parametrize(
    ("target", "masked"), [(None, ["net.1", "net.3", "probe"]), ("net", ["net.1", "net.3"])]
)
def test_target(tmp_path, target, masked):
    model = WithProbe()
    scl = SparseConnectivityLearning(target=target, flops=False)
    _trainer(tmp_path, max_steps=1, callbacks=[scl]).fit(model, _digits_loader())
    assert [name for name, _ in masked_modules(model)] == masked
    (optimizer,) = model.trainer.optimizers
    assert len(optimizer.param_groups[1]["params"]) == len(masked)


@pytest.mark.parametrize("target", ["nope", "scheduler", "training_step"])
def test_bad_target(tmp_path, target):
    scl = SparseConnectivityLearning(target=target)
    trainer = _trainer(tmp_path, callbacks=[scl])
    with pytest.raises(ValueError, match=rf"target='{target}' is not a submodule of PlainMLP"):
        trainer.fit(PlainMLP(), _digits_loader())


@pytest.mark.parametrize("exclude", ["net.3", ["net.3"], ("net.3",)])
def test_exclude(tmp_path, exclude):
    model = PlainMLP()
    scl = SparseConnectivityLearning(exclude=exclude, flops=False)
    _trainer(tmp_path, max_steps=1, callbacks=[scl]).fit(model, _digits_loader())
    assert [name for name, _ in masked_modules(model)] == ["net.1"]
    assert type(model.net[3]) is nn.Linear


def test_mask_init_and_ste(tmp_path):
    model = PlainMLP()
    scl = SparseConnectivityLearning(mask_init=0.3, ste="softplus", ste_kwargs={"beta": 2.0})
    _trainer(tmp_path, max_steps=1, callbacks=[scl]).fit(model, _digits_loader())
    assert model.net[1].ste.name == "softplus" and model.net[1].ste.beta == 2.0
    # one step of mask_lr=0.01 on RMS-normalized gradients cannot move a mask far from 0.3
    assert torch.allclose(model.net[1].mask, torch.full_like(model.net[1].mask, 0.3), atol=0.1)


def test_warmup_and_freeze_phases(tmp_path):
    snapshots = MaskSnapshots()
    scl = SparseConnectivityLearning(lam=1e-3, mask_lr=0.05, warmup_epochs=1, freeze_masks_epoch=2)
    _trainer(tmp_path, max_epochs=3, callbacks=[scl, snapshots]).fit(PlainMLP(), _digits_loader())
    start, epoch0, epoch1, epoch2 = snapshots.masks
    assert _same(epoch0, start), "masks must not move during the dense warm-up"
    assert not _same(epoch1, epoch0), "masks must learn between warm-up and freeze"
    assert _same(epoch2, epoch1), "masks must not move once frozen"


@pytest.mark.parametrize("ste", ["identity", "leaky_relu"])
@pytest.mark.parametrize("penalty", ["count", "density"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_penalty_gradient_added_once_per_optimizer_step(tmp_path, ste, penalty, accumulate):
    lam = 1e-2
    model = PlainMLP()
    sparsify(model.net, ste=ste)  # pre-sparsified: the callback keeps the layers as they are
    with torch.no_grad():
        model.net[1].mask[:3] = -0.5  # the leaky estimator's proxy is 0.1 there
    total = sum(m.numel() for m in _masks(model))
    proxies = [layer.ste.proxy(layer.mask.detach()) for _, layer in masked_modules(model)]

    raw, after = MaskGradCapture(), MaskGradCapture()
    scl = SparseConnectivityLearning(
        lam=lam, penalty=penalty, ste=ste, normalize="none", mask_lr=1e-6
    )
    trainer = _trainer(
        tmp_path,
        limit_train_batches=4,
        accumulate_grad_batches=accumulate,
        callbacks=[raw, scl, after],
    )
    trainer.fit(model, _digits_loader())

    steps = 4 // accumulate
    assert trainer.global_step == len(raw.grads) == len(after.grads) == steps
    scale = lam if penalty == "count" else lam / total
    for grads_raw, grads_after in zip(raw.grads, after.grads, strict=True):
        for g_raw, g_after, proxy in zip(grads_raw, grads_after, proxies, strict=True):
            torch.testing.assert_close(g_after - g_raw, scale * proxy)


def test_penalty_uses_each_layers_estimator(tmp_path):
    """A network sparsified beforehand keeps its estimator: the callback's `ste` only applies
    to layers it masks itself."""
    model = PlainMLP()
    sparsify(model.net, ste="leaky_relu", ste_kwargs={"alpha": 0.1})
    with torch.no_grad():
        model.net[3].mask[:] = -1.0
    raw, after = MaskGradCapture(), MaskGradCapture()
    scl = SparseConnectivityLearning(lam=1.0, ste="identity", normalize="none", mask_lr=1e-6)
    _trainer(tmp_path, max_steps=1, callbacks=[raw, scl, after]).fit(model, _digits_loader())
    penalty = after.grads[0][1] - raw.grads[0][1]
    torch.testing.assert_close(penalty, torch.full_like(penalty, 0.1))


def test_lam_zero_adds_no_penalty(tmp_path):
    raw, after = MaskGradCapture(), MaskGradCapture()
    scl = SparseConnectivityLearning(lam=0.0, normalize="none")
    _trainer(tmp_path, callbacks=[raw, scl, after]).fit(PlainMLP(), _digits_loader())
    for grads_raw, grads_after in zip(raw.grads, after.grads, strict=True):
        assert _same(grads_raw, grads_after)


def test_resume_from_checkpoint(tmp_path):
    def fit(model, epochs, **kwargs):
        scl = SparseConnectivityLearning(lam=1e-3, mask_lr=0.1, flops=False)
        snapshots = MaskSnapshots()
        trainer = _trainer(tmp_path, max_epochs=epochs, callbacks=[scl, snapshots])
        trainer.fit(model, _digits_loader(), **kwargs)
        return trainer, snapshots

    first = PlainMLP()
    trainer, _ = fit(first, 1)
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    assert any(k.endswith("mask") for k in torch.load(ckpt, weights_only=False)["state_dict"])

    trainer, snapshots = fit(PlainMLP(), 2, ckpt_path=ckpt)
    assert _same(snapshots.masks[0], _masks(first)), "the masks are restored"
    (optimizer,) = trainer.optimizers
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [WEIGHT_LR * 0.25, 0.1 * 0.25]
    )
    assert trainer.global_step == 6


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1}, r"lam must be a finite number >= 0, got -1"),
        ({"lam": "x"}, r"lam must be a finite number >= 0, got 'x'"),
        ({"mask_lr": 0}, r"mask_lr must be a finite number > 0, got 0"),
        ({"penalty": "foo"}, r"penalty must be 'count', 'density' or 'flops', got 'foo'"),
        ({"ste": "foo"}, r"unknown STE 'foo'"),
        ({"ste": "softplus", "ste_kwargs": {"beta": 0}}, r"beta must be > 0"),
        ({"mask_init": 0}, r"mask_init must be a finite number > 0"),
        ({"mask_init": "1"}, r"mask_init must be a positive number, got '1'"),
        ({"exclude": [""]}, r"exclude patterns must be non-empty strings, got ''"),
        ({"exclude": [3]}, r"exclude patterns must be non-empty strings, got 3"),
        ({"target": ""}, r"target must be an attribute name or None, got ''"),
        ({"target": 3}, r"target must be an attribute name or None, got 3"),
        ({"normalize": "foo"}, r"unknown normalization mode 'foo'"),
        ({"warmup_epochs": -1}, r"warmup_epochs must be an integer >= 0, got -1"),
        ({"freeze_masks_epoch": 0}, r"freeze_masks_epoch \(0\) must be greater than warmup"),
        ({"log_every_n_steps": 0}, r"log_every_n_steps must be an integer >= 1, got 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConnectivityLearning(**kwargs)


def test_needs_an_optimizer(tmp_path):
    class NoOptimizer(PlainMLP):
        def configure_optimizers(self):
            return None

    trainer = _trainer(tmp_path, callbacks=[SparseConnectivityLearning()])
    with pytest.raises(ValueError, match="needs the module to configure an optimizer"):
        trainer.fit(NoOptimizer(), _digits_loader())


# -- gradient clipping, several optimizers, configure_model ---------------------------------------


class GradNorms(Callback):
    """Weight gradient norms and mask gradients as the optimizer step used them (recorded right
    after the step: Lightning clips inside the step's closure)."""

    def __init__(self):
        self.weights: list[float] = []
        self.masks: list[bool] = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(self._record)

    def _record(self, optimizer, *_):
        weights = [
            p
            for g in optimizer.param_groups
            if not g.get(MASK_GROUP_KEY)
            for p in g["params"]
            if p.grad is not None
        ]
        masks = [p for g in optimizer.param_groups if g.get(MASK_GROUP_KEY) for p in g["params"]]
        self.weights.append(
            float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in weights])
                )
            )
        )
        self.masks.append(all(m.grad is not None for m in masks))


def test_gradient_clipping_applies_to_weights_only(tmp_path):
    """Normalized mask gradients (RMS 1 per feature) must not enter the clipping norm."""
    torch.manual_seed(0)
    norms = GradNorms()
    scl = SparseConnectivityLearning(lam=1e-3, mask_lr=0.1)
    trainer = _trainer(
        tmp_path, limit_train_batches=4, gradient_clip_val=0.5, callbacks=[scl, norms]
    )
    trainer.fit(PlainMLP(scheduler=False), train_dataloaders=_digits_loader())
    assert all(norms.masks), "mask gradients are back for the optimizer step"
    # the weights were clipped to 0.5 by their own norm, not shrunk by the masks' (~ sqrt(2400))
    assert max(norms.weights) <= 0.5 + 1e-4
    assert min(norms.weights) > 0.05


def test_masks_still_learn_with_gradient_clipping(tmp_path):
    torch.manual_seed(0)
    module = PlainMLP(scheduler=False)
    trainer = _trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=None,
        gradient_clip_val=1.0,
        callbacks=[SparseConnectivityLearning(lam=1e-3, mask_lr=0.1)],
    )
    trainer.fit(module, train_dataloaders=_digits_loader())
    assert global_sparsity(module.net) > 0.5


class TwoNets(LightningModule):
    """GAN-style: two networks, two optimizers, manual optimization."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        self.disc = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        og, od = self.optimizers()
        for net, opt in ((self.gen, og), (self.disc, od)):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.gen.parameters(), lr=0.05),
            torch.optim.SGD(self.disc.parameters(), lr=0.05),
        )


def test_each_optimizer_keeps_its_own_masks(tmp_path):
    module = TwoNets()
    snaps = MaskSnapshots()
    trainer = _trainer(
        tmp_path,
        limit_train_batches=4,
        callbacks=[SparseConnectivityLearning(lam=1e-3, mask_lr=0.1), snaps],
    )
    trainer.fit(module, train_dataloaders=_digits_loader())
    og, od = trainer.optimizers
    gen_masks = {id(m) for m in _masks(module.gen)}
    disc_masks = {id(m) for m in _masks(module.disc)}
    for opt, own in ((og, gen_masks), (od, disc_masks)):
        groups = [g for g in opt.param_groups if g.get(MASK_GROUP_KEY)]
        assert len(groups) == 1
        assert {id(p) for p in groups[0]["params"]} == own
    # each network's masks were updated by its own optimizer with its own task gradient: not all
    # by the same amount, as a penalty-only update of a foreign optimizer would do
    before, after = snaps.masks[0], snaps.masks[-1]
    for b, a in zip(before, after, strict=True):
        moved = (a - b).abs()
        assert moved.max() > 0 and moved.std() > 0


class BuiltInConfigureModel(PlainMLP):
    def __init__(self):
        LightningModule.__init__(self)
        self.net = None
        self.scheduler = False

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_module_that_builds_layers_in_configure_model(tmp_path):
    module = BuiltInConfigureModel()
    trainer = _trainer(tmp_path, callbacks=[SparseConnectivityLearning(target="net")])
    trainer.fit(module, train_dataloaders=_digits_loader())
    assert len(_masks(module.net)) == 2


def test_progress_bar_shows_lam(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[SparseConnectivityLearning(lam=4e-5)])
    trainer.fit(PlainMLP(scheduler=False), train_dataloaders=_digits_loader())
    assert trainer.progress_bar_metrics["lam"] == pytest.approx(4e-5)
    assert "lam" not in trainer.logged_metrics


def test_named_parameter_groups_with_learning_rate_monitor(tmp_path):
    """A mask group that copied the user's group name made LearningRateMonitor raise
    "duplicated parameter group names"; it is named ``<name>/masks`` and its lr is shown."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    class Named(PlainMLP):
        def configure_optimizers(self):
            return torch.optim.SGD(
                [{"params": self.parameters(), "name": "net"}], lr=WEIGHT_LR, momentum=0.9
            )

    monitor = LearningRateMonitor()
    trainer = _trainer(
        tmp_path,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[SparseConnectivityLearning(lam=1e-3, mask_lr=0.02), monitor],
    )
    trainer.fit(Named(scheduler=False), _digits_loader())
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["net", "net/masks"]
    assert trainer.callback_metrics["lr-SGD/net/masks"] == pytest.approx(0.02)
    assert trainer.callback_metrics["lr-SGD/net"] == pytest.approx(WEIGHT_LR)


def test_unnamed_groups_stay_unnamed():
    from scl_lightning.callbacks.mask_group import attach_mask_group

    net = sparsify(nn.Linear(3, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    group = attach_mask_group(optimizer, [net.mask], 0.01)
    assert "name" not in group


# -- a run too short to prune (issue 15 item 4) ------------------------------------------------


def _short_fit(tmp_path, steps: int, momentum: float, **engine):
    from scl_lightning.data import DigitsDataModule

    module = SCLModule(
        "lenet_300_100",
        input_shape=(1, 8, 8),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum),
        **engine,
    )
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_train_batches=1.0, max_epochs=-1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))


@pytest.mark.parametrize(
    "steps,momentum,warns",
    [
        (5, 0.9, True),  # 5 x 0.01 x 10 = 0.5 < 1
        (50, 0.0, True),  # 50 x 0.01 = 0.5
        (150, 0.0, False),  # 1.5
        (46, 0.9, False),  # 4.6: a 46-step digits run does prune (momentum)
    ],
)
def test_a_run_too_short_to_prune_warns_once_with_the_numbers(
    tmp_path, recwarn, steps, momentum, warns
):
    _short_fit(tmp_path, steps, momentum)
    found = [w for w in recwarn if "masks cannot be pruned in this run" in str(w.message)]
    assert len(found) == (1 if warns else 0)
    if warns:
        text = str(found[0].message)
        assert f"{steps} mask-learning steps" in text and "mask_init 1" in text
        assert "raise mask_lr" in text
