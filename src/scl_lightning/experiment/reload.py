"""load_sparse: a module trained with SCL, rebuilt with its masks outside a Trainer.

``MyModule.load_from_checkpoint(path)`` fails on the checkpoint of a run with the drop-in
callback (:class:`~scl_lightning.callbacks.SparseConnectivityLearning`): the callback masked the
module in ``setup``, so the checkpoint holds ``mask`` entries that a freshly built ``MyModule``
has no place for ("Unexpected key(s) in state_dict"). :func:`load_sparse` builds the module as
``load_from_checkpoint`` does, masks the same layers the same way (the callback records how in
every checkpoint: :func:`~scl_lightning.nn.mask_spec`), and loads weights and masks strictly.
It also loads the pruned weights of a :func:`~scl_lightning.save_pruned` file into the module.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from scl_lightning._compat import CheckpointError, _granularity, check_compatible
from scl_lightning.callbacks.sparse_connectivity_learning import MASK_SPEC_KEY
from scl_lightning.deploy.export import load_pruned
from scl_lightning.experiment.checkpoint import _is_safetensors, load_checkpoint
from scl_lightning.nn.sparsify import masked_modules, sparsify_like

__all__ = ["load_sparse"]

M = TypeVar("M", bound=nn.Module)

#: what LightningCLI adds to a module's hyper-parameters to replay its own instantiation
_CLI_KEYS = ("_instantiator", "_class_path")


def load_sparse(
    module: type[M] | M,
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    **hparams: Any,
) -> M:
    """A module trained with SCL, rebuilt with its masks from a Lightning checkpoint, or with
    its pruned weights from a :func:`~scl_lightning.save_pruned` file, in eval mode.

    ``load_sparse(MyModule, "last.ckpt")`` works like ``MyModule.load_from_checkpoint``, which
    fails on the checkpoint of a run with the drop-in
    :class:`~scl_lightning.callbacks.SparseConnectivityLearning` (its masks are unexpected
    keys): it builds ``MyModule`` from the hyper-parameters the checkpoint saved
    (``self.save_hyperparameters()``), updated with ``hparams``, calls ``configure_model`` if
    the module has one, masks the layers that were masked, with the estimator and granularity
    they were trained with, calls the module's ``on_load_checkpoint`` and loads weights and
    masks with ``strict=True``. The result computes exactly what the trained module computed.
    ``SCLModule`` checkpoints load too.

    Checkpoints saved with ``save_weights_only=True`` do not record the estimators (Lightning
    runs no callback hook for them): their masked layers get ``"identity"`` and a warning; the
    outputs are the same (an estimator only shapes the masks' gradients).

    A ``.safetensors`` file written by ``save_pruned(module, path)`` holds ``w * H(m)`` with no
    masks and no hyper-parameters: the module is built from ``hparams`` alone (or pass an
    instance), stays unmasked, and gets the pruned weights, with ``strict=True``.

    Nothing is unpickled beyond tensors and plain data (``weights_only=True``; safetensors for
    pruned files), so a file from anywhere cannot run code here.

    Args:
        module: the module's class, or an instance built like the trained one (which is
            masked and loaded in place).
        path: a Lightning checkpoint (``.ckpt``) or a ``save_pruned`` file (``.safetensors``).
        map_location: the device to load onto.
        hparams: hyper-parameters that replace the saved ones (a class only), as in
            ``load_from_checkpoint(path, **kwargs)``. Those the class's ``__init__`` does not
            take are dropped from the saved ones, as Lightning does; LightningCLI's
            instantiation (``_class_path``, ``_instantiator``) is not replayed.

    Returns:
        The module, on ``map_location``, in eval mode.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        IsADirectoryError: if ``path`` is a directory.
        CheckpointError: if the checkpoint is unreadable or holds no masks (it was not trained
            with SCL), or if the module does not fit it (another class, other
            hyper-parameters).
        TypeError: if ``module`` is not an ``nn.Module`` class or instance, or the class cannot
            be built from the saved hyper-parameters and ``hparams``.
        ValueError: for ``hparams`` together with an instance, or a ``compact``/``sparse``/
            ``onnx`` export (read those with :func:`~scl_lightning.deploy.load_export`).

    Example::

        >>> import os, tempfile
        >>> import scl_lightning as scl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Net(pl.LightningModule):  # written with no SCL in mind
        ...     def __init__(self, hidden: int = 8):
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...         self.layers = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(),
        ...                                     nn.Linear(hidden, 2))
        ...     def forward(self, x):
        ...         return self.layers(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return self(batch[0]).square().mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> drop_in = scl.callbacks.SparseConnectivityLearning(ste="softplus", mask_lr=0.5)
        >>> trainer = pl.Trainer(max_steps=2, callbacks=[drop_in], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Net(hidden=3), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     trainer.save_checkpoint(os.path.join(tmp, "last.ckpt"))
        ...     net = scl.load_sparse(Net, os.path.join(tmp, "last.ckpt"))
        >>> net.hparams.hidden, type(net.layers[0]).__name__, net.layers[0].ste, net.training
        (3, 'MaskedLinear', SoftplusSTE(beta=1.0), False)
    """
    if isinstance(module, type) and issubclass(module, nn.Module):
        cls, built = module, None
    elif isinstance(module, nn.Module):
        cls, built = type(module), module
    else:
        raise TypeError(
            f"load_sparse: pass a LightningModule class or instance, got {module!r:.100}"
        )
    if built is not None and hparams:
        raise ValueError(
            f"load_sparse: hyper-parameters ({', '.join(hparams)}) apply when a class is given, "
            f"and this {cls.__name__} is built already: pass {cls.__name__} itself, or build it "
            "with them"
        )
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"load_sparse: path must be a str or os.PathLike, got {type(path).__name__}"
        )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"load_sparse: {path} does not exist; check the path (a run keeps its checkpoints "
            "in its checkpoints/ folder)"
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"load_sparse: {path} is a directory; pass a Lightning checkpoint (.ckpt) or a "
            "save_pruned file (.safetensors) inside it"
        )
    if path.suffix in (".pt2", ".onnx"):
        raise ValueError(
            f"load_sparse: {path} is a compact, sparse or onnx export, not a checkpoint; load "
            "it with scl_lightning.deploy.load_export"
        )
    hint = (
        f"load it into the module it was trained with: its class with the same "
        f"hyper-parameters (load_sparse({cls.__name__}, path, name=value)), or an instance "
        "built like it"
    )
    if _is_safetensors(path):
        net = _load_pruned_file(cls, built, path, hparams, hint)
    else:
        net = _load_lightning_checkpoint(cls, built, path, hparams, hint, map_location)
    return cast(M, net.to(map_location).eval())


def _load_lightning_checkpoint(
    cls: type[nn.Module],
    built: nn.Module | None,
    path: Path,
    hparams: dict[str, Any],
    hint: str,
    map_location: str | torch.device,
) -> nn.Module:
    source = f"checkpoint {path}"
    checkpoint = load_checkpoint(path, map_location=map_location)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"load_sparse: {source} is not a Lightning checkpoint (no state_dict entry); pass "
            "the .ckpt a Trainer saved, or a save_pruned file"
        )
    module = built if built is not None else _build(cls, hparams, source, checkpoint)
    _configure(module)
    # the masks the module lacks: how they were made, as the engine recorded it, or read from
    # their shapes (a user's own buffer named `mask` is in the module's state dict already)
    record = checkpoint.get(MASK_SPEC_KEY)
    record = record if isinstance(record, dict) else {}
    own = module.state_dict().keys()
    spec: dict[str, Mapping[str, Any]] = {}
    for key in state:
        if (key == "mask" or key.endswith(".mask")) and key not in own:
            name = key.removesuffix("mask").removesuffix(".")
            spec[name] = record.get(name) or {"granularity": _granularity(state, key) or "weight"}
    try:
        sparsify_like(module, spec)
    except ValueError as err:  # another network, or an estimator of one's own not registered
        raise CheckpointError(f"load_sparse: {source}: {err}") from None
    masks = {f"{name}.mask" if name else "mask" for name, _ in masked_modules(module)}
    if not masks & state.keys():
        raise CheckpointError(
            f"load_sparse: {source} holds no masks: it was not trained with SCL (the "
            "SparseConnectivityLearning callback, sparsify=True); load it with "
            f"{cls.__name__}.load_from_checkpoint"
        )
    guessed = sorted(name for name in spec if name not in record)
    if guessed:
        warnings.warn(
            f"load_sparse: {source} does not record the estimator of {len(guessed)} masked "
            f"layer(s) (e.g. {guessed[0]!r}; a weights-only checkpoint, or one saved before "
            "scl-lightning recorded them): they get 'identity'. The outputs are the same; to "
            "train on with another estimator, set layer.ste = scl_lightning.nn.get_ste(...)",
            stacklevel=3,
        )
    if isinstance(module, pl.LightningModule):
        module.on_load_checkpoint(checkpoint)  # as load_from_checkpoint does, before loading
    state = checkpoint["state_dict"]
    check_compatible(module.state_dict(), state, f"load_sparse: {source}", hint)
    module.load_state_dict(state, strict=True)
    return module


def _load_pruned_file(
    cls: type[nn.Module],
    built: nn.Module | None,
    path: Path,
    hparams: dict[str, Any],
    hint: str,
) -> nn.Module:
    tensors, metadata = load_pruned(path)
    network = metadata.get("network")
    source = f"pruned file {path}"
    if network and network != cls.__qualname__:
        source += f" (saved from a {network})"
    module = built if built is not None else _build(cls, hparams, source, None)
    _configure(module)
    if any(True for _ in masked_modules(module)):
        raise CheckpointError(
            f"load_sparse: {source} holds pruned weights without masks, and this "
            f"{cls.__name__} has masked layers: load them into one that has none (SCLModule: "
            "sparsify=False)"
        )
    check_compatible(module.state_dict(), tensors, f"load_sparse: {source}", hint)
    module.load_state_dict(tensors, strict=True)
    return module


def _build(
    cls: type[nn.Module],
    hparams: dict[str, Any],
    source: str,
    checkpoint: dict[str, Any] | None,
) -> nn.Module:
    """``cls`` built from the checkpoint's hyper-parameters updated with ``hparams``, as
    ``load_from_checkpoint`` builds it (saved ones ``__init__`` does not take are dropped)."""
    signature = inspect.signature(cls)
    kinds = {name: p.kind for name, p in signature.parameters.items()}
    takes_any = inspect.Parameter.VAR_KEYWORD in kinds.values()
    named = {
        name
        for name, kind in kinds.items()
        if kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    saved: dict[str, Any] = {}
    if checkpoint is not None:
        saved = dict(checkpoint.get("hyper_parameters") or {})
        for key in _CLI_KEYS:
            saved.pop(key, None)
        name = checkpoint.get("hparams_name")
        if name in named:
            saved = {name: saved}  # `save_hyperparameters(config)` of one dict or Namespace
        saved = {k: v for k, v in saved.items() if takes_any or k in named}
    kwargs = {**saved, **hparams}
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        name = cls.__name__
        if checkpoint is None:
            what = f"for {source}, which records no hyper-parameters"
        else:
            what = f"from the hyper-parameters saved in {source}"
        unsaved = checkpoint is not None and "hyper_parameters" not in checkpoint
        raise TypeError(
            f"load_sparse: {name} cannot be built {what} ({err}); give them as keyword "
            f"arguments (load_sparse({name}, path, name=value)) or pass a built {name}"
            + (f", and have {name}.__init__ call self.save_hyperparameters()" if unsaved else "")
        ) from None
    return cls(**kwargs)


def _configure(module: nn.Module) -> None:
    """A module that builds its layers in ``configure_model`` builds them now, as
    ``load_from_checkpoint`` has it do (the hook is idempotent by Lightning's contract)."""
    if isinstance(module, pl.LightningModule) and is_overridden("configure_model", module):
        module.configure_model()
