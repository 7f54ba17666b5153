"""Helpers shared by the benchmark scripts (a leading underscore: ``make bench`` skips it)."""

from __future__ import annotations

import torch


def pick_device(device: str, threads: int) -> torch.device:
    """Set torch's intra-op threads (``0``: torch's default) and resolve ``"auto"`` to CUDA when
    it is present, else the CPU."""
    if threads:
        # On a small shared machine, 1 thread avoids OpenMP barriers stalling on a busy core.
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)
