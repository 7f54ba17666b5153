"""Reloading a module trained with the drop-in callback, outside the Trainer (issue 15, item 3).

A LightningModule written with no SCL in mind is trained a few steps with
``SparseConnectivityLearning`` and saved by Lightning's ``ModelCheckpoint``. Its own
``load_from_checkpoint`` fails on that file (the masks are unexpected keys); ``load_sparse``
rebuilds it, masks and all, and it computes exactly what the trained module computed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import scl_lightning as scl
from _helpers import quiet_trainer
from scl_lightning.callbacks.sparse_connectivity_learning import MASK_SPEC_KEY
from scl_lightning.experiment.checkpoint import CheckpointError
from scl_lightning.nn import LeakyReLUSTE, mask_spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


class InputGate(nn.Module):
    """A layer of the user's own with a buffer that happens to be called ``mask``: it is not an
    SCL mask and must not be taken for one."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", (torch.arange(64).reshape(1, 1, 8, 8) % 7 != 0).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class Classifier(LightningModule):
    """What a user writes without SCL: a small CNN, ``save_hyperparameters``, plain SGD."""

    def __init__(self, hidden: int, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.gate = InputGate()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.gate(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Renamed(Classifier):
    """The same network under other attribute names: not the class the checkpoint was of."""

    def __init__(self, hidden: int, lr: float = 0.1) -> None:
        super().__init__(hidden, lr)
        self.body = self.net
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.gate(x))


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


#: the drop-in's settings: the defaults, and channel masks with a non-default estimator on the
#: `net` attribute, its last layer left dense
RUNS = {
    "weight": {"lam": 1e-4, "mask_lr": 0.3},
    "channel": {
        "lam": 1e-5,
        "mask_lr": 0.3,
        "granularity": "channel",
        "ste": "leaky_relu",
        "ste_kwargs": {"alpha": 0.2},
        "target": "net",
        "exclude": ["5"],
    },
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory):
    """A Classifier trained one epoch (8 steps) with the drop-in, its ModelCheckpoint's
    ``last.ckpt``, and the settings it was trained with."""
    tmp = tmp_path_factory.mktemp(request.param)
    engine = scl.callbacks.SparseConnectivityLearning(flops=False, **RUNS[request.param])
    saver = ModelCheckpoint(dirpath=tmp, save_last=True)
    trainer = quiet_trainer(
        tmp, limit_train_batches=None, enable_checkpointing=True, callbacks=[engine, saver]
    )
    torch.manual_seed(0)
    module = Classifier(hidden=12)
    trainer.fit(module, DataLoader(TensorDataset(*_data()), batch_size=8))
    # some connections are off and no layer is dead: the masks matter to the outputs
    sparsity = scl.layer_sparsity(module)
    assert 0 < scl.global_sparsity(module) and max(sparsity.values()) < 1, sparsity
    return {
        "kind": request.param,
        "module": module.eval(),
        "ckpt": tmp / "last.ckpt",
        "trainer": trainer,
    }


def _same_module(a: nn.Module, b: nn.Module) -> None:
    """Same masked layers (estimator, granularity), same tensors and the same outputs, bit for
    bit."""
    assert mask_spec(a) == mask_spec(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    x = _data(16)[0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# -- the problem, and the one call that solves it ----------------------------------------------


def test_load_from_checkpoint_fails_on_a_dropin_checkpoint(run):
    """Why load_sparse exists: the module's own loader has no place for the masks."""
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*\.mask"):
        Classifier.load_from_checkpoint(run["ckpt"], weights_only=True)


def test_load_sparse_restores_the_trained_module(run):
    net = scl.load_sparse(Classifier, run["ckpt"])
    assert type(net) is Classifier and not net.training
    assert net.hparams == {"hidden": 12, "lr": 0.1}
    _same_module(net, run["module"])
    layers = dict(scl.masked_modules(net))
    if run["kind"] == "channel":
        assert sorted(layers) == ["net.0", "net.3"]  # net.5 was excluded: it stays dense
        assert layers["net.3"].granularity == "channel"
        assert layers["net.3"].ste == LeakyReLUSTE(alpha=0.2)
    else:
        assert sorted(layers) == ["net.0", "net.3", "net.5"]


def test_the_checkpoint_records_how_each_layer_is_masked(run):
    checkpoint = torch.load(run["ckpt"], weights_only=True)
    assert checkpoint[MASK_SPEC_KEY] == mask_spec(run["module"])


def test_load_sparse_into_a_built_instance(run):
    module = Classifier(hidden=12)
    assert scl.load_sparse(module, run["ckpt"]) is module
    _same_module(module, run["module"])


def test_hyper_parameters_given_replace_the_saved_ones(run):
    net = scl.load_sparse(Classifier, run["ckpt"], lr=0.5)
    assert net.hparams.lr == 0.5
    _same_module(net, run["module"])


def test_weights_only_checkpoint_reloads_with_a_warning(run, tmp_path):
    """No callback hook runs for a weights-only save: the layers and their granularity are read
    from the masks' shapes, the estimator is the default; the outputs are the same."""
    module = run["module"]
    path = tmp_path / "weights.ckpt"
    run["trainer"].save_checkpoint(path, weights_only=True)
    assert MASK_SPEC_KEY not in torch.load(path, weights_only=True)
    with pytest.warns(UserWarning, match=re.escape(MESSAGES["weights_only"])):
        net = scl.load_sparse(Classifier, path)
    layers, trained = dict(scl.masked_modules(net)), dict(scl.masked_modules(module))
    assert {n: m.granularity for n, m in layers.items()} == {
        n: m.granularity for n, m in trained.items()
    }
    assert {m.ste.name for m in layers.values()} == {"identity"}
    x = _data(16)[0]
    with torch.no_grad():
        assert torch.equal(net(x), module(x))


def test_save_pruned_file_reloads_with_the_same_outputs(run, tmp_path):
    module = run["module"]
    path = scl.save_pruned(module, tmp_path / "pruned.safetensors")
    for net in (
        scl.load_sparse(Classifier, path, hidden=12),
        scl.load_sparse(Classifier(12), path),
    ):
        assert not any(True for _ in scl.masked_modules(net)) and not net.training
        x = _data(16)[0]
        with torch.no_grad():
            assert torch.equal(net(x), module(x))


def test_scl_module_checkpoints_load_too(tmp_path):
    module = scl.SCLModule("lenet_300_100", input_shape=(1, 8, 8), ste="softplus", mask_lr=0.5)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(*_data()), batch_size=8))
    trainer.save_checkpoint(tmp_path / "scl.ckpt")
    net = scl.load_sparse(scl.SCLModule, tmp_path / "scl.ckpt")
    _same_module(net.model, module.eval().model)


# -- bad input: one line each ------------------------------------------------------------------

#: case -> what the error line says (docs/errors.md, case 34, lists each)
MESSAGES = {
    "missing": "load_sparse: nope.ckpt does not exist; check the path",
    "directory": "is a directory; pass a Lightning checkpoint (.ckpt) or a save_pruned file",
    "export": "is a compact, sparse or onnx export, not a checkpoint; load it with "
    "scl_lightning.deploy.load_export",
    "damaged": "is not a readable PyTorch checkpoint",
    "dense": "holds no masks: it was not trained with SCL (the SparseConnectivityLearning "
    "callback, sparsify=True); load it with Classifier.load_from_checkpoint",
    "other_class": "Renamed has no layer 'net.0' to mask; Renamed is not the network that was "
    "masked (build that one: the same class, with the same arguments)",
    "other_hparams": "does not fit this model: mask net.3.mask has shape",
    "no_hparams": "load_sparse: Classifier cannot be built from the hyper-parameters saved in "
    "checkpoint",
    "pruned_no_hparams": "which records no hyper-parameters (missing a required argument: "
    "'hidden'); give them as keyword arguments (load_sparse(Classifier, path, name=value)) or "
    "pass a built Classifier",
    "pruned_into_masked": "holds pruned weights without masks, and this Classifier has masked "
    "layers: load them into one that has none (SCLModule: sparsify=False)",
    "instance_and_hparams": "load_sparse: hyper-parameters (lr) apply when a class is given, and "
    "this Classifier is built already",
    "unknown_ste": "layer 'net.0': unknown STE 'mine'",
    "weights_only": "masked layer(s) (e.g. 'net.0'; a weights-only checkpoint, or one saved "
    "before scl-lightning recorded them): they get 'identity'. The outputs are the same",
}


def _fails(error: type[Exception], case: str, *args, **kwargs) -> str:
    with pytest.raises(error) as info:
        scl.load_sparse(*args, **kwargs)
    message = str(info.value)
    assert MESSAGES[case] in message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A weight-granularity run's checkpoint, read back as a dict to make bad ones from."""
    tmp = tmp_path_factory.mktemp("bad")
    engine = scl.callbacks.SparseConnectivityLearning(mask_lr=0.5, flops=False)
    trainer = quiet_trainer(tmp, max_steps=2, callbacks=[engine])
    trainer.fit(Classifier(hidden=12), DataLoader(TensorDataset(*_data()), batch_size=8))
    trainer.save_checkpoint(tmp / "last.ckpt")
    return tmp / "last.ckpt"


def _variant(ckpt: Path, tmp_path: Path, change) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "variant.ckpt")
    return tmp_path / "variant.ckpt"


def test_missing_file_directory_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(FileNotFoundError, "missing", Classifier, "nope.ckpt")
    _fails(IsADirectoryError, "directory", Classifier, tmp_path)
    (tmp_path / "net.pt2").write_bytes(b"PK")
    _fails(ValueError, "export", Classifier, tmp_path / "net.pt2")
    (tmp_path / "damaged.ckpt").write_bytes(b"not a checkpoint at all")
    _fails(CheckpointError, "damaged", Classifier, tmp_path / "damaged.ckpt")


def test_a_checkpoint_without_masks(ckpt, tmp_path):
    def dense(checkpoint):
        checkpoint["state_dict"] = Classifier(hidden=12).state_dict()
        del checkpoint[MASK_SPEC_KEY]

    _fails(CheckpointError, "dense", Classifier, _variant(ckpt, tmp_path, dense))


def test_a_module_that_does_not_fit(ckpt):
    _fails(CheckpointError, "other_class", Renamed, ckpt)
    _fails(CheckpointError, "other_hparams", Classifier, ckpt, hidden=5)


def test_hyper_parameters_that_cannot_build_the_class(ckpt, tmp_path):
    def unsaved(checkpoint):
        del checkpoint["hyper_parameters"]

    message = _fails(TypeError, "no_hparams", Classifier, _variant(ckpt, tmp_path, unsaved))
    assert "missing a required argument: 'hidden'" in message
    assert "have Classifier.__init__ call self.save_hyperparameters()" in message
    with pytest.raises(TypeError, match=r"got an unexpected keyword argument 'hiden'"):
        scl.load_sparse(Classifier, ckpt, hiden=3)  # a misspelt override is not dropped
    _fails(ValueError, "instance_and_hparams", Classifier(hidden=12), ckpt, lr=0.5)
    with pytest.raises(TypeError, match=r"pass a LightningModule class or instance, got 'x'"):
        scl.load_sparse("x", ckpt)


def test_pruned_file_errors(ckpt, tmp_path):
    trained = scl.load_sparse(Classifier, ckpt)
    path = scl.save_pruned(trained, tmp_path / "pruned.safetensors")
    _fails(TypeError, "pruned_no_hparams", Classifier, path)
    _fails(CheckpointError, "pruned_into_masked", trained, path)


def test_an_estimator_not_registered(ckpt, tmp_path):
    def custom(checkpoint):
        checkpoint[MASK_SPEC_KEY]["net.0"]["ste"] = "mine"

    message = _fails(CheckpointError, "unknown_ste", Classifier, _variant(ckpt, tmp_path, custom))
    assert "register_ste" in message


def test_every_message_is_documented():
    doc = DOC.read_text()
    missing = [case for case, text in MESSAGES.items() if text not in doc]
    assert not missing, f"docs/errors.md, case 34, lacks: {missing}"


def test_scl_export_of_a_dropin_checkpoint_points_to_load_sparse(ckpt, tmp_path, capsys):
    """`scl export` reads SCLModule checkpoints only; for a user's module the line says how to
    do it in Python, with functions that exist."""
    from scl_lightning.deploy import export_model
    from scl_lightning.experiment.export_cli import main as export_main

    assert export_main([str(ckpt), "--format", "dense", "--out", str(tmp_path / "x")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not an SCLModule checkpoint" in line
    assert "scl_lightning.load_sparse(MyModule, path)" in line and "export_model(" in line
    assert callable(scl.load_sparse) and callable(export_model)
    assert not (tmp_path / "x").exists()
