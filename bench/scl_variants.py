"""Which SCL recipe beats gradual magnitude pruning? Each variant of SCL's open choices is trained
at the given lambdas, and gradual magnitude pruning (GMP) is trained at exactly the sparsity each
SCL run reached, with the same seed, epochs and optimizer: the accuracy difference is measured
at a matched sparsity, never read off an interpolated curve.

Variants (``--variants``, default all): the defaults; masks frozen for the last 40% of epochs
(GMP's fine-tune share); no weight decay (it shrinks masked-off weights, whose masks then lose
the task gradient that could revive them); smaller initial masks; a dense warm-up epoch; slower
and faster mask learning rates; the softplus STE; twice the epochs; no weight decay with a
warm-up epoch; no normalization at the mask learning rate the ablation found best for it (100).

Results are appended to ``bench/results/variants/<net>.jsonl`` (a rerun skips finished arms);
the table goes to ``--out`` (default ``docs/variants``).

    python bench/scl_variants.py --nets lenet300 --lambdas 4e-6 3e-5 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist import FMNIST_NETS, arm_key, gmp_at, prepare, read_results, run_arms

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = {"lenet300": 10, "lenet5": 5}


def variants(epochs: int) -> dict[str, dict[str, Any]]:
    """Name -> settings that differ from the frontier's SCL arm (shared settings go to GMP)."""
    return {
        "default": {},
        "finetune40": {"freeze_masks_epoch": max(1, round(0.6 * epochs))},
        "no_wd": {"weight_decay": 0.0},
        "mask_init_0.25": {"mask_init": 0.25},
        "warmup1": {"warmup_epochs": 1},
        "mask_lr_0.003": {"mask_lr": 0.003},
        "mask_lr_0.03": {"mask_lr": 0.03},
        "softplus": {"ste": "softplus"},
        "epochs_x2": {"epochs": 2 * epochs},
        "no_wd_warmup1": {"weight_decay": 0.0, "warmup_epochs": 1},
        "norm_none_lr100": {"mask_grad_norm": "none", "mask_lr": 100.0},
    }


SHARED = ("weight_decay", "epochs")  # settings GMP takes from the variant


def scl_arms(net: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    epochs = args.epochs or EPOCHS[net]
    table = variants(epochs)
    return [
        {
            "net": net,
            "epochs": epochs,
            "method": "scl",
            "lam": lam,
            "seed": s,
            "variant": name,
            **table[name],
        }
        for name in args.variants
        for lam in args.lambdas
        for s in args.seeds
    ]


def gmp_arm(scl: dict[str, Any]) -> dict[str, Any]:
    a = scl["arm"]
    arm = gmp_at(scl, variant=a["variant"], matched_lam=a["lam"])
    arm.update({k: a[k] for k in SHARED if k in a})
    return arm


def report(net: str, results: list[dict], out: Path) -> str:
    by_key = {arm_key(r["arm"]): r for r in results}
    pairs: dict[tuple[str, float], list[tuple[dict, dict]]] = defaultdict(list)
    for r in results:
        a = r["arm"]
        if a["method"] != "scl":
            continue
        g = by_key.get(arm_key(gmp_arm(r)))
        if g is not None:
            pairs[(a["variant"], a["lam"])].append((r, g))
    lines = [
        f"| {net} variant | lambda | seeds | SCL sparsity | SCL acc | GMP acc (same sparsity) | "
        f"SCL - GMP (pt, median) | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, lam), ps in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        diffs = [100 * (s["test_acc"] - g["test_acc"]) for s, g in ps]
        lines.append(
            f"| {name} | {lam:g} | {len(ps)} | "
            f"{statistics.median(s['sparsity'] for s, _ in ps):.4f} | "
            f"{statistics.median(s['test_acc'] for s, _ in ps):.4f} | "
            f"{statistics.median(g['test_acc'] for _, g in ps):.4f} | "
            f"{statistics.median(diffs):+.2f} | {' '.join(f'{d:+.2f}' for d in diffs)} |"
        )
    text = "\n".join(lines)
    (out / f"variants_{net}.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["lenet300"], choices=FMNIST_NETS)
    parser.add_argument("--lambdas", nargs="+", type=float, default=[4e-6, 3e-5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=list(variants(10)))
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 / 5 per net")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "variants")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "variants")
    parser.add_argument("--quick", action="store_true", help="2 variants, 2 epochs of 60 batches")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.variants = args.variants[:2]
    if not prepare(args, {"_limit_batches": 60, "_frequency": 10}):
        return 2
    quick = args._quick
    for net in args.nets:
        path = args.results / f"{net}.jsonl"
        if not args.report_only:
            arms = scl_arms(net, args)
            for a in arms:
                a.update({"_frequency": 100, **quick})
            print(f"== {net}: SCL variants", flush=True)
            run_arms(arms, path, args.jobs)
            wanted = {arm_key(a) for a in arms}
            done = [r for r in read_results(path) if arm_key(r["arm"]) in wanted]
            gmps = [gmp_arm(r) for r in done]
            for a in gmps:
                a.update({"_frequency": 100, **quick})
            print(f"== {net}: gradual magnitude pruning at each SCL run's sparsity", flush=True)
            run_arms(gmps, path, args.jobs)
        print(report(net, read_results(path), args.out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
