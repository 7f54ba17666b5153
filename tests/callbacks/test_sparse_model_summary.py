"""SparseModelSummary: the network's own parameters, mask variables apart, and FLOPs per sample
in the project's convention (issue 15, item 5)."""

import logging

import pytest
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary as LightningSummary

from _helpers import TinyClassifier, quiet_trainer
from scl_lightning import SCLModule
from scl_lightning.callbacks import SparseModelSummary
from scl_lightning.callbacks.sparse_model_summary import SparseSummary
from scl_lightning.nn.flops import flop_counts
from scl_lightning.nn.stats import connectivity

DIGITS = {"num_classes": 10, "input_shape": (1, 8, 8)}


def _digits(**kwargs) -> SCLModule:
    return SCLModule("lenet_300_100", **DIGITS, **kwargs)


def test_digits_mlp_numbers_agree_with_the_readme():
    """README: lenet_300_100 on 1x8x8 has 50,610 parameters and 50.2K FLOPs (one multiply-add
    = one FLOP). Lightning's summary says 100 K / 100 K: it counts the 50,200 mask variables as
    parameters and two FLOPs per multiply-add."""
    module = _digits()
    lightning = LightningSummary(module)
    assert lightning.total_parameters == 50_610 + 50_200
    assert lightning.total_flops == 2 * 50_200

    summary = SparseSummary(module)
    assert summary.total_parameters == summary.trainable_parameters == 50_610
    assert summary.total_masks == 50_200
    assert summary.total_flops == summary.effective_flops == 50_200
    text = str(summary)
    assert "50,610    Total params" in text
    assert "50,200    Mask variables (SCL; not counted as params)" in text
    assert "50,200    FLOPs per sample (1 multiply-add = 1 FLOP)" in text
    assert "0.202     Total estimated model params size (MB)" in text  # 50,610 float32
    row = next(line for line in text.splitlines() if line.startswith("0 | model "))
    assert [cell.strip() for cell in row.split("|")][3:7] == ["50.6 K", "50.2 K", "train", "50.2 K"]


def test_effective_flops_are_those_of_summary_json():
    """Eff. FLOPs leave the pruned connections out, as ``RunSummary``/``SparsityMonitor`` count
    them (the same trace, the same connectivity)."""
    module = _digits()
    layer = module.model.layers[3]
    with torch.no_grad():
        layer.mask[:, ::2] = -1.0  # half of the 100x300 layer pruned
    summary = SparseSummary(module, max_depth=-1)
    expected, _ = flop_counts(module, module.example_input_array).effective(
        connectivity(module).densities()
    )
    assert summary.effective_flops == expected == 50_200 - 15_000
    text = str(summary)
    assert "35,200    Effective FLOPs per sample" in text
    row = next(line for line in text.splitlines() if "| model.layers.3 " in line)
    assert [cell.strip() for cell in row.split("|")][6:8] == ["30.0 K", "15.0 K"]


def test_metrics_are_not_listed_and_a_dense_network_has_no_mask_columns():
    text = str(SparseSummary(_digits(sparsify=False)))
    assert "train_acc" not in text and "test_acc_top5" not in text
    assert "Masks" not in text and "Eff. FLOPs" not in text and "Mask variables" not in text
    assert "50,610    Total params" in text


def test_without_an_example_input_flops_are_not_guessed():
    summary = SparseSummary(SCLModule("lenet_300_100", num_classes=10))
    assert summary.flops is None
    assert "?         FLOPs: not counted, no example input (set example_input_array)" in str(
        summary
    )


def test_someone_elses_module_with_parameters_of_its_own():
    """A LightningModule not written for SCL, masked, with a parameter outside any child: the
    mask variables are counted apart and the loose parameter gets Lightning's ``other params``
    row."""
    module = TinyClassifier(sparse=True)
    module.scale = torch.nn.Parameter(torch.ones(3))
    summary = SparseSummary(module, example_input=torch.zeros(1, 1, 8, 8))
    assert summary.total_parameters == 64 * 16 + 16 + 16 * 10 + 10 + 3
    assert summary.total_masks == 64 * 16 + 16 * 10
    assert summary.total_flops == 64 * 16 + 16 * 10
    rows = str(summary).splitlines()
    other = next(line for line in rows if "other params" in line)
    assert [cell.strip() for cell in other.split("|")][3] == "3"


def test_callback_prints_the_summary_at_fit_start(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer = quiet_trainer(
        tmp_path,
        enable_model_summary=True,
        limit_train_batches=1,
        callbacks=[SparseModelSummary()],
    )
    trainer.fit(TinyClassifier(sparse=True))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "1,210     Total params" in text
    assert "1,184     Mask variables" in text
    assert "Total Flops" not in text  # Lightning's own summary was not printed as well


@pytest.mark.parametrize("bad", [-2, 1.5, "1", True])
def test_max_depth_is_checked(bad):
    with pytest.raises(ValueError, match=r"max_depth must be an integer >= -1"):
        SparseModelSummary(max_depth=bad)


def test_example_input_is_checked():
    with pytest.raises(ValueError, match=r"example_input must be a tensor or None, got \[1\]"):
        SparseModelSummary(example_input=[1])
