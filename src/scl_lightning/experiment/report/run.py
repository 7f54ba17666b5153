"""Reading a finished run: ``summary.json``, ``metrics.csv`` and the last checkpoint, each checked
so that a problem the user can fix is one :class:`ReportError` line."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scl_lightning._utils import is_int

__all__ = [
    "CheckpointInfo",
    "LayerStats",
    "Metrics",
    "ReportError",
    "Run",
    "find_checkpoint",
    "load_run",
    "read_checkpoint",
    "read_metrics",
    "read_summary",
]

SUMMARY = "summary.json"
METRICS = "metrics.csv"


def _weight_names() -> list[str]:
    """The names of masked parameters, ``weight`` first (``scl.register_maskable``)."""
    from scl_lightning.nn.maskable import maskable_types

    names = ["weight"]
    names += [t.weight for t in maskable_types() if t.weight not in names]
    return names


class ReportError(Exception):
    """A problem with the run directory that the user can fix; printed as one line."""


@dataclass(frozen=True)
class LayerStats:
    """One maskable layer's connectivity and FLOPs (one sample, fvcore's convention)."""

    name: str
    shape: tuple[int, ...]
    active: int
    total: int
    dense_flops: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.active / self.total if self.total else 0.0

    @property
    def effective_flops(self) -> float | None:
        """Dense FLOPs scaled by the active fraction, as :class:`~scl_lightning.nn.flops.FlopCounts`
        computes them (exact for unstructured masks on Linear and convolution layers)."""
        if self.dense_flops is None or not self.total:
            return None
        return self.dense_flops * self.active / self.total


@dataclass
class Metrics:
    """The rows of a Lightning ``metrics.csv``: blank cells are ``None``."""

    columns: list[str]
    rows: list[dict[str, float | None]]

    @property
    def x_key(self) -> str:
        return "step" if "step" in self.columns else "epoch"

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(x, y)`` of the rows where ``key`` has a value, sorted by x; when several rows share
        one x (a step-level and an epoch-level row logged at the same step), the last wins."""
        if key not in self.columns:
            return [], []
        points: dict[float, float] = {}
        for row in self.rows:
            x, y = row.get(self.x_key), row.get(key)
            if x is not None and y is not None:
                points[x] = y
        xs = sorted(points)
        return xs, [points[x] for x in xs]

    def epoch_ends(self) -> dict[int, float]:
        """``{epoch: last step logged in it}`` (empty when there is no step column)."""
        if "step" not in self.columns or "epoch" not in self.columns:
            return {}
        ends: dict[int, float] = {}
        for row in self.rows:
            epoch, step = row.get("epoch"), row.get("step")
            if epoch is not None and step is not None:
                ends[int(epoch)] = max(step, ends.get(int(epoch), step))
        return ends


@dataclass
class CheckpointInfo:
    """What the report uses from a checkpoint: masks, weight shapes and hyper-parameters."""

    path: Path
    epoch: int | None
    global_step: int | None
    masks: dict[str, LayerStats]
    hparams: dict[str, Any]


@dataclass
class Run:
    """A finished run, read from its directory."""

    directory: Path
    summary_path: Path
    summary: dict[str, Any]
    layers: list[LayerStats]
    metrics: Metrics
    checkpoint: CheckpointInfo | None
    notes: list[str] = field(default_factory=list)  # cross-check results and warnings

    @property
    def name(self) -> str:
        return f"{self.directory.parent.name}/{self.directory.name}"


def _is_number(value: Any) -> bool:
    """A JSON number: an int or a float, not a bool."""
    return is_int(value) or isinstance(value, float)


def _is_integer(value: Any) -> bool:
    """An int, or a float with an integral value (``5.0``); not NaN, an infinity or a bool."""
    return is_int(value) or (isinstance(value, float) and value.is_integer())


_FLOAT_KEYS = (
    "val_acc",
    "val_loss",
    "val_acc_top5",
    "test_acc",
    "test_loss",
    "test_acc_top5",
    "sparsity",
    "train_time_s",
)
_INT_KEYS = (
    "active_connections",
    "total_connections",
    "dense_flops",
    "effective_flops",
    "seed",
    "epochs",
    "global_step",
)


def read_summary(path: Path) -> dict[str, Any]:
    """``summary.json`` as a dict, its types checked.

    Raises:
        ReportError: if it cannot be read, is not JSON, or is not a run summary.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is corrupt (not valid JSON: {err})") from err
    bad = f"{path} is not a run summary written by scl's RunSummary"
    if not isinstance(data, dict):
        raise ReportError(f"{bad} (a JSON {type(data).__name__}, not an object)")
    for key in _FLOAT_KEYS:
        if data.get(key) is not None and not _is_number(data[key]):
            raise ReportError(f"{bad} ({key!r} is {data[key]!r}, not a number)")
    for key in _INT_KEYS:
        if data.get(key) is not None and not _is_integer(data[key]):
            raise ReportError(f"{bad} ({key!r} is {data[key]!r}, not an integer)")
    layers = data.get("layers", [])
    if not isinstance(layers, list):
        raise ReportError(f"{bad} ('layers' is not a list)")
    for i, layer in enumerate(layers):
        ok = (
            isinstance(layer, dict)
            and isinstance(layer.get("name"), str)
            and is_int(layer.get("active"))
            and is_int(layer.get("total"))
            and 0 <= layer["active"] <= layer["total"]
            and (layer.get("dense_flops") is None or is_int(layer["dense_flops"]))
            and isinstance(layer.get("shape", []), list)
            and all(is_int(s) for s in layer.get("shape", []))
        )
        if not ok:
            raise ReportError(f"{bad} (layer entry {i} is malformed: {layer!r:.120})")
    return data


def _summary_layers(summary: dict[str, Any]) -> list[LayerStats]:
    return [
        LayerStats(
            name=layer["name"],
            shape=tuple(layer.get("shape", [])),
            active=layer["active"],
            total=layer["total"],
            dense_flops=layer.get("dense_flops"),
        )
        for layer in summary.get("layers", [])
    ]


def read_metrics(path: Path) -> Metrics:
    """A Lightning ``metrics.csv``: one header row, numeric cells, blank where not logged.

    Raises:
        ReportError: if it cannot be read, is empty, has rows that do not match the header,
            cells that are not numbers, or neither a ``step`` nor an ``epoch`` column.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    if not lines or not any(lines[0]):
        raise ReportError(f"{path} is empty (no header row)")
    columns = [c.strip() for c in lines[0]]
    if "step" not in columns and "epoch" not in columns:
        raise ReportError(
            f"{path} is corrupt or not a Lightning CSVLogger file (no 'step' or 'epoch' column)"
        )
    rows: list[dict[str, float | None]] = []
    for lineno, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        if len(cells) != len(columns):
            raise ReportError(
                f"{path} is corrupt: line {lineno} has {len(cells)} cells, "
                f"the header {len(columns)}"
            )
        row: dict[str, float | None] = {}
        for column, cell in zip(columns, cells, strict=True):
            cell = cell.strip()
            try:
                row[column] = float(cell) if cell else None
            except ValueError:
                raise ReportError(
                    f"{path} is corrupt: line {lineno}, column {column!r}: {cell!r:.40} "
                    "is not a number"
                ) from None
        rows.append(row)
    return Metrics(columns=columns, rows=rows)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The run's last checkpoint: ``last*.ckpt`` if any, else the newest ``*.ckpt``, looked for
    in ``RUN_DIR/checkpoints/`` and ``RUN_DIR``."""
    found = [
        p
        for d in (run_dir / "checkpoints", run_dir)
        if d.is_dir()
        for p in d.glob("*.ckpt")
        if p.is_file()
    ]
    if not found:
        return None
    last = [p for p in found if p.name.startswith("last")]
    return max(last or found, key=lambda p: (p.stat().st_mtime, p.name))


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Masks, weight shapes and hyper-parameters of a Lightning checkpoint (``weights_only``).

    Raises:
        ReportError: if the file cannot be loaded or has no ``state_dict``.
    """
    import torch

    from scl_lightning.nn.ste import count_positive

    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # corrupt zip, pickle refused by weights_only, I/O error, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReportError(f"cannot load checkpoint {path}: {reason:.200}") from err
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ReportError(f"checkpoint {path} has no state_dict")
    masks: dict[str, LayerStats] = {}
    for key, mask in state.items():
        if not (isinstance(key, str) and key.endswith(".mask") and isinstance(mask, torch.Tensor)):
            continue
        name = key[: -len(".mask")]
        # in connections, as nn.stats counts: a mask of shape (out, 1, ...) (granularity
        # "channel") switches every connection of its unit, the weight's row
        # the masked parameter: `weight`, or another registered name (`in_proj_weight`)
        weight = next(
            (state[k] for k in (f"{name}.{w}" for w in _weight_names()) if k in state), None
        )
        shape = tuple(mask.shape)
        per = 1
        if isinstance(weight, torch.Tensor) and weight.shape != mask.shape and mask.numel():
            shape, per = tuple(weight.shape), weight.numel() // mask.numel()
        masks[name] = LayerStats(
            name=name,
            shape=shape,
            active=int(count_positive(mask)) * per,  # H(m) = 1[m > 0], as nn.stats counts
            total=mask.numel() * per,
        )
    hparams: dict[str, Any] = {}
    for key in ("datamodule_hyper_parameters", "hyper_parameters"):
        if isinstance(ckpt.get(key), dict):
            hparams.update(ckpt[key])

    def as_int(value: Any) -> int | None:
        return int(value) if _is_integer(value) else None

    return CheckpointInfo(
        path=path,
        epoch=as_int(ckpt.get("epoch")),
        global_step=as_int(ckpt.get("global_step")),
        masks=masks,
        hparams=hparams,
    )


def _cross_check(layers: list[LayerStats], ckpt: CheckpointInfo) -> list[str]:
    """Compare summary.json's per-layer active counts with the checkpoint's masks."""
    if not layers:
        return []
    if not ckpt.masks:
        if all(layer.active == layer.total for layer in layers):
            return ["The checkpoint has no masks (a dense model), as summary.json says."]
        return ["**Mismatch**: summary.json reports pruned layers but the checkpoint has no masks."]
    problems = []
    for layer in layers:
        mask = ckpt.masks.get(layer.name)
        if mask is None:
            if layer.active != layer.total:
                problems.append(f"`{layer.name}`: pruned in summary.json, no mask in checkpoint")
        elif (mask.active, mask.total) != (layer.active, layer.total):
            problems.append(
                f"`{layer.name}`: summary.json {layer.active:,}/{layer.total:,} active, "
                f"checkpoint masks {mask.active:,}/{mask.total:,}"
            )
    if problems:
        return [
            "**Mismatch** between summary.json and the checkpoint's masks (the checkpoint may be "
            "from another point of training): " + "; ".join(problems) + "."
        ]
    return [
        f"Checkpoint masks agree with summary.json: every layer's active connections recounted "
        f"from `H(m) = 1[m > 0]` ({len(layers)} layers)."
    ]


def _suggest_run_dirs(path: Path) -> str:
    found = [*path.glob(f"*/{SUMMARY}"), *path.glob(f"*/*/{SUMMARY}")]
    if not found:
        return ""
    newest = max(found, key=lambda p: p.stat().st_mtime).parent
    return f"; the newest run below it is {newest}"


def load_run(
    run_dir: str | os.PathLike[str], ckpt_path: str | os.PathLike[str] | None = None
) -> Run:
    """Read a finished run's summary, metrics and (last, or ``ckpt_path``) checkpoint.

    Raises:
        ReportError: if the directory is missing, is not a run directory, or its summary.json
            or metrics.csv cannot be read.
    """
    directory = Path(run_dir)
    if not directory.exists():
        raise ReportError(f"run directory {directory} does not exist")
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory (pass a run directory)")
    summary_path = directory / SUMMARY
    if not summary_path.is_file():
        raise ReportError(
            f"{directory} is not a finished run directory (no {SUMMARY}; it is written at the "
            f"end of `scl fit`){_suggest_run_dirs(directory)}"
        )
    summary = read_summary(summary_path)
    metrics_path = directory / METRICS
    if not metrics_path.is_file():
        raise ReportError(
            f"{directory} has no {METRICS}; scl report reads a CSVLogger's metrics (fit with a "
            "CSVLogger, e.g. --config configs/logger/csv.yaml)"
        )
    metrics = read_metrics(metrics_path)
    layers = _summary_layers(summary)
    notes: list[str] = []
    checkpoint = None
    path = Path(ckpt_path) if ckpt_path is not None else find_checkpoint(directory)
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ReportError(f"checkpoint {ckpt_path} does not exist")
    if path is None:
        notes.append("Warning: no checkpoint found in the run directory; masks not cross-checked.")
    else:
        try:
            checkpoint = read_checkpoint(path)
        except ReportError as err:
            if ckpt_path is not None:
                raise
            notes.append(f"Warning: {err}; masks not cross-checked.")
    if checkpoint is not None:
        if layers:
            notes += _cross_check(layers, checkpoint)
        elif checkpoint.masks:
            layers = list(checkpoint.masks.values())
            notes.append(
                "summary.json lists no layers: the per-layer figures are the checkpoint's masks."
            )
    return Run(
        directory=directory,
        summary_path=summary_path,
        summary=summary,
        layers=layers,
        metrics=metrics,
        checkpoint=checkpoint,
        notes=notes,
    )
