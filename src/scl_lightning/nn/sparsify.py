"""Turn any ``nn.Module`` into an SCL network and back: sparsify, masked_modules, export_pruned,
and mask_spec / sparsify_like, which describe a network's masked layers and rebuild them."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast

import torch
from torch import nn

from scl_lightning.nn.maskable import layer_weight, maskable_type, masked_class_of
from scl_lightning.nn.masked import (
    MaskedLayer,
    validate_granularity,
    validate_mask_init,
)
from scl_lightning.nn.ste import STE, get_ste, step

__all__ = [
    "DENSE_REASONS",
    "classify_layers",
    "export_pruned",
    "mask_spec",
    "maskable_modules",
    "masked_modules",
    "refuse_tied",
    "sparsify",
    "sparsify_like",
    "tied_weights",
]

M = TypeVar("M", bound=nn.Module)


def _normalize_patterns(exclude: str | Iterable[str]) -> tuple[str, ...]:
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"exclude patterns must be non-empty strings, got {p!r}")
    return patterns


def _excluded(name: str, patterns: tuple[str, ...]) -> str | None:
    # A pattern naming a container also excludes everything inside it.
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*"):
            return p
    return None


def tied_weights(model: nn.Module) -> dict[str, str]:
    """``{layer: where else its weight is held}`` for every maskable layer of ``model`` whose
    ``weight`` parameter is also a parameter of another module (a tie such as GPT-2's
    ``lm_head.weight = transformer.wte.weight``; a layer reused under two names is one module,
    not a tie).

    The other module reads the stored weight, not the masked one, so a mask on such a layer
    would act in one place and not in the other: :func:`sparsify` leaves these layers dense.

    Example::

        >>> net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
        >>> net[2].weight = net[0].weight
        >>> tied_weights(net)
        {'0': '2.weight', '2': '0.weight'}
    """
    holders: dict[int, list[tuple[int, str]]] = {}  # id(param) -> [(id(module), "name.attr")]
    for name, module in model.named_modules():  # a module shared under two names comes once
        for attr, param in module._parameters.items():
            if param is not None:
                qualified = f"{name}.{attr}" if name else attr
                holders.setdefault(id(param), []).append((id(module), qualified))
    tied: dict[str, str] = {}
    for name, module in maskable_modules(model):
        weight = layer_weight(module)
        others = [q for owner, q in holders.get(id(weight), ()) if owner != id(module)]
        if others:
            tied[name] = others[0]
    return tied


def refuse_tied(model: nn.Module, who: str) -> None:
    """Raise ``ValueError`` if a masked layer of ``model`` shares its weight with another
    module (:func:`tied_weights`); ``who`` starts the message."""
    tied = tied_weights(model)
    masked = [n for n, _ in masked_modules(model) if n in tied]
    if masked:
        raise ValueError(
            f"{who}: the masked layer {masked[0]!r} shares its weight with {tied[masked[0]]}, "
            "which reads it without the mask, so no plain state dict holds what the model "
            "computes; build the model with the weights untied, or leave the layer dense "
            "(sparsify does, for a tie it sees when masking)"
        )


def maskable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every layer :func:`sparsify` would mask by its type
    (:func:`~scl_lightning.nn.maskable_type`), masked or not."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            yield name, cast(nn.Module, module)
            continue
        entry, reason = maskable_type(module)
        if entry is not None and reason is None:
            yield name, module


#: Why a layer stays dense, by category (the setup line groups layers by these)
DENSE_REASONS: dict[str, str] = {
    "excluded": "excluded by the user",
    "unsupported": "unsupported type",
    "other": "not a Linear or convolution",
    "tied": "weight tied to another module",
    "hook": "weight made by a hook",
    "unread": "read outside the mask",
}


def classify_layers(
    model: nn.Module, exclude: str | Iterable[str] = ()
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module, str, str]], set[str]]:
    """What :func:`sparsify` would do with each weight layer of ``model``: ``(to mask,
    left dense, matched patterns)``, the dense ones as ``(name, module, category, detail)``
    with a category of :data:`DENSE_REASONS`. Masked layers are in neither list; a layer that
    is ``exclude``d is ``"excluded"``, and with no pattern given, so is every maskable layer
    left unmasked."""
    patterns = _normalize_patterns(exclude)
    tied = tied_weights(model)
    to_mask: list[tuple[str, nn.Module]] = []
    dense: list[tuple[str, nn.Module, str, str]] = []
    matched: set[str] = set()
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer) or id(module) in seen:
            continue
        entry, reason = maskable_type(module)
        if entry is None and reason is None:
            continue  # no weight
        seen.add(id(module))
        hit = None if reason is not None else _excluded(name, patterns)
        if reason is not None:
            # a registered type that cannot be masked as it is, or another kind of layer
            category = "unsupported" if entry is not None else "other"
            dense.append((name, module, category, reason))
        elif hit is not None:
            matched.add(hit)
            dense.append((name, module, "excluded", f"pattern {hit!r}"))
        elif name in tied:
            dense.append((name, module, "tied", f"tied to {tied[name]}"))
        elif not isinstance(module._parameters.get(entry.weight), nn.Parameter):  # type: ignore[union-attr]
            # spectral_norm / the old weight_norm: the weight is recomputed by a hook from
            # `weight_orig` before every forward, which a mask on it would not see
            dense.append((name, module, "hook", "made by a hook (spectral_norm, weight_norm)"))
        else:
            try:  # made now, before any layer changes class: sparsify converts all or none
                masked_class_of(module)
            except Exception as err:  # a class of one's own may refuse to be subclassed
                why = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
                dense.append(
                    (
                        name,
                        module,
                        "unsupported",
                        f"its masked class cannot be made ({type(err).__name__}: {why})",
                    )
                )
                continue
            to_mask.append((name, module))
    return to_mask, dense, matched


def masked_modules(model: nn.Module) -> Iterator[tuple[str, MaskedLayer]]:
    """``(qualified name, masked layer)`` for every masked layer of ``model``, in module order.

    Example::

        >>> net = sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> [name for name, _ in masked_modules(net)]
        ['0', '2']
    """
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            yield name, module


def sparsify(
    model: M,
    *,
    exclude: str | Iterable[str] = (),
    mask_init: float = 1.0,
    ste: str | STE = "identity",
    ste_kwargs: Mapping[str, Any] | None = None,
    granularity: str = "weight",
) -> M:
    """Give every Linear and convolution layer of ``model`` a trainable mask, in place.

    The layers masked are those of a registered type (:func:`~scl_lightning.nn.maskable_type`):
    ``nn.Linear`` and ``nn.Conv1d/2d/3d`` and their subclasses, transformers' ``Conv1D`` and
    ``nn.MultiheadAttention``'s packed input projection, and whatever
    :func:`~scl_lightning.nn.register_maskable` adds. A subclass that overrides ``forward`` is
    masked only if its output stays linear in the weight (checked once per class).
    Layers are converted in place (their class changes to the masked one and a ``mask``
    parameter is added), so weights, biases, dtype, device, hooks and references held elsewhere
    are all kept. Biases and every other layer type (normalization, embeddings, transposed
    convolutions) are never masked. Calling it again masks only layers that are still dense.
    When a Linear or convolution layer is left dense for another reason than ``exclude``, one
    :class:`~scl_lightning.nn.DenseLayersWarning` lists them all, with why, and the share of
    the parameters that is not under SCL (:func:`~scl_lightning.nn.coverage`).

    A masked layer's ``weight`` reads as ``w * H(m)`` wherever it is read (its own forward, or
    a functional ``F.linear(x, layer.weight)`` elsewhere). A layer whose weight parameter is
    also held by another module (:func:`tied_weights`, e.g. an output layer tied to the
    embedding) is left dense: the other module reads the stored weight, so the mask could
    not act there.

    Args:
        model: any ``nn.Module``, including one written elsewhere with pretrained weights loaded.
        exclude: ``fnmatch`` patterns of qualified module names to leave dense; a pattern that
            names a container excludes everything inside it (``"classifier"``, ``"layer4.*"``).
        mask_init: initial value of every mask variable (> 0: all connections start on).
        ste: straight-through estimator name (see :func:`~scl_lightning.nn.ste.available_stes`)
            or instance.
        ste_kwargs: hyper-parameters of a named estimator, e.g. ``{"alpha": 0.1}``.
        granularity: ``"weight"`` (default: one mask variable per connection) or ``"channel"``
            (one per output unit or channel, shape ``(out, 1, ...)``: a unit whose mask is on
            keeps all of its connections, one that is off loses them all). Counts, the penalty
            and sparsity stay in connections either way; see ``docs/guide.md``, "Channel
            granularity".

    Returns:
        ``model`` itself.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if nothing is left to mask, or for a bad ``mask_init``, ``ste``,
            ``granularity`` or pattern.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> net = sparsify(net, exclude=["2"])
        >>> [type(m).__name__ for m in net]
        ['MaskedConv2d', 'Flatten', 'Linear']
        >>> sparsify(nn.Sequential(nn.Linear(8, 3)), granularity="channel")[0].mask.shape
        torch.Size([3, 1])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    patterns = _normalize_patterns(exclude)
    mask_init = validate_mask_init(mask_init)
    granularity = validate_granularity(granularity)
    estimator = get_ste(ste, **dict(ste_kwargs or {}))

    already = list(masked_modules(model))
    differing = []
    for name, layer in already:
        theirs = (layer.ste, getattr(layer, "granularity", "weight"))
        if theirs != (estimator, granularity):
            differing.append(f"{name} ({theirs[0]!r}, {theirs[1]})")
    to_convert, dense, matched = classify_layers(model, patterns)

    if differing:
        shown = ", ".join(differing[:3]) + (
            f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        )
        warnings.warn(
            f"sparsify: {len(differing)} layer(s) are already masked with another estimator or "
            f"granularity and keep it: {shown}; sparsify masks only dense layers (asked: "
            f"{estimator!r}, {granularity}). To change a masked layer's estimator, set "
            "`layer.ste = scl_lightning.nn.get_ste(...)`",
            stacklevel=2,
        )
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        warnings.warn(
            f"sparsify: exclude pattern(s) {unmatched} matched no maskable layer of "
            f"{type(model).__name__}; check the names with `model.named_modules()`",
            stacklevel=2,
        )
    if not to_convert and not already:
        detail = f" after excluding {list(patterns)}" if patterns else ""
        left = [f"{n} ({DENSE_REASONS[c]}: {d})" for n, _, c, d in dense if c != "excluded"]
        if left:
            shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
            detail += f" ({len(left)} weight layer(s) left dense: {shown})"
        raise ValueError(
            f"sparsify: {type(model).__name__} has no Linear or convolution layer to "
            f"mask{detail}; SCL needs at least one (check the model or the exclude patterns, "
            "or register a layer type with scl_lightning.nn.register_maskable)"
        )
    for _, module in to_convert:
        masked_class_of(module).from_dense(
            module, mask_init=mask_init, ste=estimator, granularity=granularity
        )
    if any(category not in ("excluded", "other") for _, _, category, _ in dense):
        from scl_lightning.nn.coverage import DenseLayersWarning, coverage

        warnings.warn(coverage(model).line("sparsify"), DenseLayersWarning, stacklevel=2)
    return model


def mask_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """How each masked layer of ``model`` is masked, as plain data (strings, numbers, dicts):
    ``{qualified name: {"ste": name, "ste_kwargs": {...}, "granularity": ...}}``.

    A checkpoint read with ``weights_only=True`` can hold it, and :func:`sparsify_like` masks
    the same layers of a freshly built ``model`` the same way from it, so that the trained
    state dict loads with ``strict=True`` (the drop-in callback saves it in every checkpoint).

    Example::

        >>> net = sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
        ...                ste="leaky_relu", ste_kwargs={"alpha": 0.2}, granularity="channel")
        >>> mask_spec(net)["2"]
        {'ste': 'leaky_relu', 'ste_kwargs': {'alpha': 0.2}, 'granularity': 'channel'}
    """
    return {
        name: {
            # an estimator of one's own that was never registered is recorded by its class
            "ste": layer.ste.name or type(layer.ste).__name__,
            "ste_kwargs": dict(layer.ste.hparams()),
            "granularity": layer.granularity,
        }
        for name, layer in masked_modules(model)
    }


def sparsify_like(model: M, spec: Mapping[str, Mapping[str, Any]]) -> M:
    """Mask the layers of ``model`` that ``spec`` names, as it says, in place: the inverse of
    :func:`mask_spec`.

    Every layer is checked before any is converted. A layer that is masked already keeps its
    mask and estimator. An entry may leave out ``"ste"`` (``"identity"``), ``"ste_kwargs"``
    and ``"granularity"`` (``"weight"``); mask values start at 1, for a state dict to replace.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if ``spec`` names a layer ``model`` does not have, or one that is not an
            layer :func:`sparsify` masks (:func:`~scl_lightning.nn.maskable_type`), or an
            estimator or granularity that is not known.

    Example::

        >>> trained = sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
        ...                    exclude=["2"], ste="softplus")
        >>> fresh = sparsify_like(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
        ...                       mask_spec(trained))
        >>> fresh.load_state_dict(trained.state_dict(), strict=True)
        <All keys matched successfully>
        >>> fresh[0].ste, type(fresh[2]).__name__
        (SoftplusSTE(beta=1.0), 'Linear')
    """
    network = type(model).__name__
    other = (
        f"{network} is not the network that was masked (build that one: the same class, with "
        "the same arguments)"
    )
    todo: dict[int, tuple[nn.Module, STE, str]] = {}  # a layer shared under two names: once
    for name, entry in spec.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{network} has no layer {name!r} to mask; {other}") from None
        if isinstance(module, MaskedLayer) or id(module) in todo:
            continue
        kind, reason = maskable_type(module)
        if kind is None or reason is not None:
            raise ValueError(
                f"{network}.{name} is a {type(module).__name__}, not a layer sparsify masks "
                f"({reason or 'no weight'}); {other}, and register its layer types "
                "(scl_lightning.nn.register_maskable) before loading"
            )
        try:
            estimator = get_ste(entry.get("ste", "identity"), **dict(entry.get("ste_kwargs") or {}))
        except ValueError as err:
            raise ValueError(
                f"layer {name!r}: {err}; an estimator of your own must be registered first "
                "(scl_lightning.nn.register_ste)"
            ) from None
        granularity = validate_granularity(entry.get("granularity", "weight"))
        todo[id(module)] = (module, estimator, granularity)
    for module, estimator, granularity in todo.values():
        masked_class_of(module).from_dense(module, ste=estimator, granularity=granularity)
    return model


@torch.no_grad()
def export_pruned(model: M) -> M:
    """A copy of ``model`` made of plain torch layers with ``w * H(m)`` baked into the weights.

    The copy's ``state_dict`` loads with ``strict=True`` into the original, never-masked
    architecture and gives the same outputs as the masked model (a unit switched off by a
    ``granularity="channel"`` mask is a row, or filter, of zeros). ``model`` is not modified.

    Raises:
        ValueError: if ``model`` has no masked layer.

    Example::

        >>> net = sparsify(nn.Sequential(nn.Linear(4, 2)))
        >>> with torch.no_grad():
        ...     net[0].mask[0, 0] = -1.0
        >>> plain = export_pruned(net)
        >>> w = plain[0].weight
        >>> type(plain[0]).__name__, bool(w[0, 0] == 0), "0.mask" in plain.state_dict()
        ('Linear', True, False)
    """
    if not any(True for _ in masked_modules(model)):
        raise ValueError(
            f"export_pruned: {type(model).__name__} has no masked layer; call "
            "scl_lightning.sparsify(model) (and train it) first"
        )
    refuse_tied(model, "export_pruned")
    pruned = copy.deepcopy(model)
    for _, module in list(masked_modules(pruned)):
        module.raw_weight.mul_(step(module.mask))
        dense_cls = module.dense_cls
        del module.mask  # removes the registered parameter
        del module.ste
        module.__dict__.pop("granularity", None)
        module.__class__ = dense_cls  # type: ignore[assignment]
    return pruned
