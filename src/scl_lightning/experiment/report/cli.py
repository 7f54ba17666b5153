"""The ``scl report RUN_DIR`` command line: arguments, one-line errors, exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .markdown import MARKDOWN
from .plots import IMAGES
from .run import ReportError, load_run
from .write import write_report

__all__ = ["build_parser", "main"]

PROG = "scl report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Plot a finished run (layerwise sparsity, sparsity and accuracy over training, dense "
            "vs effective FLOPs per layer) and write a Markdown summary beside the plots."
        ),
        epilog=(
            "An existing report is never overwritten: if the output directory exists and is not "
            "empty, the next free DIR-1, DIR-2, ... is used."
        ),
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a finished run's directory, holding summary.json and metrics.csv "
        "(e.g. runs/digits_mlp/version_0)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/report)"
    )
    parser.add_argument(
        "--ckpt",
        metavar="PATH",
        default=None,
        help="checkpoint to cross-check masks against (default: RUN_DIR's last checkpoint)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scl report``; returns the exit status (0, or 2 on an error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed by argparse)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        run = load_run(args.run_dir, args.ckpt)
        wanted = Path(args.out) if args.out is not None else run.directory / "report"
        out = write_report(run, wanted)
    except ReportError as err:
        if os.environ.get("SCL_DEBUG"):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for note in run.notes:
        if note.startswith(("**Mismatch**", "Warning: ")):
            text = note.removeprefix("Warning: ").replace("**", "")
            print(f"{PROG}: warning: {text}", file=sys.stderr)
    if out != wanted:
        print(f"{PROG}: {wanted} already exists; wrote a new report beside it instead")
    print(f"{PROG}: report written to {out}")
    for name in (MARKDOWN, *IMAGES.values()):
        print(f"  {out / name}")
    return 0
