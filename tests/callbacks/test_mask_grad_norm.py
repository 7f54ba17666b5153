import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn

from _helpers import TinyClassifier, quiet_trainer
from scl_lightning import masked_modules, sparsify
from scl_lightning.callbacks import MaskGradientNormalization

LR = 0.1


def _sparse_model() -> TinyClassifier:
    torch.manual_seed(0)
    model = TinyClassifier(lr=LR)
    sparsify(model.net)
    return model


_trainer = quiet_trainer


def _masks(module: nn.Module) -> list[nn.Parameter]:
    return [layer.mask for _, layer in masked_modules(module)]


def _hand_normalized(grad: torch.Tensor, mode: str, eps: float = 1e-12) -> torch.Tensor:
    if mode == "none":
        return grad
    flat = grad.reshape(grad.shape[0], -1).double()
    if mode == "rms":
        scale = flat.pow(2).mean(dim=1).sqrt()
    elif mode == "l2":
        scale = flat.pow(2).sum(dim=1).sqrt()
    else:
        scale = flat.abs().max(dim=1).values
    return (flat / (scale + eps)[:, None]).reshape(grad.shape).to(grad.dtype)


def _rms_per_feature(grad: torch.Tensor) -> torch.Tensor:
    return grad.reshape(grad.shape[0], -1).float().pow(2).mean(dim=1).sqrt()


class MaskGradCapture(Callback):
    """Records the mask gradients (and masks) whenever an optimizer step is about to happen."""

    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []
        self.masks: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([m.grad.detach().clone() for m in _masks(pl_module)])
        self.masks.append([m.detach().clone() for m in _masks(pl_module)])


class MasksAfterStep(Callback):
    def __init__(self):
        self.masks: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.masks.append([m.detach().clone() for m in _masks(pl_module)])


class CountingNormalization(MaskGradientNormalization):
    calls = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls += 1
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


# -- inside a Trainer -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rms", "l2", "max", "none"])
def test_normalizes_mask_grads_before_the_step(tmp_path, mode):
    model = _sparse_model()
    raw, normalized, after = MaskGradCapture(), MaskGradCapture(), MasksAfterStep()
    callbacks = [raw, MaskGradientNormalization(mode), normalized, after]
    _trainer(tmp_path, callbacks=callbacks).fit(model)

    assert len(raw.grads) == len(normalized.grads) == 3
    for step_raw, step_norm in zip(raw.grads, normalized.grads, strict=True):
        for g_raw, g_norm in zip(step_raw, step_norm, strict=True):
            assert g_raw.abs().sum() > 0
            torch.testing.assert_close(g_norm, _hand_normalized(g_raw, mode))
            if mode == "rms":
                live = _rms_per_feature(g_raw) > 0
                rms = _rms_per_feature(g_norm)
                torch.testing.assert_close(rms[live], torch.ones_like(rms[live]))
                assert torch.all(rms[~live] == 0)
    # the optimizer stepped with the normalized gradient (plain SGD)
    for before, grads, stepped in zip(normalized.masks, normalized.grads, after.masks, strict=True):
        for m0, g, m1 in zip(before, grads, stepped, strict=True):
            torch.testing.assert_close(m1, m0 - LR * g)


def test_weight_grads_are_left_alone(tmp_path):
    class WeightGradCapture(Callback):
        def __init__(self):
            self.grads = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append(pl_module.net[1].raw_weight.grad.clone())

    model = _sparse_model()
    before, after = WeightGradCapture(), WeightGradCapture()
    _trainer(tmp_path, callbacks=[before, MaskGradientNormalization(), after]).fit(model)
    for g0, g1 in zip(before.grads, after.grads, strict=True):
        assert torch.equal(g0, g1)


def test_finds_layers_masked_by_a_later_callback_setup(tmp_path):
    class SparsifyInSetup(Callback):
        def setup(self, trainer, pl_module, stage):
            sparsify(pl_module.net)

    torch.manual_seed(0)
    model = TinyClassifier(lr=LR)
    normalized = MaskGradCapture()
    callbacks = [MaskGradientNormalization(), SparsifyInSetup(), normalized]
    _trainer(tmp_path, callbacks=callbacks).fit(model)
    for grad in normalized.grads[0]:
        live = _rms_per_feature(grad) > 0
        torch.testing.assert_close(_rms_per_feature(grad)[live], torch.ones(int(live.sum())))


def test_gradient_accumulation_normalizes_the_accumulated_gradient(tmp_path):
    class MicroBatchGrads(Callback):
        """Each micro-batch's mask gradient, computed independently on a copy of the network
        (Lightning scales each micro-batch loss by 1 / accumulate_grad_batches)."""

        def __init__(self):
            self.grads: list[list[torch.Tensor]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            net = copy.deepcopy(pl_module.net)
            x, y = batch
            (F.cross_entropy(net(x), y) / trainer.accumulate_grad_batches).backward()
            self.grads.append([m.grad.clone() for m in _masks(net)])

    model = _sparse_model()
    micro, raw, normalized = MicroBatchGrads(), MaskGradCapture(), MaskGradCapture()
    norm = CountingNormalization()
    trainer = _trainer(
        tmp_path,
        limit_train_batches=4,
        accumulate_grad_batches=2,
        callbacks=[micro, raw, norm, normalized],
    )
    trainer.fit(model)

    assert trainer.global_step == 2
    assert norm.calls == 2, "once per optimizer step, not once per micro-batch"
    assert len(micro.grads) == 4
    assert len(raw.grads) == 2
    for step in range(2):
        first, second = micro.grads[2 * step], micro.grads[2 * step + 1]
        for g1, g2, g_raw, g_norm in zip(
            first, second, raw.grads[step], normalized.grads[step], strict=True
        ):
            torch.testing.assert_close(g_raw, g1 + g2)
            torch.testing.assert_close(g_norm, _hand_normalized(g1 + g2, "rms"))
            # normalizing each micro-batch and summing would be a different gradient
            per_micro = _hand_normalized(g1, "rms") + _hand_normalized(g2, "rms")
            assert not torch.allclose(g_norm, per_micro)


def test_bf16_mixed_precision(tmp_path):
    model = _sparse_model()
    dtypes = []
    model.net[1].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    raw, normalized = MaskGradCapture(), MaskGradCapture()
    trainer = _trainer(
        tmp_path,
        precision="bf16-mixed",
        callbacks=[raw, MaskGradientNormalization(), normalized],
    )
    trainer.fit(model)
    assert set(dtypes) == {torch.bfloat16}  # the masked layers did run under autocast
    assert len(normalized.grads) == 3
    for step_raw, step_norm in zip(raw.grads, normalized.grads, strict=True):
        for g_raw, g_norm in zip(step_raw, step_norm, strict=True):
            assert torch.isfinite(g_norm).all()
            live = _rms_per_feature(g_raw) > 0
            assert live.any()
            rms = _rms_per_feature(g_norm)
            torch.testing.assert_close(rms[live], torch.ones_like(rms[live]), rtol=1e-3, atol=1e-3)


# -- the hook called directly ---------------------------------------------------------------------

LAYERS = {
    "linear": lambda: nn.Linear(6, 4),
    "conv1d": lambda: nn.Conv1d(3, 4, 3),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "conv3d": lambda: nn.Conv3d(2, 4, 2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, groups=4),
}


@pytest.mark.parametrize("mode", ["rms", "l2", "max"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hook_per_feature(layer, mode, dtype):
    torch.manual_seed(0)
    net = sparsify(nn.Sequential(LAYERS[layer]()))
    mask = net[0].mask
    mask.data = mask.data.to(dtype)  # `.to(torch.bfloat16)` would keep masks in float32
    # feature scales spread over nine orders of magnitude, one feature with no gradient
    scales = torch.tensor([1e-6, 0.0, 1.0, 1e3]).view(-1, *([1] * (mask.dim() - 1)))
    grad = (torch.randn(mask.shape) * scales).to(dtype)
    mask.grad = grad.clone()
    callback = MaskGradientNormalization(mode)
    callback.on_before_optimizer_step(None, net, None)
    assert mask.grad.dtype == dtype
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(mask.grad, _hand_normalized(grad, mode), **tol)
    assert torch.all(mask.grad[1] == 0)
    flat = mask.grad.reshape(4, -1).double()
    scale = {
        "rms": flat.pow(2).mean(1).sqrt(),
        "l2": flat.norm(dim=1),
        "max": flat.abs().amax(1),
    }[mode]
    # eps (1e-12) against a scale of 1e-6 leaves 1e-6 of relative error
    tol = tol or {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(scale[[0, 2, 3]], torch.ones(3, dtype=torch.float64), **tol)


def test_hook_skips_masks_without_grad_and_mode_none_is_a_no_op():
    net = sparsify(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))
    net[1].mask.grad = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    MaskGradientNormalization("l2").on_before_optimizer_step(None, net, None)
    assert net[0].mask.grad is None
    torch.testing.assert_close(net[1].mask.grad, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    MaskGradientNormalization("none").on_before_optimizer_step(None, net, None)
    torch.testing.assert_close(net[1].mask.grad, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_eps():
    net = sparsify(nn.Sequential(nn.Linear(2, 1)))
    net[0].mask.grad = torch.tensor([[3.0, 4.0]])
    MaskGradientNormalization("l2", eps=5.0).on_before_optimizer_step(None, net, None)
    torch.testing.assert_close(net[0].mask.grad, torch.tensor([[0.3, 0.4]]))


# -- arguments and warnings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "foo"}, r"unknown normalization mode 'foo'; choose one of: rms, l2, max, none"),
        ({"mode": "RMS"}, r"unknown normalization mode 'RMS'"),
        ({"mode": None}, r"unknown normalization mode None"),
        ({"eps": -1.0}, r"eps must be a number >= 0, got -1.0"),
        ({"eps": float("nan")}, r"eps must be a number >= 0, got nan"),
        ({"eps": True}, r"eps must be a number >= 0, got True"),
        ({"eps": "0"}, r"eps must be a number >= 0, got '0'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskGradientNormalization(**kwargs)


def test_repr():
    assert repr(MaskGradientNormalization("max", eps=0)) == (
        "MaskGradientNormalization(mode='max', eps=0.0)"
    )


def test_warns_when_the_module_has_no_masked_layer(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[MaskGradientNormalization()])
    with pytest.warns(UserWarning, match="TinyClassifier has no masked layer"):
        trainer.fit(TinyClassifier(lr=LR))
