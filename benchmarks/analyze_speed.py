"""How long `launch.py analyze` takes on a large search: 10,000 synthetic trial records.

Writes a synthetic experiment folder (27 rates per trial, as ResNet-56; all statuses,
a retrain result), then times, in this process:
  baseline: pandas alone reading trials.jsonl and writing it back as CSV (the least any
            analysis has to do with the same file);
  analyze:  the whole `launch.py analyze DIR --flops_budget 0.5` (load, front,
            hypervolume and its history, sensitivity, tables, all plots as PNG + SVG).
Prints each phase, whether analyze met its 10 s target, and last `ratio=analyze/baseline`.

    python benchmarks/analyze_speed.py [--trials 10000] [--no_plots]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import launch  # noqa: E402
from analysis_synthetic import write_experiment  # noqa: E402
from search.results import dataframe as analysis  # noqa: E402

TARGET_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--units", type=int, default=27)
    parser.add_argument("--no_plots", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "synthetic"
        write_experiment(exp, args.trials, args.units, seed=0, sens=[0.004 * (i % 5) for i in range(args.units)])
        print(f"synthetic experiment: {args.trials} trial records, {args.units} rates each, "
              f"trials.jsonl {(exp / 'trials.jsonl').stat().st_size / 1e6:.1f} MB")

        t0 = time.perf_counter()
        raw = pd.read_json(exp / "trials.jsonl", lines=True)
        raw.to_csv(Path(tmp) / "baseline.csv", index=False)
        baseline = time.perf_counter() - t0
        print(f"baseline (pandas read_json + to_csv): {baseline:.2f} s")

        t0 = time.perf_counter()
        df = analysis.load_results(exp)
        t1 = time.perf_counter()
        analysis.pareto_front(df)
        analysis.hypervolume(df)
        t2 = time.perf_counter()
        analysis.hypervolume_history(df)
        t3 = time.perf_counter()
        analysis.layer_sensitivity(df)
        t4 = time.perf_counter()
        print(f"phases: load {t1 - t0:.2f} s, front + hypervolume {t2 - t1:.3f} s, "
              f"history {t3 - t2:.2f} s, sensitivity {t4 - t3:.2f} s")

        argv = ["analyze", str(exp), "--flops_budget", "0.5", "--out", str(Path(tmp) / "out")]
        if args.no_plots:
            argv.append("--no_plots")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = launch.main(argv)
        total = time.perf_counter() - t0
        if rc != 0:
            print(f"analyze failed with exit code {rc}")
            return 1
        verdict = "within" if total <= TARGET_S else "OVER"
        print(f"analyze ({'tables only' if args.no_plots else 'tables + plots'}): {total:.2f} s, "
              f"{verdict} the {TARGET_S:g} s target")
    print(f"ratio={total / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
