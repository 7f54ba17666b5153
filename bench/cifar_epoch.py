"""One training epoch of CIFAR-10 ResNet-56, SCL versus dense, side by side in one run.

Synthetic data of CIFAR's shape (uint8 3x32x32 in memory, augmented per batch on the model's
device by the same transforms the CIFAR DataModule uses), so no download is needed. Prints
images per second for the dense network and for SCL (masked layers, penalty,
MaskGradientNormalization, SparsityMonitor at its default interval) and their ratio.

    python bench/cifar_epoch.py                       # CUDA when present, bf16-mixed there
    python bench/cifar_epoch.py --images 2048 --batch-size 64     # a CPU check
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from scl_lightning import SCLModule
from scl_lightning.callbacks import MaskGradientNormalization, SparsityMonitor
from scl_lightning.data.transforms import BatchAugment


class SyntheticCIFAR(pl.LightningDataModule):
    def __init__(self, images: int, batch_size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, 10, (images,), generator=g)
        self.batch_size = batch_size
        self.augment = BatchAugment(
            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_padding=4
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True, drop_last=True
        )

    def on_after_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.augment.to(x.device).train(True)
        return self.augment(x), y


class Timer(pl.Callback):
    """Times the epoch from its ``skip``-th batch on (the first batches pay one-time costs:
    cuDNN autotuning, the SparsityMonitor's single FLOPs trace, allocator warm-up)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == self.skip:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
            self.timed_batches = trainer.num_training_batches - self.skip

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def epoch_images_per_second(scl: bool, args: argparse.Namespace) -> float:
    pl.seed_everything(0, verbose=False)
    module = SCLModule(
        "resnet56",
        num_classes=10,
        input_shape=(3, 32, 32),
        sparsify=scl,
        lam=5e-5,
        constant_lr=True,
    )
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    timer = Timer(args.skip)
    callbacks: list[pl.Callback] = [timer]
    if scl:
        callbacks += [MaskGradientNormalization(), SparsityMonitor()]
    cuda = torch.cuda.is_available()
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=args.precision or ("bf16-mixed" if cuda else "32-true"),
        callbacks=callbacks,
    )
    data = SyntheticCIFAR(args.images, args.batch_size)
    trainer.fit(module, datamodule=data)
    return timer.timed_batches * args.batch_size / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=None, help="default: 50,000 (one epoch) on CUDA, 1,280 on CPU"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, else 32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--skip", type=int, default=5, help="untimed warm-up batches")
    args = parser.parse_args()
    if args.images is None:
        args.images = 50_000 if torch.cuda.is_available() else 1_280
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    dense = epoch_images_per_second(False, args)
    scl = epoch_images_per_second(True, args)
    print(f"ResNet-56, {args.images} synthetic CIFAR images, batch {args.batch_size}, {device}")
    print(f"{'variant':<8} {'images/s':>10}")
    print(f"{'dense':<8} {dense:>10,.0f}")
    print(f"{'SCL':<8} {scl:>10,.0f}")
    print(f"SCL/dense throughput ratio: {scl / dense:.3f}")


if __name__ == "__main__":
    main()
