"""Real multi-process DDP on CPU (2 processes, gloo): ranks agree, and each sees its own data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import launch_ddp

SCRIPT = Path(__file__).with_name("ddp_fit.py")


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def ranks(ddp_out: Path) -> list[dict]:
    out = ddp_out
    returncode, output = launch_ddp(SCRIPT, str(out), timeout=300)
    assert returncode == 0, output[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_ran(ranks: list[dict]) -> None:
    assert [r["world_size"] for r in ranks] == [2, 2]


def test_masks_and_weights_identical_across_ranks(ranks: list[dict]) -> None:
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    masks = [k for k in a if k.endswith(".mask")]
    assert len(masks) == 3
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and training really changed the masks (the agreement is not the trivial one of init)
    assert any(bool((a[k] != 1.0).any()) for k in masks)


def test_logged_sparsity_identical_across_ranks(ranks: list[dict]) -> None:
    assert ranks[0]["sparsity"]["sparsity/global"] == ranks[1]["sparsity"]["sparsity/global"]
    assert ranks[0]["sparsity"] == ranks[1]["sparsity"]


def test_each_rank_saw_different_data(ranks: list[dict]) -> None:
    seen0, seen1 = set(ranks[0]["batches"]), set(ranks[1]["batches"])
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 12  # 2 epochs x 6 batches
    assert not seen0 & seen1


def test_each_rank_reshuffles_per_epoch(ranks: list[dict]) -> None:
    for r in ranks:
        assert set(r["batches"][:6]) != set(r["batches"][6:])


def test_run_summary_written_once_by_rank_zero(ranks: list[dict], ddp_out: Path) -> None:
    """RunSummary reads the run directory on every rank (Lightning broadcasts it) and writes
    on rank zero only: no hang, one file."""
    summaries = sorted(p.name for p in ddp_out.glob("summary*.json"))
    assert summaries == ["summary.json"]
    summary = json.loads((ddp_out / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(ranks[0]["sparsity"]["sparsity/global"])


def test_test_after_fit_is_added_by_rank_zero(ranks: list[dict], ddp_out: Path) -> None:
    """The test that `scl fit` runs after training, on every rank: no hang, one summary, and
    the accuracy of the whole test split (each rank tested half of it) for the final weights."""
    from scl_lightning import SCLModule
    from scl_lightning.data import DigitsDataModule
    from scl_lightning.experiment.run_summary import TEST_HELD_OUT

    assert sorted(p.name for p in ddp_out.glob("summary*.json")) == ["summary.json"]
    summary = json.loads((ddp_out / "summary.json").read_text())
    assert summary["test_split"] == TEST_HELD_OUT
    module = SCLModule(
        "lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=1e-4, mask_lr=0.05
    )
    module.load_state_dict(ranks[0]["state"])
    datamodule = DigitsDataModule(batch_size=32)
    datamodule.setup("test")
    x, y = datamodule.test_dataset.tensors
    with torch.no_grad():
        accuracy = (module.eval()(x).argmax(dim=1) == y).float().mean()
    assert summary["test_acc"] == pytest.approx(float(accuracy), abs=1e-6)
