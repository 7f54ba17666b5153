import math

import pytest
import torch

from scl_lightning.data import DigitsDataModule

NUM_SAMPLES = 1797


def _setup(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_attributes_available_before_setup():
    dm = DigitsDataModule()
    assert dm.num_classes == 10
    assert dm.input_shape == (1, 8, 8)
    assert dm.train_dataset is None
    assert dm.hparams["batch_size"] == 64
    assert dm.hparams["split_seed"] == 0


@pytest.mark.parametrize("val_fraction", [0.2, 0.1, 0.5, 0.001])
def test_split_sizes(val_fraction):
    dm = _setup(val_fraction=val_fraction)
    n_train, n_val = len(dm.train_dataset), len(dm.val_dataset)
    # The rule: the validation split holds ceil(val_fraction * 1797) images (scikit-learn's).
    assert n_val == math.ceil(val_fraction * NUM_SAMPLES)
    assert n_train + n_val == NUM_SAMPLES
    if val_fraction == 0.2:
        assert (n_train, n_val) == (1437, 360)


def test_splits_are_disjoint_and_cover_the_data():
    from sklearn.datasets import load_digits

    dm = _setup(normalize=False)
    raw = torch.from_numpy(load_digits().images).float().div(16).reshape(NUM_SAMPLES, -1)
    x = torch.cat([dm.train_dataset.tensors[0], dm.val_dataset.tensors[0]]).reshape(NUM_SAMPLES, -1)
    # Same multiset of images: sort rows lexicographically by hashing each row to bytes.
    key = sorted(bytes(r.numpy().tobytes()) for r in raw)
    got = sorted(bytes(r.numpy().tobytes()) for r in x)
    assert key == got


def test_split_is_stratified():
    dm = _setup(val_fraction=0.2)
    counts = torch.bincount(dm.val_dataset.tensors[1], minlength=10)
    # 360 validation images over 10 roughly balanced classes: every class gets 35-37.
    assert counts.min() >= 34 and counts.max() <= 38


def test_val_split_independent_of_global_seed():
    torch.manual_seed(1)
    a = _setup(split_seed=3)
    torch.manual_seed(12345)
    import numpy as np

    np.random.seed(999)
    b = _setup(split_seed=3)
    assert torch.equal(a.val_dataset.tensors[0], b.val_dataset.tensors[0])
    assert torch.equal(a.val_dataset.tensors[1], b.val_dataset.tensors[1])
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])


def test_different_split_seed_gives_different_split():
    a = _setup(split_seed=0)
    b = _setup(split_seed=1)
    assert len(a.val_dataset) == len(b.val_dataset)
    assert not torch.equal(a.val_dataset.tensors[0], b.val_dataset.tensors[0])


def test_setup_is_idempotent():
    dm = _setup()
    train, val = dm.train_dataset, dm.val_dataset
    dm.setup("validate")
    dm.setup("test")
    assert dm.train_dataset is train and dm.val_dataset is val


def test_unnormalized_values_in_unit_range():
    dm = _setup(normalize=False)
    for ds in (dm.train_dataset, dm.val_dataset):
        x = ds.tensors[0]
        assert x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    # Raw digits reach the maximum pixel value 16, i.e. exactly 1.0 after scaling.
    assert dm.train_dataset.tensors[0].max() == 1.0


def test_normalized_with_train_statistics():
    dm = _setup(normalize=True)
    x_train = dm.train_dataset.tensors[0]
    assert x_train.mean().abs() < 1e-5
    assert (x_train.std() - 1).abs() < 1e-4
    # Validation is standardized with the *train* statistics, so it is close to but not
    # exactly zero-mean.
    raw = _setup(normalize=False)
    assert dm.mean == pytest.approx(float(raw.train_dataset.tensors[0].mean()))
    expected_val = (raw.val_dataset.tensors[0] - dm.mean) / dm.std
    torch.testing.assert_close(dm.val_dataset.tensors[0], expected_val)
    assert dm.val_dataset.tensors[0].mean().abs() > 1e-6


def test_batches_shapes_and_dtypes():
    dm = _setup(batch_size=100)
    for loader in (
        dm.train_dataloader(),
        dm.val_dataloader(),
        dm.test_dataloader(),
        dm.predict_dataloader(),
    ):
        x, y = next(iter(loader))
        assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32
        assert y.shape == (100,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) <= 9
        assert loader.drop_last is False
        assert loader.persistent_workers is False
    # Last training batch is kept, smaller: 1437 = 14 * 100 + 37.
    sizes = [len(y) for _, y in dm.train_dataloader()]
    assert sum(sizes) == 1437 and sizes[-1] == 37


def test_train_shuffles_eval_does_not():
    dm = _setup(batch_size=2000)
    torch.manual_seed(0)
    _, y1 = next(iter(dm.train_dataloader()))
    assert not torch.equal(y1, dm.train_dataset.tensors[1])
    _, yv = next(iter(dm.val_dataloader()))
    assert torch.equal(yv, dm.val_dataset.tensors[1])
    _, yt = next(iter(dm.test_dataloader()))
    assert torch.equal(yt, dm.val_dataset.tensors[1])


def test_persistent_workers_only_with_workers():
    dm = _setup(num_workers=1)
    loader = dm.val_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers is True


def test_dataloader_before_setup_raises():
    with pytest.raises(RuntimeError, match="call setup"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ({"batch_size": -3}, r"batch_size must be a positive integer, got -3"),
        ({"batch_size": 2.5}, r"batch_size must be a positive integer, got 2.5"),
        ({"batch_size": True}, r"batch_size must be a positive integer, got True"),
        ({"val_fraction": 0.0}, r"val_fraction must be .* between 0 and 1, got 0.0"),
        ({"val_fraction": 1.0}, r"val_fraction must be .* between 0 and 1, got 1.0"),
        ({"val_fraction": -0.1}, r"val_fraction must be .* between 0 and 1, got -0.1"),
        ({"val_fraction": "0.2"}, r"val_fraction must be .* between 0 and 1, got '0.2'"),
        ({"val_fraction": 0.9999}, r"val_fraction=0.9999 leaves no training samples"),
        ({"split_seed": -1}, r"split_seed must be an integer in \[0, 2\*\*32\), got -1"),
        ({"split_seed": 2**32}, r"split_seed must be an integer .* got 4294967296"),
        ({"split_seed": 1.5}, r"split_seed must be an integer .* got 1.5"),
        ({"num_workers": -1}, r"num_workers must be a non-negative integer, got -1"),
        ({"num_workers": 1.0}, r"num_workers must be a non-negative integer, got 1.0"),
        ({"normalize": "yes"}, r"normalize must be True or False, got 'yes'"),
        ({"normalize": 1}, r"normalize must be True or False, got 1"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
