"""PlainProgressBar: one line per epoch, nothing per batch, no carriage returns (issue 15,
item 7)."""

import re

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import TQDMProgressBar

from _helpers import TinyClassifier, quiet_trainer
from scl_lightning.callbacks import PlainProgressBar


class Validated(TinyClassifier):
    """TinyClassifier with the training loss, a learning rate (logged after it) and a
    validation loss in the progress bar."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.lr, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", super().training_step(batch, batch_idx), prog_bar=True)

    def val_dataloader(self):
        return self._loader()

    def test_step(self, batch, batch_idx):
        self.log("test/loss", super().training_step(batch, batch_idx))

    def test_dataloader(self):
        return self._loader()


def _trainer(tmp_path, bar, **overrides):
    settings = {
        "max_epochs": 3,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "enable_progress_bar": True,
        "callbacks": [bar],
    }
    return quiet_trainer(tmp_path, **{**settings, **overrides})


def test_one_line_per_epoch_with_the_progress_bar_metrics_sorted(tmp_path, capsys):
    trainer = _trainer(tmp_path, PlainProgressBar())
    trainer.fit(Validated())
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 3, out  # no line for the sanity check or the validation batches
    for epoch, line in enumerate(lines):
        assert re.fullmatch(
            rf"Epoch {epoch}/2 \| step {4 * (epoch + 1)} \| [0-9.]+ s \([0-9.]+ s total\) \| "
            r"lr=0.1, train/loss=[0-9.e-]+, val/loss=[0-9.e-]+",  # sorted by name
            line,
        ), line
    assert trainer.progress_bar_callback is not None
    assert type(trainer.progress_bar_callback) is PlainProgressBar


def test_same_metrics_as_lightnings_bar(tmp_path, capsys):
    """The values of the last line are those the tqdm bar ends the run with (v_num aside)."""
    tqdm = TQDMProgressBar()
    seed_everything(0)
    _trainer(tmp_path, tqdm, logger=True).fit(Validated())
    bar_metrics = tqdm.get_metrics(tqdm.trainer, tqdm.trainer.lightning_module)
    capsys.readouterr()
    plain = PlainProgressBar()
    seed_everything(0)
    _trainer(tmp_path, plain, logger=True).fit(Validated())
    last = capsys.readouterr().out.splitlines()[-1]
    shown = dict(item.split("=") for item in last.split(" | ")[-1].split(", "))
    assert set(shown) == set(bar_metrics) - {"v_num"}
    for key, value in shown.items():
        assert float(value) == pytest.approx(bar_metrics[key], rel=1e-3)


def test_long_epochs_get_a_line_at_most_every_n_seconds(tmp_path, capsys, monkeypatch):
    clock = iter(range(0, 10_000, 7))  # 7 s pass between two readings of the clock
    monkeypatch.setattr(
        "scl_lightning.callbacks.plain_progress_bar.time.monotonic", lambda: next(clock)
    )
    _trainer(tmp_path, PlainProgressBar(every_n_seconds=10), max_epochs=1).fit(Validated())
    lines = capsys.readouterr().out.splitlines()
    # epoch start at 0 s; batches end at 7, 14, 21, 28 s: lines at 14 and 28, then the epoch's
    assert [line.split(" | ")[2] for line in lines[:-1]] == ["batch 2/4", "batch 4/4"]
    assert lines[-1].startswith("Epoch 0/0 | step 4 | ")


def test_validate_and_test_write_one_line_each(tmp_path, capsys):
    trainer = _trainer(tmp_path, PlainProgressBar())
    module = Validated()
    trainer.validate(module, verbose=False)
    trainer.test(module, verbose=False)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Validation", "Testing"]
    assert lines[0].startswith("Validation: 2 batches, ")
    assert lines[1].startswith("Testing: 8 batches, ")  # limit_test_batches is not set


def test_disabled_writes_nothing(tmp_path, capsys):
    bar = PlainProgressBar()
    bar.disable()
    _trainer(tmp_path, bar).fit(Validated())
    assert capsys.readouterr().out == ""
    assert not bar.is_enabled


@pytest.mark.parametrize("bad", [-1, float("nan"), "60", None, True])
def test_every_n_seconds_is_checked(bad):
    with pytest.raises(ValueError, match=r"every_n_seconds must be a finite number >= 0"):
        PlainProgressBar(every_n_seconds=bad)


def test_mid_epoch_lines_with_max_steps_count_the_epochs_batches(tmp_path, capsys, monkeypatch):
    """With max_epochs=-1 and max_steps, Lightning's batch total shrinks to the steps left as
    the run goes: the line keeps the epoch's own total (it read "batch 3/0")."""
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(
        "scl_lightning.callbacks.plain_progress_bar.time.monotonic", lambda: next(clock)
    )
    bar = PlainProgressBar(every_n_seconds=10)
    _trainer(tmp_path, bar, max_epochs=-1, max_steps=6).fit(Validated())
    batches = [line.split(" | ")[2] for line in capsys.readouterr().out.splitlines()]
    batches = [b for b in batches if b.startswith("batch ")]
    # epoch 0: 4 batches; epoch 1 ends after the 2 steps left
    assert batches == ["batch 2/4", "batch 4/4", "batch 2/2"], batches
