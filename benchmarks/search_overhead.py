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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default=None, help="baseline cache (default: the user's)")
    args = p.parse_args()

    import torch

    from search.experiment.baseline import prepare_baseline
    from search.experiment.config import load_config
    from search.propose.space import RateSpace
    from search.run.trial import train_trial
    from search.run.ray_driver import _baseline_dict, _make_setup, run_search
    from sketch_core.rates import format_rates

    work = Path(tempfile.mkdtemp(prefix="search-overhead-"))
    try:
        base_sets = [f"storage.storage_path={work}", "retrain.enabled=false",
                     f"trial.epochs={args.epochs}", "trial.threads=1", "scheduler.name=none",
                     "resources.cpu=1", "resources.max_concurrent_trials=1",
                     f"budget.num_samples={args.trials}", "budget.time=null"]
        if args.cache_dir:
            base_sets.append(f"model.pretrain.cache_dir={args.cache_dir}")
        config = load_config("quickstart", base_sets)
        space = RateSpace(config.model.cfg, config.model.data_set, low=config.space.low,
                          high=config.space.high, step=config.space.step, in_channels=1,
                          input_size=8)
        rng = random.Random(args.seed)
        vectors = [[rng.choice(space.grid) for _ in range(space.num_units)]
                   for _ in range(args.trials)]
        texts = list(dict.fromkeys(format_rates(v) for v in vectors))

        b = prepare_baseline(config, None)  # pretrains (and caches) once, not timed
        baseline = _baseline_dict(b)
        setup = _make_setup(config, baseline, {})

        # ---- the plain loop
        torch.set_num_threads(1)
        reports: list[dict] = []
        t0 = time.perf_counter()
        for v in vectors:
            train_trial(v, setup, b.state, lambda m, _state: reports.append(m))
        plain = time.perf_counter() - t0
        plain_acc = [m["val_acc"] for m in reports if m.get("epoch") == args.epochs]

        # ---- the same trials through the search
        config = load_config("quickstart", base_sets + [
            "storage.name=overhead", "space.paper_rates=" + repr(texts)])
        config.model.pretrained = b.source
        out = run_search(config, quiet=True)
        search = out.phases["search_s"]
        records = sorted(out.records, key=lambda r: r["started"])
        first = records[0]["ended"] - records[0]["started"] if records else float("nan")
        tuned_acc = [r["val_acc"] for r in records]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(vectors)
    print(f"trials: {n} of {args.epochs} epoch(s), digits ResNet-20, one at a time, 1 thread "
          f"({os.cpu_count()} CPUs)")
    print(f"plain loop:    {plain:7.2f} s  ({plain / n:.3f} s per trial)")
    print(f"Ray Tune:      {search:7.2f} s  ({search / n:.3f} s per trial; the first, with the "
          f"worker's start, {first:.2f} s)")
    print(f"same results:  {sorted(round(a, 6) for a in plain_acc) == sorted(round(a, 6) for a in tuned_acc)}")
    print(f"overhead per trial: {(search - plain) / n:.3f} s (goal <= 0.25 s)")
    print(f"ratio={search / plain:.3f}")


if __name__ == "__main__":
    main()
