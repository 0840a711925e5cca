"""How much is per-layer allocation worth on the real task, zero-shot, before any search?

At each cost target (MACs ratio 0.3, 0.5, 0.7 by default) the uniform control (one rate,
bisected to the largest MACs at or below the target) and ``--vectors`` random patterns of
per-group offsets (groups: stage halves; offsets uniform in +-``--spread``; each
pattern shifted by one constant to the largest MACs at or below the target) are pruned
zero-shot (``select_lsq`` + BN recalibration on 1,280 training images) and scored on the
8,000 pool images of the real task (:mod:`_real_task`). For each seed (its own draw of
3,000 choosing and 5,000 reporting images): the vector the choosing images rank best
(the uniform one included, so a choice may keep it) against the uniform control, on the
reporting images. Printed per target: the mean paired difference over seeds with its
90% t-interval, the paired standard error of one seed's difference (from the 5,000
per-image differences), the share of patterns above uniform on the whole pool, and the
oracle (best pattern on the reporting images: an upper bound, biased upwards). Last line
``ratio=<mean accuracy of the chosen / of the uniform, reporting images, all targets>``.

    python benchmarks/allocation_headroom.py [--cfg resnet20] [--vectors 24] [--seeds 7]
    python benchmarks/allocation_headroom.py --cfg resnet56
    python benchmarks/allocation_headroom.py --smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Clock, t_interval  # noqa: E402
from _real_task import PUBLIC, RealTask, task_from_args  # noqa: E402

from search.propose.targets import at_target, uniform_at, unit_groups  # noqa: E402
from sketch_core.errors import UserError  # noqa: E402

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="resnet20", choices=sorted(PUBLIC))
    p.add_argument("--targets", default="0.3,0.5,0.7")
    p.add_argument("--vectors", type=int, default=24, help="offset patterns per target")
    p.add_argument("--spread", type=float, default=0.2, help="offsets uniform in +-spread")
    p.add_argument("--seeds", type=int, default=7, help="draws of choosing/reporting images")
    p.add_argument("--choose_images", type=int, default=3000)
    p.add_argument("--report_images", type=int, default=5000)
    p.add_argument("--data_root", default=None)
    p.add_argument("--work", default=None, help="where the adapted baseline is cached")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="2 patterns, 1 target, 2 seeds")
    return p.parse_args()


def one_target(task: RealTask, target: float, args: argparse.Namespace, clock: Clock) -> dict:
    """The uniform control and the patterns at ``target``, scored on the pool."""
    space = task.space
    groups = unit_groups(space, "halves")
    rng = np.random.default_rng(int(target * 1000))
    uni = task.evaluate(uniform_at(space, target))
    outs = [uni]
    for _ in range(args.vectors):
        offsets = rng.uniform(-args.spread, args.spread, len(groups)).tolist()
        rates = at_target(space, offsets, target, groups)
        if rates is not None:
            outs.append(task.evaluate(rates))
    print(f"[{clock()}] target {target:g}: uniform MACs {uni.flops_ratio:.3f}, "
          f"{len(outs) - 1} patterns at {min(o.flops_ratio for o in outs[1:]):.3f}-"
          f"{max(o.flops_ratio for o in outs[1:]):.3f}; pool accuracy uniform "
          f"{100 * uni.hit.mean():.2f}%, patterns {100 * min(o.hit.mean() for o in outs):.2f}-"
          f"{100 * max(o.hit.mean() for o in outs):.2f}%", flush=True)
    diffs, ses, oracle, chosen_acc, uni_acc = [], [], [], [], []
    for seed in range(args.seeds):
        choose, report = task.splits.draw(seed, args.choose_images, args.report_images)
        best = max(outs, key=lambda o: o.acc(choose))  # first wins ties: the uniform one
        d = best.hit[report].astype(float) - uni.hit[report].astype(float)
        diffs.append(100 * d.mean())
        ses.append(100 * d.std(ddof=1) / math.sqrt(len(d)))
        oracle.append(100 * (max(o.acc(report) for o in outs) - uni.acc(report)))
        chosen_acc.append(best.acc(report))
        uni_acc.append(uni.acc(report))
    above = sum(o.hit.mean() > uni.hit.mean() for o in outs[1:]) / max(1, len(outs) - 1)
    return dict(target=target, diffs=diffs, se=statistics.fmean(ses), oracle=oracle,
                above=above, chosen=chosen_acc, uniform=uni_acc)


def main() -> int:
    args = parse_args()
    if args.smoke:
        args.vectors, args.targets, args.seeds = 2, "0.5", 2
        args.choose_images, args.report_images = 300, 500
    clock = Clock()
    t0 = time.time()
    task = task_from_args(args, clock)
    targets = [float(t) for t in args.targets.split(",") if t]
    rows = [one_target(task, t, args, clock) for t in targets]
    print(f"\n{args.cfg}, {args.vectors} patterns of {len(unit_groups(task.space, 'halves'))} "
          f"group offsets (+-{args.spread}) per target, {args.seeds} seeds of "
          f"{args.choose_images} choosing / {args.report_images} reporting images; "
          f"{len(task.cache)} zero-shot evaluations in {task.seconds:.0f} s "
          f"({time.time() - t0:.0f} s in all), torch threads {torch.get_num_threads()}\n")
    print("| target | chosen - uniform (points) | 90% t-interval | SE of one seed | "
          "patterns above uniform | oracle |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        m, lo, hi = t_interval(r["diffs"])
        print(f"| {r['target']:g} | {m:+.2f} | {lo:+.2f} .. {hi:+.2f} | {r['se']:.2f} | "
              f"{100 * r['above']:.0f}% | {statistics.fmean(r['oracle']):+.2f} |")
    for r in rows:
        print(f"target {r['target']:g} per seed: " + " ".join(f"{d:+.2f}" for d in r["diffs"]))
    chosen = statistics.fmean(a for r in rows for a in r["chosen"])
    uniform = statistics.fmean(a for r in rows for a in r["uniform"])
    print(f"ratio={chosen / uniform:.4f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
