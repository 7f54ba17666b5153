"""Lambda control under real 2-process CPU DDP: lambda is identical on every rank at every step."""

from __future__ import annotations

from pathlib import Path

import torch

from _helpers import launch_ddp

SCRIPT = Path(__file__).with_name("ddp_budget.py")


def test_lambda_identical_on_every_rank_at_every_step(tmp_path: Path) -> None:
    returncode, output = launch_ddp(SCRIPT, str(tmp_path), timeout=300)
    assert returncode == 0, output[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert a["world_size"] == b["world_size"] == 2
    assert len(a["lams"]) == 40
    assert a["lams"] == b["lams"]  # exact float equality, every step
    assert a["values"] == b["values"]
    assert a["controller"] == b["controller"]
    for key in a["masks"]:
        assert torch.equal(a["masks"][key], b["masks"][key]), key
    # the controller really worked: lambda moved and the masks pruned
    assert len(set(a["lams"])) > 5
    assert a["values"][-1] > 0.1
