import math

import pytest
import torch

from scl_lightning.nn.normalize import NORMALIZERS, normalize_per_feature, validate_norm_mode

MODES = ["rms", "l2", "max"]


def _hand_scale(values, mode):
    """Scale of one feature from a plain Python list of numbers."""
    if mode == "rms":
        return math.sqrt(sum(v * v for v in values) / len(values))
    if mode == "l2":
        return math.sqrt(sum(v * v for v in values))
    if mode == "max":
        return max(abs(v) for v in values)
    raise AssertionError(mode)


def _hand_normalize(grad, mode, eps):
    out = torch.empty_like(grad)
    for f in range(grad.shape[0]):
        values = grad[f].flatten().tolist()
        scale = _hand_scale(values, mode) + eps
        out[f] = torch.tensor([v / scale for v in values], dtype=grad.dtype).view_as(grad[f])
    return out


def _grad(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    # Very unbalanced feature scales, as real mask gradients are.
    scales = torch.logspace(-6, 3, shape[0], dtype=dtype).view(-1, *([1] * (len(shape) - 1)))
    return g * scales


SHAPES = [(4, 6), (5, 3, 2, 2), (3, 2, 4), (2, 1, 2, 2, 2), (1, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_matches_hand_computation(shape, mode, eps):
    grad = _grad(shape)
    before = grad.clone()
    out = normalize_per_feature(grad, mode, eps=eps)
    assert out.shape == grad.shape and out.dtype == grad.dtype
    assert out.data_ptr() != grad.data_ptr()
    assert torch.equal(grad, before)  # not in place by default
    torch.testing.assert_close(out, _hand_normalize(before, mode, eps))


def test_known_values():
    g = torch.tensor([[3.0, 4.0], [0.0, -2.0], [0.0, 0.0]])
    torch.testing.assert_close(
        normalize_per_feature(g, "l2"), torch.tensor([[0.6, 0.8], [0.0, -1.0], [0.0, 0.0]])
    )
    torch.testing.assert_close(
        normalize_per_feature(g, "max"), torch.tensor([[0.75, 1.0], [0.0, -1.0], [0.0, 0.0]])
    )
    r = math.sqrt(12.5)
    torch.testing.assert_close(
        normalize_per_feature(g, "rms"),
        torch.tensor([[3 / r, 4 / r], [0.0, -math.sqrt(2)], [0.0, 0.0]]),
    )


def test_features_are_dim_zero():
    # Transposing the grad changes which entries form a feature: the result must differ.
    g = _grad((3, 3), seed=1)
    a = normalize_per_feature(g, "l2")
    b = normalize_per_feature(g.T.contiguous(), "l2").T
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3, dtype=g.dtype), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(4, 6), (5, 3, 2, 2)])
def test_rms_gives_unit_rms_per_feature(shape):
    out = normalize_per_feature(_grad(shape), "rms")
    rms = out.reshape(shape[0], -1).pow(2).mean(dim=1).sqrt()
    # Within eps / scale of 1 (the smallest feature's scale is ~1e-6).
    torch.testing.assert_close(rms, torch.ones(shape[0], dtype=out.dtype), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(4, 6), (5, 3, 2, 2)])
def test_l2_and_max_give_unit_scale(shape):
    g = _grad(shape)
    l2 = normalize_per_feature(g, "l2").reshape(shape[0], -1).norm(dim=1)
    mx = normalize_per_feature(g, "max").reshape(shape[0], -1).abs().amax(dim=1)
    ones = torch.ones(shape[0], dtype=g.dtype)
    torch.testing.assert_close(l2, ones, rtol=1e-5, atol=0)
    torch.testing.assert_close(mx, ones, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(4, 6), (5, 3, 2, 2)])
def test_none_returns_same_object_unchanged(shape):
    g = _grad(shape)
    before = g.clone()
    assert normalize_per_feature(g, "none") is g
    assert normalize_per_feature(g, "none", inplace=True) is g
    assert torch.equal(g, before)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_zero_feature_stays_zero(mode, dtype, inplace):
    g = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 2.0], [0.0, 0.0, 0.0]], dtype=dtype)
    out = normalize_per_feature(g, mode, inplace=inplace)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    expected = {"rms": 1 / math.sqrt(3), "l2": 1 / 3, "max": 1 / 2}[mode]
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    torch.testing.assert_close(
        out[1].double(),
        torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64) * expected,
        rtol=tol,
        atol=tol,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(4, 6), (5, 3, 2, 2)])
def test_inplace_contiguous(mode, shape):
    g = _grad(shape)
    expected = _hand_normalize(g, mode, 1e-12)
    ptr = g.data_ptr()
    out = normalize_per_feature(g, mode, inplace=True)
    assert out is g
    assert out.data_ptr() == ptr
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("base_shape", "make_view"),
    [
        pytest.param((5, 6), lambda base: base.T, id="transposed_2d"),
        pytest.param((3, 6, 2, 2), lambda base: base.transpose(0, 1), id="transposed_4d"),
        pytest.param((6, 5, 2, 3), lambda base: base.permute(1, 0, 3, 2), id="permuted_4d"),
        pytest.param((6, 10), lambda base: base[:, ::2], id="strided_cols"),
        pytest.param((4, 7), lambda base: base.T[1:, :3], id="transposed_sliced"),
    ],
)
def test_inplace_non_contiguous(mode, base_shape, make_view):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(base_shape, generator=gen, dtype=torch.float64)
    view = make_view(base)
    assert not view.is_contiguous()
    expected = _hand_normalize(view.clone(), mode, 1e-12)
    base_before = base.clone()
    ptr = view.data_ptr()
    out = normalize_per_feature(view, mode, inplace=True)
    assert out is view
    assert out.data_ptr() == ptr
    torch.testing.assert_close(view, expected)
    # The storage shared with base was written, and only where the view points.
    torch.testing.assert_close(make_view(base), expected)
    marker = torch.zeros(base_shape, dtype=torch.bool)
    make_view(marker).fill_(True)
    assert torch.equal(base[~marker], base_before[~marker])
    assert not torch.equal(base[marker], base_before[marker])


def test_inplace_on_parameter_grad():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    p.grad = _grad((3, 4), dtype=torch.float32)
    grad = p.grad
    expected = _hand_normalize(grad.double(), "rms", 1e-12).float()
    normalize_per_feature(p.grad, "rms", inplace=True)
    assert p.grad is grad
    torch.testing.assert_close(p.grad, expected)


@pytest.mark.parametrize("mode", MODES)
def test_eps_effect(mode):
    g = torch.tensor([[1e-6, -1e-6], [3.0, 4.0]], dtype=torch.float64)
    tiny = normalize_per_feature(g, mode, eps=1e-12)
    big = normalize_per_feature(g, mode, eps=1.0)
    # Small eps: the tiny feature is blown up to unit scale.
    assert tiny[0].abs().max().item() > 0.5
    # Large eps: the tiny feature stays tiny; the big one is divided by (scale + 1).
    assert tiny[0].abs().max().item() / big[0].abs().max().item() > 1e5
    scale = _hand_scale([3.0, 4.0], mode)
    torch.testing.assert_close(big[1], g[1] / (scale + 1.0))
    torch.testing.assert_close(big[0], g[0] / (_hand_scale([1e-6, -1e-6], mode) + 1.0))


@pytest.mark.parametrize("bad", ["RMS", "L2", "mean", "", None])
def test_unknown_mode(bad):
    with pytest.raises(ValueError, match="unknown normalization mode"):
        normalize_per_feature(torch.ones(2, 2), bad)
    with pytest.raises(ValueError, match="rms, l2, max, none"):
        validate_norm_mode(bad)


def test_normalizers_tuple():
    assert NORMALIZERS == ("rms", "l2", "max", "none")
    for mode in NORMALIZERS:
        assert validate_norm_mode(mode) == mode


def test_float64_precision_kept():
    # A feature whose entries differ by 1e-10 relative must keep that difference.
    g = torch.tensor([[1.0, 1.0 + 1e-10]], dtype=torch.float64)
    out = normalize_per_feature(g, "max", eps=0.0)
    assert out[0, 1].item() == 1.0
    assert out[0, 0].item() == pytest.approx(1.0 - 1e-10, rel=0, abs=1e-14)
