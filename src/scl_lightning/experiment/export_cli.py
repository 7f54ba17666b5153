"""``scl export RUN_DIR_OR_CKPT --format {dense,compact,sparse,onnx} [--out PATH]``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scl_lightning.deploy.formats import DEFAULT_NAMES, FORMATS, export_model

__all__ = ["build_parser", "load_trained", "main"]

PROG = "scl export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Turn a trained run into a model that is smaller and faster: dense (w * H(m) baked "
            "in, .safetensors), compact (unused units and channels removed, .pt2), sparse "
            "(compact, with Linear layers in CSR where measured faster, .pt2) or onnx "
            "(compact, checked against onnxruntime, .onnx). Prints parameters, bytes and FLOPs "
            "before and after."
        ),
        epilog="An existing output is never overwritten unless --overwrite is given.",
    )
    parser.add_argument(
        "source",
        metavar="RUN_DIR_OR_CKPT",
        help="a run directory (its last checkpoint is used) or a Lightning checkpoint (.ckpt)",
    )
    parser.add_argument("--format", choices=FORMATS, default="compact", help="default: compact")
    parser.add_argument(
        "--out",
        metavar="PATH",
        default=None,
        help="output file (default: RUN_DIR/export/model.safetensors, model.pt2, "
        "model_sparse.pt2 or model.onnx; beside a checkpoint given directly)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="the batch the sparse format picks each layer's storage for (default: 256)",
    )
    return parser


def _checkpoint_of(source: Path) -> tuple[Path, Path]:
    """``(checkpoint, default output directory)`` for a run directory or a checkpoint."""
    from scl_lightning.experiment.report.run import find_checkpoint  # a light import

    if source.is_dir():
        ckpt = find_checkpoint(source)
        if ckpt is None:
            raise FileNotFoundError(
                f"no checkpoint (*.ckpt) in {source} or {source / 'checkpoints'}: pass a run "
                "directory of a run that saved one, or the checkpoint itself"
            )
        return ckpt, source / "export"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a run directory or a .ckpt file")
    if source.suffix in (".safetensors", ".pt2", ".onnx"):
        raise ValueError(
            f"{source} is an export, not a checkpoint: export from the run's directory or its .ckpt"
        )
    return source, source.parent


def load_trained(ckpt: Path) -> tuple[Any, tuple[int, ...]]:
    """The masked network of an ``SCLModule`` checkpoint and its input shape (C, H, W)."""
    from scl_lightning.experiment.checkpoint import load_checkpoint
    from scl_lightning.module import SCLModule
    from scl_lightning.nn.sparsify import masked_modules

    checkpoint = load_checkpoint(ckpt)
    hparams = checkpoint.get("hyper_parameters")
    state = checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or "backbone" not in hparams or not isinstance(state, dict):
        raise ValueError(
            f"{ckpt} is not an SCLModule checkpoint (no backbone in its hyper-parameters); for "
            "your own LightningModule, in Python: model = scl_lightning.load_sparse(MyModule, "
            "path), then scl_lightning.deploy.export_model(model, out, format, example_input)"
        )
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    shape = kwargs.get("input_shape")
    if not shape:
        raise ValueError(f"{ckpt} does not record the input shape (input_shape hyper-parameter)")
    module = SCLModule(**kwargs)
    if not any(key.endswith(".mask") for key in state):
        raise ValueError(
            f"{ckpt} holds no masks: the run was not sparsified, so there is nothing to export "
            "beyond its own weights"
        )
    module.load_state_dict(state, strict=True)
    model = module.model.eval()
    if not any(True for _ in masked_modules(model)):
        raise ValueError(f"{ckpt}: the network has no masked layer")
    return model, tuple(int(s) for s in shape)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scl export``; returns the exit status (0, or 2 on an error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed by argparse)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        import torch

        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        ckpt, out_dir = _checkpoint_of(Path(args.source))
        name = DEFAULT_NAMES[args.format]
        if args.out is not None:
            out = Path(args.out)
        elif out_dir.name == "export":
            out = out_dir / name
        else:
            out = out_dir / f"{ckpt.stem}_{name}"
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite or --out another path")
        model, shape = load_trained(ckpt)
        # compaction, the CSR check and onnxruntime's compare outputs on this batch: zeros
        # would hide a difference (every unit at its bias), so random normal inputs, seeded
        # (the checkpoint records the input shape, not the data: this stays offline)
        example = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
        print(f"{PROG}: {ckpt} -> {args.format}", flush=True)
        report = export_model(
            model, out, args.format, example, overwrite=args.overwrite, batch_size=args.batch_size
        )
    except Exception as err:
        from scl_lightning.experiment.checkpoint import CheckpointError

        if os.environ.get("SCL_DEBUG") or not isinstance(
            err,
            ValueError
            | FileNotFoundError
            | FileExistsError
            | IsADirectoryError
            | CheckpointError
            | ImportError,
        ):
            raise
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{PROG}: error: {text.removeprefix('export: ')}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
