"""Train-step time and peak memory: dense vs SCL vs Lightning's ModelPruning, side by side.

For the digits MLP (``lenet_300_100``, 1x8x8 inputs) and CIFAR ResNet-56 (3x32x32), both at batch
128 on synthetic data (random tensors, nothing downloaded), the median time of one training step
through a real Lightning ``Trainer``, for three variants of the same model:

- **dense**: ``SCLModule(..., sparsify=False)`` (SGD, momentum 0.9, constant learning rate);
- **SCL**: ``SCLModule`` with masked layers and the connection penalty, plus
  ``MaskGradientNormalization`` and ``SparsityMonitor`` at its default interval (the Trainer's
  ``log_every_n_steps``, 50);
- **pruning**: the dense module with Lightning's ``ModelPruning("l1_unstructured", amount=0.5)``.
  ``ModelPruning`` prunes at the end of a training epoch, so a small callback calls its own
  ``apply_pruning(0.5)`` in ``on_train_start``: every timed step then runs with the
  ``torch.nn.utils.prune`` parametrization active (``weight = weight_orig * weight_mask`` recomputed
  in a forward pre-hook). Lightning's defaults are kept otherwise: global unstructured L1 over
  every ``weight`` and ``bias`` of every layer (BatchNorm included).

A step is the time from one ``on_train_batch_start`` to the next (forward, backward, optimizer
step, every callback's batch hooks and Lightning's logging; batches are pre-built tensors, so
fetching one is free), with ``torch.cuda.synchronize`` on CUDA. Each run is a fresh ``Trainer.fit``
in a fresh subprocess: the first ``--warmup`` steps are discarded, the next ``--steps`` timed.
Each repetition runs every variant once, in an order rotated per repetition, so background load
hits all alike; the table shows the median step over all repetitions' timed steps, and its ratio
to dense. The median leaves out the rare logging steps of ``SparsityMonitor``; the mean is printed
too.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during fit; on CPU the growth of the
subprocess's peak resident set size (``ru_maxrss``) from just before the module is built to the
end of fit, which is why each run has a process of its own. The median over repetitions.

    PYTHONPATH=src python bench/step_time.py [--models mlp resnet56] [--reps 3] [--threads 0]
        [--steps 30] [--resnet-steps 8] [--warmup 5] [--resnet-warmup 3] [--json out.json]
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
import time
from typing import Any

MODELS = {
    "mlp": ("lenet_300_100", (1, 8, 8)),
    "resnet56": ("resnet56", (3, 32, 32)),
}
VARIANTS = ("dense", "SCL", "pruning")
BATCH = 128


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_one(model: str, variant: str, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """One fresh ``Trainer.fit`` of ``variant``; the timed step times (s) and peak memory."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, ModelPruning
    from torch.utils.data import DataLoader

    from scl_lightning import SCLModule
    from scl_lightning.callbacks import MaskGradientNormalization, SparsityMonitor

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    name, shape = MODELS[model]
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

    pl.seed_everything(0, verbose=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    module = SCLModule(
        name, num_classes=10, input_shape=shape, sparsify=variant == "SCL", constant_lr=True
    )
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if variant == "SCL":
        callbacks += [MaskGradientNormalization(), SparsityMonitor()]
    elif variant == "pruning":
        pruning = ModelPruning("l1_unstructured", amount=0.5)
        pruner = PruneBeforeTiming(pruning)
        callbacks += [pruning, pruner]
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_steps=total,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, train_dataloaders=loader)
    if variant == "pruning" and not 0.45 < pruner.pruned_fraction < 0.55:
        raise RuntimeError(f"ModelPruning pruned {pruner.pruned_fraction:.3f}, expected 0.5")
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = (rss_after - rss_before) / 1024
    starts = timer.starts
    step_times = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]
    return {"step_s": step_times, "peak_mib": peak_mib}


def _child(args: argparse.Namespace, model: str, variant: str) -> dict[str, Any]:
    steps, warmup = (
        (args.resnet_steps, args.resnet_warmup)
        if model == "resnet56"
        else (args.steps, args.warmup)
    )
    cmd = [
        sys.executable,
        __file__,
        "--_one",
        model,
        variant,
        str(steps),
        str(warmup),
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{model}/{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run, MLP")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps, MLP")
    parser.add_argument("--resnet-steps", type=int, default=8, help="timed steps, ResNet-56")
    parser.add_argument("--resnet-warmup", type=int, default=3, help="untimed steps, ResNet-56")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch default")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--_one", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one is not None:
        model, variant, steps, warmup, threads = args._one
        print(json.dumps(run_one(model, variant, int(steps), int(warmup), int(threads))))
        return

    import lightning
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    threads = args.threads or torch.get_num_threads()
    print(
        f"{device}; {platform.python_version()}, torch {torch.__version__}, "
        f"Lightning {lightning.__version__}; torch threads {threads}; batch {BATCH}"
    )
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {v: [] for v in VARIANTS} for m in args.models
    }
    t0 = time.perf_counter()
    for model in args.models:
        for rep in range(args.reps):
            order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
            for variant in order:
                results[model][variant].append(_child(args, model, variant))
            print(f"  {model}: repetition {rep + 1}/{args.reps} done", flush=True)
    memory = "peak CUDA MiB" if cuda else "peak RSS growth MiB"
    header = (
        f"| model | variant | median ms/step | mean ms/step | ratio to dense | "
        f"{memory} | memory ratio |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    summary: dict[str, Any] = {}
    for model in args.models:
        med = {}
        mem = {}
        for variant in VARIANTS:
            runs = results[model][variant]
            steps = [s for r in runs for s in r["step_s"]]
            med[variant] = statistics.median(steps) * 1000
            mem[variant] = statistics.median(r["peak_mib"] for r in runs)
            summary[f"{model}/{variant}"] = {
                "median_ms": med[variant],
                "mean_ms": statistics.fmean(steps) * 1000,
                "peak_mib": mem[variant],
                "steps": len(steps),
            }
        for variant in VARIANTS:
            s = summary[f"{model}/{variant}"]
            mem_ratio = mem[variant] / mem["dense"] if mem["dense"] > 0 else float("nan")
            lines.append(
                f"| {model} | {variant} | {s['median_ms']:.1f} | {s['mean_ms']:.1f} | "
                f"{med[variant] / med['dense']:.3f} | {s['peak_mib']:.1f} | {mem_ratio:.2f} |"
            )
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "threads": threads, "results": summary}, f, indent=2)


if __name__ == "__main__":
    main()
