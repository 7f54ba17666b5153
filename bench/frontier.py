"""The sparsity-accuracy frontier on Fashion-MNIST: SCL against gradual magnitude pruning (Zhu &
Gupta), one-shot magnitude pruning with fine-tuning, and Lightning's own ``ModelPruning``, with a
dense reference; LeNet-300-100 and LeNet-5.

Phase 1 trains the dense networks and SCL at each lambda; phase 2 trains every baseline at the
median sparsity SCL reached at each lambda. Every arm has the same epochs, optimizer (SGD,
momentum 0.9, weight decay 5e-4, cosine learning rate), batch size (128) and seeds, and is
measured the same way (``bench/_fmnist.py``): test accuracy on the official 10,000 test images,
sparsity over the masked layers, effective FLOPs of one sample, wall time.

Results are appended to ``bench/results/frontier/<net>.jsonl`` as each arm finishes (a rerun
skips the arms already there); then the table is printed and written, with the plots (accuracy
against sparsity and against effective FLOPs), to ``--out`` (default ``docs/frontier``).

    python bench/frontier.py --quick            # a few minutes: 1 seed, 2 lambdas, few batches
    python bench/frontier.py                    # the full run (3 seeds), see docs/RESULTS.md
    python bench/frontier.py --report-only      # table and plots from the results so far

Needs Fashion-MNIST (``make data``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist import FMNIST_NETS, prepare, read_results, run_arms

ROOT = Path(__file__).resolve().parents[1]
# lambdas meant to span ~80-99.5% sparsity at the default epochs (from the planning runs:
# LeNet-300-100, 10 epochs: 2e-6 -> 94.3%, 2e-5 -> 99.2%)
LAMBDAS = {
    "lenet300": [3e-7, 1e-6, 4e-6, 3e-5],
    "lenet5": [1e-6, 4e-6, 1.5e-5, 6e-5],
}
EPOCHS = {"lenet300": 10, "lenet5": 5}
BASELINES = ("gmp", "oneshot", "modelpruning")
LABELS = {
    "dense": "dense",
    "scl": "SCL",
    "gmp": "gradual magnitude",
    "oneshot": "one-shot magnitude",
    "modelpruning": "Lightning ModelPruning",
}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def scl_arms(net: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {"net": net, "epochs": args.epochs or EPOCHS[net], **args._quick}
    arms = [{**common, "method": "dense", "seed": s} for s in args.seeds]
    arms += [
        {**common, "method": "scl", "lam": lam, "seed": s}
        for lam in (args.lambdas or LAMBDAS[net])
        for s in args.seeds
    ]
    return arms


def baseline_arms(net: str, args: argparse.Namespace, results: list[dict]) -> list[dict]:
    epochs = args.epochs or EPOCHS[net]
    by_lam: dict[float, list[float]] = defaultdict(list)
    for r in results:
        a = r["arm"]
        if (
            a["method"] == "scl"
            and a["epochs"] == epochs
            and a["lam"] in (args.baseline_lambdas or args.lambdas or LAMBDAS[net])
        ):
            by_lam[a["lam"]].append(r["sparsity"])
    arms = []
    for lam in sorted(by_lam, reverse=True):  # the sparsest first
        target = round(_median(by_lam[lam]), 4)
        for method in BASELINES:
            for s in args.seeds:
                arms.append(
                    {
                        "net": net,
                        "epochs": epochs,
                        "method": method,
                        "sparsity": target,
                        "matched_lam": lam,
                        "seed": s,
                        **args._quick,
                    }
                )
    return arms


def table(net: str, results: list[dict]) -> tuple[str, list[dict]]:
    """Markdown table: one row per (method, lambda or sparsity), medians over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        a = r["arm"]
        key = (a["method"], a.get("lam", a.get("matched_lam")), a["epochs"])
        groups[key].append(r)
    rows = []
    for (method, lam, epochs), rs in groups.items():
        rows.append(
            {
                "method": method,
                "lam": lam,
                "epochs": epochs,
                "seeds": len(rs),
                "acc": _median([r["test_acc"] for r in rs]),
                "acc_min": min(r["test_acc"] for r in rs),
                "acc_max": max(r["test_acc"] for r in rs),
                "sparsity": _median([r["sparsity"] for r in rs]),
                "flops": _median([r["effective_flops"] / r["dense_flops"] for r in rs]),
                "fit_s": _median([r["fit_s"] for r in rs]),
            }
        )
    order = {m: i for i, m in enumerate(LABELS)}
    rows.sort(key=lambda r: (r["lam"] or 0, order[r["method"]]))
    lines = [
        f"| {net} method | matched to lambda | seeds | test acc (median) | min-max | sparsity | "
        f"eff. FLOPs / dense | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lam = "-" if r["lam"] is None else f"{r['lam']:g}"
        lines.append(
            f"| {LABELS[r['method']]} | {lam} | {r['seeds']} | {r['acc']:.4f} | "
            f"{r['acc_min']:.4f}-{r['acc_max']:.4f} | {r['sparsity']:.4f} | {r['flops']:.4f} | "
            f"{r['fit_s']:.0f} |"
        )
    return "\n".join(lines), rows


def plot(net: str, rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    dense = [r for r in rows if r["method"] == "dense"]
    for xkey, xlabel, name in (
        ("sparsity", "global sparsity (masked layers)", "sparsity"),
        ("flops", "effective FLOPs / dense FLOPs (log)", "flops"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for method in ("scl", *BASELINES):
            pts = sorted((r[xkey], r["acc"]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[method])
        if dense:
            ax.axhline(dense[0]["acc"], color="gray", ls="--", label="dense")
        if xkey == "flops":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (median of seeds)")
        ax.set_title(f"Fashion-MNIST {net}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"frontier_{net}_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=FMNIST_NETS, choices=FMNIST_NETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lambdas", nargs="+", type=float, default=None)
    parser.add_argument(
        "--baseline-lambdas",
        nargs="+",
        type=float,
        default=None,
        help="the SCL lambdas whose sparsities the baselines are trained at (default: all)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 / 5 per net")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 lambdas, 60 batches/epoch")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "frontier")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "frontier")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if not prepare(args, {"_limit_batches": 60, "_frequency": 10}):
        return 2
    for net in args.nets:
        path = args.results / f"{net}.jsonl"
        if not args.report_only:
            if args.quick and not args.lambdas:
                args.lambdas = [LAMBDAS[net][1], LAMBDAS[net][3]]
            arms = scl_arms(net, args)
            for a in arms:
                a.setdefault("_frequency", 100)
            print(f"== {net}: phase 1, dense and SCL", flush=True)
            run_arms(arms, path, args.jobs)
            arms = baseline_arms(net, args, read_results(path))
            for a in arms:
                a.setdefault("_frequency", 100)
            print(f"== {net}: phase 2, baselines at SCL's sparsities", flush=True)
            run_arms(arms, path, args.jobs)
            if args.quick:
                args.lambdas = None
        text, rows = table(net, read_results(path))
        print(text, flush=True)
        (args.out / f"frontier_{net}.md").write_text(text + "\n")
        for p in plot(net, rows, args.out):
            print(f"wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
