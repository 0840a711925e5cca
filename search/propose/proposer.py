"""Rate vectors from an Optuna study, priced and told back honestly; no Ray here.

:class:`RateProposer` owns an :class:`optuna.Study` and talks to it through
``ask`` / ``tell`` / ``enqueue_trial`` only. Whatever runs the trials (Ray Tune
through :class:`search.run.tune_searcher.SketchSearch`, or the plain loop of
:mod:`search.run.local_loop`) asks it for a trial's config and tells it how the trial ended:

- it counts trials itself and has nothing more to propose at ``num_samples`` (so a
  resumed search ends at the total asked);
- the paper's vectors are enqueued first, then uniform anchors across the FLOPs range;
- a proposal whose widths are those of a trial already handed out (running, ended or
  failed; rates that round to the same widths are one network) is closed as FAIL,
  status ``repeat`` (FAIL: no sampler reads it as a result, nor TPE as a poor one), and
  the sampler asked again, so no network trains twice (after ``MAX_REPEATS`` in a row
  the repeat runs);
- every proposal is priced before it runs (FLOPs, and latency when the space has a
  latency table); above a budget (``budgets``: ``flops_ratio``, ``latency_ratio``) it is either
  *rejected* (told to Optuna as an infeasible result through a constraint, so the
  sampler learns the boundary; logged as ``rejected`` in trials.jsonl; never trained)
  or *repaired* (shrunk onto the budget; the proposal is closed and the repaired
  vector enqueued, so Optuna is told exactly the vector that was trained);
- a trial that did not run its full schedule (stopped early) is told as PRUNED, not as
  COMPLETE with its early scores; a failed one as FAIL (:func:`outcome`, which applies
  :func:`search.results.record.trial_status`); each epoch's score is kept beside the trial
  (:meth:`RateProposer.note`) for a sampler that learns from stopped trials;
- :meth:`RateProposer.reconcile` squares the study with the trials a resumed run will
  continue, and :func:`close_unstarted` closes what a finished search left RUNNING.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from search.propose.optuna_compat import close_running, trial_handle
from search.results.record import TrialRecord, trial_status
from search.results.trials_file import TrialLog
from search.propose.study import constrain, open_study
from search.propose.space import RateSpace
from search.propose.samplers.surrogate import rung_key

__all__ = ["RateProposer", "outcome", "objective_values", "OBJECTIVE_COLUMNS", "close_unstarted", "MAX_REJECTIONS"]

log = logging.getLogger("sketchtune.search")

MAX_REJECTIONS = 500  # proposals in a row above the budget before falling back to repair
MAX_REPEATS = 32  # proposals in a row of an already trained network before one runs again
_CONFIG_ATTRS = ("proposed_rates", "paper_rates", "anchor")  # enqueued attrs the trial sees


OBJECTIVE_COLUMNS = {"flops": "flops", "latency": "latency_ms"}  # objective -> cost column


def objective_values(acc: float, cost: Any, objectives: Sequence[str]) -> list[float]:
    """The values Optuna is told: accuracy, then each cost objective (MACs, ms)."""
    out = [float(acc)]
    for name in objectives[1:]:
        value = cost.value(OBJECTIVE_COLUMNS[name])
        if value is None:
            raise ValueError(f"objective {name!r} needs a latency table in the rate space")
        out.append(float(value))
    return out


def outcome(result: dict | None, error: bool, full_epochs: int,
            objectives: Sequence[str] = ("val_acc", "flops"), cost: Any = None
            ) -> tuple[TrialState, list[float] | None, dict]:
    """Optuna state, values and user attrs for a trial that ended with ``result``
    (``cost``: its :class:`~search.propose.space.Cost`, needed for a latency objective)."""
    status, message = trial_status(result, error, full_epochs)
    if status == "failed":
        attrs: dict[str, Any] = {"status": "failed"}
        if not error and result and result.get("failed"):
            attrs["error"] = str(message)[:500]
        return TrialState.FAIL, None, attrs
    acc, flops, epoch = float(result["val_acc"]), int(result["flops"]), int(result.get("epoch", 0))
    attrs = {"val_acc": acc, "epochs": epoch, "flops": flops, "status": status}
    if status == "stopped":
        return TrialState.PRUNED, None, attrs
    if list(objectives) == ["val_acc", "flops"]:
        return TrialState.COMPLETE, [acc, float(flops)], attrs
    return TrialState.COMPLETE, objective_values(acc, cost, objectives), attrs


def close_unstarted(study: optuna.Study) -> int:
    """After a search that ended (not interrupted): trials created but never started
    (the time budget ran out first) are closed as FAIL, so none stays RUNNING."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for ft in running:
        close_running(study, ft.number, "unstarted")
    return len(running)


class RateProposer:
    """Asks the study for priced rate vectors and tells it how each trial ended.

    Trials are named by the caller's key (a Ray Tune trial id, or the local loop's),
    stored in the study as user attr ``tune_trial_id``. Picklable: the study is
    reopened from ``storage`` and ``study_name`` after unpickling.
    """

    def __init__(self, space: RateSpace, *, sampler: optuna.samplers.BaseSampler,
                 storage: optuna.storages.BaseStorage | str | None, study_name: str,
                 full_epochs: int, num_samples: int | None = None,
                 flops_budget: float | None = None, flops_policy: str = "reject",
                 points: list[tuple[str, dict]] | None = None,
                 anchors: list[tuple[str, dict]] | None = None,
                 trial_log: TrialLog | None = None,
                 budgets: dict[str, float] | None = None,
                 objectives: Sequence[str] = ("val_acc", "flops")) -> None:
        self.space = space
        self.sampler = sampler
        self.storage = storage
        self.study_name = study_name
        self.full_epochs = full_epochs
        self.num_samples = num_samples
        self.budgets = dict(budgets or {})  # {cost key: fraction}: flops_ratio, latency_ratio
        if flops_budget is not None:
            self.budgets.setdefault("flops_ratio", float(flops_budget))
        self.flops_budget = self.budgets.get("flops_ratio")
        self.flops_policy = flops_policy
        self.objectives = list(objectives)
        self.trial_log = trial_log
        self.started = 0
        self._open: dict[str, int] = {}       # key -> Optuna trial number, once asked
        self._done: set[str] = set()          # keys told
        self._study: optuna.Study | None = None
        self._handles: dict[str, optuna.Trial] = {}
        self._trained: set[tuple[int, ...]] | None = None  # widths handed out; from the study
        for text, params in points or []:  # the paper's vectors run first
            self.study.enqueue_trial(params, user_attrs={"paper_rates": text},
                                     skip_if_exists=True)
        for text, params in anchors or []:  # then uniform vectors across the FLOPs range
            self.study.enqueue_trial(params, user_attrs={"anchor": text}, skip_if_exists=True)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_study"] = None
        state["_handles"] = {}
        state["_trained"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("objectives", ["val_acc", "flops"])  # pickled before latency existed
        state.setdefault("_trained", None)
        fb = state.get("flops_budget")
        state.setdefault("budgets", {} if fb is None else {"flops_ratio": fb})
        self.__dict__.update(state)

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.storage, self.study_name, self.sampler,
                                     self.objectives)
        return self._study

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """What a resumed driver needs: counts, open trials, told trials, the sampler."""
        return {"started": self.started, "open": dict(self._open), "done": sorted(self._done),
                "sampler": self.sampler}

    def load_state_dict(self, state: dict) -> None:
        self.started = int(state["started"])
        self._open = dict(state["open"])
        self._done = set(state["done"])
        self.sampler = state.get("sampler", self.sampler)
        self._study = None
        self._handles = {}
        self._trained = None

    def unfinished(self) -> set[str]:
        """Keys asked and not told yet."""
        return set(self._open) - self._done

    # ------------------------------------------------------------------ proposals

    @staticmethod
    def _price_attrs(trial: optuna.Trial, cost: Any) -> None:
        trial.set_user_attr("flops_ratio", cost.flops_ratio)
        if cost.latency_ms is not None:
            trial.set_user_attr("latency_ms", cost.latency_ms)
            trial.set_user_attr("latency_ratio", cost.latency_ratio)

    def _record_rejection(self, trial: optuna.Trial, rates: list[float], cost: Any,
                          why: str) -> None:
        if self.trial_log is None:
            return
        now = time.time()
        self.trial_log.append(TrialRecord(
            trial_id=f"rejected_{trial.number:05d}", status="rejected", rates=rates,
            widths=list(cost.widths), flops=cost.flops, flops_ratio=cost.flops_ratio,
            params=cost.params, params_ratio=cost.params_ratio, latency_ms=cost.latency_ms,
            latency_ratio=cost.latency_ratio, time_s=0.0, error=why, started=now, ended=now,
            optuna_number=trial.number))

    def _handed_out(self) -> set[tuple[int, ...]]:
        """Widths of every trial handed out to run (the study's, read once, then kept)."""
        if self._trained is None:
            space, seen = self.space, set()
            for ft in self.study.get_trials(deepcopy=False):
                if "tune_trial_id" not in ft.user_attrs or ft.user_attrs.get("status") in (
                        "lost", "unstarted"):  # never ran
                    continue
                try:
                    seen.add(tuple(space.widths(space.rates_from_params(ft.params))))
                except (KeyError, ValueError):  # params of another space
                    continue
            self._trained = seen
        return self._trained

    def ask(self, key: str) -> dict | None:
        """The config of trial ``key`` (``rates`` and where they came from); None at
        ``num_samples``."""
        if self.num_samples is not None and self.started >= self.num_samples:
            return None
        study, space, budgets = self.study, self.space, self.budgets
        rejections = repeats = 0  # past MAX_REJECTIONS a repaired vector runs
        for _ in range(MAX_REJECTIONS + 2 * MAX_REPEATS + 2):
            trial = study.ask()
            params = space(trial)
            rates = list(params["rates"])
            cost = space.cost(rates)
            over = space.overruns(cost, budgets)
            if over and (self.flops_policy == "repair" or rejections >= MAX_REJECTIONS):
                fixed = space.repair(rates, budgets)
                fixed_params = space.params_from_rates(fixed) if fixed is not None else None
                if fixed_params is not None:
                    trial.set_user_attr("status", "repaired")
                    study.tell(trial, state=TrialState.PRUNED)
                    study.enqueue_trial(fixed_params, user_attrs={
                        "proposed_rates": rates, "repaired_from": trial.number})
                    continue
            if budgets:
                constrain(trial, space.violation(cost, budgets),
                          "flops_budget" if list(budgets) == ["flops_ratio"] else "budget")
            self._price_attrs(trial, cost)
            if over:
                trial.set_user_attr("status", "rejected")
                study.tell(trial, objective_values(0.0, cost, self.objectives),
                           state=TrialState.COMPLETE)
                self._record_rejection(trial, rates, cost, "; ".join(over))
                rejections += 1
                continue
            widths = tuple(cost.widths)
            if widths in self._handed_out() and repeats < MAX_REPEATS:
                repeats += 1
                trial.set_user_attr("status", "repeat")
                study.tell(trial, state=TrialState.FAIL)
                log.debug("proposal %d repeats a network already run; asked again", trial.number)
                continue
            self._handed_out().add(widths)
            trial.set_user_attr("tune_trial_id", key)
            self._open[key] = trial.number
            self._handles[key] = trial
            self._done.discard(key)
            self.started += 1
            config = dict(params)
            attrs = trial.user_attrs
            config.update({k: attrs[k] for k in _CONFIG_ATTRS if k in attrs})
            config["optuna_number"] = trial.number
            config["widths"] = list(widths)  # the network this proposal is, priced above
            if cost.latency_ms is not None:  # priced before training, like the FLOPs
                config["latency_ms"] = cost.latency_ms
                config["latency_ratio"] = cost.latency_ratio
            return config
        return None  # only when no vector of the space meets the budget (checked before)

    # ------------------------------------------------------------------ results

    def note(self, key: str, result: dict | None) -> None:
        """Record an intermediate report of trial ``key``: its validation accuracy at
        that epoch, as user attr ``rung_acc_EEE`` (what a model-based sampler learns a
        stopped trial's worth from). Never a result: the trial's state is set by
        :meth:`tell` alone."""
        if key in self._done or key not in self._open or not result or result.get("failed"):
            return
        scores = {0: result.get("val_acc_sketched")}  # every report carries the epoch-0 score
        if result.get("epoch") is not None:
            scores[int(result["epoch"])] = result.get("val_acc")
        scores = {e: float(a) for e, a in scores.items() if a is not None}
        if not scores:
            return
        try:
            handle = self._handles.get(key) or trial_handle(self.study, self._open[key])
            self._handles[key] = handle
            for epoch, acc in scores.items():
                handle.set_user_attr(rung_key(epoch), acc)
        except Exception as exc:  # the trial was closed meanwhile (a resumed driver)
            log.debug("trial %s: scores %s not recorded (%s)", key, sorted(scores), exc)

    def tell(self, key: str, result: dict | None, error: bool = False) -> None:
        """Tell the study how trial ``key`` ended (once; later calls are ignored)."""
        if key in self._done or key not in self._open:
            return
        self.note(key, result)  # Tune hands the last report to on_trial_complete only
        self._done.add(key)
        number = self._open[key]
        cost = None
        if result and result.get("rates") is not None and self.objectives != ["val_acc", "flops"]:
            cost = self.space.cost(result["rates"])
        state, values, attrs = outcome(result, error, self.full_epochs, self.objectives, cost)
        try:
            handle = self._handles.pop(key, None) or trial_handle(self.study, number)
            for name, value in attrs.items():
                handle.set_user_attr(name, value)
            self.study.tell(number, values, state=state)
        except Exception as exc:  # already finished (a resumed trial reported twice)
            log.debug("trial %s: not told again to Optuna (%s)", key, exc)

    # ------------------------------------------------------------------ resume

    def reconcile(self, resumable: set[str]) -> dict[str, int]:
        """Square the study with a resumed run.

        ``resumable``: keys the runner will continue. Optuna trials left RUNNING by the
        killed driver that will not be continued are closed as FAIL (``lost``), so none
        stays RUNNING and the count of started trials is the number of finished plus
        resumable ones.
        """
        lost = kept = started = 0
        study = self.study
        for ft in study.get_trials(deepcopy=False):
            key = ft.user_attrs.get("tune_trial_id")
            if ft.state == TrialState.RUNNING and (key is None or key not in resumable):
                close_running(study, ft.number, "lost")  # asked, never ran or not continued
                lost += 1
                continue
            if key is None:
                continue
            started += 1
            if ft.state == TrialState.RUNNING:
                kept += 1
                self._open[key] = ft.number
                self._done.discard(key)
            else:
                self._done.add(key)
        self.started = started
        self._handles = {}
        self._trained = None  # read again: the trials closed as lost never ran
        return {"started": started, "resumable": kept, "lost": lost}
