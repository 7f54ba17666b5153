"""One training run ("arm") on Fashion-MNIST for the frontier and ablation benchmarks, measured
the same way for every method: test accuracy on the official 10,000 images, global sparsity over
the masked layers (``nn.stats.connectivity``), dense and effective FLOPs of one sample
(``nn.flops.flop_counts``), and the wall time of ``fit``.

Arms run in worker processes (``run_arms``), each with its own torch threads, and append one JSON
line per finished arm to a results file, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

NETS: dict[str, dict[str, Any]] = {
    # SGD as SCLModule's default (momentum 0.9, weight decay 5e-4, cosine to 0), batch 128.
    # LeNet-5 diverges at lr 0.05 even dense (measured while planning issue 12): lr 0.01.
    "lenet300": {"backbone": "lenet_300_100", "lr": 0.05},
    "lenet5": {"backbone": "lenet5", "lr": 0.01},
    # configs/digits_mlp.yaml's network and optimizer on the bundled digits (8x8, batch 64;
    # "test" accuracy is the held-out test split's; results recorded before issue 15 had none
    # and report the validation split's)
    "digits_mlp": {"backbone": "lenet_300_100", "lr": 0.05, "data": "digits"},
}
#: the Fashion-MNIST networks (the frontier, ablation, variant and diagnosis studies)
FMNIST_NETS = [name for name, net in NETS.items() if net.get("data") != "digits"]
BATCH_SIZE = 128


def prepare(args: Any, quick: dict[str, Any]) -> bool:
    """Shared start of the result benchmarks: in ``--quick`` mode, 2 epochs with the ``quick``
    arm settings and ``*_quick`` result and output folders; then check that Fashion-MNIST is
    installed (an error line and False when it is not) and create the output folder."""
    args._quick = {}
    if args.quick:
        args.epochs = args.epochs or 2
        args._quick = quick
        args.results = args.results.with_name(args.results.name + "_quick")
        args.out = args.out.with_name(args.out.name + "_quick")
    from scl_lightning.data import FashionMNISTDataModule

    if not args.report_only and FashionMNISTDataModule(download=False).folder is None:
        print("error: Fashion-MNIST is not installed: run `make data`", file=sys.stderr)
        return False
    args.out.mkdir(parents=True, exist_ok=True)
    return True


def arm_key(arm: dict[str, Any]) -> str:
    """A stable identity of an arm (its settings, not its results)."""
    return json.dumps({k: arm[k] for k in sorted(arm) if not k.startswith("_")}, sort_keys=True)


def gmp_at(run: dict[str, Any], **labels: Any) -> dict[str, Any]:
    """The gradual magnitude pruning arm at exactly the sparsity ``run`` reached, with its net,
    epochs and seed, and ``labels`` that say what it is matched to."""
    a = run["arm"]
    return {
        "net": a["net"],
        "epochs": a["epochs"],
        "method": "gmp",
        "seed": a["seed"],
        "sparsity": round(run["sparsity"], 4),
        **labels,
    }


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {arm_key(json.loads(line)["arm"]) for line in path.read_text().splitlines() if line}


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class _MaskHistory:
    """Per mask entry: did it ever go off (cross zero), did it ever move from its start value."""

    def __init__(self) -> None:
        self.start: dict[str, Any] = {}
        self.crossed: dict[str, Any] = {}
        self.moved: dict[str, Any] = {}

    def update(self, layers: Iterable[tuple[str, Any]]) -> None:
        import torch

        for name, layer in layers:
            m = layer.mask.detach()
            if name not in self.start:
                self.start[name] = m.clone()
                self.crossed[name] = m <= 0
                self.moved[name] = torch.zeros_like(m, dtype=torch.bool)
            self.crossed[name] |= m <= 0
            self.moved[name] |= m != self.start[name]

    def beyond_one(self, layers: Iterable[tuple[str, Any]]) -> float:
        """Fraction of masks at ``|m| > 1`` now (hardtanh's proxy gradient is zero there)."""
        masks = [layer.mask.detach() for _, layer in layers]
        return sum(int((m.abs() > 1).sum()) for m in masks) / sum(m.numel() for m in masks)

    def fractions(self) -> tuple[float, float]:
        total = sum(int(t.numel()) for t in self.start.values())
        crossed = sum(int(t.sum()) for t in self.crossed.values())
        moved = sum(int(t.sum()) for t in self.moved.values())
        return 1.0 - crossed / total, 1.0 - moved / total


def _callbacks(
    arm: dict[str, Any], epochs: int, history: _MaskHistory | None, churn: _Churn | None = None
) -> list[Any]:
    from lightning.pytorch.callbacks import Callback, ModelPruning

    from scl_lightning.baselines import (
        GradualMagnitudePruning,
        OneShotMagnitudePruning,
        cubic_sparsity,
    )
    from scl_lightning.nn.sparsify import masked_modules

    method = arm["method"]
    out: list[Any] = []
    if method == "gmp":
        out.append(
            GradualMagnitudePruning(
                final_sparsity=arm["sparsity"], end_fraction=0.6, frequency=arm["_frequency"]
            )
        )
    elif method == "oneshot":
        out.append(OneShotMagnitudePruning(arm["sparsity"], epoch=epochs // 2))
    elif method == "modelpruning":
        # Lightning's ModelPruning as it is: global L1 on every Linear/Conv weight, pruned at
        # each epoch's end. torch's pruning takes each amount from the weights still on, so the
        # cumulative cubic schedule over the first 60% of epochs becomes per-epoch increments.
        prune_epochs = max(1, round(0.6 * epochs))
        target = arm["sparsity"]

        def amount(epoch: int) -> float:
            if epoch >= prune_epochs:
                return 0.0
            before = cubic_sparsity(epoch, 0.0, target, 0, prune_epochs)
            after = cubic_sparsity(epoch + 1, 0.0, target, 0, prune_epochs)
            return (after - before) / (1.0 - before)

        out.append(
            ModelPruning("l1_unstructured", amount=amount, use_global_unstructured=True, verbose=0)
        )
    elif method == "fixed":
        # the topology of another run (a file of {layer: bool tensor}), never changed, trained
        # from this run's initialization
        import torch

        from scl_lightning.callbacks.mask_group import drop_mask_grads, mask_parameters

        on = load_on_sets(Path(arm["_mask_file"]))

        class FixedMasks(Callback):
            def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
                with torch.no_grad():
                    for name, layer in masked_modules(pl_module):
                        layer.mask.copy_(torch.where(on[name], 1.0, -1.0))

            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, opt: Any) -> None:
                drop_mask_grads(mask_parameters(pl_module))

        out.append(FixedMasks())
    if churn is not None:

        class EpochEnds(Callback):
            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                churn.epochs.append(_on_sets(pl_module))

        out.append(EpochEnds())
    if history is not None:

        class Track(Callback):
            def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
                history.update(masked_modules(pl_module))

        out.append(Track())
    return out


def _on_sets(module: Any) -> dict[str, Any]:
    """Each masked layer's connections that are on (``H(m) = 1``), as boolean tensors."""
    from scl_lightning.nn.sparsify import masked_modules

    return {name: (layer.mask.detach() > 0).clone() for name, layer in masked_modules(module)}


def save_on_sets(on: dict[str, Any], path: Path) -> None:
    """Write on-sets as packed bits (``.npz``): 1 bit per connection."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, t in on.items():
        arrays[f"{name}|bits"] = np.packbits(t.numpy().reshape(-1))
        arrays[f"{name}|shape"] = np.asarray(t.shape, dtype=np.int64)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_on_sets(path: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    with np.load(path) as data:
        names = sorted({k.split("|")[0] for k in data.files})
        out = {}
        for name in names:
            shape = tuple(int(x) for x in data[f"{name}|shape"])
            n = int(np.prod(shape))
            bits = np.unpackbits(data[f"{name}|bits"])[:n].astype(bool)
            out[name] = torch.from_numpy(bits.reshape(shape))
    return out


def _magnitude_agreement(module: Any, on: dict[str, Any]) -> float:
    """Fraction of the on-set that global magnitude pruning of the final weights would also
    keep (the ``active`` largest ``|w|`` over every masked layer): 1.0 for a pure magnitude
    choice, the active fraction itself for a choice unrelated to magnitude."""
    import torch

    from scl_lightning.nn.sparsify import masked_modules

    layers = dict(masked_modules(module))
    scores = torch.cat([layers[k].raw_weight.detach().abs().reshape(-1) for k in on])
    kept = torch.cat([on[k].reshape(-1) for k in on])
    k = int(kept.sum())
    if k == 0:
        return float("nan")
    top = torch.zeros_like(kept)
    top[torch.topk(scores, k).indices] = True
    return round(int((top & kept).sum()) / k, 5)


class _Churn:
    """The on-sets at each epoch's end, to measure how much the masks still change late."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def report(self) -> dict[str, list[float]]:
        """Per epoch: the fraction of connections that switched since the previous epoch's end,
        and the Jaccard overlap of that epoch's on-set with the final one."""
        final = self.epochs[-1]
        total = sum(t.numel() for t in final.values())
        flips, jaccard = [], []
        for i, sets in enumerate(self.epochs):
            if i:
                prev = self.epochs[i - 1]
                flips.append(sum(int((sets[k] ^ prev[k]).sum()) for k in sets) / total)
            inter = sum(int((sets[k] & final[k]).sum()) for k in sets)
            union = sum(int((sets[k] | final[k]).sum()) for k in sets)
            jaccard.append(round(inter / max(union, 1), 5))
        return {"flips": [round(f, 6) for f in flips], "jaccard_with_final": jaccard}


def _measured_network(module: Any, method: str) -> Any:
    """The trained network with masks: ModelPruning's dense network gets masks from its zeros, so
    its sparsity and FLOPs are counted by the same code as every other arm's."""
    import torch

    from scl_lightning import sparsify
    from scl_lightning.nn.sparsify import masked_modules

    net = module.model
    if method not in ("modelpruning", "dense"):
        return net
    net = sparsify(copy.deepcopy(net))
    with torch.no_grad():
        for _, layer in masked_modules(net):
            layer.mask.copy_(torch.where(layer.raw_weight != 0, 1.0, -1.0))
    return net


def run_arm(arm: dict[str, Any]) -> dict[str, Any]:
    """Train and measure one arm (called in a worker process)."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from scl_lightning import SCLModule
    from scl_lightning.data import DigitsDataModule, FashionMNISTDataModule
    from scl_lightning.nn.flops import flop_counts
    from scl_lightning.nn.stats import connectivity

    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(arm["_threads"])
    net = NETS[arm["net"]]
    seed_everything(arm["seed"], workers=True, verbose=False)
    digits = net.get("data") == "digits"
    dm = (
        DigitsDataModule(batch_size=64)
        if digits
        else FashionMNISTDataModule(batch_size=BATCH_SIZE, download=False)
    )
    shape = (1, 8, 8) if digits else (1, 28, 28)
    method = arm["method"]
    lr = arm.get("lr", net["lr"])

    def optimizer(params: Any) -> torch.optim.Optimizer:
        decay = arm.get("weight_decay", 5e-4)
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)

    kwargs: dict[str, Any] = {
        "backbone": net["backbone"],
        "input_shape": shape,
        "optimizer": optimizer,
        "sparsify": method not in ("dense", "modelpruning"),  # "fixed": lam 0
    }
    targets = ("target_sparsity", "target_flops", "target_epoch", "target_step", "freeze_at_target")
    if not any(key in arm for key in targets):  # with a target the controller sets lambda
        kwargs["lam"] = arm.get("lam", 0.0)
    scl_keys = ("ste", "mask_grad_norm", "mask_lr", "mask_init", "freeze_masks_epoch", *targets)
    for key in (*scl_keys, "warmup_epochs", "penalty"):
        if key in arm:
            kwargs[key] = arm[key]
    module = SCLModule(**kwargs)
    epochs = arm["epochs"]
    history = _MaskHistory() if arm.get("_track_masks") else None
    churn = _Churn() if arm.get("_track_churn") else None
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=arm.get("_limit_batches", 1.0),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=_callbacks(arm, epochs, history, churn),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    [test] = trainer.test(module, datamodule=dm, verbose=False)
    measured = _measured_network(module, method)
    conn = connectivity(measured)
    counts = flop_counts(measured, torch.zeros(1, *shape))
    effective, _ = counts.effective(conn.densities())
    result = {
        "arm": {k: v for k, v in arm.items() if not k.startswith("_")},
        "test_acc": float(test["test/acc"]),
        "sparsity": float(conn.sparsity),
        "active": int(conn.active),
        "total": int(conn.total),
        "layer_sparsity": {c.name: round(1 - c.active / c.total, 5) for c in conn.layers},
        "dense_flops": int(counts.total),
        "effective_flops": int(effective),
        "fit_s": round(fit_s, 1),
    }
    if module.engine.controller is not None:
        result["final_lam"] = module.engine.lam
    if churn is not None:
        result["churn"] = churn.report()
    if arm.get("_save_masks"):
        on = _on_sets(module)
        save_on_sets(on, Path(arm["_save_masks"]))
        result["magnitude_agreement"] = _magnitude_agreement(module, on)
    if history is not None:
        never_crossed, never_moved = history.fractions()
        result["never_crossed_zero"] = never_crossed
        result["never_moved"] = never_moved
        from scl_lightning.nn.sparsify import masked_modules

        result["beyond_one"] = history.beyond_one(masked_modules(module))
    return result


def _worker(arm: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_arm(arm)
    except Exception as err:  # reported, the other arms go on
        return {"arm": arm, "error": f"{type(err).__name__}: {err}"}


def run_arms(arms: list[dict[str, Any]], results: Path, jobs: int) -> list[dict[str, Any]]:
    """Run the arms not yet in ``results`` with ``jobs`` worker processes (1 torch thread each
    when ``jobs > 1``); append each result as it finishes and print a progress line."""
    done = done_keys(results)
    todo = [a for a in arms if arm_key(a) not in done]
    # one thread per job: OpenMP barriers stall badly on cores shared with other work;
    # SCL_BENCH_THREADS overrides (e.g. 1 for a single job beside another benchmark)
    threads = int(os.environ.get("SCL_BENCH_THREADS", 0)) or (
        1 if jobs > 1 else max(1, os.cpu_count() or 1)
    )
    for arm in todo:
        arm["_threads"] = threads
    results.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"{len(arms) - len(todo)} of {len(arms)} arms already in {results}; running {len(todo)}"
        f" with {jobs} job(s)",
        flush=True,
    )
    out: list[dict[str, Any]] = []
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs, maxtasksperchild=1) as pool:
        for i, result in enumerate(pool.imap_unordered(_worker, todo), 1):
            if "error" in result:
                print(f"  FAILED {result['arm']}: {result['error']}", file=sys.stderr, flush=True)
                continue
            with results.open("a") as f:
                f.write(json.dumps(result) + "\n")
            out.append(result)
            arm = result["arm"]
            what = ", ".join(
                f"{k}={arm[k]}"
                for k in (
                    "net",
                    "method",
                    "variant",
                    "mask_source",
                    "ste",
                    "mask_grad_norm",
                    "mask_lr",
                    "lam",
                    "sparsity",
                    "seed",
                )
                if k in arm
            )
            elapsed = time.perf_counter() - start
            print(
                f"  [{i}/{len(todo)}, {elapsed / 60:.1f} min] {what}: acc {result['test_acc']:.4f}"
                f", sparsity {result['sparsity']:.4f}, fit {result['fit_s']:.0f} s",
                flush=True,
            )
    return out
