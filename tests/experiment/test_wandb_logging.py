"""W&B, offline: per-layer tables and bar charts, the saved config, and the model artifacts.

An offline W&B run keeps media files under ``<save_dir>/wandb/offline-run-*/files/`` and
everything else it logged (history rows, config, artifact manifests) in the run's transaction
log ``run-<id>.wandb``, the file ``wandb sync`` uploads. :func:`_records` reads that log (a
LevelDB-style log of ``wandb.proto`` ``Record`` messages) so the tests can check what a synced
run would contain, not only which files exist.
"""

import base64
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from wandb.proto import wandb_internal_pb2

import scl_lightning.experiment.wandb_artifacts as wandb_artifacts_module
from scl_lightning import SCLModule, export_pruned
from scl_lightning.callbacks import MaskGradientNormalization, SparsityMonitor
from scl_lightning.callbacks._logging import active_wandb_loggers
from scl_lightning.callbacks.sparsity_monitor import LAYER_COLUMNS
from scl_lightning.data import DigitsDataModule
from scl_lightning.deploy import PRUNED_FORMAT, load_pruned
from scl_lightning.experiment.cli import WANDB_CONFIG_FILENAME, flatten_config, main
from scl_lightning.experiment.wandb_artifacts import WandbArtifacts
from scl_lightning.models import create_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPE = str(CONFIGS / "digits_mlp.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
# LeNet-300-100 on 8x8 digits: (name, weight shape); one sample's FLOPs = its weights
LAYERS = [("model.layers.1", "300x64"), ("model.layers.3", "100x300"), ("model.layers.5", "10x100")]
TRAIN_BATCHES = 3
PRUNED_FILE = "pruned_state_dict.safetensors"
EPOCH_END_STEPS = [TRAIN_BATCHES - 1, 2 * TRAIN_BATCHES - 1]  # where Lightning logs epoch ends


# -- reading an offline run -----------------------------------------------------------------------


def _records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run's ``run-<id>.wandb`` (W&B's LevelDB-style log: 7-byte
    header, 32 KiB blocks of chunks, each with a 7-byte header of CRC, length and type
    FULL/FIRST/MIDDLE/LAST)."""
    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(items) -> dict:
    """History/config/summary items as a nested dict of decoded JSON values."""
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


def _history(records) -> list[dict]:
    return [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]


def _config(records) -> dict:
    config: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            for key, value in _items(r.config.update).items():
                if isinstance(value, dict) and isinstance(config.get(key), dict):
                    config[key] = {**config[key], **value}
                else:
                    config[key] = value
    return config


def _artifacts(records) -> dict[str, wandb_internal_pb2.ArtifactRecord]:
    return {
        r.artifact.name: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
    }


def _saved_files(records) -> set[str]:
    return {
        f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files
    }


def _table(run_dir: Path, entry: dict) -> dict:
    assert entry["_type"] == "table-file"
    return json.loads((run_dir / "files" / entry["path"]).read_text())


def _assert_layer_tables(
    run_dir: Path, records, expected: dict[int, list[list]], steps: list[int] | None = None
) -> None:
    """The tables were logged at ``steps`` (default: those of ``expected``), each step with a
    history row holding the per-layer table and the bar chart's table, both stored in the run's
    media files; at the steps of ``expected`` they hold the expected rows. The bar chart's
    panel (a W&B bar chart over its table) is in the run's config."""
    steps = sorted(expected) if steps is None else steps
    rows = {h["trainer/global_step"]: h for h in _history(records) if "sparsity/layers" in h}
    assert sorted(rows) == steps
    media = run_dir / "files" / "media" / "table" / "sparsity"
    assert len(list(media.glob("layers_[0-9]*.table.json"))) == len(steps)
    assert len(list(media.glob("layers_bar_table_*.table.json"))) == len(steps)
    for step, expected_rows in expected.items():
        table = _table(run_dir, rows[step]["sparsity/layers"])
        assert table["columns"] == list(LAYER_COLUMNS)
        assert len(table["data"]) == len(expected_rows)
        for got, want in zip(table["data"], expected_rows, strict=True):
            assert got[:4] == want[:4]  # layer, shape, connections, active
            assert got[4:] == pytest.approx(want[4:])  # sparsity, dense and effective FLOPs
        bar = _table(run_dir, rows[step]["sparsity/layers_bar_table"])
        assert bar["columns"] == ["layer", "sparsity"]
        assert [r[0] for r in bar["data"]] == [r[0] for r in expected_rows]
        assert [r[1] for r in bar["data"]] == pytest.approx([r[4] for r in expected_rows])
    panel = _config(records)["_wandb"]["visualize"]["sparsity/layers_bar"]
    assert panel["panel_config"]["panelDefId"] == "wandb/bar/v0"
    assert panel["panel_config"]["fieldSettings"] == {"label": "layer", "value": "sparsity"}
    (query,) = panel["panel_config"]["userQuery"]["queryFields"]
    table_arg = next(f for f in query["fields"] if f["name"] == "summaryTable")["args"][0]
    assert table_arg["value"] == "sparsity/layers_bar_table"


def _shut_down_wandb() -> None:
    """Finish the run and stop the wandb service: only then is ``run-<id>.wandb`` complete
    (``finish()`` can return while the service is still writing it)."""
    wandb.finish()
    wandb.teardown()


def _md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No credentials and no WANDB_MODE (conftest disables W&B): loggers run offline. HOME is
    the test's, so W&B's own files (settings, staging, cache) stay in tmp_path; the run and the
    wandb service process are torn down whatever happens."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL", "WANDB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    try:
        yield tmp_path
    finally:
        wandb.finish()
        wandb.teardown()  # stop the wandb service process this test started


@pytest.fixture
def no_wandb(monkeypatch):
    """`import wandb` fails, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "wandb", None)


class RecordLayers(Callback):
    """Records at each training epoch end what the per-layer W&B table must hold then, under
    the step of Lightning's epoch-end metrics (the last batch's: global step - 1)."""

    def __init__(self):
        self.rows: dict[int, list[list]] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.rows[trainer.global_step - 1] = _expected_rows(pl_module)


def _expected_rows(module) -> list[list]:
    """The table rows for ``module``'s masks, counted here by hand: one sample's dense FLOPs
    of a Linear layer are its weights, the effective ones its active weights."""
    rows = []
    for name, shape in LAYERS:
        mask = module.get_submodule(name).mask
        total, active = mask.numel(), int((mask > 0).sum())
        rows.append([name, shape, total, active, 1 - active / total, total, active])
    return rows


def _module(**kwargs) -> SCLModule:
    # small initial masks: connections switch off within a few steps
    defaults = dict(num_classes=10, input_shape=(1, 8, 8), lam=2e-5, mask_init=0.05, mask_lr=0.05)
    return SCLModule("lenet_300_100", **{**defaults, **kwargs})


def _trainer(tmp_path, logger, callbacks, **kwargs) -> Trainer:
    defaults = dict(
        max_epochs=2,
        limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
    )
    return Trainer(**{**defaults, **kwargs})


# -- SparsityMonitor ------------------------------------------------------------------------------


def test_digits_fit_logs_a_layer_table_and_a_bar_chart_each_epoch(offline_wandb):
    tmp_path = offline_wandb
    record = RecordLayers()
    logger = LightningWandbLogger(offline=True, save_dir=tmp_path, project="test")
    trainer = _trainer(tmp_path, logger, [MaskGradientNormalization(), SparsityMonitor(), record])
    trainer.fit(_module(), DigitsDataModule(batch_size=32))
    run_dir = Path(logger.experiment.dir).parent
    _shut_down_wandb()

    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    assert sorted(record.rows) == EPOCH_END_STEPS
    sparsity = [[r[4] for r in rows] for rows in record.rows.values()]
    assert 0 < sparsity[0][0] < sparsity[1][0] < 1  # masks moved: the tables differ by epoch
    records = _records(run_dir)
    _assert_layer_tables(run_dir, records, record.rows)
    # the scalars still arrive, the epoch-end ones at the tables' steps
    history = _history(records)
    assert {h["trainer/global_step"] for h in history if "sparsity/global" in h} == set(
        range(2 * TRAIN_BATCHES)
    )
    epoch_ends = [h["trainer/global_step"] for h in history if "val/acc" in h]
    assert epoch_ends == EPOCH_END_STEPS


def test_disabled_wandb_run_gets_nothing(tmp_path):
    # conftest sets WANDB_MODE=disabled: the W&B logger is there, its run is a no-op
    logger = LightningWandbLogger(save_dir=tmp_path)
    trainer = _trainer(
        tmp_path,
        logger,
        [MaskGradientNormalization(), SparsityMonitor(), WandbArtifacts()],
        max_epochs=1,
        limit_val_batches=0,
    )
    try:
        trainer.fit(_module(), DigitsDataModule(batch_size=32))
        assert active_wandb_loggers(trainer.loggers) == []
    finally:
        wandb.finish()
        wandb.teardown()
    assert not list(tmp_path.rglob("*.safetensors"))


# -- the scl command ------------------------------------------------------------------------------


def test_cli_fit_saves_config_tables_and_artifacts_offline(offline_wandb, monkeypatch):
    workdir = offline_wandb
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["scl"])
    main(
        [
            "fit",
            "--config",
            RECIPE,
            "--trainer.max_epochs=2",
            f"--trainer.limit_train_batches={TRAIN_BATCHES}",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            "--model.lam=3e-5",
        ]
    )
    _shut_down_wandb()
    (run_dir,) = (workdir / "runs" / "wandb").glob("offline-run-*")
    log_dir = workdir / "runs" / "digits_mlp" / "version_0"
    records = _records(run_dir)
    run_id = run_dir.name.rsplit("-", 1)[1]

    # the resolved config: the same YAML as LightningCLI's config.yaml, as a run file ...
    saved = run_dir / "files" / WANDB_CONFIG_FILENAME
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert yaml.safe_load(saved.read_text()) == config
    assert WANDB_CONFIG_FILENAME in _saved_files(records)
    # ... and flattened into the run's config, next to the module's hyper-parameters
    run_config = _config(records)
    assert run_config["model.lam"] == 3e-5
    assert run_config["trainer.max_epochs"] == 2
    assert run_config["data.class_path"] == "scl_lightning.data.DigitsDataModule"
    assert run_config["seed_everything"] == 0
    assert run_config.items() >= flatten_config(config).items()
    assert run_config["lam"] == 3e-5  # Lightning's log_hyperparams

    # a table and a bar chart per epoch; the final one matches the trained network
    steps = EPOCH_END_STEPS
    module = SCLModule.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    _assert_layer_tables(run_dir, records, {steps[-1]: _expected_rows(module)}, steps=steps)

    # the final checkpoint and the pruned model: W&B artifacts whose files are kept in the
    # offline run directory, where `wandb sync` finds them
    artifacts = _artifacts(records)
    assert set(artifacts) >= {f"model-{run_id}", f"pruned-model-{run_id}"}
    for name, filename, source in [
        (f"model-{run_id}", "last.ckpt", log_dir / "checkpoints" / "last.ckpt"),
        (f"pruned-model-{run_id}", PRUNED_FILE, log_dir / PRUNED_FILE),
    ]:
        artifact = artifacts[name]
        assert artifact.type == "model"
        assert set(artifact.aliases) == {"latest", "final"}
        (entry,) = artifact.manifest.contents
        assert entry.path == filename
        local = Path(entry.local_path)
        assert local == run_dir / "artifacts" / name / filename
        assert local.read_bytes() == source.read_bytes()
        assert entry.digest == _md5(local)
        metadata = json.loads(artifact.metadata)
        assert metadata["global_step"] == 2 * TRAIN_BATCHES
        assert metadata["total_connections"] == 64 * 300 + 300 * 100 + 100 * 10
        assert 0.0 <= metadata["val/acc"] <= 1.0

    # the pruned state dict: a safetensors file (no pickle), its header the run's figures; plain
    # tensors, into the never-masked architecture, same outputs
    assert (log_dir / PRUNED_FILE).read_bytes()[8:9] == b"{"  # safetensors: length, JSON header
    state, header = load_pruned(log_dir / PRUNED_FILE)
    assert header["format"] == PRUNED_FORMAT
    assert header["network"] == "LeNet300100"
    assert int(header["global_step"]) == 2 * TRAIN_BATCHES
    assert int(header["total_connections"]) == 64 * 300 + 300 * 100 + 100 * 10
    assert float(header["global_sparsity"]) == pytest.approx(
        json.loads(artifacts[f"pruned-model-{run_id}"].metadata)["sparsity"]
    )
    assert 0.0 <= float(header["val/acc"]) <= 1.0
    assert "sparsity" not in header  # written once, as global_sparsity
    plain = create_model("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
    plain.load_state_dict(state, strict=True)
    expected = export_pruned(module.model).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    x = torch.randn(4, 1, 8, 8)
    module.eval()
    torch.testing.assert_close(plain(x), module(x))


def test_cli_fit_with_csv_logger_needs_no_wandb(tmp_path, monkeypatch, no_wandb):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["scl"])
    main(
        [
            "fit",
            "--config",
            RECIPE,
            "--config",
            CSV,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (log_dir,) = (tmp_path / "runs").glob("*/version_0")
    assert (log_dir / "config.yaml").exists()
    assert "sparsity/global" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert not (tmp_path / "runs" / "wandb").exists()
    assert not (log_dir / PRUNED_FILE).exists()  # no WandbArtifacts without W&B


# -- the callbacks with other loggers, and WandbArtifacts on its own ------------------------------


def test_csv_logger_gets_the_scalars_and_nothing_needs_wandb(tmp_path, no_wandb):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(
        tmp_path,
        logger,
        [MaskGradientNormalization(), SparsityMonitor(), WandbArtifacts()],
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    trainer.fit(_module(), DigitsDataModule(batch_size=32))
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"sparsity/global", "sparsity/model.layers.1", "flops/effective"} <= set(header)
    assert not (tmp_path / "wandb").exists()
    assert not list(tmp_path.rglob("*.safetensors"))


def test_importing_the_package_does_not_import_wandb():
    code = (
        "import sys, scl_lightning, scl_lightning.experiment.cli, scl_lightning.experiment; "
        "sys.exit('wandb' in sys.modules)"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src})


@pytest.mark.parametrize(
    "filename",
    ["model.ckpt", "pruned.pt", "dir/pruned.safetensors", ".safetensors", "", 3],
    ids=["suffix", "pickle-suffix", "dir", "no-stem", "empty", "int"],
)
def test_artifacts_filename_is_validated(filename):
    with pytest.raises(
        ValueError, match=r"filename must be a bare file name ending in \.safetensors"
    ):
        WandbArtifacts(filename=filename)


def test_dense_baseline_uploads_the_checkpoint_only(offline_wandb, monkeypatch):
    tmp_path = offline_wandb
    infos: list[str] = []
    monkeypatch.setattr(wandb_artifacts_module, "rank_zero_info", infos.append)
    logger = LightningWandbLogger(offline=True, save_dir=tmp_path)
    callback = WandbArtifacts()
    trainer = _trainer(
        tmp_path,
        logger,
        [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    trainer.fit(_module(sparsify=False), DigitsDataModule(batch_size=32))
    run_dir = Path(logger.experiment.dir).parent
    _shut_down_wandb()
    artifacts = _artifacts(_records(run_dir))
    run_id = run_dir.name.rsplit("-", 1)[1]
    assert f"model-{run_id}" in artifacts
    assert f"pruned-model-{run_id}" not in artifacts
    assert callback.pruned_path is None
    assert infos == [
        "WandbArtifacts: LeNet300100 has no masked layer (a dense baseline?); "
        "not exporting a pruned model"
    ]


def test_lightning_log_model_uploads_checkpoints_instead(offline_wandb, monkeypatch):
    """With ``log_model``, Lightning logs ``model-<id>`` itself: not a second time."""
    tmp_path = offline_wandb
    # Lightning refuses log_model with offline=True; WANDB_MODE still keeps the run offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = LightningWandbLogger(save_dir=tmp_path, log_model=True)
    model = _module()
    trainer = _trainer(
        tmp_path,
        logger,
        [MaskGradientNormalization(), WandbArtifacts(filename="pruned.safetensors")],
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    run_dir = Path(logger.experiment.dir).parent
    _shut_down_wandb()
    run_id = run_dir.name.rsplit("-", 1)[1]
    names = [
        r.artifact.name for r in _records(run_dir) if r.WhichOneof("record_type") == "artifact"
    ]
    assert names.count(f"model-{run_id}") == 1  # Lightning's, at finalize
    assert names.count(f"pruned-model-{run_id}") == 1
    path = Path(trainer.log_dir) / "pruned.safetensors"
    assert set(load_pruned(path)[0]) == set(export_pruned(model.model).state_dict())


def test_flatten_config():
    config = {"a": {"b": 1, "c": {"d": [1, {"e": 2}]}, "f": {}}, "g": None}
    assert flatten_config(config) == {"a.b": 1, "a.c.d": [1, {"e": 2}], "a.f": {}, "g": None}


def test_artifact_metadata_stays_under_wandbs_key_limit():
    """Per-layer scalars of a deep network (ResNet-56: 56 layers x 2 keys) would exceed W&B's
    100 metadata keys; they are left to the tables."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from scl_lightning import sparsify
    from scl_lightning.experiment.wandb_artifacts import WandbArtifacts

    net = sparsify(nn.Sequential(*[nn.Linear(4, 4) for _ in range(60)]))
    metrics = {f"sparsity/{i}": torch.tensor(0.5) for i in range(60)}
    metrics |= {f"flops/effective/{i}": torch.tensor(8.0) for i in range(60)}
    metrics |= {"sparsity/global": torch.tensor(0.5), "val/acc": torch.tensor(0.9)}
    metrics |= {f"other/{i}": torch.tensor(1.0) for i in range(150)}
    trainer = SimpleNamespace(current_epoch=1, global_step=10, callback_metrics=metrics)
    metadata = WandbArtifacts()._metadata(trainer, net)
    assert len(metadata) <= 100
    assert metadata["val/acc"] == pytest.approx(0.9)
    assert metadata["sparsity/global"] == 0.5
    assert not any(k.startswith("flops/effective/") for k in metadata)
