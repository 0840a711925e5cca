"""One ``sketch`` or ``pretrain`` run from a :class:`~sketch_core.job_spec.RunSpec`.

:func:`execute` checks the spec, prepares the job folder and runs: load (or build),
sketch at the spec's rates, recalibrate BN, fine-tune, save, test. It keeps
``checkpoint/model_last.pt`` and ``checkpoint/model_best.pt`` (best on the validation
split), ``checkpoint/train_state.pt`` (what ``resume`` continues from), ``metrics.csv``,
``logger.log`` and ``result.json`` in the job folder. The run-level steps are public
too, for drivers that split them (the command line, Ray Train workers):
:func:`resolve` (the command's defaults), :func:`check_spec`, :func:`preflight`,
:func:`select_devices`, :func:`prepare_job_dir` and :func:`logging_to`.

Error messages name the command-line options (``--num_epochs``), which the spec's
fields mirror one to one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sketch_core.errors import UserError
from sketch_core.data.normalize import as_record
from sketch_core.pruning.prune import SKETCH_MODES
from sketch_core.job_spec import RunSpec, SketchSpec

__all__ = ["execute", "resolve", "check_spec", "preflight", "select_devices", "prepare_job_dir",
           "job_folder", "logging_to", "run_defaults", "PRETRAIN_DEFAULTS", "SKETCH_DEFAULTS",
           "COMPILE_MODES", "JOB_FILES", "STATE_FILE", "RUN_KEYS"]

log = logging.getLogger("sketchtune")

# what a run writes into the job folder (and what reset removes; nothing else is touched)
JOB_FILES = ("checkpoint", "metrics.csv", "logger.log", "result.json", "tensorboard", "ray")
STATE_FILE = "train_state.pt"
# what makes a job folder hold a run (a failed start leaves none of these)
RUN_MARKERS = ("checkpoint/" + STATE_FILE, "checkpoint/model_last.pt", "checkpoint/model_best.pt",
               "metrics.csv", "result.json")
# pretrain defaults per data set (sketch keeps the original's 150 epochs at lr 0.01)
PRETRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"num_epochs": 40, "lr": 0.1, "lr_decay_step": [20, 30]},
    "synthetic": {"num_epochs": 30, "lr": 0.1, "lr_decay_step": [15, 25]},
    "default": {"num_epochs": 200, "lr": 0.1, "lr_decay_step": [100, 150]},
}
SKETCH_DEFAULTS: dict[str, Any] = {"num_epochs": 150, "lr": 0.01, "lr_decay_step": [50, 100]}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMMANDS = ("sketch", "pretrain")
# what defines a run (the "run" description a training state stores): a resume with
# other values would be another run; only the number of epochs may change
RUN_KEYS = ("command", "data_set", "arch", "cfg", "num_classes", "in_channels",
            "train_batch_size", "momentum", "lr", "lr_decay_step", "weight_decay",
            "label_smoothing", "seed", "val_fraction")


# ---------------------------------------------------------------- checks


def run_defaults(command: str, data_set: str) -> dict[str, Any]:
    """``num_epochs``, ``lr`` and ``lr_decay_step`` of ``command`` on ``data_set``."""
    if command == "pretrain":
        table = PRETRAIN_DEFAULTS.get(data_set, PRETRAIN_DEFAULTS["default"])
    else:
        table = SKETCH_DEFAULTS
    return {k: list(v) if isinstance(v, list) else v for k, v in table.items()}


def resolve(spec: RunSpec) -> RunSpec:
    """A copy of ``spec`` with the command's defaults filled in (the spec is not changed)."""
    if spec.command not in COMMANDS:
        raise UserError(f"unknown command {spec.command!r}; valid: {', '.join(COMMANDS)}")
    d = run_defaults(spec.command, spec.data.data_set)
    t = spec.train
    train = dataclasses.replace(
        t, epochs=d["num_epochs"] if t.epochs is None else t.epochs,
        lr=d["lr"] if t.lr is None else t.lr,
        lr_decay_step=list(d["lr_decay_step"] if t.lr_decay_step is None else t.lr_decay_step))
    sketch = spec.sketch
    if spec.command == "sketch":
        sketch = dataclasses.replace(sketch) if sketch is not None else SketchSpec()
    elif sketch is not None:
        raise UserError("pretrain trains an unpruned model: it takes no sketch options "
                        "(leave RunSpec.sketch None)")
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data),
                               model=dataclasses.replace(spec.model), sketch=sketch, train=train,
                               output=dataclasses.replace(spec.output),
                               gpus=None if spec.gpus is None else list(spec.gpus))


def check_spec(spec: RunSpec) -> RunSpec:
    """Bad numbers and combinations, before anything is loaded or written; the resolved spec."""
    spec = resolve(spec)
    t, d, s = spec.train, spec.data, spec.sketch
    if t.epochs < 0:
        raise UserError(f"--num_epochs must be >= 0, got {t.epochs}")
    if d.train_batch_size < 1 or d.eval_batch_size < 1:
        raise UserError(f"batch sizes must be positive, got --train_batch_size "
                        f"{d.train_batch_size} --eval_batch_size {d.eval_batch_size}")
    steps = list(t.lr_decay_step)
    if steps != sorted(steps) or (steps and min(steps) < 0):
        raise UserError(f"--lr_decay_step must list epochs in increasing order, got "
                        f"{' '.join(map(str, steps))}")
    if t.lr <= 0 or t.momentum < 0 or t.weight_decay < 0:
        raise UserError(f"--lr must be positive and --momentum, --weight_decay non-negative; got "
                        f"{t.lr}, {t.momentum}, {t.weight_decay}")
    if not 0 <= d.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {d.val_fraction}")
    if not 0 <= t.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if s is not None and s.calibration_batches < 1:
        raise UserError(f"--calibration_batches must be >= 1, got {s.calibration_batches}")
    if spec.output.reset and spec.resume:
        raise UserError("--reset would delete what --resume continues from; use one of them")
    if spec.model.refine and spec.resume:
        raise UserError("--refine starts a new fine-tune and --resume continues one; use one")
    if t.compile not in (False, True) and t.compile not in COMPILE_MODES:
        raise UserError(f"unknown --compile mode {t.compile!r}; valid: "
                        f"{', '.join(COMPILE_MODES)}")
    if s is not None:  # sketch: its choices before anything is loaded
        from sketch_core.pruning.prune import check_options

        check_options(s.mode, s.select_by, s.random_rule, s.weight_norm_method)
    _check_model_options(spec)
    return spec


def _check_model_options(spec: RunSpec) -> None:
    """``family``, ``init``, ``normalize``: known values, and a normalisation that agrees
    with the starting checkpoint's record (read here, before anything is written)."""
    from sketch_core.data.normalize import check_channels, parse_normalize
    from sketch_core.registry import FAMILIES

    m = spec.model
    if m.family is not None and m.family not in FAMILIES:
        raise UserError(f"unknown --family {m.family!r}; valid: {', '.join(FAMILIES)}")
    if m.init is not None:
        if spec.command != "pretrain":
            raise UserError("--init is a pretrain option (sketch starts from --sketch_model)")
        if spec.resume:
            raise UserError("--init starts a new training and --resume continues one; use one")
        if not Path(m.init).expanduser().is_file():
            raise UserError(f"--init {m.init}: checkpoint does not exist")
    if m.force_normalize and m.normalize is None:
        raise UserError("--force_normalize overrides a checkpoint's normalisation with "
                        "--normalize: give --normalize too")
    if m.family is not None and m.cfg:
        _arch(spec, m.cfg, _input_size_hint(spec))  # --family cifar --cfg densenet121
    if m.normalize is not None:
        channels = DATA_CHANNELS.get(spec.data.data_set)
        check_channels(parse_normalize(m.normalize), channels, f"data set {spec.data.data_set}")
    if m.normalize is not None or m.family is not None:
        recorded, family, source = _source_record(spec)
        if m.family is not None and family is not None and family != m.family:
            raise UserError(f"--family {m.family}: {source} holds a {family}-family network")
        run_normalize(spec, (recorded, source))


# channels of each data set's images, for checks before the data is loaded
DATA_CHANNELS = {"cifar10": 3, "imagenet": 3, "folder": 3, "digits": 1, "synthetic": 3}


def _input_size_hint(spec: RunSpec) -> int | None:
    """The input size the data will have, without loading it (None: the family's default)."""
    d = spec.data
    if d.input_size:
        return d.input_size
    if d.data_set == "folder" and d.data_path is not None:
        from sketch_core.data.folder_cache import default_input_size

        return default_input_size(d.data_path)
    return 224 if d.data_set == "imagenet" else None


def _arch(spec: RunSpec, cfg, input_size: int | None, family: str | None = None):
    """The architecture ``cfg`` means for this run (``--family``, else the family rule)."""
    from sketch_core.registry import resolve_arch

    return resolve_arch(cfg, spec.data.data_set, family=family or spec.model.family,
                        arch=spec.model.arch, input_size=input_size)


def _source_record(spec: RunSpec) -> tuple[Any, str | None, str | None]:
    """What the starting checkpoint records: (its normalisation, its family, its path);
    None for what it does not say (files of other formats record neither)."""
    from sketch_core.io.checkpoint import FORMAT, read_checkpoint
    from sketch_core.data.normalize import from_record

    m = spec.model
    if spec.resume:
        from sketch_core.training.loop import load_state

        path = _state_path(spec.resume)
        meta = load_state(path)["meta"]
        return from_record(meta.get("normalize")), meta.get("family"), str(path)
    source = m.refine or m.sketch_model if spec.command == "sketch" else m.init
    if spec.test_only and source is None:
        source = m.refine or m.sketch_model
    if source is None or not Path(source).expanduser().is_file():
        return None, None, None
    obj = read_checkpoint(Path(source).expanduser())
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return from_record(obj.get("normalize")), obj.get("family"), str(source)
    return None, None, str(source)


def run_normalize(spec: RunSpec, record: tuple[Any, str | None] | None = None):
    """The ``(mean, std)`` a run normalises with: ``normalize`` when given (an error when
    it contradicts the starting checkpoint's record, unless ``force_normalize``), else
    the record, else None (the data set's own). ``record``: (recorded, path) when read."""
    from sketch_core.data.normalize import choose_normalize

    recorded, source = record if record is not None else _source_record(spec)[::2]
    return choose_normalize(spec.model.normalize, recorded, force=spec.model.force_normalize,
                            source=f"{source}" if source else "the checkpoint")


def select_devices(gpus: list[int] | None) -> list[torch.device]:
    """``--gpus`` as devices: the CPU for the default (or GPU 0) on a machine without CUDA."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ids = [0] if gpus is None else list(gpus)
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus lists a GPU twice: {' '.join(map(str, ids))}")
    if count == 0:
        if ids == [0]:
            print("no CUDA device found: running on the CPU")
            return [torch.device("cpu")]
        raise UserError(f"--gpus {' '.join(map(str, ids))}: this machine has no CUDA device "
                        f"(the default --gpus 0 runs on the CPU)")
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UserError(f"--gpus {' '.join(map(str, bad))}: no such GPU; this machine has {count} "
                        f"(ids 0..{count - 1})")
    return [torch.device("cuda", i) for i in ids]


def _state_path(resume: str | os.PathLike) -> Path:
    """The training state ``resume`` names: the file itself, one beside it, or the job's."""
    p = Path(resume).expanduser()
    if p.is_dir():
        cands = [p / "checkpoint" / STATE_FILE, p / STATE_FILE]
    else:
        cands = [p] if p.name == STATE_FILE else [p.parent / STATE_FILE, p]
    for cand in cands:
        if cand.is_file():
            return cand
    raise UserError(f"--resume {resume}: no training state found; expected "
                    f"JOB_DIR/checkpoint/{STATE_FILE} (or model_last.pt beside it, or JOB_DIR)")


def _sketch_source(spec: RunSpec) -> str:
    """The checkpoint a (non-resumed) sketch run starts from; a UserError when there is none."""
    source = spec.model.refine or spec.model.sketch_model
    if source is None:
        raise UserError("sketch needs --sketch_model (the pretrained checkpoint to sketch), or "
                        "--refine (an already sketched checkpoint to fine-tune)")
    if not Path(source).expanduser().is_file():
        raise UserError(f"checkpoint {source} does not exist")
    return str(source)


def preflight(spec: RunSpec) -> RunSpec:
    """What can be checked before workers start (data-parallel runs), so that the driver
    says it in one line: the options, the starting checkpoint and the rate count.
    Returns the resolved spec."""
    from sketch_core.rates import parse_rates

    spec = check_spec(spec)
    if spec.command != "sketch" or spec.resume:
        return spec
    _sketch_source(spec)
    s = spec.sketch
    if s.rates and spec.model.cfg and not spec.model.refine:
        parse_rates(s.rates, _arch(spec, spec.model.cfg, _input_size_hint(spec)), start_conv=s.start_conv)
    return spec


def prepare_job_dir(spec: RunSpec) -> Path:
    """Refuse to overwrite an earlier run; ``reset`` removes this tool's files first."""
    job = Path(spec.output.job_dir).expanduser()
    if spec.output.reset:
        for name in JOB_FILES:
            path = job / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    present = [name for name in RUN_MARKERS if (job / name).exists()]
    if present and not spec.resume:
        raise UserError(f"--job_dir {job} already holds a run ({', '.join(present)}); pass "
                        f"--resume {job / 'checkpoint' / STATE_FILE} to continue it, --reset to "
                        f"start over, or another --job_dir")
    (job / "checkpoint").mkdir(parents=True, exist_ok=True)
    return job


@contextlib.contextmanager
def job_folder(spec: RunSpec) -> Iterator[Path]:
    """:func:`prepare_job_dir` for the span of a run; bad input leaves no folder behind.

    When the run ends in a :class:`UserError` (a data folder, checkpoint or class count
    found wrong after the folder was made) and this run created the folder, it is removed
    again if it holds nothing but an empty ``checkpoint/`` and the run's log.
    """
    fresh = not Path(spec.output.job_dir).expanduser().exists()
    job = prepare_job_dir(spec)
    try:
        yield job
    except UserError:
        if fresh:
            _drop_empty_job_dir(job)
        raise


@contextlib.contextmanager
def logging_to(job: Path | None, enabled: bool = True) -> Iterator[None]:
    """Log lines to stdout and JOB_DIR/logger.log for the duration of a run (or nowhere)."""
    handlers: list[logging.Handler] = []
    if enabled:
        handlers.append(logging.StreamHandler(sys.stdout))
        if job is not None:
            handlers.append(logging.FileHandler(job / "logger.log"))
            handlers[1].setFormatter(logging.Formatter("%(asctime)s %(message)s",
                                                       "%Y-%m-%d %H:%M:%S"))
    old = log.level, log.propagate
    log.setLevel(logging.INFO if enabled else logging.WARNING)
    log.propagate = False  # not twice through a root logger that a host (Ray) configured
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old[0])
        log.propagate = old[1]


# ---------------------------------------------------------------- running


def _load_data(spec: RunSpec, device: torch.device):
    from sketch_core.data.sets import load_data

    d = spec.data
    normalize = run_normalize(spec)
    synthetic = {"num_classes": d.num_classes} if d.num_classes else None
    data = load_data(d.data_set, None if d.data_path is None else str(d.data_path),
                     batch_size=d.train_batch_size, eval_batch_size=d.eval_batch_size,
                     val_fraction=d.val_fraction, seed=d.seed, device=device,
                     download=d.download, input_size=d.input_size, num_workers=d.num_workers,
                     synthetic=synthetic if d.data_set == "synthetic" else None,
                     normalize=normalize)
    if d.num_classes and d.num_classes != data.num_classes:
        raise UserError(f"--num_classes {d.num_classes} but {d.data_set} has "
                        f"{data.num_classes} classes")
    return data


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
    from sketch_core.rates import format_rates

    return rates if isinstance(rates, str) else format_rates(list(rates))


def _check_forward(model: torch.nn.Module, data, cfg: str) -> None:
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


def _describe(spec: RunSpec, data) -> dict[str, Any]:
    """The run-defining description (:data:`RUN_KEYS` and the input size) a state stores."""
    d, t = spec.data, spec.train
    return {"command": spec.command, "data_set": d.data_set, "arch": spec.model.arch,
            "cfg": spec.model.cfg, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "input_size": data.input_size,
            "train_batch_size": d.train_batch_size, "momentum": t.momentum, "lr": t.lr,
            "lr_decay_step": list(t.lr_decay_step), "weight_decay": t.weight_decay,
            "label_smoothing": t.label_smoothing, "seed": d.seed, "val_fraction": d.val_fraction,
            "family": data.family if spec.model.family is None else spec.model.family,
            "normalize": as_record(data.normalize)}


def _split_record(spec: RunSpec, meta: dict[str, Any] | None = None) -> dict[str, Any]:
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
    meta = meta or {}
    if "weights_from" in meta:
        inherited = meta.get("weights_split")
        clean = {k: (inherited or {}).get(k) for k in split}
        if inherited is None or clean != split or "weights_from" in inherited:
            split.update(weights_from=Path(meta["weights_from"]).name, weights_split=inherited)
    return split


def _check_resume(meta: dict[str, Any], run: dict[str, Any], path: Path) -> None:
    diff = [f"{k}: {meta.get(k)!r} in the checkpoint, {run.get(k)!r} now" for k in RUN_KEYS
            if k in run and run[k] is not None and meta.get(k) != run[k]]
    if diff:
        raise UserError(f"--resume {path} belongs to another configuration ({'; '.join(diff)}); "
                        f"resume with the run's own options, or start a new --job_dir")


def _model_for(spec: RunSpec, data, device: torch.device, run: dict[str, Any]
               ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any] | None]:
    """The model to train, its description and a start state (for a resume)."""
    import sketch_core as sc
    from sketch_core.training.loop import evaluate, load_state

    data_set, s = spec.data.data_set, spec.sketch
    arch, cfg = spec.model.arch, spec.model.cfg
    kw = dict(num_classes=data.num_classes, in_channels=data.in_channels)
    size = data.input_size
    if spec.resume:
        path = _state_path(spec.resume)
        state = load_state(path)
        meta = state["meta"]
        for key, value in (("arch", arch), ("cfg", cfg)):
            if value is None:
                run[key] = meta.get(key)
        entry = _arch(spec, meta["cfg"], size, family=meta.get("family"))
        if s is not None and s.rates and meta.get("rates") is not None:
            rates = sc.parse_rates(s.rates, entry, start_conv=s.start_conv)
            if [round(r, 6) for r in rates] != [round(r, 6) for r in meta["rates"]]:
                raise UserError(f"--resume {path} was sketched at --sketch_rate "
                                f"'{sc.format_rates(meta['rates'])}', not '{_rates_text(s.rates)}'")
        _check_resume(meta, run, path)
        model = sc.build_model(entry, widths=meta.get("widths"), **kw)
        log.info("resuming %s from %s (epoch %d, batch %d)", meta["cfg"], path,
                 state["epoch"] + 1, state["batch"])
        return model.to(device), dict(meta), state

    if spec.command == "pretrain":
        if spec.model.init:
            loaded = sc.load_checkpoint(spec.model.init,
                                        cfg=None if cfg is None else _arch(spec, cfg, size),
                                        data_set=data_set, **kw)
            m = loaded.meta
            if m["pruned"]:
                raise UserError(f"--init {spec.model.init} holds a pruned {m['cfg']}; pretrain "
                                f"--init takes an unpruned network (fine-tune a pruned one with "
                                f"sketch --refine)")
            entry = _arch(spec, m["cfg"], size, family=m["family"])
            _check_family(spec, entry, spec.model.init)
            arch, cfg = entry.arch, entry.cfg
            model = loaded.model.to(device)
            for line in m.get("messages") or ():
                log.info("%s: %s", spec.model.init, line)
            log.info("starting from %s (%s)", spec.model.init, m["format"])
        else:
            arch, cfg = arch or "vgg", cfg or "vgg16"
            entry = _arch(spec, cfg, size)
            model = sc.build_model(entry, **kw).to(device)
        _check_forward(model, data, cfg)
        base_macs, base_params = sc.count_flops(model, data.shape)
        meta = {**run, "arch": arch, "cfg": cfg, "family": entry.family, "rates": None,
                "widths": None, "base_flops": base_macs, "base_params": base_params}
        if spec.model.init:
            meta.update(weights_from=str(spec.model.init), weights_split=m.get("split"))
        return model, meta, None

    source = _sketch_source(spec)
    asked = None if cfg is None else _arch(spec, cfg, size)
    loaded = sc.load_checkpoint(source, cfg=asked, data_set=data_set, **kw)
    m = loaded.meta
    for line in m.get("messages") or ():
        log.info("%s: %s", source, line)
    entry = _arch(spec, m["cfg"], size, family=m["family"])
    _check_family(spec, entry, source)
    cfg = entry.cfg
    arch = arch or m["arch"]
    sc.get_arch(entry, arch=arch)
    model = loaded.model.to(device)
    _check_forward(model, data, cfg)
    full = sc.build_model(entry, **kw)
    base_macs, base_params = sc.count_flops(full, data.shape)
    desc = {**run, "arch": arch, "cfg": cfg, "family": entry.family, "base_flops": base_macs,
            "base_params": base_params, "weights_from": str(source),
            "weights_split": m.get("split")}
    if spec.model.refine:
        log.info("fine-tuning the sketched checkpoint %s", spec.model.refine)
        return model, {**desc, "rates": m.get("rates"), "widths": m.get("widths"),
                       "sketch_mode": (m.get("extra") or {}).get("sketch_mode"),
                       "select_by": (m.get("extra") or {}).get("select_by")}, None

    if not s.rates:
        units = entry.plan(s.start_conv).num_units
        raise UserError(f"--sketch_rate is required to sketch: {cfg} takes {units} rates, "
                        f"e.g. '[0.5]*{units}'")
    rates = sc.parse_rates(s.rates, entry, start_conv=s.start_conv)
    widths = sc.rates_to_widths(entry, rates, start_conv=s.start_conv,
                                sketch_lastconv=s.sketch_lastconv)
    base = evaluate(model, data.val if data.val is not None else data.test, device)
    calib = data.calibration_batches(s.calibration_batches)
    lsq_log: list[str] = []
    narrow = sc.sketch(model, entry, rates, mode=s.mode,
                       weight_norm_method=s.weight_norm_method, filter_norm=s.filter_norm,
                       sketch_bn=s.sketch_bn, sketch_lastconv=s.sketch_lastconv,
                       start_conv=s.start_conv, random_rule=s.random_rule, seed=spec.data.seed,
                       batches=calib, widths=widths, lsq_log=lsq_log, select_by=s.select_by)
    for line in lsq_log:
        log.info("%s", line)
    sc.recalibrate_bn(narrow, calib, device)
    after = evaluate(narrow, data.val if data.val is not None else data.test, device)
    split = "val" if data.val is not None else "test"
    log.info("sketched %s at '%s' (mode %s): %s acc %s before, %s after sketch + BN "
             "recalibration", cfg, sc.format_rates(rates), s.mode, split,
             _pct(base["acc"]), _pct(after["acc"]))
    return narrow, {**desc, "rates": rates, "widths": widths, "sketch_mode": s.mode,
                    "select_by": s.select_by if s.mode not in SKETCH_MODES else None,
                    "acc_before_sketch": base["acc"], "acc_after_sketch": after["acc"]}, None


def _check_family(spec: RunSpec, entry, source: str) -> None:
    if spec.model.family is not None and spec.model.family != entry.family:
        raise UserError(f"--family {spec.model.family}: {source} holds a {entry.family}-family "
                        f"{entry.cfg}")


def _train(spec: RunSpec, device: torch.device, *,
           report: Callable[[dict[str, Any]], None] | None, stop: Callable[[], int] | None,
           rank0: bool) -> dict[str, Any]:
    """The run itself, on a resolved spec and a ready job folder."""
    import sketch_core as sc
    from sketch_core.training.loop import atomic_write_text, evaluate, fit

    t = spec.train
    job = Path(spec.output.job_dir).expanduser()
    ckpt = job / "checkpoint"
    data = _load_data(spec, device)
    run = _describe(spec, data)
    torch.manual_seed(spec.data.seed)  # the initial weights (pretrain) and any sketch randomness
    model, meta, start_state = _model_for(spec, data, device, run)
    macs, params = sc.count_flops(model, data.shape)
    meta.update(flops=macs, params=params)
    base_macs, base_params = meta.get("base_flops") or macs, meta.get("base_params") or params
    log.info("model %s on %s (%s): FLOPs (MACs) %s -> %s (reduced %s), params %s -> %s "
             "(reduced %s)", meta["cfg"], data.name, device, _human(base_macs), _human(macs),
             _reduction(base_macs, macs), _human(base_params), _human(params),
             _reduction(base_params, params))
    data_set = spec.data.data_set
    entry = _arch(spec, meta["cfg"], data.input_size, family=meta.get("family"))
    save_kw = dict(cfg=entry, num_classes=data.num_classes,
                   in_channels=data.in_channels, rates=meta.get("rates"), widths=meta.get("widths"),
                   normalize=data.normalize, split=_split_record(spec, meta))
    extra = {k: meta[k] for k in ("sketch_mode", "select_by", "command")
             if meta.get(k) is not None}

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        row = {k: v for k, v in metrics.items() if v is not None}
        if rank0:
            sc.save_checkpoint(ckpt / "model_last.pt", model, metrics=row, extra=extra, **save_kw)
            if metrics["is_best"]:
                sc.save_checkpoint(ckpt / "model_best.pt", model, metrics=row, extra=extra,
                                   **save_kw)
        if report is not None:
            report(row)

    result = fit(model, data, epochs=t.epochs, lr=t.lr, momentum=t.momentum,
                 weight_decay=t.weight_decay, lr_decay_step=t.lr_decay_step,
                 label_smoothing=t.label_smoothing, device=device, job_dir=job,
                 seed=spec.data.seed, compile=t.compile, amp=t.amp,
                 progress=spec.output.progress, start_state=start_state,
                 state_path=ckpt / STATE_FILE, state_meta=meta, on_epoch=on_epoch, stop=stop)
    model.load_state_dict(result.best_state)
    if t.epochs == 0 and rank0:
        sc.save_checkpoint(ckpt / "model_best.pt", model, metrics={}, extra=extra, **save_kw)
        sc.save_checkpoint(ckpt / "model_last.pt", model, metrics={}, extra=extra, **save_kw)
    test = evaluate(model, data.test, device, amp=t.amp)
    out = {"cfg": meta["cfg"], "data_set": data_set, "rates": meta.get("rates"),
           "widths": meta.get("widths"), "flops": macs, "params": params,
           "base_flops": base_macs, "base_params": base_params,
           "flops_reduction": 1 - macs / base_macs if base_macs else None,
           "params_reduction": 1 - params / base_params if base_params else None,
           "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
           "test_acc": test["acc"], "test_top5": test["top5"], "epochs": t.epochs,
           "acc_before_sketch": meta.get("acc_before_sketch"),
           "acc_after_sketch": meta.get("acc_after_sketch"),
           "checkpoint": str(ckpt / "model_best.pt"), "world_size": _world_size()}
    if rank0:
        atomic_write_text(job / "result.json", json.dumps(out, indent=2))
    log.info("best val acc %s (epoch %d); test acc of the best model %s (top-5 %s)",
             _pct(result.best_val_acc), result.best_epoch + 1, _pct(test["acc"]),
             _pct(test["top5"]))
    log.info("FLOPs (MACs) %s (reduced %s), params %s (reduced %s); best model: %s",
             _human(macs), _reduction(base_macs, macs), _human(params),
             _reduction(base_params, params), ckpt / "model_best.pt")
    return out


def _test_only(spec: RunSpec, device: torch.device) -> dict[str, Any]:
    import sketch_core as sc
    from sketch_core.training.loop import evaluate, load_state

    data = _load_data(spec, device)
    cfg, data_set = spec.model.cfg, spec.data.data_set
    if spec.model.refine or spec.model.sketch_model:
        source = spec.model.refine or spec.model.sketch_model
        asked = None if cfg is None else _arch(spec, cfg, data.input_size)
        loaded = sc.load_checkpoint(source, cfg=asked, data_set=data_set,
                                    num_classes=data.num_classes, in_channels=data.in_channels)
        _check_family(spec, _arch(spec, loaded.meta["cfg"], data.input_size,
                                  family=loaded.meta["family"]), source)
        for line in loaded.meta.get("messages") or ():
            print(f"{source}: {line}")
        model = loaded.model
    elif spec.resume:
        source = _state_path(spec.resume)
        state = load_state(source)
        meta = state["meta"]
        entry = _arch(spec, meta["cfg"], data.input_size, family=meta.get("family"))
        model = sc.build_model(entry, widths=meta.get("widths"),
                               num_classes=data.num_classes, in_channels=data.in_channels)
        model.load_state_dict(state["model"])
    else:
        raise UserError("--test_only evaluates a checkpoint: pass --refine, --resume or "
                        "--sketch_model")
    model = model.to(device)
    _check_forward(model, data, cfg or "the model")
    test = evaluate(model, data.test, device, amp=spec.train.amp)
    macs, params = sc.count_flops(model, data.shape)
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


def _drop_empty_job_dir(job: Path) -> None:
    """Remove a job folder this run made when bad input ended it before anything was saved.

    Only an empty ``checkpoint/`` and the run's log are removed; anything else keeps it all.
    """
    names = {p.name for p in job.iterdir()} if job.is_dir() else set()
    ckpt = job / "checkpoint"
    if names - {"checkpoint", "logger.log"} or (ckpt.is_dir() and any(ckpt.iterdir())):
        return
    (job / "logger.log").unlink(missing_ok=True)
    if ckpt.is_dir():
        ckpt.rmdir()
    job.rmdir()
