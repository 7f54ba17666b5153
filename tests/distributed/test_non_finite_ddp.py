"""StopOnNonFinite under real multi-process DDP on CPU (2 processes, gloo): a nan loss on one rank
stops both ranks at the same step, before the optimizer step, with no hang and no poisoned step
on the other rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import launch_ddp

SCRIPT = Path(__file__).with_name("ddp_non_finite.py")
TIMEOUT_S = 120  # a run takes a few seconds; a hang (one rank waiting in a collective) ends here
TAIL = (
    "at global step 2 (epoch 0, batch 2){}: the run stopped before the optimizer step, so the "
    "weights are still those of global step 2"
)


def _launch(out: Path, check_gradients: bool) -> tuple[int, str, list[dict]]:
    returncode, output = launch_ddp(SCRIPT, str(out), str(check_gradients), timeout=TIMEOUT_S)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return returncode, output, ranks


@pytest.mark.parametrize(
    ("check_gradients", "rank0_error"),
    [
        # the all-reduce spreads rank 1's nan gradients: rank 0 finds them itself
        (
            True,
            "non-finite gradients (nan) in 4 of 4 parameters: the weight of layer net.1, the "
            "bias of layer net.1, the weight of layer net.3 and 1 more " + TAIL.format(""),
        ),
        # only the loss is checked, and rank 0's is finite: it stops on rank 1's verdict
        (
            False,
            "non-finite loss or gradients on another rank "
            + TAIL.format(" (that rank's error names them)"),
        ),
    ],
)
def test_nan_loss_on_one_rank_stops_both(tmp_path, check_gradients, rank0_error):
    returncode, output, ranks = _launch(tmp_path, check_gradients)
    assert returncode != 0, output[-3000:]
    assert [r["rank"] for r in ranks] == [0, 1], output[-3000:]
    assert all(r["global_step"] == 2 for r in ranks)  # neither rank took the poisoned step
    assert ranks[0]["error"].startswith(rank0_error), ranks[0]["error"]
    assert ranks[1]["error"].startswith("non-finite training loss (nan) " + TAIL.format(""))
