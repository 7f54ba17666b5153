"""granularity="channel": one mask per output unit, every count still in connections."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scl_lightning._compat import CheckpointError, check_compatible
from scl_lightning.baselines import prune_by_magnitude
from scl_lightning.nn import (
    LayerCollapseGuard,
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    connection_count,
    connectivity,
    export_pruned,
    global_sparsity,
    heaviside,
    masked_modules,
    sparsify,
    total_connections,
)
from scl_lightning.nn.flops import flop_counts
from scl_lightning.nn.masked import mask_shape
from scl_lightning.nn.normalize import normalize_mask_gradient, normalize_per_feature
from scl_lightning.nn.ste import count_dtype, get_ste

DT = torch.float64
BAD = r"granularity must be one of 'weight', 'channel', got 'unit'"

# (id, layer factory, input shape)
LAYERS = [
    ("linear", lambda **kw: MaskedLinear(6, 5, dtype=DT, **kw), (3, 6)),
    ("conv1d", lambda **kw: MaskedConv1d(3, 4, 3, dtype=DT, **kw), (2, 3, 7)),
    ("conv2d", lambda **kw: MaskedConv2d(3, 4, 3, padding=1, dtype=DT, **kw), (2, 3, 5, 5)),
    ("conv2d_grouped", lambda **kw: MaskedConv2d(4, 6, 3, groups=2, dtype=DT, **kw), (2, 4, 5, 5)),
    ("depthwise", lambda **kw: MaskedConv2d(4, 4, 3, groups=4, dtype=DT, **kw), (2, 4, 5, 5)),
    ("conv3d", lambda **kw: MaskedConv3d(2, 3, 2, dtype=DT, **kw), (1, 2, 3, 3, 3)),
]
STES = ["identity", "leaky_relu", "softplus", "hardtanh"]


def _channel_layer(factory, ste="identity"):
    torch.manual_seed(0)
    layer = factory(granularity="channel", ste=ste)
    with torch.no_grad():
        layer.mask.copy_(
            torch.linspace(-1.5, 1.5, layer.mask.numel(), dtype=DT).view_as(layer.mask)
        )
    return layer


def _dense_forward(layer, x, weight):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


# -- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "factory", "shape"), LAYERS, ids=[c[0] for c in LAYERS])
def test_channel_mask_has_one_entry_per_output_unit(name, factory, shape):
    layer = factory(granularity="channel")
    w = layer.raw_weight
    assert layer.mask.shape == (w.shape[0],) + (1,) * (w.dim() - 1)
    assert layer.mask.dtype == DT and torch.all(layer.mask == 1.0)
    assert layer.per_mask == w[0].numel() and layer.connections == w.numel()
    assert layer.granularity == "channel"
    assert "granularity='channel'" in repr(layer)


@pytest.mark.parametrize(("name", "factory", "shape"), LAYERS, ids=[c[0] for c in LAYERS])
def test_weight_granularity_is_the_default(name, factory, shape):
    layer = factory()
    assert layer.granularity == "weight" and layer.mask.shape == layer.raw_weight.shape
    assert layer.per_mask == 1 and "granularity" not in repr(layer)


def test_sparsify_and_from_dense_take_the_granularity():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    sparsify(net, granularity="channel")
    assert net[0].mask.shape == (8, 1, 1, 1) and net[2].mask.shape == (10, 1)
    layer = MaskedLinear.from_dense(nn.Linear(3, 2), granularity="channel")
    assert layer.mask.shape == (2, 1)
    assert mask_shape((16, 3, 5, 5), "channel") == (16, 1, 1, 1)
    assert mask_shape((16, 3, 5, 5), "weight") == (16, 3, 5, 5)


def test_bad_granularity_is_one_clear_error():
    with pytest.raises(ValueError, match=BAD):
        sparsify(nn.Linear(3, 2), granularity="unit")
    with pytest.raises(ValueError, match=BAD):
        MaskedLinear(3, 2, granularity="unit")
    dense = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=BAD):
        MaskedLinear.from_dense(dense, granularity="unit")
    assert type(dense) is nn.Linear  # left as it was
    with pytest.raises(ValueError, match=r"granularity must be one of .*, got None"):
        sparsify(nn.Linear(3, 2), granularity=None)


# -- forward and gradients --------------------------------------------------------------------


@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize(("name", "factory", "shape"), LAYERS, ids=[c[0] for c in LAYERS])
def test_forward_and_gradients_are_those_of_the_broadcast_mask(name, factory, shape, ste):
    """Reference: ``w * heaviside(m)`` with ``m`` of shape (out, 1, ...), differentiated by
    autograd (which sums the broadcast)."""
    layer = _channel_layer(factory, ste)
    assert 0 < int((layer.mask > 0).sum()) < layer.mask.numel()  # some units on, some off
    x = torch.randn(shape, dtype=DT)
    out = layer(x)
    w = layer.raw_weight.detach().clone().requires_grad_(True)
    m = layer.mask.detach().clone().requires_grad_(True)
    ref = _dense_forward(layer, x, w * heaviside(m, get_ste(ste)))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # a unit switched off contributes nothing but its bias
    off = (layer.mask.detach().flatten() <= 0).nonzero().flatten()
    bias = layer.bias.detach().view(1, -1, *([1] * (out.dim() - 2)))
    torch.testing.assert_close(out[:, off], bias[:, off].expand_as(out[:, off]))

    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert layer.mask.grad.shape == layer.mask.shape
    torch.testing.assert_close(layer.mask.grad, m.grad)
    torch.testing.assert_close(layer.raw_weight.grad, w.grad)


@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize(("name", "factory", "shape"), LAYERS, ids=[c[0] for c in LAYERS])
def test_active_count_is_connections_and_its_gradient_fan_in_times_the_proxy(
    name, factory, shape, ste
):
    layer = _channel_layer(factory, ste)
    fan_in = layer.weight[0].numel()
    units_on = int((layer.mask > 0).sum())
    count = layer.active_count()
    assert count.item() == units_on * fan_in
    count.backward()
    proxy = layer.ste.proxy(layer.mask.detach())
    torch.testing.assert_close(layer.mask.grad, fan_in * proxy)
    assert layer.active_connections().item() == units_on * fan_in
    # the count of the latest forward pass, too, and the hard mask over every connection
    layer(torch.randn(shape, dtype=DT))
    assert layer.forward_count().item() == units_on * fan_in
    hard = layer.hard_mask()
    assert hard.shape == layer.raw_weight.shape and hard.sum().item() == units_on * fan_in
    assert torch.equal(hard, (layer.mask.detach() > 0).to(hard.dtype).expand_as(hard))


def test_network_counts_sparsity_and_flops_are_in_connections():
    net = sparsify(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)),
        granularity="channel",
    )
    with torch.no_grad():
        net[0].mask[1] = -1.0  # one filter of 27 weights
        net[2].mask[:2] = -1.0  # two units of 144 weights
    total = 4 * 27 + 5 * 144
    active = total - 27 - 2 * 144
    assert total_connections(net) == total
    c = connectivity(net)
    assert (c.active, c.total) == (active, total)
    assert [(x.active, x.total) for x in c.layers] == [(81, 108), (432, 720)]
    assert global_sparsity(net) == pytest.approx(1 - active / total)
    count = connection_count(net)
    assert count.item() == active
    count.backward()
    assert torch.all(net[0].mask.grad == 27) and torch.all(net[2].mask.grad == 144)
    density = connection_count(net, density=True)
    assert density.item() == pytest.approx(active / total)
    # effective FLOPs scale each layer by its active fraction of connections
    flops = flop_counts(net, torch.randn(1, 3, 8, 8))
    effective, per_layer = flops.effective(c.densities())
    assert per_layer["0"] == pytest.approx(flops.layers["0"] * 3 / 4)
    assert per_layer["2"] == pytest.approx(flops.layers["2"] * 3 / 5)
    assert effective == flops.total - flops.layers["0"] / 4 - flops.layers["2"] * 2 / 5


def test_count_dtype_counts_connections_not_mask_entries():
    m = torch.ones(1000, 1)
    assert count_dtype(m) == torch.float32
    assert count_dtype(m, per_entry=2**15) == torch.float64  # 32.8M connections > 2**24


# -- normalization ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rms", "l2", "max"])
def test_channel_gradient_is_normalized_over_the_layer(mode):
    grad = torch.tensor([[1.0], [-2.0], [4.0], [0.0]])
    out = normalize_mask_gradient(grad, mode, granularity="channel")
    # the ratios between units survive (per feature, each would be +-1: sign SGD)
    torch.testing.assert_close(out / out[2], grad / grad[2])
    assert torch.equal(
        normalize_per_feature(grad, mode).abs().flatten(), torch.tensor([1.0, 1, 1, 0])
    )
    scale = {
        "rms": grad.pow(2).mean().sqrt(),
        "l2": grad.norm(),
        "max": grad.abs().max(),
    }[mode]
    torch.testing.assert_close(out, grad / scale)
    # in place, conv-shaped, whatever the memory layout
    conv = torch.randn(6, 1, 1, 1)
    expect = normalize_mask_gradient(conv.view(6, 1), mode, granularity="channel").view_as(conv)
    same = normalize_mask_gradient(conv, mode, granularity="channel", inplace=True)
    assert same is conv
    torch.testing.assert_close(conv, expect)


def test_weight_granularity_still_normalizes_per_feature():
    grad = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    torch.testing.assert_close(
        normalize_mask_gradient(grad, "l2"), normalize_per_feature(grad, "l2"), rtol=0, atol=0
    )


# -- export, copies, checkpoints --------------------------------------------------------------


def test_export_pruned_zeroes_whole_rows_and_loads_into_the_dense_model():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    net = sparsify(copy.deepcopy(dense), granularity="channel")
    with torch.no_grad():
        net[0].mask[[0, 2]] = -1.0
        net[3].mask[4] = -0.1
    plain = export_pruned(net)
    state = plain.state_dict()
    assert not any(k.endswith(".mask") for k in state)
    w0, w3 = state["0.weight"], state["3.weight"]
    assert torch.all(w0[[0, 2]] == 0) and torch.all(w0[[1, 3]] == net[0].raw_weight[[1, 3]])
    assert torch.all(w3[4] == 0) and torch.all(w3[:4] == net[3].raw_weight[:4])
    dense.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dense(x), net(x))
    assert "granularity" not in vars(plain[0]) and not hasattr(plain[0], "granularity")


def test_copies_keep_the_granularity_and_old_pickles_default_to_weight():
    layer = MaskedLinear(4, 3, granularity="channel")
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin.granularity == "channel" and twin.mask.shape == (3, 1)
    old = MaskedLinear(4, 3)
    del old.__dict__["granularity"]  # a layer pickled before the option existed
    assert pickle.loads(pickle.dumps(old)).granularity == "weight"


def test_state_dict_round_trip_and_a_mismatch_is_named():
    net = sparsify(nn.Sequential(nn.Linear(4, 3)), granularity="channel")
    with torch.no_grad():
        net[0].mask[1] = -1.0
    twin = sparsify(nn.Sequential(nn.Linear(4, 3)), granularity="channel")
    twin.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(twin[0].mask, net[0].mask)
    weight_net = sparsify(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(CheckpointError, match=r"granularity 'channel' .* this model's 'weight'"):
        check_compatible(weight_net.state_dict(), net.state_dict())
    with pytest.raises(CheckpointError, match=r"granularity 'weight' .* this model's 'channel'"):
        check_compatible(net.state_dict(), weight_net.state_dict())


# -- the guard and the baselines --------------------------------------------------------------


def test_collapse_guard_revives_enough_units_for_its_floor():
    net = sparsify(nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2)), granularity="channel")
    with torch.no_grad():
        net[0].mask.copy_(torch.tensor([[-0.4], [-0.1], [-0.3], [-0.2]]))
    # 15 connections need 2 units of 10: the two strongest (the largest m)
    assert LayerCollapseGuard(min_connections=15).check(net, warn=False) == ["0"]
    assert (net[0].mask.flatten() > 0).tolist() == [False, True, False, True]
    assert connectivity(net).layers[0].active == 20


def test_magnitude_pruning_refuses_channel_layers():
    net = sparsify(nn.Sequential(nn.Linear(4, 3)), granularity="channel")
    with pytest.raises(ValueError, match=r"layer '0' is masked with granularity='channel'"):
        prune_by_magnitude(net, 0.5)


def test_mixed_granularities_in_one_network():
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sparsify(net, exclude=["1"], granularity="channel")
    sparsify(net)  # masks only what is still dense, with its own granularity
    assert [layer.granularity for _, layer in masked_modules(net)] == ["channel", "weight"]
    assert total_connections(net) == 12 + 6


# -- torch.compile and channels_last ----------------------------------------------------------


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    sparsify(net, granularity="channel")
    with torch.no_grad():
        for _, layer in masked_modules(net):
            layer.mask.copy_(torch.randn_like(layer.mask))
    return net


def _grads(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = net(x)
    out.square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return out.detach(), grads


def test_channel_masks_compile_in_one_graph_and_match_eager():
    net = _cnn()
    x = torch.randn(2, 3, 6, 6)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    out_e, grads_e = _grads(net, x)
    out_c, grads_c = _grads(torch.compile(net, backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(out_c, out_e)
    assert grads_c.keys() == grads_e.keys()
    for key, grad in grads_c.items():
        torch.testing.assert_close(grad, grads_e[key], msg=key)


def test_channel_masks_under_channels_last():
    net = _cnn()
    x = torch.randn(2, 3, 6, 6)
    out_ref, grads_ref = _grads(net, x)
    net = net.to(memory_format=torch.channels_last)
    out, grads = _grads(net, x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[key], rtol=1e-4, atol=1e-5, msg=key)
        if key.endswith(".mask"):
            normalized = normalize_mask_gradient(grad.clone(), granularity="channel")
            expect = normalize_mask_gradient(grad.contiguous(), granularity="channel")
            torch.testing.assert_close(normalized, expect)


def test_save_pruned_writes_whole_zero_rows_and_counts_connections(tmp_path):
    from scl_lightning.deploy import load_pruned, save_pruned

    net = sparsify(
        nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), granularity="channel"
    )
    with torch.no_grad():
        net[0].mask[[1, 3]] = -1.0
    tensors, meta = load_pruned(save_pruned(net, tmp_path / "net.safetensors"))
    assert torch.all(tensors["0.weight"][[1, 3]] == 0) and torch.all(
        tensors["0.weight"][[0, 2]] != 0
    )
    assert (meta["active_connections"], meta["total_connections"]) == ("24", "36")
    plain = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    plain.load_state_dict(tensors, strict=True)
    x = torch.randn(2, 6)
    torch.testing.assert_close(plain(x), net(x))
