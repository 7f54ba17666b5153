"""Layer collapse: a masked layer that has lost every connection cuts the network in two."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from scl_lightning._utils import is_int, validate_positive
from scl_lightning.nn.masked import MaskedLayer
from scl_lightning.nn.stats import connectivity

__all__ = ["LayerCollapseGuard", "LayerCollapseWarning"]


class LayerCollapseWarning(UserWarning):
    """A masked layer has lost all of its connections."""


class LayerCollapseGuard:
    """Watches every masked layer for collapse: all of its masks at zero, which cuts the network
    in two (no signal crosses that layer any more).

    Each collapsed layer is warned about once, by name. With ``min_connections > 0`` a layer is
    never left with fewer active connections than that: when it falls below, the mask variables
    of its strongest connections (the largest ``m``) are raised to ``revive_value > 0``, so they
    are active again in the next forward pass; the penalty may push them down again, and they
    are raised again, so the layer stays at its floor.

    :meth:`check` counts with :func:`~scl_lightning.nn.stats.connectivity` (one device sync)
    and works on masks of any memory layout (``channels_last`` included); call it after
    optimizer steps (every step when ``min_connections > 0``).

    Args:
        min_connections: the fewest active connections a layer may keep (0: only warn).
        revive_value: the mask value given to revived connections.

    Raises:
        ValueError: for a negative or non-integer ``min_connections`` or a ``revive_value``
            that is not > 0.

    Example::

        >>> from scl_lightning.nn import sparsify
        >>> net = sparsify(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
        >>> with torch.no_grad():
        ...     _ = net[1].mask.fill_(-1.0)  # the second layer has collapsed
        >>> LayerCollapseGuard(min_connections=2).check(net, warn=False)
        ['1']
        >>> int((net[1].mask > 0).sum())
        2
    """

    def __init__(self, min_connections: int = 0, revive_value: float = 1e-2) -> None:
        if not is_int(min_connections) or min_connections < 0:
            raise ValueError(
                f"min_connections_per_layer must be an integer >= 0, got {min_connections!r}"
            )
        validate_positive("revive_value", revive_value)
        self.min_connections = int(min_connections)
        self.revive_value = float(revive_value)
        self.warned: set[str] = set()

    @torch.no_grad()
    def check(self, model: nn.Module, warn: bool = True) -> list[str]:
        """Warn about newly collapsed layers and enforce the floor; returns the names of the
        layers found below it (collapsed ones when the floor is 0)."""
        low = []
        for layer in connectivity(model).layers:
            if not layer.masked:
                continue
            name, count = layer.name, layer.active
            floor = min(self.min_connections, layer.total)
            if count == 0 and name not in self.warned:
                self.warned.add(name)
                if warn:
                    advice = (
                        f"it is held at {floor} connections by min_connections_per_layer"
                        if floor
                        else "set min_connections_per_layer to keep some, or lower lam"
                    )
                    warnings.warn(
                        f"SCL: every connection of layer {name!r} is pruned, so the network is "
                        f"cut in two there; {advice}",
                        LayerCollapseWarning,
                        stacklevel=2,
                    )
            if count < floor or (count == 0 and not floor):
                low.append(name)
            if count < floor:
                module = model.get_submodule(name)
                assert isinstance(module, MaskedLayer)
                # a channel mask switches fan-in connections at once: enough units for the floor
                k = min(-(-floor // module.per_mask), module.mask.numel())
                _revive(module.mask, k, self.revive_value)
        return low


def _revive(mask: torch.Tensor, k: int, value: float) -> None:
    """Raise the ``k`` largest entries of ``mask`` to at least ``value``, in place, whatever the
    mask's memory layout (a ``channels_last`` mask has no flat view)."""
    top = torch.topk(mask.flatten(), k).indices
    index = torch.unravel_index(top, mask.shape)
    mask[index] = torch.clamp(mask[index], min=value)
