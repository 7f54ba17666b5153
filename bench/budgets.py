"""Budgets instead of lambdas: does lambda control reach the sparsity or FLOPs asked for, and at
what cost in accuracy?

1. **Precision.** ``target_sparsity`` 0.90 / 0.95 / 0.98 on the digits MLP (40 epochs) and on
   Fashion-MNIST LeNet-300-100 (10 epochs), ``target_flops`` 0.10 on Fashion-MNIST LeNet-5
   (5 epochs), seeds 0-2: the final global sparsity (or effective FLOPs) against the target.
2. **Cost.** Targets set to the sparsity each fixed-lambda run of ``bench/frontier.py`` reached
   (median of its seeds, read from ``bench/results/frontier/``), so a target run and a
   fixed-lambda run end at the same sparsity with the same epochs, optimizer and seeds; gradual
   magnitude pruning (GMP) is trained at exactly the sparsity each target run reached.

Results are appended to ``<results>/<net>.jsonl`` (a rerun skips finished arms); the tables go
to ``--out`` (default ``docs/budgets``).

    python bench/budgets.py                          # everything (about 40 min on 2 cores)
    python bench/budgets.py --nets digits_mlp        # minutes, no Fashion-MNIST needed
    python bench/budgets.py --quick                  # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist import NETS, arm_key, gmp_at, prepare, read_results, run_arms

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = {"digits_mlp": 40, "lenet300": 10, "lenet5": 5}
SPARSITY_TARGETS = {"digits_mlp": [0.90, 0.95, 0.98], "lenet300": [0.90, 0.95, 0.98], "lenet5": []}
FLOPS_TARGETS = {"digits_mlp": [], "lenet300": [], "lenet5": [0.10]}
#: fixed-lambda frontier runs to match (bench/frontier.py's lambdas)
MATCH_LAMBDAS = {"digits_mlp": [], "lenet300": [1e-6, 4e-6, 3e-5], "lenet5": [1.5e-5]}
#: when the matched targets are reached, besides the default (20% of the run: epoch 2 of 10,
#: epoch 1 of 5): also at 60% of the run (the default until the schedule study, docs/RESULTS.md)
MATCH_BY = {"digits_mlp": [None], "lenet300": [None, 6], "lenet5": [None, 3]}
PRECISION = 0.01  # acceptance: final sparsity within 0.01 of the target
FLOPS_PRECISION = 0.10  # acceptance: effective FLOPs within 10% (relative) of the target


def frontier_sparsity(net: str, lam: float) -> float | None:
    """Median final sparsity of the frontier's fixed-lambda SCL runs at ``lam``."""
    path = ROOT / "bench" / "results" / "frontier" / f"{net}.jsonl"
    runs = [
        r for r in read_results(path) if r["arm"]["method"] == "scl" and r["arm"].get("lam") == lam
    ]
    return round(statistics.median(r["sparsity"] for r in runs), 4) if runs else None


def frontier_runs(net: str, lam: float) -> list[dict]:
    path = ROOT / "bench" / "results" / "frontier" / f"{net}.jsonl"
    return [
        r for r in read_results(path) if r["arm"]["method"] == "scl" and r["arm"].get("lam") == lam
    ]


def target_arm(
    net: str, epochs: int, kind: str, target: float, seed: int, by: int | None = None
) -> dict[str, Any]:
    arm = {
        "net": net,
        "epochs": epochs,
        "method": "scl",
        f"target_{kind}": target,
        "seed": seed,
        "study": "budget",
    }
    if by is not None:
        arm["target_epoch"] = by
    return arm


def gmp_arm(run: dict[str, Any]) -> dict[str, Any]:
    a = run["arm"]
    labels = {"matched_target_epoch": a["target_epoch"]} if "target_epoch" in a else {}
    return gmp_at(run, matched_target=a["target_sparsity"], study="budget", **labels)


def _flops_fraction(r: dict[str, Any]) -> float:
    return r["effective_flops"] / r["dense_flops"]


def report(net: str, results: list[dict], matched: dict[float, float], out: Path) -> str:
    by_key = {arm_key(r["arm"]): r for r in results}
    targets = [r for r in results if r["arm"]["method"] == "scl"]
    lines = [
        f"Budgets, {net}: precision (every seed)",
        "",
        "| target | reached by | seed | reached | gap | within | final lambda | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(targets, key=lambda r: (str(r["arm"]), r["arm"]["seed"])):
        a = r["arm"]
        if "target_flops" in a:
            t, got = a["target_flops"], _flops_fraction(r)
            ok = abs(got - t) / t <= FLOPS_PRECISION
            what = f"FLOPs {t:g}"
            gap = f"{(got - t) / t:+.1%} (rel.)"
        else:
            t, got = a["target_sparsity"], r["sparsity"]
            ok = abs(got - t) <= PRECISION
            what = f"sparsity {t:g}"
            gap = f"{got - t:+.4f}"
        by = f"epoch {a['target_epoch']}" if "target_epoch" in a else "20% (default)"
        lines.append(
            f"| {what} | {by} | {a['seed']} | {got:.4f} | {gap} | {'yes' if ok else '**no**'} | "
            f"{r.get('final_lam', float('nan')):.3g} | {r['test_acc']:.4f} |"
        )
    if matched:
        lines += [
            "",
            f"Budgets, {net}: a target at the sparsity a fixed lambda reached (median of seeds; "
            f"GMP at each target run's own sparsity)",
            "",
            "| fixed lambda | its sparsity | its acc | target reached by | target run sparsity | "
            "target run acc | target - fixed (pt) | GMP acc | "
            "target - GMP (pt, median of per-seed differences) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (lam, t), by in (
            (item, by) for item in sorted(matched.items()) for by in MATCH_BY[net]
        ):
            fixed = frontier_runs(net, lam)
            runs = [
                r
                for r in targets
                if r["arm"].get("target_sparsity") == t and r["arm"].get("target_epoch") == by
            ]
            if not fixed or not runs:
                continue
            gmps = [(r, by_key.get(arm_key(gmp_arm(r)))) for r in runs]
            diffs = [100 * (r["test_acc"] - g["test_acc"]) for r, g in gmps if g is not None]
            fixed_acc = statistics.median(r["test_acc"] for r in fixed)
            acc = statistics.median(r["test_acc"] for r in runs)
            gmp_acc = (
                f"{statistics.median(g['test_acc'] for _, g in gmps if g):.4f}" if diffs else "-"
            )
            lines.append(
                f"| {lam:g} | {statistics.median(r['sparsity'] for r in fixed):.4f} | "
                f"{fixed_acc:.4f} | {'20% (default)' if by is None else f'epoch {by}'} | "
                f"{statistics.median(r['sparsity'] for r in runs):.4f} | "
                f"{acc:.4f} | {100 * (acc - fixed_acc):+.2f} | {gmp_acc} | "
                + (
                    f"{statistics.median(diffs):+.2f} ({' '.join(f'{d:+.2f}' for d in diffs)})"
                    if diffs
                    else "-"
                )
                + " |"
            )
    text = "\n".join(lines)
    (out / f"budgets_{net}.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(EPOCHS), choices=list(EPOCHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 / 10 / 5 per net")
    parser.add_argument("--no-baseline", action="store_true", help="skip GMP")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "budgets")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "budgets")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs of 60 batches")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    fmnist = [n for n in args.nets if NETS[n].get("data") != "digits"]
    if fmnist and not prepare(args, {"_limit_batches": 60, "_frequency": 10}):
        return 2
    if not fmnist:
        prepare_digits(args)
    for net in args.nets:
        path = args.results / f"{net}.jsonl"
        epochs = args.epochs or (2 if args.quick else EPOCHS[net])
        matched = {}
        for lam in MATCH_LAMBDAS[net]:
            s = frontier_sparsity(net, lam)
            if s is None:
                print(f"  no frontier runs of {net} at lam {lam:g}: run bench/frontier.py first")
            else:
                matched[lam] = s
        if not args.report_only:
            extra = {"_frequency": 100, **args._quick}
            arms = (
                [
                    target_arm(net, epochs, "sparsity", t, s)
                    for t in SPARSITY_TARGETS[net]
                    for s in args.seeds
                ]
                + [
                    target_arm(net, epochs, "sparsity", t, s, by)
                    for t in matched.values()
                    for by in MATCH_BY[net]
                    for s in args.seeds
                ]
                + [
                    target_arm(net, epochs, "flops", t, s)
                    for t in FLOPS_TARGETS[net]
                    for s in args.seeds
                ]
            )
            for a in arms:
                a.update(extra)
            print(f"== {net}: target runs", flush=True)
            run_arms(arms, path, args.jobs)
            if matched and not args.no_baseline:
                wanted = {arm_key(a) for a in arms}
                done = [
                    r
                    for r in read_results(path)
                    if arm_key(r["arm"]) in wanted and "target_sparsity" in r["arm"]
                ]
                gmps = [gmp_arm(r) for r in done if r["arm"]["target_sparsity"] in matched.values()]
                for a in gmps:
                    a.update(extra)
                print(f"== {net}: GMP at each matched target run's sparsity", flush=True)
                run_arms(gmps, path, args.jobs)
        print(report(net, read_results(path), matched, args.out), flush=True)
    return 0


def prepare_digits(args: argparse.Namespace) -> None:
    """``prepare`` without the Fashion-MNIST check (digits ship with scikit-learn)."""
    args._quick = {}
    if args.quick:
        args._quick = {"_limit_batches": 60, "_frequency": 10}
        args.results = args.results.with_name(args.results.name + "_quick")
        args.out = args.out.with_name(args.out.name + "_quick")
    args.out.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
