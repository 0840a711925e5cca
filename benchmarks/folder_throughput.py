"""Small-image folders: the per-image DataLoader path against the resident tensor, in one run.

Data: CIFAR-10 as JPEG class folders (``--data_path``, default ``../shared/data/cifar10-jpg``
beside the repository; ``--images N`` takes a class-balanced subset of N training and
N/5 test images, linked into a temporary folder). Three figures:

- decode: the one-time decode of every image (train + test) into the cache
  (:func:`sketch_core.data.folder_cache.load_folder_images`, a fresh temporary cache folder),
  wall and CPU time, and the rate extrapolated to CIFAR-10's 60,000 images (goal
  <= 30 s); importing torchvision's decoder is timed apart (a fixed cost);
- cached load: ``load_data("folder", ...)`` again, served from that cache (listing,
  stat of every file, ``torch.load``; goal <= 2 s at 60,000 images, extrapolated);
- epochs: one training epoch over the training images through each path, the same
  loop, model and optimiser, only the batches differ:
  per-image: ``FolderLoader`` over torchvision's ``ImageFolder`` (what ``folder`` read
  before), PIL decode and per-image RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize, ``--workers`` DataLoader processes;
  resident: ``load_data("folder")``'s ``TensorLoader`` (uint8 tensor on the device,
  pad-crop 4 + flip on whole batches).
  Each batch gets one SGD step of a CIFAR ResNet-20 (``--model``; ``none`` measures the
  loaders alone). Epochs alternate (per-image, resident, ...) so that a busy machine
  slows both alike; the first of each is a warm-up when ``--epochs`` > 1.

On a CPU the ResNet-20 step dominates both paths; the loader-only figures (printed
too) show the data path itself. The last line is ``ratio=<resident img/s / per-image
img/s>`` of the training epochs (medians; goal >= 3).

    python benchmarks/folder_throughput.py [--images 2000] [--epochs 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sketch_core.data.sets import IMAGENET_MEAN, IMAGENET_STD, FolderLoader, load_data  # noqa: E402
from sketch_core.data.folder_cache import load_folder_images  # noqa: E402
from sketch_core.registry import resolve_arch  # noqa: E402
from sketch_core.training.loop import resolve_device  # noqa: E402

TOTAL_IMAGES = 60_000


def subset(src: Path, dst: Path, n_train: int, n_test: int) -> Path:
    """A class-balanced subset of ``src`` (train/ and test/), as links under ``dst``."""
    for split, n in (("train", n_train), ("test", n_test)):
        classes = sorted(d.name for d in (src / split).iterdir() if d.is_dir())
        per = max(1, n // len(classes))
        for c in classes:
            (dst / split / c).mkdir(parents=True)
            for name in sorted(os.listdir(src / split / c))[:per]:
                (dst / split / c / name).symlink_to(src / split / c / name)
    return dst


def per_image_loader(root: Path, batch_size: int, workers: int, device: torch.device):
    from torchvision import datasets, transforms  # heavy: only the per-image path needs it

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return FolderLoader(ds, torch.arange(len(ds)), batch_size=batch_size, shuffle=True, seed=0,
                        num_workers=workers, device=device)


def epoch(loader, model: nn.Module | None, opt, device: torch.device) -> float:
    """One pass over ``loader`` (one SGD step per batch when there is a model); images/s."""
    criterion = nn.CrossEntropyLoss()
    seen, t0 = 0, time.perf_counter()
    last = None
    for x, y in loader:
        if model is not None:
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss
        else:
            last = x.sum()
        seen += len(y)
    if last is not None:
        last.item()  # wait for the device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg"),
                   help="CIFAR-10 JPEG class folders (train/ and test/)")
    p.add_argument("--images", type=int, default=None,
                   help="training images (class-balanced subset, plus a fifth as many test "
                        "images; default: all 50,000 + 10,000)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each path, the first a warm-up")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="per-image DataLoader processes")
    p.add_argument("--model", default="resnet20", help="CIFAR model stepped per batch, or none")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    src = Path(args.data_path).expanduser()
    if not (src / "train").is_dir() or not (src / "test").is_dir():
        p.error(f"{src} does not hold train/ and test/ class folders")
    return args


def decode_and_load(src: Path, root: Path, cache: Path, args: argparse.Namespace,
                    device: torch.device):
    """The one-time decode into a fresh cache, then the cached load; prints both."""
    t0 = time.perf_counter()
    import torchvision.io  # noqa: F401 - heavy, timed apart: a fixed cost, not a per-image one

    t_import = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    decoded = [load_folder_images(root / s, cache) for s in ("train", "test")]
    t_decode, c_decode = time.perf_counter() - t0, time.process_time() - c0
    n_all = sum(len(d.y) for d in decoded)
    t0 = time.perf_counter()
    data = load_data("folder", root, batch_size=args.batch_size, val_fraction=0.0,
                     device=device, cache_dir=cache)
    t_cached = time.perf_counter() - t0
    n_train = len(data.train.index)
    print(f"{n_train} training + {n_all - n_train} test images from {src}, batch "
          f"{args.batch_size}, device {device}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores")
    scale = TOTAL_IMAGES / n_all
    print(f"decode {n_all} images: {t_decode:.2f} s, {c_decode:.2f} s of CPU time "
          f"({n_all / t_decode:.0f} img/s; {t_decode * scale:.1f} s for {TOTAL_IMAGES}, goal "
          f"<= 30 s), after importing torchvision.io once: {t_import:.2f} s")
    print(f"cached load of {n_all} images: {t_cached:.2f} s ({t_cached * scale:.2f} s for "
          f"{TOTAL_IMAGES}, goal <= 2 s)")
    return data


def model_and_opt(name: str, device: torch.device):
    """The model stepped per batch (the same initial weights each call) and its SGD."""
    if name == "none":
        return None, None
    torch.manual_seed(0)
    m = resolve_arch(name, "cifar10").build().to(device).train()
    return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


def compare(label: str, with_model: bool, slow, fast, args: argparse.Namespace,
            device: torch.device) -> float:
    """Alternating epochs of the per-image and the resident path; resident / per-image."""
    ms, mf = ((model_and_opt(args.model, device), model_and_opt(args.model, device))
              if with_model else ((None, None),) * 2)
    speeds: dict[str, list[float]] = {"per-image": [], "resident": []}
    for e in range(args.epochs):
        speeds["per-image"].append(epoch(slow, *ms, device))
        speeds["resident"].append(epoch(fast, *mf, device))
        tag = " (warm-up)" if e == 0 and args.epochs > 1 else ""
        print(f"  {label}, epoch {e + 1}: per-image {speeds['per-image'][-1]:.0f} img/s, "
              f"resident {speeds['resident'][-1]:.0f} img/s{tag}", flush=True)
    skip = 1 if args.epochs > 1 else 0
    slow_s = statistics.median(speeds["per-image"][skip:])
    fast_s = statistics.median(speeds["resident"][skip:])
    print(f"{label}: per-image {slow_s:.0f} img/s, resident {fast_s:.0f} img/s, "
          f"{fast_s / slow_s:.2f}x")
    return fast_s / slow_s


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    src = Path(args.data_path).expanduser()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = src if args.images is None else subset(src, tmp / "set", args.images,
                                                      max(10, args.images // 5))
        data = decode_and_load(src, root, tmp / "cache", args, device)
        slow = per_image_loader(root, args.batch_size, args.workers, device)
        runs = [("loader only", False)]
        if args.model != "none":
            runs.append((f"epoch with {args.model} steps", True))
        for label, with_model in runs:
            ratio = compare(label, with_model, slow, data.train, args, device)
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
