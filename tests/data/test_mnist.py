"""The IDX reader and the MNIST / Fashion-MNIST DataModules, on small IDX files made here; the
``slow`` test reads the real Fashion-MNIST files when they are installed. Nothing downloads."""

from __future__ import annotations

import gzip
import hashlib
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from scl_lightning.data import FashionMNISTDataModule, MNISTDataModule
from scl_lightning.data._archive import ArchiveError
from scl_lightning.data.idx import read_idx, write_idx

N_TRAIN, N_TEST = 40, 20


def _arrays(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n = N_TRAIN if split == "train" else N_TEST
    rng = np.random.default_rng(seed + (split == "t10k"))
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def _write_set(folder: Path, *, gz: bool = True) -> dict[str, str]:
    """The four files of a tiny dataset; returns the SHA-256 of each decompressed file."""
    folder.mkdir(parents=True, exist_ok=True)
    shas = {}
    for split in ("train", "t10k"):
        images, labels = _arrays(split)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            path = write_idx(folder / (name + (".gz" if gz else "")), array)
            raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
            shas[name] = hashlib.sha256(raw).hexdigest()
    return shas


def _tiny(shas: dict[str, str] | None = None) -> type[FashionMNISTDataModule]:
    class TinyFashion(FashionMNISTDataModule):
        NUM_SAMPLES = {"train": N_TRAIN, "t10k": N_TEST}
        CONTENT_SHA256 = shas

    return TinyFashion


@pytest.fixture(autouse=True)
def _no_default_dirs(tmp_path, monkeypatch):
    # Default folders point into tmp_path only: never the user's cache or the system package.
    monkeypatch.setenv("SCL_DATA_DIR", str(tmp_path / "scl_data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(FashionMNISTDataModule, "SYSTEM_DIRS", ())

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


# ----------------------------------------------------------------------------- the IDX reader


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 5], dtype=np.int16),
        np.array([[1.5, -2.0]], dtype=np.float32),
    ],
    ids=["uint8", "int16", "float32"],
)
def test_idx_round_trip(tmp_path, array, gz):
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array)
    out = read_idx(path)
    assert out.dtype == array.dtype.newbyteorder("=") and np.array_equal(out, array)


def test_idx_checks_sha256_of_the_decompressed_content(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    raw = write_idx(tmp_path / "a", array).read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    # Two different compressions of the same content both pass.
    (tmp_path / "fast.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
    (tmp_path / "best.gz").write_bytes(gzip.compress(raw, compresslevel=9, mtime=123))
    for name in ("a", "fast.gz", "best.gz"):
        assert np.array_equal(read_idx(tmp_path / name, sha256=sha), array)
    with pytest.raises(ArchiveError, match=r"SHA-256 .* expected 0+: it is not the official file"):
        read_idx(tmp_path / "a", sha256="0" * 64)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x08\x03\x00\x00rest", "not an IDX file"),
        (b"", "not an IDX file .magic number missing"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "header is incomplete"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "truncated: 11 bytes decompressed"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01ab", "longer than its header says"),
    ],
)
def test_idx_bad_files_are_one_error_and_kept(tmp_path, content, match):
    path = tmp_path / "bad-ubyte"
    path.write_bytes(content)
    with pytest.raises(ArchiveError, match=match):
        read_idx(path, hint="do this")
    assert path.read_bytes() == content


def test_idx_truncated_gzip_is_one_error_and_kept(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match=r"cannot decompress .*truncated or corrupt.*; fix it"):
        read_idx(path, hint="fix it")
    assert path.exists()


def test_idx_shape_check_and_unwritable_dtype(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((3, 2), np.uint8))
    with pytest.raises(ArchiveError, match=r"shape \(3, 2\), expected \(3, 3\)"):
        read_idx(path, shape=(3, 3))
    with pytest.raises(ValueError, match="cannot write a complex64"):
        write_idx(tmp_path / "y", np.zeros(2, np.complex64))


# -------------------------------------------------------------------------- the DataModules


def test_splits_counts_and_batches(tmp_path, monkeypatch):
    folder = tmp_path / "fm"
    shas = _write_set(folder)
    dm = _tiny(shas)(data_dir=folder, batch_size=8, val_size=10, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10 and dm.test_dataset is None
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    dm.setup("test")
    assert len(dm.test_dataset) == N_TEST
    # The hold-out split depends on split_seed only; the union is the training file.
    images, _ = _arrays("train")
    union = torch.cat([dm.train_dataset.images, dm.val_dataset.images]).flatten(1)
    assert sorted(map(bytes, union.numpy())) == sorted(map(bytes, images.reshape(N_TRAIN, -1)))
    other = _tiny(shas)(data_dir=folder, val_size=10, download=False)
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    other.setup("fit")
    assert torch.equal(other.val_dataset.images, dm.val_dataset.images)


def test_test_set_is_held_out_unless_it_validates():
    """`scl fit` tests the final model on a data module's test split when it declares it held
    out: the official test set is, unless val_size=0 validates on it."""
    assert FashionMNISTDataModule(download=False).held_out_test is True
    assert FashionMNISTDataModule(download=False, val_size=0).held_out_test is False


def test_normalization_per_batch_and_optional_augmentation(tmp_path):
    folder = tmp_path / "fm"
    _write_set(folder)
    dm = _tiny()(data_dir=folder, batch_size=4, download=False, val_size=4)
    dm.setup("fit")
    x, y = dm.train_dataset.__getitems__([0, 1, 2, 3])
    out, _ = dm.on_after_batch_transfer((x, y), 0)
    expected = (x.float() / 255 - 0.2860) / 0.3530
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)
    aug = _tiny()(data_dir=folder, download=False, augment=True, flip=True, val_size=4)
    assert aug.batch_transform.crop_padding == 2 and aug.batch_transform.flip
    assert MNISTDataModule(download=False).batch_transform.crop_padding == 0


def test_uncompressed_files_are_read_too(tmp_path):
    folder = tmp_path / "raw"
    shas = _write_set(folder, gz=False)
    dm = _tiny(shas)(data_dir=folder, download=False, val_size=0)
    dm.setup("fit")
    assert dm.val_dataset is dm.test_dataset and len(dm.train_dataset) == N_TRAIN


def test_default_folders_in_order(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _write_set(system)
    monkeypatch.setattr(FashionMNISTDataModule, "SYSTEM_DIRS", (str(system),))
    dm = _tiny()(download=False, val_size=4)
    assert dm.candidate_dirs() == [
        tmp_path / "scl_data" / "fashion-mnist",
        tmp_path / "home" / ".cache" / "scl-lightning" / "fashion-mnist",
        system,
    ]
    assert dm.folder == system
    _write_set(tmp_path / "home" / ".cache" / "scl-lightning" / "fashion-mnist")
    assert dm.folder == tmp_path / "home" / ".cache" / "scl-lightning" / "fashion-mnist"
    assert MNISTDataModule().candidate_dirs()[-1].name == "mnist"


def test_absent_data_is_one_line_saying_make_data(tmp_path):
    dm = FashionMNISTDataModule(download=False)
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST not found .*run `make data`") as e:
        dm.prepare_data()
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="run `make data`"):
        dm.setup("fit")


def test_download_goes_to_the_first_folder_and_is_checked(tmp_path, monkeypatch):
    import io

    payloads = {}
    md5s = {}
    for split in ("train", "t10k"):
        for kind, array in zip(("images-idx3", "labels-idx1"), _arrays(split), strict=True):
            name = f"{split}-{kind}-ubyte"
            raw = write_idx(tmp_path / name, array).read_bytes()
            payloads[name] = gzip.compress(raw, mtime=0)
            md5s[name] = hashlib.md5(payloads[name]).hexdigest()
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO(payloads[url.rsplit("/", 1)[1][:-3]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cls = _tiny()
    monkeypatch.setattr(cls, "GZ_MD5", md5s)
    dm = cls(val_size=4)
    dm.prepare_data()
    target = tmp_path / "scl_data" / "fashion-mnist"
    assert dm.folder == target and len(urls) == 4
    assert all(u.startswith("http://fashion-mnist.s3-website") for u in urls)
    dm.setup("test")
    assert len(dm.test_dataset) == N_TEST


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    import urllib.error

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"the download failed.*without network") as e:
        MNISTDataModule().prepare_data()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "magic", "label", "checksum"])
def test_bad_file_is_one_error_and_never_deleted(tmp_path, damage):
    folder = tmp_path / "fm"
    shas = _write_set(folder)
    labels = folder / "train-labels-idx1-ubyte.gz"
    if damage == "truncate":
        labels.write_bytes(labels.read_bytes()[:20])
    elif damage == "magic":
        labels.write_bytes(gzip.compress(b"\x08\x08\x08\x01" + bytes(4 + N_TRAIN)))
    elif damage == "label":
        write_idx(labels, np.full(N_TRAIN, 10, np.uint8))
        shas = None  # the check of the values, not the checksum
    else:
        write_idx(labels, np.zeros(N_TRAIN, np.uint8))
    before = labels.read_bytes()
    dm = _tiny(shas)(data_dir=folder, download=False, val_size=4)
    with pytest.raises(ArchiveError, match="it was left in place: replace it") as e:
        dm.setup("fit")
    assert "\n" not in str(e.value) and labels.read_bytes() == before


def test_real_class_rejects_files_of_another_dataset(tmp_path):
    # Files of the official shape but not Fashion-MNIST's content fail the SHA-256.
    folder = tmp_path / "fm"
    folder.mkdir()
    for split, n in (("train", 60_000), ("t10k", 10_000)):
        write_idx(folder / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.zeros(n, np.uint8))
    dm = FashionMNISTDataModule(data_dir=folder, download=False)
    with pytest.raises(ArchiveError, match=r"SHA-256 .* not the official file"):
        dm.setup("test")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_size": 60_000}, "val_size must be an integer in"),
        ({"val_size": -1}, "val_size must be an integer in"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"augment": "yes"}, "augment must be True or False"),
        ({"crop_padding": 15}, "crop_padding must be an integer in"),
        ({"data_dir": ""}, "data_dir must be None or a non-empty path"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FashionMNISTDataModule(**kwargs)


def test_trains_in_a_trainer(tmp_path):
    folder = tmp_path / "fm"
    _write_set(folder)

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(784, 10)
            self.seen: list[int] = []

        def training_step(self, batch, _):
            x, y = batch
            assert x.dtype == torch.float32
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch, _):
            self.seen.append(len(batch[1]))

        test_step = validation_step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _tiny()(data_dir=folder, batch_size=16, download=False, val_size=8)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, barebones=True)
    model = Tiny()
    trainer.fit(model, datamodule=dm)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2  # 32 images
    assert sum(model.seen) == 8
    model.seen.clear()
    trainer.test(model, datamodule=dm, verbose=False)
    assert sum(model.seen) == N_TEST


@pytest.mark.slow
def test_real_fashion_mnist_when_installed(monkeypatch):
    system = "/usr/share/datasets/fashion-mnist"
    monkeypatch.setattr(FashionMNISTDataModule, "SYSTEM_DIRS", (system,))
    dm = FashionMNISTDataModule(download=False)
    if dm.folder is None:
        pytest.skip("Fashion-MNIST is not installed (run `make data`)")
    dm.setup()
    assert len(dm.train_dataset) == 55_000 and len(dm.val_dataset) == 5_000
    assert len(dm.test_dataset) == 10_000
    assert dm.test_dataset.images.shape == (10_000, 1, 28, 28)
    assert dm.test_dataset.images.dtype == torch.uint8
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    train_labels = torch.cat([dm.train_dataset.labels, dm.val_dataset.labels])
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(dm.test_dataset.labels).tolist() == [1000] * 10
    mean = float(dm.train_dataset.images.float().mean() / 255)
    assert abs(mean - FashionMNISTDataModule.MEAN) < 0.005
