"""The real task of the allocation benchmarks: a public CIFAR ResNet on the JPEG CIFAR-10.

The public akamaster ResNet (``pretrained/``, trained on the original CIFAR-10 training
images) is adapted to the JPEG copy's training images (one pass of SGD, cached in the
work folder). Its 10,000 test images were never trained on; they are split once,
seeded and recorded:

- ``dev``: 2,000 fixed images, for developing a method only (never reported);
- ``pool``: the other 8,000; each seed draws its own ``choose`` (3,000) and ``report``
  (5,000) from them (:meth:`Splits.draw`).

:meth:`RealTask.evaluate` scores one rate vector zero-shot (``select_lsq`` on the
calibration batches, BN recalibrated on them) on the whole pool at once, per image,
and caches it by widths: any seed's choosing and reporting accuracies are then
slices of the same arrays, and a choice sees only its choosing slice.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import ROOT, require_real_data

from search.propose.space import RateSpace
from sketch_core.data.sets import IMAGENET_MEAN, IMAGENET_STD, load_data, with_rows
from sketch_core.io.checkpoint import load_checkpoint, save_checkpoint
from sketch_core.options import SketchOptions
from sketch_core.pipeline import prune_and_score
from sketch_core.registry import resolve_arch
from sketch_core.training.loop import fit

PUBLIC = {"resnet20": "pretrained/resnet20-12fca82f.th",
          "resnet56": "pretrained/resnet56-4bfd9763.th"}
JPEG = "cifar10-jpg"
SPLIT_SEED = 20261208  # the recorded draw of the development images
OPTIONS = SketchOptions(mode="select_lsq", calibration_batches=10)


def default_root() -> Path:
    return ROOT.parent / "shared" / "data"


def work_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sketchtune" / "allocation"


@dataclass(frozen=True)
class Splits:
    """Positions in the test split: ``dev`` (fixed) and ``pool`` (the rest, in order)."""

    dev: np.ndarray
    pool: np.ndarray

    @staticmethod
    def make(n_test: int, dev: int, pool: int | None = None) -> "Splits":
        """``pool``: only that many of the non-development images (a smoke run)."""
        perm = np.random.default_rng(SPLIT_SEED).permutation(n_test)
        return Splits(np.sort(perm[:dev]), np.sort(perm[dev:][:pool]))

    def draw(self, seed: int, choose: int, report: int) -> tuple[np.ndarray, np.ndarray]:
        """Seed ``seed``'s disjoint (choose, report) positions *within the pool*."""
        if choose + report > len(self.pool):
            raise ValueError(f"{choose} + {report} images exceed the pool of {len(self.pool)}")
        perm = np.random.default_rng(1000 + seed).permutation(len(self.pool))
        return np.sort(perm[:choose]), np.sort(perm[choose:choose + report])


@dataclass
class Outcome:
    """One vector scored on every pool image: hit (bool) and cross-entropy per image."""

    rates: list[float]
    widths: tuple[int, ...]
    flops_ratio: float
    hit: np.ndarray
    loss: np.ndarray

    def acc(self, rows: np.ndarray) -> float:
        return float(self.hit[rows].mean())

    def xent(self, rows: np.ndarray) -> float:
        return float(self.loss[rows].mean())


def _adapted(cfg: str, public: Path, data, work: Path, images: int, log) -> torch.nn.Module:
    """The public network after one pass of SGD over ``images`` JPEG training images."""
    ckpt = work / f"{cfg}-jpeg-e1-n{images}-lr0.01.pt"
    if ckpt.exists():
        log(f"adapted baseline reused: {ckpt}")
        return load_checkpoint(ckpt).model.eval()
    model = load_checkpoint(public, cfg).model
    g = torch.Generator().manual_seed(7)
    rows = data.train.index[torch.randperm(len(data.train.index), generator=g)[:images]]
    log(f"adapting the public {cfg} to {images} JPEG training images (one pass, SGD lr 0.01; "
        f"cached as {ckpt})")
    torch.manual_seed(0)
    fit(model, dataclasses.replace(data, train=with_rows(data.train, rows.sort().values), val=None),
        epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, lr_decay_step=[], seed=0,
        progress=False)
    work.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, model.eval(), cfg=cfg, data_set="cifar10",
                    extra={"adapted_from": public.name, "images": images})
    return model.eval()


class RealTask:
    """The adapted baseline, the splits, the zero-shot scoring of rate vectors."""

    def __init__(self, cfg: str, root: Path, work: Path, *, dev: int = 2000,
                 adapt_images: int = 20000, low: float = 0.1, pool: int | None = None,
                 log=print) -> None:
        if cfg not in PUBLIC:
            raise ValueError(f"--cfg {cfg}: expected one of {', '.join(PUBLIC)}")
        require_real_data(root, JPEG, PUBLIC[cfg], cfg)
        self.cfg, self.log = cfg, log
        self.data = load_data("folder", root / JPEG, input_size=32,
                              normalize=(IMAGENET_MEAN, IMAGENET_STD), batch_size=128,
                              eval_batch_size=500, val_fraction=0.0, seed=0)
        test_rows = self.data.test.index
        self.splits = Splits.make(len(test_rows), dev, pool)
        self.pool = with_rows(self.data.test, test_rows[torch.from_numpy(self.splits.pool)])
        self.base = _adapted(cfg, root / PUBLIC[cfg], self.data, work,
                             min(adapt_images, len(self.data.train.index)), log)
        self.calib = self.data.calibration_batches(OPTIONS.calibration_batches)
        self.arch = resolve_arch(cfg, "cifar10")
        self.space = RateSpace(self.arch, "cifar10", low=low, high=1.0, step=None)
        self.cache: dict[tuple, Outcome] = {}
        self.seconds = 0.0  # spent in evaluate()

    def evaluate(self, rates: list[float]) -> Outcome:
        """``rates`` pruned zero-shot, scored on every pool image (cached by widths)."""
        cost = self.space.cost(rates)
        hit = self.cache.get(cost.widths)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        narrow, _ = prune_and_score(self.arch, self.base, list(cost.widths), OPTIONS,
                                    dataclasses.replace(self.data, val=None, test=None), "cpu",
                                    batches=self.calib)
        narrow = narrow.eval().to(memory_format=torch.channels_last)  # exact, 1.4x faster here
        hits, losses = [], []
        with torch.inference_mode():
            for x, y in self.pool:
                out = narrow(x.contiguous(memory_format=torch.channels_last))
                hits.append((out.argmax(1) == y).numpy())
                losses.append(F.cross_entropy(out, y, reduction="none").numpy())
        self.seconds += time.perf_counter() - t0
        res = Outcome(list(rates), cost.widths, cost.flops_ratio, np.concatenate(hits),
                      np.concatenate(losses).astype(np.float32))
        self.cache[cost.widths] = res
        return res


def task_from_args(args, clock) -> RealTask:
    """The task a benchmark's ``--cfg``, ``--data_root``, ``--work``, ``--threads`` and
    ``--smoke`` ask for (a smoke run: a small adaptation, a pool of just the images it
    draws)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    root = Path(args.data_root).expanduser() if args.data_root else default_root()
    return RealTask(args.cfg, root, work_dir(args.work),
                    adapt_images=2000 if args.smoke else 20000,
                    pool=args.choose_images + args.report_images if args.smoke else None,
                    log=lambda s: print(f"[{clock()}] {s}", flush=True))
