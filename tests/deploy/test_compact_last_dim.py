"""compact() on features that live on the last dim: a ``Linear`` over ``(N, T, C)`` tokens or
channels-last ``(N, H, W, C)`` activations (ViT/Swin/BERT MLPs, ConvNeXt blocks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scl_lightning import sparsify
from scl_lightning.deploy.compact import Conv2dWithBiasMap, compact


def _channel_masked(model: nn.Module, dead: dict[str, list[int]]) -> nn.Module:
    """``model`` with channel masks, the listed output units of each layer pruned."""
    model = sparsify(model, granularity="channel")
    with torch.no_grad():
        for name, units in dead.items():
            model.get_submodule(name).mask[units] = -1.0
    return model.eval()


def _same_function(small: nn.Module, model: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


class TokenMLP(nn.Module):
    """A transformer MLP on ``(N, T, C)`` tokens: ``fc1 -> GELU -> dropout -> fc2``."""

    def __init__(self, dim: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def test_token_mlp_dead_units_are_folded_and_unread_units_removed():
    torch.manual_seed(0)
    net = TokenMLP()
    with torch.no_grad():
        net.fc1.bias.copy_(torch.linspace(-1.0, 1.5, 12))  # dead units: GELU(bias) != 0
        net.fc2.weight[:, [2, 9]] = 0.0  # units 2 and 9 are never read
    model = _channel_masked(net, {"fc1": [1, 4, 7]})
    bias_before = model.fc2.bias.detach().clone()
    small, report = compact(model, torch.randn(2, 5, 6))
    assert report.removed["fc1"] == (12, 7)
    assert report.folded["fc2"] == 3
    assert small.get_submodule("fc1").weight.shape == (7, 6)
    assert small.get_submodule("fc2").weight.shape == (6, 7)
    assert not torch.equal(small.get_submodule("fc2").bias.detach(), bias_before)
    assert report.params_after == report.params_before - 5 * (6 + 1) - 5 * 6
    # any batch and sequence length: the folded constant is added along the last dim
    _same_function(small, model, torch.randn(4, 5, 6), torch.randn(3, 9, 6), torch.randn(7, 6))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, channels-last LayerNorm and MLP, layer scale, residual."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = torch.permute(self.gamma * y, (0, 3, 1, 2))
        return x + y


def test_convnext_block_dead_hidden_units_are_removed():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 2, stride=2),
        ConvNeXtBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    model = _channel_masked(net, {"1.pwconv1": [0, 3, 5, 6, 20, 31]})
    small, report = compact(model, torch.randn(2, 3, 16, 16))
    assert report.removed["1.pwconv1"] == (32, 26)
    assert report.folded["1.pwconv2"] == 6
    assert small.get_submodule("1.pwconv2").in_features == 26
    assert report.params_after == report.params_before - 6 * (8 + 1) - 6 * 8
    assert report.kept["1.dwconv"] == "a grouped convolution"
    assert "1.pwconv2" in report.kept  # the block's output: tied to the residual
    _same_function(small, model, torch.randn(3, 3, 16, 16))


def test_flat_mlp_with_batchnorm_shrinks_as_before():
    """The ``(N, C)`` case, where dim 1 is also the last dim: BatchNorm1d is channel-wise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = _channel_masked(net, {"0": [2, 5]})
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].bias.fill_(0.3)
    small, report = compact(model, torch.randn(2, 5))
    assert report.removed["0"] == (8, 6)
    assert small.get_submodule("1").num_features == 6
    _same_function(small, model, torch.randn(6, 5))


class ChannelsLastToConv(nn.Module):
    """A ``Linear`` on channels-last activations read by a convolution after a permute."""

    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.conv = nn.Conv2d(6, 4, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))


class ConvToChannelsLast(nn.Module):
    """A convolution read by a ``Linear`` on channels-last activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.gelu(self.conv(x)).permute(0, 2, 3, 1))


class TokensToHead(nn.Module):
    """Token features flattened to one vector per sample: features every ``hidden`` columns."""

    def __init__(self, tokens: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(3, hidden)
        self.head = nn.Linear(tokens * hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.tanh(self.fc(x)), 1))


@pytest.mark.parametrize(
    "net,producer,shape,widths",
    [
        (ChannelsLastToConv, "fc", (2, 3, 5, 5), (6, 4)),
        (ConvToChannelsLast, "conv", (2, 3, 5, 5), (6, 4)),
        (TokensToHead, "fc", (2, 4, 3), (5, 3)),
    ],
)
def test_features_are_followed_through_permutes_and_flattens(net, producer, shape, widths):
    torch.manual_seed(0)
    model = _channel_masked(net(), {producer: [1, 3]})
    with torch.no_grad():
        model.get_submodule(producer).bias.fill_(0.4)  # constants that must be folded
    small, report = compact(model, torch.randn(*shape))
    assert report.removed[producer] == widths
    assert report.params_after < report.params_before
    assert producer not in report.kept
    _same_function(small, model, torch.randn(5, *shape[1:]))


def test_padded_convolution_after_a_channels_last_linear_gets_a_bias_map():
    torch.manual_seed(0)
    model = _channel_masked(ChannelsLastToConv(padding=1), {"fc": [0, 2]})
    with torch.no_grad():
        model.fc.bias.fill_(0.4)
    small, report = compact(model, torch.randn(2, 3, 5, 5))
    assert report.removed["fc"] == (6, 4)
    assert isinstance(small.get_submodule("conv"), Conv2dWithBiasMap)
    _same_function(small, model, torch.randn(3, 3, 5, 5))


class TokensThroughBatchNorm(nn.Module):
    """BatchNorm1d on ``(N, T, C)``: it normalizes the T positions, not the Linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn(self.fc1(x)))


class LinearOverWidthToConv(nn.Module):
    """A ``Linear`` over the width of ``(N, C, H, W)``, read by a convolution over C."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.fc(x)))


class ChannelsLastPool(nn.Module):
    """MaxPool2d on channels-last activations pools over (W, C): it mixes the features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.pool = nn.MaxPool2d(2)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.pool(self.fc1(x)))


class FixedWidthView(nn.Module):
    """A view with the width written in the code: it cannot follow a smaller layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(-1, 144))


@pytest.mark.parametrize(
    "net,producer,shape,why",
    [
        (TokensThroughBatchNorm, "fc1", (2, 5, 4), "bn normalizes dim 1"),
        (LinearOverWidthToConv, "fc", (2, 3, 4, 5), "conv reads another dimension"),
        (ChannelsLastPool, "fc1", (2, 4, 4, 3), "pool pools over its features"),
        (FixedWidthView, "conv", (2, 1, 8, 8), "view reshapes"),
    ],
)
def test_features_on_another_dim_than_the_next_layer_reads_are_kept(net, producer, shape, why):
    torch.manual_seed(0)
    model = _channel_masked(net(), {producer: [1, 2]})
    with torch.no_grad():
        model.get_submodule(producer).bias.fill_(0.5)
    small, report = compact(model, torch.randn(*shape))
    assert why in report.kept[producer]
    assert producer not in report.removed
    _same_function(small, model, torch.randn(4, *shape[1:]))


def test_a_single_dead_unit_is_folded_once():
    """A one-unit layer cannot shrink: its constant is folded and the reader stops reading it
    (it was folded again on every pass, adding the constant twice)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2))
    model = _channel_masked(net, {"0": [0], "2": [1]})
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    small, report = compact(model, torch.randn(2, 4))
    assert report.folded["2"] == 1
    _same_function(small, model, torch.randn(6, 4))


def test_a_reflect_padded_reader_folds_into_its_bias():
    """Reflect padding of a constant is the constant: the bias, not a zero-padded bias map."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"),
    )
    model = _channel_masked(net, {"0": [1]})
    with torch.no_grad():
        model[0].bias.fill_(0.8)
    small, report = compact(model, torch.randn(2, 2, 6, 6))
    assert report.removed["0"] == (4, 3)
    assert not isinstance(small.get_submodule("2"), Conv2dWithBiasMap)
    _same_function(small, model, torch.randn(3, 2, 6, 6), torch.randn(1, 2, 9, 7))
