import pickle

import pytest
import torch

from scl_lightning.nn import ste as ste_module
from scl_lightning.nn.ste import (
    STE,
    HardtanhSTE,
    IdentitySTE,
    LeakyReLUSTE,
    SoftplusSTE,
    available_stes,
    count_positive,
    get_ste,
    heaviside,
    masked_weight,
    register_ste,
    step,
)

# Values on both sides of 0, exactly 0, exactly +-1 and beyond |1|.
M_VALUES = [-3.0, -1.5, -1.0, -0.4, 0.0, 0.3, 1.0, 1.2, 4.0]


def _m(dtype=torch.float64):
    return torch.tensor(M_VALUES, dtype=dtype)


def _hand_proxy(name, kwargs, m):
    if name == "identity":
        return torch.ones_like(m)
    if name == "leaky_relu":
        alpha = kwargs.get("alpha", 0.1)
        return torch.tensor([1.0 if v > 0 else alpha for v in m.tolist()], dtype=m.dtype)
    if name == "softplus":
        beta = kwargs.get("beta", 1.0)
        return torch.tensor(
            [1.0 / (1.0 + torch.e ** (-beta * v)) for v in m.tolist()], dtype=m.dtype
        )
    if name == "hardtanh":
        return torch.tensor([1.0 if abs(v) <= 1 else 0.0 for v in m.tolist()], dtype=m.dtype)
    raise AssertionError(name)


STE_CASES = [
    ("identity", {}),
    ("leaky_relu", {}),
    ("leaky_relu", {"alpha": 0.25}),
    ("leaky_relu", {"alpha": 1.0}),
    ("softplus", {}),
    ("softplus", {"beta": 3.0}),
    ("softplus", {"beta": 0.5}),
    ("hardtanh", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), STE_CASES)
def test_heaviside_backward_matches_hand_formula(name, kwargs):
    est = get_ste(name, **kwargs)
    m = _m().requires_grad_()
    upstream = torch.linspace(0.5, 2.0, m.numel(), dtype=torch.float64)
    (heaviside(m, est) * upstream).sum().backward()
    expected = upstream * _hand_proxy(name, kwargs, m.detach())
    torch.testing.assert_close(m.grad, expected)
    # The proxy method itself agrees with the hand formula too.
    torch.testing.assert_close(est.proxy(m.detach()), _hand_proxy(name, kwargs, m.detach()))


@pytest.mark.parametrize(("name", "kwargs"), STE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_heaviside_forward_is_exact_unit_step(name, kwargs, dtype):
    m = _m(dtype)
    out = heaviside(m, get_ste(name, **kwargs))
    expected = torch.tensor([1.0 if v > 0 else 0.0 for v in M_VALUES], dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(step(m), expected)


def test_step_at_zero_and_negative_zero_is_zero():
    m = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    assert step(m).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert heaviside(m).tolist() == [0.0, 0.0, 1.0, 0.0]


def test_heaviside_default_ste_is_identity():
    m = _m().requires_grad_()
    heaviside(m).sum().backward()
    torch.testing.assert_close(m.grad, torch.ones_like(m))


@pytest.mark.parametrize(("name", "kwargs"), STE_CASES)
def test_masked_weight_gradients(name, kwargs):
    est = get_ste(name, **kwargs)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(len(M_VALUES), dtype=torch.float64, generator=gen).requires_grad_()
    m = _m().requires_grad_()
    g = torch.randn(len(M_VALUES), dtype=torch.float64, generator=gen)
    out = masked_weight(w, m, est)
    h = (m.detach() > 0).double()
    torch.testing.assert_close(out.detach(), w.detach() * h)
    (out * g).sum().backward()
    torch.testing.assert_close(w.grad, g * h)
    torch.testing.assert_close(m.grad, g * w.detach() * _hand_proxy(name, kwargs, m.detach()))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [c for c in STE_CASES if c[0] != "hardtanh"],
)
def test_positive_proxy_everywhere_except_hardtanh(name, kwargs):
    m = torch.linspace(-10, 10, 2001).requires_grad_()
    heaviside(m, get_ste(name, **kwargs)).sum().backward()
    assert (m.grad > 0).all()


def test_hardtanh_proxy_is_zero_outside_unit_interval():
    m = torch.linspace(-10, 10, 2001).requires_grad_()
    heaviside(m, get_ste("hardtanh")).sum().backward()
    assert (m.grad[m.detach().abs() > 1] == 0).all()
    assert (m.grad[m.detach().abs() <= 1] == 1).all()
    assert (m.grad == 0).any()


@pytest.mark.parametrize(
    ("name", "kwargs", "cls", "hparams"),
    [
        ("identity", {}, IdentitySTE, {}),
        ("leaky_relu", {}, LeakyReLUSTE, {"alpha": 0.1}),
        ("leaky_relu", {"alpha": 0.3}, LeakyReLUSTE, {"alpha": 0.3}),
        ("softplus", {}, SoftplusSTE, {"beta": 1.0}),
        ("softplus", {"beta": 4}, SoftplusSTE, {"beta": 4.0}),
        ("hardtanh", {}, HardtanhSTE, {}),
    ],
)
def test_get_ste_by_name(name, kwargs, cls, hparams):
    est = get_ste(name, **kwargs)
    assert type(est) is cls
    assert est.name == name
    assert est.hparams() == hparams
    assert get_ste(name, **kwargs) == est


@pytest.mark.parametrize("est", [IdentitySTE(), LeakyReLUSTE(0.5), SoftplusSTE(2.0), HardtanhSTE()])
def test_get_ste_passes_instances_through(est):
    assert get_ste(est) is est


def test_get_ste_instance_with_kwargs_errors():
    with pytest.raises(ValueError, match="only together with an STE name"):
        get_ste(LeakyReLUSTE(), alpha=0.2)


@pytest.mark.parametrize("bad", ["nope", "Identity", "", None, 3])
def test_get_ste_unknown_name(bad):
    with pytest.raises(ValueError, match="unknown STE"):
        get_ste(bad)


def test_get_ste_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="hardtanh, identity, leaky_relu, softplus"):
        get_ste("relu")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("identity", {"alpha": 0.1}),
        ("hardtanh", {"beta": 1.0}),
        ("leaky_relu", {"beta": 1.0}),
        ("softplus", {"alpha": 0.1}),
        ("leaky_relu", {"alpha": None}),
    ],
)
def test_get_ste_bad_kwargs(name, kwargs):
    with pytest.raises(ValueError, match="bad hyper-parameters"):
        get_ste(name, **kwargs)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.0001, 2.0, float("nan"), float("inf")])
def test_leaky_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        get_ste("leaky_relu", alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        LeakyReLUSTE(alpha)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("-inf")])
def test_softplus_beta_not_positive(beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        get_ste("softplus", beta=beta)
    with pytest.raises(ValueError, match="beta"):
        SoftplusSTE(beta)


def test_available_stes():
    names = available_stes()
    assert names == sorted(names)
    assert set(names) >= {"identity", "leaky_relu", "softplus", "hardtanh"}
    for n in names:
        assert get_ste(n).name == n


def test_ste_equality_and_hash():
    assert IdentitySTE() == IdentitySTE()
    assert LeakyReLUSTE(0.2) == LeakyReLUSTE(0.2)
    assert LeakyReLUSTE(1) == LeakyReLUSTE(1.0)
    assert LeakyReLUSTE(0.2) != LeakyReLUSTE(0.3)
    assert SoftplusSTE(1.0) != SoftplusSTE(2.0)
    assert IdentitySTE() != HardtanhSTE()
    assert IdentitySTE() != "identity"
    assert hash(LeakyReLUSTE(0.2)) == hash(LeakyReLUSTE(0.2))
    assert hash(IdentitySTE()) == hash(IdentitySTE())
    assert (
        len({IdentitySTE(), IdentitySTE(), LeakyReLUSTE(0.2), LeakyReLUSTE(0.2), HardtanhSTE()})
        == 3
    )


@pytest.mark.parametrize(
    ("est", "text"),
    [
        (IdentitySTE(), "IdentitySTE()"),
        (HardtanhSTE(), "HardtanhSTE()"),
        (LeakyReLUSTE(0.2), "LeakyReLUSTE(alpha=0.2)"),
        (SoftplusSTE(3), "SoftplusSTE(beta=3.0)"),
    ],
)
def test_ste_repr(est, text):
    assert repr(est) == text


@pytest.mark.parametrize("est", [IdentitySTE(), LeakyReLUSTE(0.5), SoftplusSTE(2.0), HardtanhSTE()])
def test_ste_pickles(est):
    again = pickle.loads(pickle.dumps(est))
    assert again == est and again is not est


def test_register_ste_duplicate_name_errors_and_custom_ste_works():
    registry = ste_module._REGISTRY
    before = dict(registry)
    try:

        class Impostor(STE):
            name = "identity"

            def proxy(self, m):
                return torch.zeros_like(m)

        with pytest.raises(ValueError, match="'identity' is already registered"):
            register_ste(Impostor)
        assert registry["identity"] is IdentitySTE

        # Re-registering the same class is a no-op, not an error.
        assert register_ste(IdentitySTE) is IdentitySTE

        class Nameless(STE):
            pass

        with pytest.raises(ValueError, match="non-empty class attribute `name`"):
            register_ste(Nameless)

        @register_ste
        class Double(STE):
            name = "test_double"

            def proxy(self, m):
                return torch.full_like(m, 2.0)

        assert "test_double" in available_stes()
        m = torch.tensor([-1.0, 1.0], requires_grad=True)
        heaviside(m, get_ste("test_double")).sum().backward()
        assert m.grad.tolist() == [2.0, 2.0]
    finally:
        registry.clear()
        registry.update(before)
    assert "test_double" not in available_stes()


def test_base_ste_proxy_not_implemented():
    with pytest.raises(NotImplementedError):
        STE().proxy(torch.zeros(1))


def test_step_in_another_dtype_and_nan_is_pruned():
    m = torch.tensor([float("nan"), -1.0, 0.0, 2.0])
    h = step(m, torch.bfloat16)
    assert h.dtype == torch.bfloat16
    assert h.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert not h.requires_grad and not step(m.requires_grad_()).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_positive_is_exact_beyond_the_dtype_range(dtype):
    m = torch.ones(5000, dtype=dtype)  # bfloat16 holds every integer only up to 256
    m[::7] = -1.0
    assert count_positive(m).item() == 5000 - len(range(0, 5000, 7))
