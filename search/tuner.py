"""Run a search: Ray, the experiment folder, Tuner + SketchSearch + ASHA, resume.

:func:`run_search` is the whole ``launch.py search``: it connects to a cluster (or
starts a local Ray instance bound to 127.0.0.1 with usage statistics off), prepares
the experiment folder (manifest.json, config.yaml, baseline.pt, study.db,
trials.jsonl), builds the ``Tuner`` (function trainable with the baseline in the
object store, resources per trial, ``SketchSearch``, ASHA on ``val_acc``, the time
budget, one checkpoint kept per trial, retries for lost workers), runs it or restores
it (``--resume``), and records how long each phase took.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from search.config import SearchConfig, config_from_dict, config_to_dict, format_duration
from search.records import read_records
from search.experiment import experiment_location, is_uri, git_commit, read_manifest, versions, write_manifest
from search.ray_session import check_resources, ray_session
from sketch_core.atomic import atomic_write_text
from sketch_core.errors import UserError

__all__ = ["SearchOutcome", "run_search"]

log = logging.getLogger("sketchtune.search")


@dataclass
class SearchOutcome:
    exp_dir: Path
    records: list[dict]
    phases: dict[str, float]
    baseline: dict[str, Any]
    retrain: dict | None = None
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- Tune pieces

def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _study_storage(config: SearchConfig, exp_dir: Path) -> tuple[Any, str]:
    import optuna

    from search.searcher import SQLiteStorage

    url = config.storage.study_storage or f"sqlite:///{exp_dir / 'study.db'}"
    try:
        if url.startswith("sqlite:"):
            return SQLiteStorage(url), url
        return optuna.storages.RDBStorage(url), url
    except Exception as exc:
        raise UserError(f"--study_storage {url}: cannot open it as an Optuna RDB storage "
                        f"({str(exc).splitlines()[0]})") from None


def _make_setup(config: SearchConfig, baseline: Any, ended: dict[str, dict]) -> Any:
    from search.trainable import TrialSetup

    m, s, t, r = config.model, config.sketch, config.trial, config.resources
    setup = TrialSetup(
        cfg=m.cfg, data_set=m.data_set, num_classes=baseline["num_classes"],
        in_channels=baseline["in_channels"], data_path=m.data_path, input_size=m.input_size,
        synthetic=m.synthetic, sketch=s.model_copy(deep=True), trial=t.model_copy(deep=True),
        round_to=config.space.round_to, threads=t.threads or max(1, int(r.cpu or 1)),
        use_gpu=r.gpu > 0, baseline_key=str(baseline.get("key")),
        baseline_flops=int(baseline["flops"]), baseline_params=int(baseline["params"]),
        ended=ended, transform_input=bool(baseline.get("transform_input")))
    return setup


def _ended_reports(records: list[dict]) -> dict[str, dict]:
    """Final reports of trials that ended (for a resumed Tune that restarts them)."""
    out = {}
    for r in records:
        if r.get("status") not in ("completed", "stopped", "failed"):
            continue
        failed = r["status"] == "failed"
        out[str(r["trial_id"])] = {
            "val_acc": 0.0 if failed or r.get("val_acc") is None else r["val_acc"],
            "flops": r.get("flops"), "flops_ratio": r.get("flops_ratio"),
            "params": r.get("params"), "params_ratio": r.get("params_ratio"),
            "epoch": int(r.get("epochs") or 0), "rates": r.get("rates"),
            "widths": r.get("widths"), "failed": failed, "error": r.get("error"),
            "val_acc_sketched": r.get("val_acc_sketched")}
    return out


def _space(config: SearchConfig, baseline: dict) -> Any:
    from search.space import RateSpace

    m, sp = config.model, config.space
    return RateSpace(cfg=m.cfg, data_set=m.data_set, low=sp.low, high=sp.high, step=sp.step,
                     grouping=sp.grouping, round_to=sp.round_to, start_conv=config.sketch.start_conv,
                     sketch_lastconv=config.sketch.sketch_lastconv,
                     num_classes=baseline["num_classes"], in_channels=baseline["in_channels"],
                     input_size=baseline["input_size"])


def _tune_parts(config: SearchConfig, exp_dir: Path, storage_path: str, name: str,
                baseline: dict, quiet: bool, study_storage: Any, points: list) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from search.progress import SearchCallback
    from search.records import TrialLog
    from search.searcher import SketchSearch, make_sampler

    b, t, r = config.budget, config.trial, config.resources
    space = _space(config, baseline)
    space.check_budget(b.flops_budget)
    sampler = make_sampler(config.sampler.name, config.sampler.seed, b.num_samples,
                           config.sampler.population_size,
                           constrained=b.flops_budget is not None)
    searcher = SketchSearch(space, sampler=sampler, storage=study_storage, study_name=name,
                            full_epochs=t.epochs, num_samples=b.num_samples,
                            flops_budget=b.flops_budget, flops_policy=b.flops_policy,
                            points=points, anchors=space.uniform_points(config.sampler.anchors),
                            trial_log=TrialLog(exp_dir / "trials.jsonl"))
    sc = config.scheduler
    if sc.name == "asha" and t.epochs > sc.grace_period:
        scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max",
                                  max_t=t.epochs, grace_period=sc.grace_period,
                                  reduction_factor=sc.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    callback = SearchCallback(str(exp_dir / "trials.jsonl"), full_epochs=t.epochs,
                              num_samples=b.num_samples, time_budget_s=config.time_budget_s,
                              flops_budget=b.flops_budget, quiet=quiet)
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler, num_samples=-1,
        max_concurrent_trials=r.max_concurrent_trials, time_budget_s=config.time_budget_s,
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

    from search.trainable import run_trial

    r = config.resources
    wrapped = tune.with_parameters(fn or run_trial, setup=setup, baseline=state)
    return tune.with_resources(wrapped, {"cpu": r.cpu, "gpu": r.gpu})


# --------------------------------------------------------------------------- the search

def _baseline_dict(b: Any) -> dict:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(b.state):
        h.update(k.encode())
        h.update(str(tuple(b.state[k].shape)).encode())
        h.update(b.state[k].float().sum().item().hex().encode() if b.state[k].numel() else b"")
    d = b.summary()
    d.update(key=h.hexdigest()[:16], transform_input=b.transform_input)
    return d


def _print(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _check_folder(config: SearchConfig, exp_dir: Path, resume: bool) -> tuple[SearchConfig, dict | None]:
    """Before anything starts: the folder to continue exists, or the new one is free."""
    if resume:
        if not (exp_dir / "manifest.json").is_file() or not (exp_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {exp_dir} holds no experiment (no manifest.json and "
                            f"config.yaml); check --name and --storage_path")
        manifest = read_manifest(exp_dir)
        saved = yaml.safe_load((exp_dir / "config.yaml").read_text())
        resumed = config_from_dict(saved, source=str(exp_dir / "config.yaml"))
        resumed.storage.name = config.storage.name
        return resumed, manifest
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise UserError(f"experiment folder {exp_dir} already exists; continue it with "
                        f"--resume, or choose another --name")
    # what can be checked without data or Ray fails before either starts
    _space(config, {"num_classes": config.model.num_classes, "in_channels": 3,
                    "input_size": None}).paper_points(config.space.paper_rates)
    if config.model.pretrained:
        from search.baseline import check_pretrained

        check_pretrained(config)
    return config, None


def _new_experiment(config: SearchConfig, exp_dir: Path, name: str, storage_path: str,
                    study_storage: Any, study_url: str, address: str | None, command: str,
                    quiet: bool) -> tuple[dict, dict, dict]:
    """Phase 1 of a new search: baseline, config.yaml, manifest.json. (manifest, baseline, state)"""
    import optuna

    from search.baseline import prepare_baseline

    if config.storage.study_storage:
        try:
            names = optuna.study.get_all_study_names(study_storage)
        except Exception:
            names = []
        if name in names:
            raise UserError(f"study {name!r} already exists in --study_storage; continue it "
                            f"with --resume, or choose another --name")
    atomic_write_text(exp_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    b = prepare_baseline(config, exp_dir)
    baseline = _baseline_dict(b)
    _print(quiet, f"[pretrain] baseline {config.model.cfg} on {config.model.data_set}: "
                  f"val acc {_pct(b.val_acc)}, test acc {_pct(b.test_acc)}, "
                  f"{b.flops / 1e6:.2f}M MACs, {b.params / 1e6:.3f}M params "
                  f"({format_duration(b.pretrain_s)})")
    space = _space(config, baseline)
    space.check_budget(config.budget.flops_budget)
    paper = space.paper_points(config.space.paper_rates)
    manifest = {
        "name": name, "command": command, "config": config_to_dict(config),
        "cfg": config.model.cfg, "data_set": config.model.data_set,
        "family": "imagenet" if config.model.data_set in ("imagenet", "folder") else "cifar",
        "num_units": space.num_units, "unit_names": space.unit_names,
        "param_names": space.param_names, "baseline": baseline,
        "paper_rates": {text: space.rates_from_params(p) for text, p in paper},
        "started": time.time(), "ended": None,
        "phases": {"pretrain_s": round(b.pretrain_s, 3), "search_s": None, "retrain_s": None},
        "versions": versions(), "git_commit": git_commit(),
        "seeds": {"sampler": config.sampler.seed, "trial": config.trial.seed,
                  "split": config.trial.seed, "pretrain": config.model.pretrain.seed},
        "study_storage": study_url if config.storage.study_storage is None
        else "(given by --study_storage)", "study_name": name,
        "storage_path": storage_path, "experiment_dir": str(exp_dir), "address": address,
    }
    write_manifest(exp_dir, manifest)
    return manifest, baseline, b.state


def run_search(config: SearchConfig, *, address: str | None = None, resume: bool = False,
               command: str = "", quiet: bool = False, trainable: Callable | None = None,
               run_retrain: bool | None = None) -> SearchOutcome:
    """The whole search (see the module docstring); returns what it produced."""
    from search.baseline import load_baseline_file

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line says enough
    exp_dir, storage_path, name = experiment_location(config, resume)
    config, manifest = _check_folder(config, exp_dir, resume)
    t_start = time.time()
    r = config.resources
    with ray_session(address, None) as started_here:
        check_resources(r.cpu, r.gpu)
        from ray import tune

        if resume:
            study_storage, study_url = _study_storage(config, exp_dir)
            path = str(exp_dir) if not is_uri(storage_path) else f"{storage_path}/{name}"
            if not tune.Tuner.can_restore(path):
                raise UserError(f"--resume: {path} holds no Ray Tune experiment state to "
                                f"restore")
            b = manifest["baseline"]
            loaded = load_baseline_file(exp_dir / "baseline.pt", config, b["num_classes"],
                                        b["in_channels"])
            state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
            baseline = dict(b)
        else:
            created = not exp_dir.exists()
            exp_dir.mkdir(parents=True, exist_ok=True)
            try:
                study_storage, study_url = _study_storage(config, exp_dir)
                manifest, baseline, state = _new_experiment(config, exp_dir, name, storage_path,
                                                            study_storage, study_url, address,
                                                            command, quiet)
            except BaseException:
                if created:  # nothing of this run is worth keeping: leave no half folder
                    shutil.rmtree(exp_dir, ignore_errors=True)
                raise
        records_before = read_records(exp_dir / "trials.jsonl")
        setup = _make_setup(config, baseline, _ended_reports(records_before) if resume else {})
        fn = _trainable(config, setup, state, trainable)
        t_search = time.time()
        if resume:
            _print(quiet, f"[search] resuming {name}: {len(records_before)} trials already ended")
            tuner = tune.Tuner.restore(path, trainable=fn, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            paper = _space(config, baseline).paper_points(config.space.paper_rates)
            parts = _tune_parts(config, exp_dir, storage_path, name, baseline, quiet,
                                study_storage, paper)
            budget = config.budget
            _print(quiet, f"[search] {name}: {budget.num_samples or 'unlimited'} trials"
                          f"{', budget ' + budget.time if budget.time else ''}"
                          f"{', FLOPs <= ' + format(budget.flops_budget, 'g') if budget.flops_budget else ''}"
                          f", sampler {config.sampler.name}, "
                          f"{'local Ray on 127.0.0.1' if started_here else 'cluster ' + str(address)}")
            tuner = tune.Tuner(fn, tune_config=parts["tune_config"],
                               run_config=parts["run_config"])
        grid = tuner.fit()
        search_s = time.time() - t_search
        budget_s = config.time_budget_s
        if budget_s is not None and search_s >= budget_s - 1.0:  # the budget ended it
            _close_unstarted(name, study_storage)  # (an interrupted search stays resumable)
        errors = [str(e) for e in getattr(grid, "errors", [])][:3]
    records = read_records(exp_dir / "trials.jsonl")
    manifest = read_manifest(exp_dir)
    phases = dict(manifest.get("phases") or {})
    phases["search_s"] = round((phases.get("search_s") or 0.0) + search_s, 3) if resume \
        else round(search_s, 3)
    manifest["phases"] = phases
    manifest["ended"] = time.time()
    if resume:
        manifest.setdefault("resumes", []).append({"at": t_start, "command": command})
    write_manifest(exp_dir, manifest)
    _print(quiet, f"[search] phases: pretrain {format_duration(phases.get('pretrain_s') or 0)}, "
                  f"search {format_duration(phases['search_s'])} ({phases['search_s']:.1f}s)")
    ended = [r for r in records if r.get("status") != "rejected"]
    wanted = config.budget.num_samples
    budget_s = config.time_budget_s
    interrupted = (wanted is not None and len(ended) < wanted
                   and not (budget_s is not None and search_s >= budget_s - 1.0))
    outcome = SearchOutcome(exp_dir, records, phases, manifest["baseline"], resumed=resume,
                            extra={"tune_errors": errors, "interrupted": interrupted})
    if interrupted:
        _print(False, f"[search] interrupted after {len(ended)} of {wanted} trials; continue "
                      f"with: launch.py search --name {name} --storage_path {storage_path} "
                      f"--resume")
    do_retrain = config.retrain.enabled if run_retrain is None else run_retrain
    if do_retrain and not interrupted:
        from search.retrain import retrain_experiment

        t_re = time.time()
        try:
            outcome.retrain = retrain_experiment(exp_dir, config.retrain.pick,
                                                 workers=config.retrain.workers, quiet=quiet,
                                                 address=address)
        except UserError as exc:
            _print(quiet, f"[retrain] skipped: {exc}")
        manifest = read_manifest(exp_dir)
        manifest["phases"]["retrain_s"] = round(time.time() - t_re, 3)
        manifest["ended"] = time.time()
        write_manifest(exp_dir, manifest)
        outcome.phases = manifest["phases"]
    return outcome


def _close_unstarted(name: str, study_storage: Any) -> None:
    import optuna

    from search.searcher import close_unstarted

    n = close_unstarted(optuna.load_study(study_name=name, storage=study_storage))
    if n:
        log.info("%d trial(s) created but never started (budget over) closed in the study", n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"
