"""RankAgreementCheck under real multi-process DDP on CPU (2 processes, gloo): silent while the
ranks agree, and a one-line error on both ranks, without a hang, when one rank's mask drifts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import launch_ddp

SCRIPT = Path(__file__).with_name("ddp_agreement.py")
TIMEOUT_S = 120  # a run takes a few seconds; a hang (one rank waiting in a collective) ends here


def _launch(out: Path, mode: str) -> tuple[int, str, list[dict]]:
    returncode, output = launch_ddp(SCRIPT, str(out), mode, timeout=TIMEOUT_S)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return returncode, output, ranks


@pytest.fixture(scope="module")
def agree(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, list[dict]]:
    return _launch(tmp_path_factory.mktemp("agree"), "agree")


@pytest.fixture(scope="module")
def diverge(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, list[dict]]:
    return _launch(tmp_path_factory.mktemp("diverge"), "diverge")


def test_agreeing_ranks_pass_every_check(agree: tuple[int, str, list[dict]]) -> None:
    returncode, output, ranks = agree
    assert returncode == 0, output[-3000:]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world_size"] == 2
        assert r["error"] is None
        assert r["global_step"] == 4
        assert r["num_checks"] == 4  # one check per optimizer step: the check really ran


def test_divergence_fails_on_both_ranks(diverge: tuple[int, str, list[dict]]) -> None:
    returncode, output, ranks = diverge
    assert returncode != 0, output[-3000:]
    assert [r["rank"] for r in ranks] == [0, 1], output[-3000:]
    messages = {r["error"] for r in ranks}
    assert len(messages) == 1  # every rank took the same decision
    (message,) = messages
    mask = ranks[0]["mask"]
    assert message is not None and "\n" not in message
    assert message.startswith(
        f"RankAgreementCheck: parameters diverged across ranks at global step 2: "
        f"rank 1 disagrees with rank 0 on '{mask}';"
    )
    assert "SCL_DEBUG=1" in message
    assert all(r["global_step"] == 2 and r["num_checks"] == 2 for r in ranks)
    assert output.count(f"RankDivergenceError: {message}") == 2  # each rank's traceback ends so
