"""The measuring helpers of the Fashion-MNIST result benchmarks (bench/_fmnist.py,
bench/mask_diagnosis.py): saved masks, overlaps, magnitude agreement, the churn record and a
fixed-mask retrain. The benchmarks themselves need the real data and hours (`make results`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _fmnist  # noqa: E402
import mask_diagnosis  # noqa: E402

from scl_lightning import SCLModule  # noqa: E402
from scl_lightning.nn.sparsify import masked_modules  # noqa: E402


def _sets(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(7, 13, generator=gen) > 0.7,
        "b": torch.rand(3, 2, 5, 5, generator=gen) > 0.2,
    }


def test_on_sets_round_trip_bit_exact(tmp_path):
    on = _sets()
    path = tmp_path / "deep" / "m.npz"
    _fmnist.save_on_sets(on, path)
    back = _fmnist.load_on_sets(path)
    assert set(back) == set(on)
    for k in on:
        assert back[k].dtype == torch.bool and back[k].shape == on[k].shape
        assert torch.equal(back[k], on[k])
    assert not list(path.parent.glob("*.tmp*"))


def test_random_on_sets_keep_each_layer_count_and_differ():
    on = _sets()
    rnd = mask_diagnosis.random_on_sets(on, seed=0)
    for k in on:
        assert int(rnd[k].sum()) == int(on[k].sum())
    assert any(not torch.equal(rnd[k], on[k]) for k in on)
    again = mask_diagnosis.random_on_sets(on, seed=0)
    assert all(torch.equal(again[k], rnd[k]) for k in on)


def test_overlap_is_jaccard():
    a = {"model.x": torch.tensor([1, 1, 0, 0], dtype=torch.bool)}
    b = {"model.x": torch.tensor([1, 0, 1, 0], dtype=torch.bool)}
    total, per = mask_diagnosis.overlap(a, b)
    assert total == pytest.approx(1 / 3)
    assert per == {"x": pytest.approx(1 / 3, abs=1e-4)}
    assert mask_diagnosis.overlap(a, a)[0] == 1.0


def test_magnitude_agreement_one_for_magnitude_choice_and_low_for_its_opposite():
    torch.manual_seed(0)
    module = SCLModule(
        "lenet_300_100", input_shape=(1, 4, 4), backbone_kwargs={"hidden": [8]}, num_classes=3
    )
    layers = dict(masked_modules(module))
    w = torch.cat([layer.weight.detach().abs().reshape(-1) for layer in layers.values()])
    k = w.numel() // 4
    top = torch.topk(w, k).values.min()
    bottom = torch.topk(w, k, largest=False).values.max()
    largest = {n: layer.weight.detach().abs() >= top for n, layer in layers.items()}
    smallest = {n: layer.weight.detach().abs() <= bottom for n, layer in layers.items()}
    assert _fmnist._magnitude_agreement(module, largest) == 1.0
    assert _fmnist._magnitude_agreement(module, smallest) == 0.0


def test_churn_counts_switches_between_epoch_ends():
    churn = _fmnist._Churn()
    churn.epochs = [
        {"x": torch.tensor([1, 1, 0, 0], dtype=torch.bool)},
        {"x": torch.tensor([1, 0, 0, 0], dtype=torch.bool)},
        {"x": torch.tensor([1, 0, 0, 1], dtype=torch.bool)},
    ]
    report = churn.report()
    assert report["flips"] == [0.25, 0.25]
    assert report["jaccard_with_final"] == [pytest.approx(1 / 3, abs=1e-4), 0.5, 1.0]


def test_fixed_masks_are_set_at_fit_start_and_never_change(tmp_path):
    """The retrain arm's callback: the saved topology is applied and the masks get no step."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = SCLModule(
        "lenet_300_100",
        input_shape=(1, 4, 4),
        backbone_kwargs={"hidden": [8]},
        num_classes=3,
        lam=0.0,
    )
    names = [n for n, _ in masked_modules(module)]
    gen = torch.Generator().manual_seed(1)
    on = {
        n: torch.rand(layer.mask.shape, generator=gen) > 0.5 for n, layer in masked_modules(module)
    }
    path = tmp_path / "m.npz"
    _fmnist.save_on_sets(on, path)
    callbacks = _fmnist._callbacks(
        {"method": "fixed", "_mask_file": str(path)}, epochs=2, history=None
    )
    data = TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,)))
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(data, batch_size=16))
    for n, layer in masked_modules(module):
        assert n in names
        assert torch.equal(layer.mask.detach() > 0, on[n])
        assert torch.equal(layer.mask.detach().abs(), torch.ones_like(layer.mask))
