import csv

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import scl_lightning.nn.flops as flops_module
from _helpers import TinyClassifier, quiet_trainer
from scl_lightning import sparsify
from scl_lightning.callbacks import SparsityMonitor
from scl_lightning.nn.flops import count_flops

# 64 -> 16 -> 10: fvcore counts one multiply-add per weight and sample
DENSE = {"net.1": 64 * 16, "net.3": 16 * 10}
# connections turned off below: 4 of the 16 rows of net.1, 1 of the 10 rows of net.3
PRUNED = {"net.1": 4 * 64, "net.3": 16}
SPARSITY = {"net.1": 0.25, "net.3": 0.1}
EXPECTED = {
    "sparsity/global": sum(PRUNED.values()) / sum(DENSE.values()),
    "sparsity/net.1": 0.25,
    "sparsity/net.3": 0.1,
    "flops/dense": 1184.0,
    "flops/effective": 1024 * 0.75 + 160 * 0.9,
    "flops/ratio": (1024 * 0.75 + 160 * 0.9) / 1184,
    "flops/effective/net.1": 1024 * 0.75,
    "flops/effective/net.3": 160 * 0.9,
}
LAYER_KEYS = {"sparsity/net.1", "sparsity/net.3", "flops/effective/net.1", "flops/effective/net.3"}
FLOP_KEYS = {k for k in EXPECTED if k.startswith("flops/")}


def _pruned_model() -> TinyClassifier:
    model = TinyClassifier(lr=0.0, samples=80)
    sparsify(model.net)
    with torch.no_grad():
        model.net[1].mask[:4] = -1.0
        model.net[3].mask[0] = -1.0
    return model


_trainer = quiet_trainer


def _metrics(trainer: Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}


@pytest.fixture
def flop_calls(monkeypatch):
    """Counts count_flops calls made by the monitor (and records their inputs)."""
    calls = []

    def counting(model, example_input):
        calls.append(example_input)
        return count_flops(model, example_input)

    monkeypatch.setattr(flops_module, "count_flops", counting)
    return calls


class StepSpy(SparsityMonitor):
    """Records the global step whenever the monitor computes its metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def compute(self, pl_module):
        self.steps.append(pl_module.trainer.global_step)
        return super().compute(pl_module)


# -- values ---------------------------------------------------------------------------------------


def test_compute_matches_hand_computation():
    model = _pruned_model()
    monitor = SparsityMonitor()
    assert monitor.compute(model) == pytest.approx(
        {k: v for k, v in EXPECTED.items() if k.startswith("sparsity/")}
    )
    monitor.flop_counts = count_flops(model, torch.zeros(1, 1, 8, 8))
    assert monitor.compute(model) == pytest.approx(EXPECTED)


def test_logs_to_csv_every_n_steps_and_at_epoch_end(tmp_path, flop_calls):
    model = _pruned_model()
    monitor = StepSpy(log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(
        tmp_path, max_epochs=2, limit_train_batches=5, log_every_n_steps=1, logger=logger
    )
    trainer.callbacks.append(monitor)
    trainer.fit(model)

    # the first logging step, then every second optimizer step, plus each epoch's end
    assert monitor.steps == [1, 2, 4, 5, 6, 8, 10, 10]
    assert len(flop_calls) == 1, "FLOPs are traced once, not per step"
    assert flop_calls[0].shape == (1, 1, 8, 8)

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("sparsity/global")]
    assert set(EXPECTED) <= set(rows[0])
    assert len(rows) >= 6
    for row in rows:
        assert {k: float(row[k]) for k in EXPECTED} == pytest.approx(EXPECTED)
    assert _metrics(trainer) == pytest.approx(EXPECTED)


def test_step_logs_go_to_the_loggers_not_to_lightnings_per_batch_metrics(tmp_path):
    """Step-level values are written straight to the loggers, at the step of Lightning's own row
    for the batch; only ``sparsity/global`` (progress bar) joins Lightning's per-batch metrics,
    which Lightning gathers again after every batch for the rest of the epoch."""

    class LogsLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train/loss", loss)
            return loss

    class SeenKeys(Callback):
        def __init__(self):
            self.callback, self.pbar = set(), set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 2:  # after logging steps
                self.callback |= set(trainer.callback_metrics)
                self.pbar |= set(trainer.progress_bar_metrics)

    model = LogsLoss(lr=0.0, samples=80)
    sparsify(model.net)
    with torch.no_grad():
        model.net[1].mask[:4] = -1.0
        model.net[3].mask[0] = -1.0
    seen = SeenKeys()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(
        tmp_path,
        limit_train_batches=6,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[SparsityMonitor(), seen],
    )
    trainer.fit(model)
    assert "sparsity/global" in seen.callback and "sparsity/global" in seen.pbar
    assert not seen.callback & (set(EXPECTED) - {"sparsity/global"})

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss_steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    monitor_rows = [r for r in rows if r.get("sparsity/net.1") and not r.get("train/loss")]
    monitor_steps = [int(r["step"]) for r in monitor_rows]
    # steps 1, 3, 5 (Lightning's logging steps, 0-based) and the epoch end at step 5
    assert monitor_steps[:3] == sorted(loss_steps) == [1, 3, 5]
    for row in monitor_rows:
        assert {k: float(row[k]) for k in EXPECTED} == pytest.approx(EXPECTED)
        assert row["epoch"] == "0"


def test_logs_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    monitor = StepSpy(log_every_n_steps=1, flops=False)
    trainer = _trainer(
        tmp_path,
        limit_train_batches=8,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        callbacks=[monitor],
    )
    trainer.fit(_pruned_model())
    # 8 batches, 4 optimizer steps: one log per optimizer step (none after a micro-batch that
    # only accumulates), then the epoch end
    assert monitor.steps == [1, 2, 3, 4, 4]


def test_traces_the_given_example_input_once(tmp_path, flop_calls):
    example = torch.full((1, 1, 8, 8), 0.5)
    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[SparsityMonitor(log_every_n_steps=1, example_input=example)],
    )
    trainer.fit(_pruned_model())
    assert len(flop_calls) == 1
    assert flop_calls[0] is not None and torch.equal(flop_calls[0], example)
    assert _metrics(trainer) == pytest.approx(EXPECTED)


def test_traces_the_example_input_array(tmp_path, flop_calls):
    model = _pruned_model()
    model.example_input_array = torch.full((1, 1, 8, 8), 2.0)
    _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1)]).fit(model)
    assert len(flop_calls) == 1
    assert torch.equal(flop_calls[0], model.example_input_array)


def test_a_batch_as_example_input_array_gives_one_samples_flops(tmp_path, flop_calls):
    """flops/dense is one sample's forward pass, even when example_input_array is a batch (it
    was the batch's: 8 x 1184)."""
    model = _pruned_model()
    model.example_input_array = torch.full((8, 1, 8, 8), 2.0)
    trainer = _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1)])
    trainer.fit(model)
    assert [tuple(x.shape) for x in flop_calls] == [(1, 1, 8, 8)]
    assert _metrics(trainer)["flops/dense"] == EXPECTED["flops/dense"]


def test_two_monitors_share_one_trace(tmp_path, flop_calls):
    """Dense FLOPs depend on the architecture and input shape only: one fvcore trace per model
    and shape, whoever asks."""
    model = _pruned_model()
    model.example_input_array = torch.zeros(1, 1, 8, 8)
    first = flops_module.flop_counts(model, torch.ones(4, 1, 8, 8))  # say, the run summary
    monitor = SparsityMonitor(log_every_n_steps=1)
    _trainer(tmp_path, callbacks=[monitor]).fit(model)
    assert len(flop_calls) == 1
    assert monitor.flop_counts is first


def test_global_sparsity_is_over_the_masked_layers(tmp_path):
    model = TinyClassifier(lr=0.0, samples=80)
    sparsify(model.net, exclude=["3"])
    with torch.no_grad():
        model.net[1].mask[:4] = -1.0  # 256 of the 1,024 masked connections
    trainer = _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1, flops=False)])
    trainer.fit(model)
    metrics = _metrics(trainer)
    assert metrics["sparsity/global"] == pytest.approx(0.25)
    assert metrics["sparsity/global_including_dense"] == pytest.approx(256 / 1184)
    assert metrics["sparsity/net.3"] == 0.0


def test_flops_false(tmp_path, flop_calls):
    trainer = _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1, flops=False)])
    trainer.fit(_pruned_model())
    assert flop_calls == []
    expected = {k: v for k, v in EXPECTED.items() if k.startswith("sparsity/")}
    assert _metrics(trainer) == pytest.approx(expected)


def test_log_layers_false(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1, log_layers=False)])
    trainer.fit(_pruned_model())
    expected = {k: v for k, v in EXPECTED.items() if k not in LAYER_KEYS}
    assert _metrics(trainer) == pytest.approx(expected)


def test_dense_model(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1)])
    trainer.fit(TinyClassifier(lr=0.0, samples=80))
    metrics = _metrics(trainer)
    assert metrics["sparsity/global"] == 0.0
    assert metrics["sparsity/net.1"] == metrics["sparsity/net.3"] == 0.0
    assert metrics["flops/dense"] == metrics["flops/effective"] == 1184.0
    assert metrics["flops/ratio"] == 1.0
    assert metrics["flops/effective/net.1"] == 1024.0


def test_tracing_failure_only_warns(tmp_path, monkeypatch):
    calls = []

    def broken(model, example_input):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(flops_module, "count_flops", broken)
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[SparsityMonitor(log_every_n_steps=1)])
    with pytest.warns(UserWarning, match=r"FLOPs tracing failed \(RuntimeError: boom\)"):
        trainer.fit(_pruned_model())
    assert len(calls) == 1, "a failed trace is not retried every step"
    assert trainer.state.finished
    metrics = _metrics(trainer)
    assert not FLOP_KEYS & set(metrics)
    assert metrics["sparsity/global"] == pytest.approx(EXPECTED["sparsity/global"])


def test_module_without_forward_only_warns(tmp_path):
    class NoForward(TinyClassifier):
        forward = LightningModule.forward

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    model = NoForward()
    sparsify(model.net)
    trainer = _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1)])
    with pytest.warns(UserWarning, match="FLOPs tracing failed"):
        trainer.fit(model)
    assert "sparsity/global" in trainer.callback_metrics
    assert "flops/dense" not in trainer.callback_metrics


def test_batch_without_a_tensor_only_warns(tmp_path):
    class TextBatches(TinyClassifier):
        def training_step(self, batch, batch_idx):
            assert isinstance(batch[0], str)
            x = torch.randn(2, 1, 8, 8)
            return F.cross_entropy(self(x), torch.tensor([0, 1]))

        def train_dataloader(self):
            return DataLoader(["a", "b", "c"], batch_size=1)

    model = TextBatches()
    sparsify(model.net)
    trainer = _trainer(tmp_path, callbacks=[SparsityMonitor(log_every_n_steps=1)])
    with pytest.warns(UserWarning, match="cannot find an input tensor in the batch"):
        trainer.fit(model)
    assert "sparsity/global" in trainer.callback_metrics


# -- state and arguments --------------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    monitor = SparsityMonitor(log_every_n_steps=2, flops=False)
    _trainer(tmp_path, limit_train_batches=5, log_every_n_steps=1, callbacks=[monitor]).fit(
        _pruned_model()
    )
    state = monitor.state_dict()
    assert state == {"last_logged_step": 4}
    restored = SparsityMonitor(log_every_n_steps=2)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    restored.load_state_dict({})
    assert restored.state_dict() == {"last_logged_step": -1}


@pytest.mark.parametrize(
    ("trainer_every", "monitor_every", "expected_steps"),
    [
        (3, None, [3, 6]),  # follows the Trainer
        (2, 4, [2, 4]),  # a multiple of the Trainer's: first log, then every 4 (not at 6)
        (5, 7, [5]),  # not a multiple: rounded up to 10 (warned)
    ],
)
def test_logs_exactly_at_the_trainers_logging_steps(
    tmp_path, trainer_every, monitor_every, expected_steps
):
    """Lightning writes step metrics only at its logging steps: the monitor logs at those, so
    no logged value is stale (computed at an earlier step than the row it lands in)."""
    model = _pruned_model()
    monitor = StepSpy(log_every_n_steps=monitor_every, flops=False)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(
        tmp_path,
        limit_train_batches=7,  # the epoch ends off the logging steps
        log_every_n_steps=trainer_every,
        logger=logger,
        callbacks=[monitor],
    )
    if monitor_every is not None and monitor_every % trainer_every:
        with pytest.warns(UserWarning, match="not a multiple"):
            trainer.fit(model)
    else:
        trainer.fit(model)
    assert monitor.steps[:-1] == expected_steps  # then the epoch end
    with open(f"{logger.log_dir}/metrics.csv") as f:
        logged_steps = [
            int(row["step"]) + 1 for row in csv.DictReader(f) if row.get("sparsity/global")
        ]
    # CSV rows carry Lightning's 0-based step of the batch that was logged
    assert logged_steps[: len(expected_steps)] == expected_steps


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "5"])
def test_invalid_log_every_n_steps(value):
    with pytest.raises(
        ValueError, match=rf"log_every_n_steps must be an integer >= 1, got {value!r}"
    ):
        SparsityMonitor(log_every_n_steps=value)
