"""Search-trial throughput on one GPU: eager trials, the graph step, trials packed k to a GPU.

The same rate vectors (seeded, CIFAR ResNet-56 by default) are trained as search
trials (:func:`search.run.trial.train_trial`: sketch a baseline, recalibrate BN,
fine-tune ``--epochs`` epochs of the 45,000 resident training images of a CIFAR-10-shaped
set of random images, validate after each epoch, batch 128):

- (a) one trial at a time in this process, ``trial.step=eager`` (today's path);
- (b) one trial at a time, ``trial.step=graph`` (the captured CUDA graph step);
- (c) ``k`` worker processes on the GPU at once (k = 2, 4, 8 by default), each
  training trials with ``--packed_step``; whether CUDA MPS is on is printed (it lets
  the processes' kernels run together; without it they are time-sliced).

(a) and (b) run the first ``--serial`` vectors, (c) all ``--trials`` of them. Each
mode's figures are its aggregate training images per second (all trials' training
images over the mode's wall time, process start and data loading included) and
trials per hour. The last line is ``ratio=<best mode's img/s / (a)'s>``.

    python benchmarks/gpu_trials.py                 # on a GPU: a few minutes
    python benchmarks/gpu_trials.py --toy           # tiny, on the CPU if need be: < 1 min

(``--toy`` checks that everything runs; its figures mean nothing.)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search.experiment.config import ModelConfig, SketchConfig, TrialConfig  # noqa: E402
from search.experiment.scoring_split import data_request  # noqa: E402
from search.run import trial as trainable  # noqa: E402
from search.run.gpu_share import mps_status  # noqa: E402
from search.run.trial import TrialSetup, train_trial  # noqa: E402
from sketch_core.registry import resolve_arch  # noqa: E402
from train_throughput import machine, write_cifar_format  # noqa: E402


def rate_vectors(cfg: str, n: int, seed: int = 0) -> list[list[float]]:
    """``n`` rate vectors on the search's grid (0.3 .. 1.0 in steps of 0.05), seeded."""
    units = resolve_arch(cfg, "cifar10").num_units
    rng = random.Random(seed)
    grid = [round(0.3 + 0.05 * i, 2) for i in range(15)]
    return [[rng.choice(grid) for _ in range(units)] for _ in range(n)]


def make_setup(args: argparse.Namespace, data_path: str, step: str) -> TrialSetup:
    """The trials' setup as a search on this data would resolve it (the trial and sketch
    sections' defaults, BN recalibrated on 4 batches, ``step`` the training step)."""
    trial = TrialConfig(epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=512,
                        val_fraction=args.val_fraction, step=step, lr=0.01)
    model = ModelConfig(cfg=args.cfg, data_set="cifar10", data_path=data_path)
    return TrialSetup(arch=resolve_arch(args.cfg, "cifar10"),
                      data=data_request(model, trial, {"val_source": "train_holdout"}),
                      options=SketchConfig(calibration_batches=4).options(),
                      recipe=trial.recipe(), num_classes=10, in_channels=3,
                      threads=args.threads, use_gpu=args.device == "cuda",
                      baseline_key=f"gpu-trials-{args.cfg}")


def baseline_state(cfg: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return resolve_arch(cfg, "cifar10").build(None, 10, 3).state_dict()


def one_trial(rates: list[float], setup: TrialSetup, baseline: dict) -> dict:
    """Train one trial; its last report and its wall time."""
    last: dict = {}

    def report(metrics: dict, state_file) -> None:
        last.update(metrics)

    t0 = time.perf_counter()
    train_trial(rates, setup, baseline, report)
    return {"time_s": time.perf_counter() - t0, "failed": bool(last.get("failed")),
            "error": last.get("error"), "val_acc": last.get("val_acc")}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_mode(name: str, vectors: list[list[float]], setup: TrialSetup, baseline: dict,
             processes: int, train_images: int) -> dict:
    """Run ``vectors`` as trials, ``processes`` at a time (1: in this process)."""
    if processes == 1:  # each mode loads its data and builds its baseline itself
        trainable._CACHE.clear()
    t0 = time.perf_counter()
    if processes == 1:
        results = [one_trial(v, setup, baseline) for v in vectors]
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker,
                                    initargs=(setup.threads or 1,)) as pool:
            results = list(pool.map(one_trial, vectors, [setup] * len(vectors),
                                    [baseline] * len(vectors)))
    wall = time.perf_counter() - t0
    failed = [r for r in results if r["failed"]]
    images = train_images * setup.recipe.epochs * (len(vectors) - len(failed))
    row = {"mode": name, "trials": len(vectors), "failed": len(failed), "wall_s": wall,
           "img_s": images / wall, "trials_h": 3600 * (len(vectors) - len(failed)) / wall,
           "per_trial_s": float(np.median([r["time_s"] for r in results]))}
    print(f"{name:<22} {row['trials']:>3} trials  {row['img_s']:>9.0f} img/s  "
          f"{row['trials_h']:>8.0f} trials/h  {wall:7.1f} s wall  "
          f"(median trial {row['per_trial_s']:.1f} s{', ' + str(len(failed)) + ' failed' if failed else ''})",
          flush=True)
    for r in failed[:1]:
        print(f"  first failure: {r['error']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="resnet56")
    p.add_argument("--images", type=int, default=50000,
                   help="images written (a tenth is the validation split: 45,000 train)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--trials", type=int, default=8, help="rate vectors for the packed modes")
    p.add_argument("--serial", type=int, default=2, help="of them, run by (a) and (b)")
    p.add_argument("--packs", default="2,4,8", help="processes per GPU for (c)")
    p.add_argument("--packed_step", default="graph", choices=["eager", "graph"])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default: cuda when there is one")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--toy", action="store_true",
                   help="tiny: ResNet-20, 256 images, batch 32, 1 epoch, 2 vectors (1 serial), "
                        "packs 2 (runs on the CPU in under a minute)")
    args = p.parse_args(argv)
    if args.toy:
        args.cfg, args.images, args.epochs, args.batch_size = "resnet20", 256, 1, 32
        args.trials, args.serial, args.packs = 2, 1, "2"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.val_fraction = 0.1
    packs = [int(k) for k in args.packs.split(",") if k.strip()]
    torch.set_num_threads(args.threads)
    vectors = rate_vectors(args.cfg, max(args.trials, args.serial))
    train_images = args.images - int(round(args.images * args.val_fraction))
    print(f"machine: {machine(torch.device(args.device))}; torch {torch.__version__}"
          f"{', CUDA ' + torch.version.cuda if torch.version.cuda else ''}")
    print(f"{args.cfg}, {train_images} training images of 32x32, batch {args.batch_size}, "
          f"{args.epochs} epoch(s) per trial, on {args.device}; {mps_status()}", flush=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int64)
    baseline = baseline_state(args.cfg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-trials-") as tmp:
        write_cifar_format(Path(tmp), images, labels)
        serial = vectors[:args.serial]
        rows.append(run_mode("(a) eager, 1 at a time", serial, make_setup(args, tmp, "eager"),
                             baseline, 1, train_images))
        rows.append(run_mode("(b) graph, 1 at a time", serial, make_setup(args, tmp, "graph"),
                             baseline, 1, train_images))
        for k in packs:
            rows.append(run_mode(f"(c) {args.packed_step}, {k} processes", vectors[:args.trials],
                                 make_setup(args, tmp, args.packed_step), baseline, k,
                                 train_images))
    best = max(rows, key=lambda r: r["img_s"])
    ratio = best["img_s"] / rows[0]["img_s"] if rows[0]["img_s"] else float("nan")
    print(f"best: {best['mode'].strip()} ({best['img_s']:.0f} img/s, "
          f"{best['trials_h']:.0f} trials/h)")
    print(f"ratio={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
