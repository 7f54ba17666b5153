"""Before/after of a change, side by side in one run: ``bench/step_time.py``'s runs (the MLP, and
ResNet-56 with ``--models``) against two source trees, interleaved (a helper, not run by
``make bench``).

Each repetition runs every (tree, variant) pair once, in an order rotated per repetition, each a
fresh subprocess of ``bench/step_time.py --_one`` with ``PYTHONPATH`` set to that tree's ``src``;
the table shows the median step of each and the ratios. For example, against the commit before
the performance work of issue 6:

    git worktree add /tmp/before 604ac60
    PYTHONPATH=src python bench/_compare_trees.py --before /tmp/before/src --after src \
        [--models mlp resnet56] [--reps 3] [--steps 60] [--resnet-steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

STEP_TIME = Path(__file__).with_name("step_time.py")
VARIANTS = ("dense", "SCL", "plain", "drop-in")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before", required=True, help="the src directory of the old tree")
    parser.add_argument("--after", default="src", help="the src directory of the new tree")
    parser.add_argument("--models", nargs="+", choices=["mlp", "resnet56"], default=["mlp"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--resnet-steps", type=int, default=8, help="timed steps, ResNet-56")
    parser.add_argument("--resnet-warmup", type=int, default=3, help="untimed steps, ResNet-56")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mlp-shape", type=int, nargs=3, default=None)
    parser.add_argument("--mask-sparsity", type=float, default=0.5)
    args = parser.parse_args()
    if not 0.0 <= args.mask_sparsity < 1.0:
        parser.error(f"--mask-sparsity must be in [0, 1), got {args.mask_sparsity}")
    trees = {"before": args.before, "after": args.after}
    for label, path in trees.items():
        if not (Path(path) / "scl_lightning").is_dir():
            sys.exit(f"--{label} {path}: no scl_lightning package there; pass a tree's src/")
    options = {
        "precision": None,
        "channels_last": False,
        "compile": False,
        "mlp_shape": args.mlp_shape,
        "mask_sparsity": args.mask_sparsity,
    }
    Key = tuple[str, str, str]  # (model, tree, variant)
    steps: dict[Key, list[float]] = {
        (m, t, v): [] for m in args.models for t in trees for v in VARIANTS
    }
    memory: dict[Key, list[float]] = {k: [] for k in steps}
    pairs = [(t, v) for v in VARIANTS for t in trees]
    for rep in range(args.reps):
        k = rep % len(pairs)
        for model, (tree, variant) in [(m, p) for m in args.models for p in pairs[k:] + pairs[:k]]:
            n, warmup = (
                (args.resnet_steps, args.resnet_warmup)
                if model == "resnet56"
                else (args.steps, args.warmup)
            )
            one = json.dumps([model, variant, n, warmup, 0, options])
            env = dict(os.environ, PYTHONPATH=str(Path(trees[tree]).resolve()))
            proc = subprocess.run(
                [sys.executable, str(STEP_TIME), "--_one", one],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode:
                sys.exit(f"{tree}/{variant} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            steps[(model, tree, variant)] += result["step_s"]
            memory[(model, tree, variant)].append(result["peak_mib"])
        print(f"  repetition {rep + 1}/{args.reps} done", flush=True)
    med = {k: statistics.median(v) * 1000 for k, v in steps.items()}
    mem = {k: statistics.median(v) for k, v in memory.items()}
    shape = "x".join(map(str, args.mlp_shape)) if args.mlp_shape else "3x32x32"
    print(
        f"MLP on {shape} inputs, ResNet-56 on 3x32x32; batch 128, masks "
        f"{args.mask_sparsity:.0%} off; {args.reps} repetitions x {args.steps} steps (ResNet-56: "
        f"{args.resnet_steps}), interleaved"
    )
    print(
        "| model | variant | before ms | after ms | after / before | before, ratio to dense | "
        "after, ratio to dense | peak RSS growth MiB, before / after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in args.models:
        for v in VARIANTS:
            b, a = med[(m, "before", v)], med[(m, "after", v)]
            print(
                f"| {m} | {v} | {b:.2f} | {a:.2f} | {a / b:.2f} | "
                f"{b / med[(m, 'before', 'dense')]:.3f} | {a / med[(m, 'after', 'dense')]:.3f} | "
                f"{mem[(m, 'before', v)]:.1f} / {mem[(m, 'after', v)]:.1f} |"
            )


if __name__ == "__main__":
    main()
