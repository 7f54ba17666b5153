"""SparseModelSummary: Lightning's model summary that tells a network's parameters from SCL's
mask variables and counts FLOPs as the rest of the project does."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import (
    ModelSummary as Summary,
)
from lightning.pytorch.utilities.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torchmetrics import Metric
from typing_extensions import override

from scl_lightning._utils import is_int
from scl_lightning.nn.flops import FlopCounts, flop_counts
from scl_lightning.nn.sparsify import masked_modules
from scl_lightning.nn.stats import connectivity

__all__ = ["SparseModelSummary", "SparseSummary"]

_UNKNOWN = "?"


def _count(parameters: Any, skip: set[int]) -> int:
    return sum(p.numel() for p in parameters if id(p) not in skip and not is_lazy(p))


def _exact(number: int) -> str:
    return f"{number:,}"


class SparseSummary(Summary):
    """Lightning's :class:`~lightning.pytorch.utilities.model_summary.ModelSummary` of a network
    with SCL mask variables.

    * **Params** are the network's own parameters (weights, biases, normalization), what the
      same network without SCL has; the mask variables ``m`` are counted apart (**Masks**, and a
      ``Mask variables`` line), since they exist only while the connectivity is learned.
      Lightning counts them as parameters, which doubles a masked MLP's count.
    * **FLOPs** are one sample's forward pass with one multiply-add counted as one FLOP
      (fvcore's convention, traced by :func:`~scl_lightning.nn.flops.flop_counts`): the numbers
      of ``SparsityMonitor``'s ``flops/*``, ``summary.json`` and ``scl report``. Lightning's
      summary counts two per multiply-add, for the whole example batch. **Eff. FLOPs** leave
      out the connections the masks have pruned. FLOPs need an example input (the module's
      ``example_input_array``, or ``example_input``); without one they show ``?``.
    * torchmetrics metrics (no parameters, not part of the network) are not listed.

    Args:
        model: the LightningModule to summarize.
        max_depth: as Lightning's: the depth of nested modules listed (-1: all, 0: none).
        example_input: the input to count FLOPs with; ``None``: ``model.example_input_array``.

    Example::

        >>> from scl_lightning import SCLModule
        >>> module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
        >>> summary = SparseSummary(module)
        >>> summary.total_parameters, summary.total_masks, summary.flops.total
        (50610, 50200, 50200)
    """

    def __init__(
        self, model: pl.LightningModule, max_depth: int = 1, example_input: Tensor | None = None
    ) -> None:
        self._masks = {id(layer.mask) for _, layer in masked_modules(model)}
        self._by_name = dict(model.named_modules())
        super().__init__(model, max_depth=max_depth)
        example = example_input if example_input is not None else model.example_input_array
        #: the dense FLOPs of one sample (``None``: no example input, or it did not trace)
        self.flops: FlopCounts | None = None
        #: why FLOPs are not counted, when they are not
        self.flops_missing: str | None = None
        self._densities: dict[str, float] = {}
        if not isinstance(example, Tensor):
            self.flops_missing = "no example input (set example_input_array)"
            return
        try:
            self.flops = flop_counts(model, example)
        except Exception as err:  # other people's modules may not trace
            self.flops_missing = f"the model did not trace ({type(err).__name__})"
            return
        self._densities = connectivity(model).densities()

    @property
    @override
    def named_modules(self) -> list[tuple[str, nn.Module]]:
        metrics = [f"{n}." for n, m in self._model.named_modules() if isinstance(m, Metric)]
        return [
            (name, module)
            for name, module in super().named_modules
            if not isinstance(module, Metric) and not name.startswith(tuple(metrics))
        ]

    def _module(self, name: str) -> nn.Module:
        return self._by_name[name]

    @property
    @override
    def param_nums(self) -> list[int]:
        return [_count(self._module(n).parameters(), self._masks) for n in self.layer_names]

    @property
    def mask_nums(self) -> list[int]:
        """The mask variables in each listed module."""
        return [
            sum(p.numel() for p in self._module(n).parameters() if id(p) in self._masks)
            for n in self.layer_names
        ]

    @property
    @override
    def total_parameters(self) -> int:
        return _count(self._model.parameters(), self._masks)

    @property
    @override
    def trainable_parameters(self) -> int:
        params = (p for p in self._model.parameters() if p.requires_grad)
        return _count(params, self._masks)

    @property
    def total_masks(self) -> int:
        """Mask variables of the whole model (not counted in :attr:`total_parameters`)."""
        return sum(p.numel() for p in self._model.parameters() if id(p) in self._masks)

    @property
    @override
    def total_flops(self) -> int:
        return self.flops.total if self.flops is not None else 0

    @property
    def effective_flops(self) -> int | None:
        """One sample's FLOPs with the pruned connections left out."""
        if self.flops is None:
            return None
        return self.flops.effective_module("", self._densities)

    def _flops_column(self, effective: bool) -> list[str]:
        if self.flops is None:
            return [_UNKNOWN] * len(self.layer_names)
        flops = self.flops
        return [
            get_human_readable_count(
                flops.effective_module(name, self._densities)
                if effective
                else flops.modules.get(name, 0)
            )
            for name in self.layer_names
        ]

    @override
    def _get_summary_data(self) -> list[tuple[str, list[str]]]:
        masked = bool(self._masks)
        columns: list[tuple[str, list[str]]] = [
            (" ", [str(i) for i in range(len(self.layer_names))]),
            ("Name", self.layer_names),
            ("Type", self.layer_types),
            ("Params", [get_human_readable_count(n) for n in self.param_nums]),
        ]
        if masked:
            columns.append(("Masks", [get_human_readable_count(n) for n in self.mask_nums]))
        columns.append(("Mode", ["train" if mode else "eval" for mode in self.training_modes]))
        columns.append(("FLOPs", self._flops_column(effective=False)))
        if masked:
            columns.append(("Eff. FLOPs", self._flops_column(effective=True)))
        if self._model.example_input_array is not None:
            columns.append(("In sizes", [str(x) for x in self.in_sizes]))
            columns.append(("Out sizes", [str(x) for x in self.out_sizes]))
        leftover = self.total_parameters - sum(self.param_nums)
        if leftover > 0:  # parameters of the LightningModule itself, outside any child
            for header, values in columns:
                values.append(" " if header == " " else "n/a")
            columns[1][1][-1] = "other params"
            columns[3][1][-1] = get_human_readable_count(leftover)
        return columns

    def footer(self) -> list[tuple[str, str]]:
        """The totals under the table: ``(value, what it is)``, exact counts."""
        modes = self.total_training_modes
        lines = [
            (_exact(self.trainable_parameters), "Trainable params"),
            (_exact(self.total_parameters - self.trainable_parameters), "Non-trainable params"),
            (_exact(self.total_parameters), "Total params"),
        ]
        if self._masks:
            lines.append((_exact(self.total_masks), "Mask variables (SCL; not counted as params)"))
        lines += [
            (get_formatted_model_size(self.model_size), "Total estimated model params size (MB)"),
            (str(modes["train"]), "Modules in train mode"),
            (str(modes["eval"]), "Modules in eval mode"),
        ]
        if self.flops is None:
            lines.append((_UNKNOWN, f"FLOPs: not counted, {self.flops_missing}"))
            return lines
        lines.append((_exact(self.flops.total), "FLOPs per sample (1 multiply-add = 1 FLOP)"))
        effective = self.effective_flops
        if self._masks and effective is not None:
            lines.append((_exact(effective), "Effective FLOPs per sample (pruned connections off)"))
        return lines

    @override
    def __str__(self) -> str:
        columns = self._get_summary_data()
        widths = [max(len(header), *(len(v) for v in values)) for header, values in columns]
        rows = [" | ".join(f"{h:<{w}}" for (h, _), w in zip(columns, widths, strict=True))]
        rule = "-" * (sum(widths) + 3 * len(widths))
        rows.append(rule)
        for i in range(len(columns[0][1])):
            cells = (f"{values[i]:<{w}}" for (_, values), w in zip(columns, widths, strict=True))
            rows.append(" | ".join(cells).rstrip())
        rows.append(rule)
        footer = self.footer()
        width = max(10, *(len(value) + 2 for value, _ in footer))
        rows += [f"{value:<{width}}{what}" for value, what in footer]
        return "\n".join(rows)


class SparseModelSummary(ModelSummary):
    """Lightning's ``ModelSummary`` callback, with the numbers of a network that learns its
    connectivity: the network's own parameters (mask variables counted apart) and FLOPs per
    sample in the project's convention, dense and effective (see :class:`SparseSummary`).

    A drop-in replacement (``Trainer(callbacks=[SparseModelSummary()])``, which Lightning then
    uses instead of its own); ``scl fit`` uses it unless the configuration has a model
    summary of its own. Printed on rank zero at the start of ``fit``. Under DeepSpeed stage 3
    the parameters are sharded and Lightning's own summary is printed instead.

    Args:
        max_depth: the depth of nested modules listed (-1: all, 0: no summary), as Lightning's.
        example_input: one input to count FLOPs with; ``None``: the module's
            ``example_input_array``.
        **summarize_kwargs: Lightning's (kept for other summary formats; unused here).

    Raises:
        ValueError: if ``max_depth`` is not an integer >= -1.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[SparseModelSummary(max_depth=2)], logger=False)
    """

    def __init__(
        self, max_depth: int = 1, example_input: Tensor | None = None, **summarize_kwargs: Any
    ) -> None:
        if not is_int(max_depth) or max_depth < -1:
            raise ValueError(f"max_depth must be an integer >= -1, got {max_depth!r}")
        if example_input is not None and not isinstance(example_input, Tensor):
            raise ValueError(f"example_input must be a tensor or None, got {example_input!r}")
        super().__init__(max_depth=max_depth, **summarize_kwargs)
        self.example_input = example_input

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth:
            return
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
        from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy

        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)) or (
            isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3
        )
        if sharded:
            # a forward on rank zero alone would wait for the other ranks' shards: Lightning's
            # summary, which every rank builds (its forward, if any, is collective)
            super().on_fit_start(trainer, pl_module)
            return
        if trainer.is_global_zero:  # traced and counted on rank zero only: it prints
            summary = SparseSummary(pl_module, self._max_depth, example_input=self.example_input)
            rank_zero_info("\n" + str(summary))
