"""Run a search on Ray Tune: the Tuner + SketchSearch + (MO-)ASHA, resume, retrain.

:func:`run_search` is the whole ``launch.py search``: it connects to a cluster (or
starts a local Ray instance bound to 127.0.0.1 with usage statistics off), prepares
the experiment folder (:mod:`search.experiment.prepare`: manifest.json, config.yaml,
baseline.pt, study.db, trials.jsonl), builds the ``Tuner`` (function trainable with the
baseline in the object store, resources per trial, ``SketchSearch``, the scheduler of
:func:`make_scheduler`, the time budget, one checkpoint kept per trial, retries for lost
workers), runs it or restores it (``--resume``), records how long each phase took and
retrains the pick. :mod:`search.run.local_loop` runs the same trials without Ray.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from search.experiment.config import COST_SCHEDULERS, SearchConfig
from search.experiment.folder import experiment_location, is_uri, read_manifest, write_manifest
from search.run.gpu_share import packing_note
from search.experiment.latency_source import budget_words, budgets, cost_key
from search.results.pareto import COST_COLUMNS
from search.experiment.prepare import (SearchOutcome, baseline_dict, check_folder, ended_reports,
                            finish_manifest, make_setup, open_new_experiment,
                            open_study_storage, rate_space, say)
from search.run.ray_session import check_resources, ray_session
from search.results.trials_file import read_records
from search.experiment.scoring_split import describe
from sketch_core.errors import UserError

__all__ = ["SearchOutcome", "run_search", "make_scheduler"]

log = logging.getLogger("sketchtune.search")

_baseline_dict = baseline_dict  # the names the benchmarks import
_make_setup = make_setup


# --------------------------------------------------------------------------- Tune pieces

def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def make_scheduler(config: SearchConfig, exp_dir: Path | None = None) -> tuple[Any, list[int]]:
    """The config's trial scheduler and its rungs (epochs; none for FIFO).

    ``asha``: Ray's ASHA on ``val_acc``; ``cost_asha`` and ``moasha``:
    :class:`search.run.schedulers.CostASHAScheduler` and :class:`search.run.schedulers.MOASHAScheduler` on
    (``val_acc``, ``scheduler.cost``), their rungs kept in ``exp_dir/scheduler_state.json``;
    ``none``, or any of them with a grace period not below ``trial.epochs``: every trial
    runs its full recipe.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from search.run.schedulers import CostASHAScheduler, MOASHAScheduler, rung_milestones

    sc, epochs = config.scheduler, config.trial.epochs
    if sc.name == "none" or epochs <= sc.grace_period:  # config.early_stopping_note says so
        return FIFOScheduler(), []
    rungs = rung_milestones(epochs, sc.grace_period, sc.reduction_factor)
    if sc.name in COST_SCHEDULERS:
        state = None if exp_dir is None else exp_dir / "scheduler_state.json"
        cost = COST_COLUMNS[sc.cost or config.cost_axis][1]  # flops, or latency_ms (priced)
        kind = CostASHAScheduler if sc.name == "cost_asha" else MOASHAScheduler
        return kind(time_attr="epoch", metric="val_acc", cost_attr=cost, max_t=epochs,
                    grace_period=sc.grace_period, reduction_factor=sc.reduction_factor,
                    state_file=state), rungs
    return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=epochs,
                         grace_period=sc.grace_period,
                         reduction_factor=sc.reduction_factor), rungs


def _tune_parts(config: SearchConfig, exp_dir: Path, storage_path: str, name: str,
                baseline: dict, quiet: bool, study_storage: Any, points: list) -> dict:
    from ray import tune

    from search.run.progress import SearchCallback
    from search.results.trials_file import TrialLog
    from search.run.tune_searcher import SketchSearch, make_sampler, search_algorithm

    b, t, r = config.budget, config.trial, config.resources
    space = rate_space(config, baseline, exp_dir)
    limits = budgets(config, space)
    space.check_budget(limits)
    sampler = make_sampler(config.sampler.name, config.sampler.seed, b.num_samples,
                           config.sampler.population_size,
                           constrained=bool(limits), space=space, budgets=limits,
                           cost=cost_key(config))
    searcher = SketchSearch(space, sampler=sampler, storage=study_storage, study_name=name,
                            full_epochs=t.epochs, num_samples=b.num_samples,
                            flops_policy=b.flops_policy, budgets=limits,
                            objectives=config.objectives,
                            points=points, anchors=space.uniform_points(config.sampler.anchors),
                            trial_log=TrialLog(exp_dir / "trials.jsonl"))
    scheduler, rungs = make_scheduler(config, exp_dir)
    callback = SearchCallback(str(exp_dir / "trials.jsonl"), full_epochs=t.epochs,
                              num_samples=b.num_samples, time_budget_s=config.time_budget_s,
                              quiet=quiet,
                              scheduler=config.scheduler.name,
                              sampler=config.sampler.name, rungs=rungs, budgets=limits,
                              cost=cost_key(config))
    tune_config = tune.TuneConfig(
        search_alg=search_algorithm(searcher, r.max_concurrent_trials), scheduler=scheduler,
        num_samples=-1, max_concurrent_trials=None, time_budget_s=config.time_budget_s,
        reuse_actors=r.reuse_actors, trial_dirname_creator=trial_dirname)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    run_config = tune.RunConfig(
        name=name, storage_path=storage_path, verbose=0,
        callbacks=[callback, JsonLoggerCallback(), CSVLoggerCallback()],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=r.max_failures))
    return {"tune_config": tune_config, "run_config": run_config, "searcher": searcher}


def _trainable(config: SearchConfig, setup: Any, state: dict, fn: Callable | None) -> Any:
    from ray import tune

    from search.run.trial import run_trial

    r = config.resources
    wrapped = tune.with_parameters(fn or run_trial, setup=setup, baseline=state)
    return tune.with_resources(wrapped, {"cpu": r.cpu, "gpu": r.gpu})


# --------------------------------------------------------------------------- the search

def run_search(config: SearchConfig, *, address: str | None = None, resume: bool = False,
               command: str = "", quiet: bool = False, trainable: Callable | None = None,
               run_retrain: bool | None = None) -> SearchOutcome:
    """The whole search (see the module docstring); returns what it produced."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line says enough
    exp_dir, storage_path, name = experiment_location(config, resume)
    config, manifest = check_folder(config, exp_dir, resume)
    if (note := config.early_stopping_note) is not None:
        say(quiet, f"[search] {note}")
    t_start = time.time()
    with ray_session(address, None) as started_here:
        check_resources(config.resources.cpu, config.resources.gpu)
        if (note := packing_note(config.resources.gpu)) is not None:
            say(False, f"[search] {note}")
        if resume:
            path = _restorable_path(exp_dir, storage_path, name)
            study_storage, _ = open_study_storage(config, exp_dir)
            baseline, state = _saved_baseline(config, exp_dir, manifest)
        else:
            study_storage, manifest, baseline, state = open_new_experiment(
                config, exp_dir, name, storage_path, address, command, quiet)
        records_before = read_records(exp_dir / "trials.jsonl")
        setup = make_setup(config, baseline, ended_reports(records_before) if resume else {})
        fn = _trainable(config, setup, state, trainable)
        if resume:
            say(quiet, f"[search] resuming {name}: {len(records_before)} trials already ended; "
                       f"scores as recorded: {describe(baseline.get('scores'))}")
            tuner = _restored_tuner(path, fn)
        else:
            where = "local Ray on 127.0.0.1" if started_here else f"cluster {address}"
            tuner = _new_tuner(config, fn, exp_dir, storage_path, name, baseline, quiet,
                               study_storage, where)
        search_s, errors = _fit(tuner, config, name, study_storage)
    phases = finish_manifest(exp_dir, search_s, resume, t_start, command, quiet)
    records = read_records(exp_dir / "trials.jsonl")
    interrupted = _interrupted(config, records, search_s, name, storage_path)
    outcome = SearchOutcome(exp_dir, records, phases, read_manifest(exp_dir)["baseline"],
                            resumed=resume,
                            extra={"tune_errors": errors, "interrupted": interrupted})
    do_retrain = config.retrain.enabled if run_retrain is None else run_retrain
    if do_retrain and not interrupted:
        _retrain(outcome, config, address, quiet)
    return outcome


def _restorable_path(exp_dir: Path, storage_path: str, name: str) -> str:
    """Where Ray Tune's experiment state to restore is; an error when there is none."""
    from ray import tune

    path = str(exp_dir) if not is_uri(storage_path) else f"{storage_path}/{name}"
    if not tune.Tuner.can_restore(path):
        raise UserError(f"--resume: {path} holds no Ray Tune experiment state to restore")
    return path


def _saved_baseline(config: SearchConfig, exp_dir: Path, manifest: dict) -> tuple[dict, dict]:
    """The manifest's baseline summary and the weights of the folder's baseline.pt."""
    from search.experiment.baseline import load_baseline_file

    b = manifest["baseline"]
    loaded = load_baseline_file(exp_dir / "baseline.pt", config, b["num_classes"],
                                b["in_channels"])
    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    return dict(b), state


def _restored_tuner(path: str, fn: Any) -> Any:
    from ray import tune

    return tune.Tuner.restore(path, trainable=fn, resume_unfinished=True,
                              resume_errored=False, restart_errored=False)


def _new_tuner(config: SearchConfig, fn: Any, exp_dir: Path, storage_path: str, name: str,
               baseline: dict, quiet: bool, study_storage: Any, where: str) -> Any:
    """A fresh Tuner for a new search, announced with one line."""
    from ray import tune

    paper = rate_space(config, baseline).paper_points(config.space.paper_rates)
    parts = _tune_parts(config, exp_dir, storage_path, name, baseline, quiet, study_storage,
                        paper)
    b = config.budget
    say(quiet, f"[search] {name}: {b.num_samples or 'unlimited'} trials"
               f"{', budget ' + b.time if b.time else ''}"
               f"{budget_words(config)}, sampler {config.sampler.name}, {where}")
    return tune.Tuner(fn, tune_config=parts["tune_config"], run_config=parts["run_config"])


def _fit(tuner: Any, config: SearchConfig, name: str, study_storage: Any
         ) -> tuple[float, list[str]]:
    """Run the trials; (seconds it took, the first Tune errors)."""
    t_search = time.time()
    grid = tuner.fit()
    search_s = time.time() - t_search
    budget_s = config.time_budget_s
    if budget_s is not None and search_s >= budget_s - 1.0:  # the budget ended it
        _close_unstarted(name, study_storage)  # (an interrupted search stays resumable)
    return search_s, [str(e) for e in getattr(grid, "errors", [])][:3]


def _interrupted(config: SearchConfig, records: list[dict], search_s: float, name: str,
                 storage_path: str) -> bool:
    """Fewer trials ended than asked, and not for the time budget: say how to continue."""
    ended = [r for r in records if r.get("status") != "rejected"]
    wanted, budget_s = config.budget.num_samples, config.time_budget_s
    interrupted = (wanted is not None and len(ended) < wanted
                   and not (budget_s is not None and search_s >= budget_s - 1.0))
    if interrupted:
        say(False, f"[search] interrupted after {len(ended)} of {wanted} trials; continue "
                   f"with: launch.py search --name {name} --storage_path {storage_path} "
                   f"--resume")
    return interrupted


def _retrain(outcome: SearchOutcome, config: SearchConfig, address: str | None,
             quiet: bool) -> None:
    """Retrain the configured pick fully; its result and time go into ``outcome``."""
    from search.run.retrain import retrain_experiment

    t_re = time.time()
    try:
        outcome.retrain = retrain_experiment(outcome.exp_dir, config.retrain.pick,
                                             workers=config.retrain.workers, quiet=quiet,
                                             address=address)
    except UserError as exc:
        say(quiet, f"[retrain] skipped: {exc}")
    manifest = read_manifest(outcome.exp_dir)
    manifest["phases"]["retrain_s"] = round(time.time() - t_re, 3)
    manifest["ended"] = time.time()
    write_manifest(outcome.exp_dir, manifest)
    outcome.phases = manifest["phases"]


def _close_unstarted(name: str, study_storage: Any) -> None:
    import optuna

    from search.propose.proposer import close_unstarted

    n = close_unstarted(optuna.load_study(study_name=name, storage=study_storage))
    if n:
        log.info("%d trial(s) created but never started (budget over) closed in the study", n)
