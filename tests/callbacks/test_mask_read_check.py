"""The drop-in engine names, in one line, masked layers its first training step never read
through their masks (their masks would learn from the penalty alone)."""

import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import quiet_trainer
from scl_lightning.callbacks import SparseConnectivityLearning


class ReadsAParameterList(LightningModule):
    """``used`` is called; ``side`` is computed from ``side.named_parameters()`` (the mask
    cannot see that read); ``unused`` is never used; ``proj.weight`` is read functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.side = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = dict(self.side.named_parameters())
        h = torch.relu(self.used(x)) + F.linear(x, side["weight"], side["bias"])
        return F.linear(h, self.proj.weight, self.proj.bias)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    )
    return DataLoader(data, batch_size=8)


def _fit(tmp_path, module: LightningModule, **kwargs) -> list[str]:
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.callbacks.append(SparseConnectivityLearning(**{"lam": 1e-3, "flops": False, **kwargs}))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(module, _loader())
    return [str(w.message) for w in rec if "not computed through their mask" in str(w.message)]


def test_unread_masks_are_named_once_and_left_dense(tmp_path):
    module = ReadsAParameterList()
    lines = _fit(tmp_path, module, lam=1.0, mask_lr=0.5)  # a penalty that prunes fast
    assert len(lines) == 1
    assert "2 of 4 masked layers" in lines[0] and "side, unused." in lines[0]
    assert "proj" not in lines[0].split(":")[1]  # a functional read of .weight is a read
    assert "left dense from here on" in lines[0]
    for name in ("side", "unused"):  # on, frozen: never counted as pruned
        mask = getattr(module, name).mask
        assert bool((mask == 1.0).all()), name
    assert bool((module.used.mask < 1.0).any())  # the read ones learned


def test_nothing_is_said_when_every_mask_is_read(tmp_path):
    assert _fit(tmp_path, ReadsAParameterList(), exclude=["side", "unused"]) == []


def test_a_masked_tied_layer_is_refused_at_setup(tmp_path):
    """sparsify leaves a tied layer dense; one masked by hand would train inconsistently."""
    import pytest

    from scl_lightning.nn import MaskedLinear

    module = ReadsAParameterList()
    module.unused.weight = module.used.weight  # a tie
    MaskedLinear.from_dense(module.unused)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.callbacks.append(SparseConnectivityLearning(lam=1e-3, flops=False))
    shared = r"SparseConnectivityLearning: the masked layer 'unused' shares its weight with used"
    with pytest.raises(ValueError, match=shared):
        trainer.fit(module, _loader())


def _fit_lines(tmp_path, module: LightningModule, **kwargs) -> tuple[list[str], object]:
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    engine = SparseConnectivityLearning(**{"lam": 1e-3, "flops": False, **kwargs})
    trainer.callbacks.append(engine)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(module, _loader())
    return [str(w.message) for w in rec if "weight layers masked" in str(w.message)], engine


def test_one_line_at_setup_names_what_stays_dense_and_the_share(tmp_path, caplog):
    """A tied output layer: one warning at fit start, none from sparsify itself."""

    class Tied(ReadsAParameterList):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(3, 4)
            self.proj.weight = nn.Parameter(torch.randn(3, 4))
            self.emb.weight = self.proj.weight

    lines, engine = _fit_lines(tmp_path, Tied(), exclude=["side", "unused"])
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("SparseConnectivityLearning: 1 of 5 weight layers masked")
    assert "excluded by the user [2, " in line and "side (pattern 'side')" in line
    assert "weight tied to another module [1, " in line and "proj (tied to emb.weight)" in line
    cover = engine.coverage()
    assert cover.masked == ("used",)
    assert {d.name: d.reason for d in cover.dense} == {
        "side": "excluded",
        "unused": "excluded",
        "proj": "tied",
        "emb": "other",
    }


def test_a_network_fully_covered_gets_an_info_line_not_a_warning(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        lines, _ = _fit_lines(tmp_path, ReadsAParameterList(), exclude=["side", "unused"])
    assert lines == []  # no warning
    said = [r.getMessage() for r in caplog.records if "weight layers masked" in r.getMessage()]
    assert len(said) == 1 and "2 of 4 weight layers masked" in said[0], said


def test_layers_found_unread_are_dense_in_the_coverage(tmp_path):
    module = ReadsAParameterList()
    _, engine = _fit_lines(tmp_path, module)
    cover = engine.coverage()
    assert cover.masked == ("used", "proj")
    assert [(d.name, d.reason) for d in cover.dense] == [("side", "unread"), ("unused", "unread")]
    assert "read outside the mask [2, " in cover.line()
