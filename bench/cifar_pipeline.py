"""Input-pipeline throughput for CIFAR training, ours against the classic per-image pipeline.

Side by side in one run, on synthetic CIFAR-shaped data (50,000 x 3 x 32 x 32 ``uint8``, nothing
downloaded), images per second of training batches of 128 with the standard augmentation
(4-pixel zero pad + random 32x32 crop, random horizontal flip, per-channel normalization):

- **ours**: the dataset in memory as one ``uint8`` tensor, ``InMemoryImageDataset.__getitems__``
  returning whole batches (pass-through ``collate_fn``), then ``BatchAugment`` on the batch, on
  the GPU when there is one (after the ``uint8`` copy) and on the CPU otherwise;
- **classic**: a ``Dataset.__getitem__`` that pads, crops, flips and normalizes one image with
  tensor ops, batched by the DataLoader's default collate, with 0 and with 2 worker processes.

Each repetition runs every configuration once (interleaved, so background load hits all alike),
after one warm-up repetition; a pass reads ``--images`` images and the table shows the median over
``--reps`` repetitions. Batches are moved to the augmentation device in every configuration.

    PYTHONPATH=src python bench/cifar_pipeline.py [--images 12800] [--reps 5] [--device auto]
        [--threads 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import pick_device
from torch.utils.data import DataLoader, Dataset

from scl_lightning.data.cifar import (
    CIFAR10DataModule,
    EpochShuffleSampler,
    InMemoryImageDataset,
    _keep_batch,
)
from scl_lightning.data.transforms import BatchAugment

MEAN = CIFAR10DataModule.MEAN
STD = CIFAR10DataModule.STD
BATCH = 128


class PerImageDataset(Dataset):
    """The classic pipeline: one image at a time, augmented in ``__getitem__``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 4) -> None:
        self.images, self.labels, self.padding = images, labels, padding
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.padding
        img = F.pad(self.images[i], (p, p, p, p))
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = img[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        img = (img.float() / 255 - self.mean) / self.std
        return img, self.labels[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_pass(
    loader: DataLoader,
    step: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    images: int,
) -> float:
    """Images per second of one pass over ``images`` images (a fresh iterator, so a new order)."""
    batches = max(1, images // BATCH)
    _sync(device)
    start = time.perf_counter()
    seen = 0
    for i, (x, y) in enumerate(loader):
        x = step(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        seen += len(y)
        if i + 1 == batches:
            break
    _sync(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12800, help="images per timed pass")
    parser.add_argument("--reps", type=int, default=5, help="timed passes per configuration")
    parser.add_argument("--device", default="auto", help="augmentation device: auto, cpu, cuda")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    device = pick_device(args.device, args.threads)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (50_000,), generator=g)
    torch.manual_seed(0)

    ours_ds = InMemoryImageDataset(images, labels)
    ours_loader = DataLoader(
        ours_ds,
        batch_size=BATCH,
        sampler=EpochShuffleSampler(ours_ds, seed=0),
        collate_fn=_keep_batch,
        pin_memory=device.type == "cuda",
    )
    augment = BatchAugment(MEAN, STD, crop_padding=4, flip=True).to(device)
    aug_gen = torch.Generator(device=device).manual_seed(0)

    def ours_step(x: torch.Tensor) -> torch.Tensor:
        return augment(x, generator=aug_gen)

    classic_ds = PerImageDataset(images, labels)

    def classic(workers: int) -> DataLoader:
        return DataLoader(
            classic_ds,
            batch_size=BATCH,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )

    cpu = torch.device("cpu")
    configs: list[tuple[str, DataLoader, Callable[[torch.Tensor], torch.Tensor], torch.device]]
    configs = [
        (
            f"ours: uint8 in memory + __getitems__ + batched aug on {device.type}, 0 workers",
            ours_loader,
            ours_step,
            device,
        )
    ]
    if device.type != "cpu":
        cpu_aug = BatchAugment(MEAN, STD, crop_padding=4, flip=True)
        cpu_gen = torch.Generator().manual_seed(0)
        configs.append(
            (
                "ours: same, batched aug on cpu, 0 workers",
                ours_loader,
                lambda x: cpu_aug(x, generator=cpu_gen),
                cpu,
            )
        )
    for workers in (0, 2):
        configs.append(
            (
                f"classic: per-image __getitem__ + default collate, {workers} workers",
                classic(workers),
                lambda x: x,
                device,
            )
        )

    # Interleaved: every repetition runs each configuration once, so a change in the machine's
    # background load affects all of them alike. Repetition 0 is the warm-up (worker start-up).
    rates: list[list[float]] = [[] for _ in configs]
    for rep in range(args.reps + 1):
        for k, (_, loader, step, dev) in enumerate(configs):
            rate = one_pass(loader, step, dev, args.images)
            if rep:
                rates[k].append(rate)
    rows = [(name, r) for (name, *_), r in zip(configs, rates, strict=True)]

    reference = statistics.median(rows[-2][1])  # classic, 0 workers
    classic2 = statistics.median(rows[-1][1])
    cpus = os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{cpus} CPUs, torch threads {torch.get_num_threads()}, GPU {gpu}"
    )
    print(f"{args.images} images per pass, median of {args.reps} passes after 1 warm-up\n")
    header = f"{'pipeline':<76} {'images/s':>10} {'vs classic 0w':>14} {'vs classic 2w':>14}"
    print(header)
    print("-" * len(header))
    results = []
    for name, rates in rows:
        med = statistics.median(rates)
        print(f"{name:<76} {med:>10,.0f} {med / reference:>13.1f}x {med / classic2:>13.1f}x")
        results.append({"pipeline": name, "images_per_s": med, "all": rates})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "gpu": gpu, "cpus": cpus, "rows": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
