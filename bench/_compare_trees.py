"""Before/after of a change, side by side in one run: ``bench/step_time.py``'s MLP runs against two
source trees, interleaved (a helper, not run by ``make bench``).

Each repetition runs every (tree, variant) pair once, in an order rotated per repetition, each a
fresh subprocess of ``bench/step_time.py --_one`` with ``PYTHONPATH`` set to that tree's ``src``;
the table shows the median step of each and the ratios. For example, against the commit before
the performance work of issue 6:

    git worktree add /tmp/before 604ac60
    PYTHONPATH=src python bench/_compare_trees.py --before /tmp/before/src --after src
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
    parser.add_argument("--reps", type=int, default=3)
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
    steps: dict[tuple[str, str], list[float]] = {(t, v): [] for t in trees for v in VARIANTS}
    memory: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    pairs = [(t, v) for v in VARIANTS for t in trees]
    for rep in range(args.reps):
        k = rep % len(pairs)
        for tree, variant in pairs[k:] + pairs[:k]:
            one = json.dumps(["mlp", variant, args.steps, args.warmup, 0, options])
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
            steps[(tree, variant)] += result["step_s"]
            memory[(tree, variant)].append(result["peak_mib"])
        print(f"  repetition {rep + 1}/{args.reps} done", flush=True)
    med = {k: statistics.median(v) * 1000 for k, v in steps.items()}
    mem = {k: statistics.median(v) for k, v in memory.items()}
    shape = "x".join(map(str, args.mlp_shape)) if args.mlp_shape else "3x32x32"
    print(
        f"MLP on {shape} inputs, batch 128, masks {args.mask_sparsity:.0%} off; "
        f"{args.reps} repetitions x {args.steps} steps, interleaved"
    )
    print(
        "| variant | before ms | after ms | after / before | before, ratio to dense | "
        "after, ratio to dense | peak RSS growth MiB, before / after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for v in VARIANTS:
        b, a = med[("before", v)], med[("after", v)]
        print(
            f"| {v} | {b:.2f} | {a:.2f} | {a / b:.2f} | {b / med[('before', 'dense')]:.3f} | "
            f"{a / med[('after', 'dense')]:.3f} | "
            f"{mem[('before', v)]:.1f} / {mem[('after', v)]:.1f} |"
        )


if __name__ == "__main__":
    main()
