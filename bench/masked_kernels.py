"""The element-wise work of a masked layer, side by side, on masks of several sparsity patterns:
why ``masked_weight`` multiplies by a float ``H(m)`` instead of calling ``torch.where``.

For one weight of the size of the largest layer of the benchmarked MLP (300 x 3072, float32),
median microseconds per call of:

- **masked_weight, ours**: ``scl_lightning.nn.masked_weight`` forward and backward (``H(m)`` in
  the weight's dtype, written by the comparison itself; ``w * H``; ``g * H`` and ``g * w``);
- **masked_weight, where**: the same autograd function written with a boolean mask and
  ``torch.where(keep, w, 0)`` forward and ``torch.where(keep, g, 0)`` backward (what the project
  did before);
- the single kernels: ``torch.where(keep, g, 0)``, ``g * keep.view(uint8)`` (the multiply turns
  the bytes into a float copy first), ``g * H`` with a float ``H``, ``m > 0`` into a bool
  tensor, and ``m > 0`` written as 0.0/1.0 into a float tensor.

Every output is allocated fresh, as in training. Masks: all on (fresh masks), a random half off,
and 93% off at random (the sparsity the digits recipe reaches). ``where``'s CPU kernel branches
per element, so its speed depends on the pattern; a multiply's does not. Each figure is the
median of ``--reps`` calls after 10 warm-up calls; the where version's ratio to ours is in
brackets.

    PYTHONPATH=src python bench/masked_kernels.py [--reps 50] [--threads 0] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import pick_device

from scl_lightning.nn.ste import masked_weight

SHAPE = (300, 3072)
PATTERNS = {"all on": 0.0, "half off": 0.5, "93% off": 0.93}


class _WhereMaskedWeight(torch.autograd.Function):
    """The reference: ``w * H(m)`` through a boolean mask and ``torch.where`` (identity STE)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        keep = m > 0
        ctx.save_for_backward(w, keep)
        return torch.where(keep, w, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, keep = ctx.saved_tensors
        return torch.where(keep, grad, 0.0), grad * w


def _time(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _kernels(w: torch.Tensor, m: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], Any]]:
    keep = m > 0
    h = keep.to(w.dtype)
    wp, mp = w.clone().requires_grad_(), m.clone().requires_grad_()

    def ours() -> None:
        masked_weight(wp, mp).backward(g)

    def where() -> None:
        _WhereMaskedWeight.apply(wp, mp).backward(g)

    return {
        "masked_weight fwd+bwd, ours": ours,
        "masked_weight fwd+bwd, where": where,
        "where(keep, g, 0)": lambda: torch.where(keep, g, 0.0),
        "g * keep.view(uint8)": lambda: g * keep.view(torch.uint8),
        "g * H (float)": lambda: g * h,
        "m > 0 (bool)": lambda: m > 0,
        "m > 0 (float, one pass)": lambda: torch.gt(m, 0, out=torch.empty_like(m)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch default")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    args = parser.parse_args()
    device = pick_device(args.device, args.threads)
    cpu = f"CPU ({os.cpu_count()} cores)"
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu
    print(
        f"{name}; {platform.python_version()}, torch {torch.__version__}; "
        f"torch threads {torch.get_num_threads()}; weight {SHAPE[0]}x{SHAPE[1]} float32; "
        "median us per call (fwd+bwd: ratio to ours)"
    )
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=gen).to(device)
    g = torch.randn(SHAPE, generator=gen).to(device)
    columns = []
    for off in PATTERNS.values():
        m = torch.where(torch.rand(SHAPE, generator=gen) < off, -1.0, 1.0).to(device)
        columns.append({k: _time(fn, args.reps, device) for k, fn in _kernels(w, m, g).items()})
    print("| kernel | " + " | ".join(PATTERNS) + " |")
    print("| --- |" + " --- |" * len(PATTERNS))
    for k in columns[0]:
        ours = "masked_weight fwd+bwd, ours"
        cells = [
            f"{c[k]:.0f} ({c[k] / c[ours]:.2f}x)" if k.startswith("masked") else f"{c[k]:.0f}"
            for c in columns
        ]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
