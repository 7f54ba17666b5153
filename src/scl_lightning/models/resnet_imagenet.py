"""ImageNet ResNets (resnet18, resnet50), module for module the same as torchvision's.

Module names, shapes and the order of the state_dict match ``torchvision.models.resnet18`` /
``resnet50``, so torchvision's pretrained state_dicts load with ``strict=True`` and no torchvision
install is needed to build the networks. ``Bottleneck`` puts the stride on its 3x3 convolution
(ResNet v1.5, torchvision's choice). torchvision's extra options (``zero_init_residual``,
groups, width per group, dilation, a custom norm layer) are not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import check_positive_int, image_shape
from .registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 conv + BN, projection shortcut where shapes change.

    Args:
        in_channels: Channels of the input.
        planes: Channels of both convolutions and of the output (``expansion`` is 1).
        stride: Stride of ``conv1`` and of the ``downsample`` projection.

    Example::

        >>> import torch
        >>> BasicBlock(64, 128, stride=2)(torch.zeros(1, 64, 8, 8)).shape
        torch.Size([1, 128, 4, 4])
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != planes:
            self.downsample = _downsample(in_channels, planes, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5): 1x1 reduce, 3x3 with the stride, 1x1 expand by 4.

    Args:
        in_channels: Channels of the input.
        planes: Channels of the 1x1 and 3x3 convolutions; the output has ``4 * planes``.
        stride: Stride of ``conv2`` (the 3x3) and of the ``downsample`` projection.

    Example::

        >>> import torch
        >>> Bottleneck(64, 64)(torch.zeros(1, 64, 8, 8)).shape
        torch.Size([1, 256, 8, 8])
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _downsample(in_channels, out_channels, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016) with torchvision's module names and initialization.

    Modules: ``conv1`` (7x7, stride 2), ``bn1``, ``relu``, ``maxpool`` (3x3, stride 2),
    ``layer1``..``layer4`` (64/128/256/512 planes; stages 2-4 start with stride 2), ``avgpool``,
    ``fc``. Convolutions get ``kaiming_normal_`` (fan-out, ReLU), BatchNorm ones and zeros, and
    ``fc`` PyTorch's default init, as in torchvision.

    Args:
        block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50/101/152).
        layers: Number of blocks in each of the four stages, e.g. ``(3, 4, 6, 3)``.
        num_classes: Number of output logits.
        in_channels: Channels of the input images (torchvision: 3).

    Raises:
        ValueError: If ``block`` is not one of the two block classes, ``layers`` is not four
            positive integers, or an argument is not a positive integer.

    Example::

        >>> import torch
        >>> model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=10)
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 4:
            raise ValueError(f"layers must be four positive integers, got {layers!r}")
        for n in layers:
            check_positive_int("every entry of layers", n)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        self.layers = tuple(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        stages: list[nn.Sequential] = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [block(channels, planes, stride)]
            channels = planes * block.expansion
            stage += [block(channels, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18")
def resnet18(*, num_classes: int = 1000, input_shape: Sequence[int] | None = None) -> ResNet:
    """ImageNet ResNet-18 (11.69M parameters with 1000 classes), torchvision-compatible.

    ``in_channels = input_shape[0]`` (3 when no shape is given). ``create_model`` passes its own
    ``num_classes`` (default 10): ask for 1000 to load ImageNet weights.
    """
    channels = image_shape("resnet18", input_shape, (3, 224, 224))[0]
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=channels)


@register_model("resnet50")
def resnet50(*, num_classes: int = 1000, input_shape: Sequence[int] | None = None) -> ResNet:
    """ImageNet ResNet-50 v1.5 (25.56M parameters with 1000 classes), torchvision-compatible.

    ``in_channels = input_shape[0]`` (3 when no shape is given). ``create_model`` passes its own
    ``num_classes`` (default 10): ask for 1000 to load ImageNet weights.
    """
    channels = image_shape("resnet50", input_shape, (3, 224, 224))[0]
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=channels)
