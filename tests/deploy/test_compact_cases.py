"""Ordinary networks `compact` met adversarially (issue 24, item 1): each compacts to the
pruned network's function, or keeps the layer and names it; never a traceback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scl_lightning as scl
from scl_lightning.deploy.compact import compact


class TutorialLeNet(nn.Module):
    """PyTorch's tutorial LeNet: ``x.view(-1, 16 * 4 * 4)`` before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1 = nn.Linear(16 * 4 * 4, 120)
        self.f2 = nn.Linear(120, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2).view(-1, 16 * 4 * 4)
        return self.f2(F.relu(self.f1(x)))


class FlattenBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(torch.flatten(self.conv(x), 1)))


class Tokens(nn.Module):
    """Linear layers over ``(N, T, C)`` sequences, with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Reflect(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class AppliedTwice(nn.Module):
    """One layer applied twice in a row (weights shared): it used to crash compaction."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


CASES = {
    "tutorial-lenet-view": (TutorialLeNet, (4, 1, 28, 28)),
    "flatten-batchnorm1d": (FlattenBatchNorm, (4, 3, 8, 8)),
    "linear-on-tokens": (Tokens, (4, 5, 8)),
    "reflect-padding": (lambda: Reflect("reflect"), (4, 3, 9, 9)),
    "replicate-padding": (lambda: Reflect("replicate"), (4, 3, 9, 9)),
    "circular-padding": (lambda: Reflect("circular"), (4, 3, 9, 9)),
    "applied-twice": (AppliedTwice, (4, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compact_is_exact_or_names_what_it_keeps(case):
    build, shape = CASES[case]
    torch.manual_seed(0)
    net = scl.sparsify(build(), granularity="channel")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in scl.masked_modules(net):
            layer.mask[torch.rand(layer.mask.shape, generator=gen) < 0.4] = -1.0
    pruned = scl.export_pruned(net).eval()
    x = torch.randn(shape, generator=gen)
    small, report = compact(pruned, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), pruned(x))
        y = torch.randn(shape, generator=gen)  # another input than the example
        torch.testing.assert_close(small(y), pruned(y))
    assert report.params_after <= report.params_before
    if case == "applied-twice":
        assert report.kept["a"] == "it is called 2 times (its weights are shared)"


class ConvBatchNorm(nn.Module):
    """``Conv2d(bias=False) -> BatchNorm``: a dead channel is BatchNorm's constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_constants_are_folded_in_the_networks_dtype(dtype):
    torch.manual_seed(0)
    net = ConvBatchNorm()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.bias.uniform_(-1, 1)  # dead channels are nonzero constants after BatchNorm
    net = scl.sparsify(net, granularity="channel")
    with torch.no_grad():
        net.a.mask[:3] = -1.0
    pruned = scl.export_pruned(net).eval().to(dtype)
    x = torch.randn(4, 3, 8, 8).to(dtype)
    small, report = compact(pruned, x)
    assert report.folded == {"b": 3} and report.params_after < report.params_before
    assert all(p.dtype == dtype for p in small.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), pruned(x))


def test_a_channel_constant_only_after_an_earlier_fold_keeps_its_map():
    """p's channel 0 is a constant, folded into c as a per-position map (padding); c's
    output 0 then reads nothing else: it is that map, not c's bias (it was folded as c's
    bias alone, off by 0.044, then refused)."""
    from test_compact_safety_net import _bias_map_producer

    net = _bias_map_producer()
    x = torch.randn(2, 2, 6, 6)
    small, report = compact(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x))
    assert "c" in report.folded  # p's constant channel went into c
    assert report.kept.get("c", "").startswith("1 outputs computed from nothing are not constant")


def test_a_size_read_along_the_features_keeps_them_and_a_batch_size_read_does_not():
    from test_compact_safety_net import _size_reader

    net = _size_reader()  # fc2(relu(h)) / h.size(-1): three units of fc1 nobody reads
    x = torch.randn(3, 4)
    small, report = compact(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x))
    assert report.kept["fc1"].startswith("its size along its features is read")

    class BatchView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.size(0), -1))

    torch.manual_seed(0)
    net = BatchView().eval()
    with torch.no_grad():
        net.fc.weight[:, :16] = 0  # channel 0 of conv is never read
    x = torch.randn(2, 1, 6, 6)
    small, report = compact(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x))
    assert small.conv.out_channels == 3
