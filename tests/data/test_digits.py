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


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction"),
    [(0.2, 0.2), (0.1, 0.2), (0.5, 0.3), (0.001, 0.001), (0.2, 0.0), (0.1, 0.0), (0.5, 0.0)],
)
def test_split_sizes(val_fraction, test_fraction):
    dm = _setup(val_fraction=val_fraction, test_fraction=test_fraction)
    n_train, n_val = len(dm.train_dataset), len(dm.val_dataset)
    n_test = len(dm.test_dataset) if test_fraction else 0
    # The rule: each held-out split holds ceil(fraction * 1797) images; training the rest.
    assert n_val == math.ceil(val_fraction * NUM_SAMPLES) == dm.num_val
    assert n_test == math.ceil(test_fraction * NUM_SAMPLES) == dm.num_test
    assert n_train == NUM_SAMPLES - n_val - n_test == dm.num_train
    assert dm.held_out_test is (test_fraction > 0)
    if (val_fraction, test_fraction) == (0.2, 0.2):  # the default
        assert (n_train, n_val, n_test) == (1077, 360, 360)
    if (val_fraction, test_fraction) == (0.2, 0.0):  # the earlier two-way split
        assert (n_train, n_val) == (1437, 360)
        assert dm.test_dataset is None


def _row_keys(x: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in x.reshape(len(x), -1)]


@pytest.mark.parametrize("test_fraction", [0.2, 0.0])
def test_splits_are_disjoint_and_cover_the_data(test_fraction):
    from sklearn.datasets import load_digits

    dm = _setup(normalize=False, test_fraction=test_fraction)
    splits = [dm.train_dataset, dm.val_dataset] + ([dm.test_dataset] if test_fraction else [])
    raw = torch.from_numpy(load_digits().images).float().div(16)
    x = torch.cat([ds.tensors[0] for ds in splits])
    # Same multiset of images: sort rows lexicographically by hashing each row to bytes.
    assert sorted(_row_keys(raw)) == sorted(_row_keys(x))


def test_splits_are_disjoint():
    """The 1797 digits are distinct images, so disjoint pixel rows mean disjoint samples."""
    dm = _setup()
    train, val, test = (
        set(_row_keys(ds.tensors[0])) for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    )
    assert (len(train), len(val), len(test)) == (1077, 360, 360)
    assert not test & train and not test & val and not val & train


def test_split_indices_partition_the_data():
    from sklearn.datasets import load_digits

    from scl_lightning.data.digits import _three_way_split

    train, val, test = _three_way_split(load_digits().target, 360, 360, split_seed=0)
    assert (len(train), len(val), len(test)) == (1077, 360, 360)
    assert sorted([*train, *val, *test]) == list(range(NUM_SAMPLES))


def test_test_loader_is_the_test_split_not_validation():
    dm = _setup(batch_size=2000)
    (x_test, y_test), (x_val, _) = next(iter(dm.test_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(x_test, dm.test_dataset.tensors[0])
    assert torch.equal(y_test, dm.test_dataset.tensors[1])
    assert x_test.shape == x_val.shape == (360, 1, 8, 8)
    assert not set(_row_keys(x_test)) & set(_row_keys(x_val))  # not one validation image
    x_pred, _ = next(iter(dm.predict_dataloader()))
    assert torch.equal(x_pred, x_test)


def test_without_test_split_test_loader_says_so():
    dm = _setup(test_fraction=0)
    for loader in (dm.test_dataloader, dm.predict_dataloader):
        with pytest.raises(ValueError, match=r"test_fraction=0\) has no test split"):
            loader()
    for stage in ("test", "predict"):
        with pytest.raises(ValueError, match=r"test_fraction=0\) has no test split"):
            DigitsDataModule(test_fraction=0).setup(stage)


@pytest.mark.parametrize("split", ["val", "test"])
def test_split_is_stratified(split):
    dm = _setup(val_fraction=0.2, test_fraction=0.2)
    counts = torch.bincount(getattr(dm, f"{split}_dataset").tensors[1], minlength=10)
    # 360 images over 10 roughly balanced classes (174-183 each): every class gets 34-38.
    assert counts.min() >= 34 and counts.max() <= 38
    train = torch.bincount(dm.train_dataset.tensors[1], minlength=10)
    assert train.min() >= 103 and train.max() <= 111


def test_test_split_depends_only_on_split_seed_and_test_fraction():
    torch.manual_seed(7)
    a = _setup(split_seed=3, val_fraction=0.1)
    torch.manual_seed(12345)
    b = _setup(split_seed=3, val_fraction=0.3, normalize=False)
    # normalization uses the training split's statistics, which val_fraction changes: compare
    # the raw pixels of a's test split
    raw_a = a.test_dataset.tensors[0] * a.std + a.mean
    torch.testing.assert_close(raw_a, b.test_dataset.tensors[0])
    assert torch.equal(a.test_dataset.tensors[1], b.test_dataset.tensors[1])
    c = _setup(split_seed=4)
    assert not torch.equal(c.test_dataset.tensors[0], _setup(split_seed=3).test_dataset.tensors[0])


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
    assert torch.equal(a.test_dataset.tensors[0], b.test_dataset.tensors[0])


def test_different_split_seed_gives_different_split():
    a = _setup(split_seed=0)
    b = _setup(split_seed=1)
    assert len(a.val_dataset) == len(b.val_dataset)
    assert not torch.equal(a.val_dataset.tensors[0], b.val_dataset.tensors[0])
    assert not torch.equal(a.test_dataset.tensors[0], b.test_dataset.tensors[0])


def test_setup_is_idempotent():
    dm = _setup()
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    dm.setup("validate")
    dm.setup("test")
    assert dm.train_dataset is train and dm.val_dataset is val and dm.test_dataset is test


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict", None])
def test_every_stage_builds_every_split(stage):
    dm = DigitsDataModule()
    dm.setup(stage)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1077, 360, 360)


def test_unnormalized_values_in_unit_range():
    dm = _setup(normalize=False)
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
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
    expected_test = (raw.test_dataset.tensors[0] - dm.mean) / dm.std
    torch.testing.assert_close(dm.test_dataset.tensors[0], expected_test)
    # the statistics are the training split's alone, not those of all 1797 images
    everything = torch.cat([raw.train_dataset.tensors[0], raw.test_dataset.tensors[0]])
    assert dm.mean != pytest.approx(float(everything.mean()), rel=1e-6)


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
    # Last training batch is kept, smaller: 1077 = 10 * 100 + 77.
    sizes = [len(y) for _, y in dm.train_dataloader()]
    assert sum(sizes) == 1077 and sizes[-1] == 77


def test_train_shuffles_eval_does_not():
    dm = _setup(batch_size=2000)
    torch.manual_seed(0)
    _, y1 = next(iter(dm.train_dataloader()))
    assert not torch.equal(y1, dm.train_dataset.tensors[1])
    _, yv = next(iter(dm.val_dataloader()))
    assert torch.equal(yv, dm.val_dataset.tensors[1])
    _, yt = next(iter(dm.test_dataloader()))
    assert torch.equal(yt, dm.test_dataset.tensors[1])


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
        (
            {"val_fraction": 0.9999, "test_fraction": 0},
            r"val_fraction=0.9999 leaves no training samples",
        ),
        ({"test_fraction": 1.0}, r"test_fraction must be a number in \[0, 1\), got 1.0"),
        ({"test_fraction": -0.2}, r"test_fraction must be a number in \[0, 1\), got -0.2"),
        ({"test_fraction": "0.2"}, r"test_fraction must be a number in \[0, 1\), got '0.2'"),
        ({"test_fraction": True}, r"test_fraction must be a number in \[0, 1\), got True"),
        ({"test_fraction": None}, r"test_fraction must be a number in \[0, 1\), got None"),
        (
            {"val_fraction": 0.5, "test_fraction": 0.5},
            r"val_fraction=0.5 and test_fraction=0.5 leave no training samples out of 1797 "
            r"\(899 validation \+ 899 test\); make their sum smaller$",
        ),
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
