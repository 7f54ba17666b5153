"""Models from other libraries by prefixed name: ``"torchvision:NAME"`` and ``"timm:NAME"``.

The libraries are optional and imported only when such a name is built, so that
``scl_lightning`` imports, trains and tests without them (torchvision cannot even be imported on
CPU-only machines where only its CUDA wheels exist).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from torch import nn

__all__ = ["EXTERNAL_PREFIXES", "create_external_model", "is_external_name"]

#: Prefix -> the pip command that installs the library behind it.
EXTERNAL_PREFIXES: dict[str, str] = {
    "torchvision": "pip install 'scl-lightning[vision]'",
    "timm": "pip install timm",
}


def is_external_name(name: object) -> bool:
    """Whether ``name`` has the ``"source:model"`` form of an external model name."""
    return isinstance(name, str) and ":" in name


def _import(library: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(library)
    # A broken install (e.g. a CUDA torchvision wheel next to a CPU torch) fails with other
    # errors than ImportError; report those the same way, with the cause.
    except (ImportError, OSError, RuntimeError) as err:
        raise ImportError(
            f"model {name!r} needs the optional package {library!r}, which could not be imported "
            f"({type(err).__name__}: {err}); install it with `{EXTERNAL_PREFIXES[library]}`"
        ) from err


def create_external_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``"torchvision:NAME"`` or ``"timm:NAME"`` with the library's own factory.

    - ``torchvision:NAME`` calls ``torchvision.models.get_model(NAME, num_classes=num_classes,
      weights=weights, **kwargs)``; ``weights`` defaults to ``None`` (random init). torchvision
      requires ``num_classes`` to match pretrained weights (1000 for ImageNet ones).
      ``input_shape`` is not used.
    - ``timm:NAME`` calls ``timm.create_model(NAME, num_classes=num_classes,
      pretrained=pretrained, **kwargs)``; ``pretrained`` defaults to ``False``, and
      ``in_chans`` defaults to ``input_shape[0]`` when a shape is given.

    Args:
        name: ``"torchvision:NAME"`` or ``"timm:NAME"``.
        num_classes: Number of output logits.
        input_shape: Shape of one input sample, e.g. ``(3, 32, 32)``, or ``None``.
        **kwargs: Passed on to the library's factory.

    Raises:
        ValueError: If the prefix is not ``torchvision`` or ``timm`` or the model name is empty.
        ImportError: If the library cannot be imported; the message says what to install.

    Example::

        >>> create_external_model("keras:resnet50")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown model source 'keras' in 'keras:resnet50'; use 'torchvision:NAME' ...
    """
    source, _, model_name = name.partition(":")
    if source not in EXTERNAL_PREFIXES:
        raise ValueError(
            f"unknown model source {source!r} in {name!r}; use "
            + " or ".join(f"'{prefix}:NAME'" for prefix in EXTERNAL_PREFIXES)
        )
    if not model_name:
        raise ValueError(f"model name missing after {source + ':'!r} in {name!r}")
    library = _import(source, name)
    if source == "torchvision":
        kwargs.setdefault("weights", None)
        model = library.models.get_model(model_name, num_classes=num_classes, **kwargs)
    else:
        kwargs.setdefault("pretrained", False)
        if input_shape is not None and len(input_shape) > 0:
            kwargs.setdefault("in_chans", input_shape[0])
        model = library.create_model(model_name, num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{source} returned a {type(model).__name__} for {name!r}, not an nn.Module"
        )
    return model
