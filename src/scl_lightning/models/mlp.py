"""LeNet-300-100: the fully connected network of the classic pruning literature."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_positive_int
from .registry import register_model

__all__ = ["LeNet300100"]


class LeNet300100(nn.Module):
    """Multi-layer perceptron: flatten, then Linear + ReLU per hidden layer, then a Linear head.

    With the defaults it is LeNet-300-100 for 28x28 inputs (784-300-100-10, 266,610 parameters);
    on the 8x8 digits it is 64-300-100-10.

    Args:
        in_features: Number of input features after flattening each sample.
        num_classes: Number of output logits.
        hidden: Width of each hidden layer, in order; empty for a linear classifier.

    Raises:
        ValueError: If ``in_features``, ``num_classes`` or a hidden width is not a positive
            integer.

    Example::

        >>> import torch
        >>> model = LeNet300100(in_features=64, num_classes=10)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        hidden: Sequence[int] = (300, 100),
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("num_classes", num_classes)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}")
        for width in hidden:
            check_positive_int("every hidden width", width)
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = tuple(hidden)

        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in self.hidden:
            layers += [nn.Linear(width_in, width), nn.ReLU(inplace=True)]
            width_in = width
        layers.append(nn.Linear(width_in, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("lenet_300_100")
def lenet_300_100(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    hidden: Sequence[int] = (300, 100),
) -> LeNet300100:
    """LeNet-300-100 with ``in_features = prod(input_shape)`` (784 when no shape is given)."""
    if input_shape is None:
        in_features = 784
    else:
        if len(input_shape) == 0 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape
        ):
            raise ValueError(
                f"input_shape must be a non-empty sequence of positive integers, "
                f"got {tuple(input_shape)!r}"
            )
        in_features = math.prod(input_shape)
    return LeNet300100(in_features=in_features, num_classes=num_classes, hidden=hidden)
