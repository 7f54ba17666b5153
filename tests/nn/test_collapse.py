"""Layer collapse: a layer whose masks all reach zero is named in one warning, and
``min_connections_per_layer`` keeps a floor of connections in every layer."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from _helpers import quiet_trainer
from scl_lightning import SCLModule
from scl_lightning.callbacks import MaskGradientNormalization, SparseConnectivityLearning
from scl_lightning.data import DigitsDataModule
from scl_lightning.nn import layer_sparsity, masked_modules
from scl_lightning.nn.collapse import LayerCollapseGuard, LayerCollapseWarning


def _fit(tmp_path: Path, **kwargs) -> tuple[SCLModule, list[warnings.WarningMessage]]:
    pl.seed_everything(0)
    # an absurd penalty with a large mask step: every layer is emptied within a few steps
    module = SCLModule(
        "lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=1.0, mask_lr=0.5, **kwargs
    )
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=8,
        log_every_n_steps=1,
        callbacks=[MaskGradientNormalization()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return module, [w for w in caught if issubclass(w.category, LayerCollapseWarning)]


def test_collapse_is_warned_once_per_layer_by_name(tmp_path: Path) -> None:
    module, caught = _fit(tmp_path)
    collapsed = [name for name, s in layer_sparsity(module.model).items() if s == 1.0]
    assert collapsed, "the test needs a collapsed layer"
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(collapsed)  # once each, though checked at every step
    for name in collapsed:
        assert sum(f"'{name}'" in m for m in messages) == 1
    assert all("cut in two" in m and "min_connections_per_layer" in m for m in messages)


def test_min_connections_per_layer_keeps_a_floor(tmp_path: Path) -> None:
    module, _ = _fit(tmp_path, min_connections_per_layer=7)
    for name, layer in masked_modules(module.model):
        assert int((layer.mask > 0).sum()) >= 7, name


def test_guard_revives_the_strongest_masks() -> None:
    layer = torch.nn.Linear(4, 3)
    from scl_lightning.nn import sparsify

    net = sparsify(torch.nn.Sequential(layer))
    with torch.no_grad():
        net[0].mask.copy_(-torch.arange(12.0).view(3, 4) - 1)  # strongest: -1, -2, -3
    assert LayerCollapseGuard(3).check(net, warn=False) == ["0"]
    active = (net[0].mask > 0).view(-1).nonzero().view(-1).tolist()
    assert active == [0, 1, 2]
    assert LayerCollapseGuard(3).check(net, warn=False) == []  # at the floor now


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_min_connections_validation(bad) -> None:
    with pytest.raises(ValueError, match="min_connections_per_layer must be an integer >= 0"):
        SCLModule("lenet_300_100", num_classes=10, min_connections_per_layer=bad)


class PlainMLP(pl.LightningModule):
    """Someone else's module, with no SCL in it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_drop_in_callback_warns_and_keeps_a_floor(tmp_path: Path) -> None:
    def run(**kwargs) -> tuple[PlainMLP, list[warnings.WarningMessage]]:
        pl.seed_everything(0)
        module = PlainMLP()
        scl = SparseConnectivityLearning(lam=1.0, mask_lr=0.5, flops=False, **kwargs)
        trainer = quiet_trainer(
            tmp_path, limit_train_batches=8, log_every_n_steps=1, callbacks=[scl]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
        return module, [w for w in caught if issubclass(w.category, LayerCollapseWarning)]

    module, caught = run()
    assert caught and all("cut in two" in str(w.message) for w in caught)
    module, _ = run(min_connections_per_layer=4)
    for name, layer in masked_modules(module.net):
        assert int((layer.mask > 0).sum()) >= 4, name


def test_guard_revives_channels_last_conv_masks() -> None:
    """A channels_last convolution's mask has no flat view (`mask.view(-1)` raised)."""
    from torch import nn

    from scl_lightning.nn import sparsify

    net = sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)))
    net = net.to(memory_format=torch.channels_last)
    assert not net[0].mask.is_contiguous()
    with torch.no_grad():
        net[0].mask.fill_(-1.0)
        net[0].mask[1, 2, 0, 1] = -0.25  # the strongest of the pruned masks
    assert LayerCollapseGuard(min_connections=3).check(net, warn=False) == ["0"]
    assert int((net[0].mask > 0).sum()) == 3
    assert net[0].mask[1, 2, 0, 1] > 0
    assert not net[0].mask.is_contiguous()  # the layout is kept


def test_guard_in_training_with_channels_last(tmp_path: Path) -> None:
    from torch import nn

    class ChannelsLast(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            pl_module.to(memory_format=torch.channels_last)

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    module = SCLModule(net, lam=1.0, mask_lr=0.5, min_connections_per_layer=2)
    trainer = quiet_trainer(tmp_path, limit_train_batches=4, callbacks=[ChannelsLast()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert int((net[0].mask > 0).sum()) >= 2
