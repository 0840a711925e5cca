"""Data sources: cifar10, imagenet, a user's class folders, digits, synthetic tensors.

:func:`load_data` returns a :class:`Data` whose ``train``, ``val`` and ``test`` are
iterables of ``(x, y)`` batches already on the training device. The validation split
is held out from the training set (seeded) and is what every choice is made on; the
test split only reports.

Sets that fit in memory (cifar10, digits, synthetic) live on the training device as
one tensor; a batch is one gather, and augmentation (random crop with padding, flip)
is done on the whole batch with tensor ops. A ``folder`` set of small square images
(side <= 64, the CIFAR family) that fits in memory is decoded once into such a tensor
(:mod:`sketch_core.data.folder_cache`, cached on disk) and served the same way, with the
images' own size as its default input size. Other class-folder sets (imagenet, folders
of large images) go through torchvision's ``ImageFolder`` and a ``DataLoader`` with
worker processes and per-image transforms.

Every training loader is positioned with ``set_epoch(epoch, start_batch)``: its
shuffle and augmentation depend only on (seed, epoch), so a run resumed in the middle
of an epoch sees exactly the batches an uninterrupted run would. Plain iteration
advances the epoch by itself. Under ``torch.distributed`` each rank reads its own
equal share of every training epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from sketch_core.errors import UserError
from sketch_core.registry import DATA_SETS
from sketch_core.data.folder_cache import (FOLDER_LAYOUT, SMALL_IMAGE_SIDE, fits_in_memory, folder_splits,
                           list_folder, load_folder_images, small_image_side)
from sketch_core.data.normalize import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, Normalization,
                        check_channels, parse_normalize)

__all__ = ["Data", "TensorLoader", "FolderLoader", "load_data", "hold_out_test", "loader_rows",
           "DATA_SETS", "CIFAR10_FILES"]

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 20240601  # the digits test split never changes
SYNTHETIC_DEFAULTS = dict(n_train=2048, n_test=512, num_classes=10, channels=3, size=32, seed=0)

log = logging.getLogger("sketchtune.data")


def _epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63))


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of ``order``, padded by wrapping so that every rank gets as many."""
    if world == 1:
        return order
    total = -(-len(order) // world) * world
    if total > len(order):
        order = torch.cat([order, order[: total - len(order)]])
    return order[rank::world]


class TensorLoader:
    """Batches of an in-memory set that lives on the device as one tensor.

    ``x`` holds raw values (uint8 or float, N x C x H x W); ``index`` (default: all)
    selects the rows served, in that order, so that splits share one tensor. A batch
    is converted with ``x * scale``, augmented (random crop after zero padding by
    ``pad`` pixels, and a horizontal flip when ``flip``), then normalised with
    ``mean``/``std``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                 index: torch.Tensor | None = None,
                 mean: tuple[float, ...], std: tuple[float, ...], scale: float = 1.0,
                 shuffle: bool = False, pad: int = 0, flip: bool = False, seed: int = 0) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self.x, self.y = x, y
        self.index = torch.arange(len(y), device=y.device) if index is None else index
        self.batch_size, self.shuffle, self.pad, self.flip, self.seed = (
            batch_size, shuffle, pad, flip, seed)
        c = x.shape[1]
        mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).expand(c)
        std_t = torch.tensor(std, dtype=torch.float32, device=x.device).expand(c)
        self._mul = (scale / std_t).view(1, c, 1, 1)
        self._add = (-mean_t / std_t).view(1, c, 1, 1)
        self.epoch, self.start_batch = 0, 0

    @property
    def augments(self) -> bool:
        return self.pad > 0 or self.flip

    def __len__(self) -> int:
        n = self._per_rank()
        full, rest = divmod(n, self.batch_size)
        # a last batch of one sample would break BatchNorm in training mode
        return full + (1 if rest > 1 or (rest == 1 and not self.shuffle) else 0)

    def __repr__(self) -> str:
        return f"TensorLoader({len(self.index)} samples, batch {self.batch_size})"

    def _per_rank(self) -> int:
        if not self.shuffle:
            return len(self.index)
        _, world = _dist_rank_world()
        return -(-len(self.index) // world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from batch ``start_batch`` on."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        n, dev = len(self.index), self.x.device
        if self.shuffle:
            g = _epoch_generator(self.seed, epoch)
            order = _shard(torch.randperm(n, generator=g), *_dist_rank_world())
            shifts = torch.randint(0, 2 * self.pad + 1, (2, len(order)), generator=g)
            flips = torch.rand(len(order), generator=g) < 0.5
            order, shifts, flips = self.index[order.to(dev)], shifts.to(dev), flips.to(dev)
        else:
            order = self.index
        for b in range(start, len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            xb = self.x[order[sl]].float()
            if self.shuffle and self.pad:
                xb = _batch_crop(xb, shifts[:, sl], self.pad)
            if self.shuffle and self.flip:
                xb = torch.where(flips[sl].view(-1, 1, 1, 1), xb.flip(-1), xb)
            yield xb.mul_(self._mul).add_(self._add), self.y[order[sl]]


def _batch_crop(x: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch: two gathers, no Python per image."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (shifts[0].view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    xp = xp.gather(2, rows.expand(b, c, h, w + 2 * pad))
    cols = (shifts[1].view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    return xp.gather(3, cols.expand(b, c, h, w))


class FolderLoader:
    """Batches of an ``ImageFolder`` subset, decoded by ``DataLoader`` worker processes."""

    def __init__(self, dataset: Any, indices: torch.Tensor, *, batch_size: int,
                 shuffle: bool, seed: int, num_workers: int, device: torch.device) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self.dataset, self.indices = dataset, indices
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_workers, self.device = num_workers, device
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        n = len(self.indices)
        if self.shuffle:
            n = -(-n // _dist_rank_world()[1])
        return -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        order = self.indices
        g = _epoch_generator(self.seed, epoch)
        if self.shuffle:
            order = _shard(order[torch.randperm(len(order), generator=g)], *_dist_rank_world())
        order = order[start * self.batch_size:]
        loader = DataLoader(Subset(self.dataset, order.tolist()), batch_size=self.batch_size,
                            shuffle=False, num_workers=self.num_workers, generator=g,
                            pin_memory=self.device.type == "cuda")
        for xb, yb in loader:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


@dataclass
class Data:
    """A data set ready for training: batches on the device, and what a model needs to know."""

    name: str
    family: str
    num_classes: int
    in_channels: int
    input_size: int
    train: TensorLoader | FolderLoader
    val: TensorLoader | FolderLoader | None
    test: TensorLoader | FolderLoader
    calibration: TensorLoader | FolderLoader = field(repr=False)
    classes: list[str] | None = None
    normalize: Normalization | None = None  # the (mean, std) its batches are normalised with

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input, e.g. for :func:`sketch_core.count_flops`."""
        return (self.in_channels, self.input_size, self.input_size)

    def calibration_batches(self, n: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` un-augmented training batches (a fixed random sample), e.g. for BN statistics."""
        out = []
        for batch in self.calibration:
            if len(out) == n:
                break
            out.append(batch)
        return out


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices: a seeded random ``fraction`` of ``range(n)`` is held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(fraction * n))
    return perm[k:].sort().values, perm[:k].sort().values


def loader_rows(loader: TensorLoader | FolderLoader) -> torch.Tensor:
    """The rows of its split a loader serves (``TensorLoader.index``, ``FolderLoader.indices``)."""
    return loader.index if hasattr(loader, "index") else loader.indices


def with_rows(loader: TensorLoader | FolderLoader, rows: torch.Tensor) -> TensorLoader | FolderLoader:
    """A shallow copy of ``loader`` serving ``rows`` of its split (the data tensors, or
    the image set, are shared)."""
    view = copy.copy(loader)
    setattr(view, "index" if hasattr(loader, "index") else "indices", rows)
    return view


def hold_out_test(data: Data, n: int, seed: int) -> Data:
    """``data`` with ``n`` images of its test split (a random draw seeded by ``seed``) as
    its validation split, and the other test images as its test split.

    The two are disjoint and together are the whole test split; every choice made on
    ``val`` (a search's trials, a retrain's best epoch) is then reported on images it
    never saw. ``0 < n < len(test)``.
    """
    rows = loader_rows(data.test)
    if not 0 < n < len(rows):
        raise ValueError(f"hold_out_test: n must be in [1, {len(rows) - 1}], got {n}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + 4049) % (2**63))
    perm = torch.randperm(len(rows), generator=g).to(rows.device)
    choose, report = rows[perm[:n].sort().values], rows[perm[n:].sort().values]
    return dataclasses.replace(data, val=with_rows(data.test, choose),
                               test=with_rows(data.test, report))


def _check_common(data_set: str, batch_size: int, eval_batch_size: int,
                  val_fraction: float) -> None:
    if data_set not in DATA_SETS:
        raise UserError(f"unknown data set {data_set!r}; expected one of: {', '.join(DATA_SETS)}")
    if batch_size < 1 or eval_batch_size < 1:
        raise UserError(f"batch sizes must be positive integers, got train {batch_size}, "
                        f"eval {eval_batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")


def load_data(data_set: str, data_path: str | os.PathLike | None = None, *,
              batch_size: int = 128, eval_batch_size: int = 100, val_fraction: float = 0.1,
              seed: int = 0, device: str | torch.device = "cpu", download: bool = False,
              input_size: int | None = None, num_workers: int | None = None,
              synthetic: dict | None = None,
              normalize: Normalization | str | None = None,
              cache_dir: str | os.PathLike | None = None) -> Data:
    """Load ``data_set`` (one of :data:`DATA_SETS`) with its train/val/test batches on ``device``.

    ``val_fraction`` of the training set (chosen with ``seed``) becomes the validation
    split; with 0 there is none (``Data.val`` is None). ``input_size`` is the image side
    for class-folder sets (default: a ``folder`` set's own side when its images are
    small and square, else 224) and synthetic data; a ``folder`` set of small square
    images is served from one resident tensor when ``input_size`` is unset or equals
    their side, and resized image by image otherwise. ``synthetic`` overrides
    :data:`SYNTHETIC_DEFAULTS` (n_train, n_test, num_classes, channels, size, seed).
    ``normalize`` = ``(mean, std)`` on [0, 1] pixels (or its command-line spelling,
    :func:`sketch_core.data.normalize.parse_normalize`) replaces the data set's own
    statistics; ``Data.normalize`` says which pair the batches use. ``cache_dir``: where a
    small-image folder's decoded tensor is cached (default:
    :func:`sketch_core.data.folder_cache.default_cache_dir`).
    """
    _check_common(data_set, batch_size, eval_batch_size, val_fraction)
    norm_override = parse_normalize(normalize)
    device = torch.device(device)
    opts = dict(batch_size=batch_size, eval_batch_size=eval_batch_size,
                val_fraction=val_fraction, seed=seed, device=device)

    def norm_of(mean: tuple[float, ...], std: tuple[float, ...], scale: float,
                channels: int = 3) -> dict:
        if norm_override is not None:
            check_channels(norm_override, channels, f"data set {data_set}")
            mean, std = norm_override
        return dict(mean=mean, std=std, scale=scale)

    if data_set in ("imagenet", "folder"):
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        return _folder_data(data_set, data_path, input_size=input_size,
                            num_workers=num_workers, norm=norm_of(IMAGENET_MEAN, IMAGENET_STD, 1.0),
                            cache_dir=cache_dir, **opts)
    if data_set == "cifar10":
        (xtr, ytr), (xte, yte) = _read_cifar10(data_path, download)
        norm = norm_of(CIFAR_MEAN, CIFAR_STD, 1 / 255)
        aug = dict(pad=4, flip=True)
        return _tensor_data("cifar10", xtr, ytr, xte, yte, 10, norm, aug, **opts)
    if data_set == "digits":
        xtr, ytr, xte, yte = _digits()
        mean = float(xtr.mean()) / 16
        std = float((xtr / 16).std())
        norm = norm_of((mean,), (std,), 1 / 16, channels=1)
        return _tensor_data("digits", xtr, ytr, xte, yte, 10, norm, dict(pad=1, flip=False),
                            **opts)
    return _synthetic_data(synthetic, input_size, norm_of, opts)


def _synthetic_data(synthetic: dict | None, input_size: int | None, norm_of: Any,
                    opts: dict) -> Data:
    """The seeded synthetic set (``synthetic`` overrides :data:`SYNTHETIC_DEFAULTS`)."""
    spec = {**SYNTHETIC_DEFAULTS, **(synthetic or {})}
    unknown = set(spec) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        raise UserError(f"unknown synthetic option(s) {sorted(unknown)}; expected "
                        f"{sorted(SYNTHETIC_DEFAULTS)}")
    if input_size:
        spec["size"] = input_size
    xtr, ytr, xte, yte = _synthetic(**spec)
    aug = dict(pad=max(1, spec["size"] // 8), flip=True)
    norm = norm_of((0.0,), (1.0,), 1.0, channels=spec["channels"])
    return _tensor_data("synthetic", xtr, ytr, xte, yte, spec["num_classes"], norm, aug, **opts)


def _tensor_data(name: str, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor,
                 yte: torch.Tensor, num_classes: int, norm: dict, aug: dict, *,
                 batch_size: int, eval_batch_size: int, val_fraction: float, seed: int,
                 device: torch.device, classes: list[str] | None = None) -> Data:
    keep, held = _split(len(ytr), val_fraction, seed)
    perm = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed + 1))]
    xtr, ytr, xte, yte, keep, held, perm = (
        t.to(device) for t in (xtr, ytr, xte, yte, keep, held, perm))
    common = dict(seed=seed, **norm)
    train = TensorLoader(xtr, ytr, index=keep, batch_size=batch_size, shuffle=True, **aug,
                         **common)
    val = (TensorLoader(xtr, ytr, index=held, batch_size=eval_batch_size, **common)
           if len(held) else None)
    test = TensorLoader(xte, yte, batch_size=eval_batch_size, **common)
    calibration = TensorLoader(xtr, ytr, index=perm, batch_size=batch_size, **common)
    return Data(name, "cifar", num_classes, xtr.shape[1], xtr.shape[2], train, val, test,
                calibration, classes=classes,
                normalize=(tuple(norm["mean"]), tuple(norm["std"])))


def _read_cifar10(data_path: str | os.PathLike | None, download: bool):
    root = Path(data_path if data_path is not None else "data/cifar10").expanduser()
    if download:
        import torchvision  # heavy: torchvision, CIFAR only

        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as exc:  # network problems surface as many exception types
            raise UserError(f"could not download CIFAR-10 into {root}: {exc}") from None
    folder = root if (root / "test_batch").exists() else root / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"--data_path {root} does not hold CIFAR-10 in torchvision's format: expected "
            f"{root}/cifar-10-batches-py/ with {', '.join(CIFAR10_FILES)} (missing: "
            f"{', '.join(missing)}); pass --download to fetch it")

    def read(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
            except Exception as exc:
                raise UserError(f"{folder / name} is not a CIFAR-10 batch file "
                                f"(a pickled dict with 'data' N x 3072 uint8 and 'labels'): "
                                f"{exc}") from None
            if len(x) != len(y):
                raise UserError(f"{folder / name}: {len(x)} images but {len(y)} labels")
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return read(CIFAR10_FILES[:-1]), read(CIFAR10_FILES[-1:])


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # heavy: scikit-learn, digits only

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)  # N x 1 x 8 x 8, values 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    n_test = int(np.ceil(DIGITS_TEST_FRACTION * len(y)))
    train, test = _split(len(y), n_test / len(y), DIGITS_SPLIT_SEED)
    return x[train], y[train], x[test], y[test]


def _synthetic(n_train: int, n_test: int, num_classes: int, channels: int, size: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy copies of one random prototype per class: learnable, any shape, seeded."""
    if min(n_train, n_test, num_classes, channels, size) < 1:
        raise UserError(f"synthetic data needs positive sizes, got n_train={n_train}, "
                        f"n_test={n_test}, num_classes={num_classes}, channels={channels}, "
                        f"size={size}")
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, channels, size, size, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    x = 0.5 * protos[y] + torch.randn(len(y), channels, size, size, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _folder_data(data_set: str, data_path: str | os.PathLike | None, *, input_size: int | None,
                 num_workers: int, norm: dict, cache_dir: str | os.PathLike | None,
                 batch_size: int, eval_batch_size: int, val_fraction: float, seed: int,
                 device: torch.device) -> Data:
    if data_path is None:
        raise UserError(f"--data_set {data_set} needs --data_path: {FOLDER_LAYOUT}")
    root = Path(data_path).expanduser()
    train_dir, test_dir = folder_splits(root)
    opts = dict(batch_size=batch_size, eval_batch_size=eval_batch_size, val_fraction=val_fraction,
                seed=seed, device=device)
    if data_set == "folder":
        side = small_image_side(root)
        if side is not None and input_size in (None, side):
            resident = _resident_folder_data(data_set, train_dir, test_dir, side, norm, cache_dir,
                                             **opts)
            if resident is not None:
                return resident
            input_size = input_size or side
    from torchvision import datasets, transforms  # heavy: torchvision, ImageNet only

    size = input_size or 224
    if size < 8:
        raise UserError(f"--input_size must be at least 8, got {size}")
    normalize = transforms.Normalize(norm["mean"], norm["std"])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalize])
    eval_tf = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))),
                                  transforms.CenterCrop(size), transforms.ToTensor(), normalize])
    try:
        train_set = datasets.ImageFolder(str(train_dir), transform=train_tf)
        test_set = datasets.ImageFolder(str(test_dir), transform=eval_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"--data_path {root}: {exc}; expected {FOLDER_LAYOUT}") from None
    if test_set.classes != train_set.classes:
        raise UserError(f"{test_dir} has classes {test_set.classes[:5]}... but {root / 'train'} "
                        f"has {train_set.classes[:5]}...; both need the same class folders")
    train_eval = copy.copy(train_set)
    train_eval.transform = eval_tf
    keep, held = _split(len(train_set), val_fraction, seed)
    common = dict(seed=seed, num_workers=num_workers, device=device)
    train = FolderLoader(train_set, keep, batch_size=batch_size, shuffle=True, **common)
    val = (FolderLoader(train_eval, held, batch_size=eval_batch_size, shuffle=False, **common)
           if len(held) else None)
    test = FolderLoader(test_set, torch.arange(len(test_set)), batch_size=eval_batch_size,
                        shuffle=False, **common)
    perm = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed + 1))]
    calibration = FolderLoader(train_eval, perm, batch_size=batch_size, shuffle=False, **common)
    # the family rule: a folder of images at most SMALL_IMAGE_SIDE pixels is CIFAR-sized
    family = "cifar" if data_set == "folder" and size <= SMALL_IMAGE_SIDE else "imagenet"
    return Data(data_set, family, len(train_set.classes), 3, size, train, val, test,
                calibration, classes=list(train_set.classes),
                normalize=(tuple(norm["mean"]), tuple(norm["std"])))


def _resident_folder_data(data_set: str, train_dir: Path, test_dir: Path, side: int, norm: dict,
                          cache_dir: str | os.PathLike | None, **opts: Any) -> Data | None:
    """A small-image folder as one resident tensor (decoded once, cached); None if too big."""
    listings = list_folder(train_dir), list_folder(test_dir)
    n = sum(len(li.files) for li in listings)
    if not fits_in_memory(n * 3 * side * side):
        log.info("%s: %d images of %dx%d do not fit in memory; reading them image by image",
                 train_dir.parent, n, side, side)
        return None
    train, test = (load_folder_images(li, cache_dir) for li in listings)
    if test.classes != train.classes:
        raise UserError(f"{test_dir} has classes {test.classes[:5]}... but {train_dir} has "
                        f"{train.classes[:5]}...; both need the same class folders")
    if test.x.shape[1:] != train.x.shape[1:]:
        raise UserError(f"images of more than one size: {train_dir / train.files[0]} is "
                        f"{train.x.shape[2]}x{train.x.shape[3]}, {test_dir / test.files[0]} is "
                        f"{test.x.shape[2]}x{test.x.shape[3]} (a resident tensor needs one size)")
    aug = dict(pad=max(1, side // 8), flip=True)
    return _tensor_data(data_set, train.x, train.y, test.x, test.y, len(train.classes),
                        dict(norm, scale=1 / 255), aug, classes=list(train.classes), **opts)
