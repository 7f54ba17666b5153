"""SCL under every precision Lightning offers, side by side in one run: final global sparsity and
validation accuracy of the same digits run (seeded) in each precision, with the fused and the
foreach SGD, for ``SCLModule`` and the drop-in callback.

``16-mixed`` is simulated on the CPU as CUDA runs it: fp16 autocast and a ``GradScaler``
(``MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))``). The table
is what ``tests/callbacks/test_precision.py`` checks with tolerances; this prints the figures.

    PYTHONPATH=src python bench/precision.py [--epochs 3] [--lam 1e-4] [--precisions ...]
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings


def run(face: str, fused: bool, precision: str, epochs: int, lam: float) -> dict[str, float]:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.plugins import MixedPrecision
    from torch import nn

    from scl_lightning import SCLModule, global_sparsity
    from scl_lightning.callbacks import SparseConnectivityLearning
    from scl_lightning.data import DigitsDataModule

    class PlainMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            acc = (self(batch[0]).argmax(1) == batch[1]).float().mean()
            self.log("val/acc", acc)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(
                self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=fused
            )

    pl.seed_everything(0, verbose=False)
    callbacks = []
    module: pl.LightningModule
    if face == "SCLModule":
        optimizer = (
            None
            if fused
            else functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
        )
        module = SCLModule(
            "lenet_300_100",
            input_shape=(1, 8, 8),
            backbone_kwargs={"hidden": [32]},
            lam=lam,
            mask_lr=0.05,
            optimizer=optimizer,
        )
    else:
        module = PlainMLP()
        callbacks.append(SparseConnectivityLearning(lam=lam, mask_lr=0.05, flops=False))
    kwargs: dict = {"precision": precision}
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu")
        kwargs = {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=scaler)]}
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DigitsDataModule())
    masks = [p for n, p in module.named_parameters() if n.endswith("mask")]
    return {
        "sparsity": global_sparsity(module),
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "mask_dtype": str(masks[0].dtype).replace("torch.", ""),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lam", type=float, default=1e-4)
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"],
    )
    args = parser.parse_args()
    rows = []
    for face in ("SCLModule", "drop-in"):
        for fused in (True, False):
            reference = None
            for precision in args.precisions:
                r = run(face, fused, precision, args.epochs, args.lam)
                if reference is None:
                    reference = r["sparsity"]
                rows.append((face, "fused" if fused else "foreach", precision, r, reference))
                print(f"{face} {precision} fused={fused}: {r}", flush=True)
    print(
        "\n| face | SGD | precision | global sparsity | minus the first precision's "
        "| val acc | mask dtype |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for face, sgd, precision, r, reference in rows:
        print(
            f"| {face} | {sgd} | `{precision}` | {r['sparsity']:.4f} | "
            f"{r['sparsity'] - reference:+.4f} | {r['val_acc']:.4f} | {r['mask_dtype']} |"
        )


if __name__ == "__main__":
    main()
