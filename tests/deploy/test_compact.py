"""compact(): a smaller network that computes what the pruned one computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _helpers import pruned_net as _net
from scl_lightning import sparsify
from scl_lightning.deploy.compact import Conv2dWithBiasMap, LinearOnSelectedInputs, compact


@pytest.mark.parametrize(
    "name,shape",
    [
        ("lenet_300_100", (1, 28, 28)),
        ("lenet5", (1, 28, 28)),
        ("vgg16", (3, 32, 32)),
        ("resnet20", (3, 32, 32)),
    ],
)
def test_compact_is_smaller_and_computes_the_same(name, shape):
    model = _net(name, shape)
    x = torch.randn(6, *shape)
    small, report = compact(model, x[:2])
    assert report.params_after < report.params_before
    assert report.removed  # some layer lost outputs
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    # an ordinary module without masks
    assert not any("mask" in n for n, _ in small.named_parameters())
    assert sum(p.numel() for p in small.parameters()) <= report.params_after


def test_model_is_not_modified():
    model = _net("lenet5", (1, 28, 28))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact(model, torch.randn(2, 1, 28, 28))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mlp_units_without_inputs_or_readers_are_removed_exactly():
    model = sparsify(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2)))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "mask"):
                m.mask.fill_(1.0)
        model[0].mask[1] = -1.0  # unit 1 computes from nothing: relu(bias) is folded
        model[0].bias[1] = 0.7
        model[2].mask[:, 3] = -1.0  # unit 3 is never read
        model[3].mask[:, 0] = -1.0  # output 0 of the middle layer is never read...
    small, report = compact(model, torch.randn(2, 4))
    assert report.removed["0"] == (5, 3)
    assert report.removed["2"] == (3, 2)
    assert report.folded["2"] == 1
    x = torch.randn(8, 4)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_a_layer_with_every_unit_dead_keeps_one_that_is_never_read():
    model = sparsify(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    with torch.no_grad():
        model[0].mask.fill_(-1.0)  # every unit computes relu(bias): all folded into layer 2
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1, 0.3]))
    small, report = compact(model, torch.randn(2, 4))
    assert report.removed["0"] == (5, 1)
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_input_features_nothing_reads_are_skipped():
    model = sparsify(nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)))
    with torch.no_grad():
        model[1].mask[:, :5] = -1.0  # the first 5 pixels feed nothing (an image's border)
    x = torch.randn(3, 1, 4, 4)
    small, report = compact(model, x)
    first = small.get_submodule("1")
    assert isinstance(first, LinearOnSelectedInputs)
    assert report.inputs["1"] == (16, 11) and first.weight.shape == (4, 11)
    assert "reads 11 of 16 input features" in report.summary()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_padded_convolution_gets_an_exact_bias_map():
    model = sparsify(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3, padding=1),
        )
    )
    with torch.no_grad():
        model[0].mask[2] = -1.0  # channel 2: relu(bn(bias)), a positive constant
        model[1].bias[2] = 1.5
    model.eval()
    x = torch.randn(3, 2, 6, 6)
    small, report = compact(model, x)
    assert report.removed["0"] == (4, 3)
    conv = small.get_submodule("3")
    assert isinstance(conv, Conv2dWithBiasMap)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
        with pytest.raises(ValueError, match="compact it again"):
            small(torch.randn(1, 2, 8, 8))


def test_residual_outputs_are_kept_and_reported():
    model = _net("resnet20", (3, 32, 32))
    _, report = compact(model, torch.randn(2, 3, 32, 32))
    assert "layer1.0.conv1" in report.removed
    assert "add" in report.kept["layer1.0.conv2"]
    assert "layer1.0.conv2" not in report.removed


def test_untraceable_network_is_one_clear_error():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match=r"torch\.fx cannot trace Branchy"):
        compact(sparsify(Branchy()), torch.randn(2, 3))
