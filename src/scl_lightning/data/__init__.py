"""LightningDataModules for the datasets SCL is trained and evaluated on, and batch transforms."""

from .cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from .digits import DigitsDataModule
from .imagenet import ImageNetDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .transforms import BatchAugment

__all__ = [
    "BatchAugment",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
]
