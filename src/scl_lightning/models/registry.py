"""Registry of model factories by name: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from .external import create_external_model, is_external_name

__all__ = ["create_model", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelFactory)

# name -> factory(*, num_classes, input_shape, **kwargs) -> nn.Module
_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator that registers a model factory under ``name``.

    The factory is called as ``factory(num_classes=..., input_shape=..., **kwargs)`` and must
    return an ``nn.Module``; ``input_shape`` is ``None`` or the shape of one sample, e.g.
    ``(1, 8, 8)``.

    Args:
        name: The name ``create_model`` will know the factory by.

    Raises:
        ValueError: If ``name`` is empty or not a string, contains ``":"`` (reserved for
            ``"torchvision:NAME"`` and ``"timm:NAME"``), or is already registered.

    Example::

        >>> from torch import nn
        >>> @register_model("doc_linear")
        ... def doc_linear(*, num_classes=10, input_shape=None):
        ...     return nn.Linear(4, num_classes)
        >>> create_model("doc_linear", num_classes=3)
        Linear(in_features=4, out_features=3, bias=True)
        >>> _ = _MODELS.pop("doc_linear")  # keep the registry clean for other doctests
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if is_external_name(name):
        raise ValueError(
            f"model name {name!r} contains ':', which is reserved for 'torchvision:NAME' and "
            "'timm:NAME'; choose another name"
        )
    if name in _MODELS:
        raise ValueError(
            f"model {name!r} is already registered (by {_MODELS[name].__module__}); "
            "choose another name"
        )

    def decorator(factory: _F) -> _F:
        # Checked again here: the name may have been taken between the two calls.
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered; choose another name")
        _MODELS[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted.

    Models of other libraries are not listed: ``create_model`` also accepts
    ``"torchvision:NAME"`` and ``"timm:NAME"`` (see :mod:`scl_lightning.models.external`).

    Example::

        >>> from scl_lightning.models import list_models
        >>> {"lenet_300_100", "small_cnn"} <= set(list_models())
        True
    """
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: A name from ``list_models()``, or ``"torchvision:NAME"`` / ``"timm:NAME"`` for a
            model of that library (installed separately; imported only here).
        num_classes: Number of output logits.
        input_shape: Shape of one input sample without the batch dimension, e.g. ``(1, 8, 8)``;
            ``None`` lets the model use its default.
        **kwargs: Passed on to the model's factory (e.g. ``hidden`` for ``lenet_300_100``).

    Raises:
        ValueError: If ``name`` is not registered, or the factory rejects the arguments.
        ImportError: If ``name`` has a library prefix and the library is not installed.

    Example::

        >>> import torch
        >>> from scl_lightning.models import create_model
        >>> model = create_model("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    if is_external_name(name):
        return create_external_model(
            name, num_classes=num_classes, input_shape=input_shape, **kwargs
        )
    try:
        factory = _MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    if input_shape is not None:
        input_shape = tuple(input_shape)
    return factory(num_classes=num_classes, input_shape=input_shape, **kwargs)
