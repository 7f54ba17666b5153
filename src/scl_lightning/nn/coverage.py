"""What SCL covers in a network: the masked layers, the weight layers left dense and why, and
the share of the parameters that no mask governs.

:func:`coverage` is what the setup line of the SCL engine prints and what the run summary
records; :func:`~scl_lightning.nn.sparsify` warns with the same line when it leaves a weight
layer dense for another reason than the user's ``exclude``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from scl_lightning.nn.masked import MaskedLayer
from scl_lightning.nn.sparsify import DENSE_REASONS, classify_layers, masked_modules

__all__ = ["Coverage", "DenseLayer", "DenseLayersWarning", "coverage", "mark_unread"]


class DenseLayersWarning(UserWarning):
    """Linear or convolution layers of a network are left dense, for a reason other than
    ``exclude`` (a tied weight, a forward that transforms it, a hook, a mask never read)."""


@dataclass(frozen=True)
class DenseLayer:
    """A weight layer left dense: its name, type, reason (a key of
    :data:`~scl_lightning.nn.sparsify.DENSE_REASONS`), the detail, and its weight's size
    (0 when that weight is another layer's, counted there)."""

    name: str
    type: str
    reason: str
    detail: str
    parameters: int


@dataclass(frozen=True)
class Coverage:
    """The masked layers and the dense weight layers of a network, and its parameter counts
    (each parameter counted once, however many modules hold it)."""

    masked: tuple[str, ...]
    dense: tuple[DenseLayer, ...]
    parameters: int  # all of the network's
    masked_parameters: int  # the weights under a mask

    @property
    def share_not_masked(self) -> float:
        """The fraction of the parameters no mask governs (dense layers, biases, norms, ...)."""
        return 1.0 - self.masked_parameters / self.parameters if self.parameters else 0.0

    def line(self, who: str = "SCL") -> str:
        """One line: how many weight layers are masked, each dense one with why (grouped by
        reason, the first few named), and the shares of the parameters."""
        total = max(self.parameters, 1)
        layers = len(self.masked) + len(self.dense)
        head = (
            f"{who}: {len(self.masked)} of {layers} weight layers masked, "
            f"{self.masked_parameters / total:.1%} of {self.parameters:,} parameters; "
            f"{self.share_not_masked:.1%} not under SCL"
        )
        if not self.dense:
            return head + " (biases, norms and other parameters)"
        groups: list[str] = []
        for reason, label in DENSE_REASONS.items():
            members = [d for d in self.dense if d.reason == reason]
            if not members:
                continue
            shown = ", ".join(f"{d.name or '(root)'} ({d.detail})" for d in members[:3])
            if len(members) > 3:
                shown += f" and {len(members) - 3} more"
            share = sum(d.parameters for d in members) / total
            groups.append(f"{label} [{len(members)}, {share:.1%}]: {shown}")
        rest = self.parameters - self.masked_parameters - sum(d.parameters for d in self.dense)
        return (
            f"{head}. Left dense: {'; '.join(groups)}. Biases, norms and other parameters: "
            f"{rest / total:.1%}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a summary file."""
        return {
            "masked_layers": len(self.masked),
            "dense_layers": [
                {
                    "name": d.name,
                    "type": d.type,
                    "reason": d.reason,
                    "detail": d.detail,
                    "parameters": d.parameters,
                }
                for d in self.dense
            ],
            "parameters": self.parameters,
            "masked_parameters": self.masked_parameters,
            "share_not_masked": self.share_not_masked,
        }


def mark_unread(layer: MaskedLayer, unread: bool = True) -> None:
    """Record that ``layer``'s mask was found not to act (its weight read outside the mask),
    so that :func:`coverage` counts it dense; the SCL engine calls it."""
    if unread:
        layer.__dict__["_scl_unread"] = True
    else:
        layer.__dict__.pop("_scl_unread", None)


def coverage(model: nn.Module, exclude: Any = ()) -> Coverage:
    """What SCL covers in ``model``: its masked layers, every weight layer left dense with why
    (``exclude`` names the user's patterns; without them a maskable layer left unmasked counts
    as excluded), and the parameter shares.

    Example::

        >>> from scl_lightning.nn import sparsify
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     net = sparsify(net, exclude="2")
        >>> print(coverage(net, exclude="2").line())  # doctest: +NORMALIZE_WHITESPACE
        SCL: 1 of 3 weight layers masked, 22.9% of 70 parameters; 77.1% not under SCL. Left
        dense: excluded by the user [1, 11.4%]: 2 (pattern '2'); not a Linear or convolution
        [1, 57.1%]: 0 (Embedding). Biases, norms and other parameters: 8.6%
    """
    masks = {id(layer.mask) for _, layer in masked_modules(model)}
    counted: set[int] = set()
    parameters = 0
    for param in model.parameters():  # unique already; the masks are SCL's, not the model's
        # a lazy layer's parameter has no size yet
        if id(param) not in masks and not isinstance(param, nn.parameter.UninitializedParameter):
            counted.add(id(param))
            parameters += param.numel()

    seen: set[int] = set()

    def size(weight: Any) -> int:
        if weight is None or id(weight) in seen:
            return 0
        seen.add(id(weight))
        return int(weight.numel()) if id(weight) in counted else 0

    masked: list[str] = []
    dense: list[DenseLayer] = []
    masked_parameters = 0
    for name, layer in masked_modules(model):
        weight = layer.raw_weight
        if layer.__dict__.get("_scl_unread"):
            dense.append(
                DenseLayer(
                    name, type(layer).dense_cls.__name__, "unread", "mask never read", size(weight)
                )
            )
        else:
            masked.append(name)
            masked_parameters += size(weight)
    unmasked, left, _ = classify_layers(model, exclude)
    # maskable, yet not masked: left out when the network was sparsified
    left += [(name, module, "excluded", "not masked") for name, module in unmasked]
    for name, module, reason, detail in left:
        # its weights: every parameter of 2 or more dims it holds itself (one, or the q, k and
        # v projections of an attention with separate ones)
        held = [
            p
            for p in module._parameters.values()
            if p is not None
            and not isinstance(p, nn.parameter.UninitializedParameter)
            and p.dim() >= 2
        ]
        if isinstance(module, MaskedLayer):
            held = [module.raw_weight]
        dense.append(
            DenseLayer(name, type(module).__name__, reason, detail, sum(size(p) for p in held))
        )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    dense.sort(key=lambda d: order.get(d.name, 0))
    return Coverage(tuple(masked), tuple(dense), parameters, masked_parameters)
