"""The sparse format keeps dense a Linear whose weight the network reads outside the layer's
forward (a CSR layer has no dense weight), instead of failing or computing something else."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from scl_lightning.deploy import formats
from scl_lightning.deploy.formats import SparseLinear, sparsify_linears


class ReadsItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.qkv.weight, self.qkv.bias)  # never calls self.qkv
        return self.fc(torch.relu(h))


def _csr_always_faster(fn: functools.partial, repeats: int) -> float:
    return 0.5 if isinstance(fn.func, SparseLinear) else 1.0


def test_a_weight_read_outside_forward_stays_dense(monkeypatch):
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    torch.manual_seed(0)
    model = ReadsItsWeight().eval()
    with torch.no_grad():
        for layer in (model.qkv, model.fc):
            layer.weight[torch.rand_like(layer.weight) < 0.8] = 0
    x = torch.randn(3, 5, 8)
    want = model(x)
    result, notes = sparsify_linears(model, batch_size=4, example=x)
    assert type(result.qkv) is nn.Linear and type(result.fc) is SparseLinear
    assert any(
        n.startswith("qkv: kept dense, its weight is read outside its forward") for n in notes
    )
    torch.testing.assert_close(result(x), want)


def test_without_an_example_nothing_is_checked(monkeypatch):
    monkeypatch.setattr(formats, "_best_time", _csr_always_faster)
    result, _ = sparsify_linears(ReadsItsWeight(), batch_size=4)
    assert type(result.qkv) is SparseLinear
