"""export_model() on networks written the way other people's code is written: a GPT-2-like
model returning a cache object beside its logits, an attention-pooling head fvcore cannot count,
loops and ``torch.cond`` that torch.fx cannot trace, a compiled module, attention code reading
a layer's ``weight``. Each format exports, or fails for a reason of its own in one line: never
because FLOPs could not be counted, because the network was compiled, or because compaction
was impossible where the format can do without it (issue 23, item 3)."""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scl_lightning import sparsify
from scl_lightning.deploy import (
    compact,
    export_model,
    formats,
    load_export,
    load_pruned,
    save_pruned,
)
from scl_lightning.deploy.compact import LinearOnSelectedInputs
from scl_lightning.deploy.export import uncompiled
from scl_lightning.deploy.formats import (
    FORMATS,
    SUFFIXES,
    SparseLinear,
    select_output,
    sparsify_linears,
)
from scl_lightning.nn.outputs import named_outputs
from scl_lightning.nn.sparsify import export_pruned

pytest.importorskip("onnxruntime")  # the deploy extra; `make test` installs it

FLOPS_UNKNOWN = "  FLOPs: unknown (fvcore cannot trace the network; see the warning)"


# --- architectures ---------------------------------------------------------------------------


class KVCache:
    """What ``transformers``' ``DynamicCache`` is to a tracer: an object holding tensors."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []


class GPTBlock(nn.Module):
    """GPT-2's block: pre-norm causal self-attention (one fused ``c_attn``), then an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor, cache: KVCache) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=-1)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        cache.keys.append(k)
        cache.values.append(v)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(n, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-like decoder on embedded tokens ``(N, T, C)``: returns the logits and the
    key/value cache, as ``GPT2LMHeadModel`` returns ``past_key_values``."""

    def __init__(self, width: int = 8, vocab: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([GPTBlock(width, heads=2) for _ in range(2)])
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, x: Tensor) -> dict[str, Any]:
        cache = KVCache()
        for block in self.blocks:
            x = block(x, cache)
        return {"logits": self.lm_head(self.ln_f(x)), "past_key_values": cache}


class AttentionPool(nn.Module):
    """Token features pooled by a learned query *vector* (``h @ self.query``): fvcore's matmul
    counter cannot take a 1-d operand, so FLOPs cannot be counted; everything else can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.query = nn.Parameter(torch.randn(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))  # (N, T, 16)
        weights = torch.softmax(h @ self.query, dim=-1)  # (N, T)
        return self.head((weights.unsqueeze(-1) * h).sum(1))


class StepRNN(nn.Module):
    """A recurrent cell unrolled over the time steps of ``(N, T, C)``: ``range(x.shape[1])``
    stops torch.fx (a Proxy is not an int); torch.export and torch.jit unroll it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.rec = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.head(h)


class CondNet(nn.Module):
    """A branch on the data written with ``torch.cond``: torch.export takes it, torch.fx and
    torch.jit (so fvcore and ONNX) do not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return torch.cond(h.sum() > 0, lambda y: self.b(y), lambda y: -self.b(y), (h,))


class Branchy(nn.Module):
    """Python control flow on the data: only the torch.jit trace (ONNX) follows it, along the
    path the example takes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ReadsWeights(nn.Module):
    """Attention-style code that reads layers' weights outside their forward: ``proj`` is
    applied with ``F.linear`` on its weight, ``head``'s weight gives the dtype to cast to."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        h = torch.relu(F.linear(h, self.proj.weight, self.proj.bias))
        return self.head(h.to(self.head.weight.dtype))


# --- helpers ---------------------------------------------------------------------------------


def _pruned(cls: type[nn.Module], seed: int = 0, keep: float = 0.4) -> nn.Module:
    """A ``cls()`` sparsified, each masked layer keeping about ``keep`` of its connections;
    the same network for the same ``seed``."""
    torch.manual_seed(seed)
    model = sparsify(cls())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            mask = getattr(module, "mask", None)
            if isinstance(mask, Tensor):
                mask[torch.rand(mask.shape, generator=generator) > keep] = -1.0
    return model.eval()


def _csr_always_faster(fn: functools.partial, repeats: int) -> float:
    return 0.5 if isinstance(fn.func, SparseLinear) else 1.0


def _export(model: nn.Module, tmp_path, fmt: str, example: Tensor, name: str = "net"):
    """``export_model`` with every warning it gives, as ``(report, [messages])``."""
    path = tmp_path / f"{name}{SUFFIXES[fmt]}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_model(model, path, fmt, example, batch_size=8)
    messages = [str(w.message) for w in caught if str(w.message).startswith("export")]
    return report, messages


def _loaded(report, template: nn.Module | None = None) -> nn.Module:
    return load_export(report.path, model=template)


def _calls_csr(loaded: nn.Module) -> bool:
    """Whether a loaded program (or one of its subgraphs: a ``torch.cond`` branch) calls the
    CSR op."""
    return any(
        "csr_linear" in str(m.graph)
        for m in loaded.modules()
        if isinstance(m, torch.fx.GraphModule)
    )


def _same(got: Any, want: Any, exact: bool = False) -> None:
    got_leaves = [t for _, t in named_outputs(got)]
    want_leaves = [t for _, t in named_outputs(want)]
    assert len(got_leaves) == len(want_leaves) > 0
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if exact:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# --- 1. FLOPs never block an export ----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_flops_fvcore_cannot_count_never_block_any_format(tmp_path, fmt):
    """fvcore fails on ``h @ query``: every format is written, with one warning about the
    FLOPs, and the report reads ``FLOPs: unknown``."""
    model = _pruned(AttentionPool)
    report, messages = _export(model, tmp_path, fmt, torch.randn(2, 5, 8))
    flops = [m for m in messages if "FLOPs" in m]
    assert flops == [
        "export: FLOPs not counted: fvcore cannot trace AttentionPool (IndexError: list index "
        "out of range); FLOPs are reported as unknown"
    ]
    assert report.flops_before is None and report.flops_after is None
    assert FLOPS_UNKNOWN in report.summary().splitlines()
    x = torch.randn(4, 5, 8)  # another batch; the token count the programs were traced for
    template = AttentionPool() if fmt == "dense" else None
    with torch.no_grad():
        _same(_loaded(report, template)(x), model(x))


@pytest.mark.parametrize("fmt", ["compact", "sparse", "onnx"])
def test_flops_that_fail_after_compaction_never_block(tmp_path, monkeypatch, fmt):
    """Counted on the dense network, not on the exported one: the export is written, with one
    warning, and the report reads ``FLOPs: unknown``."""
    import scl_lightning.nn.flops as flops_module

    real = flops_module.flop_counts
    calls = []

    def first_only(model: nn.Module, example: Tensor):
        calls.append(type(model).__name__)
        if len(calls) > 1:
            raise RuntimeError("the compacted network trips the tracer")
        return real(model, example)

    monkeypatch.setattr(flops_module, "flop_counts", first_only)
    model = _pruned(Mlp)
    report, messages = _export(model, tmp_path, fmt, torch.randn(2, 6))
    assert len(calls) == 2
    assert [m for m in messages if "FLOPs" in m] == [
        "export: FLOPs not counted: fvcore cannot trace Mlp (RuntimeError: the compacted "
        "network trips the tracer); FLOPs are reported as unknown"
    ]
    assert report.flops_before is not None and report.flops_after is None
    assert FLOPS_UNKNOWN in report.summary().splitlines()
    x = torch.randn(3, 6)
    with torch.no_grad():
        _same(_loaded(report)(x), model(x))


def test_a_gpt_returning_its_cache_exports_dense_with_flops_unknown(tmp_path):
    model = _pruned(TinyGPT)
    report, messages = _export(model, tmp_path, "dense", torch.randn(2, 4, 8))
    assert messages == [
        "export: FLOPs not counted: fvcore cannot trace TinyGPT (TypeError: the output holds a "
        "value of type KVCache at 'past_key_values', which FLOPs tracing cannot see into "
        "(register it with torch.utils._pytree to flatten it)); FLOPs are reported as unknown"
    ]
    assert FLOPS_UNKNOWN in report.summary().splitlines()
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        _same(_loaded(report, TinyGPT())(x)["logits"], model(x)["logits"])


@pytest.mark.parametrize("fmt", ["compact", "sparse", "onnx"])
def test_a_gpt_returning_its_cache_names_select_output(tmp_path, fmt):
    """The cache cannot be stored by a traced format: the existing one-line refusal, not a
    FLOPs error, and nothing written; ``select_output`` then exports the logits."""
    model = _pruned(TinyGPT)
    path = tmp_path / f"net{SUFFIXES[fmt]}"
    with pytest.raises(ValueError, match=r"select_output\(model, 'logits'\)") as caught:
        export_model(model, path, fmt, torch.randn(2, 4, 8))
    assert "\n" not in str(caught.value) and "KVCache at 'past_key_values'" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    logits = select_output(model, "logits")
    report, _ = _export(logits, tmp_path, fmt, torch.randn(2, 4, 8))
    x = torch.randn(3, 4, 8)  # the sequence length the ONNX graph's attention was traced for
    with torch.no_grad():
        _same(_loaded(report)(x), model(x)["logits"])


# --- 2. compiled modules ---------------------------------------------------------------------


def _plain_and_compiled(tmp_path, monkeypatch, fmt: str, compile_part: bool):
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)  # the same choice twice
    plain = _pruned(Mlp)
    compiled_net = _pruned(Mlp)  # the same weights and masks
    if compile_part:
        compiled_net.body = torch.compile(compiled_net.body, backend="eager")
        compiled: nn.Module = compiled_net
    else:
        compiled = torch.compile(compiled_net, backend="eager")
    example = torch.randn(2, 6)
    want, _ = _export(plain, tmp_path, fmt, example, name="plain")
    got, _ = _export(compiled, tmp_path, fmt, example, name="compiled")
    return plain, compiled, want, got


@pytest.mark.parametrize("compile_part", [False, True], ids=["whole", "submodule"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_compiled_model_exports_as_the_plain_one(tmp_path, monkeypatch, fmt, compile_part):
    plain, compiled, want, got = _plain_and_compiled(tmp_path, monkeypatch, fmt, compile_part)
    for field in ("params_before", "params_after", "bytes_before", "flops_before", "flops_after"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.notes == want.notes
    x = torch.randn(5, 6)
    if fmt == "dense":
        (tensors, meta), (expected, expected_meta) = load_pruned(got.path), load_pruned(want.path)
        assert sorted(tensors) == sorted(expected)  # no '_orig_mod.' in the keys
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
        assert meta["network"] == expected_meta["network"] == "Mlp"
        with torch.no_grad():
            _same(_loaded(got, Mlp())(x), _loaded(want, Mlp())(x), exact=True)
    else:
        with torch.no_grad():
            _same(_loaded(got)(x), _loaded(want)(x), exact=True)
    if compile_part:  # the compiled submodule is the user's again
        assert type(compiled.body).__name__ == "OptimizedModule"
    with torch.no_grad():
        _same(compiled(x), plain(x))


def test_compiled_models_everywhere_in_deploy(tmp_path, monkeypatch):
    """save_pruned, load_export and sparsify_linears take a compiled module as the one it
    wraps."""
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    model = _pruned(Mlp)
    compiled = torch.compile(model, backend="eager")
    save_pruned(compiled, tmp_path / "c.safetensors")
    save_pruned(model, tmp_path / "p.safetensors")
    (got, meta), (want, _) = (
        load_pruned(tmp_path / "c.safetensors"),
        load_pruned(tmp_path / "p.safetensors"),
    )
    assert list(got) == list(want) and meta["network"] == "Mlp"
    target = torch.compile(Mlp(), backend="eager")
    loaded = load_export(tmp_path / "c.safetensors", model=target)
    assert loaded is target
    x = torch.randn(3, 6)
    with torch.no_grad():
        _same(loaded(x), model(x))
    dense = torch.compile(Mlp(), backend="eager")
    result, notes = sparsify_linears(dense, batch_size=4, example=x)
    assert type(result) is Mlp and type(result.head) is SparseLinear
    assert [n.split(":")[0] for n in notes] == ["body.0", "body.2", "head"]


def test_uncompiled_restores_what_it_unwrapped():
    net = Mlp()
    inner = net.body
    net.body = torch.compile(net.body, backend="eager")
    wrapper = net.body
    with uncompiled(torch.compile(net, backend="eager")) as plain:
        assert plain is net and net.body is inner
        assert "body.0.weight" in plain.state_dict()
    assert net.body is wrapper


# --- 3. the sparse format without compaction -------------------------------------------------


def test_sparse_exports_what_torch_fx_cannot_trace_uncompacted(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    model = _pruned(StepRNN)
    report, messages = _export(model, tmp_path, "sparse", torch.randn(2, 5, 6))
    assert len(messages) == 1 and messages[0].startswith(
        "export: sparse: not compacted: torch.fx cannot trace StepRNN ("
    )
    assert messages[0].endswith("; the pruned network is exported uncompacted")
    assert report.compact is None
    assert report.params_after < report.params_before  # the CSR layers store their nnz only
    assert report.notes[0].startswith("not compacted: torch.fx cannot trace StepRNN (")
    assert "  note: not compacted: torch.fx cannot trace StepRNN (" in report.summary()
    assert [n for n in report.notes if n.endswith("-> CSR")]  # CSR on the uncompacted layers
    assert report.flops_before is not None and report.flops_after < report.flops_before
    loaded = _loaded(report)
    assert _calls_csr(loaded)
    x = torch.randn(7, 5, 6)
    with torch.no_grad():
        _same(loaded(x), model(x))


def test_compact_of_what_torch_fx_cannot_trace_names_what_works(tmp_path):
    model = _pruned(StepRNN)
    with pytest.raises(ValueError) as caught:
        export_model(model, tmp_path / "net.pt2", "compact", torch.randn(2, 5, 6))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("compact: torch.fx cannot trace StepRNN (")
    assert message.endswith(
        "; export it as 'dense' (the weights, for the never-masked architecture), or as "
        "'sparse' or 'onnx' (the network uncompacted)"
    )
    assert list(tmp_path.iterdir()) == []
    # what it names works
    for fmt in ("dense", "sparse", "onnx"):
        report, _ = _export(model, tmp_path, fmt, torch.randn(2, 5, 6))
        x = torch.randn(3, 5, 6)
        with torch.no_grad():
            _same(_loaded(report, StepRNN() if fmt == "dense" else None)(x), model(x))


def test_torch_cond_fails_only_where_the_format_cannot_take_it(tmp_path, monkeypatch):
    """torch.fx and torch.jit refuse ``torch.cond``: FLOPs are unknown and compaction is
    skipped (one warning each); dense and sparse are written; compact and onnx refuse in one
    line for reasons of their own."""
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    model = _pruned(CondNet)
    x = torch.randn(2, 8)
    report, messages = _export(model, tmp_path, "sparse", x)
    assert [m.split(" (")[0] for m in messages] == [
        "export: FLOPs not counted: fvcore cannot trace CondNet",
        "export: sparse: not compacted: torch.fx cannot trace CondNet",
    ]
    assert FLOPS_UNKNOWN in report.summary().splitlines()
    loaded = _loaded(report)
    assert _calls_csr(loaded)  # inside the branches
    # the pruned network as reference: masked layers do not run inside torch.cond in eager
    # mode under no_grad (dynamo refuses their torch.is_inference_mode_enabled check)
    pruned = export_pruned(model)
    for batch in (torch.randn(5, 8), -torch.rand(5, 8) * 100):  # both branches
        with torch.no_grad():
            _same(loaded(batch), pruned(batch))
    with pytest.raises(ValueError, match=r"^compact: torch\.fx cannot trace CondNet \("):
        export_model(model, tmp_path / "c.pt2", "compact", x)
    with pytest.raises(
        ValueError,
        match=r"^export: onnx: torch\.onnx\.export failed on CondNet \(.*\); the ONNX file was "
        r"not written; export it as 'dense', or as 'sparse'",
    ):
        export_model(model, tmp_path / "c.onnx", "onnx", x)
    dense, _ = _export(model, tmp_path, "dense", x)
    with torch.no_grad():
        _same(_loaded(dense, CondNet())(x), pruned(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2", "net.safetensors"]


def test_what_torch_export_cannot_take_is_one_line(tmp_path, capfd):
    """Data-dependent Python control flow: compaction is skipped, then torch.export refuses
    the network; one line, nothing written; ONNX follows the example's path, with a note."""
    model = _pruned(Branchy)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(model, tmp_path / "net.pt2", "sparse", x)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("export: sparse: torch.export failed on Branchy (")
    assert message.endswith(
        "; the file was not written; export it as 'dense' (the weights, for the never-masked "
        "architecture), or as 'onnx' (traced with torch.jit instead)"
    )
    assert list(tmp_path.iterdir()) == []
    assert "def forward" not in capfd.readouterr().err  # torch's partial graph: not shown
    report, _ = _export(model, tmp_path, "onnx", x)
    assert report.flops_before is not None  # the torch.jit trace under fvcore follows it too
    assert report.notes[0].startswith("not compacted: torch.fx cannot trace Branchy")
    assert any(n.startswith("the torch.jit trace warned") for n in report.notes)


def _mismatch(model: nn.Module, example: Tensor):
    raise ValueError(
        f"compact: the compacted {type(model).__name__} differs from the pruned one on the "
        "example input (output 0 off by 0.5), which is a bug in compact (please report it with "
        "the network); export it as 'dense', 'sparse' or 'onnx' (uncompacted) instead"
    )


def _crash(model: nn.Module, example: Tensor):
    raise RuntimeError("shape propagation failed\nat node fc")


def test_a_compaction_mismatch_is_never_silent(tmp_path, monkeypatch):
    """compact format: the mismatch is the error; sparse and onnx: the pruned network,
    uncompacted, with the mismatch in a warning and in the report."""
    monkeypatch.setattr(formats, "compact", _mismatch)
    model = _pruned(Mlp)
    x = torch.randn(2, 6)
    with pytest.raises(
        ValueError,
        match=r"^compact: the compacted Mlp differs from the pruned one on the example input "
        r"\(output 0 off by 0\.5\), which is a bug in compact \(please report it with the "
        r"network\); export it as 'dense' \(the weights, for the never-masked architecture\), "
        r"or as 'sparse' or 'onnx' \(the network uncompacted\)$",
    ):
        export_model(model, tmp_path / "net.pt2", "compact", x)
    for fmt in ("sparse", "onnx"):
        report, messages = _export(model, tmp_path, fmt, x)
        why = (
            "not compacted: the compacted Mlp differs from the pruned one on the example input "
            "(output 0 off by 0.5), which is a bug in compact (please report it with the network)"
        )
        assert messages == [f"export: {fmt}: {why}; the pruned network is exported uncompacted"]
        assert report.notes[0] == why and report.compact is None
        assert report.params_after == report.params_before  # nothing removed
        y = torch.randn(3, 6)
        with torch.no_grad():
            _same(_loaded(report)(y), model(y))


def test_compact_failing_otherwise_is_one_line_or_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "compact", _crash)
    model = _pruned(Mlp)
    x = torch.randn(2, 6)
    with pytest.raises(
        ValueError,
        match=r"^compact: failed on Mlp \(RuntimeError: shape propagation failed\); export it "
        r"as 'dense'",
    ) as caught:
        export_model(model, tmp_path / "net.pt2", "compact", x)
    assert isinstance(caught.value.__cause__, RuntimeError)  # a bug keeps its traceback
    report, messages = _export(model, tmp_path, "sparse", x)
    assert messages == [
        "export: sparse: not compacted: failed on Mlp (RuntimeError: shape propagation failed); "
        "the pruned network is exported uncompacted"
    ]
    why = "failed on Mlp (RuntimeError: shape propagation failed)"
    assert report.notes[0] == f"not compacted: {why}"
    y = torch.randn(3, 6)
    with torch.no_grad():
        _same(_loaded(report)(y), model(y))


def test_an_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "compact", _crash)  # never reached
    path = tmp_path / "net.pt2"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"^export: .*net\.pt2 already exists; pass "):
        export_model(_pruned(Mlp), path, "sparse", torch.randn(2, 6))
    assert path.read_bytes() == b"precious"


# --- 4. SparseLinear reads like a Linear -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_has_the_attributes_of_a_linear(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(7, 5, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.7] = 0
        linear.weight[2] = 0  # an empty row
    sparse = SparseLinear(linear)
    weight = sparse.weight
    assert weight.dtype == dtype and weight.device == linear.weight.device
    assert weight.shape == (5, 7) and torch.equal(weight, linear.weight)
    assert (sparse.in_features, sparse.out_features) == (7, 5)
    if bias:
        assert isinstance(sparse.bias, nn.Parameter) and torch.equal(sparse.bias, linear.bias)
    else:
        assert sparse.bias is None
    x = torch.randn(3, 2, 7, dtype=dtype)
    torch.testing.assert_close(F.linear(x, sparse.weight, sparse.bias), linear(x))
    torch.testing.assert_close(sparse(x), linear(x))
    with pytest.raises(AttributeError, match=r"^SparseLinear\.weight is a read-only view"):
        sparse.weight = nn.Parameter(torch.zeros(5, 7, dtype=dtype))
    with torch.no_grad():
        sparse.weight.zero_()  # a copy: the layer is unchanged
    assert torch.equal(sparse.weight, linear.weight)


def test_sparse_linear_of_a_first_layer_on_selected_inputs():
    """compact's first layer reads some of the network's inputs; its CSR version reads the
    network's input directly, and its weight is still the layer's own (out, in_features)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        net[0].weight[:, [0, 3, 4, 9]] = 0
    small, _ = compact(net, torch.randn(2, 10))
    first = small.get_submodule("0")
    assert isinstance(first, LinearOnSelectedInputs) and first.in_features == 6
    sparse = SparseLinear(first)
    assert torch.equal(sparse.weight, first.weight) and sparse.weight.shape == (6, 6)
    x = torch.randn(4, 10)
    torch.testing.assert_close(sparse(x), first(x))


def test_weights_read_outside_forward_with_and_without_the_check(monkeypatch):
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    torch.manual_seed(0)
    model = ReadsWeights().eval()
    with torch.no_grad():
        for layer in (model.fc, model.proj, model.head):
            layer.weight[torch.rand_like(layer.weight) < 0.7] = 0
    x = torch.randn(3, 8)
    want = model(x)
    # with the example: the layers whose weight is read stay dense, with a note
    checked, notes = sparsify_linears(copy.deepcopy(model), batch_size=4, example=x)
    assert type(checked.fc) is SparseLinear
    assert type(checked.proj) is nn.Linear and type(checked.head) is nn.Linear
    kept = [n for n in notes if "kept dense" in n]
    assert [n.split(":")[0] for n in kept] == ["proj", "head"]
    assert all("its weight is read outside its forward" in n for n in kept)
    torch.testing.assert_close(checked(x), want)
    # without it: every layer in CSR, and the network still runs, reading dense views
    unchecked, _ = sparsify_linears(copy.deepcopy(model), batch_size=4)
    assert all(type(m) is SparseLinear for m in (unchecked.fc, unchecked.proj, unchecked.head))
    torch.testing.assert_close(unchecked(x), want)
    program = torch.export.export(
        unchecked, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    y = torch.randn(5, 8)
    torch.testing.assert_close(program.module()(y), model(y))


def test_the_sparse_format_on_a_network_reading_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    model = _pruned(ReadsWeights)
    report, _ = _export(model, tmp_path, "sparse", torch.randn(2, 8))
    assert any(n.startswith("proj: kept dense, its weight is read") for n in report.notes)
    y = torch.randn(4, 8)
    with torch.no_grad():
        _same(_loaded(report)(y), model(y))
