"""`scl report`: plots and report.md from a real (short) digits fit, and every error case."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from scl_lightning.experiment import report
from scl_lightning.experiment.cli import main as scl_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CSV = str(CONFIGS / "logger" / "csv.yaml")
FAST = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=5",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
]
PNGS = ("layer_sparsity.png", "training_curves.png", "flops.png")
INT_KEYS = (
    "active_connections",
    "total_connections",
    "dense_flops",
    "effective_flops",
    "seed",
    "epochs",
    "global_step",
)


def _fit(root: Path, recipe: str, *extra: str) -> Path:
    """A real `scl fit` in ``root``; returns its run directory (the one with summary.json)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "argv", ["scl"])  # LightningCLI warns when both are given
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("PL_GLOBAL_SEED", "0")  # recorded, so the seed set by the fit is undone
        mp.delenv("PL_GLOBAL_SEED")
        scl_main(["fit", "--config", str(CONFIGS / recipe), "--config", CSV, *FAST, *extra])
    (summary,) = root.rglob("summary.json")
    return summary.parent


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> Path:
    # masks start near the threshold, so 10 steps prune a good share (~30%) of the connections
    return _fit(tmp_path_factory.mktemp("sparse"), "digits_mlp.yaml", "--model.mask_init=0.1")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    return _fit(tmp_path_factory.mktemp("dense"), "digits_mlp_dense.yaml", "--trainer.max_epochs=1")


@pytest.fixture
def run_dir(tmp_path, sparse_run) -> Path:
    """A private copy of the finished sparse run, free to modify."""
    return Path(shutil.copytree(sparse_run, tmp_path / "version_0"))


# -- helpers -------------------------------------------------------------------------------


def _headline(md: str) -> dict[str, str]:
    """``{summary key: cell}`` from the headline table rows ``| label | `key` | value |``."""
    return dict(re.findall(r"^\| [^|]+ \| `(\w+)` \| ([^|]+?) \|$", md, flags=re.M))


def _layer_rows(md: str) -> dict[str, list[str]]:
    rows = re.findall(r"^\| `([^`]+)` \| (.+) \|$", md, flags=re.M)
    return {name: [c.strip() for c in rest.split("|")] for name, rest in rows if "." in name}


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 10_000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 300 and im.height > 300, im.size
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 10  # bars, lines and text, not a blank page
        # and not mostly one flat colour either: the most common one (white) covers < 97%
        assert max(n for n, _ in colors) < 0.97 * im.width * im.height


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _check_report_matches_summary(out: Path, run: Path) -> str:
    """The numbers in report.md equal summary.json's; returns the Markdown."""
    summary = json.loads((run / "summary.json").read_text())
    md = (out / "report.md").read_text()
    head = _headline(md)
    for key in ("val_acc", "val_loss", "test_acc", "test_loss", "sparsity"):
        assert head[key] == f"{summary[key]:.4f}", key
        assert _number(head[key]) == pytest.approx(summary[key], abs=5e-5)
    for key in INT_KEYS:
        assert _number(head[key]) == summary[key], key
    assert head["train_time_s"] == f"{summary['train_time_s']:.2f}"
    ratio = summary["effective_flops"] / summary["dense_flops"]
    assert head["flops_ratio"] == f"{ratio:.4f}"

    rows = _layer_rows(md)
    assert list(rows) == [layer["name"] for layer in summary["layers"]]
    for layer in summary["layers"]:
        shape, active, total, sparsity, dense, eff = rows[layer["name"]]
        assert shape == "x".join(map(str, layer["shape"]))
        assert _number(active) == layer["active"]
        assert _number(total) == layer["total"]
        assert sparsity == f"{layer['sparsity']:.4f}"
        assert _number(dense) == layer["dense_flops"]
        assert _number(eff) == round(layer["dense_flops"] * layer["active"] / layer["total"])
    # the per-layer effective FLOPs add up to the summary's total (all of LeNet's FLOPs are in
    # its Linears)
    assert sum(_number(r[5]) for r in rows.values()) == summary["effective_flops"]

    for png in PNGS:
        assert f"]({png})" in md  # image links, relative to report.md
        _check_png(out / png)
    return md


# -- the report from a real fit ------------------------------------------------------------


def test_report_from_a_real_fit(run_dir, capsys):
    assert report.main([str(run_dir)]) == 0
    out = run_dir / "report"
    printed = capsys.readouterr().out
    assert f"report written to {out}" in printed
    for name in ("report.md", *PNGS):
        assert str(out / name) in printed
    md = _check_report_matches_summary(out, run_dir)

    # the checkpoint's masks recount the same active connections as summary.json
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    rows = _layer_rows(md)
    for name, cells in rows.items():
        assert int((ckpt["state_dict"][f"{name}.mask"] > 0).sum()) == _number(cells[1])
    assert "Checkpoint masks agree with summary.json" in md
    assert "checkpoints/last.ckpt" in md
    assert "`lam` | `2e-05`" in md  # hyper-parameters from the checkpoint


def test_the_fit_pruned_something(sparse_run):
    """Otherwise the sparse report would not test anything a dense one does not."""
    summary = json.loads((sparse_run / "summary.json").read_text())
    assert summary["active_connections"] < summary["total_connections"]


def test_dense_baseline(tmp_path, dense_run, capsys):
    run = Path(shutil.copytree(dense_run, tmp_path / "dense"))
    assert report.main([str(run)]) == 0
    md = _check_report_matches_summary(run / "report", run)
    head = _headline(md)
    assert head["sparsity"] == "0.0000"
    assert head["active_connections"] == head["total_connections"] == "50,200"
    assert head["effective_flops"] == head["dense_flops"]
    assert all(cells[3] == "0.0000" for cells in _layer_rows(md).values())
    assert "no masks (a dense model)" in md
    assert capsys.readouterr().err == ""


def test_second_report_does_not_overwrite_the_first(run_dir, capsys):
    assert report.main([str(run_dir)]) == 0
    first = _digest(run_dir / "report")
    capsys.readouterr()
    assert report.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "already exists" in printed
    assert f"report written to {run_dir / 'report-1'}" in printed
    assert _digest(run_dir / "report") == first
    assert set(_digest(run_dir / "report-1")) == set(first)
    assert not list(run_dir.glob(".report*"))  # no temporary directory left behind


def test_out_dir(run_dir, tmp_path, capsys):
    out = tmp_path / "reports" / "digits"
    assert report.main([str(run_dir), "--out", str(out)]) == 0
    assert (out / "report.md").is_file()
    assert not (run_dir / "report").exists()
    # an existing non-empty directory is kept: the report goes beside it
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert report.main([str(run_dir), "--out", str(tmp_path / "busy")]) == 0
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    assert (tmp_path / "busy-1" / "report.md").is_file()
    # an existing empty directory is used
    (tmp_path / "empty").mkdir()
    assert report.main([str(run_dir), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "report.md").is_file()


def test_channel_granularity_run_is_counted_in_connections(tmp_path):
    """`scl fit --model.granularity channel`: the masks have one entry per unit, summary.json
    and the report count connections, and the checkpoint's masks recount the same."""
    run = _fit(tmp_path, "digits_mlp.yaml", "--model.granularity=channel", "--model.mask_init=0.02")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["granularity"] == "channel"
    state = ckpt["state_dict"]
    masks = {k[: -len(".mask")]: v for k, v in state.items() if k.endswith(".mask")}
    assert all(m.shape == (state[f"{n}.weight"].shape[0], 1) for n, m in masks.items())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_connections"] == 64 * 300 + 300 * 100 + 100 * 10
    expected = sum(int((m > 0).sum()) * state[f"{n}.weight"].shape[1] for n, m in masks.items())
    assert summary["active_connections"] == expected < summary["total_connections"]
    assert report.main([str(run)]) == 0
    md = (run / "report" / "report.md").read_text()
    assert "Checkpoint masks agree with summary.json" in md
    info = report.read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert sum(layer.active for layer in info.masks.values()) == expected
    assert sum(layer.total for layer in info.masks.values()) == summary["total_connections"]


def test_layers_fall_back_to_checkpoint_masks(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    layers = summary.pop("layers")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert report.main([str(run_dir)]) == 0
    md = (run_dir / "report" / "report.md").read_text()
    assert "per-layer figures are the checkpoint's masks" in md
    rows = _layer_rows(md)
    assert list(rows) == [layer["name"] for layer in layers]
    for layer in layers:
        assert _number(rows[layer["name"]][1]) == layer["active"]
        assert rows[layer["name"]][3] == f"{layer['sparsity']:.4f}"


def test_mismatch_with_checkpoint_masks_is_reported(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["layers"][0]["active"] -= 1
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert report.main([str(run_dir)]) == 0
    md = (run_dir / "report" / "report.md").read_text()
    assert "**Mismatch**" in md and f"`{summary['layers'][0]['name']}`" in md
    assert "scl report: warning: Mismatch" in capsys.readouterr().err


def test_unreadable_checkpoint_is_a_warning(run_dir, capsys):
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"not a checkpoint")
    assert report.main([str(run_dir)]) == 0
    md = (run_dir / "report" / "report.md").read_text()
    assert "masks not cross-checked" in md
    assert "scl report: warning: cannot load checkpoint" in capsys.readouterr().err
    # and an explicitly requested checkpoint that cannot be read is an error
    assert report.main([str(run_dir), "--ckpt", str(run_dir / "checkpoints" / "last.ckpt")]) == 2


def test_run_without_checkpoint(run_dir, capsys):
    shutil.rmtree(run_dir / "checkpoints")
    assert report.main([str(run_dir)]) == 0
    _check_report_matches_summary(run_dir / "report", run_dir)
    assert "no checkpoint found" in capsys.readouterr().err


def test_failure_leaves_no_partial_report(run_dir, monkeypatch, capsys):
    def broken(run, path):
        raise OSError("disk full")

    monkeypatch.setattr(report.write, "plot_flops", broken)  # where write_report looks it up
    assert report.main([str(run_dir)]) == 2
    assert "scl report: error: cannot write the report" in capsys.readouterr().err
    assert not (run_dir / "report").exists()
    assert not list(run_dir.glob(".report*"))


# -- errors --------------------------------------------------------------------------------


def _corrupt(name: str, content: str | bytes):
    def apply(run: Path) -> Path:
        path = run / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return run

    return apply


def _remove(name: str):
    def apply(run: Path) -> Path:
        (run / name).unlink()
        return run

    return apply


ERRORS = {
    "missing run dir": (lambda run: run / "nope", "does not exist"),
    "a file, not a dir": (lambda run: run / "metrics.csv", "is not a directory"),
    "no summary.json": (_remove("summary.json"), "not a finished run directory"),
    "parent of runs": (lambda run: run.parent, "the newest run below it is"),
    "summary not JSON": (_corrupt("summary.json", '{"val_acc": 0.9,'), "corrupt"),
    "summary not object": (_corrupt("summary.json", "[1, 2]"), "not a run summary"),
    "summary bad type": (_corrupt("summary.json", '{"sparsity": "high"}'), "'sparsity'"),
    "summary NaN count": (_corrupt("summary.json", '{"seed": NaN}'), "'seed'"),
    "summary bad layers": (
        _corrupt("summary.json", '{"sparsity": 0.5, "layers": [{"name": "fc"}]}'),
        "layer entry 0",
    ),
    "summary binary": (_corrupt("summary.json", b"\xff\xfe\x00garbage"), "summary.json"),
    "no metrics.csv": (_remove("metrics.csv"), "no metrics.csv"),
    "metrics empty": (_corrupt("metrics.csv", ""), "is empty"),
    "metrics ragged": (_corrupt("metrics.csv", "epoch,step,val/acc\n0,4,0.5\n0,9\n"), "line 3"),
    "metrics not numbers": (
        _corrupt("metrics.csv", "epoch,step,val/acc\n0,4,high\n"),
        "'val/acc'",
    ),
    "metrics no step": (_corrupt("metrics.csv", "a,b\n1,2\n"), "no 'step' or 'epoch'"),
    "metrics binary": (_corrupt("metrics.csv", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"), "metrics.csv"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_exit_2(run_dir, capsys, case):
    make, message = ERRORS[case]
    target = make(run_dir)
    assert report.main([str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("scl report: error: ")
    assert message in lines[0]
    assert not list(run_dir.glob("report*")) and not list(run_dir.glob(".report*"))


def test_missing_ckpt_is_an_error(run_dir, capsys):
    assert report.main([str(run_dir), "--ckpt", str(run_dir / "nope.ckpt")]) == 2
    assert capsys.readouterr().err.startswith("scl report: error: checkpoint")


def test_usage_errors(capsys):
    assert report.main([]) == 2
    assert "scl report: error:" in capsys.readouterr().err
    assert report.main(["--help"]) == 0
    assert "usage: scl report" in capsys.readouterr().out


# -- reading metrics.csv -------------------------------------------------------------------


def test_read_metrics_as_lightning_writes_it(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,sparsity/global,step,val/acc\n"
        "0,0.1,9,\n"  # a step-level row
        "0,,9,0.5\n"  # validation at the same step
        "0,0.2,9,\n"  # the epoch-end row at the same step: the last value wins
        ",,14,\n"  # a row without an epoch (e.g. a learning-rate monitor's)
        "1,0.4,19,0.75\n"
    )
    metrics = report.read_metrics(path)
    assert metrics.x_key == "step"
    assert metrics.series("sparsity/global") == ([9.0, 19.0], [0.2, 0.4])
    assert metrics.series("val/acc") == ([9.0, 19.0], [0.5, 0.75])
    assert metrics.series("not/logged") == ([], [])
    assert metrics.epoch_ends() == {0: 9.0, 1: 19.0}
    path.write_text("epoch,val/acc\n0,0.5\n1,0.75\n")
    assert report.read_metrics(path).series("val/acc") == ([0.0, 1.0], [0.5, 0.75])


def test_scl_command_dispatches_report(run_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        scl_main(["report", str(run_dir)])
    assert exc.value.code == 0
    assert (run_dir / "report" / "report.md").is_file()
    with pytest.raises(SystemExit) as exc:
        scl_main(["report", str(run_dir / "nope")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().startswith("scl report: error:")


def test_old_import_path_warns_and_gives_the_same_objects():
    import scl_lightning.report as old

    assert old.__all__ == sorted(report.__all__)
    for name in report.__all__:
        with pytest.warns(DeprecationWarning, match=r"scl_lightning\.experiment\.report"):
            assert getattr(old, name) is getattr(report, name), name
    with pytest.warns(
        DeprecationWarning, match=r"import main from scl_lightning\.experiment\.report"
    ):
        from scl_lightning.report import main
    assert main is report.main


def test_checkpoint_masks_of_attention_are_counted_in_connections(tmp_path):
    """A channel mask on `nn.MultiheadAttention`'s `in_proj_weight` (no `weight` key)."""
    from torch import nn

    from scl_lightning import sparsify

    net = sparsify(nn.Sequential(nn.MultiheadAttention(8, 2)), granularity="channel")
    with torch.no_grad():
        net[0].mask[:5] = -1.0  # 5 of the 24 q/k/v units off
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": net.state_dict()}, path)
    info = report.read_checkpoint(path)
    assert (info.masks["0"].active, info.masks["0"].total) == (19 * 8, 24 * 8)
    assert info.masks["0"].shape == (24, 8)
    assert (info.masks["0.out_proj"].active, info.masks["0.out_proj"].total) == (64, 64)
