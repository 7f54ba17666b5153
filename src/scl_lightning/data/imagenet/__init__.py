"""LightningDataModule for ImageNet (ILSVRC2012) in the standard class-folder layout.

Decoding and augmentation run in the DataLoader worker processes with Pillow (or with
torchvision when it is importable); batches travel to the device as ``uint8`` and are
normalized there, in ``on_after_batch_transfer``.

The package, by concern: :mod:`.folders` lists and checks the class folders of a split,
:mod:`.pipelines` decodes and augments one image, :mod:`.dataset` is the Dataset of a split and
its reporting DataLoader, and :mod:`.datamodule` the :class:`ImageNetDataModule`.
"""

from .datamodule import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule
from .dataset import BadImageError, BadImageWarning, ImageFolderDataset
from .folders import IMAGE_EXTENSIONS

# Private, re-exported for code written against the former single module. Patch a name where
# it is looked up (e.g. ``datamodule._torchvision_import_error``), not here.
from .pipelines import _random_resized_crop_box as _random_resized_crop_box
from .pipelines import _torchvision_import_error as _torchvision_import_error

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "BadImageWarning",
    "ImageFolderDataset",
    "ImageNetDataModule",
]
