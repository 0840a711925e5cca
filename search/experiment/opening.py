"""Opening an experiment folder and closing a search's phase in it; no Ray here.

:func:`check_folder` runs before anything starts: the folder to continue holds an
experiment, or the new one is free, and what can be checked without data or Ray is.
:func:`open_new_experiment` fills a new folder (the study storage, config.yaml, the
baseline, the latency table, manifest.json) and removes it again when any step fails;
:func:`finish_manifest` records the search phase's time and end.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from search.experiment.baseline import (baseline_dict, check_pretrained, load_baseline_file,
                                        prepare_baseline, search_normalize)
from search.experiment.config import SearchConfig, config_from_dict, config_to_dict, format_duration
from search.experiment.folder import git_commit, read_manifest, versions, write_manifest
from search.experiment.resolve import SearchPlan, plan_search
from search.experiment.pricing import (budgets, check_given_table, latency_summary, rate_space,
                                       search_table)
from search.propose.study import open_storage
from search.results.text import pct, say
from sketch_core.errors import UserError
from sketch_core.io.atomic import atomic_write_text

__all__ = ["check_folder", "new_experiment", "open_new_experiment", "open_search", "OpenedSearch",
           "finish_manifest"]


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
        check_pretrained(config)
        search_normalize(config)  # a model.normalize that contradicts its record
    return config, None


def new_experiment(config: SearchConfig, exp_dir: Path, name: str, storage_path: str,
                    study_storage: Any, study_url: str, address: str | None, command: str,
                    quiet: bool) -> tuple[dict, dict, dict]:
    """Phase 1 of a new search: baseline, config.yaml, manifest.json. (manifest, baseline, state)"""
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
        study_storage, study_url = open_storage(config.storage.study_storage, exp_dir)
        manifest, baseline, state = new_experiment(config, exp_dir, name, storage_path,
                                                   study_storage, study_url, address,
                                                   command, quiet)
    except BaseException:
        if created:
            shutil.rmtree(exp_dir, ignore_errors=True)
        raise
    return study_storage, manifest, baseline, state


@dataclass(frozen=True)
class OpenedSearch:
    """A search ready to run: its plan, its study storage, the baseline's weights."""

    plan: SearchPlan
    study_storage: Any
    state: dict


def _saved_baseline(config: SearchConfig, exp_dir: Path, manifest: dict) -> tuple[dict, dict]:
    """The manifest's baseline summary and the weights of the folder's baseline.pt."""
    b = manifest["baseline"]
    loaded = load_baseline_file(exp_dir / "baseline.pt", config, b["num_classes"],
                                b["in_channels"])
    return dict(b), {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}


def open_search(config: SearchConfig, exp_dir: Path, name: str, storage_path: str, *,
                manifest: dict | None = None, address: str | None = None, command: str = "",
                quiet: bool = False) -> OpenedSearch:
    """The search of ``config`` resolved into its plan: a new experiment folder, or the
    existing one when ``manifest`` (a resume) is given."""
    if manifest is not None:
        study_storage, _ = open_storage(config.storage.study_storage, exp_dir)
        baseline, state = _saved_baseline(config, exp_dir, manifest)
    else:
        study_storage, _, baseline, state = open_new_experiment(
            config, exp_dir, name, storage_path, address, command, quiet)
    return OpenedSearch(plan_search(config, baseline, exp_dir, name, storage_path),
                        study_storage, state)


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
