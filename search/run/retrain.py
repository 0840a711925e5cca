"""The final run: pick a configuration of a search and retrain it on the full schedule.

:func:`retrain_experiment` reads the experiment folder (config.yaml, manifest.json,
trials.jsonl, baseline.pt), picks a trial (:mod:`search.results.picks`: ``knee``, ``best``,
``flops<=F``, ``latency<=L``, ``trial=ID``; the knee on the search's cost axis), sketches the baseline at the trial's exact widths with
the search's sketch options, recalibrates BN and fine-tunes with ``retrain``'s
schedule (the original's 150 epochs with decay at 50 and 100 for CIFAR), keeping the
best epoch on the images the search chose on (the manifest's ``scores``,
:mod:`search.experiment.scoring_split`: the validation split held out of the training split, or the
held-out test images with ``val_source: test_holdout``, whose test accuracy is then
measured on the other test images only). It writes ``retrain/<pick>/``: ``model.pt`` (a
sketchtune checkpoint that ``sketch --test_only --refine`` and ``info
--sketch_model`` read), ``metrics.csv`` (one row per epoch), ``train_state.pt`` (an
interrupted retrain continues from it) and ``result.json`` (test accuracy with
``val_source`` and ``test_images``, the number of test images it was measured on,
FLOPs, params and their reductions; for a search priced by latency, the pick's
predicted latency beside its latency measured here on the table's target). ``workers > 1`` trains data-parallel through Ray
Train's TorchTrainer (:mod:`search.run.data_parallel`; train_holdout searches only).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from search.experiment.config import SearchConfig, config_from_dict
from search.experiment.latency_source import cost_key, measure_pick
from search.results.picks import Pick, parse_pick, select_record
from search.results.trials_file import read_records
from sketch_core.io.atomic import atomic_copy, atomic_write_json
from sketch_core.errors import UserError

__all__ = ["retrain_experiment", "load_experiment_config"]

STATE_FILE = "train_state.pt"


def load_experiment_config(exp_dir: Path) -> SearchConfig:
    path = exp_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{exp_dir} holds no experiment (no config.yaml); expected the folder "
                        f"a `launch.py search` wrote") from None
    return config_from_dict(data, source=str(path))


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _single(config: SearchConfig, exp_dir: Path, job: Path, rec: dict, manifest: dict,
            epochs: int, quiet: bool, normalize: Any = None) -> dict[str, Any]:
    """Retrain in this process on its best device; resumes from job/train_state.pt."""
    from search.experiment.baseline import load_baseline_file, load_search_data, set_cpu_threads
    from search.experiment.scoring_split import data_val_fraction, split_record
    from sketch_core.data.sets import loader_rows
    from sketch_core.pruning.bn import recalibrate_bn
    from sketch_core.io.checkpoint import save_checkpoint
    from sketch_core.cost.flops import count_flops
    from sketch_core.pruning.prune import sketch
    from sketch_core.registry import resolve_arch
    from sketch_core.training.loop import evaluate, fit, load_state, resolve_device

    m, s, rt = config.model, config.sketch, config.retrain
    b = manifest["baseline"]
    device = resolve_device(None)
    data = load_search_data(config, batch_size=rt.batch_size, device=str(device),
                            normalize=normalize, scores=_scores(manifest))
    entry = resolve_arch(m.cfg, m.data_set, family=b.get("family") or m.family,
                         input_size=data.input_size)
    if device.type == "cpu":
        set_cpu_threads(config, data)
    rates = [float(r) for r in rec["rates"]]
    widths = rec.get("widths")
    state_path = job / STATE_FILE
    start_state = None
    if state_path.is_file():
        start_state = load_state(state_path)
        same = [round(r, 6) for r in start_state["meta"].get("rates", [])] == \
            [round(r, 6) for r in rates] and start_state.get("epochs") == epochs
        if not same:
            start_state = None
    if start_state is not None:
        widths = start_state["meta"]["widths"]
        model = entry.build(widths, b["num_classes"], b["in_channels"])
        _say(quiet, f"[retrain] continuing from {state_path} (epoch {start_state['epoch']})")
        after = start_state["meta"].get("val_acc_sketched")
    else:
        full = load_baseline_file(exp_dir / "baseline.pt", config, b["num_classes"],
                                  b["in_channels"], data.input_size).model.to(device)
        calib = data.calibration_batches(max(1, config.trial.bn_batches))
        model = sketch(full, entry, rates, m.data_set, **s.model_dump(),
                       round_to=config.space.round_to, seed=config.trial.seed, batches=calib,
                       widths=list(widths) if widths else None)
        widths = list(model.sketch_widths)
        recalibrate_bn(model, calib, device)
        after = evaluate(model, data.val, device)["acc"] if data.val is not None else None
        del full
    flops, params = count_flops(model, data.shape)
    meta = {"rates": rates, "widths": list(widths), "val_acc_sketched": after}
    result = fit(model, data, epochs=epochs, lr=rt.lr, momentum=rt.momentum,
                 weight_decay=rt.weight_decay, lr_decay_step=rt.lr_decay_step,
                 label_smoothing=config.trial.label_smoothing, device=device, job_dir=job,
                 seed=config.trial.seed, progress=not quiet, start_state=start_state,
                 state_path=state_path, state_meta=meta)
    model.load_state_dict(result.best_state)
    test = evaluate(model, data.test, device)
    scores = _scores(manifest)
    metrics = {"test_acc": test["acc"], "val_acc": result.best_val_acc, "flops": flops,
               "params": params, "best_epoch": result.best_epoch, "epochs": epochs,
               "val_source": scores["val_source"], "test_images": len(loader_rows(data.test))}
    split = {**split_record(config), "val_fraction": data_val_fraction(config.trial,
                                                                       scores["val_source"])}
    save_checkpoint(str(job / "model.pt"), model.cpu(), cfg=entry,
                    num_classes=b["num_classes"], in_channels=b["in_channels"], rates=rates,
                    widths=list(widths), metrics=metrics,
                    extra={"sketch_mode": s.mode, "select_by": s.select_by,
                           "trial_id": rec.get("trial_id"), "experiment": str(exp_dir)},
                    normalize=data.normalize, split=split)
    return {"test_acc": test["acc"], "test_top5": test["top5"], "val_acc": result.best_val_acc,
            "test_images": metrics["test_images"],
            "val_images": 0 if data.val is None else len(loader_rows(data.val)),
            "best_epoch": result.best_epoch, "flops": flops, "params": params,
            "widths": list(widths), "val_acc_sketched": after}


def _scores(manifest: dict) -> dict:
    """The search's record of which images choose and report (older searches: train_holdout)."""
    return manifest.get("scores") or {"val_source": "train_holdout"}


def _check_distributed(config: SearchConfig, manifest: dict) -> None:
    """UserError when a data-parallel retrain cannot reproduce this search's pick."""
    if _scores(manifest)["val_source"] == "test_holdout":
        raise UserError("retrain --workers > 1 chooses its best epoch on the validation split "
                        "held out of the training split, but this search chose on held-out "
                        "test images (val_source test_holdout); retrain with --workers 1")
    if config.space.round_to > 1:
        raise UserError("retrain --workers > 1 cannot reproduce widths rounded by "
                        "space.round_to > 1; retrain with --workers 1")
    m = config.model
    if m.synthetic and set(m.synthetic) - {"num_classes"}:
        raise UserError("retrain --workers > 1 supports synthetic data only with default "
                        "options (model.synthetic other than num_classes); use --workers 1")


def _distributed(config: SearchConfig, exp_dir: Path, job: Path, rec: dict, epochs: int,
                 workers: int, address: str | None, manifest: dict, normalize: Any = None,
                 family: str | None = None) -> dict[str, Any]:
    """Data-parallel retrain through the single-shot command's Ray Train path."""
    from search.run.data_parallel import run_distributed
    from search.run.ray_session import ray_session
    from sketch_core.job_spec import DataSpec, ModelSpec, OutputSpec, RunSpec, SketchSpec, TrainSpec

    m, s, rt = config.model, config.sketch, config.retrain  # _check_distributed ran first
    use_gpu = rt.gpus_per_worker > 0 or config.resources.gpu > 0
    spec = RunSpec(
        command="sketch",
        data=DataSpec(data_set=m.data_set, data_path=m.data_path or None,
                      train_batch_size=rt.batch_size, val_fraction=config.trial.val_fraction,
                      seed=config.trial.seed, input_size=m.input_size or None,
                      num_classes=(m.synthetic or {}).get("num_classes")),
        model=ModelSpec(cfg=m.cfg, sketch_model=str(exp_dir / "baseline.pt"), family=family,
                        normalize=normalize, force_normalize=normalize is not None),
        sketch=SketchSpec(rates=[float(r) for r in rec["rates"]], mode=s.mode,
                          select_by=s.select_by, weight_norm_method=s.weight_norm_method or None,
                          filter_norm=s.filter_norm, sketch_bn=s.sketch_bn,
                          sketch_lastconv=s.sketch_lastconv,
                          start_conv=1 if s.start_conv is None else s.start_conv,
                          random_rule=s.random_rule,
                          calibration_batches=max(1, config.trial.bn_batches)),
        train=TrainSpec(epochs=epochs, lr=rt.lr, momentum=rt.momentum,
                        weight_decay=rt.weight_decay,
                        lr_decay_step=list(rt.lr_decay_step) if rt.lr_decay_step else None),
        output=OutputSpec(job_dir=str(job / "distributed"), reset=True, progress=False),
        gpus=list(range(workers)) if use_gpu else None)
    with ray_session(address) as _:  # run_distributed uses the instance it finds running
        out = run_distributed(spec, use_gpu=use_gpu, num_workers=workers)
    src = Path(out.get("checkpoint") or job / "distributed" / "checkpoint" / "model_best.pt")
    atomic_copy(src, job / "model.pt")
    metrics_csv = job / "distributed" / "metrics.csv"
    if metrics_csv.is_file():
        shutil.copyfile(metrics_csv, job / "metrics.csv")
    return {"test_acc": out.get("test_acc"), "test_top5": out.get("test_top5"),
            "val_acc": out.get("best_val_acc"), "best_epoch": out.get("best_epoch"),
            "flops": out.get("flops"), "params": out.get("params"), "widths": out.get("widths"),
            "val_acc_sketched": out.get("acc_after_sketch")}


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
    (:func:`sketch_core.io.export.export_checkpoint`); its path and logit difference go into
    result.json under ``export``.
    """
    from search.experiment.folder import read_manifest

    if export is not None:  # refused before hours of training, not after
        from sketch_core.io.export import check_format, require_onnx

        if check_format(export) == "onnx":
            require_onnx()

    exp_dir = Path(exp_dir).expanduser().resolve()
    if not exp_dir.is_dir():
        raise UserError(f"--experiment {exp_dir}: no such folder")
    manifest = read_manifest(exp_dir)
    config = load_experiment_config(exp_dir)
    norm = _retrain_normalize(exp_dir, normalize, force_normalize)
    pick = parse_pick(pick) if isinstance(pick, str) else pick
    records = read_records(exp_dir / "trials.jsonl")
    rec = select_record(records, pick, cost_key(config))
    workers = workers or config.retrain.workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    epochs = config.retrain.epochs if epochs is None else epochs
    if epochs < 0:
        raise UserError(f"--epochs must be >= 0, got {epochs}")
    if workers > 1:  # refused before the pick's folder is made
        _check_distributed(config, manifest)
    job = exp_dir / "retrain" / pick.label
    job.mkdir(parents=True, exist_ok=True)
    base = manifest["baseline"]
    _say(quiet, f"[retrain] {pick.label}: trial {rec.get('trial_id')} (val acc "
                f"{_pct(rec.get('val_acc'))} after {rec.get('epochs')} epochs, FLOPs "
                f"{_pct(rec.get('flops_ratio'))} of the baseline), {epochs} epochs"
                f"{f' on {workers} workers' if workers > 1 else ''}")
    t0 = time.time()
    if workers > 1:
        out = _distributed(config, exp_dir, job, rec, epochs, workers, address, manifest, norm,
                           manifest["baseline"].get("family"))
    else:
        out = _single(config, exp_dir, job, rec, manifest, epochs, quiet, norm)
    bf, bp = base.get("flops"), base.get("params")
    result = {
        "trial_id": rec.get("trial_id"), "pick": pick.label, "rates": rec.get("rates"),
        "widths": out.get("widths") or rec.get("widths"), "test_acc": out.get("test_acc"),
        "test_top5": out.get("test_top5"), "val_acc": out.get("val_acc"),
        "best_epoch": out.get("best_epoch"), "epochs": epochs,
        "flops": out.get("flops"), "params": out.get("params"),
        "flops_ratio": out["flops"] / bf if bf and out.get("flops") else None,
        "params_ratio": out["params"] / bp if bp and out.get("params") else None,
        "flops_reduction": 1 - out["flops"] / bf if bf and out.get("flops") else None,
        "params_reduction": 1 - out["params"] / bp if bp and out.get("params") else None,
        "baseline_test_acc": base.get("test_acc"), "baseline_val_acc": base.get("val_acc"),
        "baseline_flops": bf, "baseline_params": bp,
        "search_val_acc": rec.get("val_acc"), "val_acc_sketched": out.get("val_acc_sketched"),
        "val_source": _scores(manifest)["val_source"], "test_images": out.get("test_images"),
        "val_images": out.get("val_images"),
        "workers": workers, "time_s": round(time.time() - t0, 3),
        "model": str(job / "model.pt"), "lr": config.retrain.lr,
        "lr_decay_step": list(config.retrain.lr_decay_step),
    }
    if rec.get("latency_ms") is not None:
        result["latency_ms"] = rec["latency_ms"]
        result["latency_ratio"] = rec.get("latency_ratio")
    lat = measure_pick(exp_dir, config, base, result["widths"], rec.get("latency_ms"))
    if lat is not None:
        result["latency"] = lat
        if lat.get("measured_ms") is not None:
            _say(quiet, f"[retrain] latency on {lat['device']}/{lat['runtime']} (batch "
                        f"{lat['batch']}, {lat['threads']} thread(s)): predicted "
                        f"{_ms(lat['predicted_ms'])}, measured {_ms(lat['measured_ms'])} "
                        f"({lat['statistic']} of {lat['repeats']} calls; median "
                        f"{_ms(lat['measured_median_ms'])})")
        else:
            _say(quiet, f"[retrain] latency: predicted {_ms(lat['predicted_ms'])}; {lat['note']}")
    if export is not None:
        from sketch_core.io.export import export_checkpoint

        done = export_checkpoint(job / "model.pt", to=export, force=True,
                                 input_size=base.get("input_size") or config.model.input_size or None)
        result["export"] = {"path": str(done.path), "format": export,
                            "max_abs_diff": done.max_abs_diff}
        _say(quiet, f"[retrain] exported {done.path} (max abs logit difference "
                    f"{done.max_abs_diff:.3g})")
    atomic_write_json(job / "result.json", result)
    _say(quiet, f"[retrain] test acc {_pct(result['test_acc'])}{_on(result)} (baseline "
                f"{_pct(base.get('test_acc'))}), FLOPs {_m(result['flops'])} (-"
                f"{_pct(result['flops_reduction'])}), params {_m(result['params'])} (-"
                f"{_pct(result['params_reduction'])}) in {result['time_s']:.0f}s; model "
                f"{job / 'model.pt'}")
    return result


def _retrain_normalize(exp_dir: Path, normalize: Any, force: bool) -> Any:
    """baseline.pt's recorded normalisation, or ``normalize`` (checked against it)."""
    from sketch_core.io.checkpoint import read_record
    from sketch_core.data.normalize import choose_normalize, parse_normalize

    if force and normalize is None:
        raise UserError("--force_normalize overrides the baseline's normalisation with "
                        "--normalize: give --normalize too")
    path = exp_dir / "baseline.pt"
    recorded = read_record(path).get("normalize") if path.is_file() else None
    if normalize is not None:
        parse_normalize(normalize)
    return choose_normalize(normalize, recorded, force=force, source=str(path))


def _on(result: dict) -> str:
    """`` on the N test images no choice saw`` (test_holdout), else nothing."""
    if result.get("val_source") != "test_holdout":
        return ""
    return f" on the {result.get('test_images')} test images no choice saw"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}%"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{float(x):.3f} ms"


def _m(x: Any) -> str:
    return "-" if x is None else f"{float(x) / 1e6:.2f}M"
