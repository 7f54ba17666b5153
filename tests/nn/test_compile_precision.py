"""Masked layers under torch.compile (no graph breaks), bf16 autocast / bf16-mixed training and
channels_last, on CPU."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from _helpers import quiet_trainer
from scl_lightning import SCLModule, sparsify
from scl_lightning.callbacks import MaskGradientNormalization
from scl_lightning.data import DigitsDataModule
from scl_lightning.models import create_model
from scl_lightning.nn import masked_modules
from scl_lightning.nn.ste import available_stes


def _nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (create_model("lenet_300_100", num_classes=10, input_shape=(1, 8, 8)), (1, 8, 8)),
        "cnn": (create_model("resnet20", num_classes=10, input_shape=(3, 32, 32)), (3, 32, 32)),
    }


@pytest.mark.parametrize("ste", available_stes())
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_no_graph_breaks(name: str, ste: str) -> None:
    net, shape = _nets()[name]
    sparsify(net, ste=ste)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(torch.randn(4, *shape))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _grads(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = net(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("ste", ["identity", "softplus"])
def test_compiled_matches_eager(ste: str) -> None:
    net, shape = _nets()["cnn"]
    sparsify(net, ste=ste)
    with torch.no_grad():  # prune some connections so both H(m) branches are exercised
        for _, layer in masked_modules(net):
            layer.mask.copy_(torch.randn_like(layer.mask))
    x = torch.randn(4, *shape)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    out_e, grads_e = _grads(net, x)
    out_c, grads_c = _grads(compiled, x)
    torch.testing.assert_close(out_c, out_e)
    assert grads_e.keys() == {k.removeprefix("_orig_mod.") for k in grads_c}
    for key, grad in grads_c.items():
        torch.testing.assert_close(grad, grads_e[key.removeprefix("_orig_mod.")], msg=key)
    assert any(k.endswith(".mask") for k in grads_e)


def test_inductor_compiles_a_masked_mlp() -> None:
    """The real CPU backend (C++ codegen) on a small masked MLP, forward and backward."""
    net, shape = _nets()["mlp"]
    sparsify(net)
    x = torch.randn(8, *shape)
    torch._dynamo.reset()
    out_e, grads_e = _grads(net, x)
    out_c, grads_c = _grads(torch.compile(net, fullgraph=True), x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    for key, grad in grads_c.items():
        torch.testing.assert_close(
            grad, grads_e[key.removeprefix("_orig_mod.")], rtol=1e-4, atol=1e-5
        )


def test_bf16_autocast_forward_and_backward() -> None:
    net, shape = _nets()["cnn"]
    sparsify(net)
    x = torch.randn(4, *shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for name, layer in masked_modules(net):
        assert layer.mask.grad is not None and layer.mask.grad.dtype == torch.float32, name
        assert torch.isfinite(layer.mask.grad).all(), name
    reference = net(x)
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


def test_bf16_mixed_training_prunes(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = SCLModule(
        "lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=1e-2, mask_lr=0.5
    )
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=10,
        precision="bf16-mixed",
        callbacks=[MaskGradientNormalization()],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    masks = [layer.mask for _, layer in masked_modules(module.model)]
    assert all(m.dtype == torch.float32 for m in masks)  # master masks stay float32
    assert any(bool((m <= 0).any()) for m in masks)  # and they learned: some are pruned
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_channels_last_matches_contiguous() -> None:
    net, shape = _nets()["cnn"]
    sparsify(net)
    with torch.no_grad():
        for _, layer in masked_modules(net):
            layer.mask.copy_(torch.randn_like(layer.mask))
    x = torch.randn(4, *shape)
    out_ref, grads_ref = _grads(net, x)
    net = net.to(memory_format=torch.channels_last)
    conv_masks = [layer.mask for _, layer in masked_modules(net) if layer.mask.dim() == 4]
    assert conv_masks and all(
        m.is_contiguous(memory_format=torch.channels_last) for m in conv_masks
    )
    out, grads = _grads(net, x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[key], rtol=1e-4, atol=1e-5, msg=key)
    # the gradient normalization works on channels_last gradients too
    from scl_lightning.nn.normalize import normalize_per_feature

    for mask in conv_masks:
        g = torch.randn_like(mask)  # channels_last like the mask
        expected = normalize_per_feature(g.contiguous(), "rms")
        torch.testing.assert_close(normalize_per_feature(g, "rms", inplace=True), expected)
