"""The search on one machine without Ray: ask the study, price, train, tell, record.

:func:`run_local` runs the same proposals (:class:`search.proposer.RateProposer`: the
sampler, the paper's vectors and anchors, FLOPs budget reject / repair) and the same
trial code (:func:`search.trainable.train_trial` with the same
:class:`~search.trainable.TrialSetup`) as ``launch.py search``, in this process or in a
few worker processes, and writes the same experiment folder (manifest.json,
config.yaml, baseline.pt, study.db, trials.jsonl). There is no early stopping here:
each trial runs its full schedule unless the time budget ends it (``stopped``, stop
reason ``budget``), and no retrain. Nothing on this path imports Ray.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import time
from pathlib import Path
from typing import Any, Callable

from search.config import SearchConfig
from search.experiment import experiment_location
from search.prepare import (SearchOutcome, check_folder, finish_manifest, make_setup,
                            open_new_experiment, pct, rate_space, say)
from search.proposer import RateProposer, close_unstarted
from search.records import TrialLog, read_records
from search.sampling import make_sampler
from search.trainable import TrialSetup, train_trial
from search.trial_status import trial_record, trial_status

__all__ = ["run_local", "run_one"]

log = logging.getLogger("sketchtune.search")


class _BudgetOver(BaseException):
    """Raised from the report callback to end a trial when the time budget is spent
    (a BaseException, so that the trial code does not report it as a failure)."""


def run_one(rates: list[float], setup: TrialSetup, baseline: dict, deadline: float | None,
            on_epoch: Callable[[dict], None] | None = None) -> tuple[dict | None, bool]:
    """One trial, start to end: (its last report, whether the time budget ended it)."""
    last: dict | None = None

    def report(metrics: dict, state_file: Path | None) -> None:
        nonlocal last
        last = dict(metrics)
        if on_epoch is not None:
            on_epoch(last)
        more = int(metrics.get("epoch", 0)) < setup.trial.epochs and not metrics.get("failed")
        if more and deadline is not None and time.time() >= deadline:
            raise _BudgetOver

    try:
        train_trial(rates, setup, baseline, report)
    except _BudgetOver:
        return last, True
    return last, False


def run_local(config: SearchConfig, exp_dir: str | Path | None = None, *, workers: int = 1,
              command: str = "", quiet: bool = False,
              on_epoch: Callable[[str, dict], None] | None = None) -> SearchOutcome:
    """The search of ``config`` without Ray, into ``exp_dir`` (a new folder; by default
    where ``launch.py search`` would put it).

    ``workers`` > 1 trains that many trials at a time in worker processes; with one,
    trials run in this process and ``on_epoch(trial_id, metrics)`` sees every epoch's
    report.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if exp_dir is None:
        exp_dir, storage_path, name = experiment_location(config)
    else:
        exp_dir = Path(exp_dir).expanduser().resolve()
        storage_path, name = str(exp_dir.parent), config.storage.name or exp_dir.name
    config, _ = check_folder(config, exp_dir, resume=False)
    t_start = time.time()
    study_storage, _, baseline, state = open_new_experiment(
        config, exp_dir, name, storage_path, None, command, quiet)
    proposer = _proposer(config, exp_dir, name, baseline, study_storage)
    setup = make_setup(config, baseline, {})
    b = config.budget
    say(quiet, f"[local] {name}: {b.num_samples or 'unlimited'} trials"
               f"{', budget ' + b.time if b.time else ''}, sampler {config.sampler.name}, "
               f"{workers} worker(s), no Ray")
    deadline = None if config.time_budget_s is None else time.time() + config.time_budget_s
    loop = _Loop(proposer, setup, state, deadline, TrialLog(exp_dir / "trials.jsonl"), quiet)
    t_search = time.time()
    if workers > 1:
        loop.parallel(workers)
    else:
        loop.serial(on_epoch)
    close_unstarted(proposer.study)
    phases = finish_manifest(exp_dir, time.time() - t_search, False, t_start, command, quiet)
    return SearchOutcome(exp_dir, read_records(exp_dir / "trials.jsonl"), phases, baseline,
                         extra={"runner": "local", "workers": workers})


def _proposer(config: SearchConfig, exp_dir: Path, name: str, baseline: dict,
              study_storage: Any) -> RateProposer:
    b = config.budget
    space = rate_space(config, baseline)
    sampler = make_sampler(config.sampler.name, config.sampler.seed, b.num_samples,
                           config.sampler.population_size,
                           constrained=b.flops_budget is not None)
    return RateProposer(space, sampler=sampler, storage=study_storage, study_name=name,
                        full_epochs=config.trial.epochs, num_samples=b.num_samples,
                        flops_budget=b.flops_budget, flops_policy=b.flops_policy,
                        points=space.paper_points(config.space.paper_rates),
                        anchors=space.uniform_points(config.sampler.anchors),
                        trial_log=TrialLog(exp_dir / "trials.jsonl"))


class _Loop:
    """Ask, train, tell and record, one trial at a time or a few in worker processes."""

    def __init__(self, proposer: RateProposer, setup: TrialSetup, state: dict,
                 deadline: float | None, trial_log: TrialLog, quiet: bool) -> None:
        self.proposer, self.setup, self.state = proposer, setup, state
        self.deadline, self.log, self.quiet = deadline, trial_log, quiet
        self.count = 0  # trials asked
        self.ended = 0

    def _next(self) -> tuple[str, dict] | None:
        if self.deadline is not None and time.time() >= self.deadline:
            return None
        key = f"local_{self.count:05d}"
        config = self.proposer.ask(key)
        if config is None:
            return None
        self.count += 1
        return key, config

    def _end(self, key: str, config: dict, started: float, last: dict | None,
             budget_ended: bool, error: str | None = None) -> None:
        status, message = trial_status(last, error is not None, self.setup.trial.epochs)
        record = trial_record(key, last or {}, config, status, error or message, started,
                              "budget" if budget_ended else None)
        self.log.append(record)
        self.proposer.tell(key, last, error is not None)
        self.ended += 1
        total = self.proposer.num_samples
        say(self.quiet, f"[local] trial {key} ({self.ended}{'/' + str(total) if total else ''})"
                        f" {status}: val acc {pct(record['val_acc'])}, FLOPs "
                        f"{pct(record['flops_ratio'])}, {record['epochs']} epoch(s)")

    def serial(self, on_epoch: Callable[[str, dict], None] | None) -> None:
        while (nxt := self._next()) is not None:
            key, config = nxt
            started = time.time()
            hook = None if on_epoch is None else (lambda m, k=key: on_epoch(k, m))
            last, budget_ended = run_one(config["rates"], self.setup, self.state,
                                         self.deadline, hook)
            self._end(key, config, started, last, budget_ended)

    def parallel(self, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # no forked torch threads
        running: dict[cf.Future, tuple[str, dict, float]] = {}
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            while True:
                while len(running) < workers and (nxt := self._next()) is not None:
                    key, config = nxt
                    try:
                        future = pool.submit(run_one, config["rates"], self.setup, self.state,
                                             self.deadline)
                    except Exception as exc:  # the pool broke: no trial runs any more
                        self._end(key, config, time.time(), None, False,
                                  f"{type(exc).__name__}: {exc}")
                        raise
                    running[future] = (key, config, time.time())
                if not running:
                    return
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    key, config, started = running.pop(future)
                    try:
                        last, budget_ended = future.result()
                    except Exception as exc:  # the worker process died
                        self._end(key, config, started, None, False,
                                  f"{type(exc).__name__}: {exc}")
                    else:
                        self._end(key, config, started, last, budget_ended)
