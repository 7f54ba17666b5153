"""Vectorized image-batch transforms: random crop, horizontal flip, Cutout and normalization.

Every function takes a whole batch ``(N, C, H, W)`` on any device and does its work in a few tensor
operations, with no Python loop over the images, so augmentation can run on the GPU after the batch
has been transferred as ``uint8`` (a quarter of the bytes of ``float32``).

Each random transform has two layers (functional core): a deterministic function taking the
per-image parameters (:func:`crop_at`, :func:`hflip_where`, :func:`cutout_at`) and a random one
that draws them from a :class:`torch.Generator` and calls it (:func:`random_crop`,
:func:`random_hflip`, :func:`cutout`). Given the same generator state, a random transform gives the
same result. :class:`BatchAugment` composes them in the order of the standard CIFAR recipe.

The random transforms never read a tensor back to the host, so they do not synchronize with the GPU;
the deterministic ones check the offsets they are given, which does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scl_lightning._utils import is_int

__all__ = [
    "BatchAugment",
    "crop_at",
    "cutout",
    "cutout_at",
    "hflip_where",
    "normalize",
    "random_crop",
    "random_hflip",
]


def _check_batch(x: Tensor) -> tuple[int, int, int, int]:
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected an image batch of shape (N, C, H, W), got {got}")
    n, c, h, w = x.shape
    return n, c, h, w


def _crop_geometry(
    x: Tensor, size: int | Sequence[int] | None, padding: int
) -> tuple[int, int, int, int]:
    """Checked ``(crop_h, crop_w, padded_h, padded_w)`` for cropping ``x``."""
    _, _, h, w = _check_batch(x)
    if size is None:
        size = (h, w)
    pair: tuple[object, ...] = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(is_int(s) and s > 0 for s in pair):  # type: ignore[operator]
        raise ValueError(f"size must be a positive int or a pair of them, got {size!r}")
    if not is_int(padding) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    ch, cw = int(pair[0]), int(pair[1])  # type: ignore[call-overload]
    hp, wp = h + 2 * padding, w + 2 * padding
    if ch > hp or cw > wp:
        raise ValueError(f"crop size {(ch, cw)} does not fit in the padded image size {(hp, wp)}")
    return ch, cw, hp, wp


def _per_image(value: Tensor, n: int, name: str, x: Tensor, dtype: torch.dtype) -> Tensor:
    value = torch.as_tensor(value)
    if value.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},), one value per image, got {tuple(value.shape)}"
        )
    return value.to(device=x.device, dtype=dtype)


def _crop(
    x: Tensor, top: Tensor, left: Tensor, ch: int, cw: int, padding: int, flip: Tensor | None
) -> Tensor:
    # Unchecked: range checks would synchronize with the GPU on every batch.
    n, c, _, w = x.shape
    wp = w + 2 * padding
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = top[:, None] + torch.arange(ch, device=x.device)  # (N, ch)
    cols = torch.arange(cw, device=x.device).expand(n, cw)  # (N, cw)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = left[:, None] + cols
    # One gather over the flattened padded image: about 5x faster on CPU than advanced indexing
    # on two axes, and the flip comes for free by reversing the column indices.
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, ch * cw).expand(n, c, ch * cw)
    return xp.reshape(n, c, -1).gather(2, index).reshape(n, c, ch, cw)


def crop_at(
    x: Tensor,
    top: Tensor,
    left: Tensor,
    size: int | Sequence[int] | None = None,
    *,
    padding: int = 0,
    flip: Tensor | None = None,
) -> Tensor:
    """Crop image ``i`` of a zero-padded batch at ``(top[i], left[i])``, mirrored where ``flip[i]``.

    The batch is padded with zeros by ``padding`` pixels on every side first, and the offsets are
    in the padded image: ``top = left = padding`` with the default ``size`` returns the batch
    unchanged. Crop and flip are a single gather.

    Args:
        x: Image batch ``(N, C, H, W)`` of any dtype.
        top: Row offset of each crop, integers of shape ``(N,)`` in ``[0, H + 2 * padding - h]``.
        left: Column offset of each crop, shape ``(N,)``, in ``[0, W + 2 * padding - w]``.
        size: Output size ``h`` or ``(h, w)``; ``None`` keeps ``(H, W)``.
        padding: Zero padding added on every side before cropping.
        flip: Optional booleans of shape ``(N,)``: mirror those crops left to right.

    Raises:
        ValueError: If a shape, the size, the padding or an offset is out of range.

    Example::

        >>> x = torch.arange(16).reshape(1, 1, 4, 4)
        >>> crop_at(x, torch.tensor([1]), torch.tensor([2]), 2)
        tensor([[[[ 6,  7],
                  [10, 11]]]])
    """
    ch, cw, hp, wp = _crop_geometry(x, size, padding)
    n = x.shape[0]
    top = _per_image(top, n, "top", x, torch.long)
    left = _per_image(left, n, "left", x, torch.long)
    if n and (
        int(top.min()) < 0
        or int(top.max()) > hp - ch
        or int(left.min()) < 0
        or int(left.max()) > wp - cw
    ):
        raise ValueError(
            f"crop offsets out of range: top must be in [0, {hp - ch}] and left in [0, {wp - cw}]"
        )
    if flip is not None:
        flip = _per_image(flip, n, "flip", x, torch.bool)
    return _crop(x, top, left, ch, cw, padding, flip)


def random_crop(
    x: Tensor,
    size: int | Sequence[int] | None = None,
    padding: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop every image of a zero-padded batch at its own uniformly drawn offset.

    Per image, the same as torchvision's ``RandomCrop(size, padding)``. ``size=None`` keeps the
    input size. Offsets come from ``generator``, which must live on ``x.device`` (``None``: the
    global RNG).

    Example::

        >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> random_crop(x, padding=4, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([8, 3, 32, 32])
    """
    ch, cw, hp, wp = _crop_geometry(x, size, padding)
    n = x.shape[0]
    top = torch.randint(0, hp - ch + 1, (n,), generator=generator, device=x.device)
    left = torch.randint(0, wp - cw + 1, (n,), generator=generator, device=x.device)
    return _crop(x, top, left, ch, cw, padding, None)


def hflip_where(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror left to right the images whose entry of ``flip`` (booleans, shape ``(N,)``) is true;
    the others are returned unchanged."""
    n, _, _, _ = _check_batch(x)
    flip = _per_image(flip, n, "flip", x, torch.bool)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_hflip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image of the batch left to right with probability ``p``, independently."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    n, _, _, _ = _check_batch(x)
    flip = torch.rand(n, generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _cutout(x: Tensor, cy: Tensor, cx: Tensor, size: int, value: float) -> Tensor:
    _, _, h, w = x.shape
    y0 = (cy - size // 2)[:, None]
    x0 = (cx - size // 2)[:, None]
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_rows = (ys >= y0) & (ys < y0 + size)  # (N, H)
    in_cols = (xs >= x0) & (xs < x0 + size)  # (N, W)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], value)


def _check_cutout_size(size: int) -> None:
    if not is_int(size) or size < 0:
        raise ValueError(f"size must be a non-negative integer, got {size!r}")


def cutout_at(
    x: Tensor, center_y: Tensor, center_x: Tensor, size: int, value: float = 0.0
) -> Tensor:
    """Fill, in image ``i``, the ``size x size`` square centred at ``(center_y[i], center_x[i])``
    with ``value``, clipped at the image border.

    The square covers rows ``[cy - size // 2, cy - size // 2 + size)`` and the same columns around
    ``cx``. Returns a new tensor; ``x`` is not modified.

    Example::

        >>> cutout_at(torch.ones(1, 1, 4, 4), torch.tensor([0]), torch.tensor([3]), 2)
        tensor([[[[1., 1., 0., 0.],
                  [1., 1., 1., 1.],
                  [1., 1., 1., 1.],
                  [1., 1., 1., 1.]]]])
    """
    n, _, _, _ = _check_batch(x)
    _check_cutout_size(size)
    cy = _per_image(center_y, n, "center_y", x, torch.long)
    cx = _per_image(center_x, n, "center_x", x, torch.long)
    return _cutout(x, cy, cx, size, value)


def cutout(
    x: Tensor, size: int, value: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Cutout (DeVries and Taylor, 2017): fill one ``size x size`` square per image with
    ``value``; centres are uniform over the image and squares are clipped at its border.

    Apply it after normalization, where ``value=0`` is the dataset mean.
    """
    n, _, h, w = _check_batch(x)
    _check_cutout_size(size)
    cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
    return _cutout(x, cy, cx, size, value)


def _channel_stats(values: Sequence[float] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be one or more finite numbers, got {t.tolist()}")
    return t


def _normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    m = (mean * scale).reshape(1, -1, 1, 1)
    inv = (std * scale).reciprocal().reshape(1, -1, 1, 1)
    # The subtraction converts to float32 in the same pass; the multiply is in place.
    return (x.to(torch.float32) - m).mul_(inv)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Scale a batch to ``[0, 1]`` and standardize each channel: ``(x / 255 - mean) / std``.

    ``uint8`` input is divided by 255; floating input is taken as already in ``[0, 1]``. ``mean``
    and ``std`` are in ``[0, 1]`` pixel units, one value per channel or one for all. Returns
    float32.

    Example::

        >>> x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
        >>> normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))[0, :, 0, 0]
        tensor([2.0000, 1.0000, 0.5000])
    """
    _, c, _, _ = _check_batch(x)
    m = _channel_stats(mean, "mean").to(x.device)
    s = _channel_stats(std, "std").to(x.device)
    for name, t in (("mean", m), ("std", s)):
        if t.numel() not in (1, c):
            raise ValueError(f"{name} needs 1 or {c} values (one per channel), got {t.numel()}")
    if bool((s <= 0).any()):
        raise ValueError(f"std must be positive, got {s.tolist()}")
    return _normalize(x, m, s)


class BatchAugment(nn.Module):
    """The standard CIFAR training augmentation for a whole batch on any device: pad and random
    crop, random horizontal flip, normalization, then Cutout; in eval mode, normalization only.

    Crop and flip run on the raw ``uint8`` batch, so the padding is black, as with torchvision's
    ``RandomCrop(padding=...)`` on PIL images; Cutout runs after normalization and fills with 0,
    the dataset mean, as in DeVries and Taylor (2017). The output is float32. ``mean`` and ``std``
    are non-persistent buffers: ``.to(device)`` moves them and no ``state_dict`` holds them.

    Args:
        mean: Per-channel mean in ``[0, 1]`` pixel units.
        std: Per-channel standard deviation in ``[0, 1]`` pixel units, positive.
        crop_padding: Zero padding on every side before the random crop; ``0`` with the default
            ``crop_size`` disables the crop.
        crop_size: Output side length; ``None`` keeps the input size.
        flip: Mirror each image left to right with probability 1/2.
        cutout: Side of the Cutout square; ``0`` disables it.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        >>> aug = BatchAugment(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), cutout=8)
        >>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> out = aug(x, generator=torch.Generator().manual_seed(0))
        >>> out.shape, out.dtype
        (torch.Size([4, 3, 32, 32]), torch.float32)
        >>> torch.equal(aug.eval()(x), normalize(x, aug.mean, aug.std))
        True
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        crop_size: int | None = None,
        flip: bool = True,
        cutout: int = 0,
    ) -> None:
        super().__init__()
        m = _channel_stats(mean, "mean")
        s = _channel_stats(std, "std")
        if m.numel() != s.numel():
            raise ValueError(f"mean and std need as many values, got {m.numel()} and {s.numel()}")
        if bool((s <= 0).any()):
            raise ValueError(f"std must be positive, got {s.tolist()}")
        if not is_int(crop_padding) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {crop_padding!r}")
        if crop_size is not None and (not is_int(crop_size) or crop_size < 1):
            raise ValueError(f"crop_size must be None or a positive integer, got {crop_size!r}")
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be True or False, got {flip!r}")
        if not is_int(cutout) or cutout < 0:
            raise ValueError(f"cutout must be a non-negative integer, got {cutout!r}")
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)
        self.crop_padding = crop_padding
        self.crop_size = crop_size
        self.flip = flip
        self.cutout = cutout

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment and normalize ``x`` in training mode; only normalize it in eval mode.

        ``generator`` must live on ``x.device``; ``None`` draws from the global RNG.
        """
        n, c, h, w = _check_batch(x)
        if c != self.mean.numel() and self.mean.numel() != 1:
            raise ValueError(f"batch has {c} channels but mean/std have {self.mean.numel()} values")
        if self.training:
            size = (self.crop_size, self.crop_size) if self.crop_size is not None else (h, w)
            crop = self.crop_padding > 0 or size != (h, w)
            if crop or self.flip:
                ch, cw, hp, wp = _crop_geometry(x, size, self.crop_padding)
                dev = x.device
                if crop:
                    top = torch.randint(0, hp - ch + 1, (n,), generator=generator, device=dev)
                    left = torch.randint(0, wp - cw + 1, (n,), generator=generator, device=dev)
                else:
                    top = left = torch.zeros(n, dtype=torch.long, device=dev)
                flips = torch.rand(n, generator=generator, device=dev) < 0.5 if self.flip else None
                x = _crop(x, top, left, ch, cw, self.crop_padding, flips)
        out = _normalize(x, self.mean, self.std)
        if self.training and self.cutout > 0:
            out = cutout(out, self.cutout, 0.0, generator=generator)
        return out

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.tolist()]
        std = [round(v, 4) for v in self.std.tolist()]
        return (
            f"mean={mean}, std={std}, crop_padding={self.crop_padding}, "
            f"crop_size={self.crop_size}, flip={self.flip}, cutout={self.cutout}"
        )
