import json

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from _helpers import TinyClassifier as _PlainClassifier
from _helpers import quiet_trainer
from scl_lightning import sparsify
from scl_lightning.experiment import RunSummary

REQUIRED = {
    "val_acc",
    "sparsity",
    "active_connections",
    "total_connections",
    "dense_flops",
    "effective_flops",
    "seed",
}


class TinyClassifier(_PlainClassifier):
    """Plain (non-SCL) module logging val/acc and val/loss (test/acc and test/loss when tested);
    lr=0 keeps hand-set masks fixed."""

    def __init__(self):
        super().__init__(lr=0.0, samples=32)

    def _evaluate(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y))
        self.log(f"{stage}/acc", (logits.argmax(dim=1) == y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def val_dataloader(self):
        return self._loader()

    test_dataloader = val_dataloader


class _HeldOut(LightningDataModule):
    """A data module declaring its test split held out (as DigitsDataModule does)."""

    held_out_test = True

    def __init__(self, model: TinyClassifier) -> None:
        super().__init__()
        self.model = model

    def train_dataloader(self):
        return self.model._loader()

    val_dataloader = test_dataloader = train_dataloader


def _pruned_model() -> TinyClassifier:
    model = TinyClassifier()
    sparsify(model.net)
    with torch.no_grad():
        model.net[1].mask[:4] = -1.0  # 256 of 1024 off
        model.net[3].mask[0] = -1.0  # 16 of 160 off
    return model


def _trainer(tmp_path, **kwargs) -> Trainer:
    logger = CSVLogger(tmp_path, name="run", version=0)
    return quiet_trainer(tmp_path, **{"limit_val_batches": 2, "logger": logger, **kwargs})


def test_writes_summary_json(tmp_path):
    seed_everything(123)
    callback = RunSummary(print_table=False)
    trainer = _trainer(tmp_path, callbacks=[callback])
    trainer.fit(_pruned_model())

    path = tmp_path / "run" / "version_0" / "summary.json"
    assert callback.path == path
    summary = json.loads(path.read_text())
    assert summary == callback.summary
    assert REQUIRED <= set(summary)
    assert summary["val_acc"] == pytest.approx(float(trainer.callback_metrics["val/acc"]))
    assert summary["val_loss"] == pytest.approx(float(trainer.callback_metrics["val/loss"]))
    assert summary["sparsity"] == pytest.approx(272 / 1184)
    assert (summary["active_connections"], summary["total_connections"]) == (912, 1184)
    assert summary["dense_flops"] == 1184  # 64*16 + 16*10 multiply-adds for one sample
    assert summary["effective_flops"] == 1024 * 3 // 4 + 160 * 9 // 10
    assert summary["seed"] == 123
    assert (summary["epochs"], summary["global_step"]) == (1, 3)
    assert summary["train_time_s"] >= 0
    assert summary["layers"] == [
        {
            "name": "net.1",
            "shape": [16, 64],
            "active": 768,
            "total": 1024,
            "sparsity": 0.25,
            "masked": True,
            "dense_flops": 1024,
        },
        {
            "name": "net.3",
            "shape": [10, 16],
            "active": 144,
            "total": 160,
            "sparsity": pytest.approx(0.1),
            "masked": True,
            "dense_flops": 160,
        },
    ]
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []
    assert summary["metrics"]["val/acc"] == summary["val_acc"]


class _OtherNames(TinyClassifier):
    """Someone else's module, logging `val_acc` and `valid_loss`."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())
        self.log("valid_loss", F.cross_entropy(logits, y))


def test_other_modules_metric_names(tmp_path):
    """RunSummary read only `val/acc` and `val/loss`, so other modules got None."""
    model = _OtherNames()
    callback = RunSummary(print_table=False, val_loss_key="valid_loss")
    _trainer(tmp_path, callbacks=[callback]).fit(model)
    summary = callback.summary
    assert summary["val_acc"] == pytest.approx(float(summary["metrics"]["val_acc"]))
    assert summary["val_acc"] is not None and summary["val_loss"] is not None
    assert summary["val_loss"] == summary["metrics"]["valid_loss"]


def test_exclude_counts_the_masked_layers(tmp_path):
    model = TinyClassifier()
    sparsify(model.net, exclude=["3"])
    with torch.no_grad():
        model.net[1].mask[:8] = -1.0  # 512 of the 1,024 masked connections
    callback = RunSummary(print_table=False)
    _trainer(tmp_path, callbacks=[callback]).fit(model)
    summary = callback.summary
    assert (summary["active_connections"], summary["total_connections"]) == (512, 1024)
    assert summary["sparsity"] == 0.5
    assert summary["sparsity_including_dense"] == pytest.approx(512 / 1184)
    assert [layer["masked"] for layer in summary["layers"]] == [True, False]
    cover = summary["coverage"]
    assert cover["masked_layers"] == 1 and cover["masked_parameters"] == 1024
    assert [(d["name"], d["reason"]) for d in cover["dense_layers"]] == [("net.3", "excluded")]
    params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".mask"))
    assert cover["parameters"] == params
    assert cover["share_not_masked"] == pytest.approx(1 - 1024 / params)


def test_shares_the_monitors_trace(tmp_path, monkeypatch):
    """fvcore traced twice per `scl fit` (SparsityMonitor and RunSummary): once now."""
    import scl_lightning.nn.flops as flops_module
    from scl_lightning.callbacks import SparsityMonitor

    calls = []
    original = flops_module.count_flops

    def counting(model, example):
        calls.append(tuple(example.shape))
        return original(model, example)

    monkeypatch.setattr(flops_module, "count_flops", counting)
    model = _pruned_model()
    callbacks = [SparsityMonitor(log_every_n_steps=1), RunSummary(print_table=False)]
    _trainer(tmp_path, callbacks=callbacks).fit(model)
    assert calls == [(1, 1, 8, 8)]
    assert callbacks[1].summary["dense_flops"] == 1184


def test_never_overwrites(tmp_path):
    _trainer(tmp_path, callbacks=[RunSummary(print_table=False)]).fit(_pruned_model())
    first = tmp_path / "run" / "version_0" / "summary.json"
    content = first.read_bytes()

    dense = TinyClassifier()  # a different result, written to the same directory
    callback = RunSummary(print_table=False)
    _trainer(tmp_path, callbacks=[callback]).fit(dense)
    assert callback.path == first.with_name("summary-1.json")
    assert first.read_bytes() == content
    assert json.loads(callback.path.read_text())["sparsity"] == 0.0

    callback = RunSummary(print_table=False)
    _trainer(tmp_path, callbacks=[callback]).fit(dense)
    assert callback.path.name == "summary-2.json"
    assert first.read_bytes() == content


def test_custom_filename(tmp_path):
    callbacks = [RunSummary("final.json", print_table=False)]
    _trainer(tmp_path, callbacks=callbacks).fit(_pruned_model())
    _trainer(tmp_path, callbacks=[RunSummary("final.json", print_table=False)]).fit(_pruned_model())
    names = sorted(p.name for p in (tmp_path / "run" / "version_0").glob("final*.json"))
    assert names == ["final-1.json", "final.json"]


def test_prints_the_table(tmp_path, capsys):
    callback = RunSummary()
    _trainer(tmp_path, callbacks=[callback]).fit(_pruned_model())
    out = capsys.readouterr().out
    assert "SCL run summary" in out
    assert "sparsity" in out and "0.2297" in out
    assert "active_connections  912" in out
    assert "net.1" in out and "16x64" in out and "0.2500" in out
    assert "coverage" in out and "2 of 2 weight layers masked" in out
    assert f"summary written to {callback.path}" in out


def test_print_table_false(tmp_path, capsys):
    _trainer(tmp_path, callbacks=[RunSummary(print_table=False)]).fit(_pruned_model())
    assert "SCL run summary" not in capsys.readouterr().out


def test_dense_model(tmp_path):
    callback = RunSummary(print_table=False)
    _trainer(tmp_path, callbacks=[callback]).fit(TinyClassifier())
    summary = callback.summary
    assert summary["sparsity"] == 0.0
    assert summary["active_connections"] == summary["total_connections"] == 1184
    assert summary["effective_flops"] == summary["dense_flops"] == 1184
    assert all(layer["sparsity"] == 0.0 for layer in summary["layers"])
    assert summary["seed"] is None  # never seeded


def test_without_a_logger_writes_to_default_root_dir(tmp_path):
    callback = RunSummary(print_table=False)
    _trainer(tmp_path, logger=False, callbacks=[callback]).fit(_pruned_model())
    assert callback.path == tmp_path / "summary.json"
    assert callback.path.exists()


def test_tracing_failure_only_warns(tmp_path):
    class NoForward(TinyClassifier):
        forward = LightningModule.forward

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/acc", (self.net(x).argmax(dim=1) == y).float().mean())

    callback = RunSummary(print_table=False)
    with pytest.warns(UserWarning, match="RunSummary: FLOPs tracing failed"):
        _trainer(tmp_path, callbacks=[callback]).fit(NoForward())
    summary = json.loads(callback.path.read_text())
    assert summary["dense_flops"] is None and summary["effective_flops"] is None
    assert summary["total_connections"] == 1184
    assert summary["val_acc"] is not None


@pytest.mark.parametrize(
    "filename", ["summary.txt", "summary", "sub/summary.json", "/tmp/summary.json", "", None, 3]
)
def test_invalid_filename(filename):
    with pytest.raises(ValueError, match=r"filename must be a bare file name ending in \.json"):
        RunSummary(filename)


@pytest.mark.parametrize("kwargs", [{"val_acc_key": ""}, {"val_loss_key": 3}])
def test_bad_metric_keys(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a logged metric's name or None"):
        RunSummary(**kwargs)


def test_bad_table_after_test():
    with pytest.raises(ValueError, match="table_after_test must be True or False, got 'yes'"):
        RunSummary(table_after_test="yes")


@pytest.mark.parametrize("held_out", [True, False])
def test_a_test_of_the_fitted_model_is_added(tmp_path, held_out):
    """summary.json had no test results: `scl test` was all there was, and on digits it was the
    validation split."""
    model = _pruned_model()
    callback = RunSummary(print_table=False)
    trainer = _trainer(tmp_path, callbacks=[callback], limit_test_batches=2)
    datamodule = _HeldOut(model) if held_out else None
    trainer.fit(model, datamodule=datamodule)
    fitted = json.loads(callback.path.read_text())
    assert "test_acc" not in fitted

    trainer.test(model, datamodule=datamodule, verbose=False)
    summary = json.loads(callback.path.read_text())
    assert summary == callback.summary
    assert sorted(p.name for p in callback.path.parent.glob("summary*")) == ["summary.json"]
    metrics = trainer.callback_metrics
    assert summary["test_acc"] == pytest.approx(float(metrics["test/acc"]))
    assert summary["test_loss"] == pytest.approx(float(metrics["test/loss"]))
    from scl_lightning.experiment.run_summary import TEST_HELD_OUT, TEST_NOT_DECLARED

    assert summary["test_split"] == (TEST_HELD_OUT if held_out else TEST_NOT_DECLARED)
    assert "never used for tuning" in TEST_HELD_OUT
    assert summary["metrics"]["test/acc"] == summary["test_acc"]
    # everything the fit wrote is kept, with the test's figures next to the validation's
    assert summary["metrics"]["val/acc"] == fitted["val_acc"]
    assert {k: v for k, v in summary.items() if not k.startswith("test") and k != "metrics"} == {
        k: v for k, v in fitted.items() if k != "metrics"
    }
    assert list(summary)[:5] == ["val_acc", "val_loss", "test_acc", "test_loss", "test_split"]
    assert [p.name for p in callback.path.parent.iterdir() if ".tmp" in p.name] == []


def test_another_models_or_a_checkpoints_test_is_not_added(tmp_path):
    model = _pruned_model()
    callback = RunSummary(print_table=False)
    trainer = _trainer(tmp_path, callbacks=[callback], limit_test_batches=2)
    trainer.fit(model)
    fitted = callback.path.read_bytes()
    trainer.test(_pruned_model(), verbose=False)  # not the fitted model
    ckpt = tmp_path / "fitted.ckpt"
    trainer.save_checkpoint(ckpt)
    trainer.test(model, ckpt_path=str(ckpt), verbose=False)  # a checkpoint's weights
    assert callback.path.read_bytes() == fitted
    assert "test_acc" not in callback.summary


def test_table_after_test(tmp_path, capsys):
    model = _pruned_model()
    callback = RunSummary(table_after_test=True)
    trainer = _trainer(tmp_path, callbacks=[callback], limit_test_batches=2)
    trainer.fit(model)
    assert "SCL run summary" not in capsys.readouterr().out
    assert callback.path.is_file()  # written at the end of fit all the same
    trainer.test(model, verbose=False)
    out = capsys.readouterr().out
    assert out.count("SCL run summary") == 1
    assert f"test_acc            {callback.summary['test_acc']:.4f}" in out
    assert "test_split          not declared held out" in out


def test_table_after_a_test_that_runs_no_batch(tmp_path, capsys):
    model = _pruned_model()
    callback = RunSummary(table_after_test=True)
    trainer = _trainer(tmp_path, callbacks=[callback], limit_test_batches=0)
    trainer.fit(model)
    trainer.test(model, verbose=False)
    out = capsys.readouterr().out
    assert out.count("SCL run summary") == 1 and "test_acc" not in out
    trainer.test(model, verbose=False)  # once only
    assert "SCL run summary" not in capsys.readouterr().out


def test_table_at_fit_end_then_one_line_after_the_test(tmp_path, capsys):
    model = _pruned_model()
    callback = RunSummary()
    trainer = _trainer(tmp_path, callbacks=[callback], limit_test_batches=2)
    trainer.fit(model)
    assert "SCL run summary" in capsys.readouterr().out
    trainer.test(model, verbose=False)
    assert capsys.readouterr().out == f"test results added to {callback.path}\n"
