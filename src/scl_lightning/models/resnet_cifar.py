"""CIFAR ResNets (He et al. 2016, section 4.2): resnet20, resnet32, resnet44, resnet56, resnet110.

The layout is the one the pruning literature uses (He et al.'s CIFAR networks as implemented in
``akamaster/pytorch_resnet_cifar10`` and HRank): a 3x3 convolution with 16 filters, three stages
of ``n`` basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the
image with stride 2), global average pooling and a Linear classifier; depth = 6n + 2. Where a
block changes shape, its shortcut is He et al.'s option A: parameter-free, a strided subsample
plus zero-padded channels, so every weight of the network is in a convolution or the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_int, image_shape
from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "ZeroPadShortcut"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the new channels.

    It has no parameters; the padded channels are split evenly before and after the input's.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output (at least ``in_channels``).
        stride: Spatial subsampling factor.

    Raises:
        ValueError: If an argument is not a positive integer or ``out_channels < in_channels``.

    Example::

        >>> import torch
        >>> ZeroPadShortcut(16, 32, stride=2)(torch.ones(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("stride", stride),
        ):
            check_positive_int(name, value)
        if out_channels < in_channels:
            raise ValueError(
                f"out_channels must be at least in_channels ({in_channels}), got {out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        pad = self.out_channels - self.in_channels
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity or option-A shortcut.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``conv1`` carries the stride.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of both convolutions and of the output.
        stride: Stride of ``conv1`` and of the shortcut.

    Example::

        >>> import torch
        >>> BasicBlock(16, 32, stride=2)(torch.zeros(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images (He et al. 2016): depth 6n + 2, option-A shortcuts.

    Modules: ``conv1``, ``bn1``, ``relu``, ``layer1``..``layer3`` (``n`` :class:`BasicBlock` each,
    16/32/64 channels), ``avgpool``, ``fc``. Parameters on CIFAR-10: 0.27M (depth 20), 0.46M
    (32), 0.66M (44), 0.85M (56), 1.73M (110). Weights of convolutions and ``fc`` are initialized
    with ``kaiming_normal_`` (fan-in), as in the reference implementation; BatchNorm with ones and
    zeros. Checkpoints of ``akamaster/pytorch_resnet_cifar10`` load after renaming ``linear.`` to
    ``fc.`` (and stripping DataParallel's ``module.``).

    Args:
        depth: Number of weight layers, 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: Number of output logits.
        in_channels: Channels of the input images.

    Raises:
        ValueError: If ``depth`` is not 6n + 2 with n >= 1, or an argument is not a positive
            integer.

    Example::

        >>> import torch
        >>> model = CifarResNet(depth=20, num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}"
            )
        self.depth = depth
        self.num_classes = num_classes
        self.in_channels = in_channels
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(
    name: str, depth: int, num_classes: int, input_shape: Sequence[int] | None
) -> CifarResNet:
    channels = image_shape(name, input_shape, (3, 32, 32))[0]
    return CifarResNet(depth=depth, num_classes=num_classes, in_channels=channels)


@register_model("resnet20")
def resnet20(*, num_classes: int = 10, input_shape: Sequence[int] | None = None) -> CifarResNet:
    """CIFAR ResNet-20 with ``in_channels = input_shape[0]`` (3 when no shape is given)."""
    return _build("resnet20", 20, num_classes, input_shape)


@register_model("resnet32")
def resnet32(*, num_classes: int = 10, input_shape: Sequence[int] | None = None) -> CifarResNet:
    """CIFAR ResNet-32 with ``in_channels = input_shape[0]`` (3 when no shape is given)."""
    return _build("resnet32", 32, num_classes, input_shape)


@register_model("resnet44")
def resnet44(*, num_classes: int = 10, input_shape: Sequence[int] | None = None) -> CifarResNet:
    """CIFAR ResNet-44 with ``in_channels = input_shape[0]`` (3 when no shape is given)."""
    return _build("resnet44", 44, num_classes, input_shape)


@register_model("resnet56")
def resnet56(*, num_classes: int = 10, input_shape: Sequence[int] | None = None) -> CifarResNet:
    """CIFAR ResNet-56 with ``in_channels = input_shape[0]`` (3 when no shape is given)."""
    return _build("resnet56", 56, num_classes, input_shape)


@register_model("resnet110")
def resnet110(*, num_classes: int = 10, input_shape: Sequence[int] | None = None) -> CifarResNet:
    """CIFAR ResNet-110 with ``in_channels = input_shape[0]`` (3 when no shape is given)."""
    return _build("resnet110", 110, num_classes, input_shape)
