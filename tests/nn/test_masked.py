import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scl_lightning.nn.masked import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLayer,
    MaskedLinear,
)
from scl_lightning.nn.ste import IdentitySTE, LeakyReLUSTE, get_ste

DT = torch.float64

# (id, masked class, constructor kwargs, dense functional, input shape)
LAYER_CASES = [
    ("linear", MaskedLinear, {"in_features": 5, "out_features": 4}, None, (3, 5)),
    (
        "linear_nobias",
        MaskedLinear,
        {"in_features": 5, "out_features": 4, "bias": False},
        None,
        (2, 5),
    ),
    (
        "conv1d",
        MaskedConv1d,
        {"in_channels": 3, "out_channels": 4, "kernel_size": 3},
        F.conv1d,
        (2, 3, 7),
    ),
    (
        "conv1d_stride_pad",
        MaskedConv1d,
        {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "stride": 2, "padding": 1},
        F.conv1d,
        (2, 2, 8),
    ),
    (
        "conv2d",
        MaskedConv2d,
        {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
        F.conv2d,
        (2, 3, 5, 5),
    ),
    (
        "conv2d_grouped",
        MaskedConv2d,
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2},
        F.conv2d,
        (2, 4, 5, 5),
    ),
    (
        "conv2d_depthwise",
        MaskedConv2d,
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "groups": 4, "padding": 1},
        F.conv2d,
        (2, 4, 5, 5),
    ),
    (
        "conv2d_dilated_nobias",
        MaskedConv2d,
        {"in_channels": 2, "out_channels": 3, "kernel_size": 2, "dilation": 2, "bias": False},
        F.conv2d,
        (1, 2, 6, 6),
    ),
    (
        "conv3d",
        MaskedConv3d,
        {"in_channels": 2, "out_channels": 3, "kernel_size": 2},
        F.conv3d,
        (2, 2, 4, 4, 4),
    ),
    (
        "conv3d_grouped",
        MaskedConv3d,
        {"in_channels": 4, "out_channels": 4, "kernel_size": 2, "groups": 2, "padding": 1},
        F.conv3d,
        (1, 4, 3, 3, 3),
    ),
]
LAYER_IDS = [c[0] for c in LAYER_CASES]

STES = [
    ("identity", {}),
    ("leaky_relu", {"alpha": 0.2}),
    ("softplus", {"beta": 2.0}),
    ("hardtanh", {}),
]
STE_IDS = [s[0] for s in STES]


def _dense_forward(layer, fn, x, weight):
    if fn is None:
        return F.linear(x, weight, layer.bias)
    return fn(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _randomize(layer, gen):
    with torch.no_grad():
        layer.raw_weight.copy_(torch.randn(layer.raw_weight.shape, generator=gen, dtype=DT))
        # Mixed signs, with several values beyond |1| (where hardtanh's proxy is 0).
        layer.mask.copy_(2.0 * torch.randn(layer.mask.shape, generator=gen, dtype=DT))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=DT))


@pytest.mark.parametrize(("ste_name", "ste_kwargs"), STES, ids=STE_IDS)
@pytest.mark.parametrize(("case", "cls", "kwargs", "fn", "x_shape"), LAYER_CASES, ids=LAYER_IDS)
def test_mask_and_weight_gradients_match_formula(
    case, cls, kwargs, fn, x_shape, ste_name, ste_kwargs
):
    gen = torch.Generator().manual_seed(1234)
    est = get_ste(ste_name, **ste_kwargs)
    layer = cls(**kwargs, dtype=DT, ste=est)
    _randomize(layer, gen)
    m = layer.mask.detach().clone()
    w = layer.raw_weight.detach().clone()
    h = (m > 0).to(DT)
    assert 0 < h.sum() < h.numel(), "test needs a mask with mixed signs"

    x = torch.randn(x_shape, generator=gen, dtype=DT)
    out = layer(x)
    r = torch.randn(out.shape, generator=gen, dtype=DT)
    (out * r).sum().backward()

    # Reference: a plain dense op with the effective weight as a leaf.
    w_eff = (w * h).detach().requires_grad_()
    ref_out = _dense_forward(layer, fn, x, w_eff)
    (ref_out * r).sum().backward()
    g_eff = w_eff.grad

    torch.testing.assert_close(out.detach(), ref_out.detach())
    torch.testing.assert_close(layer.raw_weight.grad, g_eff * h)
    torch.testing.assert_close(layer.mask.grad, (g_eff * w) * est.proxy(m))
    # Pruned weights get exactly zero gradient; the mask of a pruned connection still moves
    # (except where the hardtanh proxy vanishes).
    assert (layer.raw_weight.grad[h == 0] == 0).all()
    if ste_name != "hardtanh":
        assert (layer.mask.grad[(h == 0) & (g_eff * w != 0)] != 0).all()


BIAS_CASES = [c for c in LAYER_CASES if c[2].get("bias", True)]


@pytest.mark.parametrize(
    ("case", "cls", "kwargs", "fn", "x_shape"), BIAS_CASES, ids=[c[0] for c in BIAS_CASES]
)
def test_bias_gradient_unaffected_by_mask(case, cls, kwargs, fn, x_shape):
    gen = torch.Generator().manual_seed(7)
    layer = cls(**kwargs, dtype=DT)
    _randomize(layer, gen)
    x = torch.randn(x_shape, generator=gen, dtype=DT)
    out = layer(x)
    r = torch.randn(out.shape, generator=gen, dtype=DT)
    (out * r).sum().backward()
    reduce_dims = [d for d in range(r.dim()) if d != (r.dim() - 1 if fn is None else 1)]
    torch.testing.assert_close(layer.bias.grad, r.sum(dim=reduce_dims))


@pytest.mark.parametrize(("case", "cls", "kwargs", "fn", "x_shape"), LAYER_CASES, ids=LAYER_IDS)
@pytest.mark.parametrize("mask_init", [1.0, 0.01, 5])
def test_all_positive_masks_equal_dense_layer(case, cls, kwargs, fn, x_shape, mask_init):
    torch.manual_seed(0)
    layer = cls(**kwargs, dtype=DT, mask_init=mask_init)
    dense = cls.dense_cls(**kwargs, dtype=DT)
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "mask"})
    x = torch.randn(x_shape, dtype=DT)
    assert torch.equal(layer(x), dense(x))
    assert (layer.mask == float(mask_init)).all()


@pytest.mark.parametrize(("case", "cls", "kwargs", "fn", "x_shape"), LAYER_CASES, ids=LAYER_IDS)
def test_mask_shape_dtype_and_effective_weight(case, cls, kwargs, fn, x_shape):
    layer = cls(**kwargs)
    assert isinstance(layer, MaskedLayer) and isinstance(layer, cls.dense_cls)
    assert isinstance(layer.mask, nn.Parameter) and layer.mask.requires_grad
    assert layer.mask.shape == layer.raw_weight.shape
    assert layer.mask.dtype == layer.raw_weight.dtype
    with torch.no_grad():
        layer.mask.view(-1)[::2] = -1.0
    h = (layer.mask > 0).to(layer.raw_weight.dtype)
    assert torch.equal(layer.hard_mask(), h)
    assert not layer.hard_mask().requires_grad
    assert torch.equal(layer.effective_weight().detach(), layer.raw_weight.detach() * h)


def test_all_negative_mask_gives_bias_only():
    layer = MaskedLinear(4, 3, dtype=DT)
    with torch.no_grad():
        layer.mask.fill_(-0.5)
    out = layer(torch.randn(5, 4, dtype=DT))
    assert torch.equal(out, layer.bias.detach().expand(5, 3))


def test_mask_exactly_zero_prunes():
    layer = MaskedLinear(2, 1, bias=False)
    with torch.no_grad():
        layer.raw_weight.fill_(1.0)
        layer.mask.copy_(torch.tensor([[0.0, 1.0]]))
    assert layer(torch.tensor([[10.0, 3.0]])).item() == 3.0


DENSE_CASES = [
    (nn.Linear, MaskedLinear, (6, 3)),
    (nn.Conv1d, MaskedConv1d, (2, 3, 3)),
    (nn.Conv2d, MaskedConv2d, (2, 3, 3)),
    (nn.Conv3d, MaskedConv3d, (2, 3, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("dense_cls", "masked_cls", "args"), DENSE_CASES)
def test_from_dense_keeps_identity_values_device_dtype(dense_cls, masked_cls, args, dtype):
    dense = dense_cls(*args, dtype=dtype)
    weight, bias = dense.weight, dense.bias
    w_before, b_before = weight.detach().clone(), bias.detach().clone()
    out = masked_cls.from_dense(dense, mask_init=0.5, ste="leaky_relu")
    assert out is dense
    assert type(out) is masked_cls
    assert out.raw_weight is weight and out.bias is bias
    assert torch.equal(out.raw_weight, w_before) and torch.equal(out.bias, b_before)
    # the mask takes the weight's dtype, never below float32 (bfloat16 steps stall near 1.0)
    assert out.mask.dtype == torch.promote_types(dtype, torch.float32)
    assert out.mask.device == weight.device
    assert out.mask.shape == weight.shape
    assert (out.mask == 0.5).all()
    assert out.ste == LeakyReLUSTE()
    names = [n for n, _ in out.named_parameters()]
    assert names == ["weight", "bias", "mask"]


def test_from_dense_keeps_hooks_and_forward_matches():
    dense = nn.Linear(3, 2)
    calls = []
    dense.register_forward_hook(lambda mod, inp, out: calls.append(type(mod).__name__))
    x = torch.randn(4, 3)
    ref = dense(x)
    MaskedLinear.from_dense(dense, ste=IdentitySTE())
    assert torch.equal(dense(x), ref)
    assert calls == ["Linear", "MaskedLinear"]


class _MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize(
    ("masked_cls", "module"),
    [
        (MaskedLinear, _MyLinear(3, 2)),
        (MaskedLinear, nn.Conv2d(1, 1, 1)),
        (MaskedLinear, nn.Bilinear(2, 2, 2)),
        (MaskedConv2d, nn.Conv1d(1, 1, 1)),
        (MaskedConv2d, nn.ConvTranspose2d(1, 1, 1)),
        (MaskedConv1d, nn.Linear(2, 2)),
        (MaskedLinear, MaskedLinear(2, 2)),
    ],
)
def test_from_dense_rejects_other_classes(masked_cls, module):
    cls_before = type(module)
    with pytest.raises(TypeError, match=f"expects exactly {masked_cls.dense_cls.__name__}"):
        masked_cls.from_dense(module)
    assert type(module) is cls_before


@pytest.mark.parametrize(
    "bad", [0, 0.0, -1, -1e-9, float("nan"), float("inf"), True, False, "a", None]
)
@pytest.mark.parametrize("cls", [MaskedLinear, MaskedConv2d])
def test_mask_init_validation(cls, bad):
    args = (3, 2) if cls is MaskedLinear else (1, 2, 3)
    with pytest.raises(ValueError, match="mask_init must be"):
        cls(*args, mask_init=bad)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "a"])
def test_from_dense_mask_init_validation(bad):
    with pytest.raises(ValueError, match="mask_init must be"):
        MaskedLinear.from_dense(nn.Linear(2, 2), mask_init=bad)


def test_unknown_ste_in_constructor():
    with pytest.raises(ValueError, match="unknown STE"):
        MaskedLinear(2, 2, ste="sign")


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (MaskedLinear(3, 2), {"weight", "bias", "mask"}),
        (MaskedLinear(3, 2, bias=False), {"weight", "mask"}),
        (MaskedConv1d(2, 2, 3), {"weight", "bias", "mask"}),
        (MaskedConv2d(2, 2, 3), {"weight", "bias", "mask"}),
        (MaskedConv3d(2, 2, 1, bias=False), {"weight", "mask"}),
    ],
)
def test_state_dict_keys(layer, expected):
    assert set(layer.state_dict()) == expected


def test_state_dict_roundtrip_restores_mask():
    a = MaskedConv2d(2, 3, 3)
    with torch.no_grad():
        a.mask.uniform_(-1, 1)
    b = MaskedConv2d(2, 3, 3)
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.raw_weight, b.raw_weight)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(a(x), b(x))


def _check_copy(orig, clone):
    assert type(clone) is type(orig)
    assert clone.ste == orig.ste
    assert clone.mask is not orig.mask
    assert torch.equal(clone.mask, orig.mask)
    x = torch.randn(2, *((3,) if isinstance(orig, nn.Linear) else (2, 5, 5)))
    assert torch.equal(clone(x), orig(x))


def _layers_for_copy():
    lin = MaskedLinear(3, 2, ste="softplus", mask_init=0.3)
    conv = MaskedConv2d(2, 2, 3, ste=LeakyReLUSTE(0.3))
    conv_from_dense = MaskedConv2d.from_dense(nn.Conv2d(2, 2, 3), ste="hardtanh")
    for layer in (lin, conv, conv_from_dense):
        with torch.no_grad():
            layer.mask.uniform_(-1, 1)
    return [lin, conv, conv_from_dense]


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_pickle_deepcopy_and_torch_save(idx):
    layer = _layers_for_copy()[idx]
    _check_copy(layer, pickle.loads(pickle.dumps(layer)))
    _check_copy(layer, copy.deepcopy(layer))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    _check_copy(layer, torch.load(buf, weights_only=False))


def test_deepcopy_gradients_still_use_ste():
    layer = MaskedLinear(2, 1, bias=False, ste=LeakyReLUSTE(0.25))
    with torch.no_grad():
        layer.raw_weight.fill_(2.0)
        layer.mask.copy_(torch.tensor([[-1.0, 1.0]]))
    clone = copy.deepcopy(layer)
    clone(torch.ones(1, 2)).sum().backward()
    assert clone.mask.grad.tolist() == [[0.5, 2.0]]


@pytest.mark.parametrize(
    ("layer", "fragments"),
    [
        (MaskedLinear(3, 2), ["in_features=3", "out_features=2", "ste=IdentitySTE()"]),
        (
            MaskedConv2d(1, 2, 3, ste="leaky_relu"),
            ["kernel_size=(3, 3)", "ste=LeakyReLUSTE(alpha=0.1)"],
        ),
        (MaskedConv1d(1, 2, 3, ste="softplus"), ["ste=SoftplusSTE(beta=1.0)"]),
        (MaskedConv3d(1, 2, 3, ste="hardtanh"), ["ste=HardtanhSTE()"]),
    ],
)
def test_extra_repr_mentions_ste(layer, fragments):
    text = repr(layer)
    assert text.startswith(type(layer).__name__ + "(")
    for frag in fragments:
        assert frag in text


def test_no_grad_forward_and_frozen_weight():
    layer = MaskedLinear(3, 2)
    with torch.no_grad():
        out = layer(torch.randn(1, 3))
    assert not out.requires_grad
    layer.raw_weight.requires_grad_(False)
    layer(torch.randn(1, 3)).sum().backward()
    assert layer.raw_weight.grad is None and layer.mask.grad is not None
