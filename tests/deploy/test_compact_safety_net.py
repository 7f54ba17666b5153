"""``compact`` never returns a network that computes something else: the result is checked
against the pruned network on the example input, and a mismatch is one line, not a model.

The three networks below are ones the chain analysis got wrong (a producer's per-position
bias map folded as a constant; a size read of a shrunk activation; a layer called twice). The
first and the last now compact exactly (tests/deploy/test_compact_cases.py); each must either
compact exactly or refuse."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scl_lightning.deploy import compact


class BiasMapProducer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(2, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.d = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.d(F.relu(self.c(F.relu(self.p(x)))))


class SizeReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.relu(h)) / h.size(-1)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(x))) + self.fc(x).mean(-1, keepdim=True)


def _bias_map_producer() -> nn.Module:
    torch.manual_seed(0)
    net = BiasMapProducer().eval()
    with torch.no_grad():
        net.p.weight[0] = 0  # channel 0 of p is a constant, folded into c as a bias map
        net.p.bias[0] = 1.0
        net.c.weight[0, 1:] = (
            0  # c's output 0 reads only p's channel 0: constant only after the fold
        )
    return net


def _size_reader() -> nn.Module:
    torch.manual_seed(0)
    net = SizeReader().eval()
    with torch.no_grad():
        net.fc2.weight[:, :3] = 0  # three units of fc1 nobody reads
    return net


def _called_twice() -> nn.Module:
    torch.manual_seed(0)
    net = CalledTwice().eval()
    with torch.no_grad():
        net.head.weight[:, :3] = 0
    return net


@pytest.mark.parametrize(
    ("build", "shape"),
    [(_bias_map_producer, (2, 2, 6, 6)), (_size_reader, (3, 4)), (_called_twice, (3, 4))],
    ids=["bias-map-producer", "size-reader", "called-twice"],
)
def test_compact_is_exact_or_refuses_in_one_line(build, shape):
    net = build()
    x = torch.randn(shape)
    want = net(x)
    try:
        small, _ = compact(net, x)
    except ValueError as err:
        assert "\n" not in str(err)
        assert str(err).startswith("compact: the compacted ") and "export it as 'dense'" in str(err)
        return
    torch.testing.assert_close(small(x), want)


def test_the_check_catches_a_wrong_result(monkeypatch):
    """The comparison itself: a compaction that changes the function is refused."""
    import importlib

    compact_module = importlib.import_module("scl_lightning.deploy.compact")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        net[2].weight[:, :2] = 0
    real = compact_module._select

    def off_by_one(param, keep, dim):  # a wrong selection: the kept indices shifted
        return real(param, (keep + 1) % param.shape[dim], dim)

    monkeypatch.setattr(compact_module, "_select", off_by_one)
    with pytest.raises(ValueError, match=r"^compact: the compacted Sequential differs .* off by"):
        compact(net, torch.randn(3, 4))
