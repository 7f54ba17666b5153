"""CIFAR DataModules on small archives in the official format, made here; nothing is downloaded."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from scl_lightning.data import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from scl_lightning.data._archive import (
    ArchiveError,
    DownloadError,
    restricted_pickle_load,
    safe_extract,
)
from scl_lightning.data.cifar import EpochShuffleSampler, InMemoryImageDataset
from scl_lightning.data.transforms import normalize

N_PER_BATCH = 64  # CIFAR-10: 5 training files of 64 images; CIFAR-100: one of 320
N_TEST = 32
N_TRAIN = 5 * N_PER_BATCH


# ------------------------------------------------------------ archives in the real format


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes strings and bytes as Python 2 ``str`` (BINSTRING), as the official files do."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _dumps(obj: dict, style: str) -> bytes:
    if style == "py3":
        # What the CIFAR README's loader gives: bytes keys, numpy uint8 data.
        return pickle.dumps(
            {k.encode(): v for k, v in obj.items()}, protocol=pickle.HIGHEST_PROTOCOL
        )
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x module path, as in pickles written by Python 2 numpy
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _batch(rng, n: int, label_key: str, num_classes: int, extra: dict | None = None) -> dict:
    return {
        "batch_label": "fake batch",
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
        **(extra or {}),
    }


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folders = sorted({name.split("/")[0] for name in files})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cifar10_files(style: str = "py3", seed: int = 0) -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(seed)
    train = [_batch(rng, N_PER_BATCH, "labels", 10) for _ in range(5)]
    test = _batch(rng, N_TEST, "labels", 10)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    meta = {"label_names": names, "num_cases_per_batch": N_PER_BATCH, "num_vis": 3072}
    files = {
        f"cifar-10-batches-py/data_batch_{i + 1}": _dumps(b, style) for i, b in enumerate(train)
    }
    files["cifar-10-batches-py/test_batch"] = _dumps(test, style)
    files["cifar-10-batches-py/batches.meta"] = _dumps(meta, style)
    files["cifar-10-batches-py/readme.html"] = b"<html></html>"
    truth = {
        "x_train": np.concatenate([b["data"] for b in train]).reshape(-1, 3, 32, 32),
        "y_train": np.concatenate([b["labels"] for b in train]),
        "x_test": test["data"].reshape(-1, 3, 32, 32),
        "y_test": np.asarray(test["labels"]),
        "names": names,
    }
    return files, truth


def _cifar100_files(style: str = "py3", seed: int = 1) -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(seed)

    def batch(n):
        return _batch(rng, n, "fine_labels", 100, {"coarse_labels": [0] * n})

    train, test = batch(N_TRAIN), batch(N_TEST)
    names = [f"class_{i}" for i in range(100)]
    meta = {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}
    files = {
        "cifar-100-python/train": _dumps(train, style),
        "cifar-100-python/test": _dumps(test, style),
        "cifar-100-python/meta": _dumps(meta, style),
    }
    truth = {
        "x_train": train["data"].reshape(-1, 3, 32, 32),
        "y_train": np.asarray(train["fine_labels"]),
        "x_test": test["data"].reshape(-1, 3, 32, 32),
        "y_test": np.asarray(test["fine_labels"]),
        "names": names,
    }
    return files, truth


@pytest.fixture(scope="module")
def cifar10_archive() -> tuple[bytes, dict]:
    files, truth = _cifar10_files()
    return _tar_gz(files), truth


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _place(
    tmp_path: Path, archive: bytes, monkeypatch, cls=CIFAR10DataModule, patch_md5=True
) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / cls.ARCHIVE_NAME).write_bytes(archive)
    if patch_md5:
        monkeypatch.setattr(cls, "ARCHIVE_MD5", _md5(archive))
    return data_dir


def _ready(tmp_path, archive, monkeypatch, cls=CIFAR10DataModule, stage="fit", **kwargs):
    data_dir = _place(tmp_path, archive, monkeypatch, cls)
    dm = cls(data_dir=data_dir, **kwargs)
    dm.prepare_data()
    dm.setup(stage)
    return dm


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------------- attributes, loading


@pytest.mark.parametrize(("cls", "classes"), [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_attributes_available_right_after_init_without_any_io(tmp_path, cls, classes):
    dm = cls(data_dir=tmp_path / "absent")
    assert dm.num_classes == classes
    assert dm.input_shape == (3, 32, 32)
    assert dm.train_dataset is None and dm.class_names is None
    assert dm.hparams["batch_size"] == 128 and dm.hparams["download"] is True
    assert dm.mean == cls.MEAN and dm.std == cls.STD
    assert not (tmp_path / "absent").exists()


def test_base_class_is_not_instantiable():
    with pytest.raises(TypeError, match="use CIFAR10DataModule or CIFAR100DataModule"):
        CIFARDataModule()


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar10_extracts_and_loads(tmp_path, monkeypatch, style):
    files, truth = _cifar10_files(style)
    dm = _ready(tmp_path, _tar_gz(files), monkeypatch, stage=None)
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]
    assert len(dm.train_dataset) == N_TRAIN and len(dm.test_dataset) == N_TEST
    for ds, x, y in (
        (dm.train_dataset, truth["x_train"], truth["y_train"]),
        (dm.test_dataset, truth["x_test"], truth["y_test"]),
    ):
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(y), 3, 32, 32)
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.images, torch.from_numpy(x))
        assert torch.equal(ds.labels, torch.from_numpy(y))
    assert dm.val_dataset is dm.test_dataset  # val_split=0: validate on the official test set
    assert dm.held_out_test is False  # so `scl fit` does not test after training
    assert dm.class_names == truth["names"]


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar100_uses_fine_labels(tmp_path, monkeypatch, style):
    files, truth = _cifar100_files(style)
    dm = _ready(tmp_path, _tar_gz(files), monkeypatch, cls=CIFAR100DataModule, stage=None)
    assert torch.equal(dm.train_dataset.images, torch.from_numpy(truth["x_train"]))
    assert torch.equal(dm.train_dataset.labels, torch.from_numpy(truth["y_train"]))
    assert torch.equal(dm.test_dataset.labels, torch.from_numpy(truth["y_test"]))
    assert int(dm.train_dataset.labels.max()) > 20  # fine, not coarse, labels
    assert dm.class_names == truth["names"]


def test_stages_load_only_what_they_need(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, stage="test")
    assert dm.train_dataset is None and dm.test_dataset is not None
    held = _ready(tmp_path, cifar10_archive[0], monkeypatch, stage="validate", val_split=0.25)
    assert held.train_dataset is not None and held.test_dataset is None
    train, val = held.train_dataset, held.val_dataset
    held.setup("fit")  # idempotent: the training set is not reloaded (nor re-split)
    assert held.train_dataset is train and held.val_dataset is val
    held.setup("test")  # the official test set comes on demand, validation stays the hold-out
    assert held.test_dataset is not None and held.val_dataset is val


def test_prepare_data_is_a_no_op_once_extracted(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch)
    (tmp_path / "data" / dm.ARCHIVE_NAME).unlink()  # the archive is no longer needed
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    dm.prepare_data()
    CIFAR10DataModule(data_dir=tmp_path / "data", download=False).prepare_data()


# --------------------------------------------------------------------------- download


def _no_network(url, *args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_download_fetches_checks_and_extracts(tmp_path, monkeypatch, cifar10_archive):
    archive, _ = cifar10_archive
    requested = []

    def fake_urlopen(url, *args, **kwargs):
        requested.append(url)
        return io.BytesIO(archive)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(CIFAR10DataModule, "ARCHIVE_MD5", _md5(archive))
    data_dir = tmp_path / "new" / "data"  # created by the download
    dm = CIFAR10DataModule(data_dir=data_dir)
    dm.prepare_data()
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert (data_dir / "cifar-10-python.tar.gz").read_bytes() == archive
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]
    dm.setup("fit")
    assert len(dm.train_dataset) == N_TRAIN


def test_official_urls_and_checksums():
    assert (
        CIFAR10DataModule.ARCHIVE_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )
    assert CIFAR10DataModule.ARCHIVE_MD5 == "c58f30108f718f92721af3b95e74349a"
    assert (
        CIFAR100DataModule.ARCHIVE_URL == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    )
    assert CIFAR100DataModule.ARCHIVE_MD5 == "eb9058c3a382ffc7106e4002c42a8d85"


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_offline_download_says_which_file_to_put_where(tmp_path, monkeypatch, cls):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as info:
        cls(data_dir=data_dir).prepare_data()
    assert isinstance(info.value, DownloadError)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"could not download {cls.ARCHIVE_URL}" in msg
    assert "Temporary failure in name resolution" in msg
    assert f"put it at {(data_dir / cls.ARCHIVE_NAME).resolve()} (MD5 {cls.ARCHIVE_MD5})" in msg
    assert list(data_dir.iterdir()) == []  # no partial download left behind


def test_connection_dropped_mid_download(tmp_path, monkeypatch, cifar10_archive):
    class Dropping(io.BytesIO):
        def read(self, *args):
            raise ConnectionResetError("Connection reset by peer")

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Dropping(b""))
    with pytest.raises(DownloadError, match=r"Connection reset by peer.*put it at"):
        CIFAR10DataModule(data_dir=tmp_path).prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_download_with_wrong_checksum_is_kept_aside(tmp_path, monkeypatch, cifar10_archive):
    archive, _ = cifar10_archive
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(archive))
    with pytest.raises(
        ArchiveError,
        match=r"has MD5 [0-9a-f]{32} but c58f30108f718f92721af3b95e74349a was expected",
    ):
        CIFAR10DataModule(data_dir=tmp_path).prepare_data()
    assert [p.name for p in tmp_path.iterdir()] == [f"cifar-10-python.tar.gz.{_md5(archive)}.bad"]


# --------------------------------------------------------------------- checksum, corruption


def test_checksum_mismatch_names_file_checksums_and_keeps_the_file(
    tmp_path, monkeypatch, cifar10_archive
):
    archive, _ = cifar10_archive
    data_dir = _place(tmp_path, archive, monkeypatch, patch_md5=False)
    actual = _md5(archive)
    with pytest.raises(ValueError) as info:
        CIFAR10DataModule(data_dir=data_dir).prepare_data()
    msg = str(info.value)
    assert isinstance(info.value, ArchiveError) and "\n" not in msg
    assert str(data_dir / "cifar-10-python.tar.gz") in msg
    assert f"has MD5 {actual} but c58f30108f718f92721af3b95e74349a was expected" in msg
    assert "run again to download a fresh copy" in msg
    moved = data_dir / f"cifar-10-python.tar.gz.{actual}.bad"
    assert f"moved aside to {moved.name}" in msg
    assert moved.read_bytes() == archive  # never deleted
    assert sorted(p.name for p in data_dir.iterdir()) == [moved.name]  # nothing extracted


def test_checksum_mismatch_without_download_says_where_to_get_it(
    tmp_path, monkeypatch, cifar10_archive
):
    data_dir = _place(tmp_path, cifar10_archive[0], monkeypatch, patch_md5=False)
    with pytest.raises(
        ArchiveError, match=r"put cifar-10-python.tar.gz from https://www.cs.toronto.edu/"
    ):
        CIFAR10DataModule(data_dir=data_dir, download=False).prepare_data()


def test_truncated_archive_fails_its_checksum(tmp_path, monkeypatch, cifar10_archive):
    data_dir = _place(tmp_path, cifar10_archive[0][:5000], monkeypatch, patch_md5=False)
    with pytest.raises(ArchiveError, match="is corrupt, truncated or not the official one"):
        CIFAR10DataModule(data_dir=data_dir).prepare_data()


@pytest.mark.parametrize("cut", [0.5, 0.98, "garbage"])
def test_truncated_or_corrupt_archive_with_matching_checksum(
    tmp_path, monkeypatch, cifar10_archive, cut
):
    archive = cifar10_archive[0]
    bad = os.urandom(4000) if cut == "garbage" else archive[: int(len(archive) * cut)]
    data_dir = _place(tmp_path, bad, monkeypatch)  # the checksum matches the damaged bytes
    with pytest.raises(
        ArchiveError, match=r"cannot read .*cifar-10-python.tar.gz: it is truncated or corrupt"
    ):
        CIFAR10DataModule(data_dir=data_dir).prepare_data()
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "cifar-10-python.tar.gz"
    ]  # nothing partial


def test_archive_without_the_expected_files(tmp_path, monkeypatch):
    data_dir = _place(tmp_path, _tar_gz({"cifar-10-batches-py/readme.html": b"x"}), monkeypatch)
    with pytest.raises(
        ArchiveError, match=r"did not provide cifar-10-batches-py/ with data_batch_1"
    ):
        CIFAR10DataModule(data_dir=data_dir).prepare_data()


def test_corrupt_batch_file(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, stage="test")
    path = dm.folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(
        ArchiveError, match=r"cannot unpickle .*data_batch_2: it is truncated or corrupt"
    ):
        CIFAR10DataModule(data_dir=tmp_path / "data").setup("fit")


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (
            {"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4},
            r"'data' must be a uint8 array",
        ),
        (
            {"data": np.zeros((4, 1024), np.uint8), "labels": [0] * 4},
            r"'data' must have 3072 columns",
        ),
        (
            {"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3},
            r"'labels' must be a list of 4",
        ),
        (
            {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]},
            r"must lie in \[0, 10\)",
        ),
        ({"data": np.zeros((4, 3072), np.uint8)}, r"'labels' must be a list of 4 labels"),
        ([1, 2, 3], r"expected a pickled dict, found list"),
    ],
)
def test_batch_file_in_the_wrong_format(tmp_path, monkeypatch, cifar10_archive, batch, match):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, stage="test")
    (dm.folder / "data_batch_3").write_bytes(pickle.dumps(batch))
    with pytest.raises(
        ArchiveError, match=rf"data_batch_3 is not in the expected format: .*{match}"
    ):
        CIFAR10DataModule(data_dir=tmp_path / "data").setup("fit")


# -------------------------------------------------------------------------- unsafe input


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickle_is_refused_before_it_runs(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, stage="test")
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((2, 3072), np.uint8), b"labels": _Evil(marker)}
    (dm.folder / "data_batch_1").write_bytes(pickle.dumps(payload))
    with pytest.raises(
        ArchiveError,
        match=r"refusing to unpickle .*data_batch_1: global posix.mkdir is not allowed",
    ):
        CIFAR10DataModule(data_dir=tmp_path / "data").setup("fit")
    assert not marker.exists()


class _Codec:
    """Pickles as a call of _codecs.encode with an arbitrary codec."""

    def __init__(self, text: str, codec: str):
        self.args = (text, codec)

    def __reduce__(self):
        import codecs

        return (codecs.encode, self.args)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_restricted_unpickler(tmp_path, protocol):
    path = tmp_path / "f.pkl"
    obj = {
        b"data": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "x": [1, 2.5, "s", b"b", b"", b"\xff", None, (1,), {"k": [True]}],
    }
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    loaded = restricted_pickle_load(path)
    assert np.array_equal(loaded[b"data"], obj[b"data"]) and loaded["x"] == obj["x"]
    for evil in (eval, os.system, SimpleNamespace, _Codec("x", "rot13"), _Codec("x", "zlib")):
        path.write_bytes(pickle.dumps({"f": evil}, protocol=protocol))
        with pytest.raises(ArchiveError, match="is not allowed"):
            restricted_pickle_load(path)


def _evil_archive(kind: str, outside: Path) -> bytes:
    files, _ = _cifar10_files()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo()
        payload = b"owned"
        if kind == "dotdot":
            info.name = "../evil"
        elif kind == "nested_dotdot":
            info.name = "cifar-10-batches-py/../../evil"
        elif kind == "absolute":
            info.name = str(outside / "evil")
        elif kind in ("symlink_abs", "symlink_rel", "hardlink"):
            info.name = "cifar-10-batches-py/link"
            info.type = {"hardlink": tarfile.LNKTYPE}.get(kind, tarfile.SYMTYPE)
            info.linkname = {"symlink_rel": "../../outside/evil"}.get(kind, "/etc/passwd")
            payload = b""
        elif kind == "device":
            info.name = "cifar-10-batches-py/dev"
            info.type = tarfile.CHRTYPE
            payload = b""
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("dotdot", r"'\.\./evil' has a '\.\.' component"),
        ("nested_dotdot", r"has a '\.\.' component"),
        ("absolute", r"has an absolute path"),
        ("symlink_abs", r"is a symbolic link to the absolute path '/etc/passwd'"),
        ("symlink_rel", r"is a symbolic link to '\.\./\.\./outside/evil', with a '\.\.' component"),
        ("hardlink", r"is a hard link to the absolute path '/etc/passwd'"),
        ("device", r"is a device, FIFO or other special file"),
    ],
)
def test_malicious_archive_is_refused_and_nothing_is_written(tmp_path, monkeypatch, kind, match):
    outside = tmp_path / "outside"
    outside.mkdir()
    data_dir = _place(tmp_path / "work", _evil_archive(kind, outside), monkeypatch)
    before = _listing(tmp_path)
    with pytest.raises(
        ArchiveError, match=rf"refusing to extract .*cifar-10-python.tar.gz: member .*{match}"
    ):
        CIFAR10DataModule(data_dir=data_dir).prepare_data()
    assert _listing(tmp_path) == before  # nothing extracted, inside or outside
    assert not (tmp_path / "evil").exists() and not (tmp_path / "work" / "evil").exists()


def test_safe_extract_allows_links_that_stay_inside(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("top/file")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("top/link")
        link.type, link.linkname = tarfile.SYMTYPE, "file"
        tar.addfile(link)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    assert safe_extract(tmp_path / "a.tar", tmp_path / "out") == ["top"]
    assert (tmp_path / "out" / "top" / "link").read_bytes() == b"hi"
    # extracting again keeps what is there
    (tmp_path / "out" / "top" / "file").write_bytes(b"mine")
    safe_extract(tmp_path / "a.tar", tmp_path / "out")
    assert (tmp_path / "out" / "top" / "file").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path / "out")) == ["top"]


# ------------------------------------------------------------------------- missing data


def test_missing_data_dir_without_download(tmp_path):
    data_dir = tmp_path / "nowhere"
    with pytest.raises(
        FileNotFoundError,
        match=r"data_dir .*nowhere does not exist and download=False: create it and put "
        r"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
        r"\(MD5 c58f",
    ):
        CIFAR10DataModule(data_dir=data_dir, download=False).prepare_data()
    assert not data_dir.exists()


def test_empty_data_dir_without_download(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"CIFAR-100 not found in .* and download=False: put cifar-100-python.tar.gz",
    ):
        CIFAR100DataModule(data_dir=tmp_path, download=False).prepare_data()


def test_data_dir_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        CIFAR10DataModule(data_dir=tmp_path / "file").prepare_data()


def test_setup_before_prepare_data(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"no CIFAR-10 in .* \(cifar-10-batches-py/ is missing\): call prepare_data\(\) first",
    ):
        CIFAR10DataModule(data_dir=tmp_path).setup("fit")


def test_incomplete_extracted_folder(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch)
    (dm.folder / "data_batch_4").unlink()
    for call in (
        dm.prepare_data,
        lambda: CIFAR10DataModule(data_dir=tmp_path / "data").setup("fit"),
    ):
        with pytest.raises(
            FileNotFoundError, match=r"is incomplete \(data_batch_4 missing\): delete that folder"
        ):
            call()


def test_dataloader_before_setup():
    with pytest.raises(
        RuntimeError, match=r"CIFAR10DataModule has no training data yet: call setup\(\)"
    ):
        CIFAR10DataModule().train_dataloader()


# ------------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data_dir": ""}, r"data_dir must be a non-empty path, got ''"),
        ({"data_dir": 3}, r"data_dir must be a non-empty path, got 3"),
        ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ({"batch_size": 2.0}, r"batch_size must be a positive integer, got 2.0"),
        ({"batch_size": True}, r"batch_size must be a positive integer, got True"),
        ({"num_workers": -1}, r"num_workers must be a non-negative integer, got -1"),
        ({"download": "yes"}, r"download must be True or False, got 'yes'"),
        ({"val_split": 1.0}, r"val_split must be a number in \[0, 1\), got 1.0"),
        ({"val_split": -0.1}, r"val_split must be a number in \[0, 1\), got -0.1"),
        ({"val_split": "0.1"}, r"val_split must be a number in \[0, 1\), got '0.1'"),
        ({"val_split": True}, r"val_split must be a number in \[0, 1\), got True"),
        ({"split_seed": -1}, r"split_seed must be an integer in \[0, 2\*\*32\), got -1"),
        ({"split_seed": 2**32}, r"split_seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
        ({"seed": 1.5}, r"seed must be None or an integer in \[0, 2\*\*32\), got 1.5"),
        ({"seed": -2}, r"seed must be None or an integer in \[0, 2\*\*32\), got -2"),
        ({"augment": 1}, r"augment must be True or False, got 1"),
        ({"crop_padding": -4}, r"crop_padding must be a non-negative integer, got -4"),
        ({"crop_padding": 4.0}, r"crop_padding must be a non-negative integer, got 4.0"),
        ({"flip": None}, r"flip must be True or False, got None"),
        ({"cutout": -1}, r"cutout must be an integer in \[0, 32\] \(0 disables it\), got -1"),
        ({"cutout": 33}, r"cutout must be an integer in \[0, 32\] \(0 disables it\), got 33"),
        ({"normalize": "no"}, r"normalize must be True or False, got 'no'"),
        ({"mean": (0.5, 0.5)}, r"mean must be None or three finite numbers, got \(0.5, 0.5\)"),
        ({"mean": "abc"}, r"mean must be None or three finite numbers, got 'abc'"),
        ({"mean": (0.5, float("nan"), 0.5)}, r"mean must be None or three finite numbers"),
        ({"std": (0.2, 0.0, 0.2)}, r"std must be positive in every channel, got \(0.2, 0.0, 0.2\)"),
        ({"std": (0.2, True, 0.2)}, r"std must be None or three finite numbers"),
        ({"pin_memory": "true"}, r"pin_memory must be True or False, got 'true'"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


def test_custom_statistics_and_no_normalization():
    dm = CIFAR100DataModule(mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25))
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.25, 0.25, 0.25)
    raw = CIFAR100DataModule(normalize=False)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out, _ = raw.on_after_batch_transfer((x, torch.zeros(2)), 0)
    torch.testing.assert_close(out, x.float() / 255)


# ------------------------------------------------------------------------ splits, loaders


def test_val_split_holds_out_a_seeded_part_of_training(tmp_path, monkeypatch, cifar10_archive):
    archive, truth = cifar10_archive
    dm = _ready(tmp_path, archive, monkeypatch, stage=None, val_split=0.1, split_seed=3)
    n_val = 32  # ceil(0.1 * 320)
    assert len(dm.val_dataset) == n_val and len(dm.train_dataset) == N_TRAIN - n_val
    assert dm.val_dataset is not dm.test_dataset and len(dm.test_dataset) == N_TEST
    assert dm.held_out_test is True
    everything = torch.cat([dm.train_dataset.images, dm.val_dataset.images]).flatten(1)
    key = sorted(r.numpy().tobytes() for r in everything)
    assert key == sorted(r.tobytes() for r in truth["x_train"].reshape(N_TRAIN, -1))
    torch.manual_seed(123)
    again = _ready(tmp_path / "b", archive, monkeypatch, stage="fit", val_split=0.1, split_seed=3)
    other = _ready(tmp_path / "c", archive, monkeypatch, stage="fit", val_split=0.1, split_seed=4)
    assert torch.equal(again.val_dataset.images, dm.val_dataset.images)
    assert not torch.equal(other.val_dataset.images, dm.val_dataset.images)
    too_big = CIFAR10DataModule(data_dir=tmp_path / "data", val_split=0.999)
    with pytest.raises(ValueError, match=r"val_split=0.999 holds out all 320 training images"):
        too_big.setup("fit")


def test_dataloaders_yield_uint8_batches(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, stage=None, batch_size=100)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and isinstance(
        train.sampler, EpochShuffleSampler
    )
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler)
        x, y = next(iter(loader))
        assert torch.equal(x, dm.test_dataset.images[:32]) and torch.equal(
            y, dm.test_dataset.labels
        )
    sizes = []
    for x, y in train:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        sizes.append(len(y))
    assert sizes == [100, 100, 100, 20]
    assert train.pin_memory is (torch.cuda.is_available() or torch.accelerator.is_available())


def _order(loader) -> list[int]:
    # labels alone may repeat: identify images by their first bytes
    ds = loader.dataset
    index = {ds.images[i].flatten()[:16].numpy().tobytes(): i for i in range(len(ds))}
    return [index[img.flatten()[:16].numpy().tobytes()] for x, _ in loader for img in x]


def test_train_order_reproducible_from_the_seed_and_reshuffled_each_epoch(
    tmp_path, monkeypatch, cifar10_archive
):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, seed=5, batch_size=64)
    loader = dm.train_dataloader()
    epoch0, epoch1 = _order(loader), _order(loader)
    assert sorted(epoch0) == list(range(N_TRAIN)) and sorted(epoch1) == list(range(N_TRAIN))
    assert epoch0 != epoch1 and epoch0 != list(range(N_TRAIN))
    fresh = dm.train_dataloader()
    assert _order(fresh) == epoch0  # same seed, same orders
    fresh.sampler.set_epoch(1)  # what Lightning calls each epoch: order depends on (seed, epoch)
    assert _order(fresh) == epoch1
    dm.seed = 6
    assert _order(dm.train_dataloader()) != epoch0


def test_train_seed_defaults_to_pl_global_seed(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch)
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    from_env = _order(dm.train_dataloader())
    dm.seed = 5
    assert _order(dm.train_dataloader()) == from_env
    monkeypatch.setenv("PL_GLOBAL_SEED", "6")
    dm.seed = None
    assert _order(dm.train_dataloader()) != from_env


def test_distributed_sampler_shards_like_lightning(tmp_path, monkeypatch, cifar10_archive):
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, batch_size=50)
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")

    def shard(rank: int, epoch: int) -> list[int]:
        # Exactly what Lightning does to a train dataloader under DDP.
        loader = dm.train_dataloader()
        sampler = _get_distributed_sampler(
            loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank
        )
        assert type(sampler) is DistributedSampler and sampler.seed == 7
        new = _update_dataloader(loader, sampler)
        assert new.collate_fn is loader.collate_fn and new.batch_size == 50
        new.sampler.set_epoch(epoch)
        return _order(new)

    for epoch in (0, 1):
        r0, r1 = shard(0, epoch), shard(1, epoch)
        assert len(r0) == len(r1) == N_TRAIN // 2
        assert not set(r0) & set(r1) and set(r0) | set(r1) == set(range(N_TRAIN))
    assert shard(0, 0) == shard(0, 0)  # reproducible
    assert shard(0, 0) != shard(0, 1) and set(shard(0, 0)) != set(shard(0, 1))  # reshuffled


# --------------------------------------------------------------- transforms in the Trainer


def _fake_trainer(training: bool, rank: int = 0, epoch: int = 0, batch: int = 0) -> Any:
    """What on_after_batch_transfer reads of a Trainer: the batch index is Lightning's count of
    batches made ready in the current epoch."""
    progress = SimpleNamespace(current=SimpleNamespace(ready=batch))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(training=training, global_rank=rank, current_epoch=epoch, fit_loop=loop)


def test_on_after_batch_transfer_augments_in_training_and_only_normalizes_otherwise():
    dm = CIFAR10DataModule(seed=0, cutout=8)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(64)
    expected = normalize(x, CIFAR10DataModule.MEAN, CIFAR10DataModule.STD)
    out, labels = dm.on_after_batch_transfer((x, y), 0)  # no trainer: normalize only
    assert labels is y and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    dm.trainer = _fake_trainer(training=False)
    torch.testing.assert_close(dm.on_after_batch_transfer((x, y), 0)[0], expected)

    dm.trainer = _fake_trainer(training=True, batch=0)
    first = dm.on_after_batch_transfer((x, y), 0)[0]
    dm.trainer = _fake_trainer(training=True, batch=1)
    second = dm.on_after_batch_transfer((x, y), 0)[0]
    assert first.shape == x.shape and not torch.allclose(first, expected)
    assert not torch.equal(first, second)  # fresh noise for every batch
    # reproducible: the same seed, rank, epoch and batch index give the same noise, even in a
    # fresh module (a run resumed mid-epoch) ...
    twin = CIFAR10DataModule(seed=0, cutout=8)
    twin.trainer = _fake_trainer(training=True, batch=1)
    assert torch.equal(twin.on_after_batch_transfer((x, y), 0)[0], second)
    twin.trainer = _fake_trainer(training=True, batch=0)
    assert torch.equal(twin.on_after_batch_transfer((x, y), 0)[0], first)
    # ... and another rank or epoch different noise
    for rank, epoch in ((1, 0), (0, 1)):
        other = CIFAR10DataModule(seed=0, cutout=8)
        other.trainer = _fake_trainer(training=True, rank=rank, epoch=epoch)
        assert not torch.equal(other.on_after_batch_transfer((x, y), 0)[0], first)

    plain = CIFAR10DataModule(augment=False, cutout=8)
    plain.trainer = _fake_trainer(training=True)
    torch.testing.assert_close(plain.on_after_batch_transfer((x, y), 0)[0], expected)


class _TinyClassifier(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}

    def _step(self, batch, split):
        x, y = batch
        self.seen[split].append(x.detach().clone())
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_fit_validate_and_test(tmp_path, monkeypatch, cifar10_archive):
    data_dir = _place(tmp_path, cifar10_archive[0], monkeypatch)
    dm = CIFAR10DataModule(data_dir=data_dir, batch_size=16, cutout=8)
    model = _TinyClassifier()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and (data_dir / "cifar-10-batches-py").is_dir()
    assert len(model.seen["train"]) == 2
    expected_val = normalize(dm.val_dataset.images[:16], dm.mean, dm.std)
    for x in model.seen["val"]:  # sanity check and validation: normalized, not augmented
        torch.testing.assert_close(x, expected_val)
    for x in model.seen["train"]:
        assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
        assert bool((x == 0).any())  # the cutout squares
    trainer.test(model, datamodule=dm, verbose=False)
    torch.testing.assert_close(
        model.seen["test"][0], normalize(dm.test_dataset.images[:16], dm.mean, dm.std)
    )


def test_in_memory_dataset_contract():
    ds = InMemoryImageDataset(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.tensor([7, 8, 9]))
    assert len(ds) == 3 and ds[1][1] == 8
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\) and labels \(N,\)"):
        InMemoryImageDataset(torch.zeros(3, 2, 2), torch.zeros(3))


def test_worker_processes_give_the_same_batches(tmp_path, monkeypatch, cifar10_archive):
    dm = _ready(tmp_path, cifar10_archive[0], monkeypatch, seed=2, num_workers=1, batch_size=64)
    loader = dm.train_dataloader()
    assert loader.persistent_workers is True
    # the collate_fn must survive pickling to reach spawned workers
    assert pickle.loads(pickle.dumps(loader.collate_fn)) is loader.collate_fn
    with_worker = _order(loader)
    dm.num_workers = 0
    assert _order(dm.train_dataloader()) == with_worker


def test_batches_that_are_not_uint8_image_batches_pass_unchanged(tmp_path):
    """Lightning sends the model's float example_input_array through on_after_batch_transfer
    for its summary; the hook must leave it alone."""
    dm = CIFAR10DataModule(data_dir=tmp_path, download=False)
    example = torch.zeros(1, 3, 32, 32)
    assert dm.on_after_batch_transfer(example, 0) is example
    pair = (torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert dm.on_after_batch_transfer(pair, 0) is pair


class _CraftedDtype:
    """Pickles as numpy.dtype(spec) followed by a BUILD with an arbitrary state."""

    def __init__(self, spec: str, state: tuple) -> None:
        self.spec, self.state = spec, state

    def __reduce__(self):
        return (np.dtype, (self.spec, False, True), self.state)


@pytest.mark.parametrize(
    ("spec", "state", "match"),
    [
        # an object dtype: numpy would read the raw bytes of an array as object pointers
        ("O8", (3, "|", None, None, None, -1, -1, 63), "dtype.*is not allowed"),
        # a plain dtype whose state claims it holds objects (flags) or changes its item size
        ("u1", (3, "|", None, None, None, -1, -1, 63), "crafted state"),
        ("u1", (3, "|", None, None, None, 8, 1, 0), "crafted state"),
    ],
)
def test_restricted_unpickler_refuses_dangerous_dtypes(tmp_path, spec, state, match):
    from scl_lightning.data._archive import ArchiveError, restricted_pickle_load

    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({"labels": [_CraftedDtype(spec, state)]}, protocol=2))
    with pytest.raises(ArchiveError, match=match):
        restricted_pickle_load(path)


def test_restricted_unpickler_accepts_numpys_own_dtype_state(tmp_path):
    from scl_lightning.data._archive import restricted_pickle_load

    path = tmp_path / "ok"
    data = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "f": np.ones(2, np.float32)}
    path.write_bytes(pickle.dumps(data, protocol=2))
    loaded = restricted_pickle_load(path)
    assert np.array_equal(loaded["data"], data["data"]) and loaded["f"].dtype == np.float32


def _tar_with(tmp_path, add) -> Path:
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        add(tar)
    return path


def _file(tar, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _hardlink(tar, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    tar.addfile(info)


@pytest.mark.parametrize(
    ("add", "match"),
    [
        (lambda t: _hardlink(t, "a", "missing"), "not an earlier file"),
        (lambda t: (_hardlink(t, "a", "b"), _file(t, "b")), "not an earlier file"),
        (lambda t: _file(t, "n" * 300), "cannot extract"),
    ],
    ids=["hardlink-to-missing", "hardlink-before-target", "name-too-long"],
)
def test_odd_archives_end_in_one_archive_error(tmp_path, add, match):
    from scl_lightning.data._archive import ArchiveError, safe_extract

    archive = _tar_with(tmp_path, add)
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match=match):
        safe_extract(archive, target)
    assert not [p for p in target.iterdir() if not p.name.startswith(".extract-")]


def test_neighbouring_seeds_do_not_share_epoch_orders():
    from scl_lightning.data.cifar import EpochShuffleSampler

    a, b = EpochShuffleSampler(range(100), seed=0), EpochShuffleSampler(range(100), seed=1)
    a.set_epoch(1)
    b.set_epoch(0)
    assert list(a) != list(b)
