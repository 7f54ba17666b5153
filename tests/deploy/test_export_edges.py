"""export_model() and ``scl export`` at their edges: a batch of one, float64, the loaded
program's mode, a report where compaction adds parameters, the CLI's example input."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from _helpers import pruned_net
from scl_lightning.deploy import formats
from scl_lightning.deploy.formats import (
    ExportedModule,
    ExportReport,
    SparseLinear,
    export_model,
    load_export,
)
from scl_lightning.experiment import export_cli

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def mlp():
    return pruned_net("lenet_300_100", SHAPE, keep=0.1)


def _csr_always_faster(fn: functools.partial, repeats: int) -> float:
    """``_best_time`` that runs ``fn`` once and times every CSR layer as faster: the sparse
    format then stores every ``Linear`` in CSR, whatever this machine measures."""
    with torch.inference_mode():
        fn()
    return 0.0 if isinstance(fn.func, SparseLinear) else 1.0


@pytest.mark.parametrize("fmt", ["compact", "sparse"])
def test_a_batch_of_one_exports_with_a_dynamic_batch(tmp_path, mlp, fmt):
    x = torch.randn(7, *SHAPE)
    report = export_model(mlp, tmp_path / "net.pt2", fmt, example_input=x[:1])
    loaded = load_export(report.path)
    with torch.no_grad():
        for batch in (x[:1], x):
            torch.testing.assert_close(loaded(batch), mlp(batch), rtol=1e-4, atol=1e-5)


def test_a_float64_network_exports_sparse_in_csr(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    model = pruned_net("lenet_300_100", SHAPE, keep=0.1).double()
    x = torch.randn(5, *SHAPE, dtype=torch.float64)
    report = export_model(model, tmp_path / "net.pt2", "sparse", example_input=x[:2])
    assert any(note.endswith("-> CSR") for note in report.notes), report.notes
    assert not any("kept dense" in note for note in report.notes), report.notes
    with torch.no_grad():
        got = load_export(report.path)(x)
        want = model(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


def test_a_loaded_program_is_in_eval_mode(tmp_path, mlp):
    x = torch.randn(3, *SHAPE)
    loaded = load_export(export_model(mlp, tmp_path / "net.pt2", "compact", x).path)
    assert isinstance(loaded, ExportedModule)
    assert not loaded.training
    assert not any(module.training for module in loaded.modules())
    assert loaded.eval() is loaded and loaded.train(False) is loaded
    with pytest.raises(NotImplementedError, match=r"eval mode only; to train, load"):
        loaded.train()
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), mlp(x), rtol=1e-4, atol=1e-5)


def _report(params_after: int, bytes_after: int, flops_after: int) -> ExportReport:
    return ExportReport(
        "compact", Path("net.pt2"), 100, params_after, 1000, bytes_after, 50, flops_after
    )


def test_the_summary_says_larger_when_the_export_grew():
    lines = _report(120, 400, 50).summary().splitlines()
    params, size, flops = lines[1], lines[2], lines[3]
    assert params.endswith("(1.2x larger)") and "smaller" not in params
    assert size.endswith("(2.5x smaller)")
    assert flops.endswith("(unchanged)") and "smaller" not in flops


def test_scl_export_checks_on_random_inputs_not_zeros(tmp_path, mlp, monkeypatch, capsys):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")  # load_trained is replaced: the file is only found
    monkeypatch.setattr(export_cli, "load_trained", lambda path: (mlp, SHAPE))
    seen: list[torch.Tensor] = []

    def spy(model, path, format, example_input, **kwargs):
        seen.append(example_input)
        return export_model(model, path, format, example_input, **kwargs)

    monkeypatch.setattr(export_cli, "export_model", spy)
    assert export_cli.main([str(ckpt), "--format", "onnx", "--batch-size", "8"]) == 0
    (example,) = seen
    assert example.shape[1:] == SHAPE and len(example) >= 2
    assert example.ne(0).float().mean() > 0.99 and 0.5 < float(example.std()) < 1.5
    assert "onnx ->" in capsys.readouterr().out
