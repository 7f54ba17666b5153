import io

import pytest
import torch
from torch import nn

from scl_lightning.nn.masked import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLayer,
    MaskedLinear,
)
from scl_lightning.nn.sparsify import (
    export_pruned,
    mask_spec,
    maskable_modules,
    masked_modules,
    sparsify,
    sparsify_like,
)
from scl_lightning.nn.ste import HardtanhSTE, LeakyReLUSTE, SoftplusSTE

DENSE_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Zoo(nn.Module):
    """A model written 'by someone else': nested containers and many layer types."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.blocks = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU()),
                "b": nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1)), nn.BatchNorm2d(4)),
            }
        )
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.seq1d = nn.Conv1d(3, 3, 3, padding=1)
        self.vol = nn.Conv3d(1, 2, 2)
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 5, bias=False)])
        self.head = nn.Linear(2 * 8 * 8 + 3 * 6 + 2 * 27 + 5, 3)

    def forward(self, img, seq, vol, tokens):
        x = self.bn(self.stem(img))
        x = self.blocks["a"](x)
        x = self.blocks["b"](x)
        x = self.up(x).flatten(1)
        s = self.seq1d(seq).flatten(1)
        v = self.vol(vol).flatten(1)
        e = self.emb(tokens)
        e, _ = self.attn(e, e, e)
        for layer in self.layers:
            e = layer(e)
        e = e.mean(1)
        return self.head(torch.cat([x, s, v, e], dim=1))


ZOO_MASKABLE = [
    "stem",
    "blocks.a.0",
    "blocks.b.0.0",
    "seq1d",
    "vol",
    "attn",
    "attn.out_proj",
    "layers.0",
    "layers.2",
    "head",
]


def _zoo_inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 2, 4, 4, generator=g),
        torch.randn(2, 3, 6, generator=g),
        torch.randn(2, 1, 4, 4, 4, generator=g),
        torch.randint(0, 10, (2, 5), generator=g),
    )


def _zoo():
    torch.manual_seed(0)
    return Zoo().eval()


def test_sparsify_converts_exactly_the_maskable_layers():
    model = _zoo()
    out = sparsify(model)
    assert out is model
    assert [n for n, _ in masked_modules(model)] == ZOO_MASKABLE
    assert type(model.stem) is MaskedConv2d
    assert type(model.blocks["a"][0]) is MaskedConv2d
    assert type(model.blocks["b"][0][0]) is MaskedConv2d
    assert type(model.seq1d) is MaskedConv1d
    assert type(model.vol) is MaskedConv3d
    assert type(model.layers[0]) is MaskedLinear
    assert type(model.layers[2]) is MaskedLinear
    assert type(model.head) is MaskedLinear
    # Never masked:
    assert type(model.bn) is nn.BatchNorm2d
    assert type(model.blocks["b"][1]) is nn.BatchNorm2d
    assert type(model.up) is nn.ConvTranspose2d
    assert type(model.emb) is nn.Embedding
    assert type(model.layers[1]) is nn.LayerNorm
    assert isinstance(model.attn, nn.MultiheadAttention) and isinstance(model.attn, MaskedLayer)
    assert isinstance(model.attn.out_proj, MaskedLinear)
    mask_names = {n for n, _ in model.named_parameters() if n.endswith("mask")}
    assert mask_names == {f"{n}.mask" for n in ZOO_MASKABLE}
    # Biases never masked: exactly one mask per weight.
    for name, module in masked_modules(model):
        assert module.mask.shape == module.raw_weight.shape, name
    assert not any("bias" in n and "mask" in n for n in model.state_dict())


def test_outputs_unchanged_and_pretrained_parameters_kept():
    model = _zoo()
    inputs = _zoo_inputs()
    ref = model(*inputs)
    params_before = dict(model.named_parameters())
    values_before = {n: p.detach().clone() for n, p in params_before.items()}
    sparsify(model, mask_init=0.25)
    params_after = dict(model.named_parameters())
    for name, p in params_before.items():
        assert params_after[name] is p, name
        assert torch.equal(p, values_before[name]), name
    assert set(params_after) - set(params_before) == {f"{n}.mask" for n in ZOO_MASKABLE}
    torch.testing.assert_close(model(*inputs), ref, rtol=0, atol=0)
    for _, module in masked_modules(model):
        assert (module.mask == 0.25).all()


def test_multihead_attention_is_masked_in_and_out_and_still_computes_the_same():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2, batch_first=True))
    model.add_module("proj", nn.Linear(8, 8))
    x = torch.randn(2, 3, 8)
    ref, _ = model.attn(x, x, x)
    sparsify(model)
    assert [n for n, _ in masked_modules(model)] == ["attn", "attn.out_proj", "proj"]
    assert model.attn.mask.shape == model.attn.raw_weight.shape == (24, 8)
    assert "attn.in_proj_weight" in model.state_dict() and not hasattr(model.attn, "weight")
    out, _ = model.attn(x, x, x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert model.attn.raw_weight.grad is not None and model.attn.mask.grad is not None
    assert model.attn.out_proj.mask.grad is not None
    # the masks act, on the training path and on the eval fast path alike
    with torch.no_grad():
        model.attn.mask[16:].fill_(-1.0)  # every value projection off: values are the bias
        model.attn.out_proj.mask[0].fill_(-1.0)
    slow, _ = model.attn(x, x, x)
    v_bias = model.attn.in_proj_bias[16:]
    expected = model.attn.out_proj(v_bias.expand(2, 3, 8))
    torch.testing.assert_close(slow, expected)
    model.eval()
    with torch.no_grad():
        fast, _ = model.attn(x, x, x)
    torch.testing.assert_close(fast, expected.detach())


def test_masked_layer_masks_actually_change_zoo_output():
    model = sparsify(_zoo())
    inputs = _zoo_inputs()
    ref = model(*inputs)
    with torch.no_grad():
        model.head.mask.fill_(-1.0)
    assert not torch.allclose(model(*inputs), ref)
    torch.testing.assert_close(model(*inputs), model.head.bias.expand(2, 3))


@pytest.mark.parametrize(
    ("exclude", "excluded"),
    [
        ("head", {"head"}),
        (["head"], {"head"}),
        (("stem", "vol"), {"stem", "vol"}),
        ("blocks", {"blocks.a.0", "blocks.b.0.0"}),
        ("blocks.b", {"blocks.b.0.0"}),
        ("blocks.*", {"blocks.a.0", "blocks.b.0.0"}),
        ("layers.*", {"layers.0", "layers.2"}),
        ("layers.[0-1]", {"layers.0"}),
        ("*.0", {"blocks.a.0", "blocks.b.0.0", "layers.0"}),
        ("s*", {"stem", "seq1d"}),
        (["head", "blocks"], {"head", "blocks.a.0", "blocks.b.0.0"}),
    ],
)
def test_exclude_patterns(exclude, excluded):
    model = sparsify(_zoo(), exclude=exclude)
    assert [n for n, _ in masked_modules(model)] == [n for n in ZOO_MASKABLE if n not in excluded]
    modules = dict(model.named_modules())
    for name in excluded:
        assert type(modules[name]) in DENSE_CLASSES, name


def test_exclude_does_not_match_prefix_of_other_names():
    model = nn.Sequential()
    model.add_module("head", nn.Linear(2, 2))
    model.add_module("header", nn.Linear(2, 2))
    sparsify(model, exclude="head")
    assert [n for n, _ in masked_modules(model)] == ["header"]


@pytest.mark.parametrize("exclude", ["nothing_here", ["head", "typo"], "bn", "up"])
def test_exclude_pattern_matching_nothing_warns(exclude):
    with pytest.warns(UserWarning, match="matched no maskable layer"):
        sparsify(_zoo(), exclude=exclude)


def test_exclude_warning_names_only_unmatched_pattern():
    with pytest.warns(UserWarning, match=r"\['typo'\]"):
        model = sparsify(_zoo(), exclude=["head", "typo"])
    assert "head" not in dict(masked_modules(model))


@pytest.mark.parametrize("bad", [[""], [None], [3]])
def test_exclude_bad_patterns(bad):
    with pytest.raises(ValueError, match="exclude patterns must be non-empty strings"):
        sparsify(_zoo(), exclude=bad)


def test_second_call_is_idempotent():
    model = sparsify(_zoo(), ste="leaky_relu", ste_kwargs={"alpha": 0.3})
    with torch.no_grad():
        model.head.mask.fill_(-2.0)
    masks = {n: m.mask for n, m in masked_modules(model)}
    sparsify(model, ste="softplus", mask_init=3.0)
    assert {n: m.mask for n, m in masked_modules(model)} == masks
    for _, m in masked_modules(model):
        assert m.ste == LeakyReLUSTE(0.3)
        assert isinstance(m.mask, nn.Parameter)
    assert (model.head.mask == -2.0).all()
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("mask")) == len(ZOO_MASKABLE)


def test_second_call_masks_previously_excluded_layers():
    model = sparsify(_zoo(), exclude="head")
    assert "head" not in dict(masked_modules(model))
    sparsify(model)
    assert [n for n, _ in masked_modules(model)] == ZOO_MASKABLE


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()),
        nn.Embedding(4, 2),
        nn.ConvTranspose2d(1, 1, 2),
        nn.Bilinear(2, 2, 2),
        nn.Sequential(),
    ],
)
def test_nothing_to_mask_errors(model):
    with pytest.raises(ValueError, match=r"no Linear or convolution layer to mask"):
        sparsify(model)


def test_everything_excluded_errors():
    with pytest.raises(ValueError, match=r"after excluding \['\*'\].*exclude"):
        sparsify(_zoo(), exclude="*")
    with pytest.raises(ValueError, match="exclude"):
        sparsify(nn.Sequential(nn.Linear(2, 2)), exclude=["0"])


@pytest.mark.parametrize("bad", [None, "model", torch.zeros(2), [nn.Linear(2, 2)]])
def test_non_module_type_error(bad):
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        sparsify(bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True])
def test_bad_mask_init(bad):
    model = _zoo()
    with pytest.raises(ValueError, match="mask_init"):
        sparsify(model, mask_init=bad)
    assert not list(masked_modules(model))


def test_bad_ste_leaves_model_untouched():
    model = _zoo()
    with pytest.raises(ValueError, match="unknown STE"):
        sparsify(model, ste="nope")
    with pytest.raises(ValueError, match="alpha"):
        sparsify(model, ste="leaky_relu", ste_kwargs={"alpha": 5.0})
    assert not list(masked_modules(model))


@pytest.mark.parametrize(
    ("ste", "ste_kwargs", "expected"),
    [
        ("leaky_relu", {"alpha": 0.05}, LeakyReLUSTE(0.05)),
        ("softplus", {"beta": 4.0}, SoftplusSTE(4.0)),
        ("hardtanh", None, HardtanhSTE()),
        (SoftplusSTE(2.0), None, SoftplusSTE(2.0)),
    ],
)
def test_ste_passed_to_every_layer(ste, ste_kwargs, expected):
    model = sparsify(_zoo(), ste=ste, ste_kwargs=ste_kwargs)
    layers = list(masked_modules(model))
    assert len(layers) == len(ZOO_MASKABLE)
    for name, layer in layers:
        assert layer.ste == expected, name
    # The estimator is used in backward: check one layer's mask gradient against its proxy.
    layer = model.layers[0]
    with torch.no_grad():
        layer.mask.copy_(torch.linspace(-3, 3, layer.mask.numel()).view_as(layer.mask))
    x = torch.randn(4, 8)
    out = layer(x)
    out.sum().backward()
    g_eff = torch.ones(4, 8).T @ x  # d(sum(x W^T))/dW
    torch.testing.assert_close(
        layer.mask.grad, g_eff * layer.raw_weight.detach() * expected.proxy(layer.mask.detach())
    )


def test_ste_instance_with_kwargs_errors():
    with pytest.raises(ValueError, match="only together with an STE name"):
        sparsify(_zoo(), ste=LeakyReLUSTE(), ste_kwargs={"alpha": 0.2})


def test_sparsify_plain_layer_at_top_level():
    layer = nn.Linear(3, 2)
    assert sparsify(layer) is layer
    assert type(layer) is MaskedLinear
    assert [n for n, _ in masked_modules(layer)] == [""]


def test_shared_layer_masked_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(model)
    assert [n for n, _ in masked_modules(model)] == ["0"]
    assert model[2] is model[0] and type(model[2]) is MaskedLinear


def test_maskable_modules_includes_dense_and_masked():
    model = sparsify(_zoo(), exclude=["head", "vol"])
    maskable = list(maskable_modules(model))
    assert [n for n, _ in maskable] == ZOO_MASKABLE
    kinds = {n: isinstance(m, MaskedLayer) for n, m in maskable}
    assert kinds["head"] is False and kinds["vol"] is False
    assert kinds["stem"] is True and kinds["layers.2"] is True
    assert [n for n, _ in maskable_modules(_zoo())] == ZOO_MASKABLE


def test_masked_modules_empty_on_dense_model():
    assert list(masked_modules(_zoo())) == []


# --------------------------------------------------------------------------- export_pruned


def make_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4, 10),
    )


def make_mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10)
    )


ARCHS = [(make_cnn, (3, 1, 8, 8)), (make_mlp, (3, 1, 8, 8))]


def _trained_like(factory, seed=0):
    torch.manual_seed(seed)
    model = sparsify(factory())
    # Non-trivial BN statistics so that eval-mode outputs depend on the buffers too.
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask.copy_(torch.randn(layer.mask.shape, generator=gen))  # ~half pruned
    return model.eval()


@pytest.mark.parametrize(("factory", "x_shape"), ARCHS, ids=["cnn", "mlp"])
def test_export_pruned_roundtrip(factory, x_shape):
    model = _trained_like(factory)
    fractions = [(layer.mask > 0).float().mean().item() for _, layer in masked_modules(model)]
    assert all(0.2 < f < 0.8 for f in fractions)
    masks_before = {n: layer.mask.detach().clone() for n, layer in masked_modules(model)}
    weights_before = {n: layer.raw_weight.detach().clone() for n, layer in masked_modules(model)}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    plain = export_pruned(model)

    assert plain is not model
    assert not list(masked_modules(plain))
    for module in plain.modules():
        assert not isinstance(module, MaskedLayer)
        assert not hasattr(module, "mask") and not hasattr(module, "ste")
    for name, module in plain.named_modules():
        if name in masks_before:
            assert type(module) in DENSE_CLASSES
    assert not any("mask" in k for k in plain.state_dict())
    # Pruned weights are exactly zero, kept weights unchanged.
    plain_modules = dict(plain.named_modules())
    for name, m in masks_before.items():
        w = plain_modules[name].weight
        assert torch.equal(w, weights_before[name] * (m > 0))

    # The original is untouched.
    assert [n for n, _ in masked_modules(model)] == list(masks_before)
    for name, layer in masked_modules(model):
        assert torch.equal(layer.mask, masks_before[name])
        assert torch.equal(layer.raw_weight, weights_before[name])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k

    # Loads strictly into a freshly built, never-masked architecture; same outputs.
    fresh = factory()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval()
    plain.eval()
    x = torch.randn(x_shape)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fresh(x), expected)
        torch.testing.assert_close(plain(x), expected)
        # Sanity: pruning mattered (unpruned dense weights would give other outputs).
        dense = factory()
        dense.load_state_dict(
            {k: v for k, v in model.state_dict().items() if not k.endswith("mask")}, strict=True
        )
        dense.eval()
        assert not torch.allclose(dense(x), expected)


def test_export_pruned_partially_masked_model():
    torch.manual_seed(0)
    model = sparsify(make_mlp(), exclude="5")
    with torch.no_grad():
        model[1].mask[:, ::2] = -1.0
    plain = export_pruned(model)
    assert [type(m) for m in plain] == [type(m) for m in make_mlp()]
    assert (plain[1].weight[:, ::2] == 0).all()
    assert torch.equal(plain[5].weight, model[5].weight)
    assert plain[5].weight is not model[5].weight
    fresh = make_mlp()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(fresh(x), model(x))


def test_export_pruned_zoo_keeps_other_layers():
    model = sparsify(_zoo())
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask.view(-1)[::3] = -1.0
    plain = export_pruned(model).eval()
    fresh = Zoo().eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    inputs = _zoo_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs), model(*inputs))


def test_export_pruned_result_is_trainable_dense():
    model = _trained_like(make_mlp)
    plain = export_pruned(model)
    plain(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in plain.parameters())
    assert all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("factory", [make_cnn, make_mlp, lambda: nn.BatchNorm1d(2)])
def test_export_pruned_unmasked_model_errors(factory):
    with pytest.raises(ValueError, match="has no masked layer"):
        export_pruned(factory())


def test_sparsify_again_with_another_estimator_warns_and_names_the_layers():
    import warnings as _warnings

    net = sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        sparsify(net)  # the same settings: nothing to say
    with pytest.warns(UserWarning, match=r"2 layer\(s\) are already masked .* keep it: 0 \("):
        sparsify(net, ste="softplus")
    assert type(net[0].ste).__name__ == "IdentitySTE"  # kept, as the warning says


# -- mask_spec / sparsify_like: a network's masked layers described, and rebuilt --------------


def test_mask_spec_round_trips_layers_estimators_and_granularity():
    trained = sparsify(
        Zoo(), exclude=["head", "blocks.b"], ste="leaky_relu", ste_kwargs={"alpha": 0.2}
    )
    with pytest.warns(UserWarning, match="already masked"):
        sparsify(trained, granularity="channel", ste="softplus")  # the rest, another way
    spec = mask_spec(trained)
    assert spec["stem"] == {
        "ste": "leaky_relu",
        "ste_kwargs": {"alpha": 0.2},
        "granularity": "weight",
    }
    assert spec["head"] == {
        "ste": "softplus",
        "ste_kwargs": {"beta": 1.0},
        "granularity": "channel",
    }

    fresh = sparsify_like(Zoo(), spec)
    assert mask_spec(fresh) == spec
    fresh.load_state_dict(trained.state_dict(), strict=True)
    for (_, a), (_, b) in zip(masked_modules(trained), masked_modules(fresh), strict=True):
        assert a.ste == b.ste and a.granularity == b.granularity


def test_mask_spec_loads_with_weights_only():
    spec = mask_spec(sparsify(nn.Sequential(nn.Linear(3, 2))))
    assert spec == {"0": {"ste": "identity", "ste_kwargs": {}, "granularity": "weight"}}
    buffer = io.BytesIO()
    torch.save({"spec": spec}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == {"spec": spec}


def test_sparsify_like_defaults_and_a_network_that_is_one_layer():
    layer = sparsify_like(nn.Linear(3, 2), {"": {}})
    assert isinstance(layer, MaskedLinear) and layer.granularity == "weight"
    assert layer.ste.name == "identity" and bool((layer.mask == 1).all())


def test_sparsify_like_keeps_layers_masked_already():
    net = sparsify(nn.Sequential(nn.Linear(3, 2)), ste="hardtanh")
    sparsify_like(net, {"0": {"ste": "softplus", "granularity": "channel"}})
    assert net[0].ste == HardtanhSTE() and net[0].mask.shape == (2, 3)


def test_sparsify_like_masks_a_shared_layer_once():
    shared = nn.Linear(3, 3)
    trained = sparsify(nn.Sequential(shared, nn.ReLU(), shared))
    spec = {"0": {}, "2": {}}  # a state dict names a shared layer under each of its names
    layer = nn.Linear(3, 3)
    fresh = sparsify_like(nn.Sequential(layer, nn.ReLU(), layer), spec)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], MaskedLinear)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"9": {}}, r"^Sequential has no layer '9' to mask; Sequential is not the network that"),
        ({"1": {}}, r"^Sequential.1 is a ReLU, not a layer sparsify masks \(no weight\); "),
        ({"0": {"ste": "mine"}}, r"layer '0': unknown STE 'mine'.*register_ste"),
        ({"0": {"granularity": "row"}}, r"granularity must be one of"),
    ],
)
def test_sparsify_like_errors_convert_nothing(spec, match):
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with pytest.raises(ValueError, match=match):
        sparsify_like(net, {"0": {}, **spec})
    assert not any(True for _ in masked_modules(net))
