"""What a new user sees on the terminal (issue 15, items 5 and 7): the ``scl`` command's output
piped, its model summary and progress lines, and no lines that say nothing about the run."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities._pytree import _tree_flatten

from _helpers import CSV, FAST, RECIPE
from scl_lightning.callbacks import PlainProgressBar, SparseModelSummary
from scl_lightning.experiment.cli import main
from scl_lightning.experiment.terminal import (
    is_terminal,
    quiet_evaluation_noise,
    quiet_known_noise,
    use_terminal_callbacks,
)

SRC = Path(__file__).resolve().parents[2] / "src"
#: what `make train | cat` may write at most (issue 15: it wrote 361 KB, mostly tqdm redraws)
PIPED_BUDGET = 20_000


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(default_root_dir=tmp_path, logger=False, **kwargs)


def test_lightnings_defaults_are_replaced_on_a_pipe(tmp_path):
    trainer = _trainer(tmp_path)
    use_terminal_callbacks(trainer, [], stdout=_Stream(tty=False))
    assert type(trainer.progress_bar_callback) is PlainProgressBar
    summaries = [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
    assert [type(c) for c in summaries] == [SparseModelSummary]


def test_a_terminal_keeps_the_tqdm_bar(tmp_path):
    trainer = _trainer(tmp_path)
    use_terminal_callbacks(trainer, [], stdout=_Stream(tty=True))
    assert type(trainer.progress_bar_callback) is TQDMProgressBar
    assert any(type(c) is SparseModelSummary for c in trainer.callbacks)


def test_what_the_user_configured_is_kept(tmp_path):
    bar, summary = TQDMProgressBar(), ModelSummary(max_depth=2)
    trainer = _trainer(tmp_path, callbacks=[bar, summary])
    use_terminal_callbacks(trainer, [bar, summary], stdout=_Stream(tty=False))
    assert trainer.progress_bar_callback is bar
    assert summary in trainer.callbacks
    # switched off: nothing is added
    trainer = _trainer(tmp_path, enable_progress_bar=False, enable_model_summary=False)
    use_terminal_callbacks(trainer, [], stdout=_Stream(tty=False))
    assert trainer.progress_bar_callback is None
    assert not any(isinstance(c, ModelSummary) for c in trainer.callbacks)


def test_is_terminal():
    assert is_terminal(_Stream(tty=True)) and not is_terminal(_Stream(tty=False))
    assert not is_terminal(None) and not is_terminal(object())  # type: ignore[arg-type]


def test_the_leafspec_deprecation_inside_lightning_is_silenced_and_nothing_else():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _tree_flatten({"a": torch.zeros(1)})  # Lightning's own code, on torch 2.13
        assert any("LeafSpec" in str(w.message) for w in record), "nothing to silence?"
        record.clear()
        quiet_known_noise()
        _tree_flatten({"a": torch.zeros(1)})
        # the same message from another module is kept
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in record] == [
        "`isinstance(treespec, LeafSpec)` is deprecated",
        "another deprecation",
    ]


def test_lightnings_product_tips_are_silenced_and_nothing_else(caplog):
    caplog.set_level(logging.INFO)
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    rank_zero_info("💡 Tip: For seamless cloud logging ... try installing [litlogger](...)")
    rank_zero_info("💡 Tip: For seamless cloud uploads ... [litmodels](...) ...")
    rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    filters = logging.getLogger("lightning.pytorch.utilities.rank_zero").filters
    assert len([f for f in filters if type(f).__name__ == "_ProductTips"]) == 1


def test_the_evaluation_dirpath_warning_is_silenced_and_nothing_else():
    from lightning.pytorch.callbacks import ModelCheckpoint

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_evaluation_noise()
        checkpoint = ModelCheckpoint(dirpath="new")
        state = {**checkpoint.state_dict(), "dirpath": "old"}
        checkpoint.load_state_dict(state)
        # the same message from another module is kept
        warnings.warn("The dirpath has changed from a to b", UserWarning, stacklevel=1)
    assert [str(w.message) for w in record] == ["The dirpath has changed from a to b"]


# -- the `scl` command --------------------------------------------------------------------------


def test_scl_fit_piped_writes_one_line_per_epoch_and_no_noise(tmp_path):
    """``scl fit`` with its output piped (``make train | cat``), W&B offline as for a new user
    with no account: one progress line per epoch with the task loss next to the total, the model
    summary in the README's numbers, and none of the lines issue 15 lists as noise; then
    ``scl validate`` says where it logs. Measured on the full 40-epoch recipe: 361 KB before,
    9.0 KB after (test after fit included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PL_"))}
    env.update(
        HOME=str(tmp_path),  # no W&B login: offline, as for a new user
        PYTHONPATH=os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p),
    )

    def scl(subcommand: str, *args: str) -> bytes:
        command = ["-m", "scl_lightning.experiment.cli", subcommand, "--config", RECIPE, *args]
        proc = subprocess.run(
            [sys.executable, *command],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,  # a pipe, as in `make train | cat`
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout.decode()[-3000:]
        return proc.stdout

    few = ["--trainer.max_epochs=3", "--trainer.limit_train_batches=4"]
    few += ["--trainer.log_every_n_steps=2"]  # a logging step in every epoch
    piped = scl("fit", *few, "--trainer.limit_val_batches=2")
    out = piped.decode()
    evaluation = scl("validate", "--ckpt_path=last", "--trainer.limit_val_batches=2").decode()
    assert len(piped) < PIPED_BUDGET, len(piped)
    assert "\r" not in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" | ")[:2] for line in epoch_lines] == [
        ["Epoch 0/2", "step 4"],
        ["Epoch 1/2", "step 8"],
        ["Epoch 2/2", "step 12"],
    ]
    for line in epoch_lines:  # the task loss next to the total
        assert re.search(r"train/loss=[0-9.e-]+, train/task_loss=[0-9.e-]+, val/acc=", line)
    for noise in ("Tip:", "litlogger", "anonymous", "LeafSpec", "dirpath has changed"):
        assert noise not in out + evaluation, noise
    assert "wandb: Run data is saved locally" in out  # W&B's useful lines are still there
    assert "50,610    Total params" in out
    assert "50,200    Mask variables" in out
    assert "50,200    FLOPs per sample (1 multiply-add = 1 FLOP)" in out
    assert "Total Flops" not in out and "train_acc" not in out  # Lightning's summary
    assert (
        "scl: validate logs to runs/digits_mlp/version_1 (a new run directory) and to a new W&B "
        "run; the run that trained the checkpoint is left as it was"
    ) in evaluation
    assert "Validation: 2 batches, " in evaluation


def test_scl_fit_keeps_a_progress_bar_the_config_asks_for(workdir, capsys):
    """In-process, ``sys.stdout`` is pytest's capture (not a terminal): plain lines by
    default, and the tqdm bar when the configuration asks for it."""
    args = ["fit", "--config", RECIPE, "--config", CSV, *FAST]
    args.remove("--trainer.enable_progress_bar=false")
    main(args)
    out = capsys.readouterr().out
    assert "\r" not in out
    assert [line[:9] for line in out.splitlines() if line.startswith("Epoch")] == ["Epoch 0/0"]
    main([*args, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"])
    assert "\r" in capsys.readouterr().out
    main([*args, "--trainer.enable_progress_bar=false"])
    assert "Epoch" not in capsys.readouterr().out


@pytest.mark.parametrize("depth", [1, 2])
def test_scl_fit_summary_depth_follows_a_configured_summary(workdir, caplog, depth):
    """A model summary in the configuration is the user's: Lightning's, kept as configured."""
    caplog.set_level(logging.INFO)
    summary = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelSummary"]
    summary += [f"--trainer.callbacks.max_depth={depth}"]
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, *summary])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "100 K     Total params" in text  # Lightning's own counts: the user asked for it
    assert ("model.layers" in text) is (depth == 2)
