"""SmallCNN: a compact convolutional classifier for small images such as the 8x8 digits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_positive_int
from .registry import register_model

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Small CNN: conv3x3 + BatchNorm + ReLU blocks, max-pool 2, global average pool, Linear.

    The convolutions keep the spatial size (padding 1) and have no bias (BatchNorm follows), and
    the global average pool makes the classifier independent of the input size, so any image of
    at least 2x2 pixels works.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        channels: Output channels of each conv block, in order (at least one).

    Raises:
        ValueError: If ``in_channels``, ``num_classes`` or a channel count is not a positive
            integer, or ``channels`` is empty.

    Example::

        >>> import torch
        >>> model = SmallCNN(in_channels=1, num_classes=10)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        if (
            isinstance(channels, (str, bytes))
            or not isinstance(channels, Sequence)
            or len(channels) == 0
        ):
            raise ValueError(
                f"channels must be a non-empty sequence of positive integers, got {channels!r}"
            )
        for c in channels:
            check_positive_int("every entry of channels", c)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.channels = tuple(channels)

        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in self.channels:
            blocks += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        blocks += [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("small_cnn")
def small_cnn(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    channels: Sequence[int] = (16, 32),
) -> SmallCNN:
    """SmallCNN with ``in_channels = input_shape[0]`` (1 when no shape is given)."""
    if input_shape is None:
        in_channels = 1
    else:
        if len(input_shape) != 3 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape
        ):
            raise ValueError(
                "input_shape must be (channels, height, width) of positive integers, "
                f"got {tuple(input_shape)!r}"
            )
        if input_shape[1] < 2 or input_shape[2] < 2:
            raise ValueError(
                f"small_cnn needs images of at least 2x2 pixels, got input_shape "
                f"{tuple(input_shape)!r}"
            )
        in_channels = input_shape[0]
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, channels=channels)
