"""Shared pieces of the benchmarks: a pretrained baseline, point columns, statistics.

The baseline is trained by the project's own ``launch.py pretrain`` (kept in a work
folder so a second run reuses it); every hypervolume is
:func:`search.results.pareto.hypervolume` of (accuracy, MACs ratio) columns, reference
(0, 1); Spearman correlation and bootstrap intervals are plain NumPy/SciPy. The search
benchmarks get their baseline, plan and trial setup as a search does
(:func:`search_trials`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import launch  # noqa: E402
from search.experiment.baseline import Baseline, baseline_dict, prepare_baseline  # noqa: E402
from search.experiment.config import SearchConfig  # noqa: E402
from search.experiment.resolve import SearchPlan, plan_search  # noqa: E402
from search.run.trial import TrialSetup, trial_setup  # noqa: E402
from sketch_core.errors import UserError  # noqa: E402

__all__ = ["pretrained", "columns", "spearman", "bootstrap_interval", "t_interval", "mean_sd", "Clock",
           "ROOT", "require_real_data", "seeded", "SearchTrials", "search_trials", "with_seed"]


@dataclass(frozen=True)
class SearchTrials:
    """What a search benchmark runs its trials on, resolved as ``launch.py search`` does:
    the baseline (``baseline.state`` its weights), its manifest summary, the search plan
    (``plan.space`` the priced rate space) and the trials' setup."""

    baseline: Baseline
    summary: dict[str, Any]
    plan: SearchPlan
    setup: TrialSetup


def search_trials(config: SearchConfig, name: str = "benchmark") -> SearchTrials:
    """The baseline (loaded, or pretrained and cached), the plan and the trial setup of
    ``config``'s search; nothing is written (the plan's folder is a temporary one)."""
    b = prepare_baseline(config, None)
    summary = baseline_dict(b)
    with tempfile.TemporaryDirectory(prefix="sketchtune-bench-") as tmp:
        plan = plan_search(config, summary, Path(tmp), name, tmp)
    return SearchTrials(b, summary, plan, trial_setup(plan))


def with_seed(setup: TrialSetup, seed: int) -> TrialSetup:
    """``setup`` with the trial recipe's seed (shuffling, initial weights, pruning) changed."""
    return dataclasses.replace(setup, recipe=dataclasses.replace(setup.recipe, seed=seed))


def require_real_data(root: Path, jpeg: str, checkpoint: str, network: str) -> None:
    """One-line error (``UserError``) unless ``root`` holds the JPEG CIFAR-10 and the
    public ``checkpoint`` that ``--data real`` reads."""
    need = [root / jpeg / "train", root / jpeg / "test", root / checkpoint]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise UserError(f"--data real needs the JPEG CIFAR-10 ({jpeg}/train, {jpeg}/test) and "
                        f"the public {network} ({checkpoint}) under --data_root {root}; missing: "
                        f"{', '.join(missing)}; point --data_root at the folder that holds them "
                        f"(default: ../shared/data beside the repository)")


def pretrained(work: Path, argv: Sequence[str], quiet: bool = True) -> Path:
    """``launch.py pretrain ARGV --job_dir WORK/pretrain``; the best checkpoint's path.

    An earlier run's checkpoint in the same folder, made with the same arguments, is reused.
    """
    job = work / "pretrain"
    ckpt = job / "checkpoint" / "model_best.pt"
    stamp = job / "benchmark_args.txt"
    wanted = " ".join(argv)
    if ckpt.exists() and stamp.exists() and stamp.read_text() == wanted:
        return ckpt
    args = ["pretrain", *argv, "--job_dir", str(job), "--no_progress"]
    if job.exists():
        args.append("--reset")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        rc = launch.main(args)
    if rc != 0 or not ckpt.exists():
        raise SystemExit(f"pretrain failed (exit {rc}): {' '.join(args)}")
    stamp.write_text(wanted)
    return ckpt


def columns(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``(acc, cost)`` points as two lists, the arguments of
    :func:`search.results.pareto.hypervolume`."""
    return [float(p[0]) for p in points], [float(p[1]) for p in points]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr  # optional: the bench extra

    with warnings.catch_warnings():  # a constant resample has no correlation: nan, skipped
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


def bootstrap_interval(stat: Callable[[np.ndarray], float], n: int, *, boot: int = 2000,
                       level: float = 0.90, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``boot`` resamples of range(n)."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(boot):
        v = stat(rng.integers(0, n, n))
        if np.isfinite(v):
            vals.append(v)
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
       9: 1.833, 10: 1.812, 12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}  # Student t, 95th pct


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 90% Student t interval of ``values`` (the table's df at or
    below ``len - 1``, so never narrower than the exact one)."""
    values = list(values)
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    t = T90[max(k for k in T90 if k <= len(values) - 1)]
    half = t * statistics.stdev(values) / (len(values) ** 0.5)
    return m, m - half, m + half


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class Clock:
    """Wall-clock seconds since creation, for progress lines."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> str:
        return f"{time.perf_counter() - self.t0:6.0f}s"


def seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
