"""Acceptance of exact resume: a real `scl fit` process is killed with SIGKILL mid-epoch, resumed
with `--ckpt_path last`, and ends bit-identical to the same run never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scl_lightning.experiment.checkpoint import load_checkpoint

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "digits_mlp.yaml"
TESTS = Path(__file__).resolve().parents[1]  # _helpers.py
EPOCHS = 3
BATCHES = 17  # per epoch: 1077 training images in batches of 64


def _config(workdir: Path) -> Path:
    """The digits recipe with a CSV logger only, a checkpoint every 4 steps and a slow-down so
    the run can be killed while it trains."""
    config = yaml.safe_load(RECIPE.read_text())
    trainer = config["trainer"]
    trainer["logger"] = [trainer["logger"][0]]  # CSV only: no W&B files in the test
    trainer["max_epochs"] = EPOCHS
    trainer["enable_progress_bar"] = False
    for callback in trainer["callbacks"]:
        if callback.get("init_args", {}).get("every_n_train_steps"):
            callback["init_args"]["every_n_train_steps"] = 4
    trainer["callbacks"].append({"class_path": "_helpers.SlowDown", "init_args": {"seconds": 0.04}})
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _scl(workdir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    env["WANDB_MODE"] = "disabled"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scl_lightning.experiment.cli",
            "fit",
            "--config",
            "recipe.yaml",
            *args,
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _final(workdir: Path) -> tuple[dict, dict]:
    run = workdir / "runs" / "digits_mlp" / "version_0"
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    (summary,) = sorted(run.glob("summary*.json"), key=lambda p: p.stat().st_mtime)[-1:]
    return checkpoint, json.loads(summary.read_text())


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for workdir in (straight, killed):
        workdir.mkdir()
        _config(workdir)
    _finish(_scl(straight))

    proc = _scl(killed)
    last = killed / "runs" / "digits_mlp" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    # an arbitrary moment of the first two epochs (34 steps of ~0.05 s after the first save)
    time.sleep(random.Random(os.getpid()).uniform(0.1, 1.5))
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_checkpoint(last)["global_step"]
    assert 0 < killed_at < EPOCHS * BATCHES

    out = _finish(_scl(killed, "--ckpt_path", "last"))
    assert "resuming from" in out

    (ref, ref_summary), (got, got_summary) = _final(straight), _final(killed)
    assert got["global_step"] == ref["global_step"] == EPOCHS * BATCHES
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    for ref_state, got_state in zip(ref["optimizer_states"], got["optimizer_states"], strict=True):
        for index, state in ref_state["state"].items():
            for name, tensor in state.items():
                assert torch.equal(tensor, got_state["state"][index][name]), (index, name)
    keys = ("val_acc", "val_loss", "test_acc", "test_loss", "sparsity", "active_connections")
    for key in (*keys, "effective_flops"):
        assert got_summary[key] == ref_summary[key], key
