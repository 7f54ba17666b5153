"""``scl export``: a trained run to a file in each format, and one clear line for bad input."""

from __future__ import annotations

import pytest
import torch

from _helpers import quiet_trainer
from scl_lightning import SCLModule
from scl_lightning.data import DigitsDataModule
from scl_lightning.deploy.formats import load_export
from scl_lightning.experiment.export_cli import load_trained, main

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits run directory with a Lightning checkpoint of a pruned MLP."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    module = SCLModule("lenet_300_100", input_shape=(1, 8, 8), lam=1e-3, mask_lr=0.1)
    trainer = quiet_trainer(root, max_epochs=2, limit_train_batches=10, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    (root / "checkpoints").mkdir()
    trainer.save_checkpoint(root / "checkpoints" / "last.ckpt")
    return root


@pytest.mark.parametrize(
    "fmt,name",
    [
        ("dense", "model.safetensors"),
        ("compact", "model.pt2"),
        ("sparse", "model_sparse.pt2"),
        ("onnx", "model.onnx"),
    ],
)
def test_export_writes_each_format_into_the_run(run_dir, fmt, name, capsys):
    assert main([str(run_dir), "--format", fmt, "--batch-size", "8"]) == 0
    out = run_dir / "export" / name
    assert out.is_file()
    printed = capsys.readouterr().out
    assert f"{fmt} -> {out}" in printed and "parameters" in printed and "FLOPs" in printed
    model, shape = load_trained(run_dir / "checkpoints" / "last.ckpt")
    assert shape == (1, 8, 8)
    if fmt != "dense":
        x = torch.randn(16, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(load_export(out)(x).argmax(1), model(x).argmax(1))


def test_an_existing_output_is_one_line_and_kept(run_dir, capsys):
    out = run_dir / "mine.onnx"
    out.write_bytes(b"keep me")
    assert main([str(run_dir), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"scl export: error: {out} already exists; pass --overwrite or --out another path"
    ]
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "args,message",
    [
        (["{run}/nowhere"], "does not exist: pass a run directory or a .ckpt file"),
        (["{empty}"], "no checkpoint (*.ckpt) in"),
        (["{run}/export/model.pt2"], "is an export, not a checkpoint"),
        (["{run}", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(run_dir, tmp_path, capsys, args, message):
    (run_dir / "export").mkdir(exist_ok=True)
    (run_dir / "export" / "model.pt2").touch(exist_ok=True)
    argv = [a.format(run=run_dir, empty=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scl export: error: ") and message in err[0]


def test_an_output_that_is_a_directory_is_one_line(run_dir, capsys):
    out = run_dir / "folder.pt2"
    out.mkdir()
    assert main([str(run_dir), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"scl export: error: {out} is a directory; pass a file path"]
    assert out.is_dir() and not any(out.iterdir())


def test_unknown_format_is_a_usage_error(run_dir, capsys):
    assert main([str(run_dir), "--format", "tflite"]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_a_run_without_masks_is_refused(tmp_path, capsys):
    module = SCLModule("lenet_300_100", input_shape=(1, 8, 8), sparsify=False)
    trainer = quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    ckpt = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(ckpt)
    assert main([str(ckpt)]) == 2
    assert "holds no masks" in capsys.readouterr().err


def test_the_scl_command_dispatches_export(run_dir, capsys):
    from scl_lightning.experiment.cli import main as scl

    with pytest.raises(SystemExit) as exit_:
        scl(["export", str(run_dir / "missing")])
    assert exit_.value.code == 2
    assert "scl export: error:" in capsys.readouterr().err
