"""Which checkpoint `scl validate` / `scl test` / `scl predict` evaluate: never a freshly
initialized model. Without `--ckpt_path`, or with `--ckpt_path last` and no last checkpoint where
the recipe's runs write theirs, they stop with one line and write nothing."""

import hashlib
import json
from pathlib import Path

import pytest

from _helpers import CSV, FAST, RECIPE
from scl_lightning.experiment.cli import main

EVAL = [
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.limit_predict_batches=2",
    "--trainer.enable_progress_bar=false",
]
SUBCOMMANDS = ["validate", "test", "predict"]


def _hashes(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: a new empty directory counts as a change."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def _fails(capsys, args: list[str]) -> str:
    """Run ``scl ARGS``: exit status 2, and stderr ends in exactly one ``scl: error:`` line with
    no traceback. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("scl: error:")]
    assert len(lines) == 1, err[-3000:]
    assert err.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


@pytest.fixture
def old_run(workdir) -> Path:
    """A run directory without a checkpoint (a fit that failed after it started)."""
    run = workdir / "runs" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "hparams.yaml").write_text("lam: 1.0e-05\n")
    return run


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_evaluating_without_ckpt_path_is_refused(old_run, workdir, capsys, sub):
    before = _hashes(workdir)
    line = _fails(capsys, [sub, "--config", RECIPE, "--config", CSV, *EVAL])
    assert line == (
        f"scl: error: scl {sub} needs a trained model: pass --ckpt_path PATH (a checkpoint file) "
        "or --ckpt_path last (the latest checkpoint of this recipe's runs)"
    )
    assert _hashes(workdir) == before  # no new run directory, no logs


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_ckpt_path_last_without_a_checkpoint_is_refused(old_run, workdir, capsys, sub):
    before = _hashes(workdir)
    line = _fails(capsys, [sub, "--config", RECIPE, "--config", CSV, *EVAL, "--ckpt_path=last"])
    searched = Path("runs") / "lightning_logs" / "version_*" / "checkpoints"
    assert line == (
        f"scl: error: scl {sub} --ckpt_path last: no checkpoint (last*.ckpt) under {searched}; "
        f"train first with `scl fit --config {RECIPE} --config {CSV}`, or pass --ckpt_path PATH "
        "(a checkpoint file)"
    )
    assert _hashes(workdir) == before


def test_ckpt_path_last_without_any_runs_directory(workdir, capsys):
    _fails(capsys, ["validate", "--config", RECIPE, "--config", CSV, "--ckpt_path=last"])
    assert list(workdir.iterdir()) == []  # not even an empty runs/


def test_ckpt_path_last_with_a_fixed_checkpoint_directory(old_run, workdir, capsys):
    (workdir / "ckpts").mkdir()
    (workdir / "ckpts" / "epoch=0-step=3.ckpt").write_bytes(b"not last")
    (workdir / "fixed.yaml").write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: ckpts, save_last: true}\n"
    )
    before = _hashes(workdir)
    args = ["validate", "--config", RECIPE, "--config", CSV, "--config", "fixed.yaml"]
    line = _fails(capsys, [*args, "--ckpt_path=last"])
    assert "no checkpoint (last*.ckpt) under ckpts; train first with `scl fit" in line
    assert _hashes(workdir) == before


def test_ckpt_path_last_with_a_fixed_logger_version(old_run, workdir, capsys):
    before = _hashes(workdir)
    args = ["test", "--config", RECIPE, "--config", CSV, "--trainer.logger.init_args.version=0"]
    line = _fails(capsys, [*args, "--ckpt_path=last"])
    searched = Path("runs") / "lightning_logs" / "version_0" / "checkpoints"
    assert f"no checkpoint (last*.ckpt) under {searched}; train first" in line
    assert _hashes(workdir) == before


def test_ckpt_path_last_with_a_damaged_checkpoint(old_run, workdir, capsys):
    (old_run / "checkpoints").mkdir()
    (old_run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    before = _hashes(workdir)
    line = _fails(capsys, ["validate", "--config", RECIPE, "--config", CSV, "--ckpt_path=last"])
    assert "last.ckpt is not a readable PyTorch checkpoint" in line
    assert _hashes(workdir) == before


def _fit(*args: str) -> tuple[Path, dict]:
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, *args])
    runs = sorted((Path("runs") / "lightning_logs").glob("version_*/summary.json"))
    return runs[-1].parent, json.loads(runs[-1].read_text())


def test_validate_ckpt_path_last_evaluates_the_newest_run(workdir, capsys, caplog):
    """Two runs: `last` is the newer one's checkpoint, for `validate` and `test` alike, and the
    evaluation logs into a directory of its own, leaving the training runs as they were."""
    _fit("--seed_everything=1")
    newest, summary = _fit("--seed_everything=2", "--model.lam=0")
    assert newest.name == "version_1"
    trained = _hashes(workdir / "runs")
    capsys.readouterr()
    for version, sub in enumerate(("validate", "test", "validate"), start=2):
        caplog.clear()
        main([sub, "--config", RECIPE, "--config", CSV, *EVAL, "--ckpt_path=last"])  # exit 0
        used = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scl:")]
        # which checkpoint, and where the evaluation is logged (issue 15, item 7)
        assert used == [
            f"scl: {sub} with {newest / 'checkpoints' / 'last.ckpt'}",
            f"scl: {sub} logs to runs/lightning_logs/version_{version} (a new run directory); "
            "the run that trained the checkpoint is left as it was",
        ]
    out = capsys.readouterr().out
    assert "val/acc" in out and "test/acc" in out
    # the checkpoint's weights and masks were loaded: validate reproduces the fit's last
    # validation accuracy (limit_val_batches=2 in both) to the printed digit
    assert str(summary["val_acc"]) in out
    after = _hashes(workdir / "runs")
    assert {k: after.get(k) for k in trained} == trained
    evaluations = sorted(p.name for p in (workdir / "runs" / "lightning_logs").iterdir())
    assert evaluations == [f"version_{n}" for n in range(5)]  # 2 fits, then one per evaluation
