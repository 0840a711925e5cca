"""The Optuna side of the search: sampler choice, FLOPs budget, honest trial states.

:class:`SketchSearch` is Ray Tune's ``OptunaSearch`` (multi-objective: max
``val_acc``, min ``flops``; define-by-run :class:`~search.space.RateSpace`) with four
changes:

- it counts trials itself and says ``FINISHED`` at ``num_samples`` (so a resumed
  search ends at the total asked, whatever Tune's own counter saw);
- every proposal is priced before it runs; above ``flops_budget`` it is either
  *rejected* (told to Optuna as an infeasible result through a constraint, so the
  sampler learns the boundary; logged as ``rejected`` in trials.jsonl; never trained)
  or *repaired* (shrunk onto the budget; the proposal is closed and the repaired
  vector enqueued, so Optuna is told exactly the vector that was trained);
- a trial that did not run its full schedule (stopped by ASHA or the time budget) is
  told as PRUNED, not as COMPLETE with its early scores; a failed one as FAIL;
- :meth:`reconcile` squares the study with a restored Tune experiment (``--resume``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.records import TrialLog
from search.space import RateSpace

__all__ = ["SketchSearch", "SQLiteStorage", "make_sampler", "population_size", "FlopsConstraint",
           "close_unstarted", "outcome", "METRICS", "MODES"]

log = logging.getLogger("sketchtune.search")

METRICS = ["val_acc", "flops"]
MODES = ["max", "min"]
MAX_REJECTIONS = 500  # proposals in a row above the budget before falling back to repair


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage on a local SQLite file, in WAL mode with ``synchronous=NORMAL``.

    A commit then waits for no disk flush: measured here, an ask/suggest/tell cycle of a
    9-rate trial took 0.19 s with SQLite's defaults and 0.03 s this way. A killed process
    loses nothing (the log is in the OS's hands); a power cut may lose the last commits.
    Picklable like its parent (Ray Tune saves the searcher with it).
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._tune()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._tune()

    def _tune(self) -> None:
        import sqlalchemy

        sqlalchemy.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.engine.dispose()  # connections opened before the listener are dropped


class FlopsConstraint:
    """Optuna constraint (<= 0 is feasible): flops_ratio - budget, from the trial's attrs."""

    def __call__(self, trial: optuna.trial.FrozenTrial) -> list[float]:
        return [float(trial.user_attrs.get("constraint", 0.0))]


_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5


def _constrain(trial: optuna.Trial, value: float) -> None:
    """Record ``flops_ratio - budget`` (<= 0 feasible) where the sampler reads it."""
    trial.set_user_attr("constraint", value)
    if _HAS_SET_CONSTRAINT:
        trial.set_constraint("flops_budget", value)


def population_size(num_samples: int | None, requested: int | None = None) -> int:
    """NSGA-II population sized to the trial budget: about a quarter of it, 4..50."""
    if requested:
        return requested
    if not num_samples:
        return 20
    return int(min(50, max(4, round(num_samples / 4))))


def make_sampler(name: str, seed: int = 0, num_samples: int | None = None,
                 population: int | None = None, constrained: bool = False
                 ) -> optuna.samplers.BaseSampler:
    """``nsga2`` (default), ``tpe`` or ``random``, seeded; constrained when a budget is set."""
    # Optuna 5 reads constraints set on the trial; older versions need constraints_func
    cons = FlopsConstraint() if constrained and not _HAS_SET_CONSTRAINT else None
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size(num_samples, population),
                                             seed=seed, constraints_func=cons)
    if name == "tpe":
        startup = max(4, min(10, (num_samples or 40) // 4))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                          multivariate=True, constraints_func=cons)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


class SketchSearch(OptunaSearch):
    """OptunaSearch with a trial count, a FLOPs budget and PRUNED for early stops."""

    def __init__(self, space: RateSpace, *, sampler: optuna.samplers.BaseSampler,
                 storage: optuna.storages.BaseStorage | None, study_name: str,
                 full_epochs: int, num_samples: int | None = None,
                 flops_budget: float | None = None, flops_policy: str = "reject",
                 points: list[tuple[str, dict]] | None = None,
                 anchors: list[tuple[str, dict]] | None = None,
                 trial_log: TrialLog | None = None) -> None:
        self._num_samples = num_samples
        self._full_epochs = full_epochs
        self._flops_budget = flops_budget
        self._flops_policy = flops_policy
        self._trial_log = trial_log
        self._n_started = 0
        super().__init__(space=space, metric=list(METRICS), mode=list(MODES), sampler=sampler,
                         study_name=study_name, storage=storage)
        for text, params in points or []:  # the paper's vectors run first
            self._ot_study.enqueue_trial(params, user_attrs={"paper_rates": text},
                                         skip_if_exists=True)
        for text, params in anchors or []:  # then uniform vectors across the FLOPs range
            self._ot_study.enqueue_trial(params, user_attrs={"anchor": text},
                                         skip_if_exists=True)

    # ------------------------------------------------------------------ state

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    @property
    def started(self) -> int:
        return self._n_started

    # ------------------------------------------------------------------ proposals

    def _record_rejection(self, ot_trial: optuna.Trial, rates: list[float], cost: Any,
                          why: str) -> None:
        if self._trial_log is None:
            return
        now = time.time()
        self._trial_log.append({
            "trial_id": f"rejected_{ot_trial.number:05d}", "status": "rejected",
            "rates": rates, "widths": list(cost.widths), "val_acc": None, "flops": cost.flops,
            "flops_ratio": cost.flops_ratio, "params": cost.params,
            "params_ratio": cost.params_ratio, "epochs": 0, "time_s": 0.0, "node": None,
            "error": why, "started": now, "ended": now, "optuna_number": ot_trial.number})

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._num_samples is not None and self._n_started >= self._num_samples:
            return Searcher.FINISHED
        space: RateSpace = self._space
        budget = self._flops_budget
        for attempt in range(MAX_REJECTIONS + 1):
            ot_trial = self._ot_study.ask()
            params = self._suggest_from_define_by_run_func(space, ot_trial)
            rates = list(params["rates"])
            cost = space.cost(rates)
            over = budget is not None and cost.flops_ratio > budget + 1e-12
            if over and (self._flops_policy == "repair" or attempt == MAX_REJECTIONS):
                fixed = space.repair(rates, budget)
                fixed_params = space.params_from_rates(fixed) if fixed is not None else None
                if fixed_params is not None:
                    ot_trial.set_user_attr("status", "repaired")
                    self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                    self._ot_study.enqueue_trial(
                        fixed_params, user_attrs={"proposed_rates": rates,
                                                  "repaired_from": ot_trial.number})
                    continue
            if over:
                why = (f"flops_ratio {cost.flops_ratio:.4f} above flops_budget {budget}")
                _constrain(ot_trial, cost.flops_ratio - budget)
                ot_trial.set_user_attr("status", "rejected")
                ot_trial.set_user_attr("flops_ratio", cost.flops_ratio)
                self._ot_study.tell(ot_trial, [0.0, float(cost.flops)], state=TrialState.COMPLETE)
                self._record_rejection(ot_trial, rates, cost, why)
                continue
            if budget is not None:
                _constrain(ot_trial, cost.flops_ratio - budget)
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            ot_trial.set_user_attr("flops_ratio", cost.flops_ratio)
            self._ot_trials[trial_id] = ot_trial
            self._n_started += 1
            config = dict(params)
            frozen = ot_trial.study._storage.get_trial(ot_trial._trial_id)
            if "proposed_rates" in frozen.user_attrs:
                config["proposed_rates"] = frozen.user_attrs["proposed_rates"]
            if "paper_rates" in frozen.user_attrs:
                config["paper_rates"] = frozen.user_attrs["paper_rates"]
            if "anchor" in frozen.user_attrs:
                config["anchor"] = frozen.user_attrs["anchor"]
            config["optuna_number"] = ot_trial.number
            return config
        return None  # unreachable: the last attempt always repairs or runs

    # ------------------------------------------------------------------ results

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # multi-objective: nothing to report per step

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        self._completed_trials.add(trial_id)
        state, values, attrs = outcome(result, error, self._full_epochs)
        storage = self._ot_study._storage
        try:
            for key, value in attrs.items():
                storage.set_trial_user_attr(ot_trial._trial_id, key, value)
            self._ot_study.tell(ot_trial, values, state=state)
        except Exception as exc:  # already finished (a resumed trial reported twice)
            log.debug("trial %s: not told again to Optuna (%s)", trial_id, exc)

    # ------------------------------------------------------------------ resume

    def restore(self, checkpoint_path: str) -> None:
        """Tune's restore of the pickled searcher, then :meth:`reconcile` with the study.

        The pickle is from Tune's last experiment snapshot, as are the trials Tune will
        continue: those suggested but not completed at that time.
        """
        super().restore(checkpoint_path)
        resumable = set(self._ot_trials) - set(self._completed_trials)
        summary = self.reconcile(resumable)
        log.info("study reconciled with the restored experiment: %s", summary)

    def reconcile(self, resumable: set[str]) -> dict[str, int]:
        """Square the study with a restored Tune experiment.

        ``resumable``: Tune trial ids that Tune will continue. Optuna trials left
        RUNNING by the killed driver that Tune will not continue are closed as FAIL
        (``lost``), so none stays RUNNING and the count of started trials is the number
        of finished plus resumable ones.
        """
        lost = kept = 0
        storage = self._ot_study._storage
        started = 0
        for ft in self._ot_study.get_trials(deepcopy=False):
            tid = ft.user_attrs.get("tune_trial_id")
            if tid is None:
                if ft.state == TrialState.RUNNING:  # asked, never became a Tune trial
                    storage.set_trial_user_attr(ft._trial_id, "status", "lost")
                    storage.set_trial_state_values(ft._trial_id, TrialState.FAIL)
                    lost += 1
                continue
            if ft.state == TrialState.RUNNING:
                if tid in resumable:
                    kept += 1
                    started += 1
                    if tid not in self._ot_trials:
                        self._ot_trials[tid] = optuna.Trial(self._ot_study, ft._trial_id)
                    self._completed_trials.discard(tid)
                else:
                    storage.set_trial_user_attr(ft._trial_id, "status", "lost")
                    storage.set_trial_state_values(ft._trial_id, TrialState.FAIL)
                    lost += 1
            else:
                started += 1
                self._completed_trials.add(tid)
        self._n_started = started
        return {"started": started, "resumable": kept, "lost": lost}


def close_unstarted(study: optuna.Study) -> int:
    """After a search that ended (not interrupted): trials Tune created but never started
    (the time budget ran out first) are closed as FAIL, so none stays RUNNING."""
    n = 0
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(ft._trial_id, "status", "unstarted")
        study._storage.set_trial_state_values(ft._trial_id, TrialState.FAIL)
        n += 1
    return n


def outcome(result: dict | None, error: bool, full_epochs: int
            ) -> tuple[TrialState, list[float] | None, dict]:
    """Optuna state, values and user attrs for a trial that ended with ``result``."""
    if error or not result:
        return TrialState.FAIL, None, {"status": "failed"}
    if result.get("failed"):
        return TrialState.FAIL, None, {"status": "failed", "error": str(result.get("error"))[:500]}
    acc, flops = result.get("val_acc"), result.get("flops")
    if acc is None or flops is None or not math.isfinite(float(acc)):
        return TrialState.FAIL, None, {"status": "failed"}
    epoch = int(result.get("epoch", 0))
    attrs = {"val_acc": float(acc), "epochs": epoch, "flops": int(flops)}
    if epoch < full_epochs:
        attrs["status"] = "stopped"
        return TrialState.PRUNED, None, attrs
    attrs["status"] = "completed"
    return TrialState.COMPLETE, [float(acc), float(flops)], attrs
