"""Why does SCL trail gradual magnitude pruning (GMP) on LeNet-300-100? The topology or the
training?

For each lambda and seed:

1. SCL is trained (the frontier's arm) and GMP at exactly SCL's final sparsity; both save their
   final masks (``<results>/masks/*.npz``, 1 bit per connection). Measured on the way: how many
   connections still switch on or off late in SCL training (per epoch), and how magnitude-like
   each final choice is (the fraction of the kept connections that global magnitude pruning of
   the same final weights would also keep).
2. Each topology is retrained from the same initialization with its masks fixed from the first
   step (the same epochs, optimizer and seed): SCL's masks, GMP's masks, and a random mask with
   SCL's per-layer counts as the floor. If SCL's topology retrained matches GMP's, the masks are
   as good and SCL loses in its training dynamics; if it trails, the masks themselves are worse.

The table goes to ``--out`` (default ``docs/diagnosis``); results are appended to
``<results>/<net>.jsonl`` and a rerun skips finished arms.

    python bench/mask_diagnosis.py                   # LeNet-300-100, 2 lambdas x 3 seeds
    python bench/mask_diagnosis.py --quick           # minutes
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist import (
    FMNIST_NETS,
    arm_key,
    gmp_at,
    load_on_sets,
    prepare,
    read_results,
    run_arms,
    save_on_sets,
)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = {"lenet300": 10, "lenet5": 5}
LAMBDAS = {"lenet300": [4e-6, 3e-5], "lenet5": [1.5e-5]}
SOURCES = ("scl", "gmp", "random")


def mask_file(masks: Path, arm: dict[str, Any]) -> Path:
    digest = hashlib.sha256(arm_key(arm).encode()).hexdigest()[:16]
    return masks / f"{arm['net']}_{arm['method']}_{digest}.npz"


def scl_arm(net: str, epochs: int, lam: float, seed: int) -> dict[str, Any]:
    return {
        "net": net,
        "epochs": epochs,
        "method": "scl",
        "lam": lam,
        "seed": seed,
        "study": "diagnosis",
    }


def gmp_arm(scl: dict[str, Any]) -> dict[str, Any]:
    return gmp_at(scl, matched_lam=scl["arm"]["lam"], study="diagnosis")


def fixed_arm(scl: dict[str, Any], source: str) -> dict[str, Any]:
    a = scl["arm"]
    return {
        "net": a["net"],
        "epochs": a["epochs"],
        "method": "fixed",
        "seed": a["seed"],
        "mask_source": source,
        "matched_lam": a["lam"],
        "study": "diagnosis",
    }


def random_on_sets(on: dict[str, Any], seed: int) -> dict[str, Any]:
    """A uniformly random on-set with the same number of connections on in every layer."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name, t in on.items():
        flat = torch.zeros(t.numel(), dtype=torch.bool)
        flat[torch.randperm(t.numel(), generator=gen)[: int(t.sum())]] = True
        out[name] = flat.reshape(t.shape)
    return out


def overlap(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Jaccard overlap of two on-sets, overall and per layer."""
    per = {}
    inter = union = 0
    for k in a:
        i, u = int((a[k] & b[k]).sum()), int((a[k] | b[k]).sum())
        per[k.removeprefix("model.")] = round(i / max(u, 1), 4)
        inter, union = inter + i, union + u
    return inter / max(union, 1), per


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(net: str, results: list[dict], masks: Path, out: Path) -> str:
    by_key = {arm_key(r["arm"]): r for r in results}
    scls = [
        r for r in results if r["arm"]["method"] == "scl" and r["arm"].get("study") == "diagnosis"
    ]
    lines = [
        f"Mask diagnosis, {net} (median of seeds; SCL and GMP at the same sparsity; 'retrained' "
        f"= that topology fixed from the first step, trained from the same initialization)",
        "",
        "| lambda | seeds | sparsity | SCL | GMP | retrained: SCL masks | retrained: GMP masks | "
        "retrained: random, SCL's layer counts | overlap SCL-GMP (Jaccard) | "
        "magnitude agreement SCL / GMP | switched in SCL's last epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    layer_lines = []
    for lam in sorted({r["arm"]["lam"] for r in scls}):
        rows = []
        for s in sorted(
            (r for r in scls if r["arm"]["lam"] == lam), key=lambda r: r["arm"]["seed"]
        ):
            g = by_key.get(arm_key(gmp_arm(s)))
            fixed = {src: by_key.get(arm_key(fixed_arm(s, src))) for src in SOURCES}
            if g is None or any(v is None for v in fixed.values()):
                continue
            jac, per = float("nan"), {}
            fs, fg = mask_file(masks, s["arm"]), mask_file(masks, g["arm"])
            if fs.exists() and fg.exists():
                jac, per = overlap(load_on_sets(fs), load_on_sets(fg))
            rows.append((s, g, fixed, jac, per))
        if not rows:
            continue

        def med(f: Any, rows: list = rows) -> float:
            return _median([f(*row) for row in rows])

        lines.append(
            f"| {lam:g} | {len(rows)} | {med(lambda s, *_: s['sparsity']):.4f} | "
            f"{med(lambda s, *_: s['test_acc']):.4f} | {med(lambda s, g, *_: g['test_acc']):.4f} | "
            f"{med(lambda s, g, f, *_: f['scl']['test_acc']):.4f} | "
            f"{med(lambda s, g, f, *_: f['gmp']['test_acc']):.4f} | "
            f"{med(lambda s, g, f, *_: f['random']['test_acc']):.4f} | "
            f"{med(lambda s, g, f, j, p: j):.3f} | "
            f"{med(lambda s, *_: s['magnitude_agreement']):.3f} / "
            f"{med(lambda s, g, *_: g['magnitude_agreement']):.3f} | "
            f"{med(lambda s, *_: s['churn']['flips'][-1]):.5f} |"
        )
        for s, g, _f, _j, per in rows:
            layer_lines.append(
                f"| {lam:g} | {s['arm']['seed']} | "
                + " ".join(f"{k} {v:.3f}" for k, v in per.items())
                + " | "
                + " ".join(
                    f"{k} {s['layer_sparsity'][k]:.4f}/{g['layer_sparsity'][k]:.4f}" for k in per
                )
                + " | "
                + " ".join(f"{x:.4f}" for x in s["churn"]["flips"])
                + " |"
            )
    lines += [
        "",
        "| lambda | seed | overlap per layer (Jaccard) | layer sparsity SCL/GMP | "
        "fraction of connections switched, per epoch (SCL) |",
        "|---|---|---|---|---|",
        *layer_lines,
    ]
    text = "\n".join(lines)
    (out / f"diagnosis_{net}.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["lenet300"], choices=FMNIST_NETS)
    parser.add_argument("--lambdas", nargs="+", type=float, default=None, help="default: per net")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 / 5 per net")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "diagnosis")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "diagnosis")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs of 60 batches")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if not prepare(args, {"_limit_batches": 60, "_frequency": 10}):
        return 2
    masks = args.results / "masks"
    for net in args.nets:
        path = args.results / f"{net}.jsonl"
        epochs = args.epochs or EPOCHS[net]
        if not args.report_only:
            extra = {"_frequency": 100, **args._quick}
            arms = [
                scl_arm(net, epochs, lam, s)
                for lam in (args.lambdas or LAMBDAS[net])
                for s in args.seeds
            ]
            for a in arms:
                a.update(extra, _track_churn=True, _save_masks=str(mask_file(masks, a)))
            print(f"== {net}: SCL, saving its masks", flush=True)
            run_arms(arms, path, args.jobs)
            wanted = {arm_key(a) for a in arms}
            scls = [r for r in read_results(path) if arm_key(r["arm"]) in wanted]
            gmps = [gmp_arm(r) for r in scls]
            for a in gmps:
                a.update(extra, _save_masks=str(mask_file(masks, a)))
            print(f"== {net}: GMP at each SCL run's sparsity, saving its masks", flush=True)
            run_arms(gmps, path, args.jobs)
            fixed = []
            for r in scls:
                files = {
                    "scl": mask_file(masks, r["arm"]),
                    "gmp": mask_file(masks, gmp_arm(r)),
                    "random": mask_file(masks, fixed_arm(r, "random")),
                }
                if not files["scl"].exists() or not files["gmp"].exists():
                    print(f"  masks of {r['arm']} are missing: delete its result lines to rerun")
                    continue
                if not files["random"].exists():
                    save_on_sets(
                        random_on_sets(load_on_sets(files["scl"]), r["arm"]["seed"]),
                        files["random"],
                    )
                for src in SOURCES:
                    a = fixed_arm(r, src)
                    a.update(extra, _mask_file=str(files[src]))
                    fixed.append(a)
            print(f"== {net}: each topology retrained from the same initialization", flush=True)
            run_arms(fixed, path, args.jobs)
        print(report(net, read_results(path), masks, args.out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
