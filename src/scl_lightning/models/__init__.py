"""Model registry (``create_model``, ``list_models``, ``register_model``) and architectures.

Importing this package registers every built-in architecture. ``create_model`` also builds
models of torchvision and timm by prefixed name (``"torchvision:resnet18"``, ``"timm:NAME"``);
those libraries are optional and imported only then.
"""

from .cnn import SmallCNN
from .lenet import LeNet5
from .mlp import LeNet300100
from .registry import create_model, list_models, register_model
from .resnet_cifar import CifarResNet
from .resnet_imagenet import ResNet
from .vgg_cifar import CifarVGG

__all__ = [
    "CifarResNet",
    "CifarVGG",
    "LeNet5",
    "LeNet300100",
    "ResNet",
    "SmallCNN",
    "create_model",
    "list_models",
    "register_model",
]
