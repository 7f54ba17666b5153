import pytest
import torch
from torch import nn

from scl_lightning.nn.flops import (
    FlopCounts,
    count_flops,
    dense_view,
    example_from_batch,
    maskable_connectivity,
)
from scl_lightning.nn.masked import MaskedConv2d, MaskedLayer, MaskedLinear
from scl_lightning.nn.sparsify import masked_modules, sparsify


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 300)
        self.fc2 = nn.Linear(300, 100)
        self.out = nn.Linear(100, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(self.flatten(x)))
        x = torch.relu(self.fc2(x))
        return self.out(x)


MLP_LAYERS = {"fc1": 64 * 300, "fc2": 300 * 100, "out": 100 * 10}


def _conv_flops(out_h, out_w, out_c, in_c, groups, kh, kw):
    return out_h * out_w * out_c * in_c // groups * kh * kw


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),  # 12x12 -> 12x12
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise, 12x12
            nn.Conv2d(8, 16, 1),  # pointwise, 12x12
            nn.MaxPool2d(2),  # -> 6x6
            nn.Conv2d(16, 12, (3, 2), stride=(1, 2), groups=4),  # -> 4x3
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


CONV_LAYERS = {
    "features.0": _conv_flops(12, 12, 8, 3, 1, 3, 3),
    "features.3": _conv_flops(12, 12, 8, 8, 8, 3, 3),
    "features.4": _conv_flops(12, 12, 16, 8, 1, 1, 1),
    "features.6": _conv_flops(4, 3, 12, 16, 4, 3, 2),
    "fc": 12 * 5,
}


def test_mlp_total_and_per_layer():
    model = MLP()
    counts = count_flops(model, torch.randn(1, 1, 8, 8))
    assert isinstance(counts, FlopCounts)
    assert counts.total == 50_200
    assert counts.layers == MLP_LAYERS
    assert list(counts.layers) == ["fc1", "fc2", "out"]


def test_mlp_batch_of_one_is_per_sample():
    # The contract is "one forward pass of one sample": a batch of 1.
    counts = count_flops(MLP(), (torch.randn(1, 64),))
    assert counts.total == 50_200


def test_conv_net_per_layer_hand_formula():
    counts = count_flops(ConvNet(), torch.randn(1, 3, 12, 12))
    assert counts.layers == CONV_LAYERS
    assert counts.layers["features.3"] == 12 * 12 * 8 * 9  # depthwise: in_c / groups == 1
    # fvcore also counts BatchNorm and pooling, so the total is at least the layer sum.
    assert counts.total >= sum(CONV_LAYERS.values())


def test_masked_model_same_counts_and_layers_restored():
    dense_counts = count_flops(ConvNet(), torch.randn(1, 3, 12, 12))
    model = sparsify(ConvNet(), exclude="features.4")
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask.fill_(-1.0)  # masks must not change dense counts
    types_before = {n: type(m) for n, m in model.named_modules()}
    counts = count_flops(model, torch.randn(1, 3, 12, 12))
    assert counts == dense_counts
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert type(model.features[0]) is MaskedConv2d
    assert type(model.fc) is MaskedLinear
    assert type(model.features[4]) is nn.Conv2d
    # Still a working masked model.
    out = model(torch.randn(2, 3, 12, 12))
    assert torch.equal(out, model.fc.bias.detach().expand(2, 5))


def test_masked_mlp_gives_dense_counts():
    model = sparsify(MLP())
    counts = count_flops(model, torch.randn(1, 64))
    assert (counts.total, counts.layers) == (50_200, MLP_LAYERS)
    assert counts.modules == {"": 50_200, "flatten": 0, **MLP_LAYERS}
    assert all(isinstance(m, MaskedLayer) for m in (model.fc1, model.fc2, model.out))


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x):
        x = self.first(x)
        raise RuntimeError("boom after the first layer")


@pytest.mark.parametrize("training", [True, False])
def test_masked_classes_and_mode_restored_when_forward_raises(training):
    model = sparsify(Exploding())
    model.train(training)
    with pytest.raises(RuntimeError, match="boom"):
        count_flops(model, torch.randn(1, 4))
    assert type(model.first) is MaskedLinear
    assert type(model.second) is MaskedLinear
    assert model.training is training
    assert model.first.training is training


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_restored(training):
    model = sparsify(ConvNet())
    model.train(training)
    count_flops(model, torch.randn(1, 3, 12, 12))
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_mixed_training_modes_restored_per_module():
    # Fine-tuning often keeps BatchNorm frozen (eval) inside a model in train mode.
    model = sparsify(ConvNet()).train()
    model.features[1].eval()
    model.fc.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    count_flops(model, torch.randn(1, 3, 12, 12))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.features[1].training is False and model.training is True


def test_count_flops_does_not_touch_bn_statistics():
    model = ConvNet().train()
    bn = model.features[1]
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    count_flops(model, torch.randn(1, 3, 12, 12))
    assert torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.num_batches_tracked, before[1])


def test_dense_view_swaps_and_restores():
    model = sparsify(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
    with torch.no_grad():
        model[0].mask.fill_(-1.0)
    x = torch.randn(2, 3)
    with dense_view(model) as m:
        assert m is model
        assert [type(layer) for layer in model] == [nn.Linear, nn.Linear]
        dense_out = model(x)
    assert [type(layer) for layer in model] == [MaskedLinear, MaskedLinear]
    assert not torch.equal(model(x), dense_out)  # masks apply again
    with pytest.raises(KeyError), dense_view(model):
        raise KeyError("inside")
    assert [type(layer) for layer in model] == [MaskedLinear, MaskedLinear]


def test_effective_hand_computed():
    counts = FlopCounts(total=1000, layers={"a": 400, "b": 300, "c": 100})
    total, per_layer = counts.effective({"a": 0.25, "b": 0.5})
    # "c" is missing: counts in full. Non-maskable FLOPs (1000 - 800 = 200) stay.
    assert per_layer == {"a": 100.0, "b": 150.0, "c": 100.0}
    assert total == 200 + 100 + 150 + 100
    assert isinstance(total, int)


@pytest.mark.parametrize(
    ("fractions", "expected_total"),
    [
        ({}, 50_200),
        ({"fc1": 0.0, "fc2": 0.0, "out": 0.0}, 0),
        ({"fc1": 0.1, "fc2": 0.01, "out": 1.0}, 1920 + 300 + 1000),
        ({"fc2": 1 / 3}, 19200 + 10000 + 1000),
    ],
)
def test_effective_on_mlp(fractions, expected_total):
    counts = count_flops(MLP(), torch.randn(1, 64))
    total, per_layer = counts.effective(fractions)
    assert total == expected_total
    for name, dense in MLP_LAYERS.items():
        assert per_layer[name] == pytest.approx(dense * fractions.get(name, 1.0))


def test_effective_module_hand_computed():
    """A submodule's effective FLOPs: its dense FLOPs less the pruned share of the maskable
    layers inside it (``"block.a"`` and ``"block.b"``, not ``"blocker"``); ``""`` is the total."""
    counts = FlopCounts(
        total=1000,
        layers={"block.a": 400, "block.b": 300, "blocker": 100},
        modules={"": 1000, "block": 750, "block.a": 400, "block.b": 300, "blocker": 100},
    )
    fractions = {"block.a": 0.25, "block.b": 0.5, "blocker": 0.0}
    assert counts.effective_module("block", fractions) == 750 - 300 - 150
    assert counts.effective_module("block.a", fractions) == 100
    assert counts.effective_module("blocker", fractions) == 0
    assert counts.effective_module("", fractions) == counts.effective(fractions)[0] == 450
    assert counts.effective_module("nowhere", fractions) == 0


def test_effective_ignores_unknown_names():
    counts = FlopCounts(total=10, layers={"a": 10})
    assert counts.effective({"zzz": 0.0}) == (10, {"a": 10.0})


def test_example_from_batch():
    x = torch.arange(12.0).view(4, 3)
    y = torch.arange(4)
    assert torch.equal(example_from_batch(x), x[:1])
    assert example_from_batch(x).shape == (1, 3)
    assert torch.equal(example_from_batch((x, y)), x[:1])
    assert torch.equal(example_from_batch([x, y]), x[:1])
    assert torch.equal(example_from_batch(((x, y), y)), x[:1])  # nested: first element
    assert torch.equal(example_from_batch({"label": y, "x": x}), x[:1])
    assert torch.equal(example_from_batch({"target": y, "image": x}), x[:1])
    assert torch.equal(example_from_batch({"images": (x, y)}), x[:1])
    assert torch.equal(example_from_batch({"meta": "s", "feats": x}), x[:1])  # first tensor value


@pytest.mark.parametrize("batch", [None, 3, "abc", (), [], {}, {"name": "s"}, 1.5])
def test_example_from_batch_unsupported(batch):
    assert example_from_batch(batch) is None


def test_maskable_connectivity_partly_masked():
    model = sparsify(ConvNet(), exclude=["features.4", "fc"])
    with torch.no_grad():
        model.features[0].mask.view(-1)[:10] = -1.0  # 216 -> 206
        model.features[3].mask.fill_(-1.0)  # 72 -> 0
    conn = maskable_connectivity(model)
    assert conn == {
        "features.0": (206, 216),
        "features.3": (0, 72),
        "features.4": (128, 128),  # dense maskable layer: fully active
        "features.6": (288, 288),  # 12 * 16/4 * 3 * 2
        "fc": (60, 60),
    }
    assert all(type(a) is int and type(t) is int for a, t in conn.values())


def test_maskable_connectivity_dense_and_empty():
    assert maskable_connectivity(MLP()) == {
        "fc1": (19200, 19200),
        "fc2": (30000, 30000),
        "out": (1000, 1000),
    }
    assert maskable_connectivity(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))) == {}


def test_effective_from_connectivity_end_to_end():
    model = sparsify(MLP())
    with torch.no_grad():
        model.fc1.mask[:150] = -1.0  # half of fc1
        model.out.mask.fill_(-1.0)
    counts = count_flops(model, torch.randn(1, 64))
    fractions = {n: a / t for n, (a, t) in maskable_connectivity(model).items()}
    total, per_layer = counts.effective(fractions)
    assert per_layer == {"fc1": 9600.0, "fc2": 30000.0, "out": 0.0}
    assert total == 39_600


def test_flop_counts_traces_one_sample_in_the_models_dtype():
    """An fp32 batch against a bfloat16 model (``bf16-true`` converts the model, not the
    example input) is traced as one sample, in the model's dtype: fvcore failed on the dtype."""
    from scl_lightning.nn.flops import flop_counts

    model = sparsify(MLP()).to(torch.bfloat16)
    counts = flop_counts(model, torch.randn(8, 64))
    assert (counts.total, counts.layers) == (50_200, MLP_LAYERS)
    assert flop_counts(model, torch.randn(4, 64)) is counts  # traced once per shape
