"""What Ray Tune costs per trial: the same trials through the search and in a plain loop.

Both sides run the quickstart's trials (digits, ResNet-20, the same seeded rate
vectors, ``trial.epochs`` epochs each) one at a time on one CPU thread, through the
same function (:func:`search.run.trial.train_trial`). The plain loop calls it in this
process; the search runs it as Tune trials (the searcher told the vectors up front,
no early stopping, one trial at a time, a checkpoint per epoch, trials.jsonl, the
Optuna study in SQLite), timed from ``Tuner.fit()`` to its return (the search phase;
starting Ray itself is not counted, the trial worker's start is).

Prints the two totals, the overhead per trial, and last ``ratio=<search / plain>``.
Goal: overhead <= 0.25 s per trial on the quickstart.

    python benchmarks/search_overhead.py [--trials 32] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import search_trials  # noqa: E402

from search.experiment.config import load_config  # noqa: E402
from search.run.trial import train_trial  # noqa: E402
from sketch_core.rates import format_rates  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default=None, help="baseline cache (default: the user's)")
    return p.parse_args()


def overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """The quickstart's settings for both sides: one trial at a time, no early stopping."""
    sets = [f"storage.storage_path={work}", "retrain.enabled=false",
            f"trial.epochs={args.epochs}", "trial.threads=1", "scheduler.name=none",
            "resources.cpu=1", "resources.max_concurrent_trials=1",
            f"budget.num_samples={args.trials}", "budget.time=null"]
    if args.cache_dir:
        sets.append(f"model.pretrain.cache_dir={args.cache_dir}")
    return sets


def seeded_vectors(space, n: int, seed: int) -> list[list[float]]:
    """``n`` rate vectors drawn from the space's grid, seeded."""
    rng = random.Random(seed)
    return [[rng.choice(space.grid) for _ in range(space.num_units)] for _ in range(n)]


def plain_loop(vectors: list[list[float]], trials, epochs: int) -> tuple[float, list[float]]:
    """Seconds for the trials called one after another here, and their final accuracies."""
    torch.set_num_threads(1)
    reports: list[dict] = []
    t0 = time.perf_counter()
    for v in vectors:
        train_trial(v, trials.setup, trials.baseline.state, lambda m, _state: reports.append(m))
    seconds = time.perf_counter() - t0
    return seconds, [m["val_acc"] for m in reports if m.get("epoch") == epochs]


def through_search(sets: list[str], vectors: list[list[float]], source: str
                   ) -> tuple[float, float, list[float]]:
    """(search phase s, the first trial's s, final accuracies) of the same vectors as a
    search (the searcher told them up front as paper rates)."""
    from search.run.ray_driver import run_search  # heavy: Ray

    texts = list(dict.fromkeys(format_rates(v) for v in vectors))
    config = load_config("quickstart", sets + ["storage.name=overhead",
                                               "space.paper_rates=" + repr(texts)])
    config.model.pretrained = source
    out = run_search(config, quiet=True)
    records = sorted(out.records, key=lambda r: r["started"])
    first = records[0]["ended"] - records[0]["started"] if records else float("nan")
    return out.phases["search_s"], first, [r["val_acc"] for r in records]


def report(n: int, epochs: int, plain: float, search: float, first: float,
           plain_acc: list[float], tuned_acc: list[float]) -> None:
    print(f"trials: {n} of {epochs} epoch(s), digits ResNet-20, one at a time, 1 thread "
          f"({os.cpu_count()} CPUs)")
    print(f"plain loop:    {plain:7.2f} s  ({plain / n:.3f} s per trial)")
    print(f"Ray Tune:      {search:7.2f} s  ({search / n:.3f} s per trial; the first, with the "
          f"worker's start, {first:.2f} s)")
    same = sorted(round(a, 6) for a in plain_acc) == sorted(round(a, 6) for a in tuned_acc)
    print(f"same results:  {same}")
    print(f"overhead per trial: {(search - plain) / n:.3f} s (goal <= 0.25 s)")
    print(f"ratio={search / plain:.3f}")


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="search-overhead-"))
    try:
        sets = overrides(args, work)
        trials = search_trials(load_config("quickstart", sets))  # pretrains once, not timed
        vectors = seeded_vectors(trials.plan.space, args.trials, args.seed)
        plain, plain_acc = plain_loop(vectors, trials, args.epochs)
        search, first, tuned_acc = through_search(sets, vectors, trials.baseline.source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(len(vectors), args.epochs, plain, search, first, plain_acc, tuned_acc)


if __name__ == "__main__":
    main()
