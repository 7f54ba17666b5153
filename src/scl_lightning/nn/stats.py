"""Connectivity statistics of masked networks: connection counts and sparsity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scl_lightning.nn.sparsify import masked_modules
from scl_lightning.nn.ste import count_positive

__all__ = [
    "LayerConnectivity",
    "connection_count",
    "global_sparsity",
    "layer_connectivity",
    "layer_sparsity",
    "total_connections",
]


def _require_masked(model: nn.Module, fn: str) -> list:
    layers = list(masked_modules(model))
    if not layers:
        raise ValueError(
            f"{fn}: {type(model).__name__} has no masked layer; call "
            "scl_lightning.sparsify(model) first"
        )
    return layers


def total_connections(model: nn.Module) -> int:
    """Number of maskable connections (mask entries) of all masked layers of ``model``."""
    return sum(layer.mask.numel() for _, layer in _require_masked(model, "total_connections"))


def connection_count(model: nn.Module, *, density: bool = False) -> Tensor:
    """The differentiable number of active connections ``C = sum_layers sum H(m)``.

    The forward value is exact: a float32 scalar, or float64 when the model has more than
    ``2**24`` maskable connections (float32 holds every integer only up to there). Its gradient
    with respect to each mask variable is that layer's estimator's proxy ``proxy(m)`` (divided
    by the total count with ``density=True``).

    Args:
        model: a network with masked layers.
        density: return ``C / N`` (fraction of connections active) instead of the count ``C``.

    Raises:
        ValueError: if ``model`` has no masked layer.

    Example::

        >>> from scl_lightning.nn.sparsify import sparsify
        >>> net = sparsify(nn.Linear(3, 2))
        >>> connection_count(net)
        tensor(6., grad_fn=<AddBackward0>)
    """
    layers = _require_masked(model, "connection_count")
    total = sum(layer.mask.numel() for _, layer in layers)
    # never in half precision (a bfloat16 count is not exact above 256)
    dtype = torch.float64 if total > 2**24 else torch.float32
    count: Tensor = torch.zeros((), dtype=dtype, device=layers[0][1].mask.device)
    for _, layer in layers:
        count = count + layer.active_count().to(dtype)
    if density:
        count = count / total
    return count


@dataclass(frozen=True)
class LayerConnectivity:
    """Connectivity of one masked layer."""

    name: str
    shape: tuple[int, ...]
    active: int
    total: int

    @property
    def sparsity(self) -> float:
        """Fraction of this layer's connections that are pruned."""
        return 1.0 - self.active / self.total if self.total else 0.0


@torch.no_grad()
def layer_connectivity(model: nn.Module) -> list[LayerConnectivity]:
    """Active and total connections of every masked layer, in module order.

    All counts are gathered with a single device-to-host transfer.
    """
    layers = _require_masked(model, "layer_connectivity")
    device = layers[0][1].mask.device
    active = torch.stack(
        [count_positive(layer.mask).to(device, torch.float64) for _, layer in layers]
    ).tolist()
    return [
        LayerConnectivity(name, tuple(layer.mask.shape), int(a), layer.mask.numel())
        for (name, layer), a in zip(layers, active, strict=True)
    ]


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """``{qualified layer name: fraction of its connections pruned}``.

    Example::

        >>> from scl_lightning.nn.sparsify import sparsify
        >>> net = sparsify(nn.Sequential(nn.Linear(2, 2)))
        >>> with torch.no_grad():
        ...     net[0].mask[0, 0] = -1.0
        >>> layer_sparsity(net)
        {'0': 0.25}
    """
    return {c.name: c.sparsity for c in layer_connectivity(model)}


def global_sparsity(model: nn.Module) -> float:
    """Fraction of all maskable connections of ``model`` that are pruned."""
    stats = layer_connectivity(model)
    total = sum(c.total for c in stats)
    return 1.0 - sum(c.active for c in stats) / total
