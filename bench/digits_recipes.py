"""Acceptance run for the bundled digits recipe, side by side in one run.

Trains, for each seed: ``configs/digits_mlp.yaml`` (SCL); the same recipe without the per-feature
normalization of mask gradients (``--model.mask_grad_norm none``, ablation), once as it is and
once with the mask learning rate
multiplied by 10^4 (raw mask gradients are ~10^4 times smaller than normalized ones, so this is
the fairest un-normalized counterpart); and ``configs/digits_mlp_dense.yaml`` (dense baseline).
Then prints the medians, the accuracy gap to dense, and the sparsity.
Logs go to a temporary directory (CSV only, so no W&B run is created).

    python bench/digits_recipes.py [--seeds 0 1 2] [--out docs/digits_recipes.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from scl_lightning.experiment.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, seed: int, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"{config.stem}-{seed}-{len(list(workdir.iterdir()))}"
    logger = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(out), "name": "run"},
        }
    ]
    args = [
        "fit",
        "--config",
        str(config),
        "--seed_everything",
        str(seed),
        f"--trainer.logger={json.dumps(logger)}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        main(args)
    wall = time.perf_counter() - start
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    summary["wall_s"] = wall
    return summary


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    opts = parser.parse_args()
    sys.argv = sys.argv[:1]  # the runs below pass their arguments to LightningCLI explicitly

    scl_cfg = ROOT / "configs/digits_mlp.yaml"
    dense_cfg = ROOT / "configs/digits_mlp_dense.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        recipe = yaml.safe_load(scl_cfg.read_text())
        no_norm = ["--model.mask_grad_norm=none"]
        mask_lr = float(recipe["model"]["mask_lr"])
        variants = {
            "scl": (scl_cfg, []),
            "scl_no_norm": (scl_cfg, no_norm),
            "no_norm_lr1e4": (scl_cfg, [*no_norm, f"--model.mask_lr={mask_lr * 1e4}"]),
            "dense": (dense_cfg, []),
        }
        results: dict[str, list[dict]] = {k: [] for k in variants}
        for seed in opts.seeds:
            for name, (cfg, extra) in variants.items():
                s = run(cfg, seed, workdir, extra)
                results[name].append(s)
                print(
                    f"{name:<14} seed {seed}: val_acc {s['val_acc']:.4f}  sparsity "
                    f"{s['sparsity']:.4f}  train {s['train_time_s']:.1f}s",
                    file=sys.stderr,
                )

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    dense_acc = med("dense", "val_acc")
    print(
        f"\n{'variant':<14} {'median val_acc':>15} {'gap to dense (pt)':>18} "
        f"{'median sparsity':>16} {'median train s':>15}"
    )
    for name in variants:
        print(
            f"{name:<14} {med(name, 'val_acc'):>15.4f} "
            f"{100 * (med(name, 'val_acc') - dense_acc):>18.2f} "
            f"{med(name, 'sparsity'):>16.4f} {med(name, 'train_time_s'):>15.1f}"
        )
    if opts.out:
        opts.out.write_text(
            json.dumps(
                {
                    k: [{kk: vv for kk, vv in r.items() if kk != "layers"} for r in v]
                    for k, v in results.items()
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main_bench()
