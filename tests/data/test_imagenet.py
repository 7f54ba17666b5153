import math
import multiprocessing
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from scl_lightning.data import ImageNetDataModule
from scl_lightning.data import imagenet as imagenet_mod
from scl_lightning.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    BadImageWarning,
    ImageFolderDataset,
    _random_resized_crop_box,
)

Image = pytest.importorskip("PIL.Image")

CLASSES = ("cat", "dog", "fox")
N_TRAIN, N_VAL = 4, 2
SMALL = {"image_size": 32, "val_resize": 36, "batch_size": 4, "num_workers": 0}


def _class_image(label: int, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Random texture whose channel `label` is bright and the others dark, so any crop of it
    still tells its class: the mean of channel `label` is the largest."""
    w, h = size
    arr = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    arr[..., label] = rng.integers(190, 256, size=(h, w), dtype=np.uint8)
    return arr


def _make_tree(root: Path, classes=CLASSES, n_train=N_TRAIN, n_val=N_VAL, seed=0) -> Path:
    """An ImageFolder tree of real JPEGs of random sizes (36..59 pixels a side)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                size = tuple(int(s) for s in rng.integers(36, 60, size=2))
                Image.fromarray(_class_image(label, rng, size)).save(
                    folder / f"{name}_{k}.JPEG", quality=95
                )
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return _make_tree(tmp_path / "imagenet")


def _dm(root: Path, **kwargs) -> ImageNetDataModule:
    return ImageNetDataModule(root, **{**SMALL, **kwargs})


def _labels_from_colors(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(dim=(2, 3)).argmax(dim=1)


# ---------------------------------------------------------------------------------------------
# Attributes, listing, shapes


def test_attributes_known_in_init(tree):
    dm = _dm(tree)
    # Counted from train/ in __init__, before setup: LightningCLI links it into the model then.
    assert dm.num_classes == 3
    assert dm.input_shape == (3, 32, 32)
    assert dm.train_dataset is None and dm.classes is None
    assert dm.hparams["batch_size"] == 4 and dm.hparams["bad_images"] == "skip"
    assert _dm(tree, num_classes=3).num_classes == 3


def test_num_classes_fallback_when_data_absent(tmp_path):
    missing = tmp_path / "nowhere"
    assert ImageNetDataModule(missing).num_classes == 1000
    assert ImageNetDataModule(missing).input_shape == (3, 224, 224)
    assert ImageNetDataModule(missing, num_classes=100).num_classes == 100
    # Defaults documented in the brief and the docstring.
    dm = ImageNetDataModule(missing)
    assert (dm.batch_size, dm.num_workers, dm.val_resize, dm.min_scale) == (256, 8, 256, 0.08)
    assert dm.mean == IMAGENET_MEAN and dm.std == IMAGENET_STD


def test_num_classes_mismatch_with_folders(tree):
    with pytest.raises(ValueError, match=r"num_classes=5 but .*train holds 3 class folders"):
        _dm(tree, num_classes=5)


def test_num_classes_counted_before_data_arrived(tmp_path):
    root = tmp_path / "imagenet"
    dm = _dm(root)  # the data is not there yet: 1000 assumed
    _make_tree(root)
    with pytest.raises(ValueError, match=r"found 3 class folders .* but num_classes=1000"):
        dm.setup("fit")


def test_setup_lists_files_sorted_with_labels(tree):
    # Files that are not images, hidden files (macOS ._ files) and hidden folders are ignored.
    (tree / "train" / "cat" / "README.txt").write_text("not an image")
    (tree / "train" / "cat" / "._cat_0.JPEG").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tree / "train" / ".cache").mkdir()
    (tree / "train" / "labels.txt").write_text("cat\ndog\nfox\n")
    dm = _dm(tree)
    dm.setup("fit")
    assert dm.classes == list(CLASSES)
    assert dm.backend in ("pil", "torchvision")
    train, val = dm.train_dataset, dm.val_dataset
    assert len(train) == len(CLASSES) * N_TRAIN and len(val) == len(CLASSES) * N_VAL
    for ds in (train, val):
        for i in range(len(ds)):
            path = Path(ds.path(i))
            assert path.is_file() and path.suffix == ".JPEG"
            assert CLASSES[int(ds.labels[i])] == path.parent.name
    assert train.path(0).endswith(str(Path("train", "cat", "cat_0.JPEG")))


def test_extensions_are_case_insensitive(tree):
    folder = tree / "train" / "dog"
    rng = np.random.default_rng(1)
    for name, fmt in (("a.png", "PNG"), ("b.Jpg", "JPEG"), ("c.BMP", "BMP"), ("d.webp", "WEBP")):
        try:
            Image.fromarray(_class_image(1, rng, (40, 40))).save(folder / name, format=fmt)
        except (KeyError, OSError):  # pragma: no cover - Pillow built without that codec
            continue
    dm = _dm(tree)
    dm.setup("fit")
    extra = len(dm.train_dataset) - len(CLASSES) * N_TRAIN
    assert extra >= 3
    for i in range(len(dm.train_dataset)):
        x, y = dm.train_dataset[i]
        assert x.shape == (3, 32, 32) and int(_labels_from_colors(x[None])) == y


def test_train_and_val_batches(tree):
    dm = _dm(tree)
    dm.setup("fit")
    for loader, n in ((dm.train_dataloader(), 12), (dm.val_dataloader(), 6)):
        seen = 0
        for x, y in loader:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
            assert x.is_contiguous()
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
            # Every image still carries its class colour after crop and resize.
            assert torch.equal(_labels_from_colors(x), y)
            seen += x.shape[0]
        assert seen == n
    assert isinstance(dm.test_dataloader().dataset, ImageFolderDataset)
    assert dm.test_dataloader().dataset is dm.val_dataset
    assert dm.predict_dataloader().dataset is dm.val_dataset


def test_val_only_stages_skip_train(tree):
    dm = _dm(tree)
    dm.setup("validate")
    assert dm.train_dataset is None and len(dm.val_dataset) == 6
    dm.setup("fit")  # adds what is missing
    assert len(dm.train_dataset) == 12


def test_validate_without_train_folder(tree):
    import shutil

    shutil.rmtree(tree / "train")
    dm = _dm(tree, num_classes=3)
    dm.setup("test")
    assert dm.classes == list(CLASSES)
    with pytest.raises(FileNotFoundError, match=r"training folder .*train does not exist"):
        _dm(tree, num_classes=3).setup("fit")


def test_dataloader_before_setup(tree):
    with pytest.raises(RuntimeError, match="call setup"):
        _dm(tree).train_dataloader()


def test_pin_memory_only_with_accelerator(tree):
    dm = _dm(tree, pin_memory=True)
    dm.setup("fit")
    has_accel = torch.cuda.is_available() or (
        hasattr(torch, "accelerator") and torch.accelerator.is_available()
    )
    assert dm.train_dataloader().pin_memory == has_accel
    assert _dm(tree, pin_memory=False).pin_memory is False


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_train_crops_vary_val_deterministic(tree):
    dm = _dm(tree)
    dm.setup("fit")
    crops = []
    for seed in range(4):
        torch.manual_seed(seed)
        crops.append(dm.train_dataset[0][0])
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    torch.manual_seed(0)
    again = dm.train_dataset[0][0]
    assert torch.equal(again, crops[0])  # the torch RNG drives the crops: seeding reproduces

    a = dm.val_dataset[1][0]
    torch.manual_seed(123)
    assert torch.equal(dm.val_dataset[1][0], a)


def test_train_is_random_crop_then_resize(tree):
    dm = _dm(tree, min_scale=0.3, hflip=False)
    dm.setup("fit")
    ds = dm.train_dataset
    for i in range(len(ds)):
        torch.manual_seed(i)
        x = ds[i][0]
        with Image.open(ds.path(i)) as im:
            im = im.convert("RGB")
        torch.manual_seed(i)  # the same draws give the same box
        left, top, w, h = _random_resized_crop_box(im.width, im.height, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0.3 * 0.9 <= w * h / (im.width * im.height)
        ref = im.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BILINEAR)
        assert torch.equal(x, torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def test_val_is_resize_shorter_side_then_center_crop(tree):
    dm = _dm(tree, image_size=32, val_resize=40)
    dm.setup("validate")
    ds = dm.val_dataset
    for i in range(len(ds)):
        with Image.open(ds.path(i)) as im:
            im = im.convert("RGB")
        w, h = im.size
        # torchvision's Resize(40): shorter side 40, longer side int(40 * long / short).
        if w <= h:
            nw, nh = 40, int(40 * h / w)
        else:
            nw, nh = int(40 * w / h), 40
        ref = im.resize((nw, nh), Image.Resampling.BILINEAR)
        top, left = round((nh - 32) / 2), round((nw - 32) / 2)
        ref_arr = np.asarray(ref)[top : top + 32, left : left + 32]
        assert torch.equal(ds[i][0], torch.from_numpy(ref_arr.copy()).permute(2, 0, 1))


def test_random_resized_crop_box_properties():
    torch.manual_seed(0)
    for width, height in [(40, 50), (500, 375), (64, 64), (37, 300)]:
        for _ in range(200):
            left, top, w, h = _random_resized_crop_box(width, height, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            area = w * h / (width * height)
            # Rounding of w and h can move the area a little outside the requested range.
            assert 0.06 <= area <= 1.0
            if (w, h) != (width, height) and not (w == width or h == height):
                assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_random_resized_crop_fallbacks():
    # No crop of 8-100% of the area with aspect 3/4..4/3 fits a 100x1 strip: center crop with
    # the aspect ratio clamped to 4/3, as torchvision does.
    assert _random_resized_crop_box(100, 1, (0.08, 1.0), (3 / 4, 4 / 3)) == (49, 0, 1, 1)
    assert _random_resized_crop_box(2, 100, (0.08, 1.0), (3 / 4, 4 / 3)) == (0, 48, 2, 3)
    # scale=(1, 1) on a square image: only aspect exactly 1 fits, so the fallback takes it whole.
    assert _random_resized_crop_box(50, 50, (1.0, 1.0), (3 / 4, 4 / 3)) == (0, 0, 50, 50)


def _square_tree(root: Path) -> Path:
    """One lossless 32x32 PNG per class, so crops with min_scale=1 are the whole image."""
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(_class_image(label, rng, (32, 32))).save(root / split / name / "a.png")
    return root


@pytest.mark.parametrize("hflip", [True, False])
def test_hflip(tmp_path, hflip):
    root = _square_tree(tmp_path / "sq")
    dm = _dm(root, min_scale=1.0, hflip=hflip, val_resize=32)
    dm.setup("fit")
    with Image.open(dm.train_dataset.path(0)) as im:
        original = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    flipped = original.flip(-1)
    torch.manual_seed(0)
    outs = [dm.train_dataset[0][0] for _ in range(16)]
    n_orig = sum(torch.equal(o, original) for o in outs)
    n_flip = sum(torch.equal(o, flipped) for o in outs)
    assert n_orig + n_flip == 16  # nothing but the flip changes the image
    if hflip:
        assert n_orig > 0 and n_flip > 0
    else:
        assert n_flip == 0


# ---------------------------------------------------------------------------------------------
# Normalization on the device


def test_normalization_after_batch_transfer(tree):
    dm = _dm(tree, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = torch.tensor([0, 1])
    out_x, out_y = dm.on_after_batch_transfer([x, y], 0)
    mean = torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1)
    assert out_x.dtype == torch.float32
    torch.testing.assert_close(out_x, (x.float() / 255 - mean) / std)
    assert out_y is y
    # Tuples stay tuples; batches that are not uint8 images pass through untouched.
    assert isinstance(dm.on_after_batch_transfer((x, y), 0), tuple)
    floats = [x.float(), y]
    assert dm.on_after_batch_transfer(floats, 0) is floats


def test_default_normalization_matches_imagenet_stats(tree):
    dm = _dm(tree)
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = dm.normalize(x)
    for c in range(3):
        expected = (torch.tensor([0, 128, 255]) / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[0, c, 0], expected)


# ---------------------------------------------------------------------------------------------
# Worker processes


def test_workers_decode_same_as_main_process(tree):
    dm0 = _dm(tree, num_workers=0)
    dm2 = _dm(tree, num_workers=2)
    dm0.setup("fit")
    dm2.setup("fit")
    loader = dm2.val_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    assert dm0.val_dataloader().persistent_workers is False
    batches0 = list(dm0.val_dataloader())
    for _ in range(2):  # two passes over the persistent workers
        batches2 = list(loader)
        assert len(batches2) == len(batches0)
        for (x0, y0), (x2, y2) in zip(batches0, batches2, strict=True):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)
    labels = torch.cat([y for _, y in dm2.train_dataloader()])
    assert sorted(labels.tolist()) == sorted([0, 1, 2] * N_TRAIN)


def test_lightning_rebuilds_loader_with_distributed_sampler(tree):
    # What Lightning does under DDP: re-create the dataloader with a DistributedSampler.
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = _dm(tree)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = dm.train_dataloader()
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True)
    rebuilt = _update_dataloader(loader, sampler)
    assert type(rebuilt) is type(loader) and rebuilt.dataset is dm.train_dataset
    assert rebuilt.sampler is sampler and rebuilt.batch_size == 4
    assert sum(x.shape[0] for x, _ in rebuilt) == 6  # half of the 12 training images


# ---------------------------------------------------------------------------------------------
# Layout errors


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_dir .*nowhere does not exist; expected"):
        ImageNetDataModule(tmp_path / "nowhere").setup("fit")


def test_data_dir_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        ImageNetDataModule(tmp_path / "file").setup("fit")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tree, split):
    import shutil

    shutil.rmtree(tree / split)
    with pytest.raises(FileNotFoundError, match=rf"folder .*{split} does not exist"):
        _dm(tree, num_classes=3).setup("fit")


def test_empty_class_folder(tree):
    for f in (tree / "val" / "dog").iterdir():
        f.unlink()
    (tree / "val" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*val.dog holds no image files"):
        _dm(tree).setup("fit")


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match=r"no class folders in .*train; expected"):
        _dm(tmp_path).setup("fit")


def test_flat_val_folder(tree):
    # The raw ILSVRC2012 validation set: 50,000 images in one folder.
    import shutil

    val = tree / "val"
    for f in list(val.glob("*/*.JPEG")):
        shutil.move(f, val / f"{f.parent.name}_{f.name}")
    for d in [d for d in val.iterdir() if d.is_dir()]:
        d.rmdir()
    with pytest.raises(ValueError, match="holds image files directly: sort them into"):
        _dm(tree).setup("fit")


def test_val_classes_differ(tree):
    (tree / "val" / "fox").rename(tree / "val" / "wolf")
    with pytest.raises(ValueError, match=r"1 missing \(fox\), 1 extra \(wolf\)"):
        _dm(tree).setup("fit")


# ---------------------------------------------------------------------------------------------
# Bad images


def _add_bad_images(tree: Path) -> list[Path]:
    text = tree / "train" / "dog" / "broken.JPEG"
    text.write_text("this is not a JPEG")
    good = (tree / "train" / "fox" / "fox_0.JPEG").read_bytes()
    truncated = tree / "train" / "fox" / "truncated.jpeg"
    truncated.write_bytes(good[: len(good) // 2])
    return [text, truncated]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_skipped_with_one_warning_per_pass(tree, num_workers):
    bad = _add_bad_images(tree)
    dm = _dm(tree, num_workers=num_workers, bad_images="skip")
    dm.setup("fit")
    ds = dm.train_dataset
    assert len(ds) == 14  # found by listing; found bad only when decoded
    loader = dm.train_dataloader()
    with pytest.warns(BadImageWarning) as record:
        batches = list(loader)
    messages = [str(w.message) for w in record if issubclass(w.category, BadImageWarning)]
    assert len(messages) == 1
    assert "skipped 2 unreadable image file(s)" in messages[0]
    assert "broken.JPEG" in messages[0] and "truncated.jpeg" in messages[0]
    assert "bad_images='error'" in messages[0]
    # Replaced, not dropped: every batch is full and labels still match the images.
    assert [x.shape[0] for x, _ in batches] == [4, 4, 4, 2]
    for x, y in batches:
        assert torch.equal(_labels_from_colors(x), y)
    # The workers' marks reached the main process (shared memory).
    assert sorted(ds.bad_paths()) == sorted(str(p) for p in bad)
    # Known bad files are not tried again and not reported again.
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)
        assert sum(x.shape[0] for x, _ in loader) == 14


def test_bad_image_found_in_cut_short_pass_reported_at_teardown(tree):
    (tree / "val" / "dog" / "broken.JPEG").write_text("this is not a JPEG")
    dm = _dm(tree)
    dm.setup("validate")
    ds = dm.val_dataset
    broken = next(i for i in range(len(ds)) if ds.path(i).endswith("broken.JPEG"))
    assert ds.path(broken + 1).endswith("dog_0.JPEG")
    x, y = ds[broken]  # substituted by the next readable image
    assert torch.equal(x, ds[broken + 1][0]) and y == int(ds.labels[broken + 1]) == 1
    with pytest.warns(BadImageWarning, match=r"skipped 1 .*broken.JPEG"):
        dm.teardown("validate")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)
        dm.teardown("validate")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_image_error_names_the_file(tree, num_workers):
    (tree / "val" / "cat" / "broken.JPEG").write_text("this is not a JPEG")
    dm = _dm(tree, num_workers=num_workers, bad_images="error")
    dm.setup("validate")
    loader = dm.val_dataloader()
    children_before = set(multiprocessing.active_children())
    with pytest.raises(BadImageError, match=r"cannot decode image file .*broken.JPEG") as info:
        list(loader)
    message = str(info.value)
    # One line even when re-raised from a worker process; the CLI prints it as is.
    assert "\n" not in message and "Traceback" not in message
    assert "bad_images='skip'" in message
    assert isinstance(info.value, ValueError)
    # The workers were stopped at once, not left to the garbage collector (5 s each), and the
    # loader starts afresh on the next pass.
    assert not set(multiprocessing.active_children()) - children_before
    with pytest.raises(BadImageError, match=r"broken\.JPEG"):
        list(loader)


def test_all_images_bad(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "x.jpg").write_text("nope")
    dm = _dm(tmp_path)
    dm.setup("fit")
    with pytest.raises(BadImageError, match="none of the 1 image files"):
        dm.val_dataset[0]


def test_bad_image_error_reconstructed_from_worker_message():
    worker_message = (
        "Caught BadImageError in DataLoader worker process 1.\n"
        "Original Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "scl_lightning.data.imagenet.BadImageError: cannot decode image file /d/a.JPEG (x)"
    )
    assert str(BadImageError(worker_message)) == "cannot decode image file /d/a.JPEG (x)"
    assert str(BadImageError("plain message")) == "plain message"


# ---------------------------------------------------------------------------------------------
# torchvision selection (torchvision cannot be installed here: it is hidden to be sure)


@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    imagenet_mod._torchvision_import_error.cache_clear()
    yield
    imagenet_mod._torchvision_import_error.cache_clear()


def test_use_torchvision_none_falls_back_to_pillow(tree, no_torchvision):
    dm = _dm(tree, use_torchvision=None)
    dm.setup("fit")
    assert dm.backend == "pil"
    assert dm.train_dataset[0][0].shape == (3, 32, 32)


def test_use_torchvision_true_without_torchvision(tree, no_torchvision):
    with pytest.raises(ValueError, match="use_torchvision=True but torchvision cannot be imported"):
        _dm(tree, use_torchvision=True).setup("fit")


def test_use_torchvision_false_never_imports_it(tree, monkeypatch):
    imagenet_mod._torchvision_import_error.cache_clear()
    monkeypatch.setattr(  # where ImageNetDataModule looks it up
        imagenet_mod.datamodule,
        "_torchvision_import_error",
        lambda: pytest.fail("torchvision probed"),
    )
    dm = _dm(tree, use_torchvision=False)
    dm.setup("fit")
    assert dm.backend == "pil"


def test_package_import_does_not_import_torchvision():
    # In a fresh interpreter, after Lightning (which probes torchvision itself), record every
    # `import torchvision...` statement that importing the package runs: there must be none.
    import os
    import subprocess

    import scl_lightning

    src = str(Path(scl_lightning.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    code = (
        "import builtins, sys\n"
        "import lightning.pytorch\n"
        "attempts, real_import = [], builtins.__import__\n"
        "def spy(name, *args, **kwargs):\n"
        "    if name.partition('.')[0] == 'torchvision':\n"
        "        attempts.append(name)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = spy\n"
        "import scl_lightning, scl_lightning.data, scl_lightning.data.imagenet\n"
        "assert not attempts, attempts\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def fake_torchvision(monkeypatch):
    """Just enough of torchvision.io and transforms.v2 to check how the torchvision path calls
    them (the real one cannot be installed next to the CPU torch here). Records every call."""
    import io as _io
    import types

    calls: list[tuple] = []
    tv = types.ModuleType("torchvision")
    tv_io = types.ModuleType("torchvision.io")
    tv_transforms = types.ModuleType("torchvision.transforms")
    v2 = types.ModuleType("torchvision.transforms.v2")

    class ImageReadMode:
        RGB = "RGB"

    def read_file(path):
        calls.append(("read_file", path))
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)

    def decode_image(data, mode):
        calls.append(("decode_image", mode))
        raw = data.numpy().tobytes()
        if not raw.startswith(b"\xff\xd8"):  # this fake decodes JPEG only
            raise RuntimeError("Unsupported image file")
        rgb = Image.open(_io.BytesIO(raw)).convert("RGB")
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)

    class _Step:
        def __init__(self, *args, **kwargs):
            self.args = args
            calls.append((type(self).__name__, args, kwargs))

        def __call__(self, x):
            return x

    class _TopLeftCrop(_Step):
        def __call__(self, x):
            return x[:, : self.args[0], : self.args[0]]

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, x):
            for step in self.steps:
                x = step(x)
            return x

    tv_io.ImageReadMode, tv_io.read_file, tv_io.decode_image = (
        ImageReadMode,
        read_file,
        decode_image,
    )
    v2.RandomResizedCrop = type("RandomResizedCrop", (_TopLeftCrop,), {})
    v2.CenterCrop = type("CenterCrop", (_TopLeftCrop,), {})
    v2.RandomHorizontalFlip = type("RandomHorizontalFlip", (_Step,), {})
    v2.Resize = type("Resize", (_Step,), {})
    v2.Compose = Compose
    tv.io, tv.transforms, tv_transforms.v2 = tv_io, tv_transforms, v2
    for name, module in [
        ("torchvision", tv),
        ("torchvision.io", tv_io),
        ("torchvision.transforms", tv_transforms),
        ("torchvision.transforms.v2", v2),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    imagenet_mod._torchvision_import_error.cache_clear()
    yield calls
    imagenet_mod._torchvision_import_error.cache_clear()


@pytest.mark.parametrize("hflip", [True, False])
def test_torchvision_path_when_importable(tree, fake_torchvision, hflip):
    calls = fake_torchvision
    Image.fromarray(_class_image(1, np.random.default_rng(0), (40, 40))).save(
        tree / "val" / "dog" / "z.png"
    )
    (tree / "val" / "fox" / "broken.JPEG").write_text("not an image")
    dm = _dm(tree, use_torchvision=None, min_scale=0.25, hflip=hflip)
    dm.setup("fit")
    assert dm.backend == "torchvision"
    names = [c[0] for c in calls]
    assert ("RandomResizedCrop", (32,), {"scale": (0.25, 1.0), "ratio": (3 / 4, 4 / 3)}) in calls
    assert ("RandomHorizontalFlip" in names) == hflip
    assert ("Resize", (36,), {}) in calls and ("CenterCrop", (32,), {}) in calls

    x, y = dm.train_dataset[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and x.is_contiguous() and y == 0
    assert ("decode_image", "RGB") in calls
    # What torchvision cannot decode goes to Pillow; what neither can is a bad image.
    val = dm.val_dataset
    png = next(i for i in range(len(val)) if val.path(i).endswith("z.png"))
    assert torch.equal(_labels_from_colors(val[png][0][None]), torch.tensor([1]))
    with pytest.warns(BadImageWarning, match="broken.JPEG"):
        batches = list(dm.val_dataloader())
    assert sum(x.shape[0] for x, _ in batches) == len(val)


def test_use_torchvision_false_ignores_installed_torchvision(tree, fake_torchvision):
    dm = _dm(tree, use_torchvision=False)
    dm.setup("fit")
    assert dm.backend == "pil" and fake_torchvision == []
    assert _dm(tree, use_torchvision=True).backend is None  # resolved in setup, not __init__


# ---------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data_dir": ""}, "data_dir must be a non-empty path"),
        ({"data_dir": 3}, "data_dir must be a non-empty path"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer, got 2.0"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"num_workers": -1}, "num_workers must be a non-negative integer, got -1"),
        ({"num_workers": 1.5}, "num_workers must be a non-negative integer"),
        ({"image_size": 0}, "image_size must be a positive integer, got 0"),
        ({"image_size": "224"}, "image_size must be a positive integer"),
        ({"val_resize": 200}, r"val_resize must be an integer of at least image_size=224, got 200"),
        ({"val_resize": 256.0}, "val_resize must be an integer"),
        ({"min_scale": 0.0}, r"min_scale must be a number in \(0, 1\], got 0.0"),
        ({"min_scale": 1.5}, r"min_scale must be a number in \(0, 1\], got 1.5"),
        ({"min_scale": True}, r"min_scale must be a number in \(0, 1\]"),
        ({"hflip": "yes"}, "hflip must be True or False, got 'yes'"),
        ({"pin_memory": 1}, "pin_memory must be True or False, got 1"),
        ({"mean": (0.5, 0.5)}, r"mean must be 3 finite numbers \(one per RGB channel\)"),
        ({"mean": (0.5, 0.5, float("nan"))}, "mean must be 3 finite numbers"),
        ({"mean": "abc"}, "mean must be 3 finite numbers"),
        ({"mean": 0.5}, "mean must be 3 finite numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be 3 positive finite numbers"),
        ({"std": (0.2, -1.0, 0.2)}, "std must be 3 positive finite numbers"),
        ({"std": (0.2, 0.2, 0.2, 0.2)}, "std must be 3 positive finite numbers"),
        ({"bad_images": "ignore"}, "bad_images must be 'skip' or 'error', got 'ignore'"),
        ({"use_torchvision": 1}, "use_torchvision must be None, True or False, got 1"),
        ({"use_torchvision": "auto"}, "use_torchvision must be None, True or False"),
        ({"num_classes": 0}, "num_classes must be None or a positive integer, got 0"),
        ({"num_classes": 10.0}, "num_classes must be None or a positive integer, got 10.0"),
    ],
)
def test_argument_validation(tmp_path, kwargs, match):
    kwargs = {"data_dir": tmp_path / "nowhere", **kwargs}
    with pytest.raises(ValueError, match=match):
        ImageNetDataModule(**kwargs)


def test_dataset_validation():
    paths, labels = np.array([b"a/1.jpg"]), np.array([0])
    with pytest.raises(ValueError, match="non-empty and of equal length, got 1 and 2"):
        ImageFolderDataset("r", paths, np.array([0, 1]), pipeline=None)
    with pytest.raises(ValueError, match="non-empty and of equal length, got 0 and 0"):
        ImageFolderDataset("r", paths[:0], labels[:0], pipeline=None)
    with pytest.raises(ValueError, match="bad_images must be 'skip' or 'error'"):
        ImageFolderDataset("r", paths, labels, pipeline=None, bad_images="warn")


# ---------------------------------------------------------------------------------------------
# Training through Lightning


class TinyConvNet(LightningModule):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(input_shape[0], 4, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, num_classes),
        )
        self.seen_inputs: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_inputs.append(x)
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_two_training_steps_with_trainer(tree, tmp_path):
    dm = _dm(tree)
    model = TinyConvNet(dm.num_classes, dm.input_shape)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert len(model.seen_inputs) == 2
    for x in model.seen_inputs:
        # Normalized by the DataModule's on_after_batch_transfer before training_step.
        assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
        assert x.min() < 0 and x.max() > 1
        assert math.isfinite(float(x.abs().max()))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_bad_images_reported_at_the_end_of_each_epoch_under_trainer(tree, tmp_path):
    from lightning.pytorch import Callback

    _add_bad_images(tree)
    reports_at_epoch_end: list[int] = []

    class CountReports(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            reports_at_epoch_end.append(sum(w.category is BadImageWarning for w in caught))

    dm = _dm(tree)
    model = TinyConvNet(dm.num_classes, dm.input_shape)
    trainer = Trainer(
        max_epochs=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[CountReports()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    # Lightning stops after len(loader) batches without asking for StopIteration: the report
    # still comes with the epoch's last batch, once; epoch 2 finds nothing new.
    assert reports_at_epoch_end == [1, 1]
    assert len(dm.train_dataset.bad_paths()) == 2
