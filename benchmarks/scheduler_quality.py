"""Do the cost-aware schedulers find a better accuracy/FLOPs front than plain ASHA?

The default search (NSGA-II after ``sampler.anchors`` uniform vectors) on the
quickstart's task (digits, ResNet-20, 9 rates), with early stopping by Ray Tune's own
``ASHAScheduler`` (``val_acc`` alone), by :class:`search.run.schedulers.CostASHAScheduler`
(accuracy above the rung's accuracy-vs-FLOPs trend) or by
:class:`search.run.schedulers.MOASHAScheduler` (fronts of accuracy against FLOPs), all driven through
their public scheduler interface (``on_trial_add`` / ``on_trial_result``) with the
quickstart's rungs (``trial.epochs``, ``scheduler.grace_period``,
``reduction_factor``). Trials arrive one after another (one worker); a trial stopped
at a rung is told to Optuna as PRUNED, one that finishes as COMPLETE, as the search
does.

Every trial is the search's trial (sketch at the rates, BN recalibration, fine-tune
with the config's recipe; its curve cached by widths, so both schedulers see the same
numbers for the same vector). The schedulers decide on the validation split the
search chooses on; the benchmark scores each completed trial on the test split (a
second, disjoint set: a scheduler that promotes lucky validation scores is not
rewarded). Quality: the hypervolume of the completed trials' front in (test accuracy
max, FLOPs ratio min), reference (0, 1), at equal trial count (``--trials``) and at
equal trained cost (MACs x images actually trained: a cost-aware run is cut, or
continued up to 2x the trials, at the cost ASHA's run spent). Over ``--seeds`` seeds:
mean, and a bootstrap 90% interval of the ratios cost-ASHA / ASHA and MO-ASHA / ASHA;
how many of the cheapest and the dearest third of trials each scheduler let finish, and
how many trials passed the first rung. Last line
``ratio=<cost-ASHA / ASHA at equal trained cost>`` (above 1: cost-ASHA is better).

    python benchmarks/scheduler_quality.py [--trials 32] [--seeds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import torch
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SearchTrials, bootstrap_interval, columns, search_trials  # noqa: E402

from search.experiment.config import SearchConfig, load_config  # noqa: E402
from search.propose.samplers import make_sampler  # noqa: E402
from search.propose.targets import anchor_points  # noqa: E402
from search.results.pareto import hypervolume  # noqa: E402
from search.run.trial import TrialSetup, baseline_model, trial_data  # noqa: E402
from sketch_core.data.sets import Data  # noqa: E402
from sketch_core.data.subsets import sized_data  # noqa: E402
from sketch_core.pipeline import prune_and_score  # noqa: E402
from sketch_core.training.loop import evaluate, fit  # noqa: E402

NAMES = ("asha", "cost_asha", "moasha")
LABELS = {"asha": "ASHA", "cost_asha": "cost-ASHA", "moasha": "MO-ASHA"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=32, help="trials per run (equal trial count)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--cache_dir", default=None, help="baseline cache (default: the user's)")
    p.add_argument("--smoke", action="store_true", help="6 trials, 1 seed, 2 epochs: a check")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override, e.g. trial.epochs=4")
    args = p.parse_args()
    if args.smoke:
        args.trials, args.seeds = 6, 1
        args.overrides = ["trial.epochs=2", "scheduler.reduction_factor=2", *args.overrides]
    return args


def trial_curve(rates: list[float], setup: TrialSetup, state: dict, data: Data
                ) -> list[tuple[float, float]]:
    """(val_acc, test_acc) after each epoch of the search's trial at ``rates``: the
    trial's images, the sketch with BN recalibration, the trial recipe's fine-tune."""
    seed = setup.recipe.seed
    data = sized_data(data, setup.train_images, setup.val_images, seed, rates)
    full = baseline_model(setup, state, "cpu")
    narrow, _ = prune_and_score(setup.arch, full, setup.widths(rates), setup.options, data,
                                "cpu", seed=seed)
    curve: list[tuple[float, float]] = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        curve.append((metrics["val_acc"], evaluate(narrow, data.test, "cpu")["acc"]))

    fit(narrow, data, setup.recipe, device="cpu", progress=False, on_epoch=on_epoch)
    return curve


class Runs:
    """Searches of the quickstart's space with one scheduler each; every vector's curve
    is trained once (cached by widths), so all schedulers see the same numbers."""

    def __init__(self, args: argparse.Namespace, sets: list[str], config: SearchConfig,
                 trials: SearchTrials) -> None:
        self.args, self.sets, self.config, self.trials = args, sets, config, trials
        self.space = trials.plan.space
        self.data = trial_data(trials.setup, "cpu")
        self.curves: dict[tuple, list[tuple[float, float]]] = {}
        self.images = trials.setup.train_images or sum(len(y) for _, y in self.data.train)

    def curve(self, rates: list[float]) -> list[tuple[float, float]]:
        key = tuple(self.space.cost(rates).widths)
        if key not in self.curves:
            self.curves[key] = trial_curve(rates, self.trials.setup, self.trials.baseline.state,
                                           self.data)
        return self.curves[key]

    def scheduler(self, name: str):
        """The search's own scheduler of that name, with the config's rungs (no state file)."""
        from search.run.schedulers import make_scheduler  # heavy: Ray

        config = load_config("quickstart", [*self.sets, f"scheduler.name={name}"])
        return make_scheduler(config.scheduler, config.trial.epochs, config.cost_axis)[0]

    def study(self, seed: int) -> optuna.Study:
        """The default sampler's study, the anchors enqueued first (as the search does)."""
        sp = self.config.sampler
        sampler = make_sampler(sp.name, seed, self.args.trials, sp.population_size)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for _, params in anchor_points(self.space, sp.anchors):
            study.enqueue_trial(params, skip_if_exists=True)
        return study

    def schedule(self, sched, trial_id: str, rates: list[float], flops: int) -> tuple[int, bool]:
        """(epochs trained, stopped early) of one trial under ``sched``."""
        from ray.tune.schedulers import TrialScheduler  # heavy: Ray

        fake = SimpleNamespace(trial_id=trial_id, config={})
        sched.on_trial_add(None, fake)
        epochs, stopped = 0, False
        for e, (val, _test) in enumerate(self.curve(rates), start=1):
            epochs = e
            result = {"epoch": e, "val_acc": val, "flops": flops}
            if sched.on_trial_result(None, fake, result) == TrialScheduler.STOP:
                stopped = e < self.config.trial.epochs
                break
        return epochs, stopped

    def run(self, name: str, seed: int, max_trials: int, cost_budget: float | None) -> list[dict]:
        """Trials in order: flops ratio, epochs trained, finished, accuracies, cost spent."""
        sched, study = self.scheduler(name), self.study(seed)
        out: list[dict] = []
        spent = 0.0
        while len(out) < max_trials and (cost_budget is None or spent < cost_budget):
            trial = study.ask()
            rates = self.space(trial)["rates"]
            cost = self.space.cost(rates)
            epochs, stopped = self.schedule(sched, f"t{len(out):04d}", rates, cost.flops)
            spent += cost.flops * self.images * epochs
            val, test = self.curve(rates)[epochs - 1]
            if stopped:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, [val, float(cost.flops)])
            out.append({"fr": cost.flops_ratio, "epochs": epochs, "done": not stopped,
                        "val": val, "test": test, "spent": spent})
        return out


def hv(trials: list[dict]) -> float:
    return hypervolume(*columns([(r["test"], r["fr"]) for r in trials if r["done"]]))


def finished_share(trials: list[dict]) -> tuple[float, float]:
    order = sorted(trials, key=lambda r: r["fr"])
    k = max(1, len(order) // 3)
    return (statistics.fmean(r["done"] for r in order[:k]),
            statistics.fmean(r["done"] for r in order[-k:]))


class Tally:
    """Per scheduler and seed: hypervolumes (equal trials ``_n``, equal cost ``_c``), the
    cheap/dear thirds finished, the share past rung 1, the trial counts."""

    def __init__(self) -> None:
        self.res = {f"{name}_{k}": [] for name in NAMES for k in "nc"}
        self.shares = {name: [] for name in NAMES}
        self.passed = {name: [] for name in NAMES}
        self.counts = {name: [] for name in NAMES}

    def add(self, name: str, full: list[dict], trials: int, grace: int) -> str:
        first = full[:trials]
        self.res[f"{name}_n"].append(hv(first))
        self.res[f"{name}_c"].append(hv(full))
        self.shares[name].append(finished_share(first))
        self.passed[name].append(statistics.fmean(r["epochs"] > grace for r in first))
        self.counts[name].append(len(full))
        return f"{LABELS[name]} {hv(first):.4f}/{hv(full):.4f} ({len(full)} trials)"

    def ratio_ci(self, num: str, den: str) -> tuple[float, float, float]:
        a, b = self.res[num], self.res[den]
        ratio = statistics.fmean(a) / statistics.fmean(b)
        lo, hi = bootstrap_interval(lambda i: sum(a[j] for j in i) / sum(b[j] for j in i),
                                    len(a))
        return ratio, lo, hi


def one_seed(runs: Runs, tally: Tally, seed: int, t0: float) -> None:
    """ASHA's run, then each cost-aware run cut (or continued) at ASHA's trained cost."""
    args, grace = runs.args, runs.config.scheduler.grace_period
    asha = runs.run("asha", seed, args.trials, None)
    budget = asha[-1]["spent"]
    line = [tally.add(name, asha if name == "asha" else runs.run(name, seed, 2 * args.trials,
                                                                  budget), args.trials, grace)
            for name in NAMES]
    print(f"seed {seed}: hypervolume (test) at {args.trials} trials / at ASHA's trained "
          f"cost: {', '.join(line)}; {len(runs.curves)} distinct vectors trained, "
          f"{time.time() - t0:.0f} s", flush=True)


def report(runs: Runs, tally: Tally, t0: float) -> None:
    args, t, sc = runs.args, runs.config.trial, runs.config.scheduler
    test_images = sum(len(y) for _, y in runs.data.test)
    print(f"\n{args.trials} trials per run, {args.seeds} seeds, NSGA-II, trials of {t.epochs} "
          f"epochs, rungs from epoch {sc.grace_period} by {sc.reduction_factor}; scored on the "
          f"test split ({test_images} images), "
          f"chosen on the validation split; {time.time() - t0:.0f} s")
    print(f"{'scheduler':<10} {'HV equal trials':>16} {'HV equal cost':>14} "
          f"{'past rung 1':>12} {'cheap third finished':>21} {'dear third finished':>20}")
    for name in NAMES:
        cheap = statistics.fmean(s[0] for s in tally.shares[name])
        dear = statistics.fmean(s[1] for s in tally.shares[name])
        print(f"{name:<10} {statistics.fmean(tally.res[name + '_n']):16.4f} "
              f"{statistics.fmean(tally.res[name + '_c']):14.4f} "
              f"{statistics.fmean(tally.passed[name]):12.2f} {cheap:21.2f} {dear:20.2f}")
    ratios = {}
    for name in NAMES[1:]:
        rn, lon, hin = tally.ratio_ci(f"{name}_n", "asha_n")
        rc, loc, hic = tally.ratio_ci(f"{name}_c", "asha_c")
        ratios[name] = rc
        print(f"{LABELS[name]}/ASHA at equal trials: {rn:.4f} (bootstrap 90% interval "
              f"{lon:.4f} .. {hin:.4f}); at equal trained cost: {rc:.4f} ({loc:.4f} .. "
              f"{hic:.4f}; {statistics.fmean(tally.counts[name]):.1f} trials on average)")
    print(f"ratio={ratios['cost_asha']:.4f}")


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    sets = ["trial.threads=1", *args.overrides]
    if args.cache_dir:
        sets.append(f"model.pretrain.cache_dir={args.cache_dir}")
    config = load_config("quickstart", sets)
    runs = Runs(args, sets, config, search_trials(config))
    tally = Tally()
    t0 = time.time()
    for seed in range(args.seeds):
        one_seed(runs, tally, seed, t0)
    report(runs, tally, t0)


if __name__ == "__main__":
    main()
