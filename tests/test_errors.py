"""Bad input through the ``scl`` command: one ``scl: error:`` line, a non-zero exit, nothing lost.

Every case of ``docs/errors.md`` runs here end to end, in-process, on the digits recipe with a
CSV logger and a few batches, on tiny CIFAR archives and ImageNet folders made here (nothing is
downloaded). ``MESSAGES`` holds each case's key phrases: the test checks that the error line holds
them, and :func:`test_every_message_is_documented` that ``docs/errors.md`` lists them.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from _helpers import quiet_trainer
from scl_lightning import SCLModule
from scl_lightning.data import CIFAR10DataModule, DigitsDataModule
from scl_lightning.experiment.checkpoint import CheckpointError
from scl_lightning.experiment.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOC = ROOT / "docs" / "errors.md"
RECIPE = str(CONFIGS / "digits_mlp.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]
BASE = ["--config", RECIPE, "--config", CSV, *FAST]
CIFAR = ["--data=scl_lightning.data.CIFAR10DataModule", "--data.data_dir=data"]
IMAGENET = [
    "--data=scl_lightning.data.ImageNetDataModule",
    "--data.data_dir=imagenet",
    "--data.image_size=32",
    "--data.val_resize=36",
    "--data.batch_size=4",
    "--data.num_workers=0",
]

#: case -> key phrases of its error line (also required in docs/errors.md)
MESSAGES: dict[str, list[str]] = {
    "unknown_model": ["unknown model 'nope'; available: lenet5, lenet_300_100"],
    "unknown_dataset": ["--data: cannot import 'scl_lightning.data.NopeDataModule'"],
    "unknown_dataset_short": [
        "--data: 'NopeDataModule' is not an importable class (give its full import path"
    ],
    "negative_lambda": ["lam must be a finite number >= 0, got -1.0"],
    "nan_lambda": ["lam must be a finite number >= 0, got nan"],
    "non_numeric_lambda": ["--model.lam: expected a float or null, got 'abc'"],
    "unknown_ste": ["unknown STE 'nope'; choose one of: hardtanh, identity, leaky_relu, softplus"],
    "bad_ste_kwargs": ["leaky_relu STE: alpha must be in (0, 1], got -1.0"],
    "negative_mask_lr": ["mask_lr must be a finite number > 0, got -1.0"],
    "nan_mask_lr": ["mask_lr must be a finite number > 0, got nan"],
    "negative_lr": ["model.optimizer: Invalid learning rate: -1.0"],
    "typo_flag": ["unrecognized arguments: --model.lamda=1"],
    "typo_in_config": ["Subcommand 'fit' does not accept option 'model.lamda'"],
    "missing_config": ["--config", "missing.yaml", "does not exist"],
    "nothing_to_mask": [
        "sparsify: LeNet300100 has no Linear or convolution layer to mask after "
        "excluding ['layers']; SCL needs at least one (check the model or the exclude patterns, "
        "or register a layer type with scl_lightning.nn.register_maskable)"
    ],
    "cifar_missing_data_dir": [
        "does not exist and download=False: create it and put cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "or set download=True",
    ],
    "data_dir_is_a_file": ["is not a directory"],
    "imagenet_missing_data_dir": [
        "does not exist; expected data_dir/train/<class>/<image> and data_dir/val/<class>/<image>"
    ],
    "cifar_checksum": [
        "has MD5",
        "but c58f30108f718f92721af3b95e74349a was expected: the file is corrupt, truncated or not "
        "the official one; it was moved aside to cifar-10-python.tar.gz.",
        "run again to download a fresh copy",
    ],
    "cifar_truncated": [
        "cifar-10-python.tar.gz: it is truncated or corrupt",
        "delete it and download it again",
    ],
    "cifar_escape": [
        "refusing to extract",
        "member '../evil' has a '..' component; the archive is corrupt or malicious, so nothing "
        "was extracted: delete it and download the official file again",
    ],
    "imagenet_no_class_folders": ["no class folders in"],
    "imagenet_empty_class": [
        "holds no image files (.jpeg, .jpg, .png, .bmp, .webp, any case); add its images or "
        "remove the folder from every split"
    ],
    "imagenet_bad_image": [
        "cannot decode image file",
        "broken.JPEG",
        "remove or replace it, or pass bad_images='skip' to skip unreadable files",
    ],
    "ckpt_missing": [
        "does not exist; check the path (--ckpt_path) or use --ckpt_path last to resume the "
        "latest run"
    ],
    "ckpt_truncated": ["is not a readable PyTorch checkpoint", "it may be truncated"],
    "yaml_invalid": ["is not valid YAML (line 3, column 1)", "drop that --config"],
    "yaml_empty": ["is empty: put settings in it"],
    "yaml_list": ["holds a list, not a mapping of settings"],
    "zero_epochs": ["--trainer.max_epochs 0 would train nothing"],
    "negative_epochs": ["--trainer.max_epochs must be a positive number of epochs", "got -2"],
    "ckpt_directory": ["is a directory, not a checkpoint file", "pass a .ckpt file"],
    "ckpt_export": ["is a pruned-weights export (safetensors), not a training checkpoint"],
    "ckpt_other_architecture": [
        "is from another architecture:",
        "load it into the model it was trained with (same backbone, num_classes, input_shape, "
        "exclude and granularity)",
    ],
    "ckpt_other_backbone": [
        "was trained with backbone 'lenet_300_100' and this run builds 'small_cnn'; pass "
        "--model.backbone lenet_300_100 (or the checkpoint of a small_cnn run)"
    ],
    "ckpt_mask_shapes": [
        "does not fit this model: mask model.layers.1.mask has shape (300, 3072) in the "
        "checkpoint and (300, 1728) in the model",
    ],
    "ckpt_granularity": [
        "does not fit this model: its masks have granularity",
        "; build the model with granularity=",
        "(--model.granularity ",
    ],
    "evaluate_without_ckpt": [
        "scl validate needs a trained model: pass --ckpt_path PATH (a checkpoint file) or "
        "--ckpt_path last (the latest checkpoint of this recipe's runs)"
    ],
    "evaluate_last_missing": [
        "--ckpt_path last: no checkpoint (last*.ckpt) under",
        "; train first with `scl fit --config",
        "`, or pass --ckpt_path PATH (a checkpoint file)",
    ],
    "output_dir_taken": [
        "already holds a run",
        "and would be overwritten; resume it with --ckpt_path last, or write to a new directory",
    ],
    "nan_lr": [
        "non-finite weights (nan)",
        "at global step 1 (epoch 0, batch 1)",
        "checkpoints holding non-finite values are refused",
    ],
    "wandb_offline": ["W&B: cannot start an online run (", "); continuing offline under"],
    "gpu_without_gpu": [
        "--trainer.accelerator (set in ",
        "gpu.yaml) asks for a GPU ('gpu'), but this machine has none that torch can use",
        "; drop the GPU preset, or pass --trainer.accelerator cpu (or auto) to train on the CPU",
    ],
    "read_only_output": [
        "cannot write the run's files under ",
        "is read-only for this user; run scl from a writable directory, or point the loggers' "
        "save_dir (and --trainer.default_root_dir) at one",
    ],
    "file_as_output": ["is a file, not a directory; choose another directory"],
    "resumed_with_other_settings": [
        "setting(s) other than the run's (",
        "model.lam 2e-05 -> 4e-05, trainer.max_epochs ",
        "; the new values are used from here on",
        "To continue the run as it was, drop these overrides; to compare settings, start a new run "
        "instead (without --ckpt_path)",
    ],
    "bad_test_fraction": [
        "scl: error: DigitsDataModule: test_fraction must be a number in [0, 1), got 1.5"
    ],
    "bad_batch_size": ["DigitsDataModule: batch_size must be a positive integer, got 0"],
    "no_training_images": [
        "scl: error: DigitsDataModule: val_fraction=0.5 and test_fraction=0.5 leave no "
        "training samples out of 1797 (899 validation + 899 test); make their sum smaller"
    ],
    "no_test_split": [
        "DigitsDataModule(test_fraction=0) has no test split: give test_fraction > 0 (e.g. "
        "--data.init_args.test_fraction 0.2), or evaluate on validation with `scl validate`"
    ],
}


# ---------------------------------------------------------------------------------- helpers


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["scl"])  # LightningCLI warns when both are given

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path


def _fails(capsys, args: list[str], case: str, code: int = 2) -> str:
    """Run ``scl ARGS``; check the exit status, that stderr ends in exactly one ``scl: error:``
    line with no traceback, and that the line holds the case's key phrases. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("scl: error:")]
    assert len(lines) == 1, err[-3000:]
    assert err.rstrip().splitlines()[-1] == lines[0]  # nothing after it: one line, not a block
    for phrase in MESSAGES[case]:
        assert phrase in lines[0], lines[0]
    return lines[0]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _kept(before: dict[str, str], root: Path) -> None:
    """Every file of ``before`` is still under ``root`` with the same bytes."""
    after = _hashes(root)
    assert {k: after.get(k) for k in before} == before


def _run_dirs(root: Path) -> set[Path]:
    return {p for p in (root / "runs").glob("*/version_*")}


def _partial_outputs(directory: Path) -> list[str]:
    """Files a failed fit must not leave in a new run directory: checkpoints, metrics, summary."""
    names = [p.relative_to(directory) for p in directory.rglob("*") if p.is_file()]
    return sorted(
        str(n) for n in names if n.suffix == ".ckpt" or n.name in ("metrics.csv", "summary.json")
    )


@pytest.fixture
def finished_run(workdir, capsys) -> Path:
    """A finished digits run in ``runs/lightning_logs/version_0``."""
    main(["fit", *BASE])
    capsys.readouterr()
    (run,) = _run_dirs(workdir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run


# ------------------------------------------------------------------ arguments and recipes


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("unknown_model", ["--model.backbone=nope"]),
        ("unknown_dataset", ["--data=scl_lightning.data.NopeDataModule"]),
        ("unknown_dataset_short", ["--data=NopeDataModule"]),
        ("negative_lambda", ["--model.lam=-1"]),
        ("nan_lambda", ["--model.lam=.nan"]),
        ("non_numeric_lambda", ["--model.lam=abc"]),
        ("unknown_ste", ["--model.ste=nope"]),
        ("bad_ste_kwargs", ["--model.ste=leaky_relu", "--model.ste_kwargs={alpha: -1}"]),
        ("negative_mask_lr", ["--model.mask_lr=-1"]),
        ("nan_mask_lr", ["--model.mask_lr=.nan"]),
        ("negative_lr", ["--model.optimizer.init_args.lr=-1"]),
        ("typo_flag", ["--model.lamda=1"]),
        ("nothing_to_mask", ['--model.exclude=["layers"]']),
        ("zero_epochs", ["--trainer.max_epochs=0"]),
        ("negative_epochs", ["--trainer.max_epochs=-2"]),
        ("bad_test_fraction", ["--data.init_args.test_fraction=1.5"]),
        ("bad_batch_size", ["--data.init_args.batch_size=0"]),
        (
            "no_training_images",
            ["--data.init_args.val_fraction=0.5", "--data.init_args.test_fraction=0.5"],
        ),
    ],
)
def test_bad_argument(workdir, capsys, case, args):
    keep = workdir / "runs" / "old" / "version_0" / "summary.json"
    keep.parent.mkdir(parents=True)
    keep.write_text("{}")
    before = _hashes(workdir)
    _fails(capsys, ["fit", *BASE, *args], case)
    _kept(before, workdir)
    for run in _run_dirs(workdir) - {keep.parent}:
        assert not _partial_outputs(run)


def test_typo_in_a_config_file(workdir, capsys):
    (workdir / "mine.yaml").write_text("model:\n  lamda: 1.0e-5\n")
    _fails(capsys, ["fit", *BASE, "--config", "mine.yaml"], "typo_in_config")
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize(
    ("content", "case"),
    [("trainer:\n  max_epochs: [1\n", "yaml_invalid"), ("", "yaml_empty"), ("- a\n", "yaml_list")],
)
def test_config_file_that_does_not_parse_is_named(workdir, capsys, content, case):
    bad = workdir / "second.yaml"
    bad.write_text(content)
    before = _hashes(workdir)
    line = _fails(capsys, ["fit", *BASE, "--config", str(bad)], case)
    assert str(bad) in line  # several --config are common: the line names the file
    _kept(before, workdir)


def test_missing_config_file(workdir, capsys):
    _fails(capsys, ["fit", *BASE, "--config", "missing.yaml"], "missing_config")


# --------------------------------------------------------------------------------- datasets


def test_missing_cifar_data_directory(workdir, capsys):
    _fails(
        capsys,
        ["fit", *BASE, *CIFAR, "--data.data_dir=nowhere", "--data.download=false"],
        "cifar_missing_data_dir",
    )
    assert not (workdir / "nowhere").exists()  # not created


def test_data_dir_is_a_file(workdir, capsys):
    (workdir / "data").write_text("not a folder")
    _fails(capsys, ["fit", *BASE, *CIFAR], "data_dir_is_a_file")
    assert (workdir / "data").read_text() == "not a folder"


def test_missing_imagenet_data_directory(workdir, capsys):
    _fails(
        capsys, ["fit", *BASE, *IMAGENET, "--data.data_dir=nowhere"], "imagenet_missing_data_dir"
    )
    assert not (workdir / "nowhere").exists()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


#: an archive with the official layout; prepare_data fails before any file is read
ARCHIVE = _tar_gz(
    {f"cifar-10-batches-py/data_batch_{i}": os.urandom(2000) for i in range(1, 6)}
    | {"cifar-10-batches-py/test_batch": b"t", "cifar-10-batches-py/batches.meta": b"m"}
)


def _place_archive(workdir: Path, data: bytes, monkeypatch, matching_md5: bool) -> Path:
    archive = workdir / "data" / CIFAR10DataModule.ARCHIVE_NAME
    archive.parent.mkdir()
    archive.write_bytes(data)
    if matching_md5:  # the checksum passes: the damage is found when the archive is read
        monkeypatch.setattr(CIFAR10DataModule, "ARCHIVE_MD5", hashlib.md5(data).hexdigest())
    return archive


def test_cifar_checksum_mismatch(workdir, capsys, monkeypatch):
    archive = _place_archive(workdir, ARCHIVE, monkeypatch, matching_md5=False)
    actual = hashlib.md5(ARCHIVE).hexdigest()
    line = _fails(capsys, ["fit", *BASE, *CIFAR], "cifar_checksum")
    moved = archive.with_name(f"{archive.name}.{actual}.bad")
    assert f"has MD5 {actual}" in line and moved.name in line
    assert moved.read_bytes() == ARCHIVE  # moved aside, never deleted
    assert sorted(p.name for p in archive.parent.iterdir()) == [moved.name]  # nothing extracted


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cifar_truncated_or_corrupt_archive(workdir, capsys, monkeypatch, damage):
    data = ARCHIVE[: len(ARCHIVE) // 2] if damage == "truncated" else os.urandom(5000)
    archive = _place_archive(workdir, data, monkeypatch, matching_md5=True)
    _fails(capsys, ["fit", *BASE, *CIFAR], "cifar_truncated")
    assert archive.read_bytes() == data
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]  # nothing partial


def test_cifar_archive_member_escaping_the_target(workdir, capsys, monkeypatch):
    evil = _tar_gz({"cifar-10-batches-py/data_batch_1": b"x", "../evil": b"owned"})
    archive = _place_archive(workdir, evil, monkeypatch, matching_md5=True)
    before = _hashes(workdir)
    _fails(capsys, ["fit", *BASE, *CIFAR], "cifar_escape")
    _kept(before, workdir)
    assert not (workdir / "evil").exists()
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]


def _image(path: Path, label: int, rng: np.random.Generator) -> None:
    from PIL import Image

    pixels = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
    pixels[..., label] = 220
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _imagenet(root: Path, classes=("cat", "dog"), per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            for k in range(per_class):
                _image(root / split / name / f"{name}_{k}.JPEG", label, rng)
    return root


def test_imagenet_without_class_folders(workdir, capsys):
    for split in ("train", "val"):
        (workdir / "imagenet" / split).mkdir(parents=True)
    _fails(capsys, ["fit", *BASE, *IMAGENET], "imagenet_no_class_folders")


def test_imagenet_empty_class_folder(workdir, capsys):
    pytest.importorskip("PIL")
    root = _imagenet(workdir / "imagenet")
    (root / "train" / "fox").mkdir()  # val/fox has its images, train/fox none
    for k in range(2):
        _image(root / "val" / "fox" / f"fox_{k}.JPEG", 2, np.random.default_rng(k))
    line = _fails(capsys, ["fit", *BASE, *IMAGENET], "imagenet_empty_class")
    assert str(Path("imagenet") / "train" / "fox") in line


def test_imagenet_unreadable_image(workdir, capsys):
    pytest.importorskip("PIL")
    root = _imagenet(workdir / "imagenet")
    broken = root / "train" / "dog" / "broken.JPEG"
    broken.write_text("this is not a JPEG")
    before = _hashes(root)
    _fails(capsys, ["fit", *BASE, *IMAGENET, "--data.bad_images=error"], "imagenet_bad_image")
    _kept(before, root)
    for run in _run_dirs(workdir):
        assert not [p for p in _partial_outputs(run) if p.endswith(".ckpt")]


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_that_does_not_exist(finished_run, workdir, capsys):
    before = _hashes(workdir)
    _fails(capsys, ["fit", *BASE, "--ckpt_path=nope.ckpt"], "ckpt_missing")
    _kept(before, workdir)
    for run in _run_dirs(workdir) - {finished_run}:
        # a new run directory with this invocation's config.resume-1.yaml may be left (see the
        # report on cli.py), but nothing a later run could mistake for results
        assert not _partial_outputs(run)


def _damaged(path: Path, kind: str) -> Path:
    target = path.with_name(f"{kind}.ckpt")
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"not a checkpoint")
    return target


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_damaged_checkpoint(finished_run, workdir, capsys, kind):
    damaged = _damaged(finished_run / "checkpoints" / "last.ckpt", kind)
    before = _hashes(workdir)
    _fails(capsys, ["fit", *BASE, f"--ckpt_path={damaged}"], "ckpt_truncated")
    _kept(before, workdir)


def test_checkpoint_path_is_a_directory(finished_run, workdir, capsys):
    before = _hashes(workdir)
    _fails(capsys, ["fit", *BASE, f"--ckpt_path={finished_run}"], "ckpt_directory")
    _kept(before, workdir)


def test_checkpoint_path_is_a_pruned_export(finished_run, workdir, capsys):
    """An exported .safetensors (torch.load reads it as a tensor dict) is not a checkpoint,
    whatever its name."""
    from torch import nn

    from scl_lightning import load_checkpoint, save_pruned, sparsify

    export = workdir / "pruned.safetensors"
    save_pruned(sparsify(nn.Sequential(nn.Linear(4, 2))), export)
    before = _hashes(workdir)
    _fails(capsys, ["fit", *BASE, f"--ckpt_path={export}"], "ckpt_export")
    _kept(before, workdir)
    renamed = workdir / "pruned.bin"
    renamed.write_bytes(export.read_bytes())
    with pytest.raises(Exception, match="not a training checkpoint"):
        load_checkpoint(renamed)


def test_checkpoint_from_another_architecture(workdir, capsys):
    """A checkpoint of another LightningModule (here Lightning's BoringModel)."""
    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=workdir,
    )
    trainer.fit(BoringModel())
    foreign = workdir / "boring.ckpt"
    trainer.save_checkpoint(foreign)
    before = _hashes(workdir)
    for sub in ("fit", "validate"):
        line = _fails(capsys, [sub, *BASE, f"--ckpt_path={foreign}"], "ckpt_other_architecture")
        assert "layer.weight" in line or "model.layers" in line
    _kept(before, workdir)
    for run in _run_dirs(workdir):
        assert not _partial_outputs(run)


def test_checkpoint_of_another_backbone_than_asked(finished_run, workdir, capsys):
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    before = _hashes(workdir)
    args = ["fit", *BASE, "--model.backbone=small_cnn", f"--ckpt_path={ckpt}"]
    try:
        _fails(capsys, args, "ckpt_other_backbone")
    finally:
        _kept(before, workdir)


def test_checkpoint_of_another_backbone_python_api(finished_run, workdir):
    """The check the case above should reach, as the Python API reaches it."""
    module = SCLModule("small_cnn", num_classes=10, input_shape=(1, 8, 8))
    trainer = quiet_trainer(workdir, limit_val_batches=1)
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as info:
        trainer.validate(module, datamodule=DigitsDataModule(), ckpt_path=ckpt)
    for phrase in MESSAGES["ckpt_other_backbone"]:
        assert phrase in str(info.value)


def test_checkpoint_with_other_mask_shapes(workdir, capsys):
    """The same recipe on images of another size: every shape but the first layer's fits."""
    pytest.importorskip("PIL")
    _imagenet(workdir / "imagenet")
    main(["fit", *BASE, *IMAGENET])
    capsys.readouterr()
    (run,) = _run_dirs(workdir)
    ckpt = run / "checkpoints" / "last.ckpt"
    before = _hashes(workdir)
    smaller = ["--data.image_size=24", "--data.val_resize=28"]
    for sub in ("fit", "validate"):
        _fails(capsys, [sub, *BASE, *IMAGENET, *smaller, f"--ckpt_path={ckpt}"], "ckpt_mask_shapes")
    _kept(before, workdir)


def test_checkpoint_of_the_other_mask_granularity(finished_run, workdir, capsys):
    """A weight-granularity run resumed or validated with channel masks (one per unit)."""
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    before = _hashes(workdir)
    for sub in ("fit", "validate"):
        args = [sub, *BASE, "--model.granularity=channel", f"--ckpt_path={ckpt}"]
        line = _fails(capsys, args, "ckpt_granularity")
        assert "'weight'" in line and "this model's 'channel'" in line
    _kept(before, workdir)


def test_evaluating_without_a_checkpoint(finished_run, workdir, capsys):
    """`scl validate` with no --ckpt_path would evaluate a freshly initialized model."""
    before = _hashes(workdir)
    _fails(capsys, ["validate", *BASE], "evaluate_without_ckpt")
    assert _hashes(workdir) == before  # no new run directory, no logs
    assert _run_dirs(workdir) == {finished_run}


def test_evaluating_the_last_checkpoint_of_a_recipe_never_trained(finished_run, workdir, capsys):
    """`--ckpt_path last` looks where this recipe's runs write checkpoints (here
    runs/digits_mlp/version_*/checkpoints), not at other recipes' runs."""
    before = _hashes(workdir)
    args = ["test", *BASE, "--trainer.logger.init_args.name=digits_mlp", "--ckpt_path=last"]
    line = _fails(capsys, args, "evaluate_last_missing")
    assert "scl test --ckpt_path last: " in line
    assert str(Path("runs") / "digits_mlp" / "version_*" / "checkpoints") in line
    assert _hashes(workdir) == before
    assert _run_dirs(workdir) == {finished_run}


def test_testing_without_a_test_split(finished_run, workdir, capsys):
    """With test_fraction=0 digits has no test split: `scl test` used to evaluate the validation
    split under the name test; now it stops before the configuration is saved."""
    no_test = "--data.init_args.test_fraction=0"
    _fails(capsys, ["test", *BASE, no_test, "--ckpt_path=last"], "no_test_split")
    for run in _run_dirs(workdir) - {finished_run}:
        assert not list(run.iterdir())  # at most the logger's empty directory


# -------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    "logger", ["scl_lightning.experiment.loggers.CSVLogger", "lightning.pytorch.loggers.CSVLogger"]
)
def test_output_directory_holding_a_finished_run(workdir, capsys, logger):
    # Lightning's own CSVLogger deletes metrics.csv as soon as it starts in a directory: the
    # check runs before any logger starts
    (workdir / "fixed.yaml").write_text(
        "trainer:\n"
        "  logger:\n"
        f"    - class_path: {logger}\n"
        "      init_args: {save_dir: runs, name: fixed, version: 0}\n"
    )
    args = ["fit", *BASE, "--config", "fixed.yaml"]
    main(args)
    run = workdir / "runs" / "fixed" / "version_0"
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "metrics.csv").is_file()
    before = _hashes(workdir)
    line = _fails(capsys, [*args, "--model.lam=4e-5"], "output_dir_taken")
    assert str(Path("runs") / "fixed" / "version_0") in line
    assert _hashes(workdir) == before  # not a byte changed, nothing added


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_gpu_preset_without_a_gpu(finished_run, workdir, capsys, subcommand):
    """The GPU trainer preset on a CPU-only machine: one line naming the preset, before
    anything is built (it was Lightning's "No supported gpu backend found!" traceback)."""
    before = _hashes(workdir)
    args = [subcommand, *BASE, "--config", str(CONFIGS / "trainer" / "gpu.yaml")]
    if subcommand == "test":
        args.append("--ckpt_path=last")
    _fails(capsys, args, "gpu_without_gpu")
    assert _hashes(workdir) == before
    assert _run_dirs(workdir) == {finished_run}


def _writable_by_all(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    return directory


def test_read_only_output_directory(tmp_path):
    """`scl fit` in a directory this user cannot write: one line, exit 2, nothing created (it
    was an unreadable jsonargparse error holding "Permission denied"). Run as an unprivileged
    user (root writes anywhere): directly, or through `setpriv` when the tests run as root."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop privileges")
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # a directory every user may enter (pytest's tmp_path is private to its owner)
    base = Path(tempfile.mkdtemp(prefix="scl-readonly-", dir="/tmp"))
    try:
        base.chmod(0o755)
        read_only = _writable_by_all(base / "ro")
        (read_only / "keep.txt").write_text("kept")
        read_only.chmod(0o555)
        code = "import sys; from scl_lightning.experiment.cli import main; main(sys.argv[1:])"
        env = {**os.environ, "HOME": str(base), "WANDB_MODE": "offline"}
        result = subprocess.run(
            [*prefix, sys.executable, "-c", code, "fit", *BASE],
            cwd=read_only,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.rstrip().splitlines()[-1]
        assert last.startswith("scl: error:"), result.stderr[-3000:]
        for phrase in MESSAGES["read_only_output"]:
            assert phrase in last, last
        assert str(read_only / "runs") in last
        assert sorted(p.name for p in read_only.iterdir()) == ["keep.txt"]
    finally:
        (base / "ro").chmod(0o755)
        shutil.rmtree(base)


def test_output_directory_that_is_a_file(workdir, capsys):
    (workdir / "taken").write_text("a file")
    line = _fails(
        capsys, ["fit", *BASE, "--trainer.logger.init_args.save_dir=taken/runs"], "file_as_output"
    )
    assert str(workdir / "taken") in line
    assert sorted(p.name for p in workdir.iterdir()) == ["taken"]


# ------------------------------------------------------------------ resuming with other settings


def test_resume_with_other_settings_warns_and_uses_them(finished_run, workdir, capsys):
    """`--ckpt_path last` with another lam and more epochs: one warning naming each differing
    setting with both values; the new values are used (it was silent)."""
    args = ["fit", *BASE, "--model.lam=4e-5", "--trainer.max_epochs=2", "--ckpt_path=last"]
    with pytest.warns(UserWarning, match="other than the run's") as caught:
        main(args)
    (message,) = [str(w.message) for w in caught if "other than the run's" in str(w.message)]
    for phrase in MESSAGES["resumed_with_other_settings"]:
        assert phrase in message, message
    assert "trainer.max_epochs 1 -> 2;" in message
    assert str(Path("runs") / "lightning_logs" / "version_0" / "config.yaml") in message
    stored = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["hyper_parameters"]["lam"] == 4e-5 and stored["epoch"] == 2
    assert (finished_run / "config.resume-1.yaml").is_file()


def test_resume_with_the_same_settings_is_silent(finished_run, workdir, recwarn):
    main(["fit", *BASE, "--trainer.max_epochs=1", "--ckpt_path=last"])
    assert not [w for w in recwarn if "other than the run's" in str(w.message)]


def test_resume_of_a_run_whose_config_lacks_a_setting_names_it(finished_run, workdir):
    """A run saved by an older scl-lightning has no `test_fraction`: the new default would
    change its data split, so the warning names the setting (it was silent)."""
    config = finished_run / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    del settings["data"]["init_args"]["test_fraction"]
    stat = config.stat()
    config.write_text(yaml.safe_dump(settings))
    os.utime(config, (stat.st_atime, stat.st_mtime))  # as old as it was
    with pytest.warns(UserWarning, match="other than the run's") as caught:
        main(["fit", *BASE, "--trainer.max_epochs=2", "--ckpt_path=last"])
    (message,) = [str(w.message) for w in caught if "other than the run's" in str(w.message)]
    assert "data.init_args.test_fraction (absent) -> 0.2" in message, message


def test_resume_compares_with_the_config_the_checkpoint_was_trained_with(
    finished_run, workdir, recwarn
):
    """A later config that saved no checkpoint (a failed resume attempt) is not the run's, nor
    is a recipe named config.yaml next to a checkpoint outside any run directory."""
    attempt = finished_run / "config.resume-1.yaml"
    settings = yaml.safe_load((finished_run / "config.yaml").read_text())
    settings["model"]["lam"] = 1.0
    attempt.write_text(yaml.safe_dump(settings))
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    os.utime(attempt, (ckpt.stat().st_mtime + 60,) * 2)
    main(["fit", *BASE, "--trainer.max_epochs=1", "--ckpt_path=last"])
    assert not [w for w in recwarn if "other than the run's" in str(w.message)]

    shutil.copy(ckpt, workdir / "moved.ckpt")
    (workdir / "config.yaml").write_text(yaml.safe_dump(settings))  # a recipe, lam 1.0
    with pytest.warns(UserWarning, match="other than the run's") as caught:
        main(["fit", *BASE, "--model.lam=4e-5", "--ckpt_path=moved.ckpt"])
    (message,) = [str(w.message) for w in caught if "other than the run's" in str(w.message)]
    assert "the settings stored in moved.ckpt" in message and "2e-05 -> 4e-05" in message


def test_resume_from_a_checkpoint_outside_its_run_compares_stored_settings(finished_run, workdir):
    """No config.yaml next to the checkpoint: the model and data settings it stores are the
    reference."""
    moved = workdir / "moved.ckpt"
    shutil.copy(finished_run / "checkpoints" / "last.ckpt", moved)
    args = ["fit", *BASE, "--model.lam=4e-5", "--data.init_args.batch_size=32"]
    with pytest.warns(UserWarning, match="other than the run's") as caught:
        main([*args, f"--ckpt_path={moved}", "--trainer.max_epochs=2"])
    (message,) = [str(w.message) for w in caught if "other than the run's" in str(w.message)]
    assert f"the settings stored in {moved}" in message
    assert "data.init_args.batch_size 64 -> 32" in message and "model.lam 2e-05 -> 4e-05" in message
    assert "trainer.max_epochs" not in message  # a checkpoint does not store trainer settings


# ------------------------------------------------------------------ runs stopped in training


def test_nan_learning_rate_stops_the_run(finished_run, workdir, capsys):
    before = _hashes(workdir)
    _fails(capsys, ["fit", *BASE, "--model.optimizer.init_args.lr=.nan"], "nan_lr", code=1)
    _kept(before, workdir)
    for run in _run_dirs(workdir) - {finished_run}:
        assert not list(run.rglob("*.ckpt"))  # no checkpoint holding NaN


# ------------------------------------------------------------------------------------- W&B

WANDB_CONFIG = (
    "trainer:\n"
    "  logger:\n"
    "    - class_path: scl_lightning.experiment.loggers.CSVLogger\n"
    "      init_args: {save_dir: runs}\n"
    "    - class_path: scl_lightning.experiment.loggers.WandbLogger\n"
    "      init_args: {save_dir: runs, init_timeout: 3}\n"
)


@pytest.fixture
def wandb_misconfigured(workdir, monkeypatch):
    """Credentials that look valid, a server that refuses connections, no WANDB_MODE."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(workdir))  # no ~/.netrc
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    (workdir / "wandb.yaml").write_text(WANDB_CONFIG)
    yield wandb
    wandb.finish()
    wandb.teardown()  # stop the wandb service process the test started


def _fit_with_wandb(workdir, recwarn) -> list[str]:
    main(["fit", *BASE, "--config", "wandb.yaml"])  # returns: exit status 0
    warnings = [str(w.message) for w in recwarn if "W&B" in str(w.message)]
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert "\n" not in message
    for phrase in MESSAGES["wandb_offline"]:
        assert phrase in message
    assert list((workdir / "runs" / "wandb").glob("offline-run-*"))
    assert list((workdir / "runs").glob("lightning_logs/version_0/summary.json"))
    return warnings


def test_wandb_refused_continues_offline(wandb_misconfigured, workdir, recwarn, monkeypatch):
    """W&B refuses the online run at once (as for a bad key): the fit goes on offline."""
    wandb = wandb_misconfigured
    real_init = wandb.init
    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs.get("mode") != "offline":
            raise wandb.errors.CommError("401 Unauthorized: invalid API key (test)")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    (message,) = _fit_with_wandb(workdir, recwarn)
    assert "401 Unauthorized: invalid API key (test)" in message
    assert [c.get("mode") for c in calls] == [None, "offline"]


def test_wandb_init_timeout_reaches_wandb(wandb_misconfigured, workdir, monkeypatch):
    wandb = wandb_misconfigured
    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", init)
    with pytest.raises(RuntimeError, match="stop here"):
        main(["fit", *BASE, "--config", "wandb.yaml"])
    settings = calls[0].get("settings") or {}
    assert dict(settings).get("init_timeout") == 3.0


@pytest.mark.slow
def test_wandb_server_unreachable_continues_offline(wandb_misconfigured, workdir, recwarn):
    """A real connection refused. Slow (about 15 s): W&B retries for the logger's init_timeout
    (3 s here), then the fit goes on offline."""
    start = time.monotonic()
    (message,) = _fit_with_wandb(workdir, recwarn)
    assert "127.0.0.1:9" in message
    print(f"fit with an unreachable W&B server: {time.monotonic() - start:.0f} s")


# ---------------------------------------------------------------------------------- the doc


def test_every_message_is_documented():
    doc = DOC.read_text()
    missing = {case: p for case, phrases in MESSAGES.items() for p in phrases if p not in doc}
    assert not missing, f"docs/errors.md lacks: {missing}"
