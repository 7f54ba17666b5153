"""Batch transforms against slow per-image reference implementations."""

import pytest
import torch
import torch.nn.functional as F

from scl_lightning.data.transforms import (
    BatchAugment,
    crop_at,
    cutout,
    cutout_at,
    hflip_where,
    normalize,
    random_crop,
    random_hflip,
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _images(n=16, c=3, h=32, w=32, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255


# ----------------------------------------------------------- per-image references


def ref_crop(img, top, left, ch, cw, padding, flip=False):
    padded = F.pad(img, (padding, padding, padding, padding))
    out = padded[:, top : top + ch, left : left + cw]
    return out.flip(-1) if flip else out


def ref_cutout(img, cy, cx, size, value):
    out = img.clone()
    _, h, w = img.shape
    y0, x0 = cy - size // 2, cx - size // 2
    for yy in range(max(0, y0), min(h, y0 + size)):
        for xx in range(max(0, x0), min(w, x0 + size)):
            out[:, yy, xx] = value
    return out


def ref_normalize(img, mean, std):
    out = torch.empty(img.shape, dtype=torch.float32)
    for c in range(img.shape[0]):
        out[c] = (img[c].double() / 255 - mean[c]) / std[c]
    return out


# ---------------------------------------------------------------------- crop


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize(("size", "padding"), [((32, 32), 4), ((24, 28), 0), ((30, 36), 3)])
def test_crop_at_matches_reference(dtype, size, padding):
    x = _images(dtype=dtype)
    n, _, h, w = x.shape
    ch, cw = size
    g = torch.Generator().manual_seed(1)
    top = torch.randint(0, h + 2 * padding - ch + 1, (n,), generator=g)
    left = torch.randint(0, w + 2 * padding - cw + 1, (n,), generator=g)
    # the extreme offsets are covered too
    top[0], left[0] = 0, 0
    top[1], left[1] = h + 2 * padding - ch, w + 2 * padding - cw
    flip = torch.rand(n, generator=g) < 0.5
    flip[0], flip[1] = True, False
    out = crop_at(x, top, left, size, padding=padding)
    out_flipped = crop_at(x, top, left, size, padding=padding, flip=flip)
    assert out.shape == (n, 3, ch, cw) and out.dtype == dtype
    for i in range(n):
        t, l_ = int(top[i]), int(left[i])
        assert torch.equal(out[i], ref_crop(x[i], t, l_, ch, cw, padding))
        assert torch.equal(out_flipped[i], ref_crop(x[i], t, l_, ch, cw, padding, bool(flip[i])))


def test_crop_at_centre_offset_is_identity_and_padding_is_black():
    x = _images()
    n = len(x)
    assert torch.equal(crop_at(x, torch.full((n,), 4), torch.full((n,), 4), padding=4), x)
    out = crop_at(x, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), padding=4)
    assert (out[:, :, :4, :] == 0).all() and (out[:, :, :, :4] == 0).all()
    assert torch.equal(out[:, :, 4:, 4:], x[:, :, :28, :28])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"top": torch.tensor([9, 0]), "padding": 4},
            r"offsets out of range: top must be in \[0, 8\]",
        ),
        ({"left": torch.tensor([-1, 0]), "padding": 4}, r"offsets out of range"),
        ({"top": torch.tensor([0, 0, 0])}, r"top must have shape \(2,\)"),
        ({"size": 33}, r"crop size \(33, 33\) does not fit in the padded image size \(32, 32\)"),
        ({"size": 0}, r"size must be a positive int or a pair"),
        ({"size": (4, 4, 4)}, r"size must be a positive int or a pair"),
        ({"padding": -1}, r"padding must be a non-negative integer, got -1"),
        ({"flip": torch.tensor([True])}, r"flip must have shape \(2,\)"),
    ],
)
def test_crop_at_validation(kwargs, match):
    args = {"top": torch.zeros(2, dtype=torch.long), "left": torch.zeros(2, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        crop_at(_images(2), **args)


def test_not_a_batch_is_refused():
    with pytest.raises(
        ValueError, match=r"expected an image batch of shape \(N, C, H, W\), got \(3, 32, 32\)"
    ):
        random_crop(torch.zeros(3, 32, 32), padding=4)


def test_random_crop_is_deterministic_given_a_generator_and_uses_every_offset():
    x = _images(512)
    a = random_crop(x, padding=4, generator=torch.Generator().manual_seed(7))
    b = random_crop(x, padding=4, generator=torch.Generator().manual_seed(7))
    c = random_crop(x, padding=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Same draws as crop_at with the offsets taken from an identically seeded generator.
    g = torch.Generator().manual_seed(7)
    top = torch.randint(0, 9, (512,), generator=g)
    left = torch.randint(0, 9, (512,), generator=g)
    assert torch.equal(a, crop_at(x, top, left, padding=4))
    assert set(top.tolist()) == set(range(9)) and set(left.tolist()) == set(range(9))


# ---------------------------------------------------------------------- flip


def test_hflip_where_matches_reference():
    x = _images()
    flip = torch.arange(len(x)) % 3 == 0
    out = hflip_where(x, flip)
    for i in range(len(x)):
        assert torch.equal(out[i], x[i].flip(-1) if flip[i] else x[i])


def test_random_hflip():
    x = _images(400)
    assert torch.equal(random_hflip(x, p=0.0), x)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    out = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((flipped ^ kept).all())  # every image is either mirrored or untouched
    assert 150 < int(flipped.sum()) < 250
    assert torch.equal(out, random_hflip(x, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        random_hflip(x, p=1.5)


# -------------------------------------------------------------------- cutout


@pytest.mark.parametrize("size", [0, 1, 8, 9, 16, 40])
def test_cutout_at_matches_reference(size):
    x = _images(12, dtype=torch.float32)
    cy = torch.tensor([0, 31, 15, 3, 28, 16, 0, 31, 10, 20, 5, 26])
    cx = torch.tensor([0, 31, 15, 28, 3, 0, 16, 31, 20, 10, 26, 5])
    out = cutout_at(x, cy, cx, size, value=-1.5)
    for i in range(len(x)):
        assert torch.equal(out[i], ref_cutout(x[i], int(cy[i]), int(cx[i]), size, -1.5))
    assert not torch.equal(out, x) or size == 0  # x itself is not modified
    assert torch.equal(x, _images(12, dtype=torch.float32))


def test_random_cutout_erases_one_clipped_square_per_image():
    x = torch.ones(256, 1, 32, 32)
    out = cutout(x, 8, generator=torch.Generator().manual_seed(0))
    erased = out == 0
    counts = erased.flatten(1).sum(1)
    assert (counts > 0).all() and (counts <= 64).all()
    assert (counts == 64).float().mean() > 0.5  # most squares lie fully inside the image
    rows, cols = erased.any(3).squeeze(1), erased.any(2).squeeze(1)
    # the erased set is a rectangle: rows x cols
    assert torch.equal(counts, rows.sum(1) * cols.sum(1))
    assert torch.equal(out, cutout(x, 8, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"size must be a non-negative integer, got -2"):
        cutout(x, -2)


# ----------------------------------------------------------------- normalize


def test_normalize_matches_reference_for_uint8_and_float():
    x = _images(4)
    out = normalize(x, MEAN, STD)
    assert out.dtype == torch.float32
    for i in range(len(x)):
        torch.testing.assert_close(out[i], ref_normalize(x[i], MEAN, STD))
    torch.testing.assert_close(normalize(x.float() / 255, MEAN, STD), out)
    torch.testing.assert_close(normalize(x, 0.5, 0.25), (x.float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((0.5, 0.5), (1.0, 1.0, 1.0), r"mean needs 1 or 3 values \(one per channel\), got 2"),
        ((0.5,), (1.0, 0.0, 1.0), r"std must be positive"),
        ((float("nan"),), (1.0,), r"mean must be one or more finite numbers"),
    ],
)
def test_normalize_validation(mean, std, match):
    with pytest.raises(ValueError, match=match):
        normalize(_images(2), mean, std)


# -------------------------------------------------------------- BatchAugment


def test_batch_augment_training_equals_reference_composition():
    x = _images(32)
    n = len(x)
    aug = BatchAugment(MEAN, STD, crop_padding=4, flip=True, cutout=8)
    out = aug(x, generator=torch.Generator().manual_seed(3))
    # The draws, in BatchAugment's order: crop offsets, flips, cutout centres.
    g = torch.Generator().manual_seed(3)
    top = torch.randint(0, 9, (n,), generator=g)
    left = torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    cy = torch.randint(0, 32, (n,), generator=g)
    cx = torch.randint(0, 32, (n,), generator=g)
    assert 0 < int(flip.sum()) < n
    for i in range(n):
        img = ref_crop(x[i], int(top[i]), int(left[i]), 32, 32, 4, bool(flip[i]))
        img = ref_normalize(img, MEAN, STD)
        # cutout after normalization fills with 0, the mean; the crop padding stays black
        img = ref_cutout(img, int(cy[i]), int(cx[i]), 8, 0.0)
        torch.testing.assert_close(out[i], img)


def test_batch_augment_eval_only_normalizes_and_disabled_training_too():
    x = _images(8)
    aug = BatchAugment(MEAN, STD, cutout=16)
    assert torch.equal(aug.eval()(x), normalize(x, MEAN, STD))
    plain = BatchAugment(MEAN, STD, crop_padding=0, flip=False, cutout=0)
    assert plain.training
    torch.testing.assert_close(plain(x), normalize(x, MEAN, STD))
    train = aug.train()(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(train, normalize(x, MEAN, STD))
    assert torch.equal(train, aug(x, generator=torch.Generator().manual_seed(0)))


def test_batch_augment_crop_size_and_state_dict():
    aug = BatchAugment(MEAN, STD, crop_padding=0, crop_size=24, flip=False)
    assert aug(_images(4)).shape == (4, 3, 24, 24)
    assert aug.state_dict() == {}  # mean/std are not persistent
    assert "crop_size=24" in repr(aug)
    with pytest.raises(ValueError, match="batch has 1 channels but mean/std have 3 values"):
        aug(_images(2, c=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": (0.5, 0.5)}, r"mean and std need as many values, got 2 and 3"),
        ({"std": (0.2, 0.0, 0.2)}, r"std must be positive"),
        ({"mean": (0.5, float("inf"), 0.5)}, r"mean must be one or more finite numbers"),
        ({"crop_padding": -1}, r"crop_padding must be a non-negative integer, got -1"),
        ({"crop_padding": 2.0}, r"crop_padding must be a non-negative integer, got 2.0"),
        ({"crop_size": 0}, r"crop_size must be None or a positive integer, got 0"),
        ({"flip": 1}, r"flip must be True or False, got 1"),
        ({"cutout": -4}, r"cutout must be a non-negative integer, got -4"),
        ({"cutout": True}, r"cutout must be a non-negative integer, got True"),
    ],
)
def test_batch_augment_validation(kwargs, match):
    args = {"mean": MEAN, "std": STD, **kwargs}
    with pytest.raises(ValueError, match=match):
        BatchAugment(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transforms_on_cuda_match_cpu():
    x = _images(64)
    n = len(x)
    g = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    flip, cy = torch.rand(n, generator=g) < 0.5, torch.randint(0, 32, (n,), generator=g)
    xc = x.cuda()
    assert torch.equal(
        crop_at(xc, top, left, padding=4, flip=flip).cpu(),
        crop_at(x, top, left, padding=4, flip=flip),
    )
    assert torch.equal(cutout_at(xc, cy, cy, 8).cpu(), cutout_at(x, cy, cy, 8))
    torch.testing.assert_close(normalize(xc, MEAN, STD).cpu(), normalize(x, MEAN, STD))
    aug = BatchAugment(MEAN, STD, cutout=8).cuda()
    out = aug(xc, generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == x.shape
    again = aug(xc, generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(out, again)
