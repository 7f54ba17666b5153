"""Argument checks shared by the image-model factories (private)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_positive_int", "image_shape"]


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def image_shape(
    model: str,
    input_shape: Sequence[int] | None,
    default: tuple[int, int, int],
    min_size: int = 1,
) -> tuple[int, int, int]:
    """Validate a ``(channels, height, width)`` sample shape, or return ``default`` for ``None``.

    Raises:
        ValueError: If the shape is not three positive integers, or an image side is smaller
            than ``min_size`` (the smallest input ``model`` can reduce without an empty tensor).
    """
    if input_shape is None:
        return default
    shape = tuple(input_shape)
    if len(shape) != 3 or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape
    ):
        raise ValueError(
            f"input_shape must be (channels, height, width) of positive integers, got {shape!r}"
        )
    if shape[1] < min_size or shape[2] < min_size:
        raise ValueError(
            f"{model} needs images of at least {min_size}x{min_size} pixels, got input_shape "
            f"{shape!r}"
        )
    return shape
