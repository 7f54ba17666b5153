"""The `scl` command, run in-process on the real recipes with a few batches."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from _helpers import CONFIGS, CSV, FAST, RECIPE
from scl_lightning.experiment.cli import main

DENSE = str(CONFIGS / "digits_mlp_dense.yaml")
REQUIRED = {
    "val_acc",
    "sparsity",
    "active_connections",
    "total_connections",
    "dense_flops",
    "effective_flops",
    "seed",
}
CONNECTIONS = 64 * 300 + 300 * 100 + 100 * 10
#: summary.json's `test_split` for a held-out split (RunSummary's TEST_HELD_OUT)
HELD_OUT = "held out: read by neither training nor validation, never used for tuning"


def _summary(workdir: Path) -> tuple[Path, dict]:
    (path,) = (workdir / "runs").rglob("summary.json")
    return path, json.loads(path.read_text())


def test_fit_recipe(workdir):
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, "--model.lam=4e-5"])
    path, summary = _summary(workdir)
    assert REQUIRED <= set(summary)
    assert summary["seed"] == 0
    assert summary["total_connections"] == CONNECTIONS
    assert summary["dense_flops"] == CONNECTIONS  # all of LeNet's FLOPs are in its Linears
    assert 0.0 <= summary["sparsity"] < 1.0
    assert summary["effective_flops"] <= summary["dense_flops"]
    assert 0.0 <= summary["val_acc"] <= 1.0
    assert summary["global_step"] == 3
    config = yaml.safe_load((path.parent / "config.yaml").read_text())
    assert config["model"]["lam"] == 4e-5
    assert config["data"]["class_path"] == "scl_lightning.data.DigitsDataModule"
    hparams = yaml.unsafe_load((path.parent / "hparams.yaml").read_text())
    assert hparams["lam"] == 4e-5
    assert hparams["num_classes"] == 10  # linked from the data module
    assert tuple(hparams["input_shape"]) == (1, 8, 8)
    assert (path.parent / "metrics.csv").exists()
    assert (path.parent / "checkpoints" / "last.ckpt").exists()
    assert not (workdir / "runs" / "wandb").exists()  # the CSV preset replaced W&B


def test_fit_dense_recipe(workdir):
    main(["fit", "--config", DENSE, "--config", CSV, *FAST])
    _, summary = _summary(workdir)
    assert REQUIRED <= set(summary)
    assert summary["sparsity"] == 0.0
    assert summary["active_connections"] == summary["total_connections"] == CONNECTIONS
    assert summary["effective_flops"] == summary["dense_flops"]


def test_fit_with_default_wandb_logger_runs_offline(workdir, monkeypatch):
    """No account, no network: the recipe's W&B logger runs offline by itself."""
    import wandb

    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(workdir))  # no ~/.netrc login either
    try:
        main(["fit", "--config", RECIPE, *FAST])
    finally:
        wandb.finish()
        wandb.teardown()  # stop the wandb service process this test started
    assert list((workdir / "runs" / "wandb").glob("offline-run-*"))
    _, summary = _summary(workdir)
    assert REQUIRED <= set(summary)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.lam=-1"], "scl: error: lam must be a finite number >= 0, got -1.0"),
        (["--model.backbone=nope"], "scl: error: unknown model 'nope'; available: "),
        (["--model.mask_lr=0"], "scl: error: mask_lr must be a finite number > 0, got 0.0"),
        (
            ["--model.granularity=filter"],
            "scl: error: granularity must be one of 'weight', 'channel', got 'filter'",
        ),
        (["--test_after_fit=maybe"], "scl: error: --test_after_fit: "),
    ],
)
def test_bad_value_is_one_line(workdir, capsys, args, message):
    keep = workdir / "runs" / "old" / "summary.json"
    keep.parent.mkdir(parents=True)
    keep.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", RECIPE, "--config", CSV, *FAST, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("scl: error:")]
    assert len(errors) == 1
    assert errors[0].startswith(message)
    assert "Traceback" not in err
    assert keep.read_text() == "{}"  # existing outputs untouched
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["old"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--data.init_args.test_fraction=1.5"],
            "test_fraction must be a number in [0, 1), got 1.5",
        ),
        (
            ["--data.init_args.val_fraction=0.5", "--data.init_args.test_fraction=0.5"],
            "val_fraction=0.5 and test_fraction=0.5 leave no training samples out of 1797",
        ),
    ],
)
def test_bad_test_fraction_is_one_line(workdir, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", RECIPE, "--config", CSV, *FAST, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("scl: error:")]
    # the data module's own message, not jsonargparse's wrapper around it
    assert line == f"scl: error: DigitsDataModule: {message}" or line.startswith(
        f"scl: error: DigitsDataModule: {message}"
    )
    assert "Union" not in line and "Namespace(" not in line
    assert "Traceback" not in err
    assert not (workdir / "runs").exists()


def test_debug_variable_shows_the_exception(workdir, monkeypatch):
    monkeypatch.setenv("SCL_DEBUG", "1")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        main(["fit", "--config", RECIPE, "--config", CSV, "--model.lam=-1"])


@pytest.mark.parametrize("args", [["--model.lam=x"], ["--config", "missing.yaml"]])
def test_parser_errors_exit_2(workdir, capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", RECIPE, *args])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err.lower()


def test_print_config(workdir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", RECIPE, "--config", CSV, "--model.lam=3e-5", "--print_config"])
    assert exc.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["seed_everything"] == 0
    assert config["model"]["backbone"] == "lenet_300_100"
    assert config["model"]["lam"] == 3e-5
    assert config["model"]["mask_lr"] == 0.01
    assert config["data"]["class_path"] == "scl_lightning.data.DigitsDataModule"
    assert config["test_after_fit"] is True
    loggers = config["trainer"]["logger"]
    assert [lg["class_path"] for lg in loggers] == ["scl_lightning.experiment.loggers.CSVLogger"]
    assert not (workdir / "runs").exists()


def _metric_columns(run: Path) -> list[str]:
    return (run / "metrics.csv").read_text().splitlines()[0].split(",")


def test_fit_tests_the_final_model_on_the_held_out_split(workdir, capsys):
    """`scl fit` reported validation figures only, and on digits `scl test` was the validation
    split again. Now the final model is tested once, after training, on the held-out split, and
    the results join the run: summary.json, its table, metrics.csv."""
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST])
    path, summary = _summary(workdir)
    run = path.parent
    out = capsys.readouterr().out
    assert out.count("SCL run summary") == 1  # one table, printed after the test
    assert f"test_acc            {summary['test_acc']:.4f}" in out
    assert REQUIRED <= set(summary)
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_loss"] > 0
    assert summary["test_split"] == HELD_OUT
    assert summary["metrics"]["test/acc"] == summary["test_acc"]
    assert {"test/acc", "test/loss"} <= set(_metric_columns(run))
    assert yaml.safe_load((run / "config.yaml").read_text())["test_after_fit"] is True
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # no second run directory

    # it was the final model: `scl test` of the last checkpoint, with the run's own saved
    # config.yaml (which holds test_after_fit), gives the same figures
    ckpt = run / "checkpoints" / "last.ckpt"
    main(["test", "--config", str(run / "config.yaml"), f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert str(summary["test_acc"]) in out and str(summary["test_loss"]) in out
    assert json.loads(path.read_text()) == summary  # the training run is left as it was


def test_test_after_fit_false_leaves_the_test_out(workdir, capsys):
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, "--test_after_fit", "false"])
    path, summary = _summary(workdir)
    assert REQUIRED <= set(summary)
    assert not [key for key in summary if key.startswith("test")]
    assert not [key for key in summary["metrics"] if key.startswith("test")]
    assert not [c for c in _metric_columns(path.parent) if c.startswith("test")]
    assert capsys.readouterr().out.count("SCL run summary") == 1  # at the end of fit
    assert yaml.safe_load((path.parent / "config.yaml").read_text())["test_after_fit"] is False


def test_no_test_split_no_test_after_fit_and_scl_test_says_so(workdir, capsys):
    no_test = "--data.init_args.test_fraction=0"
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, no_test])
    path, summary = _summary(workdir)
    assert "test_acc" not in summary
    ckpt = path.parent / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", RECIPE, "--config", CSV, no_test, f"--ckpt_path={ckpt}"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        "scl: error: DigitsDataModule(test_fraction=0) has no test split: give test_fraction > 0 "
        "(e.g. --data.init_args.test_fraction 0.2), or evaluate on validation with "
        "`scl validate`"
    ]


def test_validate_and_test_from_the_fit_checkpoint(workdir, capsys):
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST])
    path, summary = _summary(workdir)
    (ckpt,) = path.parent.glob("checkpoints/last.ckpt")
    capsys.readouterr()
    for sub in ("validate", "test"):
        main(
            [
                sub,
                "--config",
                RECIPE,
                "--config",
                CSV,
                "--trainer.limit_val_batches=2",
                "--trainer.limit_test_batches=2",
                f"--ckpt_path={ckpt}",
            ]
        )
    out = capsys.readouterr().out
    assert "val/acc" in out and "test/acc" in out
    # the checkpoint's masks were loaded: validate reproduces the fit's last validation
    # accuracy (limit_val_batches=2 in both) to the printed digit
    assert str(summary["val_acc"]) in out


def _epochs_logged(run: Path) -> list[int]:
    """The epochs of the training and validation rows (not the test's, after the fit)."""
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()]
    header = rows[0]
    column = header.index("epoch")
    fit = [i for i, name in enumerate(header) if name.startswith(("train", "val", "sparsity"))]
    return sorted({int(r[column]) for r in rows[1:] if r[column] and any(r[i] for i in fit)})


def test_ckpt_path_last_resumes_the_latest_run_in_its_directory(workdir):
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST])
    run = workdir / "runs" / "lightning_logs" / "version_0"
    config = (run / "config.yaml").read_bytes()
    more = [a for a in FAST if "max_epochs" not in a] + ["--trainer.max_epochs=2"]
    main(["fit", "--config", RECIPE, "--config", CSV, *more, "--ckpt_path", "last"])
    assert [p.name for p in (workdir / "runs" / "lightning_logs").iterdir()] == ["version_0"]
    assert _epochs_logged(run) == [0, 1]  # the first run's rows are kept, the new ones appended
    assert (run / "config.yaml").read_bytes() == config
    assert (run / "config.resume-1.yaml").is_file()
    summary = json.loads((run / "summary-1.json").read_text())
    assert summary["global_step"] == 6 and summary["epochs"] == 2
    # each fit tested its own final model, and the test changed nothing the resume reads
    first = json.loads((run / "summary.json").read_text())
    assert first["test_split"] == summary["test_split"] == HELD_OUT
    assert first["global_step"] == 3


def test_resuming_without_the_test_after_fit_is_silent(workdir, recwarn):
    """--test_after_fit changes nothing the training does: no "settings other than the run's"
    warning, and the resumed run's summary has no test."""
    fit = ["fit", "--config", RECIPE, "--config", CSV, *FAST]
    main(fit)
    main([*fit, "--test_after_fit=false", "--ckpt_path", "last"])
    assert not [w for w in recwarn if "other than the run's" in str(w.message)]
    run = workdir / "runs" / "lightning_logs" / "version_0"
    assert "test_acc" in json.loads((run / "summary.json").read_text())
    assert "test_acc" not in json.loads((run / "summary-1.json").read_text())


def test_ckpt_path_last_with_no_run_yet_starts_one(workdir, capsys):
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, "--ckpt_path", "last"])
    assert (workdir / "runs" / "lightning_logs" / "version_0" / "summary.json").is_file()


def test_ckpt_path_last_with_a_fixed_version_resumes_it(workdir):
    fixed = ["--trainer.logger.init_args.version=7"]
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, *fixed])
    more = [a for a in FAST if "max_epochs" not in a] + ["--trainer.max_epochs=2"]
    main(["fit", "--config", RECIPE, "--config", CSV, *more, *fixed, "--ckpt_path", "last"])
    run = workdir / "runs" / "lightning_logs" / "version_7"
    assert _epochs_logged(run) == [0, 1]


# jsonargparse's texts, as Lightning 2.6 / jsonargparse raise them (shortened Namespaces)
_LOGGER_LIST_FAILS = """Does not validate against any of the Union subtypes
Subtypes: [<class 'lightning.pytorch.loggers.logger.Logger'>, <class 'bool'>, <class 'NoneType'>]
Errors:
  - Not a valid subclass of Logger. Got value: [Namespace(class_path='x.CSVLogger'), ...]
    Subclass types expect one of:
    - a class path (str)
    - a dict with class_path entry
  - [Errno 2] No such file or directory: '/proc/x'
  - Expected a <class 'bool'>
  - Expected a <class 'NoneType'>
Given value type: <class 'list'>
Given value: [<x.CSVLogger object at 0x7f>, Namespace(class_path='x.WandbLogger')]"""
_DATA_MODULE_REFUSES = """Does not validate against any of the Union subtypes
Subtypes: [<class 'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
Errors:
  - batch_size must be a positive integer, got 0
  - Expected a <class 'NoneType'>
Given value type: <class 'jsonargparse._namespace.Namespace'>
Given value: Namespace(class_path='scl_lightning.data.DigitsDataModule', init_args=...)"""


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (_DATA_MODULE_REFUSES, "DigitsDataModule: batch_size must be a positive integer, got 0"),
        # a list of loggers where the second fails: its reason, no class named (the first
        # class_path of the text is the logger that worked), no "Subclass types" bullet
        (_LOGGER_LIST_FAILS, "[Errno 2] No such file or directory: '/proc/x'"),
    ],
)
def test_a_classs_own_error_is_unwrapped_from_jsonargparse(text, line):
    from scl_lightning.experiment.cli import _one_line

    assert _one_line(ValueError(text)) == line


def test_ddp_spawn_skips_the_test_after_fit_and_says_so(workdir, caplog):
    """A strategy that starts its own processes would test in new ones, apart from the fit's
    summary and run directory (it failed on the existing config.yaml): no test, one line."""
    caplog.set_level(logging.INFO)
    spawn = ["--trainer.strategy=ddp_spawn", "--trainer.devices=1", "--trainer.accelerator=cpu"]
    main(["fit", "--config", RECIPE, "--config", CSV, *FAST, *spawn])
    assert any(
        "scl: no test after fit with a strategy that starts its own processes" in r.getMessage()
        for r in caplog.records
    )
    _, summary = _summary(workdir)
    assert "test_acc" not in summary


def test_output_directories_checked_before_a_run(tmp_path):
    """What the writability check reads: every logger's save_dir, a fixed checkpoint dirpath,
    default_root_dir when nothing else is given; an evaluation without loggers writes nothing;
    remote storage is not checked."""
    from scl_lightning.experiment.cli import _output_directories

    csv = {"class_path": "scl_lightning.experiment.loggers.CSVLogger"}
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
    assert _output_directories(
        {"logger": [{**csv, "init_args": {"save_dir": str(tmp_path / "a")}}], "callbacks": []}
    ) == [tmp_path / "a"]
    fixed = {**ckpt, "init_args": {"dirpath": str(tmp_path / "c")}}
    assert _output_directories({"logger": False, "callbacks": [fixed]}) == [tmp_path / "c"]
    assert _output_directories({"logger": False, "callbacks": []}) == [Path.cwd()]
    assert _output_directories({"logger": False, "callbacks": []}, writes_checkpoints=False) == []
    remote = {**csv, "init_args": {"save_dir": "s3://bucket/runs"}}
    assert _output_directories({"logger": [remote], "callbacks": []}) == []
