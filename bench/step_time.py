"""Train-step time and peak memory of SCL against dense training and Lightning's ModelPruning,
side by side in one run, with the cost of ``SparsityMonitor`` and of the drop-in callback.

For the digits MLP (``lenet_300_100``) and CIFAR ResNet-56, both at batch 128 on synthetic data of
CIFAR's shape (random 3x32x32 tensors, nothing downloaded; ``--mlp-shape 1 8 8`` gives the MLP its
digits shape), the median time of one training step through a real Lightning ``Trainer``, for
these variants of the same network:

- **dense**: ``SCLModule(..., sparsify=False)`` (SGD, momentum 0.9, constant learning rate);
- **SCL**: ``SCLModule`` with masked layers and the connection penalty, plus
  ``MaskGradientNormalization`` and ``SparsityMonitor`` at its default interval (the Trainer's
  ``log_every_n_steps``, 50);
- **SCL, no monitor**: the same without the Trainer's ``SparsityMonitor`` (since issue 11 the SCL
  engine that ``SCLModule`` brings then logs with its own monitor, at the same interval, with
  FLOPs, so this variant is no longer monitor-free: it measures SCL with the engine's defaults);
- **plain module, dense**: a plain LightningModule (the backbone, cross-entropy, the same SGD; no
  metrics, unlike ``SCLModule``), the baseline of the drop-in;
- **drop-in**: that plain module with the ``SparseConnectivityLearning`` callback (masks,
  penalty, normalization and its monitor);
- **pruning**: the dense module with Lightning's ``ModelPruning("l1_unstructured", amount=0.5)``.
  ``ModelPruning`` prunes at the end of a training epoch, so a small callback calls its own
  ``apply_pruning(0.5)`` in ``on_train_start``: every timed step then runs with the
  ``torch.nn.utils.prune`` parametrization active. Lightning's defaults are kept otherwise.

In the masked variants a random half of every mask is turned off before the first step
(``--mask-sparsity``, default 0.5): a run partway through mask learning. Fresh masks are all on,
and an element-wise kernel whose speed depends on the data (``torch.where`` on the CPU) looks
several times faster on them than it is in a real run.

A step is the time from one ``on_train_batch_start`` to the next (forward, backward, optimizer
step, every callback's batch hooks and Lightning's logging; batches are pre-built tensors, so
fetching one is free), with ``torch.cuda.synchronize`` on CUDA. Each run is a fresh ``Trainer.fit``
in a fresh subprocess: the first ``--warmup`` steps are discarded, the next ``--steps`` timed.
Each repetition runs every variant once, in an order rotated per repetition, so background load
hits all alike; the table shows the median step over all repetitions' timed steps and its ratio
to dense.

**Monitor cost.** In the SCL runs the ``SparsityMonitor`` hooks are timed on their own: the FLOPs
trace (once, on the first batch), the per-step cost of its hooks on steps that do not log, and
the cost of one log (``compute`` of every layer's sparsity and FLOPs, timed 20 times after the
fit, plus Lightning's logging of the values, measured in the hooks of logging steps when the run
has one). The overhead at the default interval is ``(per-step + per-log / interval) / step``.

Every run logs to a ``CSVLogger`` in a temporary directory (Lightning's default logging
interval, 50 steps), so logging costs what it costs in a real run.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during fit; on CPU the growth of the
subprocess's peak resident set size (``ru_maxrss``) from just before the module is built to the
end of fit, which is why each run has a process of its own. The median over repetitions.

    PYTHONPATH=src python bench/step_time.py [--models mlp resnet56] [--reps 3] [--threads 0]
        [--steps 60] [--resnet-steps 8] [--warmup 5] [--resnet-warmup 3] [--json out.json]
        [--mask-sparsity 0.5] [--precision 32-true] [--channels-last] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MODELS = {
    "mlp": ("lenet_300_100", (3, 32, 32)),
    "resnet56": ("resnet56", (3, 32, 32)),
}
VARIANTS = ("dense", "SCL", "SCL-nomon", "plain", "drop-in", "pruning")
LABELS = {"SCL-nomon": "SCL, no monitor", "plain": "plain module, dense"}
BATCH = 128


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_one(
    model: str,
    variant: str,
    steps: int,
    warmup: int,
    threads: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    """One fresh ``Trainer.fit`` of ``variant``: the timed step times (s), peak memory, and for
    SCL the monitor's timings."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, ModelPruning
    from lightning.pytorch.loggers import CSVLogger
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    try:
        import scl_lightning.nn.flops as flops_module
    except ImportError:  # a tree from before the layout of issue 11 (bench/_compare_trees.py)
        import scl_lightning.flops as flops_module  # type: ignore[no-redef]
    from scl_lightning import SCLModule, global_sparsity, masked_modules
    from scl_lightning.callbacks import (
        MaskGradientNormalization,
        SparseConnectivityLearning,
        SparsityMonitor,
    )
    from scl_lightning.models import create_model

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    name, shape = MODELS[model]
    if model == "mlp" and options.get("mlp_shape"):
        shape = tuple(options["mlp_shape"])
    total = warmup + steps + 1  # + 1: the last step's end is the next step's start
    g = torch.Generator().manual_seed(0)
    n_batches = 4  # cycled: fresh tensors every step would only add data-generation noise
    batches = [
        (torch.randn(BATCH, *shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
        for _ in range(n_batches)
    ]
    loader = DataLoader([batches[i % n_batches] for i in range(total)], batch_size=None)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            _sync()
            self.starts.append(time.perf_counter())

    class PruneBeforeTiming(Callback):
        """Applies ModelPruning's own pruning once, before the first step."""

        def __init__(self, pruning: ModelPruning) -> None:
            self.pruning = pruning
            self.pruned_fraction = 0.0

        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            self.pruning.apply_pruning(0.5)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            if batch_idx == 0:  # checked during training: on_train_end makes pruning permanent
                masks = [b for n, b in pl_module.named_buffers() if n.endswith("_mask")]
                zeros = sum(int((m == 0).sum()) for m in masks)
                self.pruned_fraction = zeros / max(sum(m.numel() for m in masks), 1)

    class SetMaskSparsity(Callback):
        """Turns a random ``fraction`` of every mask off before the first step: the state of a
        run partway through mask learning (fresh masks are all on, and element-wise kernels
        whose speed depends on the data would look faster than they are in a real run)."""

        def __init__(self, fraction: float) -> None:
            self.fraction = fraction
            self.sparsity = 0.0

        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for _, layer in masked_modules(pl_module):
                    off = torch.rand(layer.mask.shape, generator=gen) < self.fraction
                    layer.mask.copy_(torch.where(off, -1.0, 1.0))
            self.sparsity = global_sparsity(pl_module)

    class TimedMonitor(SparsityMonitor):
        """SparsityMonitor whose batch hooks are timed, and whose FLOPs traces are counted."""

        def __init__(self) -> None:
            super().__init__()
            self.trace_s = 0.0
            self.quiet_s: list[float] = []  # start + end hooks of a step that does not log
            self.logging_s: list[float] = []  # the same, on a step that logs
            self._start_s = 0.0
            self._logged = False

        def _log_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self._logged = True
            super()._log_step(*args, **kwargs)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            first = self.flop_counts is None
            _sync()
            t = time.perf_counter()
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            _sync()
            if first:
                self.trace_s = time.perf_counter() - t
            else:
                self._start_s = time.perf_counter() - t

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            self._logged = False
            _sync()
            t = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            _sync()
            spent = time.perf_counter() - t + self._start_s
            if trainer.global_step > warmup:
                (self.logging_s if self._logged else self.quiet_s).append(spent)

    traces = []
    original_count_flops = flops_module.count_flops

    def counting_count_flops(*args, **kwargs):  # type: ignore[no-untyped-def]
        traces.append(1)
        return original_count_flops(*args, **kwargs)

    flops_module.count_flops = counting_count_flops

    class PlainClassifier(pl.LightningModule):
        """Someone else's module: a backbone, cross-entropy and the SGD of SCLModule."""

        def __init__(self) -> None:
            super().__init__()
            self.model = create_model(name, num_classes=10, input_shape=shape)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.model(x)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    pl.seed_everything(0, verbose=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    module: pl.LightningModule
    if variant in ("plain", "drop-in"):
        module = PlainClassifier()
    else:
        sparse = variant in ("SCL", "SCL-nomon")
        module = SCLModule(
            name, num_classes=10, input_shape=shape, sparsify=sparse, constant_lr=True
        )
    if options.get("channels_last"):
        module = module.to(memory_format=torch.channels_last)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    monitor = None
    if variant == "SCL":
        monitor = TimedMonitor()
        callbacks += [MaskGradientNormalization(), monitor]
    elif variant == "SCL-nomon":
        callbacks += [MaskGradientNormalization()]
    elif variant == "drop-in":
        callbacks += [SparseConnectivityLearning(lam=2e-5, mask_lr=0.01)]
    elif variant == "pruning":
        pruning = ModelPruning("l1_unstructured", amount=0.5)
        pruner = PruneBeforeTiming(pruning)
        callbacks += [pruning, pruner]
    mask_setter = None
    if variant in ("SCL", "SCL-nomon", "drop-in") and options.get("mask_sparsity"):
        mask_setter = SetMaskSparsity(options["mask_sparsity"])
        callbacks.insert(0, mask_setter)  # on_train_start: after the drop-in has sparsified
    logdir = tempfile.TemporaryDirectory(prefix="scl-bench-")
    if options.get("compile"):
        # compiles the network the module runs (masked layers included); Lightning trains it
        module.model = torch.compile(module.model)  # type: ignore[assignment]
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=options.get("precision") or "32-true",
        max_steps=total,
        max_epochs=1,
        logger=CSVLogger(logdir.name, name="bench"),  # what a run logs to, written for real
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, train_dataloaders=loader)
    logdir.cleanup()
    if variant == "pruning" and not 0.45 < pruner.pruned_fraction < 0.55:
        raise RuntimeError(f"ModelPruning pruned {pruner.pruned_fraction:.3f}, expected 0.5")
    if mask_setter is not None and abs(mask_setter.sparsity - options["mask_sparsity"]) > 0.02:
        raise RuntimeError(
            f"mask sparsity {mask_setter.sparsity:.3f}, wanted {options['mask_sparsity']}"
        )
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = (rss_after - rss_before) / 1024
    starts = timer.starts
    step_times = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]
    result: dict[str, Any] = {"step_s": step_times, "peak_mib": peak_mib}
    if monitor is not None:
        compute_s = []
        for _ in range(20):
            _sync()
            t = time.perf_counter()
            monitor.compute(module)
            _sync()
            compute_s.append(time.perf_counter() - t)
        result["monitor"] = {
            "trace_s": monitor.trace_s,
            "traces": len(traces),
            "quiet_s": monitor.quiet_s,
            "logging_s": monitor.logging_s,
            "compute_s": compute_s,
            "interval": monitor._interval,
        }
    return result


TARGETS = {"mlp": 1.10, "resnet56": 1.05}  # SCL/dense step time
MEMORY_TARGET = 1.3
MONITOR_TARGET = 0.01


def _child(args: argparse.Namespace, model: str, variant: str) -> dict[str, Any]:
    steps, warmup = (
        (args.resnet_steps, args.resnet_warmup)
        if model == "resnet56"
        else (args.steps, args.warmup)
    )
    options = {
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "mlp_shape": args.mlp_shape,
        "mask_sparsity": args.mask_sparsity,
    }
    cmd = [
        sys.executable,
        __file__,
        "--_one",
        json.dumps([model, variant, steps, warmup, args.threads, options]),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{model}/{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def _report(args: argparse.Namespace, results: dict[str, Any]) -> tuple[list[str], dict]:
    memory = "peak CUDA MiB" if results["cuda"] else "peak RSS growth MiB"
    lines = [
        f"| model | variant | median ms/step | ratio to dense | target | {memory} | memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, Any] = {}
    monitor_lines = [
        "| model | FLOPs traces | trace ms (once) | hooks ms/step | one log ms | interval | "
        "overhead at the interval | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in args.models:
        runs = results["runs"][model]
        med = {v: _median_ms([s for r in runs[v] for s in r["step_s"]]) for v in VARIANTS}
        mem = {v: statistics.median(r["peak_mib"] for r in runs[v]) for v in VARIANTS}
        for variant in VARIANTS:
            ratio = med[variant] / med["dense"]
            mem_ratio = mem[variant] / mem["dense"] if mem["dense"] > 0 else float("nan")
            target = ""
            if variant == "SCL":
                ok = ratio <= TARGETS[model] and mem_ratio <= MEMORY_TARGET
                target = (
                    f"<= {TARGETS[model]:.2f}, mem <= {MEMORY_TARGET}: {'met' if ok else 'MISSED'}"
                )
            if variant == "drop-in":
                target = (
                    f"{med['drop-in'] / med['plain']:.3f} x plain; "
                    f"{med['drop-in'] / med['SCL']:.3f} x SCLModule"
                )
            lines.append(
                f"| {model} | {LABELS.get(variant, variant)} | {med[variant]:.1f} | {ratio:.3f} | "
                f"{target} | {mem[variant]:.1f} | {mem_ratio:.2f} |"
            )
            summary[f"{model}/{variant}"] = {
                "median_ms": med[variant],
                "ratio": ratio,
                "peak_mib": mem[variant],
                "memory_ratio": mem_ratio,
                "steps": sum(len(r["step_s"]) for r in runs[variant]),
            }
        mons = [r["monitor"] for r in runs["SCL"]]
        quiet = _median_ms([q for m in mons for q in m["quiet_s"]])
        logged = [x for m in mons for x in m["logging_s"]]
        compute = _median_ms([c for m in mons for c in m["compute_s"]])
        # a log: measured in the hooks when a logging step fell in a run, else compute() alone
        one_log = _median_ms(logged) if logged else compute
        interval = mons[0]["interval"]
        overhead = (quiet + one_log / interval) / med["SCL"]
        traces = max(m["traces"] for m in mons)
        trace_ms = statistics.median(m["trace_s"] for m in mons) * 1000
        monitor_lines.append(
            f"| {model} | {traces} | {trace_ms:.1f} | {quiet:.3f} | {one_log:.2f} | {interval} | "
            f"{overhead:.2%} | <= 1%: {'met' if overhead <= MONITOR_TARGET else 'MISSED'} |"
        )
        summary[f"{model}/monitor"] = {
            "traces": traces,
            "trace_ms": trace_ms,
            "hooks_ms_per_step": quiet,
            "one_log_ms": one_log,
            "compute_ms": compute,
            "interval": interval,
            "overhead": overhead,
        }
    return [*lines, "", "SparsityMonitor alone (in the SCL runs):", "", *monitor_lines], summary


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run, MLP")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps, MLP")
    parser.add_argument("--resnet-steps", type=int, default=8, help="timed steps, ResNet-56")
    parser.add_argument("--resnet-warmup", type=int, default=3, help="untimed steps, ResNet-56")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch default")
    parser.add_argument("--mlp-shape", type=int, nargs=3, default=None, help="e.g. 1 8 8")
    parser.add_argument(
        "--mask-sparsity",
        type=float,
        default=0.5,
        help="fraction of every mask turned off (at random) before timing; 0: fresh masks",
    )
    parser.add_argument("--precision", default=None, help="Trainer precision, e.g. bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0.0 <= args.mask_sparsity < 1.0:
        parser.error(f"--mask-sparsity must be in [0, 1), got {args.mask_sparsity}")
    if args._one is not None:
        model, variant, steps, warmup, threads, options = json.loads(args._one)
        print(json.dumps(run_one(model, variant, steps, warmup, threads, options)))
        return

    import lightning
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    threads = args.threads or torch.get_num_threads()
    extras = [
        f"precision {args.precision or '32-true'}",
        f"masks {args.mask_sparsity:.0%} off",
        *(["channels_last"] if args.channels_last else []),
        *(["torch.compile"] if args.compile else []),
    ]
    print(
        f"{device}; {platform.python_version()}, torch {torch.__version__}, "
        f"Lightning {lightning.__version__}; torch threads {threads}; batch {BATCH}; "
        + ", ".join(extras),
        flush=True,
    )
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {v: [] for v in VARIANTS} for m in args.models
    }
    t0 = time.perf_counter()
    for model in args.models:
        for rep in range(args.reps):
            k = rep % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                runs[model][variant].append(_child(args, model, variant))
            print(f"  {model}: repetition {rep + 1}/{args.reps} done", flush=True)
    lines, summary = _report(args, {"cuda": cuda, "runs": runs})
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device, "threads": threads, "options": extras, "results": summary},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
