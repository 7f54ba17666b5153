"""The drop-in engine's per-step hook alone (penalty gradient, normalization, phases) on the
CIFAR-shape MLP's masks, for the source tree on ``PYTHONPATH``: a helper for before/after
comparisons (not run by ``make bench``), e.g. against the tree before issue 11:

    git worktree add /tmp/before c1fbe45
    for r in 1 2 3; do for t in /tmp/before src; do
      PYTHONPATH=$t/src python bench/_engine_hook.py $t; done; done

(use ``PYTHONPATH=src`` for this tree). Prints the median time of
``SparseConnectivityLearning.on_before_optimizer_step`` over 350 calls with fresh gradients.
"""

import statistics
import sys
import time

import torch
from torch import nn

from scl_lightning.callbacks import SparseConnectivityLearning
from scl_lightning.nn import masked_modules, sparsify

try:
    from scl_lightning.callbacks.mask_group import attach_mask_group
except ImportError:
    from scl_lightning.training import attach_mask_group


class _Trainer:
    """The Trainer, as far as the hook reads it."""

    current_epoch = 0
    precision_plugin = None


def main() -> None:
    torch.manual_seed(0)
    net = sparsify(
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(3072, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )
    )
    engine = SparseConnectivityLearning(lam=2e-5)
    layers = [layer for _, layer in masked_modules(net)]
    engine._layers = {id(layer.mask): layer for layer in layers}
    engine._total = sum(layer.mask.numel() for layer in layers)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    attach_mask_group(optimizer, [layer.mask for layer in layers], 0.01)
    grads = [torch.randn_like(layer.mask) for layer in layers]
    times = []
    for _ in range(400):
        for layer, grad in zip(layers, grads, strict=True):
            layer.mask.grad = grad.clone()
        start = time.perf_counter()
        engine.on_before_optimizer_step(_Trainer(), net, optimizer)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    label = sys.argv[1] if len(sys.argv) > 1 else "this tree"
    print(f"{label}: {statistics.median(times[50:]) * 1e3:.3f} ms per step")


if __name__ == "__main__":
    main()
