"""The engine and SCLModule with granularity="channel": penalty, normalization, budgets."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import quiet_trainer
from scl_lightning import SCLModule, export_pruned, global_sparsity, masked_modules, sparsify
from scl_lightning.callbacks import MaskGradientNormalization, SparseConnectivityLearning
from scl_lightning.data import DigitsDataModule
from scl_lightning.nn import connectivity
from scl_lightning.nn.flops import flop_counts

BAD = r"granularity must be one of 'weight', 'channel', got 'filter'"


class Net(LightningModule):
    """A small classifier (an MLP, or a CNN for the FLOPs price), plain SGD."""

    def __init__(self, conv: bool = False):
        super().__init__()
        if conv:
            self.net = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 6, 3),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(6 * 6 * 6, 10),
            )
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 96) -> DataLoader:
    dm = DigitsDataModule()
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=32)


class MaskGrads(Callback):
    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([layer.mask.grad.clone() for _, layer in masked_modules(pl_module)])


# -- arguments --------------------------------------------------------------------------------


def test_bad_granularity_is_one_clear_error():
    with pytest.raises(ValueError, match=BAD):
        SparseConnectivityLearning(granularity="filter")
    with pytest.raises(ValueError, match=BAD):
        SCLModule(input_shape=(1, 8, 8), granularity="filter")


def test_drop_in_callback_masks_with_its_granularity(tmp_path):
    model = Net()
    scl = SparseConnectivityLearning(granularity="channel", lam=1e-3)
    quiet_trainer(tmp_path, max_steps=1, callbacks=[scl]).fit(model, _loader())
    assert [layer.mask.shape for _, layer in masked_modules(model)] == [(16, 1), (10, 1)]
    assert scl.total_connections == 64 * 16 + 16 * 10


# -- the penalty's gradient: lam * price * fan_in per unit ------------------------------------


@pytest.mark.parametrize("penalty", ["count", "density", "flops"])
@pytest.mark.parametrize("ste", ["identity", "leaky_relu"])
def test_penalty_gradient_prices_every_connection_of_a_unit(tmp_path, penalty, ste):
    lam = 1e-3
    model = Net(conv=True)
    sparsify(model.net, ste=ste, granularity="channel")
    with torch.no_grad():
        model.net[2].mask[:2] = -0.5  # the leaky estimator's proxy is 0.1 there
    layers = [layer for _, layer in masked_modules(model)]
    proxies = [layer.ste.proxy(layer.mask.detach()) for layer in layers]
    flops = flop_counts(model.net, torch.zeros(1, 1, 8, 8)).layers
    total = sum(layer.weight.numel() for layer in layers)

    raw, after = MaskGrads(), MaskGrads()
    scl = SparseConnectivityLearning(
        lam=lam, penalty=penalty, normalize="none", mask_lr=1e-6, target="net"
    )
    quiet_trainer(tmp_path, max_steps=2, callbacks=[raw, scl, after]).fit(model, _loader())
    assert len(after.grads) == 2
    for name, layer, proxy, g_raw, g_after in zip(
        ["0", "2", "5"], layers, proxies, raw.grads[0], after.grads[0], strict=True
    ):
        fan_in = layer.weight[0].numel()
        price = {"count": 1.0, "density": 1.0 / total, "flops": flops[name] / layer.weight.numel()}
        expected = lam * price[penalty] * fan_in * proxy
        torch.testing.assert_close(g_after - g_raw, expected)
    # the conv layers' multiply-adds per weight are their output positions, not 1
    assert flops["0"] / layers[0].weight.numel() == 64


@pytest.mark.parametrize("owner", ["engine", "callback"])
def test_channel_mask_gradients_are_normalized_over_the_layer(tmp_path, owner):
    model = Net()
    sparsify(model.net, granularity="channel")
    raw, after = MaskGrads(), MaskGrads()
    callbacks: list[Callback] = [raw]
    if owner == "engine":
        callbacks.append(SparseConnectivityLearning(lam=1e-4, normalize="rms"))
    else:  # on its own, for a penalty written in the module's loss
        callbacks.append(MaskGradientNormalization("rms"))
    callbacks.append(after)
    quiet_trainer(tmp_path, max_steps=1, callbacks=callbacks).fit(model, _loader())
    for g_raw, g in zip(raw.grads[0], after.grads[0], strict=True):
        # RMS 1 over the layer's units, and the units keep their ratios (not +-1 each)
        assert g.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-5)
        assert g.abs().std() > 0.05
        if owner == "callback":
            torch.testing.assert_close(g, g_raw / g_raw.pow(2).mean().sqrt())


# -- training on digits: whole units pruned ---------------------------------------------------

SMALL = {"hidden": [128, 64]}


def _fit_digits(tmp_path, epochs=20, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = SCLModule(
        "lenet_300_100",
        input_shape=(1, 8, 8),
        backbone_kwargs=SMALL,
        granularity="channel",
        exclude=["layers.5"],  # the classifier's units are the classes
        **kwargs,
    )
    trainer = quiet_trainer(
        tmp_path, max_epochs=epochs, limit_train_batches=1.0, limit_val_batches=1.0
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return module, trainer


def _check_whole_units_pruned(module) -> int:
    """Every masked layer's export has whole zero rows where a unit is off and the trained
    weights elsewhere; returns the number of units pruned."""
    pruned = export_pruned(module.model).state_dict()
    units_off = 0
    for name, layer in masked_modules(module.model):
        assert layer.mask.shape == (layer.weight.shape[0], 1)
        on = layer.mask.detach().flatten() > 0
        w = pruned[f"{name}.weight"]
        assert torch.all(w[~on] == 0)
        assert torch.equal(w[on], layer.weight.detach()[on])
        units_off += int((~on).sum())
    return units_off


def test_digits_run_prunes_whole_units(tmp_path):
    module, trainer = _fit_digits(tmp_path, lam=2e-5, mask_lr=0.05)
    units_off = _check_whole_units_pruned(module)
    assert units_off >= 10
    assert global_sparsity(module.model) > 0.3
    c = connectivity(module.model)
    fan_ins = {name: layer.weight.shape[1] for name, layer in masked_modules(module.model)}
    off = {x.name: x.total - x.active for x in c.layers if x.masked}
    assert all(off[name] % fan_ins[name] == 0 for name in off)  # counted in connections
    assert trainer.callback_metrics["val/acc"] > 0.9


def test_digits_target_sparsity_is_reached_with_channel_masks(tmp_path):
    module, trainer = _fit_digits(tmp_path, target_sparsity=0.6)
    assert abs(global_sparsity(module.model) - 0.6) < 0.01
    assert abs(module.engine.reduction() - global_sparsity(module.model)) < 1e-12
    assert _check_whole_units_pruned(module) > 0
    assert trainer.callback_metrics["val/acc"] > 0.7


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_reloads_a_channel_model(tmp_path):
    module = SCLModule(
        input_shape=(1, 8, 8), backbone_kwargs={"hidden": [16]}, granularity="channel"
    )
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, _loader())
    with torch.no_grad():
        module.model.layers[1].mask[:5] = -1.0  # five hidden units off
    path = tmp_path / "channel.ckpt"
    trainer.save_checkpoint(path)
    loaded = SCLModule.load_from_checkpoint(path)
    assert loaded.hparams.granularity == "channel" and loaded.engine.granularity == "channel"
    for (_, a), (_, b) in zip(
        masked_modules(module.model), masked_modules(loaded.model), strict=True
    ):
        assert b.granularity == "channel" and torch.equal(a.mask, b.mask)
    # a unit's own connections, its fan-in: the next layer's masks are its own
    assert connectivity(loaded.model).active == 64 * 16 + 16 * 10 - 5 * 64
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), module(x))
    # a weight-granularity model refuses it in one line that names the fix
    with pytest.raises(ValueError, match=r"--model.granularity channel"):
        SCLModule.load_from_checkpoint(path, granularity="weight")
