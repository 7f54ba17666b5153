"""SafeCheckpointIO: atomic saves that survive a kill, weights_only loads, clear errors for a
checkpoint that does not fit the model."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scl_lightning import SCLModule
from scl_lightning.experiment.checkpoint import (
    CheckpointError,
    SafeCheckpointIO,
    atomic_torch_save,
    check_compatible,
    load_checkpoint,
)

# A process that saves checkpoint 1, then starts saving checkpoint 2 and stalls halfway through
# the write (the moment a preemption would kill it).
_SAVER = r"""
import io, sys, time, torch
import scl_lightning.experiment.checkpoint as ckpt
from scl_lightning.experiment.checkpoint import SafeCheckpointIO

real_save = torch.save
def stalling_save(obj, f, *args, **kwargs):
    if obj.get("step") != 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    print("HALFWAY", flush=True)
    time.sleep(120)
    f.write(data[len(data) // 2 :])
torch.save = stalling_save

io_plugin = SafeCheckpointIO()
big = torch.arange(2_000_000, dtype=torch.float32)
io_plugin.save_checkpoint({"step": 1, "weights": big}, sys.argv[1])
print("SAVED 1", flush=True)
io_plugin.save_checkpoint({"step": 2, "weights": big + 1}, sys.argv[1])
"""


def test_a_kill_while_saving_leaves_the_previous_last_checkpoint_loadable(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(last)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while "HALFWAY" not in lines:
        assert time.monotonic() < deadline and proc.poll() is None, lines
        lines.append(proc.stdout.readline().strip())
    # half of checkpoint 2 is on disk, in the temporary file
    (partial,) = last.parent.glob(".last.ckpt.*.tmp")
    assert partial.stat().st_size > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    checkpoint = load_checkpoint(last)
    assert checkpoint["step"] == 1
    assert torch.equal(checkpoint["weights"], torch.arange(2_000_000, dtype=torch.float32))
    # the next save cleans up the killed writer's temporary file
    atomic_torch_save({"step": 3}, last)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(last)["step"] == 3


def test_a_failed_save_keeps_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)

    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        SafeCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        SafeCheckpointIO().load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("data", [b"not a checkpoint", b"hello\n", b"epoch,step\n0,1\n"])
def test_a_file_that_is_no_checkpoint_is_unreadable_not_unsafe(tmp_path: Path, data) -> None:
    """Text fails in torch's weights-only unpickler too (or raises KeyError, IndexError): one
    CheckpointError saying the file is damaged, not that it could run code."""
    path = tmp_path / "notes.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


class _Exploit:
    def __reduce__(self):
        return (os.mkdir, (str(Path(__file__).parent / "MARKER_SHOULD_NOT_EXIST"),))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    marker = Path(__file__).parent / "MARKER_SHOULD_NOT_EXIST"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)  # True regardless
    assert not marker.exists()
    with open(tmp_path / "evil2.ckpt", "wb") as f:  # a plain pickle file too
        pickle.dump(_Exploit(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil2.ckpt")
    assert not marker.exists()


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_check_compatible_names_what_differs() -> None:
    model = {"a.weight": torch.zeros(3, 4), "a.mask": torch.zeros(3, 4)}
    check_compatible(model, {k: v.clone() for k, v in model.items()})
    with pytest.raises(CheckpointError, match=r"mask a.mask has shape \(2, 4\)"):
        check_compatible(model, {"a.weight": torch.zeros(2, 4), "a.mask": torch.zeros(2, 4)})
    with pytest.raises(CheckpointError, match="has no masks"):
        check_compatible(model, {"a.weight": torch.zeros(3, 4)})
    with pytest.raises(CheckpointError, match="this model is dense"):
        check_compatible({"a.weight": torch.zeros(3, 4)}, model)
    with pytest.raises(CheckpointError, match="another architecture: 1 entries missing"):
        check_compatible(model | {"b.bias": torch.zeros(2)}, model)
    # a checkpoint of another model has no masks either, but is not a dense run of this one
    with pytest.raises(CheckpointError, match="another architecture: 2 entries missing"):
        check_compatible(model, {"layer.weight": torch.zeros(2, 4)})


def test_load_from_checkpoint_of_another_backbone(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    trainer = pl.Trainer(logger=False, max_epochs=0, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "lenet.ckpt"
    trainer.save_checkpoint(path)
    # load_from_checkpoint writes its keyword arguments into the checkpoint's hyper-parameters,
    # so the backbone names agree and the state dicts tell the story
    with pytest.raises(CheckpointError, match="another architecture: 136 entries missing"):
        SCLModule.load_from_checkpoint(path, backbone="resnet20", input_shape=(3, 32, 32))
    with pytest.raises(CheckpointError, match=r"mask .* has shape"):
        SCLModule.load_from_checkpoint(path, num_classes=5)
    assert SCLModule.load_from_checkpoint(path).total_connections == module.total_connections


def test_checkpoints_get_the_usual_file_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_torch_save({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644  # readable by colleagues


def test_temporary_files_of_any_killed_save_are_cleaned_up(tmp_path: Path) -> None:
    # a kill during the save of a one-off name (a top-k checkpoint) is never retried
    leftover = tmp_path / ".epoch=3-step=92.ckpt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    atomic_torch_save({"step": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_checkpoint_without_metric_states_still_loads(tmp_path: Path) -> None:
    """Checkpoints saved before the running train accuracy was checkpointed lack its states."""
    import lightning.pytorch as pl

    module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    trainer = pl.Trainer(logger=False, max_epochs=0, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    metric_keys = [k for k in checkpoint["state_dict"] if k.startswith("train_acc")]
    assert metric_keys
    for key in metric_keys:
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, path)
    loaded = SCLModule.load_from_checkpoint(path)
    assert torch.equal(loaded.model.layers[1].mask, module.model.layers[1].mask)


def test_a_checkpoint_trained_with_layers_dense_that_are_now_masked_says_exclude():
    """A ViT trained before nn.MultiheadAttention was masked: its state has no attn masks."""
    from torch import nn

    from scl_lightning import sparsify
    from scl_lightning._compat import CheckpointError, check_compatible

    def vit() -> nn.Module:
        net = nn.Sequential()
        net.add_module("attn", nn.MultiheadAttention(8, 2))
        net.add_module("head", nn.Linear(8, 2))
        return net

    old = sparsify(vit(), exclude=["attn"])
    new = sparsify(vit())
    with pytest.raises(
        CheckpointError,
        match=r"^the checkpoint was trained with 2 layer\(s\) dense that this model masks "
        r"\('attn', 'attn.out_proj'\); build the model with those layers excluded",
    ):
        check_compatible(new.state_dict(), old.state_dict())
    check_compatible(sparsify(vit(), exclude=["attn"]).state_dict(), old.state_dict())
    assert torch.equal(old.head.mask, torch.ones(2, 8))
