"""VGG-16 and VGG-19 with batch norm for CIFAR, as used by the pruning literature.

The default layout is the one of network slimming (Liu et al. 2017, ``Eric-mingjie/
network-slimming`` ``models/vgg.py``), also used by "Rethinking the Value of Network Pruning"
(Liu et al. 2019), GraSP and other pruning-at-initialization work: 3x3 conv (no bias) +
BatchNorm + ReLU for every entry of the configuration, 2x2 max-pools at ``"M"``, no pool after
the last stage but a global average pool (2x2 -> 1x1 on 32x32 inputs), then one Linear layer.
VGG-16: 14.72M parameters and 313.20M multiply-adds on CIFAR-10; VGG-19: 20.04M parameters
(network slimming's figure) and 398.14M multiply-adds.

``classifier="mlp"`` gives instead the head of Li et al. 2017 ("Pruning Filters for Efficient
ConvNets") and HRank (Lin et al. 2020): Linear 512 -> 512, BatchNorm1d, ReLU, Linear -> classes.
Their VGG-16 has 14.99M parameters here (HRank reports 14.98M; Li et al. 1.5e7) and 313.46M
multiply-adds (HRank's 313.73M also counts the batch-norm layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ._checks import check_positive_int, image_shape
from .registry import register_model

__all__ = ["CFGS", "CifarVGG"]

#: Layer configurations: an int is a 3x3 conv + BN + ReLU with that many filters, "M" a max-pool.
CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"),
        *(512, 512, 512, 512, "M", 512, 512, 512, 512),
    ),
}

Classifier = Literal["linear", "mlp"]


class CifarVGG(nn.Module):
    """VGG with batch norm for small images: ``features``, ``avgpool`` (global), ``classifier``.

    Convolutions (3x3, padding 1, no bias: BatchNorm follows) are initialized with
    ``kaiming_normal_`` (fan-out, ReLU), as in the network-slimming and torchvision code;
    BatchNorm with ones and zeros (network slimming starts its BN scales at 0.5 for its own
    L1 penalty on them, which SCL does not use); Linear layers with N(0, 0.01) and zero bias.

    Args:
        cfg: Layer configuration, e.g. ``CFGS["vgg16"]``: an int is a conv layer with that many
            filters, ``"M"`` a 2x2 max-pool.
        num_classes: Number of output logits.
        in_channels: Channels of the input images.
        classifier: ``"linear"`` (network slimming: one Linear layer) or ``"mlp"`` (Li et al. /
            HRank: Linear to ``hidden``, BatchNorm1d, ReLU, Linear).
        hidden: Width of the ``"mlp"`` classifier's hidden layer.

    Raises:
        ValueError: If ``cfg`` holds something other than positive ints and ``"M"`` or has no
            conv layer, ``classifier`` is unknown, or an argument is not a positive integer.

    Example::

        >>> import torch
        >>> model = CifarVGG(CFGS["vgg16"], num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = CFGS["vgg16"],
        num_classes: int = 10,
        in_channels: int = 3,
        classifier: Classifier = "linear",
        hidden: int = 512,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("hidden", hidden)
        if isinstance(cfg, (str, bytes)) or not isinstance(cfg, Sequence):
            raise ValueError(f"cfg must be a sequence of positive integers and 'M', got {cfg!r}")
        for v in cfg:
            if v != "M":
                check_positive_int("every conv width in cfg", v)
        if not any(v != "M" for v in cfg):
            raise ValueError(f"cfg must contain at least one conv layer, got {tuple(cfg)!r}")
        if classifier not in ("linear", "mlp"):
            raise ValueError(f"classifier must be 'linear' or 'mlp', got {classifier!r}")
        self.cfg = tuple(cfg)
        self.num_classes = num_classes
        self.in_channels = in_channels

        layers: list[nn.Module] = []
        c_in = in_channels
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(c_in, v, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier: nn.Module
        if classifier == "linear":
            self.classifier = nn.Linear(c_in, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(c_in, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _build(
    name: str,
    num_classes: int,
    input_shape: Sequence[int] | None,
    classifier: Classifier,
    hidden: int,
) -> CifarVGG:
    cfg = CFGS[name]
    min_size = 2 ** sum(v == "M" for v in cfg)
    channels = image_shape(name, input_shape, (3, 32, 32), min_size)[0]
    return CifarVGG(
        cfg, num_classes=num_classes, in_channels=channels, classifier=classifier, hidden=hidden
    )


@register_model("vgg16")
def vgg16(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    classifier: Classifier = "linear",
    hidden: int = 512,
) -> CifarVGG:
    """CIFAR VGG-16 with batch norm (network-slimming layout; ``classifier="mlp"`` for HRank's)."""
    return _build("vgg16", num_classes, input_shape, classifier, hidden)


@register_model("vgg19")
def vgg19(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    classifier: Classifier = "linear",
    hidden: int = 512,
) -> CifarVGG:
    """CIFAR VGG-19 with batch norm (network-slimming layout; ``classifier="mlp"`` for HRank's)."""
    return _build("vgg19", num_classes, input_shape, classifier, hidden)
