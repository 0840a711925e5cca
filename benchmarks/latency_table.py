"""The latency model against a FLOPs-proportional model, on measured CPU latency.

For each model (CIFAR ResNet-56 and VGG-16 by default) the script measures the latency
table here (``sketch_core.cost.latency_table.build_table``), draws random rate vectors,
and measures each pruned network's whole-model latency (median of ``--repeats`` calls;
the vectors are timed in a shuffled order so drift in the machine's load does not
line up with either set). Two disjoint sets of vectors are drawn from the same seeded
distribution: ``--fit_vectors`` to fit the baseline, ``--vectors`` to test both models.

- latency model: the table's prediction (nothing is fitted on any of these vectors);
- FLOPs model: latency = a * MACs + b, least squares on the fit set only (MACs as
  ``launch.py info`` counts them, through the search's cost model).

With the drift correction (default; ``--no_drift_correct`` turns it off) every call
of a measured network alternates with a call of the unpruned network, and the
measurement is the median over the pairs of the ratio of the two times, x the
unpruned time the table measured: a machine busy with other work slows both calls of
a pair alike, and the measurements are expressed at the speed the machine had while
the table was measured (on an idle machine the factor is ~1). Both models are scored
on, and the FLOPs model fitted to, these same numbers. ``--stat`` (min, default, or
median) is the table's statistic, and the measurements' without the correction.

A vector: a base rate b ~ U(0.15, 1), then each unit's rate b + U(-0.35, 0.35),
clipped to [0.05, 1] (so vectors span light to heavy pruning and differ per layer).

Prints, on the test set of each model, Spearman and mean relative error of both
models, the latency model's Spearman against the 0.95 goal, and last
``ratio=<relative error of the FLOPs model / relative error of the latency model>``
over the test vectors of all models together (goal >= 2).

``--round_to_study`` adds, per model, the latency of equal-FLOPs networks (every rate
the same, chosen so the MACs are closest to a target) with widths rounded up to
multiples of 1, 8 and 16 (``space.round_to``), measured and predicted.

    python benchmarks/latency_table.py [--threads 1] [--batch 1] [--smoke] [--round_to_study]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from _common import spearman  # noqa: E402

from search.propose.space import CostModel  # noqa: E402
from sketch_core.cost.latency import measure_latency, paired_ratios  # noqa: E402
from sketch_core.cost.latency_table import build_table  # noqa: E402
from sketch_core.plans import widths_for  # noqa: E402
from sketch_core.registry import resolve_arch  # noqa: E402


def random_rates(rng: random.Random, units: int) -> list[float]:
    base = rng.uniform(0.15, 1.0)
    return [min(1.0, max(0.05, base + rng.uniform(-0.35, 0.35))) for _ in range(units)]


def rel_err(pred, meas) -> float:
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    return float(np.mean(np.abs(pred - meas) / meas))


def measure_all(arch, widths: list[list[int]], *, threads: int, batch: int, repeats: int,
                seed: int, drift: bool = True, stat: str = "min",
                unpruned_ms: float | None = None) -> list[float]:
    """Latency (ms) of each width vector's network, in a shuffled order, over
    ``repeats`` calls. Without ``drift``: the ``stat`` (min or median) of the calls.
    With ``drift`` each call alternates with a call of the unpruned network, and the
    result is the median over the pairs of (its time / the unpruned time) x
    ``unpruned_ms`` (default: the unpruned network's ``stat`` over the whole run): a
    spell of other work on the machine slows both calls of a pair alike and cancels."""
    f = {"median": statistics.median, "min": min}[stat]
    nets = [arch.build(w).eval() for w in widths]
    ref_net = arch.build(None).eval()
    shape = (arch.in_channels, arch.input_size, arch.input_size)
    kw = dict(batch=batch, threads=threads, repeats=repeats, warmup=3)
    order = list(range(len(widths)))
    random.Random(seed).shuffle(order)
    out, refs = [0.0] * len(widths), []
    for i in order:
        if drift:
            ratios, r = paired_ratios(nets[i], ref_net, shape, **kw)
            out[i] = statistics.median(ratios)
            refs += r
        else:
            out[i] = getattr(measure_latency(nets[i], shape, **kw), f"{stat}_ms")
    if not drift:
        return out
    scale = f(refs) if unpruned_ms is None else unpruned_ms
    return [v * scale for v in out]


def compare(cfg: str, *, vectors: int, fit_vectors: int, threads: int, batch: int, repeats: int,
            points: int, seed: int, drift: bool = True, stat: str = "min") -> dict:
    """The latency model and the fitted FLOPs model on ``vectors`` test vectors of ``cfg``."""
    arch = resolve_arch(cfg, "cifar10")
    cost = CostModel(arch, "cifar10")
    t0 = time.perf_counter()
    table = build_table(arch, threads=threads, batch=batch, points=points, stat=stat)
    build_s = time.perf_counter() - t0
    rng = random.Random(seed)
    widths = [widths_for(arch.plan(), random_rates(rng, arch.num_units))
              for _ in range(fit_vectors + vectors)]
    meas = measure_all(arch, widths, threads=threads, batch=batch, repeats=repeats, seed=seed,
                       drift=drift, stat=stat, unpruned_ms=table.full_ms)
    macs = [cost.cost(w)[0] for w in widths]
    a, b = np.polyfit(np.asarray(macs[:fit_vectors], float), meas[:fit_vectors], 1)
    test_w, test_m, test_macs = widths[fit_vectors:], meas[fit_vectors:], macs[fit_vectors:]
    pred_lat = [table.predict(w) for w in test_w]
    pred_flops = [a * m + b for m in test_macs]
    return {"cfg": cfg, "build_s": build_s, "timed_grids": table.settings["timed_grids"],
            "full_ms": table.full_ms, "measured": test_m, "pred_lat": pred_lat,
            "pred_flops": pred_flops, "spearman_lat": spearman(pred_lat, test_m),
            "spearman_flops": spearman(pred_flops, test_m), "err_lat": rel_err(pred_lat, test_m),
            "err_flops": rel_err(pred_flops, test_m), "table": table, "arch": arch, "cost": cost}


def _closest_uniform(arch, cost, target: float, round_to: int) -> tuple[list[int], float]:
    """Widths of the uniform rate whose MACs (rounded to ``round_to``) are closest to
    ``target`` x the unpruned MACs, and that MACs ratio."""
    full = cost.cost(arch.plan().full_widths())[0]

    def at(k: int) -> tuple[list[int], float]:  # rate k / 100; MACs grow with k
        w = widths_for(arch.plan(), [k / 100] * arch.num_units, round_to=round_to)
        return w, cost.cost(w)[0] / full

    lo, hi = 5, 100  # bisect for the first rate whose MACs reach the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if at(mid)[1] < target else (lo, mid)
    return min((at(k) for k in {max(5, lo - 1), lo}), key=lambda c: abs(c[1] - target))


def round_to_study(res: dict, *, threads: int, batch: int, repeats: int, seed: int,
                   drift: bool = True, stat: str = "min", targets=(0.3, 0.5, 0.7),
                   roundings=(1, 8, 16)
                   ) -> list[tuple]:
    """(target, round_to, MACs ratio, measured ms, predicted ms) rows for one model."""
    arch, table = res["arch"], res["table"]
    picks = [(t, r, *_closest_uniform(arch, res["cost"], t, r)) for t in targets for r in roundings]
    meas = measure_all(arch, [p[2] for p in picks], threads=threads, batch=batch,
                       repeats=repeats, seed=seed, drift=drift, stat=stat,
                       unpruned_ms=table.full_ms)
    return [(t, r, ratio, m, table.predict(w)) for (t, r, w, ratio), m in zip(picks, meas)]


def _report(res: dict) -> None:
    print(f"{res['cfg']}: table {res['build_s']:.1f} s ({res['timed_grids']} grids timed), "
          f"unpruned {res['full_ms']:.2f} ms, {len(res['measured'])} test vectors "
          f"{min(res['measured']):.2f}-{max(res['measured']):.2f} ms")
    print(f"  latency model  Spearman {res['spearman_lat']:.3f}  mean rel. error "
          f"{100 * res['err_lat']:.2f}%")
    print(f"  FLOPs model    Spearman {res['spearman_flops']:.3f}  mean rel. error "
          f"{100 * res['err_flops']:.2f}%  (a*MACs+b fitted on the separate fit set)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet56,vgg16", help="CIFAR cfgs, comma-separated")
    p.add_argument("--vectors", type=int, default=40, help="test vectors per model (>= 30)")
    p.add_argument("--fit_vectors", type=int, default=20, help="vectors the FLOPs model is fitted on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30, help="timed calls per measured network")
    p.add_argument("--points", type=int, default=5, help="table grid points per width axis")
    p.add_argument("--round_to_targets", default="0.3,0.5,0.7",
                   help="MACs ratios the round_to study matches (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_drift_correct", action="store_true",
                   help="do not alternate each network's calls with the unpruned network's")
    p.add_argument("--stat", choices=("median", "min"), default="min",
                   help="statistic of the timed calls, for the table and the measurements alike")
    p.add_argument("--smoke", action="store_true", help="a quick run (< 1 minute): resnet20, few vectors")
    p.add_argument("--round_to_study", action="store_true",
                   help="also: equal-FLOPs latency at widths rounded to 1, 8, 16")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.vectors, args.fit_vectors, args.repeats = "resnet20", 12, 6, 10
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, grid "
          f"{args.points} points per axis, table: {args.stat} of calls; networks: "
          f"{args.repeats} calls, " + (f"{args.stat}" if args.no_drift_correct else
                                       "median ratio to the unpruned network, called alternately"),
          flush=True)
    kw = dict(threads=args.threads, batch=args.batch, repeats=args.repeats, seed=args.seed,
              drift=not args.no_drift_correct, stat=args.stat)
    results = []
    for cfg in args.models.split(","):
        results.append(compare(cfg, vectors=args.vectors, fit_vectors=args.fit_vectors,
                               points=args.points, **kw))
        _report(results[-1])
    if args.round_to_study:
        print("round_to study: uniform rate closest to a MACs target, widths rounded up")
        print(f"  {'model':10}{'target':>7}{'round':>6}{'MACs':>7}{'measured':>10}{'predicted':>10}")
        for res in results:
            targets = tuple(float(t) for t in args.round_to_targets.split(","))
            for t, r, ratio, m, pr in round_to_study(res, targets=targets, **kw):
                print(f"  {res['cfg']:10}{t:>7.2f}{r:>6}{ratio:>7.3f}{m:>8.2f}ms{pr:>8.2f}ms")
    meas = [m for r in results for m in r["measured"]]
    err_lat = rel_err([x for r in results for x in r["pred_lat"]], meas)
    err_flops = rel_err([x for r in results for x in r["pred_flops"]], meas)
    sp = ", ".join(f"{r['cfg']} {r['spearman_lat']:.3f}" for r in results)
    print(f"latency model Spearman: {sp} (goal >= 0.95)")
    print(f"mean rel. error, all test vectors: latency model {100 * err_lat:.2f}%, FLOPs model "
          f"{100 * err_flops:.2f}%")
    print(f"ratio={err_flops / err_lat:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
