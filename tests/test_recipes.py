"""Every recipe in configs/ parses, and the CIFAR ResNet-56 recipe trains for a few steps on a
small CIFAR-10 folder in the official format (no download)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from scl_lightning.experiment.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml")) + sorted((CONFIGS / "logger").glob("*.yaml"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["scl"])
    return tmp_path


def test_the_issue_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {
        "digits_mlp",
        "digits_mlp_dense",
        "cifar10_resnet56",
        "cifar10_resnet110",
        "cifar10_vgg16",
        "imagenet_resnet50",
        "fmnist_lenet300",
        "fmnist_lenet300_dense",
        "fmnist_lenet5",
        "fmnist_lenet5_dense",
        # budgets instead of lambdas (issue 13)
        "digits_mlp_target",
        "fmnist_lenet300_target",
        "fmnist_lenet5_flops",
    } <= names


FMNIST_RECIPES = ["fmnist_lenet300", "fmnist_lenet5", "fmnist_lenet5_dense", "fmnist_lenet5_flops"]


@pytest.mark.parametrize(
    ("recipe", "target"),
    [
        ("cifar10_resnet56", {"target_sparsity": 0.9}),
        ("cifar10_resnet110", {"target_sparsity": 0.9}),
        ("cifar10_vgg16", {"target_sparsity": 0.95}),
        ("imagenet_resnet50", {"target_sparsity": 0.8}),
        ("digits_mlp_target", {"target_sparsity": 0.95}),
        ("fmnist_lenet300_target", {"target_sparsity": 0.967}),
        ("fmnist_lenet5_flops", {"target_flops": 0.1}),
    ],
)
def test_big_recipes_and_target_variants_ask_for_a_budget_not_a_lambda(recipe, target):
    import yaml

    model = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())["model"]
    assert "lam" not in model
    assert {k: model[k] for k in target} == target


def test_a_lambda_on_top_of_a_target_recipe_is_one_line(workdir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "digits_mlp_target.yaml"),
                "--model.lam",
                "1e-5",
                "--trainer.logger=false",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop lam" in err[0], err


def test_digits_target_recipe_trains(workdir, capsys):
    logger = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "runs", "name": "t"},
        }
    ]
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_mlp_target.yaml"),
            "--trainer.max_epochs",
            "4",
            f"--trainer.logger={json.dumps(logger)}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (path,) = (workdir / "runs").rglob("summary.json")
    assert json.loads(path.read_text())["sparsity"] > 0.3
    rows = (path.parent / "metrics.csv").read_text().splitlines()
    assert "budget/lam" in rows[0] and "budget/gap" in rows[0]


@pytest.mark.parametrize("recipe", FMNIST_RECIPES)
def test_fmnist_recipe_without_the_data_is_one_line_saying_make_data(
    workdir, capsys, monkeypatch, recipe
):
    from scl_lightning.data import FashionMNISTDataModule

    monkeypatch.setattr(FashionMNISTDataModule, "SYSTEM_DIRS", ())
    monkeypatch.setenv("SCL_DATA_DIR", str(workdir / "nothing"))
    monkeypatch.setenv("HOME", str(workdir / "home"))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), "--trainer.logger=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `make data`" in err[0], err
    assert not (workdir / "runs").exists() or not any((workdir / "runs").rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fmnist_lenet300", "fmnist_lenet5"])
def test_fmnist_recipe_trains_a_few_steps_on_the_real_data(workdir, recipe):
    from scl_lightning.data import FashionMNISTDataModule

    if FashionMNISTDataModule(download=False).folder is None:
        pytest.skip("Fashion-MNIST is not installed (run `make data`)")
    logger = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "runs", "name": recipe},
        }
    ]
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{recipe}.yaml"),
            f"--trainer.logger={json.dumps(logger)}",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (path,) = (workdir / "runs").rglob("summary.json")
    summary = json.loads(path.read_text())
    assert summary["global_step"] == 3
    assert (
        summary["total_connections"]
        == {"fmnist_lenet300": 266_200, "fmnist_lenet5": 430_500}[recipe]
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(workdir, capsys, recipe):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exc.value.code == 0
    assert "backbone:" in capsys.readouterr().out


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_combines_with_a_recipe(workdir, capsys, preset):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "cifar10_resnet56.yaml"),
                "--config",
                str(preset),
                "--print_config",
            ]
        )
    assert exc.value.code == 0


def _write_cifar10(root: Path, n_train: int = 32, n_test: int = 16) -> None:
    """The extracted official layout, pickled the way the CIFAR README's loader reads it."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, obj: dict) -> None:
        (folder / name).write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}))

    def batch(n: int) -> dict:
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "batch_label": "fake",
            "filenames": [f"{i}.png" for i in range(n)],
        }

    for i in range(1, 6):
        dump(f"data_batch_{i}", batch(n_train))
    dump("test_batch", batch(n_test))
    dump(
        "batches.meta",
        {
            "label_names": [f"class{i}" for i in range(10)],
            "num_cases_per_batch": n_train,
            "num_vis": 3072,
        },
    )


def test_cifar10_resnet56_recipe_trains_a_few_steps(workdir):
    _write_cifar10(workdir / "data" / "cifar10")
    logger = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "runs", "name": "r56"},
        }
    ]
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "cifar10_resnet56.yaml"),
            f"--trainer.logger={json.dumps(logger)}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--data.batch_size=8",
            "--data.download=false",
            "--data.num_workers=0",
        ]
    )
    (path,) = (workdir / "runs").rglob("summary.json")
    summary = json.loads(path.read_text())
    assert summary["global_step"] == 2
    assert summary["total_connections"] == 848_944  # every conv and linear weight of ResNet-56
    assert summary["dense_flops"] == pytest.approx(126.55e6, rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true", "bf16-mixed"])
def test_cifar_batches_follow_the_trainer_precision(workdir, precision):
    """Lightning converts inputs for '*-true' precisions before the transfer, while they are
    still uint8; the data module converts its float output itself."""
    import lightning.pytorch as pl

    from scl_lightning import SCLModule
    from scl_lightning.data import CIFAR10DataModule

    _write_cifar10(workdir / "cifar")
    dm = CIFAR10DataModule(data_dir=workdir / "cifar", batch_size=4, download=False)
    module = SCLModule("resnet20", num_classes=10, input_shape=(3, 32, 32))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=precision,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2


def _write_image_folder(root: Path, classes: int = 3, per_class: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG")


def test_imagenet_resnet50_recipe_trains_a_step_with_a_logger(workdir):
    _write_image_folder(workdir / "imagenet")
    logger = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "runs", "name": "r50"},
        }
    ]
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "imagenet_resnet50.yaml"),
            f"--trainer.logger={json.dumps(logger)}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--data.data_dir={workdir / 'imagenet'}",
            "--data.batch_size=2",
            "--data.num_workers=0",
            "--data.image_size=64",
            "--data.val_resize=72",
        ]
    )
    (path,) = (workdir / "runs").rglob("summary.json")
    summary = json.loads(path.read_text())
    assert summary["global_step"] == 1
    # the class count found on disk (3) reached the model: its classifier has 3 outputs
    assert summary["layers"][-1]["shape"] == [3, 2048]
