"""A network's outputs, whatever their structure, as a flat list of named leaves.

Networks return a tensor, or a structure of them: a tuple, a dict, a namedtuple, a dataclass,
Hugging Face's ``ModelOutput`` (an ``OrderedDict`` subclass), or any type registered with
``torch.utils._pytree``, nested. Tracers want flat tensors (fvcore's ``torch.jit`` trace, ONNX),
and people want to point at one output by name: :func:`named_outputs` is the one definition of
both the order and the names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["key_path_name", "named_outputs"]


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def key_path_name(key_path: tuple[Any, ...]) -> str:
    """The name :func:`named_outputs` gives the part of an output at a ``torch.utils._pytree``
    key path: its keys, indices and attribute names joined by dots."""
    parts = []
    for entry in key_path:
        # MappingKey, SequenceKey, GetAttrKey
        part = next((getattr(entry, a) for a in ("key", "idx", "name") if hasattr(entry, a)), entry)
        parts.append(str(part))
    return ".".join(parts)


def _children(value: Any) -> list[tuple[object, Any]] | None:
    """``(key, child)`` pairs of a container, or ``None`` for a leaf."""
    if isinstance(value, Tensor):
        return None
    if isinstance(value, Mapping):  # dict, OrderedDict, ModelOutput
        return list(value.items())
    fields = getattr(type(value), "_fields", None)
    if isinstance(value, tuple) and isinstance(fields, tuple):  # a namedtuple
        return list(zip(fields, value, strict=True))
    if isinstance(value, list | tuple):
        return list(enumerate(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    if pytree.tree_is_leaf(value):
        return None
    # another type registered with torch.utils._pytree: one level of its flattening
    try:
        pairs, _ = pytree.tree_flatten_with_path(value, is_leaf=lambda x: x is not value)
    except ValueError:  # registered without key paths: number the children
        return list(enumerate(pytree.tree_leaves(value, is_leaf=lambda x: x is not value)))
    return [(key_path_name(path), child) for path, child in pairs]


def named_outputs(output: Any) -> list[tuple[str, Any]]:
    """Flatten a network's output to ``(name, leaf)`` pairs, in the structure's order.

    A name is the path to the leaf: dict keys, namedtuple and dataclass field names and
    tuple/list indices, joined by dots (``"logits"``, ``"aux.0"``); a bare tensor's name is
    ``""``. ``None`` values are left out (a ``ModelOutput`` leaves out its ``None`` fields
    too). Leaves are tensors, or whatever else is not a container (a number, a cache object):
    the caller decides what to do with those.

    Example::

        >>> import torch
        >>> out = {"logits": torch.zeros(2, 3), "aux": (torch.ones(2), None), "n": 4}
        >>> [(name, type(leaf).__name__) for name, leaf in named_outputs(out)]
        [('logits', 'Tensor'), ('aux.0', 'Tensor'), ('n', 'int')]
        >>> named_outputs(torch.zeros(1))[0][0]
        ''
    """
    found: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if value is None:
            return
        children = _children(value)
        if children is None:
            found.append((prefix, value))
            return
        for key, child in children:
            walk(_join(prefix, key), child)

    walk("", output)
    return found
