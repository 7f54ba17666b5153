import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _helpers import quiet_trainer
from scl_lightning import SCLModule
from scl_lightning.callbacks import MaskGradientNormalization
from scl_lightning.experiment.non_finite import (
    NonFiniteError,
    StopOnNonFinite,
    finite_flag,
    non_finite_kind,
)

NAN, INF = float("nan"), float("inf")


def _loader(n: int = 64, batch_size: int = 8, shape: tuple[int, ...] = (1, 8, 8)) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class TinyClassifier(LightningModule):
    """BoringModel-style classifier whose loss turns nan at global step ``nan_step``."""

    def __init__(self, nan_step: int | None = None, batchnorm: bool = False) -> None:
        super().__init__()
        norm: list[nn.Module] = [nn.BatchNorm1d(16)] if batchnorm else []
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), *norm, nn.ReLU(), nn.Linear(16, 10)
        )
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.global_step == self.nan_step:
            loss = loss * NAN
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Snapshots(Callback):
    """The module's parameters after every optimizer step (``after[s]``: after ``s`` steps)."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = _params(pl_module)


class InjectGrad(Callback):
    """Writes ``value`` into one entry of a parameter's gradient at global step ``step``."""

    def __init__(self, param: str, step: int, value: float = INF) -> None:
        self.param, self.step, self.value = param, step, value

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            grad = dict(pl_module.named_parameters())[self.param].grad
            grad.view(-1)[0] = self.value


class SetLr(Callback):
    """Sets every learning rate to ``lr`` before global step ``step`` (a broken schedule)."""

    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _scl_module() -> SCLModule:
    torch.manual_seed(0)
    return SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=1e-4)


# --- the functional core ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ([torch.ones(3), torch.zeros(2, 2)], True),
        ([torch.ones(3), torch.tensor([1.0, NAN])], False),
        ([torch.tensor([-INF, 0.0])], False),
        ([torch.tensor(INF)], False),  # a 0-dim loss
        ([torch.full((4,), 1e30)], True),  # a 2-norm would overflow here; max |x| does not
        ([torch.full((4,), 6e4, dtype=torch.float16), torch.ones(2, dtype=torch.float64)], True),
        ([torch.ones(2, dtype=torch.float64), torch.tensor([INF], dtype=torch.bfloat16)], False),
        ([torch.tensor([1.0, NAN]).to_sparse()], False),
    ],
)
def test_finite_flag(tensors, expected):
    flag = finite_flag(tensors)
    assert flag is not None and flag.dtype == torch.bool and flag.dim() == 0
    assert bool(flag) is expected


def test_finite_flag_nothing_to_check():
    assert finite_flag([]) is None
    assert finite_flag([torch.arange(3), torch.empty(0)]) is None


def test_finite_flag_without_foreach(monkeypatch):
    def unavailable(*args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(torch, "_foreach_norm", unavailable)
    assert bool(finite_flag([torch.ones(2), torch.ones(3)]))
    assert not bool(finite_flag([torch.ones(2), torch.tensor([NAN])]))


@pytest.mark.parametrize(
    ("values", "kind"),
    [([1.0, 2.0], None), ([1.0, NAN], "nan"), ([INF, 1.0], "inf"), ([-INF, NAN], "nan and inf")],
)
def test_non_finite_kind(values, kind):
    assert non_finite_kind(torch.tensor(values)) == kind


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_check_gradients_must_be_bool(bad):
    with pytest.raises(ValueError, match=rf"check_gradients must be True or False, got {bad!r}"):
        StopOnNonFinite(check_gradients=bad)


def test_repr():
    assert repr(StopOnNonFinite(False)) == "StopOnNonFinite(check_gradients=False)"


# --- a nan loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("check_gradients", [True, False])
def test_nan_loss_stops_before_the_step(tmp_path, check_gradients):
    torch.manual_seed(0)
    module, snaps = TinyClassifier(nan_step=3), Snapshots()
    trainer = quiet_trainer(
        tmp_path, limit_train_batches=6, callbacks=[snaps, StopOnNonFinite(check_gradients)]
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(module, _loader())
    message = str(info.value)
    assert message.startswith(
        "non-finite training loss (nan) at global step 3 (epoch 0, batch 3): the run stopped "
        "before the optimizer step, so the weights are still those of global step 3"
    )
    assert "\n" not in message
    assert trainer.global_step == 3 and trainer.interrupted
    # the weights are those after the 3rd step, not touched by the nan
    _assert_same(_params(module), snaps.after[3])
    assert not torch.equal(snaps.after[2]["net.1.weight"], snaps.after[3]["net.1.weight"])


def test_nan_loss_names_the_micro_batch_with_accumulation(tmp_path):
    class NanAtBatch(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * NAN if batch_idx == 5 else loss

    trainer = quiet_trainer(
        tmp_path, limit_train_batches=8, accumulate_grad_batches=2, callbacks=[StopOnNonFinite()]
    )
    with pytest.raises(NonFiniteError, match=r"loss \(nan\) at global step 2 \(epoch 0, batch 5\)"):
        trainer.fit(NanAtBatch(), _loader())


def test_normal_run_is_bit_identical(tmp_path):
    """The check only reads: the same seeded run with and without it ends with equal weights."""
    results = []
    for callbacks in ([], [StopOnNonFinite()]):
        module = _scl_module()
        before = _params(module)
        trainer = quiet_trainer(
            tmp_path,
            limit_train_batches=4,
            callbacks=[MaskGradientNormalization(), *callbacks],
        )
        trainer.fit(module, _loader())
        assert trainer.global_step == 4
        results.append(_params(module))
    _assert_same(results[0], results[1])
    # and training did move weights and masks (the equality is not the trivial one)
    assert not torch.equal(before["model.layers.1.weight"], results[1]["model.layers.1.weight"])
    assert not torch.equal(before["model.layers.1.mask"], results[1]["model.layers.1.mask"])


# --- a non-finite mask gradient ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inject_first", "kind"),
    # SCLModule's engine runs the normalization (MaskGradientNormalization stands down), after
    # the Trainer's own callbacks: the check sees the injected inf in either order
    [(False, "inf"), (True, "inf")],
)
def test_inf_mask_gradient_names_the_layer(tmp_path, inject_first, kind):
    module, snaps = _scl_module(), Snapshots()
    inject = InjectGrad("model.layers.3.mask", step=2)
    normalize = MaskGradientNormalization()
    order = [inject, normalize] if inject_first else [normalize, inject]
    trainer = quiet_trainer(
        tmp_path, limit_train_batches=5, callbacks=[snaps, *order, StopOnNonFinite()]
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(module, _loader())
    assert str(info.value).startswith(
        f"non-finite gradient ({kind}) in the mask of layer model.layers.3 at global step 2 "
        "(epoch 0, batch 2): the run stopped before the optimizer step"
    )
    assert "layers.1" not in str(info.value) and "layers.5" not in str(info.value)
    _assert_same(_params(module), snaps.after[2])


def test_many_bad_gradients_are_counted(tmp_path):
    class InfEverywhere(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                for p in pl_module.parameters():
                    p.grad.fill_(NAN)

    trainer = quiet_trainer(tmp_path, callbacks=[InfEverywhere(), StopOnNonFinite()])
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(_scl_module(), _loader())
    assert str(info.value).startswith(
        "non-finite gradients (nan) in 9 of 9 parameters: the weight of layer model.layers.1, "
        "the bias of layer model.layers.1, the mask of layer model.layers.1 and 6 more at global "
        "step 1 (epoch 0, batch 1)"
    )


def test_gradient_window_with_accumulation(tmp_path):
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=8,
        accumulate_grad_batches=2,
        callbacks=[InjectGrad("net.3.bias", step=1), StopOnNonFinite()],
    )
    with pytest.raises(
        NonFiniteError,
        match=r"^non-finite gradient \(inf\) in the bias of layer net.3 at global step 1 "
        r"\(epoch 0, batches 2-3\)",
    ):
        trainer.fit(TinyClassifier(), _loader())


def test_check_gradients_false_checks_the_loss_only(tmp_path):
    module = TinyClassifier()
    inject = InjectGrad("net.1.weight", step=1)
    trainer = quiet_trainer(tmp_path, callbacks=[inject, StopOnNonFinite(check_gradients=False)])
    # not stopped at step 1: the inf goes into the weights, and the next loss is nan
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(module, _loader())
    assert str(info.value).startswith(
        "non-finite weights (inf) in the weight of layer net.1 at global step 2 (epoch 0, "
        "batch 2): the optimizer step before it overflowed (or code outside the step changed "
        "the weights)"
    )
    assert not torch.isfinite(module.net[1].weight).all()


def test_gradients_left_to_the_grad_scaler_under_fp16_amp(tmp_path):
    """With a GradScaler, nan/inf gradients are the scaler's business: it skips the step."""

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * INF

    class InfGradAtStep1(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.net(x)
            if self.global_step == 1:
                out = InfGrad.apply(out)
            return F.cross_entropy(out.float(), y)

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = InfGradAtStep1()
    trainer = quiet_trainer(tmp_path, plugins=[plugin], callbacks=[StopOnNonFinite()])
    trainer.fit(module, _loader())
    assert plugin.scaler.get_scale() < 2.0**16  # the scaler saw the inf and skipped that step
    assert all(torch.isfinite(p).all() for p in module.parameters())


# --- weights that turn non-finite with finite gradients ------------------------------------------


def test_overflowing_step_is_reported_as_non_finite_weights(tmp_path):
    trainer = quiet_trainer(
        tmp_path, limit_train_batches=6, callbacks=[SetLr(step=2, lr=INF), StopOnNonFinite()]
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(TinyClassifier(), _loader())
    message = str(info.value)
    assert message.startswith(
        "non-finite weights (inf) in 4 of 4 parameters: the weight of layer net.1, "
        "the bias of layer net.1, the weight of layer net.3 and 1 more at global step 3 "
        "(epoch 0, batch 3): the optimizer step before it overflowed"
    )


# --- checkpoints ---------------------------------------------------------------------------------


def _ckpt_files(dirpath) -> list[str]:
    return sorted(p.name for p in dirpath.glob("*.ckpt")) if dirpath.exists() else []


def test_last_checkpoint_is_the_last_good_step(tmp_path):
    dirpath = tmp_path / "ckpt"
    module, snaps = TinyClassifier(nan_step=3), Snapshots()
    checkpoint = ModelCheckpoint(
        dirpath=dirpath, save_last=True, every_n_train_steps=1, save_top_k=-1
    )
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=6,
        enable_checkpointing=True,
        callbacks=[snaps, StopOnNonFinite(), checkpoint],
    )
    with pytest.raises(NonFiniteError, match="at global step 3"):
        trainer.fit(module, _loader())
    assert _ckpt_files(dirpath) == [
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
        "epoch=0-step=3.ckpt",
        "last.ckpt",
    ]
    last = torch.load(dirpath / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    _assert_same(last["state_dict"], snaps.after[3])
    _assert_same(last["state_dict"], _params(module))
    for opt_state in last["optimizer_states"][0]["state"].values():
        assert torch.isfinite(opt_state["momentum_buffer"]).all()


def test_checkpoint_on_exception_holds_the_good_weights(tmp_path):
    """ModelCheckpoint(save_on_exception=True) writes the state at the failure: since the step
    was not taken, it is the good state of step 3."""
    dirpath = tmp_path / "ckpt"
    module, snaps = TinyClassifier(nan_step=3), Snapshots()
    checkpoint = ModelCheckpoint(dirpath=dirpath, save_on_exception=True, save_last=True)
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=6,
        enable_checkpointing=True,
        callbacks=[snaps, StopOnNonFinite(), checkpoint],
    )
    with pytest.raises(NonFiniteError, match="loss"):
        trainer.fit(module, _loader())
    assert _ckpt_files(dirpath) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    saved = torch.load(dirpath / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    _assert_same(saved["state_dict"], snaps.after[3])


def test_poisoned_checkpoint_on_exception_is_refused(tmp_path):
    """A nan batch poisons BatchNorm's running statistics in the forward pass: the checkpoint
    Lightning writes on the way out would hold them, so it is refused and nothing is written."""

    class NanInput(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step == 2:
                x = x.clone().fill_(NAN)
            return super().training_step((x, y), batch_idx)

    dirpath = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=dirpath, save_on_exception=True, save_last=True)
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=6,
        enable_checkpointing=True,
        callbacks=[StopOnNonFinite(), checkpoint],
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(NanInput(batchnorm=True), _loader())
    assert str(info.value).startswith(
        "refusing to write a checkpoint at global step 2 (epoch 0): non-finite values (nan) in 2 "
        "of 14 tensors: the running_mean of layer net.2, the running_var of layer net.2; the "
        "checkpoints already on disk are kept as they are"
    )
    # the run's own error comes first in the chain
    assert str(info.value.__context__).startswith("non-finite training loss (nan) at global step 2")
    assert _ckpt_files(dirpath) == []


def test_checkpoint_of_overflowed_weights_is_refused(tmp_path):
    dirpath = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(
        dirpath=dirpath, save_last=True, every_n_train_steps=1, save_top_k=-1
    )
    module, snaps = TinyClassifier(), Snapshots()
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=6,
        enable_checkpointing=True,
        callbacks=[snaps, SetLr(step=2, lr=INF), StopOnNonFinite(), checkpoint],
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(module, _loader())
    message = str(info.value)
    assert message.startswith(
        "refusing to write a checkpoint at global step 3 (epoch 0): non-finite values (inf) in 4 "
        "of 8 tensors: the weight of layer net.1, the bias of layer net.1, the weight of layer "
        "net.3 and 1 more; the checkpoints already on disk are kept as they are"
    )
    assert _ckpt_files(dirpath) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    last = torch.load(dirpath / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    _assert_same(last["state_dict"], snaps.after[2])
    assert all(math.isfinite(float(v.abs().max())) for v in last["state_dict"].values())


def test_checkpoint_of_overflowed_optimizer_state_is_refused(tmp_path):
    """Gradients of 1e30 are finite, but Adam's running square overflows: the weights stay
    finite (the step is m / sqrt(inf) = 0) and would silently stop learning; the checkpoint
    holding that state is refused."""

    class HugeLossAtStep2(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1e30 if self.global_step == 2 else loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    dirpath = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1)
    module = HugeLossAtStep2()
    trainer = quiet_trainer(
        tmp_path,
        limit_train_batches=6,
        enable_checkpointing=True,
        callbacks=[StopOnNonFinite(), checkpoint],
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(module, _loader())
    assert str(info.value).startswith(
        "refusing to write a checkpoint at global step 3 (epoch 0): non-finite values (inf) in 4 "
        "of 16 tensors: the optimizer's exp_avg_sq for the weight of layer net.1, the optimizer's "
        "exp_avg_sq for the bias of layer net.1, the optimizer's exp_avg_sq for the weight of "
        "layer net.3 and 1 more; the checkpoints already on disk are kept as they are"
    )
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert _ckpt_files(dirpath) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert torch.load(dirpath / "last.ckpt", weights_only=True)["global_step"] == 2
