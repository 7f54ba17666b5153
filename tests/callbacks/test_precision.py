"""The SCL engine under every precision Lightning offers, on CPU.

``16-mixed`` is what CUDA runs get: fp16 autocast and a ``GradScaler``. Lightning unscales the
gradients before ``on_before_optimizer_step`` only for optimizers that do not unscale inside
``step()``; fused ones (the project's default SGD) divide by the scale in their kernel. Before
the engine unscaled them itself, the normalized mask gradients were then divided by the scale
(65536) and the masks stood still: 0.000 sparsity against the fp32 run's.

Tolerances on the final global sparsity, against the same run in fp32 (3 epochs of digits):

* ``64-true``: 0.01. Only rounding differs, and it is finer than fp32's.
* ``16-mixed``, ``bf16-mixed``: 0.02. The forward pass runs in 16 bits (fp16: 11 significant
  bits, bf16: 8), so task gradients differ by ~1e-3 to 1e-2 relative, and masks that end within
  one step of zero may land on the other side; measured differences are below 0.005.
* ``bf16-true``: 0.06. The weights themselves are stored and updated in bfloat16, so weight
  updates below 2**-8 of a weight round away and the network trained is a different one; the
  masks are kept in float32 (they move). Measured on the drop-in with the user's fused SGD:
  0.5883 against 0.6372 (torch's fused SGD trains bfloat16 weights much worse: 0.79 validation
  accuracy against 0.94; SCLModule's default SGD is therefore not fused on 16-bit weights), and
  within 0.001 with the foreach SGD (docs/BENCHMARKS.md, "Precision").
"""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from scl_lightning import SCLModule, global_sparsity
from scl_lightning.callbacks import SparseConnectivityLearning
from scl_lightning.callbacks._precision import unscale_gradients
from scl_lightning.data import DigitsDataModule

TOLERANCE = {"16-mixed": 0.02, "bf16-mixed": 0.02, "bf16-true": 0.06, "64-true": 0.01}
LAM, MASK_LR, EPOCHS = 1e-4, 0.05, 3


class PlainMLP(LightningModule):
    """Someone else's module: SCL comes from the drop-in callback."""

    def __init__(self, fused: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.fused = fused

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=self.fused
        )


def _precision_kwargs(precision: str) -> dict:
    if precision == "16-mixed":
        # what CUDA gives: autocast to fp16 and a GradScaler (CPU autocast has no scaler)
        scaler = torch.amp.GradScaler("cpu")
        return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=scaler)]}
    return {"precision": precision}


@functools.cache
def _fit(face: str, fused: bool, precision: str) -> tuple[float, bool, torch.dtype]:
    """(global sparsity, whether every layer's masks moved, mask dtype) after the run."""
    seed_everything(0)
    if face == "module":
        optimizer = (
            None  # SCLModule's default: SGD(fused=True) where torch has fused kernels
            if fused
            else functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
        )
        module = SCLModule(
            "lenet_300_100",
            input_shape=(1, 8, 8),
            backbone_kwargs={"hidden": [32]},
            lam=LAM,
            mask_lr=MASK_LR,
            optimizer=optimizer,
        )
        callbacks = []
    else:
        module = PlainMLP(fused)
        callbacks = [SparseConnectivityLearning(lam=LAM, mask_lr=MASK_LR, flops=False)]
    trainer = Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        **_precision_kwargs(precision),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DigitsDataModule())
    masks = [m for n, m in module.named_parameters() if n.endswith("mask")]
    if face == "module":
        # the default SGD is fused, except on 16-bit weights (bf16-true), where torch's fused
        # kernel trains much worse (bench/precision.py)
        expect_fused = fused and precision != "bf16-true"
        assert trainer.optimizers[0].defaults.get("fused") is (True if expect_fused else None)
    moved = all(not torch.all(m == 1.0) for m in masks)
    return global_sparsity(module), moved, masks[0].dtype


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("face", ["module", "drop_in"])
def test_16_mixed_with_grad_scaler_prunes_like_fp32(face, fused):
    reference, _, _ = _fit(face, fused, "32-true")
    sparsity, moved, dtype = _fit(face, fused, "16-mixed")
    assert moved, "masks must move under 16-mixed"
    assert reference > 0.3
    assert sparsity == pytest.approx(reference, abs=TOLERANCE["16-mixed"])
    assert dtype == torch.float32


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
@pytest.mark.parametrize("face", ["module", "drop_in"])
def test_every_precision_prunes_like_fp32(face, precision):
    reference, _, _ = _fit(face, True, "32-true")
    sparsity, moved, dtype = _fit(face, True, precision)
    assert moved, f"masks must move under {precision}"
    assert sparsity == pytest.approx(reference, abs=TOLERANCE[precision])
    # never below float32 (bf16-true converts the module, masks excepted); 64-true is float64
    assert dtype == (torch.float64 if precision == "64-true" else torch.float32)


def test_masks_stay_float32_when_the_module_is_converted():
    from scl_lightning.nn import sparsify

    net = sparsify(nn.Sequential(nn.Linear(4, 3)))
    with torch.no_grad():
        net[0].mask[0, 0] = 0.123456789
    net.to(torch.bfloat16)
    assert net[0].weight.dtype == torch.bfloat16
    assert net[0].mask.dtype == torch.float32
    assert net[0].mask[0, 0].item() == pytest.approx(0.123456789, rel=1e-7)  # not rounded
    net(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    assert net[0].mask.grad.dtype == torch.float32
    net.double()  # a wider dtype is taken
    assert net[0].mask.dtype == torch.float64


class _Trainer:
    def __init__(self, scaler):
        self.precision_plugin = type("P", (), {"scaler": scaler})()


def test_unscale_gradients_unscales_once_and_the_fused_step_does_not_divide_again():
    p = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=1.0, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the loss's scaling, which the backward pass would follow
    p.grad = torch.full((3,), 1024.0 * 0.5)  # a scaled gradient of 0.5
    trainer = _Trainer(scaler)
    unscale_gradients(trainer, optimizer)
    assert torch.equal(p.grad, torch.full((3,), 0.5))
    unscale_gradients(trainer, optimizer)  # a second call is a no-op, not an error
    assert torch.equal(p.grad, torch.full((3,), 0.5))
    scaler.step(optimizer)
    assert torch.equal(p.detach(), torch.full((3,), 0.5))  # 1 - 1.0 * 0.5: not divided again
    scaler.update()


def test_unscale_gradients_without_a_scaler_is_a_no_op():
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    unscale_gradients(_Trainer(None), torch.optim.SGD([p], lr=1.0))
    unscale_gradients(object(), torch.optim.SGD([p], lr=1.0))
    assert torch.equal(p.grad, torch.full((2,), 3.0))
