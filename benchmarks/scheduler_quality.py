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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bootstrap_interval, columns  # noqa: E402

from search.results.pareto import hypervolume  # noqa: E402


def _trial_curve(rates, setup, state, data, entry):
    """(val_acc, test_acc) after each epoch of the search's trial at ``rates``."""
    from search.run.trial import baseline_model
    from sketch_core.pruning.bn import recalibrate_bn
    from sketch_core.rates import rates_to_widths
    from sketch_core.pruning.prune import sketch
    from sketch_core.training.loop import evaluate, fit

    sk, t = setup.sketch, setup.trial
    widths = rates_to_widths(entry, rates, setup.data_set, sk.start_conv, sk.sketch_lastconv,
                             setup.round_to)
    full = baseline_model(setup, state, "cpu")
    calib = data.calibration_batches(max(1, t.bn_batches))
    narrow = sketch(full, entry, rates, setup.data_set, **sk.model_dump(),
                    round_to=setup.round_to, seed=t.seed, batches=calib, widths=widths)
    if t.bn_batches:
        recalibrate_bn(narrow, calib, "cpu")
    curve: list[tuple[float, float]] = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        curve.append((metrics["val_acc"], evaluate(narrow, data.test, "cpu")["acc"]))

    fit(narrow, data, epochs=t.epochs, lr=t.lr, momentum=t.momentum,
        weight_decay=t.weight_decay, lr_decay_step=t.lr_decay_step,
        label_smoothing=t.label_smoothing, device="cpu", seed=t.seed, progress=False,
        on_epoch=on_epoch)
    return curve


def main() -> None:
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

    import optuna
    import torch
    from optuna.trial import TrialState
    from ray.tune.schedulers import TrialScheduler

    from search.experiment.baseline import prepare_baseline
    from search.experiment.config import load_config
    from search.experiment.priced_space import rate_space
    from search.propose.study import make_sampler
    from search.run.trial import trial_data
    from search.run.ray_driver import _baseline_dict, _make_setup, make_scheduler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    sets = ["trial.threads=1", *args.overrides]
    if args.cache_dir:
        sets.append(f"model.pretrain.cache_dir={args.cache_dir}")
    config = load_config("quickstart", sets)
    t, sc = config.trial, config.scheduler
    b = prepare_baseline(config, None)
    baseline = _baseline_dict(b)
    setup = _make_setup(config, baseline, {})
    entry = setup.arch()
    data = trial_data(setup, "cpu")
    space = rate_space(config, baseline)
    images = sum(len(y) for _, y in data.train)  # per epoch (the same for every trial)
    test_images = sum(len(y) for _, y in data.test)
    curves: dict[tuple, list[tuple[float, float]]] = {}
    t0 = time.time()

    def curve(rates):
        key = tuple(space.cost(rates).widths)
        if key not in curves:
            curves[key] = _trial_curve(rates, setup, b.state, data, entry)
        return curves[key]

    def make(name: str):
        """The search's own scheduler of that name, with the config's rungs (no state file)."""
        return make_scheduler(load_config("quickstart", [*sets, f"scheduler.name={name}"]))[0]

    def run(name: str, seed: int, max_trials: int, cost_budget: float | None) -> list[dict]:
        """Trials in order: rates, flops ratio, epochs trained, status, accuracies."""
        sched = make(name)
        sampler = make_sampler(config.sampler.name, seed, args.trials,
                               config.sampler.population_size)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for _, params in space.uniform_points(config.sampler.anchors):
            study.enqueue_trial(params, skip_if_exists=True)
        out: list[dict] = []
        spent = 0.0
        while len(out) < max_trials and (cost_budget is None or spent < cost_budget):
            trial = study.ask()
            rates = space(trial)["rates"]
            cost = space.cost(rates)
            fake = SimpleNamespace(trial_id=f"t{len(out):04d}", config={})
            sched.on_trial_add(None, fake)
            epochs, stopped = 0, False
            for e, (val, _test) in enumerate(curve(rates), start=1):
                epochs = e
                result = {"epoch": e, "val_acc": val, "flops": cost.flops}
                if sched.on_trial_result(None, fake, result) == TrialScheduler.STOP:
                    stopped = e < t.epochs
                    break
            spent += cost.flops * images * epochs
            val, test = curve(rates)[epochs - 1]
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

    names = ("asha", "cost_asha", "moasha")
    labels = {"asha": "ASHA", "cost_asha": "cost-ASHA", "moasha": "MO-ASHA"}
    res = {f"{name}_{k}": [] for name in names for k in "nc"}
    shares = {name: [] for name in names}
    passed = {name: [] for name in names}
    counts = {name: [] for name in names}
    for seed in range(args.seeds):
        asha = run("asha", seed, args.trials, None)
        budget = asha[-1]["spent"]
        line = []
        for name in names:
            full = asha if name == "asha" else run(name, seed, 2 * args.trials, budget)
            first = full[:args.trials]
            res[f"{name}_n"].append(hv(first))
            res[f"{name}_c"].append(hv(full))
            shares[name].append(finished_share(first))
            passed[name].append(statistics.fmean(r["epochs"] > sc.grace_period for r in first))
            counts[name].append(len(full))
            line.append(f"{labels[name]} {hv(first):.4f}/{hv(full):.4f} ({len(full)} trials)")
        print(f"seed {seed}: hypervolume (test) at {args.trials} trials / at ASHA's trained "
              f"cost: {', '.join(line)}; {len(curves)} distinct vectors trained, "
              f"{time.time() - t0:.0f} s", flush=True)

    n = args.seeds

    def ratio_ci(num: str, den: str) -> tuple[float, float, float]:
        a, b_ = res[num], res[den]
        ratio = statistics.fmean(a) / statistics.fmean(b_)
        lo, hi = bootstrap_interval(lambda i: sum(a[j] for j in i) / sum(b_[j] for j in i), n)
        return ratio, lo, hi

    print(f"\n{args.trials} trials per run, {n} seeds, NSGA-II, trials of {t.epochs} epochs, "
          f"rungs from epoch {sc.grace_period} by {sc.reduction_factor}; scored on the test "
          f"split ({test_images} images), "
          f"chosen on the validation split; {time.time() - t0:.0f} s")
    print(f"{'scheduler':<10} {'HV equal trials':>16} {'HV equal cost':>14} "
          f"{'past rung 1':>12} {'cheap third finished':>21} {'dear third finished':>20}")
    for name in names:
        cheap = statistics.fmean(s[0] for s in shares[name])
        dear = statistics.fmean(s[1] for s in shares[name])
        print(f"{name:<10} {statistics.fmean(res[name + '_n']):16.4f} "
              f"{statistics.fmean(res[name + '_c']):14.4f} "
              f"{statistics.fmean(passed[name]):12.2f} {cheap:21.2f} {dear:20.2f}")
    ratios = {}
    for name in names[1:]:
        rn, lon, hin = ratio_ci(f"{name}_n", "asha_n")
        rc, loc, hic = ratio_ci(f"{name}_c", "asha_c")
        ratios[name] = rc
        print(f"{labels[name]}/ASHA at equal trials: {rn:.4f} (bootstrap 90% interval "
              f"{lon:.4f} .. {hin:.4f}); at equal trained cost: {rc:.4f} ({loc:.4f} .. "
              f"{hic:.4f}; {statistics.fmean(counts[name]):.1f} trials on average)")
    print(f"ratio={ratios['cost_asha']:.4f}")


if __name__ == "__main__":
    main()
