"""Every weight-bearing layer a user brings is masked, or named (issue 23): subclasses of the
torch layers, transformers' ``Conv1D``, ``nn.MultiheadAttention``'s projections, layer types of
one's own (``register_maskable``), and the one line that says what stays dense and why."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scl_lightning.nn import (
    DenseLayersWarning,
    MaskedLayer,
    MaskedLinear,
    coverage,
    export_pruned,
    mask_spec,
    maskable_type,
    masked_modules,
    normalize_mask_gradient,
    register_maskable,
    sparsify,
    sparsify_like,
)
from scl_lightning.nn.flops import count_flops
from scl_lightning.nn.maskable import _ENTRIES, _REGISTRY


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` as GPT-2 uses it (a Linear whose weight is ``(in, out)``),
    under its real module path so the built-in registration by name applies."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"
Conv1D.__qualname__ = "Conv1D"


class CastingLinear(nn.Linear):
    """timm's ``Linear``: overrides forward, still linear in the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d``: standardizes its weight, so a zeroed weight would not stay zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(self.out_channels, -1)
        w = F.batch_norm(w.unsqueeze(0), None, None, training=True, eps=1e-6).reshape_as(
            self.weight
        )
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class GPTBlock(nn.Module):
    """GPT-2's pattern: Conv1D projections, an embedding, and an output layer tied to it."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.c_attn = Conv1D(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_out = Conv1D(dim, 4 * dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(att)
        x = x + self.c_out(F.gelu(self.c_fc(x)))
        return self.lm_head(x)


class Kernel(nn.Module):
    """A layer type of one's own: ``y = x @ kernel``, the kernel stored ``(in, out)``."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


@pytest.fixture
def registry():
    """Registrations made in a test are undone after it."""
    saved = list(_REGISTRY)
    yield
    _REGISTRY[:] = saved
    _ENTRIES.clear()


def _quiet_sparsify(model: nn.Module, **kwargs: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseLayersWarning)
        return sparsify(model, **kwargs)  # type: ignore[arg-type]


def test_a_linear_subclass_that_stays_linear_in_its_weight_is_masked_and_the_mask_acts():
    torch.manual_seed(0)
    net = nn.Sequential(CastingLinear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    sparsify(net)
    layer = net[0]
    assert isinstance(layer, MaskedLinear) and isinstance(layer, CastingLinear)
    assert type(layer).__name__ == "MaskedCastingLinear"
    with torch.no_grad():
        layer.mask[1].fill_(-1.0)
    out = layer(torch.randn(5, 4))
    torch.testing.assert_close(out[:, 1], layer.bias[1].expand(5))
    # exported, it is the user's class again, with the pruned weights baked in
    plain = export_pruned(net)
    assert type(plain[0]) is CastingLinear
    x = torch.randn(2, 4)
    torch.testing.assert_close(plain(x), net(x))


def test_a_subclass_that_transforms_its_weight_stays_dense_and_is_named():
    net = nn.Sequential(StdConv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.warns(
        DenseLayersWarning,
        match=r"unsupported type \[1, .*\]: 0 \(StdConv2d: its "
        r"forward is not linear in the weight",
    ):
        sparsify(net)
    assert type(net[0]) is StdConv2d
    assert [n for n, _ in masked_modules(net)] == ["2"]
    entry, reason = maskable_type(net[0])
    assert entry is not None and "not linear" in (reason or "")


def test_the_probe_leaves_the_global_random_state_alone():
    class Other(CastingLinear):  # a class not probed yet
        pass

    net = nn.Sequential(Other(4, 3))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sparsify(net)
    assert isinstance(net[0], MaskedLayer)
    assert torch.equal(torch.rand(3), expected)


def test_conv1d_is_masked_along_its_transposed_layout():
    torch.manual_seed(0)
    layer = Conv1D(6, 4)  # (in=4, out=6)
    x = torch.randn(2, 3, 4)
    ref = layer(x)
    net = sparsify(nn.Sequential(layer))
    assert isinstance(layer, MaskedLayer) and layer.out_dim == 1
    assert layer.mask.shape == (4, 6)
    torch.testing.assert_close(layer(x), ref)
    with torch.no_grad():
        layer.mask[:, 2].fill_(-1.0)  # output unit 2 loses every input
    torch.testing.assert_close(layer(x)[..., 2], layer.bias[2].expand(2, 3))
    torch.testing.assert_close(export_pruned(net)(x), net(x))
    channel = sparsify(nn.Sequential(Conv1D(6, 4)), granularity="channel")[0]
    assert channel.mask.shape == (1, 6) and channel.per_mask == 4


def test_mask_gradients_are_normalized_per_output_unit_of_a_transposed_weight():
    grad = torch.randn(4, 6)  # (in, out): the features are the columns
    got = normalize_mask_gradient(grad.clone(), "rms", feature_dim=1)
    want = normalize_mask_gradient(grad.t().contiguous(), "rms").t()
    torch.testing.assert_close(got, want)
    inplace = grad.clone()
    normalize_mask_gradient(inplace, "rms", inplace=True, feature_dim=1)
    torch.testing.assert_close(inplace, want)
    assert torch.allclose(got.pow(2).mean(dim=0), torch.ones(6), atol=1e-5)


def test_a_gpt2_pattern_masks_every_projection_and_names_what_stays_dense():
    torch.manual_seed(0)
    model = GPTBlock()
    with pytest.warns(DenseLayersWarning) as rec:
        sparsify(model)
    assert len(rec) == 1
    line = str(rec[0].message)
    assert "4 of 6 weight layers masked" in line
    assert "not a Linear or convolution [1, " in line and "wte (Embedding)" in line
    assert "weight tied to another module [1, 0.0%]: lm_head (tied to wte.weight)" in line
    assert [n for n, _ in masked_modules(model)] == ["c_attn", "c_proj", "c_fc", "c_out"]
    cover = coverage(model)
    masked = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith(".weight") and n.split(".")[0].startswith("c_")
    )
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".mask"))
    assert cover.masked_parameters == masked and cover.parameters == total
    assert cover.share_not_masked == pytest.approx(1 - masked / total)
    ids = torch.randint(0, 11, (2, 5))
    model(ids).sum().backward()
    assert all(layer.mask.grad is not None for _, layer in masked_modules(model))


def test_a_layer_type_of_ones_own_is_registered_in_one_call(registry):
    with pytest.raises(ValueError, match="no Linear or convolution layer"):
        sparsify(nn.Sequential(Kernel()))
    register_maskable(Kernel, weight="kernel", out_dim=1)
    net = sparsify(nn.Sequential(Kernel()), granularity="channel")
    layer = net[0]
    assert layer.mask.shape == (1, 3) and not hasattr(layer, "weight")
    with torch.no_grad():
        layer.mask[0, 0] = -1.0
    out = net(torch.randn(2, 4))
    assert torch.equal(out[:, 0], torch.zeros(2))
    plain = export_pruned(net)
    assert type(plain[0]) is Kernel and "0.kernel" in plain.state_dict()
    torch.testing.assert_close(plain(torch.ones(1, 4)), net(torch.ones(1, 4)))
    with pytest.raises(ValueError, match="out_dim must be an int >= 0"):
        register_maskable(Kernel, out_dim=-1)
    with pytest.raises(TypeError, match=r"expects an nn\.Module class"):
        register_maskable(object)  # type: ignore[arg-type]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = CastingLinear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_a_made_masked_class_survives_pickling(how):
    torch.manual_seed(0)
    net = sparsify(Attention())
    with torch.no_grad():
        net.attn.mask[0].fill_(-1.0)
        net.head.mask[1].fill_(-1.0)
    if how == "pickle":
        other = pickle.loads(pickle.dumps(net))
    elif how == "deepcopy":
        other = copy.deepcopy(net)
    else:
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    for name in ("attn", "attn.out_proj", "head"):
        assert type(other.get_submodule(name)) is type(net.get_submodule(name))
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(other(x), net(x))


def test_mask_spec_rebuilds_made_classes_for_a_strict_load():
    torch.manual_seed(0)
    net = _quiet_sparsify(nn.Sequential(CastingLinear(4, 3), Conv1D(2, 3)), granularity="channel")
    fresh = sparsify_like(nn.Sequential(CastingLinear(4, 3), Conv1D(2, 3)), mask_spec(net))
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert type(fresh[0]) is type(net[0]) and type(fresh[1]) is type(net[1])


def test_flops_of_attention_projections_and_conv1d_are_their_products():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.mlp = Conv1D(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.attn(x, x, x)[0])

    net = sparsify(Block())
    counts = count_flops(net, torch.randn(1, 10, 16))
    assert counts.layers == {
        "attn": 10 * 3 * 16 * 16,  # q, k and v tokens times E x E
        "attn.out_proj": 10 * 16 * 16,
        "mlp": 10 * 16 * 32,
    }
    # the module total holds the projections and the attention products (2 x T x T x E)
    assert counts.modules["attn"] == 10 * 4 * 16 * 16 + 2 * 10 * 10 * 16
    assert counts.total == counts.modules["attn"] + counts.layers["mlp"]


def test_a_lazy_layer_is_named_until_it_is_built():
    net = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(DenseLayersWarning, match=r"0 \(LazyLinear's weight is not built yet"):
        sparsify(net)
    assert [n for n, _ in masked_modules(net)] == ["2"]
    net = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    net(torch.randn(1, 5))  # built: a plain Linear now
    assert [n for n, _ in masked_modules(sparsify(net))] == ["0", "2"]


class FlagConv(nn.Conv2d):
    """Standardizes its weight only when asked: the verdict is the instance's."""

    def __init__(self, *args: object, ws: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ws = ws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.ws:
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_the_probe_judges_each_layer_not_its_class():
    plain = _quiet_sparsify(nn.Sequential(FlagConv(3, 4, 3)))
    standardized = _quiet_sparsify(nn.Sequential(FlagConv(3, 4, 3), FlagConv(4, 4, 3, ws=True)))
    assert isinstance(plain[0], MaskedLayer) and isinstance(standardized[0], MaskedLayer)
    assert type(standardized[1]) is FlagConv  # dense, named
    assert [d.name for d in coverage(standardized).dense] == ["1"]


class LoRALinear(nn.Linear):
    """loralib's pattern: a low-rank path beside the weight, which the mask does not cover."""

    def __init__(self, n_in: int, n_out: int, r: int = 2) -> None:
        super().__init__(n_in, n_out)
        self.lora_A = nn.Parameter(torch.randn(r, n_in))
        self.lora_B = nn.Parameter(torch.randn(n_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + x @ self.lora_A.t() @ self.lora_B.t()


def test_a_layer_with_a_path_around_its_weight_stays_dense():
    net = nn.Sequential(LoRALinear(4, 3), nn.Linear(3, 2))
    with pytest.warns(DenseLayersWarning, match=r"0 \(LoRALinear: its output does not vanish"):
        sparsify(net)
    assert type(net[0]) is LoRALinear


def test_what_cannot_be_masked_as_registered_is_named_and_nothing_is_half_converted(registry):
    class Keyed(nn.Linear):
        def __init_subclass__(cls, key: str, **kwargs: object) -> None:
            super().__init_subclass__(**kwargs)

    class Head(Keyed, key="head"):
        pass

    register_maskable(Kernel, weight="kernel", out_dim=2)  # a 2-D kernel has no dim 2
    net = nn.Sequential(nn.Linear(4, 4), Head(4, 4), Kernel())
    with pytest.warns(DenseLayersWarning) as rec:
        sparsify(net)
    line = str(rec[0].message)
    assert "1 (its masked class cannot be made (TypeError: " in line
    assert "2 (Kernel's kernel has 2 dims, no dim 2 to hold its outputs" in line
    assert [n for n, _ in masked_modules(net)] == ["0"] and type(net[1]) is Head


def test_attention_with_separate_qkv_weights_is_named_and_its_out_proj_priced():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mem = x[..., :6]
            return self.attn(x, mem, x[..., :5])[0]

    net = nn.Sequential(Cross())
    with pytest.warns(DenseLayersWarning, match=r"separate weights \(kdim or vdim differ"):
        sparsify(net)
    assert [n for n, _ in masked_modules(net)] == ["0.attn.out_proj"]
    (dense,) = coverage(net).dense
    assert dense.parameters == 8 * 8 + 8 * 6 + 8 * 5  # q, k and v projections
    counts = count_flops(net, torch.randn(1, 7, 8))
    assert counts.layers == {"0.attn.out_proj": 7 * 8 * 8}


def test_initializers_of_a_masked_attention_write_the_stored_weight():
    # Lightning's demos give MultiheadAttention a `reset_parameters` when imported (for meta
    # init): the masked class has one exactly when the dense class has one
    mha = sparsify(nn.Sequential(nn.MultiheadAttention(8, 2)))[0]
    assert hasattr(mha, "reset_parameters") == hasattr(nn.MultiheadAttention, "reset_parameters")
    initializers = ["_reset_parameters"] + (
        ["reset_parameters"] if hasattr(mha, "reset_parameters") else []
    )
    for name in initializers:
        with torch.no_grad():
            mha.raw_weight.zero_()
        getattr(mha, name)()
        assert bool(mha.raw_weight.ne(0).all()), name
    conv1d = sparsify(nn.Sequential(Conv1D(3, 2)))[0]
    assert not hasattr(conv1d, "reset_parameters")  # as the dense class: it has none


def test_flops_of_a_registered_type_read_out_of_sight_are_fvcores(registry):
    class Einsum(Kernel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bi,io->bo", x, self.kernel)

    register_maskable(Einsum, weight="kernel", out_dim=1)
    net = sparsify(nn.Sequential(Einsum()))
    counts = count_flops(net, torch.randn(1, 4))
    assert counts.layers == {"0": 12} == {"0": counts.total}
