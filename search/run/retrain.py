"""The final run: pick a configuration of a search and retrain it on the full schedule.

:func:`retrain_experiment` reads the experiment folder (config.yaml, manifest.json,
trials.jsonl, baseline.pt), picks a trial (:mod:`search.results.picks`: ``knee``,
``best``, ``flops<=F``, ``latency<=L``, ``trial=ID``; the knee on the search's cost
axis) and resolves the retrain once into a :class:`RetrainJob`: the baseline sketched at
the trial's exact widths with the search's sketch options, BN recalibrated, fine-tuned
with ``retrain``'s schedule, the best epoch kept on the images the search chose on (the
manifest's ``scores``, :mod:`search.experiment.scoring_split`), tested on those that
report. :func:`run_retrain_job` runs it through the one pipeline, in this process or,
with ``workers > 1``, on each data-parallel Ray Train worker
(:mod:`search.run.data_parallel`), the same widths, images and split everywhere.

It writes ``retrain/<pick>/``: ``model.pt`` (a sketchtune checkpoint that ``sketch
--test_only --refine`` and ``info --sketch_model`` read), ``metrics.csv``,
``train_state.pt`` (an interrupted retrain continues from it) and ``result.json`` (test
accuracy with ``val_source`` and ``test_images``, FLOPs, params and their reductions;
for a search priced by latency, the predicted latency beside the one measured here).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from search.experiment.config import SearchConfig, config_from_dict
from search.experiment.folder import read_manifest
from search.experiment.pricing import cost_key, measure_pick
from search.experiment.scoring_split import data_request, data_val_fraction, split_record
from search.results.picks import Pick, parse_pick, select_record
from search.results.text import millions, ms, pct, say
from search.results.trials_file import read_records
from search.run.data_parallel import train_data_parallel
from sketch_core.data.normalize import choose_normalize, parse_normalize
from sketch_core.data.request import DataRequest
from sketch_core.data.sets import loader_rows
from sketch_core.errors import UserError
from sketch_core.io.atomic import atomic_write_json
from sketch_core.io.checkpoint import load_checkpoint, read_record
from sketch_core.io.export import check_format, export_checkpoint, require_onnx
from sketch_core.options import Recipe, SketchOptions
from sketch_core.pipeline import CheckpointRecord, Outputs, prune_and_finetune
from sketch_core.plans import widths_for
from sketch_core.registry import Arch, resolve_arch
from sketch_core.training.loop import load_state, resolve_device

__all__ = ["retrain_experiment", "load_experiment_config", "RetrainJob", "run_retrain_job"]

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class RetrainJob:
    """One retrain, resolved; picklable, the same in every data-parallel worker."""

    arch: Arch
    baseline: Path           # the experiment's baseline.pt
    num_classes: int
    in_channels: int
    rates: list[float]
    widths: list[int]
    options: SketchOptions
    recipe: Recipe
    data: DataRequest
    folder: Path             # retrain/<pick>/
    record: CheckpointRecord
    threads: int | None = None
    progress: bool = False


def load_experiment_config(exp_dir: Path) -> SearchConfig:
    path = exp_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{exp_dir} holds no experiment (no config.yaml); expected the folder "
                        f"a `launch.py search` wrote") from None
    return config_from_dict(data, source=str(path))


def _scores(manifest: dict) -> dict:
    """The search's record of which images choose and report (older searches: train_holdout)."""
    return manifest.get("scores") or {"val_source": "train_holdout"}


def _start(job: RetrainJob, device: torch.device, quiet: bool) -> tuple[Any, dict | None]:
    """(the model to train, the state to continue from): a matching train_state.pt, else
    the baseline to sketch."""
    state_path = job.folder / STATE_FILE
    if state_path.is_file():
        state = load_state(state_path)
        same = [round(r, 6) for r in state["meta"].get("rates", [])] == \
            [round(r, 6) for r in job.rates] and state.get("epochs") == job.recipe.epochs
        if same:
            say(quiet, f"[retrain] continuing from {state_path} (epoch {state['epoch']})")
            return job.arch.build(job.widths, job.num_classes, job.in_channels), state
    loaded = load_checkpoint(job.baseline, cfg=job.arch, num_classes=job.num_classes,
                             in_channels=job.in_channels)
    return loaded.model.to(device), None


def run_retrain_job(job: RetrainJob, device: torch.device | str | None = None,
                    rank0: bool = True, report: Callable | None = None) -> dict[str, Any]:
    """Run ``job`` through the pipeline on ``device`` (its best one by default); only
    ``rank0`` writes. Returns the figures ``result.json`` takes."""
    device = resolve_device(device)
    if device.type == "cpu" and job.threads:
        torch.set_num_threads(job.threads)
    data = job.data.load(device)
    model, start_state = _start(job, device, not (rank0 and job.progress))
    test_images = len(loader_rows(data.test))
    val_images = 0 if data.val is None else len(loader_rows(data.val))
    outputs = Outputs(job_dir=job.folder, state=job.folder / STATE_FILE,
                      final=job.folder / "model.pt", record=job.record, progress=job.progress,
                      rank0=rank0,
                      final_metrics={"epochs": job.recipe.epochs, "test_images": test_images,
                                     "val_images": val_images,
                                     "val_source": job.record.extra.get("val_source")})
    out = prune_and_finetune(job.arch, model, job.widths, job.options, job.recipe, data,
                             device=device, outputs=outputs, start_state=start_state,
                             state_meta={"rates": job.rates}, test=True,
                             report=None if report is None else (lambda _, row: report(row)))
    return {"test_acc": out.test["acc"], "test_top5": out.test["top5"],
            "val_acc": out.fit.best_val_acc, "test_images": test_images,
            "val_images": val_images, "best_epoch": out.fit.best_epoch, "flops": out.flops, "params": out.params,
            "widths": list(job.widths),
            "val_acc_sketched": None if out.sketched is None else out.sketched.acc}


def _job(config: SearchConfig, manifest: dict, exp_dir: Path, rec: Any, epochs: int | None,
         normalize: Any, folder: Path, quiet: bool) -> RetrainJob:
    """The retrain of record ``rec``, resolved from the experiment's config and manifest."""
    m, b, scores = config.model, manifest["baseline"], _scores(manifest)
    arch = resolve_arch(m.cfg, m.data_set, family=b.get("family") or m.family,
                        input_size=b.get("input_size"), start_conv=config.sketch.start_conv)
    rates = [float(r) for r in rec.rates]
    widths = list(rec.widths) if rec.widths else widths_for(
        arch.plan(), rates, config.sketch.sketch_lastconv, config.space.round_to)
    split = {**split_record(config), "val_fraction": data_val_fraction(config.trial,
                                                                       scores["val_source"])}
    extra = {"sketch_mode": config.sketch.mode, "select_by": config.sketch.select_by,
             "trial_id": rec.trial_id, "experiment": str(exp_dir),
             "val_source": scores["val_source"]}
    small = (b.get("input_size") or 32) <= 16
    return RetrainJob(
        arch=arch, baseline=exp_dir / "baseline.pt", num_classes=int(b["num_classes"]),
        in_channels=int(b["in_channels"]), rates=rates, widths=widths,
        options=config.sketch.options(), recipe=config.retrain.recipe(config.trial, epochs),
        data=data_request(m, config.trial, scores, normalize=normalize,
                          batch_size=config.retrain.batch_size),
        folder=folder, record=CheckpointRecord(rates, split, extra),
        threads=config.trial.threads or (1 if small else None), progress=not quiet)


def _distributed(job: RetrainJob, workers: int, use_gpu: bool, address: str | None
                 ) -> dict[str, Any]:
    """The retrain on ``workers`` Ray Train workers (GPUs, or CPU workers over gloo)."""
    train_data_parallel(_retrain_worker, job, num_workers=workers, use_gpu=use_gpu,
                        ray_dir=job.folder / "ray", address=address)
    loaded = load_checkpoint(job.folder / "model.pt", cfg=job.arch)
    holder = loaded.meta.get("metrics") or {}
    return {"test_acc": holder.get("test_acc"), "test_top5": holder.get("test_top5"),
            "val_acc": holder.get("val_acc"), "best_epoch": holder.get("best_epoch"),
            "flops": holder.get("flops"), "params": holder.get("params"),
            "widths": loaded.meta["widths"], "test_images": holder.get("test_images"),
            "val_images": holder.get("val_images"),
            "val_acc_sketched": holder.get("val_acc_sketched")}


def _retrain_worker(job: RetrainJob, device: torch.device, rank0: bool,
                    report: Callable) -> None:
    """One data-parallel worker of a retrain (rank 0 writes model.pt and the figures)."""
    run_retrain_job(job, device, rank0, report)


def _normalize(exp_dir: Path, normalize: Any, force: bool) -> Any:
    """baseline.pt's recorded normalisation, or ``normalize`` (checked against it)."""
    if force and normalize is None:
        raise UserError("--force_normalize overrides the baseline's normalisation with "
                        "--normalize: give --normalize too")
    path = exp_dir / "baseline.pt"
    recorded = read_record(path).get("normalize") if path.is_file() else None
    if normalize is not None:
        parse_normalize(normalize)
    return choose_normalize(normalize, recorded, force=force, source=str(path))


def _result(rec: Any, pick: Pick, out: dict, base: dict, manifest: dict, workers: int,
            seconds: float, job: RetrainJob) -> dict[str, Any]:
    bf, bp, f, p = base.get("flops"), base.get("params"), out.get("flops"), out.get("params")
    result = {
        "trial_id": rec.trial_id, "pick": pick.label, "rates": rec.rates,
        "widths": out.get("widths") or rec.widths, "test_acc": out.get("test_acc"),
        "test_top5": out.get("test_top5"), "val_acc": out.get("val_acc"),
        "best_epoch": out.get("best_epoch"), "epochs": job.recipe.epochs,
        "flops": f, "params": p, "flops_ratio": f / bf if bf and f else None,
        "params_ratio": p / bp if bp and p else None,
        "flops_reduction": 1 - f / bf if bf and f else None,
        "params_reduction": 1 - p / bp if bp and p else None,
        "baseline_test_acc": base.get("test_acc"), "baseline_val_acc": base.get("val_acc"),
        "baseline_flops": bf, "baseline_params": bp,
        "search_val_acc": rec.val_acc, "val_acc_sketched": out.get("val_acc_sketched"),
        "val_source": _scores(manifest)["val_source"], "test_images": out.get("test_images"),
        "val_images": out.get("val_images"), "workers": workers, "time_s": round(seconds, 3),
        "model": str(job.folder / "model.pt"), "lr": job.recipe.lr,
        "lr_decay_step": list(job.recipe.lr_decay_step)}
    if rec.latency_ms is not None:
        result.update(latency_ms=rec.latency_ms, latency_ratio=rec.latency_ratio)
    return result


def _latency(result: dict, lat: dict | None, quiet: bool) -> None:
    """The pick's latency (predicted, measured where the search was priced by it)."""
    if lat is None:
        return
    result["latency"] = lat
    if lat.get("measured_ms") is not None:
        say(quiet, f"[retrain] latency on {lat['device']}/{lat['runtime']} (batch "
                   f"{lat['batch']}, {lat['threads']} thread(s)): predicted "
                   f"{ms(lat['predicted_ms'])}, measured {ms(lat['measured_ms'])} "
                   f"({lat['statistic']} of {lat['repeats']} calls; median "
                   f"{ms(lat['measured_median_ms'])})")
    else:
        say(quiet, f"[retrain] latency: predicted {ms(lat['predicted_ms'])}; {lat['note']}")


def _export(result: dict, job: RetrainJob, export: str, input_size: int | None,
            quiet: bool) -> None:
    done = export_checkpoint(job.folder / "model.pt", to=export, force=True,
                             input_size=input_size)
    result["export"] = {"path": str(done.path), "format": export,
                        "max_abs_diff": done.max_abs_diff}
    say(quiet, f"[retrain] exported {done.path} (max abs logit difference "
               f"{done.max_abs_diff:.3g})")


def _check_request(exp_dir: Path, epochs: int | None, export: str | None) -> None:
    """What is refused before the experiment is read."""
    if export is not None and check_format(export) == "onnx":  # before hours of training
        require_onnx()
    if not exp_dir.is_dir():
        raise UserError(f"--experiment {exp_dir}: no such folder")
    if epochs is not None and epochs < 0:
        raise UserError(f"--epochs must be >= 0, got {epochs}")


def retrain_experiment(exp_dir: str | os.PathLike, pick: str | Pick = "knee", *,
                       workers: int | None = None, epochs: int | None = None,
                       quiet: bool = False, address: str | None = None,
                       normalize: Any = None, force_normalize: bool = False,
                       export: str | None = None) -> dict[str, Any]:
    """Retrain the configuration ``pick`` names; returns (and writes) its result.json.

    The retrain normalises as the search's baseline was recorded (``baseline.pt``);
    ``normalize`` (``cifar``, ``imagenet``, ``MEAN/STD``) that contradicts the record is
    an error unless ``force_normalize``. ``export`` (onnx or pt2) also writes
    ``model.onnx``/``model.pt2`` beside ``model.pt``
    (:func:`sketch_core.io.export.export_checkpoint`).
    """
    exp_dir = Path(exp_dir).expanduser().resolve()
    _check_request(exp_dir, epochs, export)
    manifest, config = read_manifest(exp_dir), load_experiment_config(exp_dir)
    workers = workers or config.retrain.workers
    if workers < 1:  # refused before the pick's folder is made
        raise UserError(f"--workers must be at least 1, got {workers}")
    norm = _normalize(exp_dir, normalize, force_normalize)
    pick = parse_pick(pick) if isinstance(pick, str) else pick
    rec = select_record(read_records(exp_dir / "trials.jsonl"), pick, cost_key(config))
    folder = exp_dir / "retrain" / pick.label
    folder.mkdir(parents=True, exist_ok=True)
    job = _job(config, manifest, exp_dir, rec, epochs, norm, folder, quiet)
    say(quiet, f"[retrain] {pick.label}: trial {rec.trial_id} (val acc {pct(rec.val_acc)} "
               f"after {rec.epochs} epochs, FLOPs {pct(rec.flops_ratio)} of the baseline), "
               f"{job.recipe.epochs} epochs{f' on {workers} workers' if workers > 1 else ''}")
    t0 = time.time()
    use_gpu = config.retrain.gpus_per_worker > 0 or config.resources.gpu > 0
    out = _distributed(job, workers, use_gpu, address) if workers > 1 else run_retrain_job(job)
    base = manifest["baseline"]
    result = _result(rec, pick, out, base, manifest, workers, time.time() - t0, job)
    _latency(result, measure_pick(exp_dir, config, base, result["widths"], rec.latency_ms), quiet)
    if export is not None:
        _export(result, job, export, base.get("input_size") or config.model.input_size, quiet)
    atomic_write_json(folder / "result.json", result)
    on = (f" on the {result['test_images']} test images no choice saw"
          if result["val_source"] == "test_holdout" else "")
    say(quiet, f"[retrain] test acc {pct(result['test_acc'])}{on} (baseline "
               f"{pct(base.get('test_acc'))}), FLOPs {millions(result['flops'])} (-"
               f"{pct(result['flops_reduction'])}), params {millions(result['params'])} (-"
               f"{pct(result['params_reduction'])}) in {result['time_s']:.0f}s; model "
               f"{folder / 'model.pt'}")
    return result
