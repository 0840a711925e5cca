"""The driver's view of a running search: trials.jsonl and one progress line.

:class:`SearchCallback` is a Ray Tune ``Callback`` living in the driver. When a trial
ends it appends the trial's record to ``trials.jsonl`` (completed / stopped / failed;
rejected ones are written by the searcher, which never starts them), and it prints a
short status line: trials done, running, stopped, failed, rejected, the size of the
current Pareto front, the best validation accuracy within the budgets (FLOPs, latency) and the
time left. Ray's own table stays off (``verbose=0``). At the end of the search it
says which scheduler and sampler ran and, for the (MO-)ASHA schedulers, how many
trials each rung promoted per cost band (:func:`rung_summary`: the ended trials split
into cheap, middle and dear thirds by the cost axis: FLOPs or predicted latency).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from search.experiment.config import COST_SCHEDULERS, format_duration
from search.results.picks import pareto_records
from search.results.trials_file import TrialLog, read_records
from search.results.record import ENDED_STATUSES, TrialRecord, scored, trial_status

__all__ = ["SearchCallback", "record_from_trial", "status_line", "rung_summary", "BANDS"]

HEARTBEAT_S = 20.0


def _last_error_line(trial: Any) -> str:
    try:
        path = trial.error_file
        if path and Path(path).is_file():
            lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
            if lines:
                return lines[-1].strip()[:500]
    except Exception:
        pass
    return "the trial failed (no error message recorded)"


def record_from_trial(trial: Any, full_epochs: int, errored: bool, stop_reason: str,
                      started: float | None) -> TrialRecord:
    """The trials.jsonl record of an ended Tune trial."""
    res = dict(trial.last_result or {})
    now = time.time()
    started = started or getattr(trial.run_metadata, "start_time", None) or now
    status, error = trial_status(res, errored, full_epochs)
    if errored:
        error = _last_error_line(trial)
    return TrialRecord.from_report(trial.trial_id, res, dict(trial.config or {}), status, error,
                                   started, stop_reason, ended=now)


_WORDS = {"flops_ratio": "FLOPs", "latency_ratio": "latency"}


def status_line(records: list[TrialRecord], running: int, budgets: dict[str, float] | None,
                time_left: float | None, num_samples: int | None,
                cost: str = "flops_ratio") -> str:
    """One progress line. ``budgets``: ``{cost ratio column: fraction}``; ``cost``: the
    front's cost axis (``flops_ratio`` or ``latency_ratio``)."""
    budgets = budgets or {}
    counts = {s: 0 for s in ENDED_STATUSES}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    done = counts["completed"] + counts["stopped"] + counts["failed"]
    front = pareto_records(records, cost)
    fit = [r for r in scored(records, cost) if all(
        (r.get(k) if r.get(k) is not None else 2) <= b for k, b in budgets.items())]
    best = max(fit, key=lambda r: r.val_acc) if fit else None
    where = (", ".join(f"{_WORDS.get(k, k)}<={b:g}" for k, b in budgets.items())
             if budgets else "any cost")
    shown = [k for k in dict.fromkeys([cost, *budgets]) if best and best.get(k) is not None]
    at = ", ".join(f"{_WORDS.get(k, k)} {100 * best[k]:.1f}%" for k in shown)
    parts = [f"trials {done}{'/' + str(num_samples) if num_samples else ''} ended "
             f"({counts['completed']} completed, {counts['stopped']} stopped, "
             f"{counts['failed']} failed, {counts['rejected']} rejected), {running} running",
             f"Pareto front {len(front)}",
             (f"best val acc at {where}: {100 * best.val_acc:.2f}% ({at})") if best
             else f"best at {where}: -"]
    if time_left is not None:
        parts.append(f"{format_duration(time_left)} left")
    return "[search] " + " | ".join(parts)


BANDS = ("cheap", "middle", "dear")


def rung_summary(records: list[TrialRecord], rungs: list[int], bands: tuple[str, ...] = BANDS,
                 cost: str = "flops_ratio") -> list[str]:
    """Per rung (epochs, ascending), how many trials of each cost band it promoted.

    A trial reached rung ``m`` when it trained ``m`` epochs and was promoted when it
    trained more; a trial the time budget cut is counted only at the rungs it passed.
    Bands: the completed and stopped trials by cost (``cost``: FLOPs, or
    ``latency_ratio``), in equal parts, cheapest first.
    """
    key = "flops" if cost == "flops_ratio" else cost
    ended = sorted((r for r in records if r.get("status") in ("completed", "stopped")
                    and r.get(key) is not None), key=lambda r: (r[key], str(r["trial_id"])))
    if not ended or not rungs:
        return []
    k = len(bands)
    parts = [ended[len(ended) * i // k: len(ended) * (i + 1) // k] for i in range(k)]
    lines = []
    for m in rungs:
        cells, up_all, at_all = [], 0, 0
        for band, part in zip(bands, parts):
            at = [r for r in part if int(r.get("epochs") or 0) >= m
                  and not (r.get("stop_reason") == "budget" and int(r.get("epochs") or 0) <= m)]
            up = sum(1 for r in at if int(r.get("epochs") or 0) > m)
            cells.append(f"{band} {up}/{len(at)}")
            up_all, at_all = up_all + up, at_all + len(at)
        lines.append(f"[search] rung at epoch {m}: promoted {up_all}/{at_all} "
                     f"({', '.join(cells)})")
    return lines


class SearchCallback(Callback):
    """Writes trials.jsonl as trials end and prints the search's progress."""

    scheduler: str = "asha"  # (class defaults: a callback pickled by an older version)
    sampler: str | None = None
    rungs: tuple[int, ...] = ()
    budgets: dict[str, float] | None = None
    cost: str = "flops_ratio"
    flops_budget: float | None = None  # what a callback pickled before budgets held

    def __init__(self, trials_path: str, full_epochs: int, num_samples: int | None = None,
                 time_budget_s: float | None = None, quiet: bool = False,
                 scheduler: str = "asha", sampler: str | None = None,
                 rungs: list[int] | None = None, budgets: dict[str, float] | None = None,
                 cost: str = "flops_ratio") -> None:
        self.log = TrialLog(trials_path)
        self.scheduler, self.sampler, self.rungs = scheduler, sampler, list(rungs or [])
        self.full_epochs = full_epochs
        self.num_samples = num_samples
        self.time_budget_s = time_budget_s
        self.budgets, self.cost = budgets, cost
        self.quiet = quiet
        self._t0: float | None = None
        self._started: dict[str, float] = {}
        self._last_print = 0.0
        self._last_line = ""
        self.stream: TextIO | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["stream"] = None
        return state

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, **info: Any) -> None:
        self._t0 = time.time()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, errored=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.time() - self._last_print >= HEARTBEAT_S:
            self._print(trials, force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._print(trials, force=True)
        if not self.quiet:
            for line in self.summary():
                print(line, file=self.stream or sys.stdout, flush=True)

    # ------------------------------------------------------------------ helpers

    def summary(self) -> list[str]:
        """The end-of-search lines: scheduler and sampler, then :func:`rung_summary`."""
        if self.rungs:
            how = f"rungs at epoch {', '.join(map(str, self.rungs))}"
        elif self.scheduler == "none":
            how = "no early stopping"
        else:
            how = f"no rung below {self.full_epochs} epoch(s): no early stopping"
        lines = [f"[search] scheduler {self.scheduler} ({how}), sampler {self.sampler or '-'}"]
        return lines + rung_summary(read_records(self.log.path, warn=False), self.rungs,
                                    cost=self.cost)

    def _time_left(self) -> float | None:
        if self.time_budget_s is None or self._t0 is None:
            return None
        return max(0.0, self._t0 + self.time_budget_s - time.time())

    def _end(self, trials: list, trial: Any, errored: bool) -> None:
        left = self._time_left()
        reason = ("budget" if left is not None and left <= 1.0
                  else self.scheduler if self.scheduler in COST_SCHEDULERS else "asha")
        rec = record_from_trial(trial, self.full_epochs, errored, reason,
                                self._started.get(trial.trial_id))
        self.log.append(rec)
        self._print(trials)

    def _print(self, trials: list, force: bool = False) -> None:
        if self.quiet:
            return
        running = sum(1 for t in trials if t.status == "RUNNING")
        records = read_records(self.log.path, warn=False)
        budgets = self.budgets
        if budgets is None and self.flops_budget is not None:  # pickled by an older version
            budgets = {"flops_ratio": float(self.flops_budget)}
        line = status_line(records, running, budgets, self._time_left(), self.num_samples,
                           self.cost)
        if line != self._last_line or force:
            print(line, file=self.stream or sys.stdout, flush=True)
            self._last_line = line
            self._last_print = time.time()
