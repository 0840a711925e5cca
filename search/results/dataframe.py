"""Results of a search as a pandas DataFrame: loading, Pareto front, hypervolume, export.

Everything here works from the experiment folder alone (see DESIGN.md, "The experiment
folder"), without Ray running: ``manifest.json``, ``trials.jsonl`` (one line per ended
trial), the ``result.json`` of Ray Tune's trial folders (trials still running: their
latest report) and ``retrain/<pick>/result.json`` (final test accuracy).

Objectives: validation accuracy (``val_acc``, a fraction, maximised) and FLOPs (``flops``,
multiply-accumulates of conv and linear layers, minimised; ``flops_ratio`` is the same
divided by the unpruned baseline's). Only trials that finished their recipe
(status ``completed``) take part in the front, the hypervolume and the sensitivity;
``stopped`` trials (stopped early by the scheduler) were scored after fewer epochs.

Typical use::

    from search.results.dataframe import load_results, pareto_front, hypervolume
    df = load_results("runs/resnet56")
    front = pareto_front(df)
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search.results.pareto import (COST_COLUMNS, best_index, front_indices, front_mask,
                                   hypervolume_of_loss)
from search.results.budgets import Budget, parse_budget
from search.results.record import ENDED_STATUSES, STATUSES, TrialRecord, scored_mask
from search.results.trials_file import NO_TRIAL_ID, json_lines, parse_records
from sketch_core.io.atomic import atomic_write as _atomic_write
from sketch_core.errors import UserError

__all__ = [
    "STATUSES", "ENDED_STATUSES", "ResultsWarning", "Experiment", "load_experiment", "load_experiments",
    "load_results", "load_retrains", "combine", "rate_columns", "rates_of", "format_rate_vector", "pareto_front",
    "hypervolume", "hypervolume_history", "layer_sensitivity", "top_trials", "best_within", "export", "read_export", "EXPORT_FORMATS",
    "cost_axis_of", "experiment_fronts",
]

EXPORT_FORMATS = ("csv", "parquet", "json")
RATE_PREFIX = "rate_"

# column -> dtype, in display order; rate_XX (float64) follow, then test_acc and the rest
_BASE_COLUMNS: dict[str, str] = {
    "trial_id": "str", "status": "str", "val_acc": "float64", "flops": "Int64",
    "flops_ratio": "float64", "params": "Int64", "params_ratio": "float64", "epochs": "Int64",
    "time_s": "float64", "node": "str", "error": "str", "started": "float64", "ended": "float64",
}
_TAIL_COLUMNS: dict[str, str] = {"test_acc": "float64", "pick": "str", "paper_rate": "str",
                                 "val_acc_sketched": "float64", "stop_reason": "str", "optuna_number": "Int64",
                                 "val_source": "str", "test_images": "Int64",
                                 "latency_ms": "float64", "latency_ratio": "float64"}
_ATTR_KEYS = ("name", "cfg", "data_set", "family", "num_units", "unit_names", "baseline", "paper_rates",
              "scores")
_RATE_RE = re.compile(r"^rate_(\d+)$")
_SKIP_DIRS = {"retrain", "analysis"}


class ResultsWarning(UserWarning):
    """Something in an experiment folder was skipped (a half-written line, an unreadable file)."""


def _warn(message: str) -> None:
    warnings.warn(message, ResultsWarning, stacklevel=3)


# ---------------------------------------------------------------- storage


class _Folder:
    """Read-only view of one folder on the local disk or any ``pyarrow.fs`` filesystem."""

    def __init__(self, location: str | os.PathLike[str]):
        from pyarrow import fs as pafs  # optional: pyarrow's filesystems, for remote storage

        text = os.fspath(location)
        self.location = text
        if "://" in text and not text.startswith("file://"):
            try:
                self.fs, root = pafs.FileSystem.from_uri(text)
            except Exception as exc:  # pyarrow raises several types for bad/unsupported URIs
                raise UserError(f"cannot open storage URI {text!r}: {exc}; expected a local folder or "
                                f"a URI pyarrow understands (s3://, gs://, hdfs://)") from None
            self.local = False
        else:
            path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
            self.fs, root = pafs.LocalFileSystem(), path.resolve().as_posix()
            self.local = True
        self.root = root.rstrip("/") or "/"

    def _join(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def _info(self, rel: str):
        return self.fs.get_file_info(self._join(rel))

    def is_dir(self, rel: str = "") -> bool:
        from pyarrow import fs as pafs  # optional: pyarrow

        try:
            return self._info(rel).type == pafs.FileType.Directory
        except OSError:
            return False

    def is_file(self, rel: str) -> bool:
        from pyarrow import fs as pafs  # optional: pyarrow

        try:
            return self._info(rel).type == pafs.FileType.File
        except OSError:
            return False

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None when it does not exist or cannot be read."""
        if not self.is_file(rel):
            return None
        try:
            with self.fs.open_input_stream(self._join(rel)) as fh:
                return fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            _warn(f"cannot read {self._join(rel)}: {exc}; skipped")
            return None

    def subdirs(self, rel: str = "") -> list[str]:
        from pyarrow import fs as pafs  # optional: pyarrow

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._join(rel), allow_not_found=True))
        except OSError:
            return []
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def describe(self, rel: str = "") -> str:
        return self._join(rel) if self.local else posixpath.join(self.location.rstrip("/"), rel)


def _read_json(folder: _Folder, rel: str) -> dict | None:
    text = folder.read_text(rel)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        _warn(f"{folder.describe(rel)} is not valid JSON (half-written?); skipped")
        return None
    if not isinstance(obj, dict):
        _warn(f"{folder.describe(rel)} does not hold a JSON object; skipped")
        return None
    return obj


# ---------------------------------------------------------------- loading


@dataclass
class Experiment:
    """One experiment folder: its manifest, its trials (one row each) and its retrain results."""

    path: str
    name: str
    manifest: dict[str, Any]
    trials: pd.DataFrame
    retrains: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def baseline(self) -> dict[str, Any]:
        return dict(self.manifest.get("baseline") or {})

    @property
    def cost_axis(self) -> str:
        """``flops`` or ``latency``: the cost the search's front and knee use."""
        return cost_axis_of(self.manifest, self.trials)

    @property
    def unit_names(self) -> list[str]:
        names = self.manifest.get("unit_names")
        return [str(n) for n in names] if isinstance(names, list) else []

    @property
    def paper_rates(self) -> dict[str, list[float]]:
        rates = self.manifest.get("paper_rates")
        return {str(k): list(v) for k, v in rates.items() if isinstance(v, list)} \
            if isinstance(rates, dict) else {}


def rate_columns(df: pd.DataFrame) -> list[str]:
    """The ``rate_XX`` columns of a results frame, in unit order."""
    cols = [c for c in df.columns if isinstance(c, str) and _RATE_RE.match(c)]
    return sorted(cols, key=lambda c: int(_RATE_RE.match(c).group(1)))


def _rate_name(i: int, n: int) -> str:
    return f"{RATE_PREFIX}{i:0{max(2, len(str(n - 1)))}d}"


def _num(value: Any) -> float:
    """A finite float or NaN (None, strings, bools and the like become NaN)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _text(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _rates_from(value: Any) -> list[float] | None:
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def _ray_trial_rows(folder: _Folder) -> list[TrialRecord]:
    """Latest report of each Ray Tune trial folder (depth 1 or 2); anything unexpected is skipped."""
    rows: list[TrialRecord] = []

    def visit(rel: str) -> bool:
        text = folder.read_text(posixpath.join(rel, "result.json"))
        if text is None:
            return False
        reports = json_lines(text)  # a running trial's last line may be half-written
        if not reports:
            return True
        last = reports[-1]
        trial_id = last.get("trial_id")
        if trial_id is None:
            return True
        config = last.get("config") if isinstance(last.get("config"), dict) else {}
        rates = _rates_from(last.get("rates")) or _rates_from(config.get("rates"))
        if rates is None:
            keyed = sorted(((int(m.group(1)), v) for k, v in config.items()
                            if isinstance(k, str) and (m := re.match(r"^(?:rate|r)_?(\d+)$", k))))
            rates = _rates_from([v for _, v in keyed])
        rows.append(TrialRecord.from_dict({
            "trial_id": str(trial_id), "status": "running", "rates": rates,
            "val_acc": last.get("val_acc"), "flops": last.get("flops"),
            "flops_ratio": last.get("flops_ratio"), "params": last.get("params"),
            "params_ratio": last.get("params_ratio"),
            "epochs": last.get("epoch", last.get("training_iteration")),
            "time_s": last.get("time_total_s"), "node": last.get("node", last.get("node_ip")),
            "error": None, "started": reports[0].get("timestamp"), "ended": None,
            "val_acc_sketched": last.get("val_acc_sketched"), "paper_rates": config.get("paper_rates"),
            "latency_ms": config.get("latency_ms"), "latency_ratio": config.get("latency_ratio"),
        }))
        return True

    for name in folder.subdirs():
        if name in _SKIP_DIRS or name.startswith((".", "checkpoint")):
            continue
        if not visit(name):
            for sub in folder.subdirs(name):
                if not sub.startswith((".", "checkpoint")):
                    visit(posixpath.join(name, sub))
    return rows


def _trial_records(folder: _Folder) -> list[TrialRecord]:
    """trials.jsonl through :func:`search.results.trials_file.parse_records`; each skipped line warns."""
    text = folder.read_text("trials.jsonl")
    if text is None:
        return []
    where = folder.describe("trials.jsonl")

    def skipped(number: int, reason: str) -> None:
        if reason == NO_TRIAL_ID:
            _warn(f"{where}: a record without trial_id was skipped")
        else:
            _warn(f"{where} line {number} is not a complete JSON object (half-written?); skipped, "
                  f"the other lines are kept")

    return parse_records(text, skipped)  # a trial id recorded twice: the first line counts


def _frame(records: list[TrialRecord], manifest: dict) -> pd.DataFrame:
    """Rows -> typed frame: fixed columns, rate_XX columns, ratios filled from the baseline."""
    n_units = max([len(r["rates"]) for r in records if r.get("rates")] +
                  [int(manifest.get("num_units") or 0)])
    data: dict[str, Any] = {}
    for col in _BASE_COLUMNS:
        if col in ("trial_id", "status", "node", "error"):
            data[col] = [_text(r.get(col)) for r in records]
        else:
            data[col] = np.array([_num(r.get(col)) for r in records], dtype=np.float64)
    data["status"] = [s.lower() if isinstance(s, str) else s for s in data["status"]]
    rates = np.full((len(records), n_units), np.nan)
    for i, r in enumerate(records):
        if r.get("rates"):
            rates[i, :len(r["rates"])] = r["rates"]
    for j in range(n_units):
        data[_rate_name(j, n_units)] = rates[:, j]
    base = manifest.get("baseline") or {}
    for what in ("flops", "params"):
        ref = _num(base.get(what))
        ratio = data[f"{what}_ratio"]
        if ref > 0:
            missing = np.isnan(ratio) & ~np.isnan(data[what])
            ratio[missing] = data[what][missing] / ref
    data["paper_rate"] = [r["paper_rates"] if isinstance(r.get("paper_rates"), str) else None for r in records]
    data["val_acc_sketched"] = np.array([_num(r.get("val_acc_sketched")) for r in records], dtype=np.float64)
    data["stop_reason"] = [_text(r.get("stop_reason")) for r in records]
    data["optuna_number"] = np.array([_num(r.get("optuna_number")) for r in records], dtype=np.float64)
    for col in ("latency_ms", "latency_ratio"):  # predicted by the latency table, when priced
        data[col] = np.array([_num(r.get(col)) for r in records], dtype=np.float64)
    df = pd.DataFrame(data)
    unknown = sorted(set(df["status"].dropna()) - set(STATUSES))
    if unknown:
        _warn(f"unknown trial status {', '.join(map(repr, unknown))}; kept as is "
              f"(expected one of {', '.join(STATUSES)})")
    return df


def load_retrains(path: str | os.PathLike[str]) -> pd.DataFrame:
    """``retrain/<pick>/result.json`` of one experiment as a frame (one row per pick)."""
    folder = path if isinstance(path, _Folder) else _Folder(path)
    rows: list[dict] = []
    for pick in folder.subdirs("retrain"):
        res = _read_json(folder, posixpath.join("retrain", pick, "result.json"))
        if res is None:
            continue
        row = {k: v for k, v in res.items() if not isinstance(v, (list, dict))}
        row["pick"] = str(res.get("pick") or pick)
        row["trial_id"] = _text(res.get("trial_id"))
        row["rates"] = _rates_from(res.get("rates"))
        rows.append(row)
    return pd.DataFrame(rows)


def _attach_retrains(df: pd.DataFrame, retrains: pd.DataFrame) -> None:
    if retrains.empty:
        return
    rcols = rate_columns(df)
    rate_matrix = df[rcols].to_numpy() if rcols else np.empty((len(df), 0))
    for _, r in retrains.iterrows():
        hit = np.zeros(len(df), dtype=bool)
        if isinstance(r.get("trial_id"), str):
            hit = (df["trial_id"] == r["trial_id"]).to_numpy()
        if not hit.any() and r.get("rates") and len(r["rates"]) == len(rcols):
            hit = np.all(np.isclose(rate_matrix, np.asarray(r["rates"]), rtol=0, atol=1e-9), axis=1)
        if hit.any():
            df.loc[hit, "test_acc"] = _num(r.get("test_acc"))
            df.loc[hit, "pick"] = r["pick"]
            df.loc[hit, "test_images"] = _num(r.get("test_images"))


def _mark_paper_rates(df: pd.DataFrame, paper: dict[str, list[float]]) -> None:
    rcols = rate_columns(df)
    if not paper or not rcols or df.empty:
        return
    matrix = df[rcols].to_numpy()
    for label, rates in paper.items():
        if len(rates) != len(rcols):
            continue
        hit = np.all(np.isclose(matrix, np.asarray(rates, dtype=float), rtol=0, atol=1e-9), axis=1)
        df.loc[hit & df["paper_rate"].isna().to_numpy(), "paper_rate"] = label


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed column order and dtypes (so that exports read back identical)."""
    rcols = rate_columns(df)
    lead = ["experiment"] if "experiment" in df.columns else []
    order = lead + list(_BASE_COLUMNS) + rcols + list(_TAIL_COLUMNS)
    rest = [c for c in df.columns if c not in order]
    for col in order:
        if col not in df.columns:
            df[col] = None
    df = df[order + rest].copy()
    types = {**_BASE_COLUMNS, **_TAIL_COLUMNS, **{c: "float64" for c in rcols}, "experiment": "str"}
    for col, dtype in types.items():
        if col not in df.columns:
            continue
        if dtype == "Int64":
            values = pd.to_numeric(df[col], errors="coerce").astype("float64")
            df[col] = values.round().astype("Int64")
        elif dtype == "float64":
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        else:
            df[col] = df[col].astype("object").where(df[col].notna(), None).astype("str")
    return df.reset_index(drop=True)


def _experiment_folder(path: str | os.PathLike[str]) -> _Folder:
    folder = _Folder(path)
    where = folder.describe()
    if not folder.is_dir():
        raise UserError(f"{where} is not a folder; expected an experiment folder written by "
                        f"`launch.py search` (<storage_path>/<name>)")
    if not (folder.is_file("manifest.json") or folder.is_file("trials.jsonl")):
        inside = [d for d in folder.subdirs() if _Folder(folder._join(d)).is_file("manifest.json")] \
            if folder.local else []
        hint = f"; did you mean one of: {', '.join(inside[:8])}" if inside else ""
        raise UserError(f"{where} holds no experiment (no manifest.json or trials.jsonl); expected the "
                        f"folder `launch.py search` writes, <storage_path>/<name>{hint}")
    return folder


def _val_source(manifest: dict) -> str | None:
    """Which images the trials scored on: the manifest's ``scores`` (searches from before
    the choice scored on the training holdout); None without a manifest."""
    if not manifest:
        return None
    return (manifest.get("scores") or {}).get("val_source") or "train_holdout"


def load_experiment(path: str | os.PathLike[str], *, include_running: bool = True) -> Experiment:
    """Load one experiment folder (local path or storage URI) into an :class:`Experiment`."""
    folder = _experiment_folder(path)
    manifest = _read_json(folder, "manifest.json") or {}
    if not folder.is_file("manifest.json"):
        _warn(f"{folder.describe()} has no manifest.json; baseline and unit names are unknown")
    records = _trial_records(folder)
    if include_running:
        seen = {r["trial_id"] for r in records}
        records += [r for r in _ray_trial_rows(folder) if r["trial_id"] not in seen]
    exp = Experiment(path=folder.describe(), name=str(manifest.get("name") or posixpath.basename(folder.root)),
                     manifest=manifest, trials=pd.DataFrame(), retrains=load_retrains(folder))
    df = _frame(records, manifest)
    df["test_acc"] = np.nan
    df["test_images"] = np.nan
    df["pick"] = pd.Series([None] * len(df), dtype="object")
    df["val_source"] = _val_source(manifest)
    _attach_retrains(df, exp.retrains)
    _mark_paper_rates(df, exp.paper_rates)
    exp.trials = _coerce(df)
    # for notebooks: functions given only the frame still find unit names and the baseline
    exp.trials.attrs["manifest"] = {k: manifest[k] for k in _ATTR_KEYS if k in manifest}
    exp.trials.attrs["manifest"].setdefault("name", exp.name)
    return exp


def _as_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list:
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    out = list(paths)
    if not out:
        raise UserError("no experiment folder given; expected one or more folders written by `launch.py search`")
    return out


def load_experiments(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                     include_running: bool = True) -> list[Experiment]:
    """Load several experiment folders; duplicate names get a ``#2``, ``#3`` suffix."""
    exps = [load_experiment(p, include_running=include_running) for p in _as_paths(paths)]
    seen: dict[str, int] = {}
    for exp in exps:
        count = seen.get(exp.name, 0) + 1
        seen[exp.name] = count
        if count > 1:
            exp.name = f"{exp.name}#{count}"
    return exps


def combine(experiments: Sequence[Experiment]) -> pd.DataFrame:
    """One frame for several experiments, with an ``experiment`` column when there are several."""
    if len(experiments) == 1:
        return experiments[0].trials
    frames = [e.trials.assign(experiment=e.name) for e in experiments]
    return _coerce(pd.concat([f for f in frames], ignore_index=True))


def load_results(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                 include_running: bool = True) -> pd.DataFrame:
    """One row per trial of one or more experiment folders (local paths or storage URIs).

    Columns: ``trial_id``, ``status`` (completed / stopped / failed / rejected / running),
    ``val_acc`` (fraction), ``flops`` (MACs), ``flops_ratio``, ``params``, ``params_ratio``,
    ``epochs``, ``time_s``, ``node``, ``error``, ``started``, ``ended`` (unix time),
    ``rate_00`` ... (one per unit), ``test_acc`` (retrained configuration, else NaN),
    ``pick`` (its retrain pick name), ``paper_rate`` (the paper's uniform vector this
    trial ran, from the record or by equality with the manifest's ``paper_rates``),
    ``val_acc_sketched`` (accuracy right after sketching, before fine-tuning),
    ``stop_reason``, ``optuna_number``, ``val_source`` (``train_holdout``: ``val_acc`` is
    on the validation split held out of the training split; ``test_holdout``: on
    held-out test images), ``test_images`` (how many test images ``test_acc`` was
    measured on: with ``test_holdout``, only those no choice saw), and ``experiment``
    when several folders are given.
    A half-written line of ``trials.jsonl`` is skipped with a :class:`ResultsWarning`.
    """
    return combine(load_experiments(paths, include_running=include_running))


# ---------------------------------------------------------------- rate vectors


def rates_of(row: pd.Series) -> list[float]:
    """The rate vector of one row (its ``rate_XX`` values, trailing NaNs dropped)."""
    cols = [c for c in row.index if isinstance(c, str) and _RATE_RE.match(c)]
    cols.sort(key=lambda c: int(_RATE_RE.match(c).group(1)))
    values = [float(row[c]) for c in cols]
    while values and math.isnan(values[-1]):
        values.pop()
    return values


def format_rate_vector(rates: Sequence[float]) -> str:
    """The original's compact syntax (``[0.5]*9+[0.6]*9``), parsed back exactly by sketch_core."""
    if not rates or any(math.isnan(r) for r in rates):
        return ""
    from sketch_core.rates import format_rates  # heavy: torch; analyze stays torch-free

    return format_rates([float(r) for r in rates])


# ---------------------------------------------------------------- front and hypervolume


def _floats(column: pd.Series) -> np.ndarray:
    """A numeric column as float64, missing values (NaN, pd.NA) as NaN."""
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _cost_column(df: pd.DataFrame) -> str:
    return "flops" if df["flops"].notna().all() else "flops_ratio"


def cost_axis_of(manifest: dict | None, df: pd.DataFrame | None = None) -> str:
    """The cost axis a manifest records (``flops`` when it records none, or when its
    trials carry no latency)."""
    axis = (manifest or {}).get("cost_axis") or "flops"
    if axis == "latency" and df is not None and ("latency_ms" not in df.columns
                                                 or df["latency_ms"].isna().all()):
        return "flops"
    return axis if axis in COST_COLUMNS else "flops"


def experiment_fronts(experiments: Sequence[Experiment]) -> pd.DataFrame:
    """Each experiment's Pareto front on its own cost axis (FLOPs, or predicted latency
    for a search that priced by latency), concatenated as :func:`combine` stacks their
    trials (with an ``experiment`` column when there are several)."""
    if len(experiments) == 1:
        e = experiments[0]
        return pareto_front(e.trials, cost=e.cost_axis)
    parts = [pareto_front(e.trials.assign(experiment=e.name), per_experiment=False,
                          cost=e.cost_axis) for e in experiments]
    return _coerce(pd.concat(parts, ignore_index=True))


def _completed(df: pd.DataFrame, cost: str | None = None) -> pd.DataFrame:
    """The rows :func:`search.results.record.scored_mask` keeps (``cost``: the cost
    column; by default MACs, or their ratio where MACs are missing)."""
    done = df[df["status"] == "completed"]
    cost = cost or ("flops" if done["flops"].notna().all() else "flops_ratio")
    return df[scored_mask(df["status"].tolist(), _floats(df["val_acc"]), _floats(df[cost]))]


def pareto_front(df: pd.DataFrame, *, per_experiment: bool = True,
                 cost: str = "flops") -> pd.DataFrame:
    """Non-dominated completed trials over (``val_acc`` max, ``flops`` min), sorted by FLOPs.

    ``cost="latency"``: over (``val_acc`` max, ``latency_ms`` min), the predicted latency
    of a search whose cost axis is latency.

    With an ``experiment`` column and ``per_experiment``, one front per experiment
    (concatenated); otherwise one front over all rows. FLOPs are compared in MACs
    (``flops``), or as ``flops_ratio`` where MACs are missing. The rule is that of
    :mod:`search.results.pareto`: a trial is on the front unless another is at least as good in
    both and better in one, so trials with the very same (val_acc, FLOPs) are all on it,
    in the order they appear in ``df``.
    """
    if per_experiment and "experiment" in df.columns and df["experiment"].nunique() > 1:
        parts = [pareto_front(g, per_experiment=False, cost=cost)
                 for _, g in df.groupby("experiment", sort=False)]
        return pd.concat(parts) if parts else df.iloc[0:0]
    col = "latency_ms" if cost == "latency" else None
    done = _completed(df, col)
    if done.empty:
        return done
    col = col or _cost_column(done)
    return done.iloc[front_indices(done["val_acc"].to_numpy(float), _floats(done[col]))]


def _hv(loss: np.ndarray, ref: np.ndarray) -> float:
    return hypervolume_of_loss(loss, ref)


def _hv_loss(df: pd.DataFrame, ref: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    done = _completed(df, "flops_ratio")
    loss = np.column_stack([-done["val_acc"].to_numpy(float), done["flops_ratio"].to_numpy(float)])
    return loss, np.array([-float(ref[0]), float(ref[1])])


def hypervolume(df: pd.DataFrame, ref: tuple[float, float] = (0.0, 1.0)) -> float:
    """Area dominated by the completed trials in (val_acc max, flops_ratio min), bounded by ``ref``.

    ``ref`` is (accuracy, FLOPs ratio): by default accuracy 0 and the unpruned FLOPs,
    so the value lies in [0, 1] (1 = 100 % accuracy at no FLOPs). Trials worse than the
    reference point in either objective add nothing. Computed by the exact
    hypervolume (:func:`search.results.pareto.hypervolume_of_loss`) on (-val_acc, flops_ratio).
    """
    loss, ref_loss = _hv_loss(df, ref)
    return _hv(loss, ref_loss)


def hypervolume_history(df: pd.DataFrame, ref: tuple[float, float] = (0.0, 1.0)) -> pd.DataFrame:
    """Hypervolume and best validation accuracy after each ended trial (in the order they ended).

    Columns: ``trial`` (1, 2, ... counting every ended trial, whatever its status),
    ``trial_id``, ``hypervolume``, ``best_val_acc`` (completed trials so far).
    """
    ended = df[df["status"].isin(ENDED_STATUSES)]
    if "ended" in ended.columns and ended["ended"].notna().any():
        ended = ended.sort_values("ended", kind="stable", na_position="last")
    acc = ended["val_acc"].to_numpy(float)
    ratio = ended["flops_ratio"].to_numpy(float)
    ok = scored_mask(ended["status"].tolist(), acc, ratio)
    ref_loss = np.array([-float(ref[0]), float(ref[1])])
    hv = np.zeros(len(ended))
    best = np.full(len(ended), np.nan)
    front = np.empty((0, 2))
    current, best_acc = 0.0, -math.inf
    for i in range(len(ended)):
        if ok[i]:
            best_acc = max(best_acc, acc[i])
            p = np.array([-acc[i], ratio[i]])
            grown = np.vstack([front, p])
            on = front_mask(grown)
            # a new point on the front (not a copy of one there) changes the hypervolume
            if np.all(p <= ref_loss) and on[-1] and not np.any(np.all(front == p, axis=1)):
                front = grown[on]
                current = _hv(front, ref_loss)
        hv[i] = current
        best[i] = best_acc if best_acc > -math.inf else np.nan
    return pd.DataFrame({"trial": np.arange(1, len(ended) + 1), "trial_id": ended["trial_id"].to_numpy(),
                         "hypervolume": hv, "best_val_acc": best})


# ---------------------------------------------------------------- sensitivity


def _residual(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``y`` less its least-squares line on ``x``."""
    xc = x - x.mean()
    denom = float(xc @ xc)
    beta = float(xc @ (y - y.mean())) / denom if denom > 0 else 0.0
    return (y - y.mean()) - beta * xc


def _partial_spearman(done: pd.DataFrame, rcols: list[str], ccol: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Each rate column's partial Spearman correlation with ``val_acc`` given ``ccol``,
    and its two-sided p-value (NaN with fewer than 5 trials)."""
    n = len(done)
    rho = np.full(len(rcols), np.nan)
    if n < 5 or not rcols:
        return rho, np.full(len(rcols), np.nan)
    f = done[ccol].rank().to_numpy(float)
    a = _residual(done["val_acc"].rank().to_numpy(float), f)
    ranks = done[rcols].rank().to_numpy(float)
    for j in range(len(rcols)):
        r = _residual(ranks[:, j], f)
        denom = math.sqrt(float(r @ r) * float(a @ a))
        if denom > 1e-12:
            rho[j] = float(np.clip((r @ a) / denom, -1.0, 1.0))
    from scipy.special import stdtr  # heavy: scipy; Student's t CDF (scipy.stats takes seconds)

    dof = n - 3
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rho * np.sqrt(dof / np.maximum(1e-300, 1.0 - rho ** 2))
    return rho, np.where(np.isnan(rho), np.nan, 2 * stdtr(dof, -np.abs(np.nan_to_num(t))))


def layer_sensitivity(df: pd.DataFrame, unit_names: Sequence[str] | None = None,
                      cost: str = "flops") -> pd.DataFrame:
    """How much each unit's rate matters for accuracy at equal FLOPs (``cost="latency"``:
    at equal predicted latency, ``latency_ratio`` in place of ``flops_ratio`` below).

    For every rate column, the partial Spearman correlation between the rate and
    ``val_acc`` controlling for ``flops_ratio``, over completed trials: all three are
    rank-transformed, the ranks of the rate and of the accuracy are each regressed
    linearly on the rank of the FLOPs ratio, and the two residuals are correlated.
    FLOPs are almost a function of the rates, so a plain correlation would mostly say
    "more filters, more accuracy"; holding FLOPs fixed asks instead "at the same
    cost, do trials that keep more of *this* layer do better?". A large positive value
    marks a sensitive layer (keep it wide); a value near zero or negative marks a layer
    that can be sketched hard (its FLOPs are better spent elsewhere).

    Columns: ``rate`` (column name), ``unit`` (index), ``unit_name`` (from the manifest,
    when given or in ``df.attrs`` as :func:`load_results` leaves them), ``partial_spearman``, ``p_value`` (two-sided t-test with n - 3 degrees
    of freedom), ``n`` (trials used), ``mean_rate`` (all completed trials) and
    ``front_mean_rate`` (trials on the Pareto front). Needs at least 5 trials, else NaN.
    """
    rcols = rate_columns(df)
    axis = "latency" if cost == "latency" and "latency_ratio" in df.columns else "flops"
    ccol = f"{axis}_ratio"
    done = _completed(df, ccol)
    done = done[done[rcols].notna().all(axis=1)] if rcols else done
    n = len(done)
    names = list(unit_names or (df.attrs.get("manifest") or {}).get("unit_names") or [])
    rho, pval = _partial_spearman(done, rcols, ccol)
    front = pareto_front(done, per_experiment=False, cost=axis) if n else done
    return pd.DataFrame({
        "rate": rcols,
        "unit": np.arange(len(rcols)),
        "unit_name": [names[j] if j < len(names) else f"unit {j}" for j in range(len(rcols))],
        "partial_spearman": rho,
        "p_value": pval,
        "n": n,
        "mean_rate": done[rcols].mean().to_numpy(float) if rcols else [],
        "front_mean_rate": front[rcols].mean().to_numpy(float) if rcols else [],
    })


# ---------------------------------------------------------------- picks


def top_trials(df: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The ``k`` completed trials with the highest validation accuracy (ties: fewer FLOPs first)."""
    done = _completed(df, "flops_ratio")
    return done.sort_values(["val_acc", "flops_ratio"], ascending=[False, True], kind="stable").head(k)


def best_within(df: pd.DataFrame, budget: Budget | str | float, axis: str = "flops"
                ) -> pd.Series | None:
    """The completed trial with the highest ``val_acc`` within ``budget`` (a
    :class:`~search.results.budgets.Budget`, or its text on ``axis``: ``0.5``, ``50%``,
    ``60M`` for FLOPs, ``3ms`` for latency), or None. Ties: lower cost, then the earlier
    row (the rule of :mod:`search.results.pareto`)."""
    if not isinstance(budget, Budget):
        budget = parse_budget(budget, axis, f"--{axis}_budget")
    col = budget.column
    if col not in df.columns or df[col].isna().all():
        if budget.axis == "latency":
            raise UserError("--latency_budget: these trials carry no latency; search with "
                            "objectives [val_acc, latency] or a budget.latency")
        return None
    done = _completed(df, col)
    i = best_index(done["val_acc"].to_numpy(float), _floats(done[col]),
                   max_cost=budget.value * (1 + 1e-12))
    return None if i is None else done.iloc[i]


# ---------------------------------------------------------------- export


def _json_value(v: Any) -> Any:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def export(df: pd.DataFrame, out_dir: str | os.PathLike[str], fmt: str = "csv",
           name: str = "trials") -> Path:
    """Write ``df`` as ``<out_dir>/<name>.<fmt>`` (csv, parquet or json records), atomically.

    :func:`read_export` reads any of them back to an identical frame.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    path = Path(out_dir) / f"{name}.{fmt}"
    if fmt == "csv":
        _atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    elif fmt == "parquet":
        _atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    else:
        def write_json(tmp: str) -> None:
            records = [{c: _json_value(v) for c, v in zip(df.columns, row)}
                       for row in df.itertuples(index=False, name=None)]
            payload = {"columns": [str(c) for c in df.columns],
                       "dtypes": {str(c): str(t) for c, t in df.dtypes.items()}, "records": records}
            Path(tmp).write_text(json.dumps(payload, allow_nan=False) + "\n")

        _atomic_write(path, write_json)
    return path


def read_export(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a file written by :func:`export` back into a frame with the same dtypes."""
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt == "parquet":
        df = pd.read_parquet(path)
    elif fmt == "csv":
        text_cols = [c for c, t in {**_BASE_COLUMNS, **_TAIL_COLUMNS, "experiment": "str",
                                    "unit_name": "str", "rate": "str"}.items() if t == "str"]
        df = pd.read_csv(path, dtype={c: "str" for c in text_cols})
    elif fmt == "json":
        payload = json.loads(path.read_text())
        df = pd.DataFrame.from_records(payload["records"], columns=payload["columns"])
    else:
        raise UserError(f"{path} is not an export (expected .csv, .parquet or .json)")
    if "trial_id" in df.columns and "status" in df.columns:
        return _coerce(df)
    return df
