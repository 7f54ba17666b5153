"""Connectivity statistics of masked networks: connection counts and sparsity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from scl_lightning.nn.maskable import layer_weight
from scl_lightning.nn.masked import MaskedLayer
from scl_lightning.nn.sparsify import maskable_modules, masked_modules

__all__ = [
    "Connectivity",
    "LayerConnectivity",
    "connection_count",
    "connectivity",
    "global_sparsity",
    "global_sparsity_including_dense",
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
    """Number of connections (weights) of all masked layers of ``model``: the mask entries, or
    every unit's fan-in with ``granularity="channel"``."""
    return sum(layer.connections for _, layer in _require_masked(model, "total_connections"))


def connection_count(model: nn.Module, *, density: bool = False) -> Tensor:
    """The differentiable number of active connections ``C = sum_layers sum H(m)``.

    The forward value is exact: a float32 scalar, or float64 when the model has more than
    ``2**24`` maskable connections (float32 holds every integer only up to there). Its gradient
    with respect to each mask variable is that layer's estimator's proxy ``proxy(m)`` times the
    connections it switches (1, or the unit's fan-in with ``granularity="channel"``), divided by
    the total count with ``density=True``.

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
    total = sum(layer.connections for _, layer in layers)
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
    """Connectivity of one maskable layer (``masked=False``: a layer left dense, fully active)."""

    name: str
    shape: tuple[int, ...]
    active: int
    total: int
    masked: bool = True

    @property
    def sparsity(self) -> float:
        """Fraction of this layer's connections that are pruned."""
        return 1.0 - self.active / self.total if self.total else 0.0

    @property
    def density(self) -> float:
        """Fraction of this layer's connections that are active."""
        return self.active / self.total if self.total else 1.0


@dataclass(frozen=True)
class Connectivity:
    """The network's connectivity: THE definition of active and total connections and of global
    sparsity, which every log, table, summary, report and guard of the project reads.

    * ``active``, ``total``, ``sparsity``: over the **masked** layers, the connections SCL may
      prune. Layers left dense (``exclude``) are not part of these figures. A network with no
      masked layer at all is a dense baseline: every maskable layer then counts (all active, so
      ``sparsity`` is 0), which is what its SCL twin's figures are compared with.
    * ``active_including_dense``, ``total_including_dense``, ``sparsity_including_dense``: over
      every maskable layer (``nn.Linear``/``nn.ConvNd``), dense ones counted fully active; the
      fraction of the whole network's weights that are pruned.

    Example::

        >>> from scl_lightning.nn.sparsify import sparsify
        >>> net = sparsify(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), exclude=["1"])
        >>> with torch.no_grad():
        ...     _ = net[0].mask[:2].fill_(-1.0)  # 8 of the 16 masked connections pruned
        >>> c = connectivity(net)
        >>> c.active, c.total, c.sparsity
        (8, 16, 0.5)
        >>> c.total_including_dense, round(c.sparsity_including_dense, 4)
        (24, 0.3333)
    """

    layers: tuple[LayerConnectivity, ...]

    @property
    def counted(self) -> tuple[LayerConnectivity, ...]:
        """The layers the global figures count: the masked ones, or every maskable layer of a
        network with none masked (a dense baseline)."""
        masked = tuple(c for c in self.layers if c.masked)
        return masked if masked else self.layers

    @property
    def active(self) -> int:
        """Active connections of the masked layers."""
        return sum(c.active for c in self.counted)

    @property
    def total(self) -> int:
        """Connections of the masked layers (their weights, whatever the mask granularity)."""
        return sum(c.total for c in self.counted)

    @property
    def sparsity(self) -> float:
        """Global sparsity: the fraction of the masked layers' connections that are pruned."""
        total = self.total
        return 1.0 - self.active / total if total else 0.0

    @property
    def active_including_dense(self) -> int:
        """Active connections of every maskable layer, dense ones fully active."""
        return sum(c.active for c in self.layers)

    @property
    def total_including_dense(self) -> int:
        """Connections of every maskable layer."""
        return sum(c.total for c in self.layers)

    @property
    def sparsity_including_dense(self) -> float:
        """The fraction of every maskable layer's connections that are pruned."""
        total = self.total_including_dense
        return 1.0 - self.active_including_dense / total if total else 0.0

    def densities(self) -> dict[str, float]:
        """``{layer: active fraction}`` for every maskable layer (dense ones 1.0): what the
        effective FLOPs scale each layer's dense FLOPs by."""
        return {c.name: c.density for c in self.layers}


@torch.no_grad()
def connectivity(model: nn.Module) -> Connectivity:
    """Active and total connections of every maskable layer of ``model``, in module order,
    gathered with a single device-to-host transfer. See :class:`Connectivity` for the figures
    it defines. A model without any maskable layer gives an empty :class:`Connectivity`."""
    entries: list[tuple[str, tuple[int, ...], int, bool]] = []
    counts: list[Tensor] = []
    for name, module in maskable_modules(model):
        weight = layer_weight(module)
        masked = isinstance(module, MaskedLayer)
        entries.append((name, tuple(weight.shape), weight.numel(), masked))
        if masked:
            counts.append(cast(MaskedLayer, module).active_connections())
        else:
            counts.append(torch.tensor(float(weight.numel()), device=weight.device))
    if not entries:
        return Connectivity(())
    device = counts[0].device
    active = torch.stack([c.to(device, torch.float64) for c in counts]).tolist()
    return Connectivity(
        tuple(
            LayerConnectivity(name, shape, int(a), total, masked)
            for (name, shape, total, masked), a in zip(entries, active, strict=True)
        )
    )


def layer_connectivity(model: nn.Module) -> list[LayerConnectivity]:
    """Active and total connections of every masked layer, in module order.

    Raises:
        ValueError: if ``model`` has no masked layer.
    """
    _require_masked(model, "layer_connectivity")
    return [c for c in connectivity(model).layers if c.masked]


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """``{qualified layer name: fraction of its connections pruned}`` for every masked layer.

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
    """Fraction of the masked layers' connections that are pruned (:class:`Connectivity`).

    Raises:
        ValueError: if ``model`` has no masked layer.
    """
    _require_masked(model, "global_sparsity")
    return connectivity(model).sparsity


def global_sparsity_including_dense(model: nn.Module) -> float:
    """Fraction of the connections of every maskable layer that are pruned, layers left dense
    included (fully active): lower than :func:`global_sparsity` when some layers are excluded."""
    return connectivity(model).sparsity_including_dense
