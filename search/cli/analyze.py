"""`launch.py analyze`: print and write the results of one or more searches.

Prints, per experiment, the trial counts, the top trials, the Pareto front, the
hypervolume, the most and least sensitive layers and (with ``--flops_budget``) the best
trial within the budget with its rate vector in the original's syntax, ready for
``launch.py sketch --sketch_rate``. Writes the dataframe, the front, the sensitivity
table and the convergence history (csv, parquet or json) and the plots (PNG + SVG) to
``--out`` (default ``DIR/analysis``), and prints where.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sketch_core.errors import UserError

from search.experiment.scoring_split import describe
from search.results.budgets import Budget, parse_budget
from search.results.dataframe import (EXPORT_FORMATS, Experiment, ResultsWarning, best_within,
                                      combine, experiment_fronts, export, format_rate_vector,
                                      hypervolume, hypervolume_history, layer_sensitivity,
                                      load_experiments, pareto_front, rates_of, top_trials)
from search.results.record import ENDED_STATUSES

__all__ = ["add_arguments", "run"]

_STATUS_WORDS = {"completed": "completed", "stopped": "stopped early", "failed": "failed",
                 "rejected": "rejected by a budget", "running": "running"}
_MAX_FRONT_ROWS = 30


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "analyze") -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="experiment folder(s) written by `launch.py search` (<storage_path>/<name>), "
                             "local or the storage URI the search used; several are compared side by side")
    parser.add_argument("--top", type=int, default=10, metavar="K",
                        help="how many of the most accurate completed trials to print (default 10)")
    parser.add_argument("--flops_budget", default=None, metavar="F",
                        help="print the best trial within this FLOPs budget: a fraction of the unpruned "
                             "model's MACs ('0.5'), a percentage ('50%%') or MACs ('60M', '1.2G')")
    parser.add_argument("--latency_budget", default=None, metavar="L",
                        help="print the best trial within this predicted latency: a fraction of the "
                             "unpruned network's ('0.6', '60%%') or milliseconds ('3ms'); for searches "
                             "priced by latency")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where to write tables and plots (default: DIR/analysis of the first DIR)")
    parser.add_argument("--format", default="csv", choices=EXPORT_FORMATS,
                        help="table format (default csv)")
    parser.add_argument("--no_plots", action="store_true", help="write the tables only")


# ---------------------------------------------------------------- formatting


def _si(value: float) -> str:
    if pd.isna(value):
        return "-"
    value = float(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _pct(value: float, digits: int = 2) -> str:
    return "-" if pd.isna(value) else f"{float(value) * 100:.{digits}f}%"


def _table(df: pd.DataFrame) -> str:
    show = pd.DataFrame({
        "trial_id": df["trial_id"].astype(str),
        "val_acc": [_pct(v) for v in df["val_acc"]],
        "MACs": [_si(v) for v in df["flops"]],
        "FLOPs ratio": [_pct(v, 1) for v in df["flops_ratio"]],
        "params": [_si(v) for v in df["params"]],
        **({"latency (pred.)": ["-" if pd.isna(v) else f"{v:.3f} ms" for v in df["latency_ms"]]}
           if "latency_ms" in df.columns and df["latency_ms"].notna().any() else {}),
        "epochs": ["-" if pd.isna(v) else str(int(v)) for v in df["epochs"]],
    })
    if "test_acc" in df.columns and df["test_acc"].notna().any():
        show["test_acc"] = [_pct(v) for v in df["test_acc"]]
        if "test_images" in df.columns and df["test_images"].notna().any():
            show["on test images"] = ["-" if pd.isna(v) else str(int(v)) for v in df["test_images"]]
    if "paper_rate" in df.columns and df["paper_rate"].notna().any():
        show["note"] = ["paper " + v if isinstance(v, str) else "" for v in df["paper_rate"]]
    lines = show.to_string(index=False).splitlines()
    return "\n".join("  " + line for line in lines)


def _rate_lines(df: pd.DataFrame) -> str:
    width = max((len(str(t)) for t in df["trial_id"]), default=0)
    return "\n".join(f"  {str(row['trial_id']):<{width}}  '{format_rate_vector(rates_of(row))}'"
                     for _, row in df.iterrows())


def _counts(df: pd.DataFrame) -> str:
    counts = df["status"].value_counts()
    parts = [f"{int(counts[s])} {_STATUS_WORDS[s]}" for s in _STATUS_WORDS if s in counts]
    parts += [f"{int(n)} {s}" for s, n in counts.items() if s not in _STATUS_WORDS]
    return f"{len(df)} trials ({', '.join(parts)})" if parts else "0 trials"


def _running_summary(df: pd.DataFrame, limit: int = 5) -> str:
    run = df[df["status"] == "running"]
    if run.empty:
        return "nothing is running either (no Ray Tune trial folder with a report was found)"
    items = []
    for _, row in run.head(limit).iterrows():
        epoch = "" if pd.isna(row["epochs"]) else f"epoch {int(row['epochs'])}, "
        items.append(f"{row['trial_id']} ({epoch}val_acc {_pct(row['val_acc'])})")
    more = f" and {len(run) - limit} more" if len(run) > limit else ""
    return f"running: {len(run)} trial(s): {', '.join(items)}{more}"


def _baseline_line(exp: Experiment) -> str | None:
    base = exp.baseline
    if not base:
        return None
    parts = []
    if base.get("val_acc") is not None:
        parts.append(f"val. accuracy {_pct(base['val_acc'])}")
    if base.get("test_acc") is not None:
        parts.append(f"test accuracy {_pct(base['test_acc'])}")
    if base.get("flops") is not None:
        parts.append(f"{_si(base['flops'])} MACs")
    if base.get("params") is not None:
        parts.append(f"{_si(base['params'])} params")
    return "unpruned baseline: " + ", ".join(parts) if parts else None


def _sensitivity_line(sens: pd.DataFrame, k: int = 3, at: str = "FLOPs") -> str | None:
    ok = sens.dropna(subset=["partial_spearman"]).sort_values("partial_spearman", ascending=False)
    if ok.empty:
        return None
    fmt = lambda rows: ", ".join(f"{r.unit_name} ({r.partial_spearman:+.2f})" for r in rows.itertuples())  # noqa: E731
    return (f"layer sensitivity (partial Spearman of rate vs val_acc at equal {at}, {int(ok['n'].iloc[0])} "
            f"trials): keep wide: {fmt(ok.head(k))}; can be sketched hard: {fmt(ok.tail(k).iloc[::-1])}")


def _budget_text(budget: Budget) -> str:
    if budget.axis == "latency":
        return budget.text if budget.kind == "absolute" else f"{budget.value * 100:g}% of the unpruned latency"
    return (f"{budget.value * 100:g}% of the unpruned MACs" if budget.kind == "ratio"
            else f"{_si(budget.value)} MACs")


# ---------------------------------------------------------------- output folder


def _out_dir(args: argparse.Namespace, exps: Sequence[Experiment]) -> Path:
    if args.out is not None:
        return Path(args.out).expanduser()
    first = exps[0].path
    if "://" in first:
        return Path.cwd() / f"{exps[0].name}-analysis"
    return Path(first) / "analysis"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"cannot write to the output folder {out}: {reason}; pass --out with a writable "
                        f"folder") from None


# ---------------------------------------------------------------- run


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"warning: {message}", file=sys.stderr)


def _print_within(df: pd.DataFrame, budget: Budget) -> pd.Series | None:
    """The best trial within ``budget``, printed with its rate vector; None when none fits."""
    best = best_within(df, budget)
    what = f"the {'latency' if budget.axis == 'latency' else 'FLOPs'} budget {_budget_text(budget)}"
    if best is None:
        print(f"\nno completed trial within {what}")
        return None
    if budget.axis == "latency":
        cost = (f"{best['latency_ms']:.3f} ms predicted ({_pct(best['latency_ratio'], 1)} of the "
                f"unpruned), {_pct(best['flops_ratio'], 1)} of the FLOPs")
    else:
        cost = (f"{_si(best['flops'])} MACs ({_pct(best['flops_ratio'], 1)} of the unpruned), "
                f"{_si(best['params'])} params")
    print(f"\nbest trial within {what}: {best['trial_id']}: val. accuracy "
          f"{_pct(best['val_acc'])}, {cost}")
    print(f"  --sketch_rate '{format_rate_vector(rates_of(best))}'")
    return best


def _print_header(exp: Experiment) -> None:
    df = exp.trials
    print(f"== experiment {exp.name}  ({exp.path})")
    print(f"{_counts(df)}")
    base = _baseline_line(exp)
    if base:
        print(base)
    if exp.manifest:
        print(f"scores: {describe(exp.manifest.get('scores'))}")
    failed = df.loc[df["status"] == "failed", "error"].fillna("(no message)")
    if len(failed):
        last_lines = [str(e).strip().splitlines()[-1] if str(e).strip() else "(no message)"
                      for e in failed]
        common = pd.Series(last_lines).value_counts().head(3)
        print("failures: " + "; ".join(f"{msg} (x{n})" for msg, n in common.items()))


def _print_front(df: pd.DataFrame, axis: str, fmt: str) -> pd.DataFrame:
    front = pareto_front(df, cost=axis)
    if front.empty:
        print("\nno completed trial: no Pareto front yet")
        return front
    shown = front.head(_MAX_FRONT_ROWS)
    more = f", the first {len(shown)} shown (all in front.{fmt})" if len(front) > len(shown) else ""
    print(f"\nPareto front (max validation accuracy, min "
          f"{'predicted latency' if axis == 'latency' else 'FLOPs'}): {len(front)} trials{more}")
    print(_table(shown))
    print("rate vectors (--sketch_rate):")
    print(_rate_lines(shown))
    return front


def _report(exp: Experiment, args: argparse.Namespace, budgets: list[Budget]) -> dict:
    """Everything printed about one experiment; its row of the comparison table."""
    _print_header(exp)
    df, axis = exp.trials, exp.cost_axis
    top = top_trials(df, args.top)
    if args.top and len(top):
        print(f"\ntop {len(top)} completed trials by validation accuracy:")
        print(_table(top))
        print("rate vectors (--sketch_rate):")
        print(_rate_lines(top))
    front = _print_front(df, axis, args.format)
    hv = hypervolume(df)
    print(f"\nhypervolume: {hv:.4f}  (area dominated in validation accuracy x FLOPs ratio; "
          f"reference point: accuracy 0, FLOPs ratio 1)")
    sens_line = _sensitivity_line(layer_sensitivity(df, exp.unit_names, cost=axis),
                                  at="predicted latency" if axis == "latency" else "FLOPs")
    if sens_line:
        print(sens_line)
    row = {"experiment": exp.name, "trials": len(df),
           "completed": int((df["status"] == "completed").sum()),
           "best val_acc": _pct(top["val_acc"].max()) if len(top) else "-",
           "front": len(front), "hypervolume": f"{hv:.4f}"}
    for budget in budgets:
        best = _print_within(df, budget)
        if budget.axis == "flops":
            row["best in budget"] = ("-" if best is None else
                                     f"{_pct(best['val_acc'])} @ {_pct(best['flops_ratio'], 1)}")
    print()
    return row


def _write_outputs(exps: Sequence[Experiment], out: Path, args: argparse.Namespace) -> list[Path]:
    combined = combine(exps)
    written = [export(combined, out, args.format, "trials"),
               export(experiment_fronts(exps), out, args.format, "front")]
    tag = (lambda f, e: f.assign(experiment=e.name)) if len(exps) > 1 else (lambda f, e: f)
    sens = [tag(layer_sensitivity(e.trials, e.unit_names, cost=e.cost_axis), e) for e in exps]
    written.append(export(pd.concat(sens, ignore_index=True), out, args.format, "sensitivity"))
    hist = [tag(hypervolume_history(e.trials), e) for e in exps]
    written.append(export(pd.concat(hist, ignore_index=True), out, args.format, "history"))
    if not args.no_plots:
        from search.results.plots import write_plots  # matplotlib: heavy, only when plotting

        written += write_plots(exps, out)
    return written


def _budgets(args: argparse.Namespace) -> list[Budget]:
    out = []
    if args.flops_budget is not None:
        out.append(parse_budget(args.flops_budget, "flops", "--flops_budget"))
    if args.latency_budget is not None:
        out.append(parse_budget(args.latency_budget, "latency", "--latency_budget"))
    return out


def run(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise UserError(f"--top must be 0 or more, got {args.top}")
    budgets = _budgets(args)
    with warnings.catch_warnings():
        warnings.simplefilter("always", ResultsWarning)
        warnings.showwarning = _print_warning
        exps = load_experiments(args.dirs)
    for exp in exps:
        if not exp.trials["status"].isin(ENDED_STATUSES).any():
            raise UserError(f"experiment {exp.name} ({exp.path}) has no finished trial yet; "
                            f"{_running_summary(exp.trials)}")
    out = _out_dir(args, exps)
    _check_writable(out)
    summary = [_report(exp, args, budgets) for exp in exps]
    if len(exps) > 1:
        print("comparison:")
        print("\n".join("  " + line for line in pd.DataFrame(summary).to_string(index=False).splitlines()))
        print()
    written = _write_outputs(exps, out, args)
    print(f"wrote {len(written)} files to {out}:")
    print("  " + ", ".join(p.name for p in written))
    return 0
