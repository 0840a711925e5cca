"""Does the default sampler find better accuracy/FLOPs trade-offs than random search?

Three ways to spend the same number of trials on the quickstart's space (digits,
ResNet-20, 9 rates on a 0.05 grid in [0.1, 1]):

- ``default``: the search's default (``make_sampler`` as ``search`` builds it: NSGA-II,
  population sized to the trial count, after ``sampler.anchors`` uniform vectors spread
  over the space), ask/tell as ``SketchSearch`` does, except that a proposal repeating a
  network already asked for is scored again (from the cache) where the search would
  ask for another;
- ``surrogate``: ``sampler.name: surrogate`` (:mod:`search.propose.samplers.surrogate`), after the same
  anchors;
- ``random``: Optuna's RandomSampler over the same space;
- ``uniform``: a sweep of uniform vectors ``[r]*9``, r evenly spread over the grid.

Each trial is scored as the search scores it (``search.run.trial.train_trial``: sketch
with the config's mode, BN recalibration, ``--epochs`` epochs of fine-tuning, validation
accuracy; results cached by widths, since the score is deterministic). The quality of
a method is the hypervolume of its Pareto front in (validation accuracy max, FLOPs
ratio min) with reference point (0, 1). Over ``--seeds`` seeds (samplers and
the trial recipe's seed) it prints each method's mean hypervolume and the ratio
default/random (and surrogate/random, surrogate/uniform) with a bootstrap 90% interval
over seeds; last line
``ratio=<default/random>`` (goal > 1).

    python benchmarks/search_quality.py [--trials 32] [--seeds 5] [--epochs 0]

``--data real`` measures allocation on the real task instead (a public CIFAR ResNet
adapted to the JPEG CIFAR-10; the search at cost targets against the uniform control
and a one-step greedy, chosen and reported on disjoint test images, >= 7 seeds): see
``benchmarks/_allocation_real.py``.

    python benchmarks/search_quality.py --data real [--cfg resnet20|resnet56] [--seeds 7]
    python benchmarks/search_quality.py --data real --smoke
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SearchTrials, columns, search_trials, with_seed  # noqa: E402
from _allocation_real import add_arguments, run_allocation  # noqa: E402

from search.experiment.config import SearchConfig, load_config  # noqa: E402
from search.propose.samplers import make_sampler  # noqa: E402
from search.propose.space import RateSpace  # noqa: E402
from search.propose.targets import anchor_points  # noqa: E402
from search.results.pareto import hypervolume  # noqa: E402
from search.run.trial import train_trial  # noqa: E402
from sketch_core.errors import UserError  # noqa: E402

Point = tuple[float, float]  # (validation accuracy, FLOPs ratio)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("digits", "real"), default="digits")
    p.add_argument("--trials", type=int, default=None, help="per method: 32 (digits), 24 (real)")
    p.add_argument("--seeds", type=int, default=None, help="5 (digits), 7 (real)")
    p.add_argument("--epochs", type=int, default=None,
                   help="fine-tune epochs per trial: 0 (digits), 1 (real)")
    p.add_argument("--cache_dir", default=None, help="baseline cache (default: the user's)")
    p.add_argument("--boot", type=int, default=10000)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override for the default method, e.g. sampler.anchors=8")
    add_arguments(p)
    return p.parse_args()


class Scorer:
    """A trial scored as the search scores it (:func:`search.run.trial.train_trial`),
    cached by (widths, seed): the score is deterministic."""

    def __init__(self, trials: SearchTrials) -> None:
        self.trials, self.space = trials, trials.plan.space
        self.cache: dict[tuple, Point] = {}

    def __call__(self, rates: list[float], seed: int) -> Point:
        key = (tuple(self.space.cost(rates).widths), seed)
        if key not in self.cache:
            out: list[dict] = []
            train_trial(rates, with_seed(self.trials.setup, seed), self.trials.baseline.state,
                        lambda m, _s: out.append(m))
            if out[-1].get("failed"):
                raise SystemExit(f"trial {rates} failed: {out[-1].get('error')}")
            self.cache[key] = (out[-1]["val_acc"], out[-1]["flops_ratio"])
        return self.cache[key]


def optuna_run(score: Scorer, sampler: optuna.samplers.BaseSampler, seed: int, trials: int,
               anchors: int = 0) -> list[Point]:
    """``trials`` ask/tell rounds of ``sampler`` after ``anchors`` uniform vectors."""
    space = score.space
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _, params in anchor_points(space, anchors):  # as SketchSearch enqueues them
        study.enqueue_trial(params, skip_if_exists=True)
    pts = []
    for _ in range(trials):
        trial = study.ask()
        rates = space(trial)["rates"]
        acc, fr = score(rates, seed)
        study.tell(trial, [acc, space.cost(rates).flops])
        pts.append((acc, fr))
    return pts


def uniform_sweep(space: RateSpace, trials: int) -> list[float]:
    """Up to ``trials`` uniform rates evenly spread over the grid."""
    grid = space.grid
    k = min(trials, len(grid))
    return [grid[round(i * (len(grid) - 1) / max(1, k - 1))] for i in range(k)]


def one_seed(score: Scorer, config: SearchConfig, seed: int, trials: int) -> dict[str, float]:
    """Each method's hypervolume at one seed."""
    sp, space = config.sampler, score.space
    default = make_sampler(sp.name, seed, trials, sp.population_size)
    surrogate = make_sampler("surrogate", seed, trials, space=space)
    hv = {"default": optuna_run(score, default, seed, trials, sp.anchors),
          "surrogate": optuna_run(score, surrogate, seed, trials, sp.anchors),
          "random": optuna_run(score, optuna.samplers.RandomSampler(seed), seed, trials),
          "uniform": [score([r] * space.num_units, seed) for r in uniform_sweep(space, trials)]}
    return {m: hypervolume(*columns(pts)) for m, pts in hv.items()}


def interval(results: dict[str, list[float]], num: str, den: str, boot: int
             ) -> tuple[float, float]:
    """Bootstrap 90% interval over seeds of mean(num) / mean(den)."""
    n = len(results[num])
    rng = random.Random(0)
    boots = []
    for _ in range(boot):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(statistics.fmean(results[num][i] for i in idx)
                     / statistics.fmean(results[den][i] for i in idx))
    boots.sort()
    return boots[int(0.05 * len(boots))], boots[int(0.95 * len(boots)) - 1]


def summary(args: argparse.Namespace, results: dict[str, list[float]], evaluations: int,
            seconds: float) -> None:
    lo, hi = interval(results, "default", "random", args.boot)
    mean = {m: statistics.fmean(v) for m, v in results.items()}
    print(f"{args.trials} trials per method, {args.seeds} seeds, trials fine-tuned "
          f"{args.epochs} epoch(s); {evaluations} distinct evaluations in {seconds:.0f} s")
    print(f"{'method':<9} {'mean hypervolume':>17} {'sd':>8}")
    for m, v in results.items():
        print(f"{m:<9} {mean[m]:17.4f} {statistics.pstdev(v):8.4f}")
    print(f"default/random: {mean['default'] / mean['random']:.3f} "
          f"(bootstrap 90% interval {lo:.3f} .. {hi:.3f}); "
          f"default/uniform: {mean['default'] / mean['uniform']:.3f}")
    for den in ("random", "uniform", "default"):
        slo, shi = interval(results, "surrogate", den, args.boot)
        print(f"surrogate/{den}: {mean['surrogate'] / mean[den]:.3f} "
              f"(bootstrap 90% interval {slo:.3f} .. {shi:.3f})")
    print(f"ratio={mean['default'] / mean['random']:.4f}")


def run_digits(args: argparse.Namespace) -> None:
    """The quickstart's task: every method, ``args.seeds`` seeds, then the summary."""
    args.trials = 32 if args.trials is None else args.trials
    args.seeds = 5 if args.seeds is None else args.seeds
    args.epochs = 0 if args.epochs is None else args.epochs
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    sets = [f"trial.epochs={args.epochs}", "trial.threads=1", *args.overrides]
    if args.cache_dir:
        sets.append(f"model.pretrain.cache_dir={args.cache_dir}")
    config = load_config("quickstart", sets)
    score = Scorer(search_trials(config))
    t0 = time.time()
    results: dict[str, list[float]] = {"default": [], "surrogate": [], "random": [],
                                       "uniform": []}
    for seed in range(args.seeds):
        for m, v in one_seed(score, config, seed, args.trials).items():
            results[m].append(v)
        print(f"seed {seed}: " + "  ".join(f"{m} {v[-1]:.4f}" for m, v in results.items()),
              flush=True)
    summary(args, results, len(score.cache), time.time() - t0)


def main() -> None:
    args = parse_args()
    if args.data == "digits":
        run_digits(args)
        return
    try:
        sys.exit(run_allocation(args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
