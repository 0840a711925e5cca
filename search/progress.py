"""The driver's view of a running search: trials.jsonl and one progress line.

:class:`SearchCallback` is a Ray Tune ``Callback`` living in the driver. When a trial
ends it appends the trial's record to ``trials.jsonl`` (completed / stopped / failed;
rejected ones are written by the searcher, which never starts them), and it prints a
short status line: trials done, running, stopped, failed, rejected, the size of the
current Pareto front, the best validation accuracy within the FLOPs budget and the
time left. Ray's own table stays off (``verbose=0``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from search.config import format_duration
from search.picks import pareto_records
from search.records import TrialLog, read_records
from search.trial_status import trial_record, trial_status

__all__ = ["SearchCallback", "record_from_trial", "status_line"]

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
                      started: float | None) -> dict:
    """The trials.jsonl record of an ended Tune trial."""
    res = dict(trial.last_result or {})
    now = time.time()
    started = started or getattr(trial.run_metadata, "start_time", None) or now
    status, error = trial_status(res, errored, full_epochs)
    if errored:
        error = _last_error_line(trial)
    return trial_record(trial.trial_id, res, dict(trial.config or {}), status, error, started,
                        stop_reason, ended=now)


def status_line(records: list[dict], running: int, flops_budget: float | None,
                time_left: float | None, num_samples: int | None) -> str:
    counts = {"completed": 0, "stopped": 0, "failed": 0, "rejected": 0}
    for r in records:
        counts[r.get("status", "failed")] = counts.get(r.get("status", "failed"), 0) + 1
    done = counts["completed"] + counts["stopped"] + counts["failed"]
    front = pareto_records(records)
    fit = [r for r in records if r.get("status") == "completed" and r.get("val_acc") is not None
           and (flops_budget is None or (r.get("flops_ratio") or 2) <= flops_budget)]
    best = max(fit, key=lambda r: r["val_acc"]) if fit else None
    where = f"FLOPs<={flops_budget:g}" if flops_budget is not None else "any FLOPs"
    parts = [f"trials {done}{'/' + str(num_samples) if num_samples else ''} ended "
             f"({counts['completed']} completed, {counts['stopped']} stopped, "
             f"{counts['failed']} failed, {counts['rejected']} rejected), {running} running",
             f"Pareto front {len(front)}",
             (f"best val acc at {where}: {100 * best['val_acc']:.2f}% "
              f"(FLOPs {100 * best['flops_ratio']:.1f}%)") if best else f"best at {where}: -"]
    if time_left is not None:
        parts.append(f"{format_duration(time_left)} left")
    return "[search] " + " | ".join(parts)


class SearchCallback(Callback):
    """Writes trials.jsonl as trials end and prints the search's progress."""

    def __init__(self, trials_path: str, full_epochs: int, num_samples: int | None = None,
                 time_budget_s: float | None = None, flops_budget: float | None = None,
                 quiet: bool = False) -> None:
        self.log = TrialLog(trials_path)
        self.full_epochs = full_epochs
        self.num_samples = num_samples
        self.time_budget_s = time_budget_s
        self.flops_budget = flops_budget
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

    # ------------------------------------------------------------------ helpers

    def _time_left(self) -> float | None:
        if self.time_budget_s is None or self._t0 is None:
            return None
        return max(0.0, self._t0 + self.time_budget_s - time.time())

    def _end(self, trials: list, trial: Any, errored: bool) -> None:
        left = self._time_left()
        reason = "budget" if left is not None and left <= 1.0 else "asha"
        rec = record_from_trial(trial, self.full_epochs, errored, reason,
                                self._started.get(trial.trial_id))
        self.log.append(rec)
        self._print(trials)

    def _print(self, trials: list, force: bool = False) -> None:
        if self.quiet:
            return
        running = sum(1 for t in trials if t.status == "RUNNING")
        records = read_records(self.log.path, warn=False)
        line = status_line(records, running, self.flops_budget, self._time_left(),
                           self.num_samples)
        if line != self._last_line or force:
            print(line, file=self.stream or sys.stdout, flush=True)
            self._last_line = line
            self._last_print = time.time()
