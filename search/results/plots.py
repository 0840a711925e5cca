"""Plots of search results (matplotlib, Agg backend), written as PNG and SVG.

- :func:`plot_tradeoff`: validation accuracy vs FLOPs ratio (vs predicted latency ratio for
  a search whose cost axis is latency), the Pareto front as a
  staircase, the paper's uniform-rate trials, the retrained configuration and the
  unpruned baseline; several experiments overlay their fronts in one plot.
- :func:`plot_front_rates`: the per-layer rates of the front as a heatmap.
- :func:`plot_convergence`: hypervolume and best accuracy over the trial count.
- :func:`plot_sensitivity`: per-layer sensitivity (partial Spearman) as bars.

Every function takes an :class:`search.results.dataframe.Experiment`, a results DataFrame, or a
list of either, and returns a matplotlib Figure; :func:`write_plots` saves them all.
FLOPs are multiply-accumulates (MACs) of conv and linear layers throughout.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sketch_core.io.atomic import atomic_write  # noqa: E402

from search.results.dataframe import (Experiment, hypervolume_history, layer_sensitivity,  # noqa: E402
                       pareto_front, rate_columns)
from search.results.pareto import COST_COLUMNS  # noqa: E402

__all__ = ["plot_tradeoff", "plot_front_rates", "plot_convergence", "plot_sensitivity",
           "save_figure", "write_plots", "PLOT_FORMATS"]

PLOT_FORMATS = ("png", "svg")
Results = Union[Experiment, pd.DataFrame, Sequence[Union[Experiment, pd.DataFrame]]]
_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _as_experiments(results: Results) -> list[Experiment]:
    items = [results] if isinstance(results, (Experiment, pd.DataFrame)) else list(results)
    out: list[Experiment] = []
    for item in items:
        if isinstance(item, Experiment):
            out.append(item)
        elif "experiment" in item.columns and item["experiment"].nunique() > 1:
            out += [Experiment(path="", name=str(k), manifest={}, trials=g)
                    for k, g in item.groupby("experiment", sort=False)]
        else:
            manifest = dict(item.attrs.get("manifest") or {})  # load_results leaves it there
            name = str(item["experiment"].iloc[0]) if "experiment" in item.columns and len(item) \
                else str(manifest.get("name") or "search")
            out.append(Experiment(path="", name=name, manifest=manifest, trials=item))
    return out


def _pct(values: pd.Series | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=float) * 100.0


def _draw_trials(ax: Any, df: pd.DataFrame, xcol: str, color: str, tag: str, many: bool) -> None:
    done = df[(df["status"] == "completed") & df["val_acc"].notna()]
    stopped = df[(df["status"] == "stopped") & df["val_acc"].notna()]
    few = len(done) < 100  # a handful of trials: bigger, darker dots
    ax.scatter(_pct(done[xcol]), _pct(done["val_acc"]), s=28 if few else 12, color=color,
               alpha=0.7 if few else 0.35, linewidths=0, rasterized=True,
               label=f"{tag}completed trials ({len(done)})")
    if len(stopped) and not many:
        ax.scatter(_pct(stopped[xcol]), _pct(stopped["val_acc"]), s=10, marker="x",
                   color="0.6", alpha=0.5, linewidths=0.8, rasterized=True,
                   label=f"stopped early, fewer epochs ({len(stopped)})")


def _draw_front(ax: Any, df: pd.DataFrame, axis: str, xcol: str, color: str, tag: str) -> None:
    front = pareto_front(df, per_experiment=False, cost=axis).sort_values(xcol)
    if len(front):
        x, y = _pct(front[xcol]), _pct(front["val_acc"])
        ax.step(np.append(x, max(x[-1], 100.0)), np.append(y, y[-1]),
                where="post", color=color, lw=1.8, alpha=0.9)
        ax.scatter(x, y, s=42, color=color, edgecolors="black", linewidths=0.7, zorder=3,
                   label=f"{tag}Pareto front ({len(front)})")


def _draw_paper(ax: Any, df: pd.DataFrame, xcol: str, annotated: set, legend: bool) -> bool:
    """The paper's vectors as stars, each labelled once; whether the legend has them."""
    if "paper_rate" not in df.columns:
        return legend
    for _, row in df[df["paper_rate"].notna() & df["val_acc"].notna()].iterrows():
        finished = row["status"] == "completed"
        ax.scatter(_pct(row[xcol]), _pct(row["val_acc"]), s=140, marker="*",
                   color="gold" if finished else "none", edgecolors="black", linewidths=0.8,
                   zorder=4, label=None if legend else "paper's uniform rates (hollow: stopped early)")
        legend = True
        spot = (str(row["paper_rate"]), round(row[xcol], 2), round(row["val_acc"], 2))
        if spot not in annotated:  # the same vector in several experiments: label it once
            annotated.add(spot)
            text = row["paper_rate"] + ("" if finished else f" ({row['status']})")
            ax.annotate(text, (row[xcol] * 100, row["val_acc"] * 100),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
    return legend


def _draw_retrained(ax: Any, exp: Any, xcol: str, color: str, tag: str) -> None:
    df = exp.trials
    retrained = df[df["test_acc"].notna()] if "test_acc" in df.columns else df.iloc[0:0]
    for i, (_, row) in enumerate(retrained.iterrows()):
        xr = row[xcol] * 100
        ax.scatter(xr, row["test_acc"] * 100, s=90, marker="D", color=color, edgecolors="black",
                   linewidths=1.0, zorder=5,
                   label=f"{tag}retrained '{row['pick']}' (test accuracy)" if i == 0 else None)
        if not math.isnan(row["val_acc"]):
            ax.plot([xr, xr], [row["val_acc"] * 100, row["test_acc"] * 100], ls=":", color=color, lw=1)
    base = exp.baseline if isinstance(exp, Experiment) else {}
    if base.get("val_acc") is not None:
        ax.scatter(100.0, float(base["val_acc"]) * 100, s=110, marker="P", color=color,
                   edgecolors="black", zorder=4, label=f"{tag}unpruned baseline (val.)")


def _label_axes(ax: Any, exps: list[Experiment], by_latency: bool, title: str | None) -> None:
    many = len(exps) > 1
    ax.set_xlabel("predicted latency, % of the unpruned model's" if by_latency
                  else "FLOPs, % of the unpruned model's MACs (conv + linear)")
    ax.set_ylabel("validation accuracy (%)")
    if title is None:
        what = "latency" if by_latency else "FLOPs"
        title = ("Pareto fronts compared" if many else f"Accuracy vs {what}: {exps[0].name}") if exps else ""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(exps) == 1 and exps[0].baseline.get("flops") and not by_latency:
        macs = float(exps[0].baseline["flops"])
        sec = ax.secondary_xaxis("top", functions=(lambda p: p * macs / 100e6, lambda m: m * 100e6 / macs))
        sec.set_xlabel("MACs (millions)")


def plot_tradeoff(results: Results, title: str | None = None) -> Figure:
    """Validation accuracy (%) vs FLOPs (% of the unpruned MACs), fronts highlighted."""
    exps = _as_experiments(results)
    fig, ax = plt.subplots(figsize=(8.0, 5.4), layout="constrained")
    many = len(exps) > 1
    annotated: set[tuple[str, float, float]] = set()
    paper_legend = False
    # one x axis for all: predicted latency only when every experiment priced by it
    by_latency = bool(exps) and all(e.cost_axis == "latency" for e in exps)
    axis = "latency" if by_latency else "flops"
    xcol = COST_COLUMNS[axis][0]
    for k, exp in enumerate(exps):
        color = _COLORS[k % len(_COLORS)]
        tag = f"{exp.name}: " if many else ""
        _draw_trials(ax, exp.trials, xcol, color, tag, many)
        _draw_front(ax, exp.trials, axis, xcol, color, tag)
        paper_legend = _draw_paper(ax, exp.trials, xcol, annotated, paper_legend)
        _draw_retrained(ax, exp, xcol, color, tag)
    _label_axes(ax, exps, by_latency, title)
    _zoom(ax, exps, axis)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    return fig


def _zoom(ax, exps: list[Experiment], axis: str = "flops") -> None:
    """Keep the interesting band in view: far-off poor trials would squash the front."""
    acc = pd.concat([e.trials.loc[e.trials["status"] == "completed", "val_acc"] for e in exps]).dropna()
    if len(acc) < 10:
        return
    must = [pareto_front(e.trials, per_experiment=False, cost=axis)["val_acc"] for e in exps]
    must += [e.trials["test_acc"] for e in exps if "test_acc" in e.trials.columns]
    must += [e.trials.loc[e.trials["paper_rate"].notna(), "val_acc"] for e in exps
             if "paper_rate" in e.trials.columns]
    must.append(pd.Series([float(e.baseline["val_acc"]) for e in exps if e.baseline.get("val_acc") is not None],
                          dtype=float))
    keep = pd.concat([m.astype(float) for m in must]).dropna()
    lo = min(float(np.quantile(acc, 0.02)), float(keep.min()) if len(keep) else math.inf) * 100
    hi = max(float(acc.max()), float(keep.max()) if len(keep) else -math.inf) * 100
    pad = max(0.5, 0.05 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)


def plot_front_rates(results: Results, unit_names: Sequence[str] | None = None, max_rows: int = 40) -> Figure:
    """Heatmap: one row per front trial (cheapest at the top: fewest FLOPs, or the least
    predicted latency for a search priced by latency), one column per unit."""
    exp = _as_experiments(results)[0]
    by_latency = exp.cost_axis == "latency"
    ccol, word = COST_COLUMNS[exp.cost_axis][0], "latency" if by_latency else "FLOPs"
    front = pareto_front(exp.trials, per_experiment=False, cost=exp.cost_axis).sort_values(ccol)
    rcols = rate_columns(exp.trials)
    if len(front) > max_rows:
        front = front.iloc[np.unique(np.linspace(0, len(front) - 1, max_rows).round().astype(int))]
    names = list(unit_names or exp.unit_names) or [str(i) for i in range(len(rcols))]
    rates = front[rcols].to_numpy(float) if len(front) else np.zeros((0, len(rcols)))
    width = min(18.0, max(6.5, 0.32 * len(rcols) + 3.5))
    height = min(14.0, max(3.0, 0.3 * len(front) + 2.2))
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    if len(front) == 0:
        ax.text(0.5, 0.5, "no completed trial: no front yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    im = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(front)))
    ax.set_yticklabels([f"{r * 100:.1f}% {word}, {a * 100:.2f}%"
                        for r, a in zip(front[ccol], front["val_acc"])], fontsize=8)
    step = max(1, math.ceil(len(rcols) / 40))
    ax.set_xticks(range(0, len(rcols), step))
    ax.set_xticklabels([names[i] if i < len(names) else str(i) for i in range(0, len(rcols), step)],
                       rotation=90 if len(rcols) > 12 else 45, ha="center" if len(rcols) > 12 else "right",
                       fontsize=8)
    if rates.size <= 160:  # numbers in the cells only while they stay readable (and fast)
        for (i, j), v in np.ndenumerate(rates):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.55 else "black")
    ax.set_xlabel("prunable unit (what each rate controls, in network order)")
    ax.set_ylabel("Pareto-front trial (predicted latency % of the unpruned, val. accuracy)"
                  if by_latency else "Pareto-front trial (FLOPs % of unpruned MACs, val. accuracy)")
    ax.set_title(f"Per-layer rates on the Pareto front: {exp.name}")
    fig.colorbar(im, ax=ax, label="rate (fraction of filters kept)", shrink=0.9)
    return fig


def plot_convergence(results: Results, ref: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """Hypervolume and best completed validation accuracy after each ended trial."""
    exps = _as_experiments(results)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7.5, 5.6), sharex=True, layout="constrained")
    for k, exp in enumerate(exps):
        hist = hypervolume_history(exp.trials, ref=ref)
        color = _COLORS[k % len(_COLORS)]
        ax1.plot(hist["trial"], hist["hypervolume"], color=color, lw=1.6, label=exp.name)
        ax2.plot(hist["trial"], hist["best_val_acc"] * 100, color=color, lw=1.6, label=exp.name)
    ax1.set_ylabel("hypervolume\n(val. acc x FLOPs ratio)")
    ax1.set_title(f"Did the search converge? (reference point: accuracy {ref[0]:g}, FLOPs ratio {ref[1]:g})")
    ax2.set_ylabel("best validation accuracy (%)")
    ax2.set_xlabel("trials ended (completed, stopped, failed or rejected)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if len(exps) > 1:
        ax1.legend(fontsize=8)
    return fig


def plot_sensitivity(results: Results, sensitivity: pd.DataFrame | None = None) -> Figure:
    """Bars: partial Spearman correlation of each unit's rate with accuracy at equal FLOPs."""
    exp = _as_experiments(results)[0]
    sens = sensitivity if sensitivity is not None else layer_sensitivity(exp.trials, exp.unit_names, cost=exp.cost_axis)
    width = min(18.0, max(6.5, 0.3 * len(sens) + 3.0))
    fig, ax = plt.subplots(figsize=(width, 4.6), layout="constrained")
    rho = sens["partial_spearman"].to_numpy(float)
    colors = ["#c0392b" if v > 0 else "#2e86c1" for v in np.nan_to_num(rho)]
    ax.bar(np.arange(len(sens)), np.nan_to_num(rho), color=colors)
    for i, (v, p) in enumerate(zip(rho, sens["p_value"].to_numpy(float))):
        if not math.isnan(p) and p < 0.05:
            ax.text(i, v + (0.02 if v >= 0 else -0.06), "*", ha="center", fontsize=10)
    ax.axhline(0, color="black", lw=0.8)
    step = max(1, math.ceil(len(sens) / 40))
    ax.set_xticks(range(0, len(sens), step))
    ax.set_xticklabels(list(sens["unit_name"])[::step], rotation=90 if len(sens) > 12 else 45,
                       ha="center" if len(sens) > 12 else "right", fontsize=8)
    ax.set_ylim(-1.05, 1.05)
    at = "latency" if exp.cost_axis == "latency" else "FLOPs"
    ax.set_ylabel(f"partial Spearman rho\n(rate vs val. accuracy at equal {at})")
    ax.set_xlabel("prunable unit")
    n = int(sens["n"].iloc[0]) if len(sens) else 0
    ax.set_title(f"Layer sensitivity: {exp.name} ({n} completed trials; * p < 0.05)\n"
                 "high = keep this layer wide; near 0 or below = can be sketched hard", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_figure(fig: Figure, out_dir: str | os.PathLike[str], stem: str,
                formats: Sequence[str] = PLOT_FORMATS, dpi: int = 120) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<stem>.<fmt>`` for each format (atomically) and close it."""
    paths = []
    try:
        for fmt in formats:
            path = Path(out_dir) / f"{stem}.{fmt}"
            atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi))
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def write_plots(results: Results, out_dir: str | os.PathLike[str],
                formats: Sequence[str] = PLOT_FORMATS) -> list[Path]:
    """All plots for one or more experiments; per-experiment ones get a ``-<name>`` suffix when several."""
    exps = _as_experiments(results)
    written = save_figure(plot_tradeoff(exps), out_dir, "tradeoff", formats)
    written += save_figure(plot_convergence(exps), out_dir, "convergence", formats)
    for exp in exps:
        suffix = f"-{_slug(exp.name)}" if len(exps) > 1 else ""
        written += save_figure(plot_front_rates(exp), out_dir, f"front_rates{suffix}", formats)
        written += save_figure(plot_sensitivity(exp), out_dir, f"sensitivity{suffix}", formats)
    return written
