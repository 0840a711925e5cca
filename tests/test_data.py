"""Data sources: splits, batches on the device, batch augmentation, on-disk formats, errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from sketch_core.data.sets import FolderLoader, TensorLoader, _batch_crop, _shard, load_data
from sketch_core.errors import UserError


def rows(loader):
    """The raw images a loader serves, in its order."""
    return loader.x[loader.index]


def test_digits_splits_are_fixed_seeded_and_disjoint():
    a = load_data("digits", seed=0)
    b = load_data("digits", seed=1)
    assert (a.num_classes, a.in_channels, a.input_size, a.family) == (10, 1, 8, "cifar")
    assert len(a.test.index) == 360 and len(a.train.index) + len(a.val.index) == 1797 - 360
    assert len(a.val.index) == round(0.1 * (1797 - 360))
    # the test split never depends on the seed; the validation split does
    assert torch.equal(rows(a.test), rows(b.test))
    assert not torch.equal(rows(a.val), rows(b.val))
    # validation images are held out of the training images
    train, val = set(a.train.index.tolist()), set(a.val.index.tolist())
    assert not train & val and len(train | val) == 1797 - 360
    # normalised: about zero mean, unit variance
    x, _ = next(iter(a.test))
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


def test_train_batches_reshuffle_each_epoch_and_set_epoch_replays():
    d = load_data("digits", batch_size=64)
    first = [y for _, y in d.train]
    second = [y for _, y in d.train]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    d.train.set_epoch(0)
    replay = [(x, y) for x, y in d.train]
    assert all(torch.equal(a, y) for a, (_, y) in zip(first, replay))
    d.train.set_epoch(0, start_batch=3)
    tail = list(d.train)
    assert len(tail) == len(replay) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, replay[3:]))
    # every training sample appears once per epoch
    assert sum(len(y) for _, y in replay) == len(d.train.index)


def test_batch_crop_is_a_shift_of_the_zero_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    shifts = torch.tensor([[0, 4], [2, 1]])  # rows: dy, dx per sample
    out = _batch_crop(x, shifts, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.equal(out[0], padded[0, :, 0:6, 2:8])
    assert torch.equal(out[1], padded[1, :, 4:10, 1:7])


def test_augmented_batches_are_crops_and_flips_of_the_originals():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 255, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(20)
    loader = TensorLoader(x, y, batch_size=20, mean=(0.0,), std=(1.0,), shuffle=True, pad=2,
                          flip=True)
    xb, yb = next(iter(loader))
    padded = torch.nn.functional.pad(x[yb].float(), (2, 2, 2, 2))
    flips = 0
    for i in range(20):
        views = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        plain = any(torch.equal(xb[i], v) for v in views)
        flipped = any(torch.equal(xb[i], v.flip(-1)) for v in views)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < 20


def test_cifar10_reads_torchvisions_format(cifar10_folder):
    root, batches = cifar10_folder
    d = load_data("cifar10", root, val_fraction=0.25, batch_size=32)
    assert (d.num_classes, d.in_channels, d.input_size) == (10, 3, 32)
    assert len(d.train.index) + len(d.val.index) == 5 * 40 and len(d.test.index) == 50
    raw = torch.tensor(batches["test_batch"]["data"][:4]).view(4, 3, 32, 32).float() / 255
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    x, y = next(iter(d.test))
    torch.testing.assert_close(x[:4], (raw - mean) / std)
    assert y[:4].tolist() == batches["test_batch"]["labels"][:4]
    # the folder itself (cifar-10-batches-py) is accepted as --data_path too
    assert len(load_data("cifar10", root / "cifar-10-batches-py").test.index) == 50


def test_cifar10_missing_or_broken_says_the_expected_layout(tmp_path, cifar10_folder):
    with pytest.raises(UserError, match="cifar-10-batches-py.*data_batch_1"):
        load_data("cifar10", tmp_path)
    shutil.copytree(cifar10_folder[0] / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR-10 batch"):
        load_data("cifar10", tmp_path)


def test_image_folder_set(image_folder):
    d = load_data("folder", image_folder, input_size=32, batch_size=4, eval_batch_size=5,
                  val_fraction=0.2, num_workers=0)
    # 40x48 images resized to 32: the per-image path, the CIFAR family (input size <= 64)
    assert (d.num_classes, d.in_channels, d.input_size, d.family) == (3, 3, 32, "cifar")
    assert d.classes == ["ants", "bees", "cats"]
    xb, yb = next(iter(d.train))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64
    assert sum(len(y) for _, y in d.test) == 6
    assert sum(len(y) for _, y in d.val) + sum(len(y) for _, y in d.train) == 18
    assert len(d.calibration_batches(2)) == 2


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(UserError, match="train/<class>"):
        load_data("folder", tmp_path / "nowhere", num_workers=0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="val/"):
        load_data("folder", tmp_path, num_workers=0)
    with pytest.raises(UserError, match="needs --data_path"):
        load_data("imagenet", None, num_workers=0)


def test_synthetic_shapes_and_options():
    d = load_data("synthetic", synthetic=dict(n_train=100, n_test=30, num_classes=4, channels=2,
                                              size=12), batch_size=16, val_fraction=0.0)
    assert (d.num_classes, d.in_channels, d.input_size) == (4, 2, 12)
    assert d.val is None
    xb, yb = next(iter(d.train))
    assert xb.shape == (16, 2, 12, 12) and int(yb.max()) < 4
    again = load_data("synthetic", synthetic=dict(n_train=100, n_test=30, num_classes=4,
                                                  channels=2, size=12), val_fraction=0.0)
    assert torch.equal(rows(d.test), rows(again.test))
    with pytest.raises(UserError, match="unknown synthetic option"):
        load_data("synthetic", synthetic=dict(pixels=3))


@pytest.mark.parametrize("data_set, kwargs, match", [
    ("digits", dict(val_fraction=1.0), "val_fraction"),
    ("digits", dict(batch_size=0), "batch sizes"),
    ("digits", dict(eval_batch_size=-1), "batch sizes"),
    ("mnist", {}, "unknown data set"),
])
def test_bad_options(data_set, kwargs, match):
    with pytest.raises(UserError, match=match):
        load_data(data_set, **kwargs)


def test_shard_gives_every_rank_an_equal_share_covering_all():
    order = torch.randperm(10)
    shares = [_shard(order, r, 3) for r in range(3)]
    assert {len(s) for s in shares} == {4}
    assert set(torch.cat(shares).tolist()) == set(range(10))


def test_calibration_batches_are_unaugmented_and_fixed():
    d = load_data("digits", batch_size=50)
    a, b = d.calibration_batches(3), d.calibration_batches(3)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    # un-augmented: each calibration image is exactly a normalised training image
    train = {tuple(r.tolist()) for r in rows(d.train).flatten(1)}
    raw = a[0][0] * d.train._mul.view(1, 1, 1, 1).reciprocal() \
        - d.train._add.view(1, 1, 1, 1) / d.train._mul.view(1, 1, 1, 1)
    hits = sum(tuple(r.round().tolist()) in train for r in raw.flatten(1))
    assert hits == len(raw)


# ------------------------------------------------------- small-image folders, resident

def _jpeg(path, size=16, value=0, seed=0):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    img = (rng.integers(0, 60, (size, size, 3)) + value).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


def small_folder(root, classes=("ants", "bees", "cats"), n_train=5, n_test=2, size=16):
    """train/<class>/*.jpg and test/<class>/*.jpg of size x size generated JPEGs."""
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            for i in range(n):
                _jpeg(root / split / name / f"{i:04d}.jpg", size, 60 * c, seed=100 * c + i)
    return root


def _count_decodes(monkeypatch):
    from sketch_core.data import folder_cache

    calls = []
    real = folder_cache._decode

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(folder_cache, "_decode", counting)
    return calls


def test_small_image_folder_is_decoded_once_and_resident(tmp_path, monkeypatch):
    from PIL import Image
    import numpy as np

    root, cache = small_folder(tmp_path / "set"), tmp_path / "cache"
    calls = _count_decodes(monkeypatch)
    d = load_data("folder", root, batch_size=4, eval_batch_size=3, val_fraction=0.2, cache_dir=cache)
    assert (d.num_classes, d.in_channels, d.input_size, d.family) == (3, 3, 16, "cifar")
    assert d.classes == ["ants", "bees", "cats"] and len(calls) == 21
    assert isinstance(d.train, TensorLoader) and d.train.x.dtype == torch.uint8
    assert (d.train.pad, d.train.flip) == (2, True)
    assert len(list(cache.glob("*.pt"))) == 2
    # the test images, un-augmented, normalised with ImageNet's statistics as before
    want = np.array(Image.open(root / "test" / "ants" / "0001.jpg").convert("RGB"))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    x, y = next(iter(d.test))
    torch.testing.assert_close(x[1], (torch.from_numpy(want).permute(2, 0, 1) / 255 - mean) / std)
    assert y.tolist() == [0, 0, 1]
    xb, yb = next(iter(d.train))
    assert xb.shape == (4, 3, 16, 16)
    # the validation split holds out the same images the per-image path holds out
    per_image = load_data("folder", root, input_size=24, val_fraction=0.2, num_workers=0,
                          cache_dir=cache)
    # resized image by image, still CIFAR-sized (input size <= 64)
    assert isinstance(per_image.train, FolderLoader) and per_image.input_size == 24
    assert per_image.family == "cifar"
    assert torch.equal(per_image.val.indices, d.val.index)
    # a second load reads the cache: nothing decoded
    calls.clear()
    again = load_data("folder", root, val_fraction=0.2, cache_dir=cache)
    assert calls == [] and torch.equal(again.train.x, d.train.x)


def test_folder_cache_rebuilt_after_a_file_changes_or_truncation(tmp_path, monkeypatch, caplog):
    import os

    from sketch_core.data.folder_cache import load_folder_images

    root, cache = small_folder(tmp_path / "set"), tmp_path / "cache"
    first = load_folder_images(root / "train", cache)
    assert not first.from_cache and load_folder_images(root / "train", cache).from_cache
    calls = _count_decodes(monkeypatch)
    changed = root / "train" / "bees" / "0002.jpg"
    _jpeg(changed, 16, 200, seed=7)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level("INFO", logger="sketchtune.folder_cache"):
        second = load_folder_images(root / "train", cache)
    assert len(calls) == 15 and not second.from_cache
    assert not torch.equal(second.x[7], first.x[7]) and torch.equal(second.x[6], first.x[6])
    assert any("stale" in r.getMessage() for r in caplog.records)
    # a torn cache file: one warning, decoded again, never trusted
    (path,) = cache.glob("*.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    caplog.clear()
    calls.clear()
    with caplog.at_level("WARNING", logger="sketchtune.folder_cache"):
        third = load_folder_images(root / "train", cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "truncated" in warnings[0] and str(path) in warnings[0]
    assert len(calls) == 15 and torch.equal(third.x, second.x)
    assert load_folder_images(root / "train", cache).from_cache


def test_folder_cache_bad_input_one_clear_error_nothing_written(tmp_path):
    from sketch_core.data.folder_cache import load_folder_images, prepare_folder_cache

    cache = tmp_path / "cache"
    # images of two sizes: one file of each size named
    root = small_folder(tmp_path / "mixed")
    _jpeg(root / "train" / "bees" / "0003.jpg", 20)
    with pytest.raises(UserError, match=r"more than one size.*ants/0000\.jpg is 16x16.*"
                                        r"bees/0003\.jpg is 20x20"):
        load_data("folder", root, cache_dir=cache)
    # a file that is not an image is named
    root = small_folder(tmp_path / "text")
    (root / "train" / "cats" / "0003.jpg").write_text("not an image")
    with pytest.raises(UserError, match=r"cats/0003\.jpg is not a readable image"):
        prepare_folder_cache(root, cache)
    # an empty class, and a folder without class folders
    root = small_folder(tmp_path / "empty")
    (root / "train" / "dogs").mkdir()
    with pytest.raises(UserError, match=r"class folder .*train/dogs holds no images"):
        load_folder_images(root / "train", cache)
    (tmp_path / "flat").mkdir()
    _jpeg(tmp_path / "flat" / "0.jpg")
    with pytest.raises(UserError, match=r"flat has no class folders"):
        load_folder_images(tmp_path / "flat", cache)
    assert not cache.exists()


def test_large_or_non_square_folders_keep_the_per_image_path(image_folder, tmp_path):
    from sketch_core.data.folder_cache import default_input_size, prepare_folder_cache

    assert prepare_folder_cache(image_folder, tmp_path / "cache") is None   # 40x48 images
    assert default_input_size(image_folder) == 224
    d = load_data("folder", image_folder, num_workers=0, cache_dir=tmp_path / "cache")
    assert (d.family, d.input_size) == ("imagenet", 224) and not (tmp_path / "cache").exists()
    assert default_input_size(small_folder(tmp_path / "small")) == 16


def test_normalize_replaces_the_data_sets_statistics(cifar10_folder):
    root, batches = cifar10_folder
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    d = load_data("cifar10", root, normalize=imagenet)
    raw = torch.tensor(batches["test_batch"]["data"][:4]).view(4, 3, 32, 32).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in imagenet)
    x, _ = next(iter(d.test))
    torch.testing.assert_close(x[:4], (raw - mean) / std)
    for bad in (((0.5,), (0.0,)), ((0.5, 0.5), (0.2,)), "imagenet"):
        with pytest.raises(UserError, match="normalize"):
            load_data("digits", normalize=bad)
