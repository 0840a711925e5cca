"""``search_quality.py --data real``: allocation at cost targets against the uniform control.

The real task of :mod:`_real_task` (a public CIFAR ResNet adapted to the JPEG CIFAR-10;
2,000 development images set aside; each seed draws 3,000 choosing and 5,000
reporting images from the other 8,000). Every evaluation is zero-shot (``select_lsq``
and BN recalibration on 1,280 training images). At each cost target (MACs ratio 0.2,
0.3, ..., 0.8), for each seed:

- ``control``: the uniform vector of the largest MACs at or below the target;
- ``greedy``: the plain one-step greedy: lower each stage half by 0.1 alone, rank the
  halves by the rise of choosing cross-entropy per MAC saved, move 0.1 from the k least
  to the k most sensitive (k = 1, 2, 3; shifted back onto the target), keep the control
  unless a candidate wins on the choosing images;
- ``search``: :func:`search.propose.allocation.allocate` (probes of 0.1, rank-linear
  patterns at two strengths, two trust-region steps around the best, the control kept
  unless beaten on the choosing images; its probes are the greedy's, so both read the
  same evaluations of them).

Reported on the reporting images only, which no choice reads. Primary figure: per seed,
the mean over targets of the paired accuracy difference (search - control, in points);
over seeds its mean and 90% t-interval (``paired_diff=``), and the same against the
greedy (``vs_greedy=``). The ledger counts MAC-weighted image passes of every
evaluation a method made at a seed (calibration of ``select_lsq``: the unpruned and the
narrow network on 1,280 images; BN recalibration: 1,280; the choosing images: 3,000;
each times the MACs ratio of the network run), the reporting images not at all.
Secondary, last line: ``ratio=<hypervolume of the search / of a uniform sweep>``: the
search's front is every vector it evaluated at a seed (chosen by the choosing images,
scored on the reporting ones); the sweep is a uniform grid with as many points as the
search made evaluations at the first seed (so about its ledger), on the same images.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import Clock, t_interval
from _real_task import OPTIONS, PUBLIC, Outcome, RealTask, task_from_args

from search.propose.allocation import (Allocation, Evaluation, allocate, better,
                                       probe_sensitivity)
from search.propose.targets import at_target, uniform_at, unit_groups
from search.results.pareto import front_indices, hypervolume

CALIBRATION_IMAGES = 128 * OPTIONS.calibration_batches
def passes(outcome: Outcome, choose_images: int) -> float:
    """MAC-weighted image passes of one zero-shot evaluation (see the module)."""
    r = outcome.flops_ratio
    return CALIBRATION_IMAGES * (1 + r) + CALIBRATION_IMAGES * r + choose_images * r


class SeedView:
    """One seed's evaluation: choosing images only, every vector asked for recorded."""

    def __init__(self, task: RealTask, choose: np.ndarray) -> None:
        self.task, self.choose = task, choose
        self.asked: dict[tuple, Outcome] = {}

    def __call__(self, rates: list[float]) -> Evaluation:
        out = self.task.evaluate(rates)
        self.asked[out.widths] = out
        return Evaluation(out.acc(self.choose), out.xent(self.choose))

    def ledger(self) -> float:
        return sum(passes(o, len(self.choose)) for o in self.asked.values())


def greedy(evaluate: SeedView, task: RealTask, target: float) -> list[float]:
    """The plain one-step greedy of the module docstring; its chosen vector."""
    space = task.space
    groups = unit_groups(space, "halves")
    control = uniform_at(space, target)
    base = evaluate(control)
    sens, _ = probe_sensitivity(evaluate, space, control, groups, delta=0.1, base=base)
    order = np.argsort(sens, kind="stable")  # least sensitive first
    best, best_ev = control, base
    for k in (1, 2, 3):
        offsets = [0.0] * len(groups)
        for g in order[:k]:
            offsets[g] -= 0.1
        for g in order[-k:]:
            offsets[g] += 0.1
        rates = at_target(space, offsets, target, groups)
        if rates is None:
            continue
        ev = evaluate(rates)
        if better(ev, best_ev):
            best, best_ev = rates, ev
    return best


def _front_hv(outs: list[Outcome], choose: np.ndarray, report: np.ndarray) -> float:
    chosen = front_indices([o.acc(choose) for o in outs], [o.flops_ratio for o in outs])
    return hypervolume([outs[i].acc(report) for i in chosen], [outs[i].flops_ratio for i in chosen])


def _sweep(task: RealTask, count: int) -> list[Outcome]:
    """``count`` uniform vectors, rates evenly from the space's low to 0.95."""
    lo = task.space.low
    return [task.evaluate([lo + (0.95 - lo) * i / max(1, count - 1)] * task.space.num_units)
            for i in range(count)]


def one_seed(task: RealTask, seed: int, targets: list[float], args, clock: Clock) -> dict:
    """Every method at every target for one draw of the choosing/reporting images."""
    choose, report = task.splits.draw(seed, args.choose_images, args.report_images)
    groups = unit_groups(task.space, "halves")
    views = {"search": SeedView(task, choose), "greedy": SeedView(task, choose)}
    diff_c, diff_g, kept = [], [], 0
    for t in targets:
        control = task.evaluate(uniform_at(task.space, t))
        found: Allocation = allocate(views["search"], task.space, t, groups, seed=seed)
        g = task.evaluate(greedy(views["greedy"], task, t))
        s = task.evaluate(found.chosen)
        kept += found.kept_control
        diff_c.append(100 * (s.acc(report) - control.acc(report)))
        diff_g.append(100 * (s.acc(report) - g.acc(report)))
    searched = list(views["search"].asked.values())
    args.sweep = args.sweep or len(searched)  # fixed at the first seed: one grid for all
    sweep = _sweep(task, args.sweep)
    hv = (_front_hv(searched, choose, report), _front_hv(sweep, choose, report))
    print(f"[{clock()}] seed {seed}: search - control " + " ".join(f"{d:+.2f}" for d in diff_c)
          + f" (mean {statistics.fmean(diff_c):+.2f}); search - greedy mean "
          f"{statistics.fmean(diff_g):+.2f}; control kept at {kept}/{len(targets)} targets; "
          f"hypervolume {hv[0]:.4f} vs sweep {hv[1]:.4f}", flush=True)
    return dict(diff_c=diff_c, diff_g=diff_g, hv=hv, kept=kept,
                ledger={m: v.ledger() for m, v in views.items()}, evals=len(searched))


def _summary(args, targets: list[float], rows: list[dict], task: RealTask, seconds: float) -> None:
    print(f"\n{args.cfg}, {len(rows)} seeds of {args.choose_images} choosing / "
          f"{args.report_images} reporting images, targets {', '.join(f'{t:g}' for t in targets)}; "
          f"{len(task.cache)} zero-shot evaluations in {task.seconds:.0f} s ({seconds:.0f} s in "
          f"all), torch threads {torch.get_num_threads()}\n")
    print("| target | search - control (points, mean over seeds) | search - greedy |")
    print("| --- | --- | --- |")
    for i, t in enumerate(targets):
        print(f"| {t:g} | {statistics.fmean(r['diff_c'][i] for r in rows):+.2f} | "
              f"{statistics.fmean(r['diff_g'][i] for r in rows):+.2f} |")
    for m in ("search", "greedy"):
        led = statistics.fmean(r["ledger"][m] for r in rows)
        print(f"ledger {m}: {led / 1e3:.0f}k MAC-weighted image passes per seed")
    per_seed = [statistics.fmean(r["diff_c"]) for r in rows]
    vs_g = [statistics.fmean(r["diff_g"]) for r in rows]
    print("per-seed paired differences (search - control): "
          + " ".join(f"{d:+.2f}" for d in per_seed))
    m, lo, hi = t_interval(per_seed)
    print(f"paired_diff={m:+.2f} lo={lo:+.2f} hi={hi:+.2f}")
    m, lo, hi = t_interval(vs_g)
    print(f"vs_greedy={m:+.2f} lo={lo:+.2f} hi={hi:+.2f}")
    hv_s = statistics.fmean(r["hv"][0] for r in rows)
    hv_u = statistics.fmean(r["hv"][1] for r in rows)
    print(f"ratio={hv_s / hv_u:.4f}")


def run_allocation(args: argparse.Namespace) -> int:
    if args.smoke:
        args.seeds = args.seeds or 2
        args.targets = args.targets or "0.5"
        args.choose_images, args.report_images = 300, 500
    args.seeds = args.seeds or 7
    args.sweep = None
    targets = [float(t) for t in (args.targets or "0.2,0.3,0.4,0.5,0.6,0.7,0.8").split(",")]
    clock = Clock()
    t0 = time.time()
    task = task_from_args(args, clock)
    rows = [one_seed(task, seed, targets, args, clock) for seed in range(args.seeds)]
    _summary(args, targets, rows, task, time.time() - t0)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--data real")
    g.add_argument("--cfg", default="resnet20", choices=sorted(PUBLIC))
    g.add_argument("--targets", default=None, help="MACs ratios (0.2,0.3,...,0.8)")
    g.add_argument("--choose_images", type=int, default=3000)
    g.add_argument("--report_images", type=int, default=5000)
    g.add_argument("--data_root", default=None, help="folder holding cifar10-jpg/ and "
                   "pretrained/ (default: ../shared/data beside the repository)")
    g.add_argument("--work", default=None, help="where the adapted baseline is cached")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--smoke", action="store_true", help="everything tiny: a check in minutes")
