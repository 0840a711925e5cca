"""Before and after the trials of a search, whoever runs them: no Ray here.

The experiment folder (checked before anything starts, then config.yaml, baseline.pt,
manifest.json), the Optuna storage, the rate space, the :class:`TrialSetup` of the
trials and, once they ended, the phase times in the manifest. Both
:mod:`search.run.ray_driver` (Ray Tune) and :mod:`search.run.local_loop` (one machine, no Ray) use
these.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search.experiment.config import SearchConfig, config_from_dict, config_to_dict, format_duration
from search.experiment.folder import git_commit, read_manifest, versions, write_manifest
from search.experiment.latency_source import budgets, check_given_table, latency_summary, search_table
from search.experiment.priced_space import rate_space
from sketch_core.io.atomic import atomic_write_text
from sketch_core.errors import UserError

__all__ = ["SearchOutcome", "open_study_storage", "prepare_data", "make_setup", "ended_reports", "rate_space",
           "baseline_dict", "say", "check_folder", "new_experiment", "open_new_experiment",
           "finish_manifest", "pct"]


@dataclass
class SearchOutcome:
    """What a search produced: its folder, trials.jsonl records, phase times, baseline."""

    exp_dir: Path
    records: list[dict]
    phases: dict[str, float]
    baseline: dict[str, Any]
    retrain: dict | None = None
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def open_study_storage(config: SearchConfig, exp_dir: Path) -> tuple[Any, str]:
    import optuna

    from search.propose.study import SQLiteStorage

    url = config.storage.study_storage or f"sqlite:///{exp_dir / 'study.db'}"
    try:
        if url.startswith("sqlite:"):
            return SQLiteStorage(url), url
        return optuna.storages.RDBStorage(url), url
    except Exception as exc:
        raise UserError(f"--study_storage {url}: cannot open it as an Optuna RDB storage "
                        f"({str(exc).splitlines()[0]})") from None


def prepare_data(config: SearchConfig) -> None:
    """Decode a small-image folder set into its cache before any trial starts, so that
    concurrent trials only read the cache (none of them decodes, none races to write)."""
    m = config.model
    if m.data_set != "folder" or not m.data_path:
        return
    from sketch_core.data.folder_cache import prepare_folder_cache

    prepare_folder_cache(Path(m.data_path).expanduser())


def make_setup(config: SearchConfig, baseline: Any, ended: dict[str, dict]) -> Any:
    """The trials' :class:`~search.run.trial.TrialSetup` (the folder cache is built first)."""
    from search.run.trial import TrialSetup

    prepare_data(config)
    m, s, t, r = config.model, config.sketch, config.trial, config.resources
    family = baseline.get("family") or m.resolved_arch(baseline.get("input_size")).family
    setup = TrialSetup(
        cfg=m.cfg, data_set=m.data_set, num_classes=baseline["num_classes"],
        in_channels=baseline["in_channels"], data_path=m.data_path, input_size=m.input_size,
        synthetic=m.synthetic, sketch=s.model_copy(deep=True), trial=t.model_copy(deep=True),
        round_to=config.space.round_to, threads=t.threads or max(1, int(r.cpu or 1)),
        use_gpu=r.gpu > 0, baseline_key=str(baseline.get("key")),
        baseline_flops=int(baseline["flops"]), baseline_params=int(baseline["params"]),
        ended=ended, transform_input=bool(baseline.get("transform_input")),
        family=family, normalize=baseline.get("normalize"), scores=baseline.get("scores"))
    return setup


def ended_reports(records: list) -> dict[str, dict]:
    """Final reports of trials that ended (for a resumed Tune that restarts them)."""
    return {r.trial_id: r.final_report() for r in records
            if r.status in ("completed", "stopped", "failed")}


def baseline_dict(b: Any) -> dict:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(b.state):
        h.update(k.encode())
        h.update(str(tuple(b.state[k].shape)).encode())
        h.update(b.state[k].float().sum().item().hex().encode() if b.state[k].numel() else b"")
    d = b.summary()
    d.update(key=h.hexdigest()[:16], transform_input=b.transform_input)
    return d


def say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def check_folder(config: SearchConfig, exp_dir: Path, resume: bool) -> tuple[SearchConfig, dict | None]:
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
    rate_space(config, {"num_classes": config.model.num_classes, "in_channels": 3,
                    "input_size": None}).paper_points(config.space.paper_rates)
    check_given_table(config)
    if config.model.pretrained:
        from search.experiment.baseline import check_pretrained, search_normalize

        check_pretrained(config)
        search_normalize(config)  # a model.normalize that contradicts its record
    return config, None


def new_experiment(config: SearchConfig, exp_dir: Path, name: str, storage_path: str,
                    study_storage: Any, study_url: str, address: str | None, command: str,
                    quiet: bool) -> tuple[dict, dict, dict]:
    """Phase 1 of a new search: baseline, config.yaml, manifest.json. (manifest, baseline, state)"""
    import optuna

    from search.experiment.baseline import prepare_baseline

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
    baseline = baseline_dict(b)
    say(quiet, f"[pretrain] baseline {config.model.cfg} on {config.model.data_set}: "
                  f"val acc {pct(b.val_acc)}, test acc {pct(b.test_acc)}, "
                  f"{b.flops / 1e6:.2f}M MACs, {b.params / 1e6:.3f}M params "
                  f"({format_duration(b.pretrain_s)})")
    space = rate_space(config, baseline)
    space.use_latency(search_table(config, space, exp_dir, lambda text: say(quiet, text)))
    space.check_budget(budgets(config, space))
    paper = space.paper_points(config.space.paper_rates)
    manifest = {
        "name": name, "command": command, "config": config_to_dict(config),
        "cfg": config.model.cfg, "data_set": config.model.data_set,
        "family": baseline.get("family") or config.model.resolved_arch(b.input_size).family,
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
        "scores": b.scores, "objectives": list(config.objectives),
        "cost_axis": config.cost_axis, "latency": latency_summary(space, config),
    }
    write_manifest(exp_dir, manifest)
    return manifest, baseline, b.state


def open_new_experiment(config: SearchConfig, exp_dir: Path, name: str, storage_path: str,
                        address: str | None, command: str, quiet: bool
                        ) -> tuple[Any, dict, dict, dict]:
    """A new experiment folder with its study storage, baseline and manifest.

    (study storage, manifest, baseline, baseline state_dict). On any error the folder
    is removed again when this call created it: nothing half-written stays.
    """
    created = not exp_dir.exists()
    exp_dir.mkdir(parents=True, exist_ok=True)
    try:
        study_storage, study_url = open_study_storage(config, exp_dir)
        manifest, baseline, state = new_experiment(config, exp_dir, name, storage_path,
                                                   study_storage, study_url, address,
                                                   command, quiet)
    except BaseException:
        if created:
            shutil.rmtree(exp_dir, ignore_errors=True)
        raise
    return study_storage, manifest, baseline, state


def finish_manifest(exp_dir: Path, search_s: float, resume: bool, t_start: float,
                    command: str, quiet: bool) -> dict:
    """Record the search phase (added up over resumes) and the end time; the phases."""
    manifest = read_manifest(exp_dir)
    phases = dict(manifest.get("phases") or {})
    phases["search_s"] = round((phases.get("search_s") or 0.0) + search_s, 3) if resume \
        else round(search_s, 3)
    manifest["phases"] = phases
    manifest["ended"] = time.time()
    if resume:
        manifest.setdefault("resumes", []).append({"at": t_start, "command": command})
    write_manifest(exp_dir, manifest)
    say(quiet, f"[search] phases: pretrain {format_duration(phases.get('pretrain_s') or 0)}, "
               f"search {format_duration(phases['search_s'])} ({phases['search_s']:.1f}s)")
    return phases


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"
