"""One ``sketch`` or ``pretrain`` job from a :class:`~sketch_core.job_spec.RunSpec`.

:func:`execute` checks the spec, prepares the job folder and runs the job through the
one pipeline (:func:`sketch_core.pipeline.prune_and_finetune`): it loads (or builds)
the model it starts from, and the pipeline sketches it at the spec's widths,
recalibrates BN, fine-tunes, saves and tests. The folder keeps
``checkpoint/model_last.pt``, ``checkpoint/model_best.pt`` (best on the validation
split), ``checkpoint/train_state.pt`` (what ``resume`` continues from), ``metrics.csv``,
``logger.log`` and ``result.json``. Drivers that split the steps (the command line, Ray
Train workers) use :mod:`sketch_core.job_checks` and :mod:`sketch_core.job_folder`.

Error messages name the command-line options (``--num_epochs``), which the spec's
fields mirror one to one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sketch_core.cost.flops import count_flops
from sketch_core.data.normalize import as_record
from sketch_core.data.request import DataRequest
from sketch_core.data.sets import Data
from sketch_core.errors import UserError
from sketch_core.io.atomic import atomic_write_text
from sketch_core.io.checkpoint import load_checkpoint
from sketch_core.job_checks import (STATE_FILE, check_spec, job_arch, run_normalize,
                                    sketch_source, state_path)
from sketch_core.job_folder import job_folder, logging_to, select_devices
from sketch_core.job_spec import RunSpec
from sketch_core.options import SKETCH_MODES, SketchOptions
from sketch_core.pipeline import CheckpointRecord, Outputs, RunResult, prune_and_finetune
from sketch_core.rates import format_rates, parse_rates, rates_to_widths
from sketch_core.registry import Arch
from sketch_core.training.loop import evaluate, load_state

__all__ = ["execute", "RUN_KEYS"]

log = logging.getLogger("sketchtune")

# what defines a run (the "run" description a training state stores): a resume with
# other values would be another run; only the number of epochs may change
RUN_KEYS = ("command", "data_set", "arch", "cfg", "num_classes", "in_channels",
            "train_batch_size", "momentum", "lr", "lr_decay_step", "weight_decay",
            "label_smoothing", "seed", "val_fraction")


@dataclass
class _Start:
    """What a job trains: the model it starts from and how the pipeline treats it."""

    model: nn.Module
    arch: Arch
    meta: dict[str, Any]
    widths: list[int] | None = None          # prune to these (None: train it as it is)
    options: SketchOptions | None = None
    state: dict[str, Any] | None = None      # a resumed run's training state


# ---------------------------------------------------------------- small helpers


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _reduction(before: int, after: int) -> str:
    return f"{100 * (1 - after / before):.2f}%" if before else "n/a"


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _rates_text(rates: Any) -> str:
    return rates if isinstance(rates, str) else format_rates(list(rates))


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _load_data(spec: RunSpec, device: torch.device) -> Data:
    d = spec.data
    synthetic = {"num_classes": d.num_classes} if d.num_classes else None
    request = DataRequest(
        d.data_set, None if d.data_path is None else str(d.data_path),
        batch_size=spec.train.batch_size, eval_batch_size=d.eval_batch_size,
        val_fraction=d.val_fraction, seed=d.seed, input_size=d.input_size,
        synthetic=synthetic if d.data_set == "synthetic" else None,
        normalize=run_normalize(spec), download=d.download, num_workers=d.num_workers)
    data = request.load(device)
    if d.num_classes and d.num_classes != data.num_classes:
        raise UserError(f"--num_classes {d.num_classes} but {d.data_set} has "
                        f"{data.num_classes} classes")
    return data


def _check_forward(model: nn.Module, data: Data, cfg: str) -> None:
    """Fail with one clear line when the model cannot take the data's images."""
    x = torch.zeros(2, *data.shape, device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        raise UserError(f"{cfg} cannot take {data.name}'s {data.input_size}x{data.input_size} "
                        f"images with {data.in_channels} channel(s) ({str(exc).splitlines()[0]}); "
                        f"choose a smaller --cfg or a larger --input_size") from None
    finally:
        model.train(was)
    if out.shape[-1] != data.num_classes:
        raise UserError(f"the model has {out.shape[-1]} outputs but {data.name} has "
                        f"{data.num_classes} classes")


def _describe(spec: RunSpec, data: Data) -> dict[str, Any]:
    """The run-defining description (:data:`RUN_KEYS` and the input size) a state stores."""
    d, t = spec.data, spec.train
    return {"command": spec.command, "data_set": d.data_set, "arch": spec.model.arch,
            "cfg": spec.model.cfg, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "input_size": data.input_size,
            "train_batch_size": t.batch_size, "momentum": t.momentum, "lr": t.lr,
            "lr_decay_step": list(t.lr_decay_step), "weight_decay": t.weight_decay,
            "label_smoothing": t.label_smoothing, "seed": d.seed, "val_fraction": d.val_fraction,
            "family": data.family if spec.model.family is None else spec.model.family,
            "normalize": as_record(data.normalize)}


def _split_record(spec: RunSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """The training split a checkpoint saw (so later runs know which images it never saw).

    A run that started from other weights (``pretrain --init``, a sketch of
    ``--sketch_model``) inherits what those saw: unless their own record names this very
    split, the record says where they came from (``weights_from``, ``weights_split``), so
    that nobody takes its validation images for unseen ones.
    """
    d = spec.data
    path = None if d.data_path is None else str(Path(d.data_path).expanduser().resolve())
    split = {"data_set": d.data_set, "data_path": path, "seed": d.seed,
             "val_fraction": d.val_fraction}
    if "weights_from" in meta:
        inherited = meta.get("weights_split")
        clean = {k: (inherited or {}).get(k) for k in split}
        if inherited is None or clean != split or "weights_from" in inherited:
            split.update(weights_from=Path(meta["weights_from"]).name, weights_split=inherited)
    return split


def _check_family(spec: RunSpec, entry: Arch, source: str) -> None:
    if spec.model.family is not None and spec.model.family != entry.family:
        raise UserError(f"--family {spec.model.family}: {source} holds a {entry.family}-family "
                        f"{entry.cfg}")


def _loaded(spec: RunSpec, data: Data, source: str, cfg: str | None):
    """A checkpoint loaded for the data, checked against --family; (model, meta, arch)."""
    asked = None if cfg is None else job_arch(spec, cfg, data.input_size)
    loaded = load_checkpoint(source, cfg=asked, data_set=spec.data.data_set,
                             num_classes=data.num_classes, in_channels=data.in_channels)
    m = loaded.meta
    entry = job_arch(spec, m["cfg"], data.input_size, family=m["family"])
    _check_family(spec, entry, source)
    for line in m.get("messages") or ():
        log.info("%s: %s", source, line)
    return loaded.model, m, entry


# ---------------------------------------------------------------- where a job starts


def _resumed(spec: RunSpec, data: Data, run: dict[str, Any]) -> _Start:
    path = state_path(spec.resume)
    state = load_state(path)
    meta = state["meta"]
    for key in ("arch", "cfg"):
        if run.get(key) is None:
            run[key] = meta.get(key)
    entry = job_arch(spec, meta["cfg"], data.input_size, family=meta.get("family"))
    s = spec.sketch
    if s is not None and s.rates and meta.get("rates") is not None:
        rates = parse_rates(s.rates, entry, start_conv=s.start_conv)
        if [round(r, 6) for r in rates] != [round(r, 6) for r in meta["rates"]]:
            raise UserError(f"--resume {path} was sketched at --sketch_rate "
                            f"'{format_rates(meta['rates'])}', not '{_rates_text(s.rates)}'")
    diff = [f"{k}: {meta.get(k)!r} in the checkpoint, {run.get(k)!r} now" for k in RUN_KEYS
            if k in run and run[k] is not None and meta.get(k) != run[k]]
    if diff:
        raise UserError(f"--resume {path} belongs to another configuration ({'; '.join(diff)}); "
                        f"resume with the run's own options, or start a new --job_dir")
    widths = meta.get("widths")
    model = entry.build(widths, data.num_classes, data.in_channels)
    log.info("resuming %s from %s (epoch %d, batch %d)", meta["cfg"], path,
             state["epoch"] + 1, state["batch"])
    return _Start(model, entry, dict(meta), widths, None, state)


def _pretrained(spec: RunSpec, data: Data, run: dict[str, Any]) -> _Start:
    m = spec.model
    if m.init:
        model, loaded, entry = _loaded(spec, data, m.init, m.cfg)
        if loaded["pruned"]:
            raise UserError(f"--init {m.init} holds a pruned {loaded['cfg']}; pretrain "
                            f"--init takes an unpruned network (fine-tune a pruned one with "
                            f"sketch --refine)")
        log.info("starting from %s (%s)", m.init, loaded["format"])
        extra = {"weights_from": str(m.init), "weights_split": loaded.get("split")}
    else:
        entry = job_arch(spec, m.cfg or "vgg16", data.input_size)
        model, extra = entry.build(None, data.num_classes, data.in_channels), {}
    base_macs, base_params = count_flops(model, data.shape)
    meta = {**run, "arch": entry.arch if m.init else (m.arch or "vgg"), "cfg": entry.cfg,
            "family": entry.family, "rates": None, "widths": None, "base_flops": base_macs,
            "base_params": base_params, **extra}
    return _Start(model, entry, meta)


def _sketched(spec: RunSpec, data: Data, run: dict[str, Any]) -> _Start:
    source, s = sketch_source(spec), spec.sketch
    model, m, entry = _loaded(spec, data, source, spec.model.cfg)
    arch = spec.model.arch or m["arch"]
    job_arch(spec, entry, data.input_size)  # --arch agrees with the checkpoint's cfg
    base_macs, base_params = count_flops(entry.build(None, data.num_classes, data.in_channels),
                                         data.shape)
    meta = {**run, "arch": arch, "cfg": entry.cfg, "family": entry.family,
            "base_flops": base_macs, "base_params": base_params, "weights_from": source,
            "weights_split": m.get("split")}
    if spec.model.refine:
        log.info("fine-tuning the sketched checkpoint %s", spec.model.refine)
        extra = m.get("extra") or {}
        meta.update(rates=m.get("rates"), widths=m.get("widths"),
                    sketch_mode=extra.get("sketch_mode"), select_by=extra.get("select_by"))
        return _Start(model, entry, meta)
    if not s.rates:
        units = entry.plan(s.start_conv).num_units
        raise UserError(f"--sketch_rate is required to sketch: {entry.cfg} takes {units} rates, "
                        f"e.g. '[0.5]*{units}'")
    entry = entry.with_start_conv(s.start_conv)
    rates = parse_rates(s.rates, entry)
    widths = rates_to_widths(entry, rates, sketch_lastconv=s.sketch_lastconv)
    meta.update(rates=rates, widths=widths, sketch_mode=s.mode,
                select_by=s.select_by if s.mode not in SKETCH_MODES else None)
    return _Start(model, entry, meta, widths, s.options)


def _start(spec: RunSpec, data: Data, device: torch.device) -> _Start:
    run = _describe(spec, data)
    torch.manual_seed(spec.data.seed)  # the initial weights (pretrain) and any sketch randomness
    if spec.resume:
        return _resumed(spec, data, run)
    start = _pretrained(spec, data, run) if spec.command == "pretrain" else \
        _sketched(spec, data, run)
    start.model = start.model.to(device)
    _check_forward(start.model, data, start.arch.cfg)
    return start


# ---------------------------------------------------------------- the job


def _log_start(start: _Start, data: Data, device: torch.device) -> Callable:
    """The pipeline's ``on_pruned``: the sketch's scores and the model's cost, logged."""
    meta = start.meta

    def on_pruned(model: nn.Module, before: Any, sketched: Any) -> None:
        if sketched is not None:
            split = "val" if data.val is not None else "test"
            log.info("sketched %s at '%s' (mode %s): %s acc %s before, %s after sketch + BN "
                     "recalibration", meta["cfg"], format_rates(meta["rates"]),
                     meta["sketch_mode"], split, _pct(before.acc if before else None),
                     _pct(sketched.acc))
        macs, params = count_flops(model, data.shape)
        bm, bp = meta.get("base_flops") or macs, meta.get("base_params") or params
        log.info("model %s on %s (%s): FLOPs (MACs) %s -> %s (reduced %s), params %s -> %s "
                 "(reduced %s)", meta["cfg"], data.name, device, _human(bm), _human(macs),
                 _reduction(bm, macs), _human(bp), _human(params), _reduction(bp, params))
    return on_pruned


def _result(spec: RunSpec, start: _Start, out: RunResult, ckpt: Path) -> dict[str, Any]:
    meta, macs, params = start.meta, out.flops, out.params
    bm, bp = meta.get("base_flops") or macs, meta.get("base_params") or params
    before = out.before.acc if out.before else None
    after = out.sketched.acc if out.sketched else None
    return {"cfg": meta["cfg"], "data_set": spec.data.data_set, "rates": meta.get("rates"),
            "widths": meta.get("widths"), "flops": macs, "params": params,
            "base_flops": bm, "base_params": bp,
            "flops_reduction": 1 - macs / bm if bm else None,
            "params_reduction": 1 - params / bp if bp else None,
            "best_val_acc": out.fit.best_val_acc, "best_epoch": out.fit.best_epoch,
            "test_acc": out.test["acc"], "test_top5": out.test["top5"],
            "epochs": spec.train.epochs, "acc_before_sketch": before,
            "acc_after_sketch": after, "checkpoint": str(ckpt / "model_best.pt"),
            "world_size": _world_size()}


def _train(spec: RunSpec, device: torch.device, *,
           report: Callable[[dict[str, Any]], None] | None, stop: Callable[[], int] | None,
           rank0: bool) -> dict[str, Any]:
    """The job itself, on a resolved spec and a ready job folder."""
    job = Path(spec.output.job_dir).expanduser()
    ckpt = job / "checkpoint"
    data = _load_data(spec, device)
    start = _start(spec, data, device)
    meta = start.meta
    extra = {k: meta[k] for k in ("sketch_mode", "select_by", "command") if meta.get(k) is not None}
    outputs = Outputs(job_dir=job, state=ckpt / STATE_FILE, last=ckpt / "model_last.pt",
                      best=ckpt / "model_best.pt", progress=spec.output.progress, rank0=rank0,
                      record=CheckpointRecord(meta.get("rates"), _split_record(spec, meta), extra))
    out = prune_and_finetune(
        start.arch, start.model, start.widths, start.options, spec.train, data, device=device,
        outputs=outputs, report=None if report is None else (lambda _, row: report(row)),
        stop=stop, start_state=start.state, state_meta=meta, test=True,
        evaluate_before=start.options is not None, on_pruned=_log_start(start, data, device))
    result = _result(spec, start, out, ckpt)
    if rank0:
        atomic_write_text(job / "result.json", json.dumps(result, indent=2))
    log.info("best val acc %s (epoch %d); test acc of the best model %s (top-5 %s)",
             _pct(out.fit.best_val_acc), out.fit.best_epoch + 1, _pct(out.test["acc"]),
             _pct(out.test["top5"]))
    log.info("FLOPs (MACs) %s (reduced %s), params %s (reduced %s); best model: %s",
             _human(out.flops), _reduction(result["base_flops"], out.flops), _human(out.params),
             _reduction(result["base_params"], out.params), ckpt / "model_best.pt")
    return result


def _test_only(spec: RunSpec, device: torch.device) -> dict[str, Any]:
    data = _load_data(spec, device)
    if spec.model.refine or spec.model.sketch_model:
        source = spec.model.refine or spec.model.sketch_model
        model, meta, _ = _loaded(spec, data, source, spec.model.cfg)
        for line in meta.get("messages") or ():  # nothing is logged to a file here
            print(f"{source}: {line}")
    elif spec.resume:
        source = state_path(spec.resume)
        state = load_state(source)
        meta = state["meta"]
        entry = job_arch(spec, meta["cfg"], data.input_size, family=meta.get("family"))
        model = entry.build(meta.get("widths"), data.num_classes, data.in_channels)
        model.load_state_dict(state["model"])
    else:
        raise UserError("--test_only evaluates a checkpoint: pass --refine, --resume or "
                        "--sketch_model")
    model = model.to(device)
    _check_forward(model, data, spec.model.cfg or "the model")
    test = evaluate(model, data.test, device, amp=spec.train.amp)
    macs, params = count_flops(model, data.shape)
    print(f"{source}: test acc {_pct(test['acc'])} (top-5 {_pct(test['top5'])}, loss "
          f"{test['loss']:.4f}) on {test['n']} images; FLOPs (MACs) {_human(macs)}, params "
          f"{_human(params)}")
    return {"test_acc": test["acc"], "test_top5": test["top5"], "flops": macs, "params": params}


def execute(spec: RunSpec, device: torch.device | str | None = None, *,
            report: Callable[[dict[str, Any]], None] | None = None,
            stop: Callable[[], int] | None = None, rank0: bool = True,
            prepared: bool = False) -> dict[str, Any]:
    """Run ``spec`` on ``device`` (default: the first of ``spec.gpus``, the CPU without CUDA).

    Checks the spec, prepares the job folder (refusing one that holds another run,
    unless ``output.reset``/``resume``) and logs to ``logger.log`` in it; then loads,
    sketches, fine-tunes, saves and tests. ``prepared=True`` skips the folder and the
    logging, which the caller then owns (the command line, a Ray Train worker).
    ``report(metrics)`` is called after every epoch (Ray Train's report in a worker);
    ``stop()`` is polled between batches (non-zero: save a resumable state and stop);
    only ``rank0`` writes files. Returns the result (also ``JOB_DIR/result.json``); with
    ``test_only``, the test accuracy, FLOPs and params, and nothing is written.
    """
    spec = check_spec(spec)
    if device is None:
        devices = select_devices(spec.gpus)
        if len(devices) > 1:
            raise UserError("several --gpus run through Ray Train: use launch.py or "
                            "search.run.data_parallel.run_distributed")
        device = devices[0]
    device = torch.device(device)
    if spec.test_only:
        return _test_only(spec, device)
    if prepared:
        return _train(spec, device, report=report, stop=stop, rank0=rank0)
    with job_folder(spec) as job, logging_to(job):
        return _train(spec, device, report=report, stop=stop, rank0=rank0)
