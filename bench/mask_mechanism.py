"""How a mask reaches the weight: three mechanisms side by side in one run.

- **forward**: the masked class overrides ``forward`` and computes with ``w * H(m)`` there (what
  scl_lightning did before issue 22). Code that reads ``module.weight`` itself gets ``w``.
- **property** (ours now): the masked class reads ``weight`` as ``w * H(m)`` through a class
  property; the stored parameter keeps its name ``weight``, the parent's ``forward`` is kept.
- **parametrize**: ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", M)``
  with ``M(w) = w * H(m)`` (what ``torch.ao.pruning`` and weight norm use). The stored parameter
  moves to ``parametrizations.weight.original``.

For each: whether a mask acts where the weight is read functionally (a Swin-style attention
block computing ``F.linear(x, self.qkv.weight)``), the state-dict keys (whether a checkpoint of
the never-masked network loads with ``strict=True``), whether ``torch.compile`` traces the
masked MLP without graph breaks, and the median time of a training step (forward, backward,
SGD step; masks in the optimizer, a random half of them off) of the digits MLP
(``lenet_300_100``, input 3x32x32) and CIFAR ResNet-56, batch 128, every mechanism timed in
turn in each repetition, on synthetic data.

    PYTHONPATH=src python bench/mask_mechanism.py [--reps 3] [--steps 20] [--resnet-steps 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from scl_lightning.models import create_model
from scl_lightning.nn import masked_weight, sparsify, step
from scl_lightning.nn.sparsify import maskable_modules

MECHANISMS = ("forward", "property", "parametrize")
MODELS = {"mlp": "lenet_300_100", "resnet56": "resnet56"}
BATCH = 128


class _ForwardMasked(nn.Module):
    """Mixin: the previous mechanism, ``forward`` computing with ``w * H(m)``."""

    mask: nn.Parameter
    weight: nn.Parameter

    def _masked(self) -> Tensor:
        return masked_weight(self.weight, self.mask, h=step(self.mask, self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self, nn.Linear):
            return F.linear(x, self._masked(), self.bias)
        return self._conv_forward(x, self._masked(), self.bias)  # type: ignore[attr-defined]


_FORWARD_CLASSES: dict[type, type] = {}


def _forward_masking(model: nn.Module) -> nn.Module:
    for _, layer in list(maskable_modules(model)):
        cls = type(layer)
        masked = _FORWARD_CLASSES.setdefault(
            cls, type(f"Fwd{cls.__name__}", (_ForwardMasked, cls), {})
        )
        layer.__class__ = masked
        layer.register_parameter("mask", nn.Parameter(torch.ones_like(layer.weight)))
    return model


class _MaskParametrization(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight))

    def forward(self, w: Tensor) -> Tensor:
        return masked_weight(w, self.mask, h=step(self.mask, w.dtype))


def _parametrize_masking(model: nn.Module) -> nn.Module:
    for _, layer in list(maskable_modules(model)):
        parametrize.register_parametrization(
            layer, "weight", _MaskParametrization(layer.weight), unsafe=True
        )
    return model


APPLY: dict[str, Callable[[nn.Module], nn.Module]] = {
    "forward": _forward_masking,
    "property": sparsify,
    "parametrize": _parametrize_masking,
}


def _masks(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith("mask")]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return F.linear(attn @ v, self.proj.weight, self.proj.bias)


def _functional_reads_masked(mechanism: str) -> bool:
    torch.manual_seed(0)
    model = APPLY[mechanism](_Attention())
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        for mask in _masks(model):
            mask.fill_(-1.0)
        # with every mask off, attention reads zero weights: the output is proj's bias
        return bool(torch.allclose(model(x), model.proj.bias.expand(2, 5, 8)))


def _keys_of_plain_network(mechanism: str) -> str:
    model = APPLY[mechanism](nn.Sequential(nn.Linear(4, 3)))
    keys = [k for k in model.state_dict() if not k.endswith("mask")]
    return ", ".join(keys)


def _graph_breaks(mechanism: str) -> str:
    import torch._dynamo

    torch._dynamo.reset()
    model = APPLY[mechanism](create_model("lenet_300_100", num_classes=10, input_shape=(1, 8, 8)))
    try:
        explanation = torch._dynamo.explain(model)(torch.randn(4, 1, 8, 8))
    except Exception as err:  # a mechanism dynamo cannot trace is a result, not a crash
        return f"fails ({type(err).__name__})"
    return str(explanation.graph_break_count)


def _step_times(mechanism: str, name: str, steps: int, warmup: int) -> list[float]:
    torch.manual_seed(0)
    model = APPLY[mechanism](create_model(MODELS[name], num_classes=10, input_shape=(3, 32, 32)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mask in _masks(model):
            mask.copy_(torch.where(torch.rand(mask.shape, generator=gen) < 0.5, -1.0, 1.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run, MLP")
    parser.add_argument("--resnet-steps", type=int, default=4, help="timed steps, ResNet-56")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    print(
        f"CPU ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; batch {BATCH}",
        flush=True,
    )
    print("| mechanism | functional read masked | state-dict keys | dynamo graph breaks (MLP) |")
    print("| --- | --- | --- | --- |")
    for mechanism in MECHANISMS:
        print(
            f"| {mechanism} | {'yes' if _functional_reads_masked(mechanism) else 'NO'} | "
            f"{_keys_of_plain_network(mechanism)} | {_graph_breaks(mechanism)} |",
            flush=True,
        )
    times: dict[tuple[str, str], list[float]] = {}
    t0 = time.perf_counter()
    for rep in range(args.reps):
        order = MECHANISMS[rep % 3 :] + MECHANISMS[: rep % 3]
        for name in args.models:
            steps, warmup = (args.steps, 3) if name == "mlp" else (args.resnet_steps, 1)
            for mechanism in order:
                times.setdefault((name, mechanism), []).extend(
                    _step_times(mechanism, name, steps, warmup)
                )
        print(f"  repetition {rep + 1}/{args.reps} done", flush=True)
    print()
    print("| model | mechanism | median ms/step | ratio to forward |")
    print("| --- | --- | --- | --- |")
    for name in args.models:
        base = statistics.median(times[(name, "forward")])
        for mechanism in MECHANISMS:
            med = statistics.median(times[(name, mechanism)])
            print(f"| {name} | {mechanism} | {med * 1000:.1f} | {med / base:.3f} |")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
