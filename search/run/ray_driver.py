"""Run a search on Ray Tune: the Tuner, the searcher, the scheduler; resume; retrain.

:func:`run_search` is the whole ``launch.py search``: it connects to a cluster (or
starts a local Ray instance bound to 127.0.0.1 with usage statistics off), opens the
experiment folder (:mod:`search.experiment.opening`), resolves the config once into a
:class:`~search.experiment.resolve.SearchPlan`, builds the ``Tuner`` (the function
trainable with the baseline in the object store, resources per trial, the searcher
around the plan's proposer, the plan's scheduler, the time budget, one checkpoint kept
per trial, retries for lost workers), runs or restores it (``--resume``), records how
long each phase took and retrains the pick. :mod:`search.run.local_loop` runs the same
trials without Ray.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from search.experiment.config import SearchConfig
from search.experiment.folder import experiment_location, is_uri, read_manifest, write_manifest
from search.experiment.opening import OpenedSearch, check_folder, finish_manifest, open_search
from search.experiment.resolve import SearchPlan
from search.experiment.scoring_split import describe
from search.propose.proposer import close_unstarted
from search.results.trials_file import read_records
from search.results.text import say
from search.run.gpu_share import packing_note
from search.run.outcome import SearchOutcome
from search.run.progress import SearchCallback
from search.run.proposals import make_proposer
from search.run.ray_session import check_resources, ray_session
from search.run.retrain import retrain_experiment
from search.run.schedulers import make_scheduler
from search.run.trial import trial_setup
from search.run.tune_searcher import SketchSearch, search_algorithm
from search.run.tune_trial import run_trial
from sketch_core.data.folder_cache import prepare_folder_cache
from sketch_core.errors import UserError

__all__ = ["run_search"]

log = logging.getLogger("sketchtune.search")


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _tune_config(plan: SearchPlan, study_storage: Any, quiet: bool
                 ) -> tuple[tune.TuneConfig, tune.RunConfig]:
    """The Tuner's configs: the searcher, the scheduler, the callback, the budgets."""
    searcher = SketchSearch(make_proposer(plan, study_storage))
    full = plan.recipe.epochs
    scheduler, rungs = make_scheduler(plan.scheduler, full, plan.cost_axis,
                                      plan.exp_dir / "scheduler_state.json")
    callback = SearchCallback(str(plan.trials_file), full_epochs=full,
                              num_samples=plan.num_samples, time_budget_s=plan.time_budget_s,
                              quiet=quiet, scheduler=plan.scheduler.name,
                              sampler=plan.sampler.name, rungs=rungs, budgets=plan.budgets,
                              cost=plan.cost)
    r = plan.resources
    tune_config = tune.TuneConfig(
        search_alg=search_algorithm(searcher, r.max_concurrent_trials), scheduler=scheduler,
        num_samples=-1, max_concurrent_trials=None, time_budget_s=plan.time_budget_s,
        reuse_actors=r.reuse_actors, trial_dirname_creator=_trial_dirname)
    run_config = tune.RunConfig(
        name=plan.name, storage_path=plan.storage_path, verbose=0,
        callbacks=[callback, JsonLoggerCallback(), CSVLoggerCallback()],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=r.max_failures))
    return tune_config, run_config


def _trainable(plan: SearchPlan, ended: dict[str, dict], state: dict,
               fn: Callable | None) -> Any:
    if plan.data.data_set == "folder" and plan.data.data_path:  # decoded once, before any trial
        prepare_folder_cache(Path(plan.data.data_path).expanduser())
    wrapped = tune.with_parameters(fn or run_trial, setup=trial_setup(plan, ended),
                                   baseline=state)
    return tune.with_resources(wrapped, {"cpu": plan.resources.cpu, "gpu": plan.resources.gpu})


def _ended_reports(records: list) -> dict[str, dict]:
    """Final reports of trials that ended (for a resumed Tune that restarts them)."""
    return {r.trial_id: r.final_report() for r in records
            if r.status in ("completed", "stopped", "failed")}


def _restorable_path(exp_dir: Path, storage_path: str, name: str) -> str:
    """Where Ray Tune's experiment state to restore is; an error when there is none."""
    path = str(exp_dir) if not is_uri(storage_path) else f"{storage_path}/{name}"
    if not tune.Tuner.can_restore(path):
        raise UserError(f"--resume: {path} holds no Ray Tune experiment state to restore")
    return path


def _fit(tuner: Any, plan: SearchPlan, study_storage: Any) -> tuple[float, list[str]]:
    """Run the trials; (seconds it took, the first Tune errors)."""
    t_search = time.time()
    grid = tuner.fit()
    search_s = time.time() - t_search
    budget_s = plan.time_budget_s
    if budget_s is not None and search_s >= budget_s - 1.0:  # the budget ended it
        n = close_unstarted(optuna.load_study(study_name=plan.name, storage=study_storage))
        if n:  # (an interrupted search stays resumable)
            log.info("%d trial(s) created but never started (budget over) closed in the study", n)
    return search_s, [str(e) for e in getattr(grid, "errors", [])][:3]


def _interrupted(plan: SearchPlan, records: list, search_s: float) -> bool:
    """Fewer trials ended than asked, and not for the time budget: say how to continue."""
    ended = [r for r in records if r.status != "rejected"]
    wanted, budget_s = plan.num_samples, plan.time_budget_s
    interrupted = (wanted is not None and len(ended) < wanted
                   and not (budget_s is not None and search_s >= budget_s - 1.0))
    if interrupted:
        say(False, f"[search] interrupted after {len(ended)} of {wanted} trials; continue "
                   f"with: launch.py search --name {plan.name} --storage_path "
                   f"{plan.storage_path} --resume")
    return interrupted


def _retrain(outcome: SearchOutcome, plan: SearchPlan, address: str | None,
             quiet: bool) -> None:
    """Retrain the configured pick fully; its result and time go into ``outcome``."""
    t_re = time.time()
    try:
        outcome.retrain = retrain_experiment(outcome.exp_dir, plan.retrain.pick,
                                             workers=plan.retrain.workers, quiet=quiet,
                                             address=address)
    except UserError as exc:
        say(quiet, f"[retrain] skipped: {exc}")
    manifest = read_manifest(outcome.exp_dir)
    manifest["phases"]["retrain_s"] = round(time.time() - t_re, 3)
    manifest["ended"] = time.time()
    write_manifest(outcome.exp_dir, manifest)
    outcome.phases = manifest["phases"]


def _tuner(opened: OpenedSearch, restore_from: str | None, how: dict) -> Any:
    """The Tuner of a new search, or of the resumed one Tune saved at ``restore_from``."""
    plan, quiet = opened.plan, how["quiet"]
    before = read_records(plan.trials_file)
    resume = restore_from is not None
    fn = _trainable(plan, _ended_reports(before) if resume else {}, opened.state,
                    how["trainable"])
    if resume:
        say(quiet, f"[search] resuming {plan.name}: {len(before)} trials already ended; "
                   f"scores as recorded: {describe(plan.baseline.get('scores'))}")
        return tune.Tuner.restore(restore_from, trainable=fn, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    tune_config, run_config = _tune_config(plan, opened.study_storage, quiet)
    say(quiet, f"[search] {plan.name}: {plan.num_samples or 'unlimited'} trials"
               f"{plan.budget_text}, sampler {plan.sampler.name}, {how['where']}")
    return tune.Tuner(fn, tune_config=tune_config, run_config=run_config)


def run_search(config: SearchConfig, *, address: str | None = None, resume: bool = False,
               command: str = "", quiet: bool = False, trainable: Callable | None = None,
               run_retrain: bool | None = None) -> SearchOutcome:
    """The whole search (see the module docstring); returns what it produced."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line says enough
    exp_dir, storage_path, name = experiment_location(config.storage, config.source, resume)
    config, manifest = check_folder(config, exp_dir, resume)
    if (note := config.early_stopping_note) is not None:
        say(quiet, f"[search] {note}")
    t_start = time.time()
    with ray_session(address, None) as started_here:
        check_resources(config.resources.cpu, config.resources.gpu)
        if (note := packing_note(config.resources.gpu)) is not None:
            say(False, f"[search] {note}")
        where = "local Ray on 127.0.0.1" if started_here else f"cluster {address}"
        how = {"quiet": quiet, "trainable": trainable, "where": where}
        restore_from = _restorable_path(exp_dir, storage_path, name) if resume else None
        opened = open_search(config, exp_dir, name, storage_path,
                             manifest=manifest if resume else None, address=address,
                             command=command, quiet=quiet)
        plan = opened.plan
        search_s, errors = _fit(_tuner(opened, restore_from, how), plan, opened.study_storage)
    phases = finish_manifest(exp_dir, search_s, resume, t_start, command, quiet)
    records = read_records(plan.trials_file)
    interrupted = _interrupted(plan, records, search_s)
    outcome = SearchOutcome(exp_dir, records, phases, read_manifest(exp_dir)["baseline"],
                            resumed=resume,
                            extra={"tune_errors": errors, "interrupted": interrupted})
    do_retrain = plan.retrain.enabled if run_retrain is None else run_retrain
    if do_retrain and not interrupted:
        _retrain(outcome, plan, address, quiet)
    return outcome
