"""Whether a checkpoint's state dict fits a model (plain torch, no Lightning).

:class:`CheckpointError` and :func:`check_compatible` live here, below both
:class:`~scl_lightning.SCLModule` (which checks every checkpoint it loads) and
:mod:`scl_lightning.experiment.checkpoint` (which re-exports them), so that neither the module
nor the callbacks import ``experiment/``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CheckpointError", "check_compatible"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a file that is truncated, not a checkpoint, or holds
    objects that could run code when unpickled; or a state dict that does not fit the model."""


def _granularity(state: dict[str, Any], mask_key: str) -> str | None:
    """``"weight"`` or ``"channel"`` for the mask ``mask_key`` of a state dict, from its shape and
    its layer's weight's (``None`` when that says neither)."""
    mask = state.get(mask_key)
    weight = state.get(mask_key[: -len("mask")] + "weight")
    if not isinstance(mask, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if mask.shape == weight.shape:
        return "weight"
    if mask.dim() == weight.dim() and mask.shape[:1] == weight.shape[:1] and mask[0].numel() == 1:
        return "channel"
    return None


def check_compatible(
    expected: dict[str, Any],
    found: dict[str, Any],
    source: str = "the checkpoint",
    hint: str | None = None,
) -> None:
    """Check that the state dict ``found`` (from a checkpoint) fits a model whose state dict is
    ``expected``, and say in one line what does not: masks that differ in shape, masks on one
    side only (a dense checkpoint for a masked model, or the reverse), or another architecture.
    ``hint`` replaces what the line says to do about a mask shape or another architecture
    (by default: build the ``SCLModule`` it was trained with).

    Example::

        >>> check_compatible({"fc.mask": torch.zeros(3, 4)}, {"fc.mask": torch.zeros(2, 4)})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        scl_lightning._compat.CheckpointError: the checkpoint does not fit this model: mask ...
    """
    hint = hint or (
        "load it into the model it was trained with (same backbone, num_classes, input_shape, "
        "exclude and granularity)"
    )

    def shape(value: Any) -> tuple[int, ...] | None:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    for key in sorted(expected.keys() & found.keys()):
        if key.endswith(".mask") and shape(expected[key]) != shape(found[key]):
            trained = _granularity(found, key)
            built = _granularity(expected, key)
            if trained and built and trained != built:
                raise CheckpointError(
                    f"{source} does not fit this model: its masks have granularity "
                    f"{trained!r} (mask {key} has shape {shape(found[key])}) and this model's "
                    f"{built!r}; build the model with granularity={trained!r} "
                    f"(--model.granularity {trained})"
                )
            raise CheckpointError(
                f"{source} does not fit this model: mask {key} has shape {shape(found[key])} in "
                f"the checkpoint and {shape(expected[key])} in the model; {hint}"
            )
    masks_expected = {k for k in expected if k.endswith(".mask")}
    masks_found = {k for k in found if k.endswith(".mask")}
    # "dense run" / "masked run" only when the rest agrees: the checkpoint of another model
    # (no masks, other layer names) is another architecture, and sparsify would not help
    same_layers = expected.keys() - masks_expected == found.keys() - masks_found
    if same_layers and masks_expected and not masks_found:
        raise CheckpointError(
            f"{source} has no masks (a dense run, sparsify=False?) but this model is masked; "
            "resume a dense run with --model.sparsify false, or start the SCL run from scratch"
        )
    if same_layers and masks_found and not masks_expected:
        raise CheckpointError(
            f"{source} holds masks but this model is dense (sparsify=False); load it with "
            "sparsify=True, or export its pruned weights with scl_lightning.export_pruned first"
        )
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if same_layers and masks_found and missing and all(k.endswith(".mask") for k in missing):
        # trained when these layers stayed dense (by `exclude`, or before sparsify masked
        # their type: nn.MultiheadAttention, subclasses of nn.Linear, transformers' Conv1D)
        names = [k[: -len(".mask")] for k in missing]
        shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
        raise CheckpointError(
            f"{source} was trained with {len(names)} layer(s) dense that this model masks "
            f"({shown}); build the model with those layers excluded (exclude=[...], names "
            "relative to the network)"
        )
    mismatched = [
        key
        for key in sorted(expected.keys() & found.keys())
        if shape(expected[key]) != shape(found[key])
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            key = mismatched[0]
            parts.append(
                f"{key} has shape {shape(found[key])} in the checkpoint and "
                f"{shape(expected[key])} in the model"
            )
        if missing:
            parts.append(f"{len(missing)} entries missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source} is from another architecture: {'; '.join(parts)}; {hint}")
