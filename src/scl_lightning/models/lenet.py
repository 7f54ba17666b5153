"""LeNet-5 (Caffe variant): the small convolutional network of the classic pruning literature."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_positive_int, image_shape
from .registry import register_model

__all__ = ["LeNet5"]

# Smallest image side that survives conv5 -> pool2 -> conv5 -> pool2 with at least one pixel.
_MIN_SIZE = 16


def _flat_side(side: int) -> int:
    return ((side - 4) // 2 - 4) // 2


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example, the "LeNet-5" of Han et al. (2015) and its successors.

    ``conv1`` 5x5 with 20 filters, 2x2 max-pool, ``conv2`` 5x5 with 50 filters, 2x2 max-pool,
    then ``fc1`` (800 -> 500 on 28x28 inputs), ReLU and ``fc2`` (500 -> classes). As in Caffe,
    there is no non-linearity after the convolutions and no padding. On 1x28x28 inputs it has
    431,080 parameters and 2.29M multiply-adds.

    Weights are initialized like Caffe's ``xavier`` filler (uniform with variance 1 / fan_in,
    i.e. ``kaiming_uniform_(a=1)``), biases with zeros.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        image_size: ``(height, width)`` of the input images; sets ``fc1``'s input size.

    Raises:
        ValueError: If an argument is not a positive integer or the images are smaller than
            16x16.

    Example::

        >>> import torch
        >>> model = LeNet5(num_classes=10)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: tuple[int, int] = (28, 28),
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        shape = image_shape("lenet5", (in_channels, *image_size), (1, 28, 28), _MIN_SIZE)
        height, width = shape[1:]
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = (height, width)

        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * _flat_side(height) * _flat_side(width), 500)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(500, num_classes)

        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            nn.init.kaiming_uniform_(layer.weight, a=1)  # Caffe "xavier": U(+-sqrt(3 / fan_in))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


@register_model("lenet5")
def lenet5(*, num_classes: int = 10, input_shape: Sequence[int] | None = None) -> LeNet5:
    """LeNet-5 for images of ``input_shape`` (default ``(1, 28, 28)``, MNIST)."""
    channels, height, width = image_shape("lenet5", input_shape, (1, 28, 28), _MIN_SIZE)
    return LeNet5(in_channels=channels, num_classes=num_classes, image_size=(height, width))
