"""Training throughput: sketchtune's loop against a plain PyTorch CIFAR loop, in one run.

Both train the same architecture (CIFAR ResNet-56 by default, ``--cfg`` to change it)
from the same initial weights on the same synthetic CIFAR-shaped images (uint8,
32x32x3, written in CIFAR-10's on-disk format), with the same batch size, SGD and
augmentation (random crop with 4 pixels of padding, horizontal flip):

- reference: a Dataset of HWC uint8 images, torchvision transforms per image
  (RandomCrop, RandomHorizontalFlip, ToTensor, Normalize), a shuffling DataLoader
  with ``--workers`` processes, fp32, NCHW;
- sketchtune: ``load_data("cifar10")`` (images resident on the device, augmentation on
  whole batches) and ``fit()`` with its defaults for the device.

Epochs alternate (reference, sketchtune, reference, ...) so that a busy machine slows
both alike; the first epoch of each is a warm-up. Images per second count training
only (no evaluation). The last line is ``ratio=<sketchtune img/s / reference img/s>``
(medians over the measured epochs).

    python benchmarks/train_throughput.py [--cfg resnet56] [--images N] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sketch_core.data.sets import CIFAR_MEAN, CIFAR_STD, CIFAR10_FILES, load_data  # noqa: E402
from sketch_core.registry import resolve_arch  # noqa: E402
from sketch_core.training.loop import fit, resolve_device  # noqa: E402


def write_cifar_format(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """``images`` (N, 32, 32, 3) uint8 as CIFAR-10's five training batches (+ a tiny test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    parts = np.array_split(np.arange(len(images)), 5)
    for name, idx in zip(CIFAR10_FILES[:-1], parts):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat[idx], "labels": labels[idx].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": flat[:100], "labels": labels[:100].tolist()}, f)


class PlainCifar(torch.utils.data.Dataset):
    """What a plain CIFAR script does: one PIL image and four transforms per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision import transforms  # heavy: only the reference loop needs it

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image  # heavy: only the reference loop needs it

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_epoch(model: nn.Module, loader, optimizer, device: torch.device) -> float:
    """One plain training epoch (fp32, NCHW); returns images per second."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    seen = 0
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    loss.item()  # wait for the device
    return seen / (time.perf_counter() - t0)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="resnet56", help="CIFAR architecture (default resnet56)")
    p.add_argument("--images", type=int, default=None,
                   help="training images per epoch (default 50000 on CUDA, 1280 on the CPU)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each loop, the first a warm-up")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader processes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile sketchtune's model (optionally in MODE, e.g. "
                        "reduce-overhead)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both loops (default: torch's own)")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first one is a warm-up)")
    return args


def reference_loop(entry, init: dict, images: np.ndarray, labels: np.ndarray,
                   args: argparse.Namespace, device: torch.device):
    """The plain loop's model (``init`` weights), SGD and per-image DataLoader."""
    model = entry.build().to(device)
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        PlainCifar(images, labels), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0)
    return model, opt, loader


def resident_data(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device):
    """The same images through ``load_data("cifar10")`` (written in CIFAR-10's format)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar_format(Path(tmp), images, labels)
        return load_data("cifar10", tmp, batch_size=batch_size, val_fraction=0.0, device=device)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n = args.images or (50000 if device.type == "cuda" else 1280)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    entry = resolve_arch(args.cfg, "cifar10")
    torch.manual_seed(0)
    init = entry.build().state_dict()
    ref_model, ref_opt, ref_loader = reference_loop(entry, init, images, labels, args, device)
    our_model = entry.build()
    our_model.load_state_dict(init)
    data = resident_data(images, labels, args.batch_size, device)
    print(f"{args.cfg}, batch {args.batch_size}, {n} images per epoch, {args.epochs} epochs "
          f"each (first = warm-up), reference DataLoader workers {args.workers}")
    print(f"device: {device} ({machine(device)})")
    print(f"{'epoch':>5}  {'reference img/s':>16}  {'sketchtune img/s':>17}")
    ref_speeds, our_speeds = [], []
    for epoch in range(args.epochs):
        ref_speeds.append(reference_epoch(ref_model, ref_loader, ref_opt, device))
        result = fit(our_model, data, epochs=1, lr=0.01, device=device, progress=False,
                     compile=args.compile, seed=epoch)
        our_speeds.append(result.history[-1]["img_s"])
        tag = " (warm-up)" if epoch == 0 else ""
        print(f"{epoch + 1:>5}  {ref_speeds[-1]:>16.1f}  {our_speeds[-1]:>17.1f}{tag}", flush=True)
    ref, ours = statistics.median(ref_speeds[1:]), statistics.median(our_speeds[1:])
    print(f"reference (per-image transforms, DataLoader, fp32, NCHW): {ref:.1f} img/s")
    print(f"sketchtune (resident data, batch augmentation, fit defaults): {ours:.1f} img/s")
    ratio = ours / ref
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
