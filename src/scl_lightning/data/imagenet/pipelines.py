"""Decoding and augmentation pipelines: Pillow (reproducing torchvision's crop geometry and
random draws) or ``torchvision.io`` with ``transforms.v2``, imported only when used.

Each pipeline has ``decode(path)``, whose failure marks the file as a bad image, and
``transform(decoded) -> uint8 CHW tensor``, whose failure is a bug and propagates.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image as PILImage

_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10


@functools.lru_cache(maxsize=1)
def _torchvision_import_error() -> str | None:
    """Why torchvision's decoding and v2 transforms cannot be imported; None if they can."""
    try:
        import torchvision.io
        import torchvision.transforms.v2  # noqa: F401
    except Exception as err:  # a broken install fails in many ways, not only ImportError
        return f"{type(err).__name__}: {err}"
    return None


def _pil_decode(path: str) -> PILImage.Image:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")  # decodes the whole file: truncated data fails here


def _pil_to_tensor(image: PILImage.Image) -> Tensor:
    # np.array copies into a writable (H, W, 3) array; contiguous CHW so batches stack as NCHW.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` as torchvision's ``RandomResizedCrop`` picks it.

    Same algorithm and same torch RNG calls: up to 10 draws of an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, then a center crop clamped to ``ratio``.
    """
    area = width * height
    # float32 logs, as torchvision computes them, so the same seed gives the same crop.
    log_ratio = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class _PILPipeline:
    """Pillow decoding; torchvision's RandomResizedCrop + flip, or Resize + CenterCrop."""

    def __init__(
        self, train: bool, image_size: int, val_resize: int, min_scale: float, hflip: bool
    ) -> None:
        self.train = train
        self.image_size = image_size
        self.val_resize = val_resize
        self.scale = (min_scale, 1.0)
        self.hflip = hflip

    def decode(self, path: str) -> PILImage.Image:
        return _pil_decode(path)

    def transform(self, image: PILImage.Image) -> Tensor:
        from PIL import Image

        size = self.image_size
        if self.train:
            left, top, w, h = _random_resized_crop_box(
                image.width, image.height, self.scale, _CROP_RATIO
            )
            # Crop, then resize (antialiased), as torchvision does on PIL images. Not
            # resize(box=...): that filters across the box edges and gives other pixels there.
            image = image.crop((left, top, left + w, top + h))
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            if self.hflip and torch.rand(1).item() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            # Shorter side to val_resize (torchvision's Resize(int) rounding), then center crop.
            width, height = image.size
            short, long = min(width, height), max(width, height)
            new_long = int(self.val_resize * long / short)
            new_w, new_h = (
                (self.val_resize, new_long) if width <= height else (new_long, self.val_resize)
            )
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
            top = round((new_h - size) / 2.0)
            left = round((new_w - size) / 2.0)
            image = image.crop((left, top, left + size, top + size))
        return _pil_to_tensor(image)


class _TorchvisionPipeline:
    """torchvision.io decoding (Pillow for what it cannot decode) and transforms.v2."""

    def __init__(
        self, train: bool, image_size: int, val_resize: int, min_scale: float, hflip: bool
    ) -> None:
        from torchvision.transforms import v2

        steps: list[Any]
        if train:
            steps = [v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), ratio=_CROP_RATIO)]
            steps += [v2.RandomHorizontalFlip()] if hflip else []
        else:
            steps = [v2.Resize(val_resize), v2.CenterCrop(image_size)]
        self.steps = v2.Compose(steps)

    def decode(self, path: str) -> Tensor:
        from torchvision.io import ImageReadMode, decode_image, read_file

        try:
            return decode_image(read_file(path), mode=ImageReadMode.RGB)
        except Exception:  # e.g. BMP: Pillow decides whether the file is readable at all
            return _pil_to_tensor(_pil_decode(path))

    def transform(self, image: Tensor) -> Tensor:
        return self.steps(image).contiguous()
