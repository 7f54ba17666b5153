"""export_model(): every format writes, reports, loads back and predicts as the masked model."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from _helpers import pruned_net as _net
from scl_lightning import sparsify
from scl_lightning.deploy.formats import (
    FORMATS,
    SUFFIXES,
    SparseLinear,
    export_model,
    load_export,
    sparsify_linears,
)
from scl_lightning.models import create_model

pytest.importorskip("onnxruntime")  # the deploy extra; `make test` installs it


@pytest.fixture(scope="module")
def lenet5():
    return _net("lenet5", (1, 28, 28), keep=0.05)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reproduces_the_masked_model(tmp_path, lenet5, fmt):
    x = torch.randn(32, 1, 28, 28)
    report = export_model(lenet5, tmp_path / f"net{SUFFIXES[fmt]}", fmt, x[:4])
    assert report.path.is_file() and report.bytes_after == report.path.stat().st_size
    template = create_model("lenet5", input_shape=(1, 28, 28)) if fmt == "dense" else None
    loaded = load_export(report.path, model=template)
    with torch.no_grad():
        want, got = lenet5(x), loaded(x)
    assert torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if fmt == "dense":
        assert report.params_after == report.params_before
    else:
        assert report.params_after < report.params_before / 2
        assert report.flops_after < report.flops_before
        assert report.bytes_after < report.bytes_before / 2
    assert str(report.path) in report.summary()
    # no temporary file is left next to the export
    assert [p.name for p in tmp_path.iterdir()] == [report.path.name]


def test_sparse_chooses_csr_by_measurement_and_computes_the_same():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.9] = 0
    model = nn.Sequential(layer)
    x = torch.randn(5, 64)
    want = model(x)
    model, notes = sparsify_linears(model, batch_size=8, repeats=3)
    (note,) = notes
    assert re.match(r"0: density 0\.\d{3}, batch 8: dense \d+ us, CSR \d+ us -> ", note)
    chosen = "CSR" if isinstance(model[0], SparseLinear) else "dense"
    assert note.endswith(f"-> {chosen}")
    torch.testing.assert_close(SparseLinear(layer)(x), want)


def test_sparse_keeps_the_input_selection_of_a_first_layer():
    from scl_lightning.deploy.compact import LinearOnSelectedInputs

    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    layer.__class__ = LinearOnSelectedInputs
    layer.register_buffer("inputs", torch.tensor([0, 2, 5, 7, 8, 9]))
    x = torch.randn(3, 10)
    torch.testing.assert_close(SparseLinear(layer)(x), layer(x))
    model, notes = sparsify_linears(nn.Sequential(layer), batch_size=4, repeats=2)
    assert len(notes) == 1  # measured, like a plain Linear
    torch.testing.assert_close(model(x), layer(x))


def test_an_existing_file_is_never_overwritten(tmp_path, lenet5):
    out = tmp_path / "net.pt2"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        export_model(lenet5, out, "compact", torch.randn(2, 1, 28, 28))
    assert out.read_bytes() == b"precious"
    export_model(lenet5, out, "compact", torch.randn(2, 1, 28, 28), overwrite=True)
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"format": "tflite", "path": "x.tflite"}, "unknown format 'tflite'; choose one of"),
        ({"format": "onnx", "path": "x.pt2"}, "a onnx export is a .onnx file"),
        ({"format": "sparse", "path": "x.pt"}, "a sparse export is a .pt2 file"),
        ({"format": "compact", "path": "x.pt2", "plain": True}, "has no masked layer"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, lenet5, kwargs, match):
    model = create_model("lenet5", input_shape=(1, 28, 28)) if kwargs.pop("plain", 0) else lenet5
    path = tmp_path / kwargs.pop("path")
    with pytest.raises(ValueError, match=match):
        export_model(model, path, example_input=torch.randn(2, 1, 28, 28), **kwargs)
    assert not path.exists()


def test_dense_export_needs_the_architecture_to_load(tmp_path):
    model = sparsify(nn.Sequential(nn.Linear(4, 2)))
    report = export_model(model, tmp_path / "d.safetensors", "dense", torch.randn(2, 4))
    with pytest.raises(ValueError, match="pass model="):
        load_export(report.path)
