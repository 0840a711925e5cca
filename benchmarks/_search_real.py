"""``search_quality.py --data real``: the samplers on the real task, scored without leakage.

The public CIFAR ResNet-20 (``pretrained/resnet20-12fca82f.th``, trained on the
original CIFAR-10 training images) is adapted to the JPEG copy's training images (one
pass of SGD, cached in the work folder). Its test images were never trained on, so they
are the ones that score: a seeded draw of ``--choose_images`` test images is what every
search chooses on, a disjoint draw of ``--report_images`` is what the benchmark reports.

A trial is scored as a search trial is: ``select_lsq`` (the trials' default), BN
recalibrated on 10 training batches, then ``--epochs`` passes over ``--train_images``
training images (seeded by the seed; 0 epochs: zero-shot). Scores are cached by
(widths, seed). A proposal that repeats a network counts as a trial here (the search
itself asks for another instead). Methods, each ``--trials`` trials per seed:

- ``surrogate``: ``sampler.name: surrogate`` after the usual anchors;
- ``default``: NSGA-II as ``search`` builds it (population sized to the trials), after
  the anchors; no early stopping here (every method trains each trial fully);
- ``random``: Optuna's RandomSampler;
- ``uniform``: a sweep of ``[r]*9``, r evenly spread over the grid.

For each method and seed: the front chosen on the choosing images; its hypervolume with
the reporting images' accuracies (reference (0, 1) in (accuracy, FLOPs ratio)); the
same at equal trained cost (each method's trials in order until the images x MACs
trained reach the least any method of that seed spent); the reporting accuracy of the
best vector (on the choosing images) at <= 50% of the unpruned FLOPs. Mean and
bootstrap 90% interval over seeds of each ratio; last line
``ratio=<surrogate / uniform>`` (equal trial count).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from _common import ROOT, Clock, bootstrap_interval, require_real_data

from search.propose.samplers import make_sampler
from search.propose.space import RateSpace
from search.results.pareto import front_indices, hypervolume
from sketch_core.data.sets import IMAGENET_MEAN, IMAGENET_STD, load_data
from sketch_core.errors import UserError
from sketch_core.io.checkpoint import load_checkpoint, save_checkpoint
from sketch_core.options import SketchOptions
from sketch_core.pruning.bn import recalibrate_bn
from sketch_core.pruning.prune import sketch
from sketch_core.registry import resolve_arch
from sketch_core.training.loop import evaluate, fit

CFG = "resnet20"
CKPT = "pretrained/resnet20-12fca82f.th"
JPEG = "cifar10-jpg"
METHODS = ("surrogate", "default", "random", "uniform")
SMOKE = dict(trials=6, seeds=1, train_images=64, choose_images=100, report_images=100,
             adapt_images=256)
DEFAULTS = dict(trials=24, seeds=3, train_images=1000, choose_images=2000, report_images=4000,
                adapt_images=20000)
OPTIONS = SketchOptions(mode="select_lsq", calibration_batches=10)  # the trials' default mode
Result = tuple[float, float, float, float]  # choose acc, report acc, FLOPs ratio, trained cost


def _work_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sketchtune" / "search_quality"


def _check(root: Path, args: argparse.Namespace, n_train: int | None, n_test: int | None) -> None:
    require_real_data(root, JPEG, CKPT, "ResNet-20")
    if n_train is not None and not 1 <= args.train_images <= n_train:
        raise UserError(f"--train_images {args.train_images}: expected 1 to {n_train} (the "
                        f"training split)")
    if n_test is not None and args.choose_images + args.report_images > n_test:
        raise UserError(f"--choose_images {args.choose_images} + --report_images "
                        f"{args.report_images} exceed the {n_test} test images")


def _subset(loader, index):
    out = copy.copy(loader)
    out.index = index.sort().values
    return out


def _adapted(public: Path, data, work: Path, images: int, clock: Clock):
    """The public ResNet-20 after one pass of SGD over ``images`` JPEG training images."""
    ckpt = work / f"{CFG}-jpeg-e1-n{images}-lr0.01.pt"
    if ckpt.exists():
        print(f"[{clock()}] adapted baseline reused: {ckpt}", flush=True)
        return load_checkpoint(ckpt).model.eval()
    model = load_checkpoint(public, CFG).model
    g = torch.Generator().manual_seed(7)
    train = _subset(data.train, data.train.index[torch.randperm(len(data.train.index),
                                                                generator=g)[:images]])
    print(f"[{clock()}] adapting the public {CFG} to {images} JPEG training images (one "
          f"pass, SGD lr 0.01; cached as {ckpt})", flush=True)
    torch.manual_seed(0)
    fit(model, dataclasses.replace(data, train=train, val=None), epochs=1, lr=0.01, momentum=0.9,
        weight_decay=5e-4, lr_decay_step=[], seed=0, progress=False)
    work.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, model.eval(), cfg=CFG, data_set="cifar10",
                    extra={"adapted_from": public.name, "images": images})
    return model.eval()


def _front_hv(points: list[tuple[float, float, float]]) -> float:
    """Hypervolume, with the reporting accuracies, of the front chosen on the choosing ones.

    ``points``: (choose acc, report acc, flops ratio)."""
    chosen = front_indices([p[0] for p in points], [p[2] for p in points])
    return hypervolume([points[i][1] for i in chosen], [points[i][2] for i in chosen])


def _best_at_half(points: list[tuple[float, float, float]]) -> float:
    """Reported accuracy of the trial the choosing score ranks best at <= 50% FLOPs (ties:
    the earlier trial; never the reporting score, which the choice must not see)."""
    cheap = [(c, r) for c, r, fr in points if fr <= 0.5 + 1e-9]
    return max(cheap, key=lambda p: p[0])[1] if cheap else 0.0


def _settings(args: argparse.Namespace) -> None:
    """Fill the sizes not given: the ``--smoke`` values, else the defaults."""
    for k, v in (SMOKE if args.smoke else {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


class RealTask:
    """The adapted baseline, the choosing and reporting test images, the trial's scoring."""

    def __init__(self, args: argparse.Namespace, root: Path, clock: Clock) -> None:
        self.args = args
        data = load_data("folder", root / JPEG, input_size=32,
                         normalize=(IMAGENET_MEAN, IMAGENET_STD), batch_size=128,
                         eval_batch_size=500, val_fraction=0.0, seed=0)
        _check(root, args, len(data.train.index), len(data.test.index))
        perm = torch.randperm(len(data.test.index), generator=torch.Generator().manual_seed(11))
        idx = data.test.index[perm.to(data.test.index.device)]
        n = args.choose_images
        self.choose = _subset(data.test, idx[:n])
        self.report = _subset(data.test, idx[n:n + args.report_images])
        assert not set(self.choose.index.tolist()) & set(self.report.index.tolist())
        self.data = data
        self.base = _adapted(root / CKPT, data, _work_dir(args.work),
                             min(args.adapt_images, len(data.train.index)), clock)
        base_choose = evaluate(self.base, self.choose)["acc"]
        base_report = evaluate(self.base, self.report)["acc"]
        print(f"[{clock()}] baseline {CFG}: {100 * base_choose:.2f}% on the {n} choosing, "
              f"{100 * base_report:.2f}% on the {args.report_images} reporting test images; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        self.calib = data.calibration_batches(OPTIONS.calibration_batches)
        self.arch = resolve_arch(CFG, "cifar10")
        self.space = RateSpace(self.arch, "cifar10", low=0.1, high=1.0, step=0.05)
        self.full_macs = self.space.cost_model.full_flops
        self.cache: dict[tuple, Result] = {}

    def fine_tune(self, narrow, seed: int) -> None:
        """``--epochs`` passes over a seeded draw of ``--train_images`` training images."""
        args, data = self.args, self.data
        g = torch.Generator().manual_seed(1000 + seed)
        pick = torch.randperm(len(data.train.index), generator=g)[:args.train_images]
        train = _subset(data.train, data.train.index[pick.to(data.train.index.device)])
        torch.manual_seed(seed)
        fit(narrow, dataclasses.replace(data, train=train, val=None), epochs=args.epochs,
            lr=0.01, momentum=0.9, weight_decay=5e-4, lr_decay_step=[], seed=seed,
            progress=False)

    def score(self, rates: list[float], seed: int) -> Result:
        """A trial (cached by widths and seed): sketch, BN recalibration, fine-tune."""
        cost = self.space.cost(rates)
        key = (cost.widths, seed)
        if key not in self.cache:
            narrow = sketch(self.base, self.arch, list(cost.widths), OPTIONS, batches=self.calib)
            recalibrate_bn(narrow, self.calib)
            if self.args.epochs:
                self.fine_tune(narrow, seed)
            narrow.eval()
            trained = self.args.epochs * self.args.train_images * cost.flops / self.full_macs
            self.cache[key] = (evaluate(narrow, self.choose)["acc"],
                               evaluate(narrow, self.report)["acc"], cost.flops_ratio, trained)
        return self.cache[key]

    def optuna_run(self, sampler, seed: int, anchors: int) -> list[Result]:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for _, params in self.space.uniform_points(anchors):
            study.enqueue_trial(params, skip_if_exists=True)
        out = []
        for _ in range(self.args.trials):
            trial = study.ask()
            rates = self.space(trial)["rates"]
            res = self.score(rates, seed)
            study.tell(trial, [res[0], self.space.cost(rates).flops])
            out.append(res)
        return out

    def method(self, m: str, seed: int) -> list[Result]:
        """Method ``m``'s trials at ``seed``, in order."""
        trials, space = self.args.trials, self.space
        if m == "surrogate":
            return self.optuna_run(make_sampler("surrogate", seed, trials, space=space), seed, 4)
        if m == "default":
            return self.optuna_run(make_sampler("nsga2", seed, trials), seed, 4)
        if m == "random":
            return self.optuna_run(optuna.samplers.RandomSampler(seed), seed, 0)
        grid = space.grid
        k = min(trials, len(grid))
        sweep = [grid[round(i * (len(grid) - 1) / max(1, k - 1))] for i in range(k)]
        return [self.score([r] * space.num_units, seed) for r in sweep]


def _within(pts: list[Result], budget: float) -> list[tuple[float, float, float]]:
    """The trials in order until their trained cost would pass ``budget`` (at least one)."""
    spent, prefix = 0.0, []
    for p in pts:
        if spent + p[3] > budget + 1e-9 and prefix:
            break
        spent += p[3]
        prefix.append(p[:3])
    return prefix


def _summary(args: argparse.Namespace, methods: list[str], tables: dict, evaluations: int,
             seconds: float) -> None:
    hv, hv_cost, half = tables["hv"], tables["hv_cost"], tables["half"]
    print(f"\n{args.trials} trials per method, {args.seeds} seed(s); trial: select_lsq, BN "
          f"recalibration, {args.epochs} pass(es) over {args.train_images} training images; "
          f"chosen on {args.choose_images} test images, reported on {args.report_images} "
          f"others; {evaluations} distinct evaluations in {seconds:.0f} s\n")
    print("| method | hypervolume (equal trials) | hypervolume (equal trained cost) | best "
          "accuracy at <= 50% FLOPs |")
    print("| --- | --- | --- | --- |")
    for m in methods:
        print(f"| `{m}` | {statistics.fmean(hv[m]):.4f} | {statistics.fmean(hv_cost[m]):.4f} | "
              f"{100 * statistics.fmean(half[m]):.2f}% |")
    print()
    for num, den in [("surrogate", "uniform"), ("surrogate", "random"), ("surrogate", "default"),
                     ("default", "uniform"), ("default", "random")]:
        if num not in methods or den not in methods:
            continue
        for label, table in (("equal trials", hv), ("equal trained cost", hv_cost)):
            a, b = np.array(table[num]), np.array(table[den])
            lo, hi = bootstrap_interval(lambda ix: a[ix].mean() / b[ix].mean(), args.seeds)
            print(f"{num}/{den} ({label}): {a.mean() / b.mean():.3f} (bootstrap 90% interval "
                  f"over seeds {lo:.3f} .. {hi:.3f})")
    if "surrogate" in methods and "uniform" in methods:
        print(f"ratio={statistics.fmean(hv['surrogate']) / statistics.fmean(hv['uniform']):.4f}")


def run_real(args: argparse.Namespace) -> int:
    _settings(args)
    root = Path(args.data_root).expanduser() if args.data_root else ROOT.parent / "shared" / "data"
    _check(root, args, None, None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    clock = Clock()
    t0 = time.time()
    task = RealTask(args, root, clock)
    methods = [m for m in args.methods.split(",") if m] if args.methods else list(METHODS)
    tables: dict[str, dict[str, list[float]]] = {
        t: {m: [] for m in methods} for t in ("hv", "hv_cost", "half")}
    for seed in range(args.seeds):
        runs = {m: task.method(m, seed) for m in methods}
        budget = min(sum(p[3] for p in pts) for pts in runs.values())
        for m, pts in runs.items():
            tables["hv"][m].append(_front_hv([p[:3] for p in pts]))
            tables["hv_cost"][m].append(_front_hv(_within(pts, budget)))
            tables["half"][m].append(_best_at_half([p[:3] for p in pts]))
        print(f"[{clock()}] seed {seed}: "
              + "  ".join(f"{m} {tables['hv'][m][-1]:.4f}" for m in methods), flush=True)
    _summary(args, methods, tables, len(task.cache), time.time() - t0)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--data real")
    g.add_argument("--data_root", default=None, help="folder holding cifar10-jpg/ and "
                   "pretrained/ (default: ../shared/data beside the repository)")
    g.add_argument("--work", default=None, help="where the adapted baseline is cached")
    g.add_argument("--train_images", type=int, default=None, help="per trial (1000)")
    g.add_argument("--choose_images", type=int, default=None, help="test images that choose (2000)")
    g.add_argument("--report_images", type=int, default=None, help="test images that report (4000)")
    g.add_argument("--adapt_images", type=int, default=None, help="baseline adaptation (20000)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--methods", default=None, help=f"comma-separated ({','.join(METHODS)})")
    g.add_argument("--smoke", action="store_true", help="everything tiny: a check in a minute")
