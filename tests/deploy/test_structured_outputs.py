"""export_model() on networks whose output is a structure of tensors: a dict, a dataclass, an
imitation of Hugging Face's ``ModelOutput``, a namedtuple, a tuple, nested. Every format either
reproduces the masked network leaf by leaf, or refuses in one line, before writing anything,
and says what to do instead."""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from scl_lightning import sparsify
from scl_lightning.deploy import export_model, load_export, select_output
from scl_lightning.deploy.formats import SUFFIXES
from scl_lightning.nn.flops import flop_counts_or_none
from scl_lightning.nn.outputs import named_outputs

pytest.importorskip("onnxruntime")  # the deploy extra; `make test` installs it


class FakeModelOutput(OrderedDict):
    """What ``transformers.utils.ModelOutput`` is: a dataclass that is also an OrderedDict of
    its non-None fields, each subclass registered as a pytree node with a serialized name."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            lambda out: (list(out.values()), list(out.keys())),
            lambda values, keys: cls(**dict(zip(keys, values, strict=True))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


@dataclasses.dataclass
class ClassifierOutput(FakeModelOutput):
    logits: Tensor | None = None
    probs: Tensor | None = None
    loss: Tensor | None = None  # None: left out, as ModelOutput leaves it out


@dataclasses.dataclass
class Plain:
    logits: Tensor
    probs: Tensor


@dataclasses.dataclass
class Registered:
    logits: Tensor
    probs: Tensor


torch.export.register_dataclass(
    Registered, serialized_type_name=f"{__name__}.{Registered.__qualname__}"
)

Pair = namedtuple("Pair", ["logits", "probs"])


class Cache:
    """An object holding tensors that no tracer sees into (a transformers cache, say)."""

    def __init__(self, state: Tensor) -> None:
        self.state = state


class Net(nn.Module):
    """6 -> 16 -> 8 -> 3 MLP; ``kind`` picks the structure its output comes in."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Any:
        if self.kind == "fx_untraceable" and x.dim() != 2:  # torch.fx cannot branch on this
            raise ValueError("expected a batch of vectors")
        h = torch.relu(self.b(torch.relu(self.a(x))))
        y = self.c(h)
        p = y.softmax(-1)
        if self.kind in ("dict", "fx_untraceable"):
            return {"logits": y, "probs": p}
        if self.kind == "model_output":
            return ClassifierOutput(logits=y, probs=p)
        if self.kind == "dataclass":
            return Plain(y, p)
        if self.kind == "registered_dataclass":
            return Registered(y, p)
        if self.kind == "namedtuple":
            return Pair(y, p)
        if self.kind == "tuple":
            return y, p
        if self.kind == "nested":
            return {"out": {"logits": y}, "aux": [p, y.sum(-1)]}
        if self.kind == "nested_namedtuple":
            return {"heads": Pair(y, p), "score": y.sum(-1)}
        if self.kind == "cache":
            return {"logits": y, "cache": Cache(h)}
        raise AssertionError(self.kind)


def _pruned(kind: str) -> Net:
    torch.manual_seed(0)
    model = sparsify(Net(kind))
    with torch.no_grad():
        model.a.mask[:6] = -1.0  # six hidden units computed from nothing: compact removes them
        model.b.mask[:, 10:] = -1.0  # and six more that nothing reads
        model.c.mask[0, :2] = -1.0
    return model.eval()


#: (kind, format) -> the refusal's message, for what a format cannot store
REFUSED = {
    ("dataclass", "compact"): r"output is a Plain \(a dataclass\), which torch\.export saves "
    r"only when registered: call torch\.export\.register_dataclass\(Plain, serialized_type_name="
    r"'.*\.Plain'\) where the model is exported and where it is loaded, or export one output "
    r"with scl_lightning\.deploy\.select_output\(model, 'logits'\), or use 'onnx'",
    ("namedtuple", "compact"): r"output is a Pair \(a namedtuple\), whose structure "
    r"torch\.export cannot save; export one output with "
    r"scl_lightning\.deploy\.select_output\(model, 'logits'\), or use 'onnx' \(outputs "
    r"flattened and named\) or 'dense'",
    ("nested_namedtuple", "compact"): r"^export: compact: Net's output holds a Pair \(a "
    r"namedtuple\) at 'heads', whose structure torch\.export cannot save; export one output "
    r"with scl_lightning\.deploy\.select_output\(model, 'heads\.logits'\), or use 'onnx'",
    ("cache", "compact"): r"export: compact: Net's output holds a Cache at 'cache', and "
    r"torch\.export cannot save it; export one output with "
    r"scl_lightning\.deploy\.select_output\(model, 'logits'\), or the whole network as 'dense'",
    ("cache", "onnx"): r"export: onnx: Net's output holds a Cache at 'cache', and ONNX outputs "
    r"are tensors; export one output with scl_lightning\.deploy\.select_output\(model, "
    r"'logits'\), or the whole network as 'dense'",
}
# sparse is compact saved the same way: the same refusals
REFUSED.update({(k, "sparse"): m.replace("compact", "sparse") for (k, f), m in REFUSED.items()})

KINDS = [
    "dict",
    "model_output",
    "dataclass",
    "registered_dataclass",
    "namedtuple",
    "tuple",
    "nested",
    "nested_namedtuple",
]


def _leaves_match(got: Any, want: Any, same_names: bool) -> None:
    got_leaves, want_leaves = named_outputs(got), named_outputs(want)
    assert len(got_leaves) == len(want_leaves) > 0
    if same_names:
        assert [n for n, _ in got_leaves] == [n for n, _ in want_leaves]
    for (_, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["dense", "compact", "sparse", "onnx"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_format_round_trips_or_refuses_in_one_line(tmp_path, kind, fmt):
    model = _pruned(kind)
    path = tmp_path / f"net{SUFFIXES[fmt]}"
    x = torch.randn(5, 6)
    if (kind, fmt) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[(kind, fmt)]) as caught:
            export_model(model, path, fmt, x[:2], batch_size=8)
        assert "\n" not in str(caught.value)
        assert list(tmp_path.iterdir()) == []  # refused before anything was written
        return
    with warnings.catch_warnings():
        # these networks trace for FLOPs: no warning
        warnings.filterwarnings("error", message=".*FLOPs not counted")
        report = export_model(model, path, fmt, x[:2], batch_size=8)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert report.flops_before is not None and report.flops_after is not None
    assert "FLOPs: unknown" not in report.summary()
    loaded = load_export(path, model=Net(kind) if fmt == "dense" else None)
    with torch.no_grad():
        want, got = model(x), loaded(x)  # another batch size than the example's
    if fmt == "dense":
        assert type(got) is type(want)
    if fmt == "onnx":  # flat, named by path
        assert isinstance(got, dict)
        names = [n for n, _ in named_outputs(want)]
        assert list(got) == [f"output.{n}" if n[0].isdigit() else n for n in names]
    _leaves_match(got, want, same_names=fmt != "onnx")
    if fmt != "dense":
        assert report.params_after < report.params_before  # it was compacted


def test_without_a_torch_fx_graph_compact_names_what_works(tmp_path):
    """(``sparse`` falls back to the uncompacted network: tests/deploy/test_export_third_party)"""
    with pytest.raises(
        ValueError,
        match=r"^compact: torch\.fx cannot trace Net \(TraceError: .*\); export it as 'dense' "
        r"\(the weights, for the never-masked architecture\), or as 'sparse' or 'onnx' \(the "
        r"network uncompacted\)$",
    ):
        export_model(_pruned("fx_untraceable"), tmp_path / "n.pt2", "compact", torch.randn(2, 6))
    assert list(tmp_path.iterdir()) == []


def test_without_a_torch_fx_graph_onnx_holds_the_uncompacted_network(tmp_path):
    model = _pruned("fx_untraceable")
    report = export_model(model, tmp_path / "n.onnx", "onnx", torch.randn(2, 6))
    assert report.notes[0].startswith("not compacted: torch.fx cannot trace Net (TraceError: ")
    assert report.compact is None and report.params_after == report.params_before
    x = torch.randn(7, 6)
    with torch.no_grad():
        _leaves_match(load_export(report.path)(x), model(x), same_names=True)


def test_a_model_output_keeps_its_keys_through_compact(tmp_path):
    model = _pruned("model_output")
    export_model(model, tmp_path / "net.pt2", "compact", torch.randn(2, 6))
    with torch.no_grad():
        got = load_export(tmp_path / "net.pt2")(torch.randn(3, 6))
    assert list(got) == ["logits", "probs"]  # a dict: index it by key, as a ModelOutput
    assert got["logits"].shape == (3, 3)


@pytest.mark.parametrize(
    "kind,key",
    [("dataclass", "logits"), ("namedtuple", 1), ("cache", "logits"), ("nested", "aux.0")],
)
@pytest.mark.parametrize("fmt", ["compact", "onnx"])
def test_select_output_exports_one_tensor_of_any_output(tmp_path, kind, key, fmt):
    """What the refusals offer works: one tensor of any output, compacted."""
    model = _pruned(kind)
    wrapped = select_output(model, key)
    path = tmp_path / f"net{SUFFIXES[fmt]}"
    report = export_model(wrapped, path, fmt, torch.randn(2, 6))
    x = torch.randn(4, 6)
    with torch.no_grad():
        out = model(x)
        want = out[key] if isinstance(key, int) else dict(named_outputs(out))[key]
        got = load_export(path)(x)
    assert isinstance(got, Tensor)  # the one output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert report.params_after < report.params_before


def test_select_output_names_what_there_is():
    wrapped = select_output(_pruned("nested"), "logits")
    with pytest.raises(
        ValueError,
        match=r"^select_output: Net returns no output named 'logits'; "
        r"its outputs are 'out\.logits', 'aux\.0', 'aux\.1'$",
    ):
        wrapped(torch.randn(2, 6))
    assert select_output(_pruned("nested"), "aux.1")(torch.ones(1, 6)).shape == (1,)
    with pytest.raises(TypeError, match="key must be an output's name"):
        select_output(nn.Linear(2, 2), 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        select_output(lambda x: x, "y")  # type: ignore[arg-type]


def test_a_wrong_key_is_one_line_before_any_file(tmp_path):
    wrapped = select_output(_pruned("dict"), "logit")
    with pytest.raises(ValueError, match=r"no output named 'logit'; its outputs are 'logits', "):
        export_model(wrapped, tmp_path / "net.onnx", "onnx", torch.randn(2, 6))
    assert list(tmp_path.iterdir()) == []


def test_an_example_the_network_rejects_is_one_line(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"export: Net fails on the example input of shape "
        r"\(2, 5\) \(RuntimeError: .*\); pass a batch it accepts",
    ):
        export_model(_pruned("dict"), tmp_path / "n.safetensors", "dense", torch.randn(2, 5))
    assert list(tmp_path.iterdir()) == []


def test_flops_never_block_a_dense_export(tmp_path):
    """fvcore cannot see into the cache object: the dense export is written all the same, with
    one warning, and reports the FLOPs as unknown."""
    model = _pruned("cache")
    path = tmp_path / "net.safetensors"
    with pytest.warns(UserWarning) as record:
        report = export_model(model, path, "dense", torch.randn(2, 6))
    messages = [str(w.message) for w in record if "FLOPs" in str(w.message)]
    assert messages == [
        "export: FLOPs not counted: fvcore cannot trace Net (TypeError: the output holds a "
        "value of type Cache at 'cache', which FLOPs tracing cannot see into (register it with "
        "torch.utils._pytree to flatten it)); FLOPs are reported as unknown"
    ]
    assert report.flops_before is None and report.flops_after is None
    assert "  FLOPs: unknown (fvcore cannot trace the network; see the warning)" in (
        report.summary().splitlines()
    )
    loaded = load_export(path, model=Net("cache"))
    x = torch.randn(3, 6)
    with torch.no_grad():
        _leaves_match(loaded(x)["logits"], model(x)["logits"], same_names=True)


def test_flops_of_structured_outputs_are_those_of_the_tensor_network():
    """Flattening the output for the trace counts the same multiply-adds as a network that
    returns the logits alone."""
    x = torch.randn(1, 6)
    plain = select_output(Net("dict"), "logits")
    want = flop_counts_or_none(plain, x, "test")
    assert want is not None and want.total == 6 * 16 + 16 * 8 + 8 * 3
    for kind in KINDS:
        counts = flop_counts_or_none(Net(kind), x, "test")
        assert counts is not None and counts.total == want.total, kind
        assert counts.layers == {"a": 96, "b": 128, "c": 24}


def test_flops_warn_once_per_model_and_shape():
    model = Net("cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert flop_counts_or_none(model, torch.randn(2, 6), "me") is None
        assert flop_counts_or_none(model, torch.randn(4, 6), "me") is None  # same sample shape
    assert len(caught) == 1 and str(caught[0].message).startswith("me: FLOPs not counted")


def test_named_outputs_names_every_tensor_by_its_path():
    y, p = torch.zeros(1), torch.ones(1)
    cases = {
        "dict": ["logits", "probs"],
        "model_output": ["logits", "probs"],  # the None field is left out
        "dataclass": ["logits", "probs"],
        "registered_dataclass": ["logits", "probs"],
        "namedtuple": ["logits", "probs"],
        "tuple": ["0", "1"],
        "nested": ["out.logits", "aux.0", "aux.1"],
        "nested_namedtuple": ["heads.logits", "heads.probs", "score"],
    }
    for kind, names in cases.items():
        net = Net(kind)
        assert [n for n, _ in named_outputs(net(torch.randn(2, 6)))] == names, kind
    assert named_outputs(y) == [("", y)]
    assert named_outputs({"a": (y, None), "b": 3}) == [("a.0", y), ("b", 3)]
    assert [n for n, _ in named_outputs(Pair(y, {"k": p}))] == ["logits", "probs.k"]


def test_a_failing_onnx_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", fails)
    with pytest.raises(
        ValueError, match=r"^export: onnx: torch.onnx.export failed on .*aten::weird.*not written"
    ) as err:
        export_model(_pruned("tuple"), tmp_path / "net.onnx", "onnx", torch.randn(2, 6))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_onnx_names_of_paths_that_read_alike_are_distinct(tmp_path):
    class Dotted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            y = self.fc(x)
            return {"a.b": y, "a": {"b": 2 * y}}

    model = sparsify(Dotted()).eval()
    export_model(model, tmp_path / "net.onnx", "onnx", torch.randn(2, 6))
    x = torch.randn(3, 6)
    got = load_export(tmp_path / "net.onnx")(x)
    assert list(got) == ["a.b", "a.b~2"]
    with torch.no_grad():
        torch.testing.assert_close(got["a.b~2"], 2 * model.fc(x), rtol=1e-4, atol=1e-5)
