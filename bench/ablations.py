"""Ablations the SCL paper's claims rest on, on Fashion-MNIST LeNet-5 and LeNet-300-100.

1. **Straight-through estimators**: ``identity``, ``leaky_relu``, ``softplus`` and ``hardtanh`` at
   one lambda: final sparsity, test accuracy, the fraction of masks that never crossed zero, the
   fraction that never moved at all, and the fraction ending at ``|m| > 1`` (where hardtanh's
   proxy gradient is zero, so they can never move again). Masks start at 1, the edge of
   hardtanh's support: does it stall?
2. **Normalization of mask gradients** ``none/rms/l2/max``, each trained with every mask
   learning rate of one shared grid (``--mask-lrs``) at two lambdas, so no mode is favoured by a
   tuned learning rate. Each mode's frontier is the upper envelope of its (sparsity, accuracy)
   points; the table gives every point, the plot the envelopes.

Results are appended to ``bench/results/ablations/<net>.jsonl`` (a rerun skips finished arms);
tables and plots go to ``--out`` (default ``docs/ablations``). Needs Fashion-MNIST (``make data``).

    python bench/ablations.py --quick        # a few minutes
    python bench/ablations.py                # the full run, see docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist import FMNIST_NETS, prepare, read_results, run_arms

ROOT = Path(__file__).resolve().parents[1]
STES = ("identity", "leaky_relu", "softplus", "hardtanh")
NORMS = ("none", "rms", "l2", "max")
# one grid for every mode, six decades wide: raw (``none``) mask gradients are ~1e4 times smaller
# than normalized ones, so a narrow grid would starve that mode rather than compare it
MASK_LRS = (1e-2, 1.0, 1e2, 1e4)
# one lambda per net for the STE table and two for the normalization sweep (frontier lambdas)
LAMBDAS = {"lenet300": (1e-6, 4e-6), "lenet5": (4e-6, 1.5e-5)}
EPOCHS = {"lenet300": 10, "lenet5": 5}


def arms_for(net: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {"net": net, "epochs": args.epochs or EPOCHS[net], **args._quick}
    lams = tuple(args.lambdas) if args.lambdas else LAMBDAS[net]
    arms: list[dict[str, Any]] = []
    if "ste" in args.studies:
        arms += [
            {
                **common,
                "study": "ste",
                "method": "scl",
                "ste": ste,
                "lam": lams[-1],
                "seed": s,
                "_track_masks": True,
            }
            for ste in STES
            for s in args.seeds
        ]
    if "norm" in args.studies:
        arms += [
            {
                **common,
                "study": "norm",
                "method": "scl",
                "mask_grad_norm": norm,
                "mask_lr": lr,
                "lam": lam,
                "seed": s,
            }
            for norm in NORMS
            for lr in args.mask_lrs
            for lam in lams
            for s in args.seeds
        ]
    return arms


def _envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-right Pareto envelope: points no other point beats in both sparsity and accuracy."""
    best = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not best or y > best[-1][1]:
            best.append((x, y))
    return sorted(best)


def report(net: str, results: list[dict], out: Path) -> str:
    ste = [r for r in results if r["arm"].get("study") == "ste"]
    norm = [r for r in results if r["arm"].get("study") == "norm"]
    lines = [
        f"STE ablation, {net} (lambda {ste[0]['arm']['lam']:g}, {ste[0]['arm']['epochs']} epochs)"
        if ste
        else f"STE ablation, {net}: no results",
        "",
        "| STE | seed | test acc | sparsity | masks never crossed zero | masks never moved | "
        "masks ending at abs(m) > 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(ste, key=lambda r: (STES.index(r["arm"]["ste"]), r["arm"]["seed"])):
        lines.append(
            f"| {r['arm']['ste']} | {r['arm']['seed']} | {r['test_acc']:.4f} | "
            f"{r['sparsity']:.4f} | {r['never_crossed_zero']:.4f} | {r['never_moved']:.4f} | "
            f"{r.get('beyond_one', float('nan')):.4f} |"
        )
    lines += [
        "",
        f"Normalization ablation, {net}: every mask learning rate of the grid, two lambdas",
        "",
        "| normalization | mask lr | lambda | seed | test acc | sparsity | on its envelope |",
        "|---|---|---|---|---|---|---|",
    ]
    envelopes = {}
    for mode in NORMS:
        rs = [r for r in norm if r["arm"]["mask_grad_norm"] == mode]
        envelopes[mode] = _envelope([(r["sparsity"], r["test_acc"]) for r in rs])
        for r in sorted(rs, key=lambda r: (r["arm"]["mask_lr"], r["arm"]["lam"])):
            a = r["arm"]
            on = (r["sparsity"], r["test_acc"]) in envelopes[mode]
            lines.append(
                f"| {mode} | {a['mask_lr']:g} | {a['lam']:g} | {a['seed']} | {r['test_acc']:.4f} "
                f"| {r['sparsity']:.4f} | {'yes' if on else ''} |"
            )
    text = "\n".join(lines)
    (out / f"ablations_{net}.md").write_text(text + "\n")
    if norm:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for mode in NORMS:
            rs = [r for r in norm if r["arm"]["mask_grad_norm"] == mode]
            ax.scatter([r["sparsity"] for r in rs], [r["test_acc"] for r in rs], s=12, alpha=0.4)
            if envelopes[mode]:
                ax.plot(*zip(*envelopes[mode], strict=True), marker="o", label=mode)
        ax.set_xlabel("global sparsity (masked layers)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Fashion-MNIST {net}: mask-gradient normalization (envelopes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"ablation_norm_{net}.png")
        plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["lenet5", "lenet300"], choices=FMNIST_NETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--lambdas",
        nargs="+",
        type=float,
        default=None,
        help="default: two per net; the STE study uses the last",
    )
    parser.add_argument("--studies", nargs="+", default=["ste", "norm"], choices=["ste", "norm"])
    parser.add_argument("--mask-lrs", nargs="+", type=float, default=list(MASK_LRS))
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 / 5 per net")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 epochs of 60 batches, 3 mask lrs")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "ablations")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ablations")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.mask_lrs = args.mask_lrs[:3]
    if not prepare(args, {"_limit_batches": 60}):
        return 2
    for net in args.nets:
        path = args.results / f"{net}.jsonl"
        if not args.report_only:
            print(f"== {net}: STE and normalization ablations", flush=True)
            run_arms(arms_for(net, args), path, args.jobs)
        print(report(net, read_results(path), args.out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
