import pytest
import torch
from torch import nn

from scl_lightning.nn.masked import MaskedConv2d, MaskedLinear
from scl_lightning.nn.sparsify import masked_modules, sparsify
from scl_lightning.nn.stats import (
    LayerConnectivity,
    connection_count,
    global_sparsity,
    layer_connectivity,
    layer_sparsity,
    total_connections,
)
from scl_lightning.nn.ste import get_ste


def _net(ste="identity", **ste_kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),  # 18 connections
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 5),  # 40
        nn.ReLU(),
        nn.Linear(5, 3, bias=False),  # 15
    )
    return sparsify(model, ste=ste, ste_kwargs=ste_kwargs or None)


N_TOTAL = 18 + 40 + 15


def _prune(model):
    """Set masks to values of both signs (some beyond |1|); return active counts per layer."""
    with torch.no_grad():
        model[0].mask.view(-1)[:5] = -0.5  # 13 active
        model[3].mask.copy_(torch.linspace(-3, 3, 40).view(5, 8))  # 20 active (> 0)
        model[5].mask.fill_(-2.0)
        model[5].mask[0, :2] = 0.0  # exactly zero counts as pruned
        model[5].mask[2, 1] = 1.5  # 1 active
    return {"0": 13, "3": 20, "5": 1}


def test_connection_count_value_and_dtype():
    model = _net()
    assert connection_count(model).item() == N_TOTAL
    active = _prune(model)
    c = connection_count(model)
    assert c.shape == ()
    assert c.dtype == torch.float32
    assert c.requires_grad
    assert c.item() == sum(active.values()) == 34
    torch.testing.assert_close(connection_count(model, density=True), torch.tensor(34 / N_TOTAL))


@pytest.mark.parametrize(
    ("ste", "kwargs"),
    [("identity", {}), ("leaky_relu", {"alpha": 0.1}), ("leaky_relu", {"alpha": 0.4})],
)
@pytest.mark.parametrize("density", [False, True])
def test_connection_count_gradient_is_proxy(ste, kwargs, density):
    model = _net(ste, **kwargs)
    _prune(model)
    est = get_ste(ste, **kwargs)
    connection_count(model, density=density).backward()
    scale = 1.0 / N_TOTAL if density else 1.0
    for name, layer in masked_modules(model):
        expected = est.proxy(layer.mask.detach()) * scale
        torch.testing.assert_close(layer.mask.grad, expected, msg=name)
        # Weights do not enter C.
        assert layer.raw_weight.grad is None
    if ste == "leaky_relu":
        # A pruned mask gets alpha (not 1): the gradient really depends on the estimator.
        assert model[5].mask.grad[0, 0].item() == pytest.approx(kwargs["alpha"] * scale)


def test_connection_count_mixed_stes_in_one_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        MaskedLinear(4, 3, ste="leaky_relu"),
        MaskedLinear(3, 3, ste="softplus"),
        MaskedConv2d(1, 2, 2, ste="hardtanh"),
    )
    masks = [
        torch.tensor([[-2.0, 1.0, 0.5, -0.1]] * 3),
        torch.linspace(-2, 2, 9).view(3, 3),
        torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0]).view(2, 1, 2, 2),
    ]
    with torch.no_grad():
        for layer, m in zip(model, masks, strict=True):
            layer.mask.copy_(m)
    c = connection_count(model)
    assert c.item() == sum(int((m > 0).sum()) for m in masks) == 6 + 4 + 4
    c.backward()
    torch.testing.assert_close(model[0].mask.grad, torch.tensor([[0.1, 1.0, 1.0, 0.1]] * 3))
    torch.testing.assert_close(model[1].mask.grad, torch.sigmoid(masks[1]))
    torch.testing.assert_close(
        model[2].mask.grad,
        torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]).view(2, 1, 2, 2),
    )


def test_connection_count_float64_and_bfloat16_masks():
    model = _net()
    _prune(model)
    for dtype, mask_dtype in ((torch.float64, torch.float64), (torch.bfloat16, torch.float64)):
        m = model.to(dtype)
        assert m[3].mask.dtype == mask_dtype  # masks never drop below float32
        c = connection_count(m)
        assert c.dtype == torch.float32
        assert c.item() == 34
        c.backward()
        assert m[3].mask.grad.dtype == mask_dtype
        m.zero_grad()


def test_connection_count_exact_above_half_precision_range():
    layer = MaskedLinear(100, 41, bias=False, dtype=torch.bfloat16)  # 4100 > 2**8 precision
    layer.mask.data = layer.mask.data.bfloat16()  # masks are made float32: force bfloat16
    with torch.no_grad():
        layer.mask.view(-1)[:3] = -1.0
    assert connection_count(nn.Sequential(layer)).item() == 4097


def test_layer_sparsity_and_global_sparsity():
    model = _net()
    assert layer_sparsity(model) == {"0": 0.0, "3": 0.0, "5": 0.0}
    assert global_sparsity(model) == 0.0
    active = _prune(model)
    totals = {"0": 18, "3": 40, "5": 15}
    sp = layer_sparsity(model)
    assert list(sp) == ["0", "3", "5"]
    for name in totals:
        assert sp[name] == pytest.approx(1 - active[name] / totals[name])
    assert sp["5"] == pytest.approx(14 / 15)
    assert global_sparsity(model) == pytest.approx(1 - 34 / N_TOTAL)
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask.fill_(-1.0)
    assert global_sparsity(model) == 1.0
    assert set(layer_sparsity(model).values()) == {1.0}


def test_global_sparsity_is_connection_weighted_not_layer_mean():
    model = nn.Sequential(MaskedLinear(10, 10), MaskedLinear(10, 1))
    with torch.no_grad():
        model[1].mask.fill_(-1.0)  # small layer fully pruned
    assert layer_sparsity(model) == {"0": 0.0, "1": 1.0}
    assert global_sparsity(model) == pytest.approx(10 / 110)


def test_layer_connectivity_fields():
    model = _net()
    active = _prune(model)
    stats = layer_connectivity(model)
    assert all(isinstance(s, LayerConnectivity) for s in stats)
    assert [s.name for s in stats] == ["0", "3", "5"]
    assert [s.shape for s in stats] == [(2, 1, 3, 3), (5, 8), (3, 5)]
    assert [s.total for s in stats] == [18, 40, 15]
    assert [s.active for s in stats] == [active["0"], active["3"], active["5"]]
    assert all(type(s.active) is int and type(s.total) is int for s in stats)
    assert stats[2].sparsity == pytest.approx(14 / 15)
    with pytest.raises(AttributeError):
        stats[0].active = 3  # frozen


def test_layer_connectivity_sparsity_of_empty_layer():
    assert LayerConnectivity("x", (0, 3), 0, 0).sparsity == 0.0
    assert LayerConnectivity("x", (2, 2), 1, 4).sparsity == 0.75


def test_total_connections():
    model = _net()
    assert total_connections(model) == N_TOTAL
    _prune(model)
    assert total_connections(model) == N_TOTAL  # independent of pruning
    partly = sparsify(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), exclude="1")
    assert total_connections(partly) == 12


def test_stats_ignore_dense_layers_of_partly_masked_model():
    model = sparsify(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), exclude="0")
    with torch.no_grad():
        model[1].mask[0] = -1.0
    assert layer_sparsity(model) == {"1": 0.5}
    assert global_sparsity(model) == 0.5
    assert connection_count(model).item() == 4


@pytest.mark.parametrize(
    "fn",
    [
        connection_count,
        lambda m: connection_count(m, density=True),
        layer_sparsity,
        global_sparsity,
        layer_connectivity,
        total_connections,
    ],
)
@pytest.mark.parametrize(
    "model", [nn.Sequential(nn.Linear(2, 2)), nn.BatchNorm1d(3), nn.Sequential()]
)
def test_unmasked_model_errors(fn, model):
    with pytest.raises(ValueError, match="no masked layer"):
        fn(model)


# -- the forward pass's comparison, reused by the count --------------------------------------------


def _ops(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_forward_count_reuses_the_forward_pass_comparison():
    """``MaskedLayer.forward_count`` (what the SCL engine logs as ``C`` next to the loss) sums
    the forward pass's H(m) instead of comparing the mask again, once."""
    model = _net()
    expected = _prune(model)
    layers = [layer for _, layer in masked_modules(model)]
    out = model(torch.randn(2, 1, 4, 4))  # its graph holds H(m) until the backward pass
    ops = _ops(lambda: [layer.forward_count() for layer in layers])
    assert "aten::gt" not in ops, "the count compared the masks again"
    assert "aten::gt" in _ops(lambda: [layer.forward_count() for layer in layers])
    out = model(torch.randn(2, 1, 4, 4))
    assert sum(int(layer.forward_count()) for layer in layers) == sum(expected.values())
    del out


def test_forward_count_is_the_forward_pass_count_and_connection_count_the_current_one():
    model = _net()
    _prune(model)
    layer = model[5]
    out = model(torch.randn(2, 1, 4, 4))
    layer.mask.data.fill_(1.0)  # a write that no version counter sees
    # connection_count counts the masks as they are now (it returned the forward's stale
    # count after a write through .data before)
    assert connection_count(model).item() == 13 + 20 + 15
    # forward_count is, by definition, the count the forward pass used
    assert int(layer.forward_count()) == 1
    assert out.requires_grad


@pytest.mark.parametrize("change", ["in_place", "new_parameter"])
def test_connection_count_sees_a_mask_changed_after_the_forward(change):
    model = _net()
    _prune(model)
    out = model(torch.randn(2, 1, 4, 4))
    if change == "in_place":
        with torch.no_grad():
            model[5].mask.fill_(1.0)
    else:
        model[5].mask = nn.Parameter(torch.ones_like(model[5].mask))
    assert connection_count(model).item() == 13 + 20 + 15
    assert out.requires_grad  # the forward's graph was alive during the count


def test_connection_count_gradient_is_the_same_with_and_without_reuse():
    grads = []
    for forward_first in (True, False):
        model = _net("leaky_relu", alpha=0.25)
        _prune(model)
        out = model(torch.randn(2, 1, 4, 4)) if forward_first else None
        connection_count(model).backward()
        del out
        grads.append([layer.mask.grad.clone() for _, layer in masked_modules(model)])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_copies_do_not_carry_the_forward_comparison():
    import copy
    import pickle

    model = _net()
    model(torch.randn(2, 1, 4, 4))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all("_fresh_h" not in vars(layer) for _, layer in masked_modules(clone))
        assert connection_count(clone).item() == N_TOTAL


def test_connection_count_exact_above_float32_integer_range():
    # 4096 x 4097 = 2**24 + 4096 connections: a float32 sum of H(m) would round odd counts
    layer = MaskedLinear(4097, 4096, bias=False)
    with torch.no_grad():
        layer.mask[0, :3] = -1.0
    expected = 4096 * 4097 - 3
    out = layer(torch.ones(1, 4097))  # the count then sums the forward's H(m)
    assert connection_count(layer).item() == expected
    assert connection_count(layer).item() == expected  # and compares the mask itself
    del out
