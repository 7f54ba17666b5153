"""ExactResume under real multi-process DDP on CPU (2 processes, gloo): a run stopped mid-epoch
and resumed from its last checkpoint ends, on every rank, bit-identical to one never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _helpers import launch_ddp
from scl_lightning.experiment.checkpoint import load_checkpoint

SCRIPT = Path(__file__).with_name("ddp_resume.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    full, stopped = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("stopped")
    for out, mode in ((full, "full"), (stopped, "stop"), (stopped, "resume")):
        returncode, output = launch_ddp(SCRIPT, str(out), mode)
        if mode == "stop":  # Lightning exits with status 1 after an interrupt
            assert "KeyboardInterrupt" in output, output[-3000:]
            assert load_checkpoint(out / "ckpt" / "last.ckpt")["global_step"] == 5
        else:
            assert returncode == 0, f"{mode}:\n{output[-3000:]}"
    return full, stopped


def test_checkpoint_holds_every_ranks_generators(runs: tuple[Path, Path]) -> None:
    _, stopped = runs
    states = load_checkpoint(stopped / "ckpt" / "last.ckpt")["scl_exact_resume"]["rng"]
    assert len(states) == 2  # one per rank, gathered at every save
    assert all(isinstance(state["torch"], torch.Tensor) for state in states)


@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_ddp_run_is_bit_identical(runs: tuple[Path, Path], rank: int) -> None:
    full, stopped = runs
    ref = torch.load(full / f"full_rank{rank}.pt", weights_only=True)
    got = torch.load(stopped / f"resume_rank{rank}.pt", weights_only=True)
    assert got["step"] == ref["step"] == 12
    assert ref["state"].keys() == got["state"].keys()
    for key, value in ref["state"].items():
        assert torch.equal(value, got["state"][key]), key
    # and the generators ended in the same state: the same draws were made after the resume
    assert torch.equal(ref["rng"], got["rng"])
