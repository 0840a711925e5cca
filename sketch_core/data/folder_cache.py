"""Class folders of small images, decoded once and kept as one uint8 tensor.

A split folder (``<split>/<class>/*.jpg``, the layout torchvision's ``ImageFolder``
reads, in the same order) whose images are small is decoded once into ``x`` (N x C x
H x W, uint8) and ``y`` (N, int64), and the pair is cached in a cache folder (default
``$XDG_CACHE_HOME/sketchtune/folders`` or ``~/.cache/sketchtune/folders``: data folders
are often read-only). The cache is keyed by the folder's file list, file sizes and
modification times: a changed folder is decoded again, and a cache file that is
truncated, damaged or stale is rebuilt with one log line saying so, never trusted.
Cache files are written atomically and read with ``torch.load(weights_only=True)``.

JPEG files are decoded by ``torchvision.io.decode_jpeg`` from their bytes (faster than
PIL, the same pixels; docs/benchmarks.md), other formats (and JPEGs when torchvision
cannot) by PIL; both give RGB.
Bad input is a :class:`~sketch_core.errors.UserError` before anything is written: a
folder without class folders, an empty class, a file that does not decode (named),
images of more than one size (one file of each size named).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sketch_core.io.atomic import atomic_torch_save
from sketch_core.errors import UserError

__all__ = ["FolderListing", "FolderImages", "IMAGE_EXTENSIONS", "SMALL_IMAGE_SIDE",
           "FOLDER_LAYOUT", "default_cache_dir", "folder_splits", "list_folder",
           "sample_image_size", "small_image_side", "default_input_size", "fits_in_memory",
           "load_folder_images", "prepare_folder_cache"]

# the extensions ImageFolder accepts (compared lower-case); other files are skipped as there
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL_IMAGE_SIDE = 64       # images up to this side are the CIFAR family, and kept resident
SAMPLE_CLASSES = 32         # classes whose first image the size probe opens
CACHE_FORMAT, CACHE_VERSION = "sketchtune-folder-images", 1
FOLDER_LAYOUT = ("class folders under DATA_PATH/train/<class>/*.jpg and DATA_PATH/val/<class>/*.jpg "
                 "(DATA_PATH/test/ is accepted instead of val/)")

log = logging.getLogger("sketchtune.folder_cache")


@dataclass
class FolderListing:
    """The images of one split folder, in ImageFolder's order, and their fingerprint."""

    root: Path
    classes: list[str]
    files: list[str]          # paths relative to ``root``
    labels: list[int]
    fingerprint: str          # sha256 of every (path, size, mtime)


@dataclass
class FolderImages:
    """A decoded split: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,), its classes and files."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    files: list[str]
    from_cache: bool = False

    @property
    def side(self) -> int:
        return int(self.x.shape[-1])


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sketchtune/folders``, else ``~/.cache/sketchtune/folders``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sketchtune" / "folders"


def folder_splits(data_path: str | os.PathLike) -> tuple[Path, Path]:
    """(train folder, test folder) of a class-folder data set; test is ``val/`` or ``test/``."""
    root = Path(data_path).expanduser()
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"--data_path {root} is not laid out as expected: {FOLDER_LAYOUT}")
    return root / "train", test_dir


def _classes(root: Path) -> list[str]:
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as exc:
        raise UserError(f"cannot read the folder {root}: {exc.strerror or exc}") from None
    if not classes:
        raise UserError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    return classes


def _class_files(root: Path, name: str) -> list[str]:
    """The image files of one class, relative to ``root``, in ImageFolder's order."""
    out = []
    for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
        rel = os.path.relpath(dirpath, root)
        out.extend(os.path.join(rel, f) for f in sorted(fnames) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not out:
        raise UserError(f"class folder {root / name} holds no images (expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    return out


def list_folder(root: str | os.PathLike) -> FolderListing:
    """Every image of a split folder with its label, and a fingerprint of names, sizes, mtimes."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; expected {root}/<class>/<image files>")
    classes = _classes(root)
    files: list[str] = []
    labels: list[int] = []
    h = hashlib.sha256()
    for c, name in enumerate(classes):
        for rel in _class_files(root, name):
            try:
                st = os.stat(root / rel)
            except OSError as exc:
                raise UserError(f"cannot read {root / rel}: {exc.strerror or exc}") from None
            files.append(rel)
            labels.append(c)
            h.update(f"{c}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return FolderListing(root, classes, files, labels, h.hexdigest())


def _open_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header only."""
    from PIL import Image  # heavy: PIL, only to decode

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise UserError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None
    return h, w


def sample_image_size(root: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) shared by the first image of up to :data:`SAMPLE_CLASSES` classes, else None.

    Cheap (headers only, a few dozen files); the decode checks every image anyway.
    """
    root = Path(root).expanduser()
    classes = _classes(root)
    step = max(1, len(classes) // SAMPLE_CLASSES)
    sizes = {_open_size(root / _class_files(root, name)[0]) for name in classes[::step]}
    return sizes.pop() if len(sizes) == 1 else None


def small_image_side(data_path: str | os.PathLike) -> int | None:
    """The side of a class-folder set whose sampled images are square and at most 64 pixels.

    None for large, non-square or mixed images (the per-image path and 224 by default).
    """
    train, test = folder_splits(data_path)
    sizes = {sample_image_size(train), sample_image_size(test)}
    if len(sizes) != 1 or None in sizes:
        return None
    h, w = sizes.pop()
    return h if h == w and h <= SMALL_IMAGE_SIDE else None


def default_input_size(data_path: str | os.PathLike) -> int:
    """The input size a ``folder`` set defaults to: the images' own side when small, else 224."""
    return small_image_side(data_path) or 224


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def fits_in_memory(nbytes: int) -> bool:
    """Whether a resident tensor of ``nbytes`` leaves at least half the available memory."""
    return nbytes <= _available_memory() // 2


def _cache_path(root: Path, cache_dir: Path) -> Path:
    where = str(root.resolve())
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{root.resolve().parent.name}_{root.name}")[-60:]
    return cache_dir / f"{tag}-{hashlib.sha256(where.encode()).hexdigest()[:16]}.pt"


def _read_cache(path: Path, listing: FolderListing) -> tuple[FolderImages | None, str | None]:
    """(images, None) from a valid cache file; (None, why) when it must be rebuilt."""
    if not path.exists():
        return None, None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file fails in many ways
        return None, f"unreadable or truncated ({type(exc).__name__})"
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT:
        return None, "not a folder cache"
    if obj.get("version") != CACHE_VERSION:
        return None, f"of version {obj.get('version')}"
    if obj.get("fingerprint") != listing.fingerprint:
        return None, "stale: the folder's files, sizes or times changed"
    x, y = obj.get("x"), obj.get("y")
    n = len(listing.files)
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == torch.uint8
            and x.dim() == 4 and y.dtype == torch.int64 and len(x) == len(y) == n
            and obj.get("classes") == listing.classes and y.tolist() == listing.labels):
        return None, "damaged (its tensors do not match the folder)"
    return FolderImages(x, y, listing.classes, listing.files, from_cache=True), None


def _decode_jpeg(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg  # heavy: torchvision's JPEG decoder

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _decode_pil(path: Path) -> torch.Tensor:
    from PIL import Image  # heavy: PIL, only to decode

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode(path: Path) -> torch.Tensor:
    """One image as a uint8 (3, H, W) tensor; a file that does not decode is named."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data[:3] == b"\xff\xd8\xff":
        try:
            return _decode_jpeg(data)
        except (RuntimeError, ImportError):
            pass  # e.g. an unusual JPEG flavour: PIL below, or a clear error
    try:
        return _decode_pil(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise UserError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None


def _decode_all(listing: FolderListing, workers: int) -> torch.Tensor:
    root, files = listing.root, listing.files
    first = _decode(root / files[0])
    x = torch.empty((len(files), *first.shape), dtype=torch.uint8)
    x[0] = first
    shape = tuple(first.shape)

    failed = threading.Event()  # one bad file stops the other workers early

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            if failed.is_set():
                return
            try:
                img = _decode(root / files[i])
            except UserError:
                failed.set()
                raise
            if tuple(img.shape) != shape:
                failed.set()
                raise UserError(
                    f"images of more than one size in {root}: {root / files[0]} is "
                    f"{shape[1]}x{shape[2]}, {root / files[i]} is {img.shape[1]}x{img.shape[2]} "
                    f"(a resident tensor needs one size; resize the images, or give another "
                    f"--input_size for the per-image path)")
            x[i] = img

    chunk = 512
    bounds = [(lo, min(lo + chunk, len(files))) for lo in range(1, len(files), chunk)]
    if workers <= 1 or len(bounds) <= 1:
        for lo, hi in bounds:
            run(lo, hi)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for fut in [pool.submit(run, lo, hi) for lo, hi in bounds]:
                fut.result()
    return x


def load_folder_images(root: str | os.PathLike | FolderListing,
                       cache_dir: str | os.PathLike | None = None, *,
                       workers: int | None = None, write_cache: bool = True) -> FolderImages:
    """The decoded images of one split folder: from its valid cache file, else decoded (and cached).

    ``root`` is the folder or its :func:`list_folder` listing. ``workers`` decoding
    threads (default: up to 2). A cache file that cannot be written (read-only cache
    folder) is logged and skipped: the images are still returned.
    """
    listing = root if isinstance(root, FolderListing) else list_folder(root)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = _cache_path(listing.root, cache)
    images, why = _read_cache(path, listing)
    if images is not None:
        return images
    if why is not None:
        log.warning("folder cache %s is %s: decoding %s again", path, why, listing.root)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # torchvision announces that its decoders move to another package; PIL stands in
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of "
                                "TorchVision are deprecated", category=DeprecationWarning)
        x = _decode_all(listing, workers or min(2, os.cpu_count() or 1))
    y = torch.tensor(listing.labels, dtype=torch.int64)
    log.info("decoded %d images of %s in %.1f s", len(y), listing.root, time.perf_counter() - t0)
    if write_cache:
        obj = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "root": str(listing.root.resolve()),
               "fingerprint": listing.fingerprint, "classes": listing.classes,
               "files": listing.files, "x": x, "y": y}
        try:
            atomic_torch_save(obj, path)
        except OSError as exc:
            log.warning("could not write the folder cache %s (%s): it is decoded again next time",
                        path, exc.strerror or exc)
    return FolderImages(x, y, listing.classes, listing.files)


def prepare_folder_cache(data_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                         workers: int | None = None) -> dict[str, FolderImages] | None:
    """Decode and cache both splits of a small-image class-folder set, e.g. before trials start.

    Returns ``{"train": ..., "test": ...}``, or None when the set is not one of small
    square images (see :func:`small_image_side`): such sets are read image by image.
    Calling it once before concurrent readers start means none of them decodes.
    """
    if small_image_side(data_path) is None:
        return None
    train, test = folder_splits(data_path)
    return {"train": load_folder_images(train, cache_dir, workers=workers),
            "test": load_folder_images(test, cache_dir, workers=workers)}
