"""Inference speed of a pruned network in every form it can take, side by side in one run.

For each network: latency at batch 1 and throughput at batch 256 on this CPU for

* ``dense``: the plain architecture (what you would run without pruning);
* ``masked``: the training-time masked layers (``w * H(m)`` at every call);
* ``dense export``: ``scl export --format dense`` loaded into the plain architecture;
* ``compact module``: :func:`~scl_lightning.deploy.compact`'s ``nn.Module``, in memory;
* ``compact``: ``--format compact`` (the ``.pt2`` loaded with ``torch.export.load``);
* ``sparse``: ``--format sparse`` (compact, Linear layers in CSR where measured faster,
  ``.pt2``);
* ``onnxruntime``: ``--format onnx`` run by an onnxruntime session;

with the FLOPs ratio of each export beside its speed-up. Networks: Fashion-MNIST LeNet-300-100
and LeNet-5 trained by their recipes (``RECIPES``: ``configs/fmnist_lenet300_target.yaml``,
96.7% sparsity; ``configs/fmnist_lenet5.yaml`` at 98.3% and at 94.3%; and
``configs/fmnist_lenet5_channel.yaml``, channel granularity at 94.3%; trained here once,
checkpoints kept under ``--runs``), and ResNet-56 with a synthetic pattern: every masked layer
keeps a random 10% of its connections (unstructured, no whole channel removed), BatchNorm at its
initial statistics.
On Fashion-MNIST every form's predictions on the 10,000 test images are compared with the
masked model's.

Timing: every form is timed in the same rounds, interleaved (round r times all forms before
round r+1), and the median over rounds is reported, so drift on a shared machine hits all forms
alike. ResNet-56 gets a tenth of the batch-1 calls and, at batch 256, 3 rounds of 1 call.
torch and onnxruntime get the same number of threads (``--threads``, default 1).

    python bench/inference.py               # about 10 min (and 10 more to train, the first time)
    python bench/inference.py --quick       # a smoke run: short training, few timings
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
#: the trained networks: a recipe and its overrides
RECIPES: dict[str, tuple[str, list[str]]] = {
    "lenet300": ("configs/fmnist_lenet300_target.yaml", []),  # 96.7% sparsity
    "lenet5": ("configs/fmnist_lenet5.yaml", []),  # lam 1.5e-5: 98.3%
    "lenet5_94": ("configs/fmnist_lenet5.yaml", ["--model.lam", "4e-6"]),  # 94.3%
    "lenet5_channel": ("configs/fmnist_lenet5_channel.yaml", []),  # channels, 94.3%
}
FORMS = ["dense", "masked", "dense export", "compact module", "compact", "sparse", "onnxruntime"]
EXPORTS = {"dense export": "dense", "compact": "compact", "sparse": "sparse", "onnxruntime": "onnx"}


def train(net: str, runs: Path, quick: bool) -> Path:
    """The recipe's checkpoint, trained here the first time (``scl fit``, no loggers)."""
    root = runs / net
    ckpt = root / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    cmd = [
        sys.executable,
        "-m",
        "scl_lightning.experiment.cli",
        "fit",
        "--config",
        str(ROOT / RECIPES[net][0]),
        *RECIPES[net][1],
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]
    if quick:
        cmd += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "40"]
    print(f"  training {net}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return ckpt


def synthetic_resnet56() -> tuple[torch.nn.Module, tuple[int, ...]]:
    from scl_lightning import sparsify
    from scl_lightning.models import create_model

    torch.manual_seed(0)
    model = sparsify(create_model("resnet56", input_shape=(3, 32, 32)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "mask"):
                keep = torch.rand(module.mask.shape, generator=g) < 0.1
                module.mask.copy_(torch.where(keep, 1.0, -1.0))
    return model.eval(), (3, 32, 32)


def _timed(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(
    calls: dict[str, Callable[[Any], Any]],
    inputs: dict[str, Any],
    rounds: int,
    per_round: int,
) -> dict[str, float]:
    """Seconds per call of each form, median over interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for name, fn in calls.items():  # warm-up
            fn(inputs[name])
        for _ in range(rounds):
            for name, fn in calls.items():
                x = inputs[name]
                times[name].append(_timed(lambda fn=fn, x=x: fn(x), per_round))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_net(
    name: str, model: torch.nn.Module, shape: tuple[int, ...], args: argparse.Namespace
) -> dict[str, Any]:
    import onnxruntime as ort

    from scl_lightning.deploy import compact
    from scl_lightning.deploy.formats import DEFAULT_NAMES, export_model, load_export
    from scl_lightning.nn.sparsify import export_pruned
    from scl_lightning.nn.stats import connectivity

    out_dir = args.runs / name / "export"
    example = torch.zeros(2, *shape)
    forms: dict[str, torch.nn.Module] = {}
    plain = export_pruned(model).eval()
    forms["dense"] = plain
    forms["masked"] = model
    forms["compact module"] = compact(model, example)[0]
    reports = {}
    for form, fmt in EXPORTS.items():
        path = out_dir / DEFAULT_NAMES[fmt]
        report = export_model(model, path, fmt, example, overwrite=True, batch_size=256)
        reports[form] = report
        if fmt == "dense":
            forms[form] = load_export(path, model=copy.deepcopy(plain))
        elif fmt != "onnx":
            forms[form] = load_export(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(reports["onnxruntime"].path), options, providers=["CPUExecutionProvider"]
    )

    def onnx_call(x: Any) -> Any:
        return session.run(None, {"input": x})[0]

    calls: dict[str, Callable[[Any], Any]] = {f: forms[f] for f in FORMS if f in forms}
    calls["onnxruntime"] = onnx_call
    result: dict[str, Any] = {
        "net": name,
        "sparsity": connectivity(model).sparsity,
        "flops": {"compact module": reports["compact"].flops_after}
        | {f: r.flops_after for f, r in reports.items()},
        "flops_dense": reports["compact"].flops_before,
        "params": {
            "dense": reports["compact"].params_before,
            "masked": sum(p.numel() for p in model.parameters()),  # weights and masks
            "compact module": reports["compact"].params_after,
        }
        | {f: r.params_after for f, r in reports.items()},
        "bytes": {"dense": reports["compact"].bytes_before}
        | {f: r.bytes_after for f, r in reports.items()},
        "notes": {f: r.notes for f, r in reports.items() if r.notes},
    }
    heavy = name not in RECIPES  # ResNet-56: about 2.5 s per batch of 256 on one core
    for batch, key, rounds, per_round in (
        (1, "latency_s", args.rounds, args.calls_b1 // 10 if heavy else args.calls_b1),
        (
            256,
            "throughput_s",
            min(args.rounds, 3) if heavy else args.rounds,
            1 if heavy else args.calls_b256,
        ),
    ):
        x = torch.randn(batch, *shape)
        inputs = {f: (x.numpy() if f == "onnxruntime" else x) for f in calls}
        result[key] = measure(calls, inputs, rounds, per_round)
        print(
            f"  {name} batch {batch}: "
            + ", ".join(f"{f} {t * 1e6:.0f} us" for f, t in result[key].items()),
            flush=True,
        )
    if name in RECIPES:
        result["predictions"] = check_predictions(calls, model, args)
    return result


def check_predictions(
    calls: dict[str, Callable[[Any], Any]], model: torch.nn.Module, args: argparse.Namespace
) -> dict[str, Any]:
    """Test accuracy of every form on Fashion-MNIST and how many predictions differ from the
    masked model's."""
    from scl_lightning.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(batch_size=1000, download=False)
    dm.prepare_data()
    dm.setup("test")
    preds: dict[str, list[torch.Tensor]] = {f: [] for f in calls}
    labels = []
    with torch.inference_mode():
        for batch in dm.test_dataloader():
            x, y = dm.on_after_batch_transfer(batch, 0)  # uint8 -> normalized float32
            labels.append(y)
            for form, fn in calls.items():
                out = fn(x.numpy() if form == "onnxruntime" else x)
                preds[form].append(torch.as_tensor(out).argmax(1))
    y = torch.cat(labels)
    masked = torch.cat(preds["masked"])
    return {
        form: {
            "test_acc": float((torch.cat(p) == y).float().mean()),
            "differ_from_masked": int((torch.cat(p) != masked).sum()),
        }
        for form, p in preds.items()
    } | {"images": int(y.numel())}


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def table(r: dict[str, Any]) -> str:
    lat, thr = r["latency_s"], r["throughput_s"]
    lines = [
        f"Inference, {r['net']} (sparsity {r['sparsity']:.4f}), CPU, {r['threads']} thread(s)",
        "",
        "| form | FLOPs / sample | FLOPs ratio | latency, batch 1 | speed-up | "
        "throughput, batch 256 | speed-up | parameters | file bytes | test acc | "
        "predictions differing from masked |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_flops = r["flops_dense"]
    for form in FORMS:
        flops = r["flops"].get(form, dense_flops)
        acc = r.get("predictions", {}).get(form)
        lines.append(
            f"| {form} | {flops:,} | {dense_flops / flops:.1f}x | {lat[form] * 1e6:.0f} us | "
            f"{lat['dense'] / lat[form]:.2f}x | {256 / thr[form]:,.0f} /s | "
            f"{thr['dense'] / thr[form]:.2f}x | {_count(r['params'].get(form))} | "
            f"{_count(r['bytes'].get(form))} | "
            + (f"{acc['test_acc']:.4f} | {acc['differ_from_masked']} |" if acc else "- | - |")
        )
    for form, notes in r["notes"].items():
        lines += ["", f"{form}:", *(f"* {n}" for n in notes)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=[*RECIPES, "resnet56"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls-b1", type=int, default=200)
    parser.add_argument("--calls-b256", type=int, default=10)
    parser.add_argument("--runs", type=Path, default=ROOT / "bench" / "results" / "inference")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "inference")
    parser.add_argument("--quick", action="store_true", help="short training, few timings")
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("error: onnxruntime is not installed: pip install -e '.[deploy]'", file=sys.stderr)
        return 2
    if args.quick:
        args.rounds, args.calls_b1, args.calls_b256 = 2, 5, 1
        args.runs = args.runs.with_name(args.runs.name + "_quick")
        args.out = args.out.with_name(args.out.name + "_quick")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    from scl_lightning.experiment.export_cli import load_trained

    machine = (
        f"{platform.processor() or platform.machine()}, {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    from scl_lightning.data import FashionMNISTDataModule

    if FashionMNISTDataModule(download=False).folder is None:
        skipped = [n for n in args.nets if n in RECIPES]
        if skipped:
            print(f"Fashion-MNIST is not installed (`make data`): skipping {', '.join(skipped)}")
        args.nets = [n for n in args.nets if n not in RECIPES]
    for net in args.nets:
        print(f"== {net}", flush=True)
        if net in RECIPES:
            model, shape = load_trained(train(net, args.runs, args.quick))
        elif net == "resnet56":
            model, shape = synthetic_resnet56()
        else:
            parser.error(f"unknown net {net!r}: choose from lenet300, lenet5, resnet56")
        result = bench_net(net, model, shape, args) | {"threads": args.threads, "machine": machine}
        (args.runs / f"{net}.json").write_text(json.dumps(result, indent=1) + "\n")
        text = table(result)
        (args.out / f"inference_{net}.md").write_text(text + "\n")
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
