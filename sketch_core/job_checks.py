"""Checks of a ``sketch`` / ``pretrain`` job before anything is loaded or written.

:func:`check_spec` resolves a :class:`~sketch_core.job_spec.RunSpec` (the command's
defaults) and refuses bad numbers and combinations in one line naming the command-line
option; :func:`preflight` adds what a data-parallel driver checks before its workers
start (the starting checkpoint, the rate count). The normalisation a job uses
(:func:`run_normalize`) and the checkpoint it starts from are decided here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sketch_core.data.folder_cache import default_input_size
from sketch_core.data.normalize import check_channels, choose_normalize, from_record, parse_normalize
from sketch_core.errors import UserError
from sketch_core.io.checkpoint import FORMAT, read_checkpoint
from sketch_core.job_spec import RunSpec, resolve
from sketch_core.rates import parse_rates
from sketch_core.models.registration import FAMILIES
from sketch_core.registry import Arch, resolve_arch
from sketch_core.training.loop import load_state

__all__ = ["check_spec", "preflight", "run_normalize", "job_arch", "input_size_hint",
           "state_path", "sketch_source", "COMPILE_MODES", "STATE_FILE", "DATA_CHANNELS"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STATE_FILE = "train_state.pt"
# channels of each data set's images, for checks before the data is loaded
DATA_CHANNELS = {"cifar10": 3, "imagenet": 3, "folder": 3, "digits": 1, "synthetic": 3}


def _check_numbers(spec: RunSpec) -> None:
    d, s, t = spec.data, spec.sketch, spec.train
    if t.batch_size < 1 or d.eval_batch_size < 1:
        raise UserError(f"batch sizes must be positive, got --train_batch_size "
                        f"{t.batch_size} --eval_batch_size {d.eval_batch_size}")
    if not 0 <= d.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {d.val_fraction}")
    if s is not None and s.calibration_batches < 1:
        raise UserError(f"--calibration_batches must be >= 1, got {s.calibration_batches}")
    if t.compile not in (False, True) and t.compile not in COMPILE_MODES:
        raise UserError(f"unknown --compile mode {t.compile!r}; valid: "
                        f"{', '.join(COMPILE_MODES)}")


def check_spec(spec: RunSpec) -> RunSpec:
    """Bad numbers and combinations, before anything is loaded or written; the resolved
    spec (the recipe and the sketch options checked their own values when made)."""
    spec = resolve(spec)
    _check_numbers(spec)
    if spec.output.reset and spec.resume:
        raise UserError("--reset would delete what --resume continues from; use one of them")
    if spec.model.refine and spec.resume:
        raise UserError("--refine starts a new fine-tune and --resume continues one; use one")
    _check_model_options(spec)
    return spec


def _check_init(spec: RunSpec) -> None:
    m = spec.model
    if spec.command != "pretrain":
        raise UserError("--init is a pretrain option (sketch starts from --sketch_model)")
    if spec.resume:
        raise UserError("--init starts a new training and --resume continues one; use one")
    if not Path(m.init).expanduser().is_file():
        raise UserError(f"--init {m.init}: checkpoint does not exist")


def _check_model_options(spec: RunSpec) -> None:
    """``family``, ``init``, ``normalize``: known values, and a normalisation that agrees
    with the starting checkpoint's record (read here, before anything is written)."""
    m = spec.model
    if m.family is not None and m.family not in FAMILIES:
        raise UserError(f"unknown --family {m.family!r}; valid: {', '.join(FAMILIES)}")
    if m.init is not None:
        _check_init(spec)
    if m.force_normalize and m.normalize is None:
        raise UserError("--force_normalize overrides a checkpoint's normalisation with "
                        "--normalize: give --normalize too")
    if m.family is not None and m.cfg:
        job_arch(spec, m.cfg, input_size_hint(spec))  # --family cifar --cfg densenet121
    if m.normalize is not None:
        channels = DATA_CHANNELS.get(spec.data.data_set)
        check_channels(parse_normalize(m.normalize), channels, f"data set {spec.data.data_set}")
    if m.normalize is not None or m.family is not None:
        recorded, family, source = _source_record(spec)
        if m.family is not None and family is not None and family != m.family:
            raise UserError(f"--family {m.family}: {source} holds a {family}-family network")
        run_normalize(spec, (recorded, source))


def input_size_hint(spec: RunSpec) -> int | None:
    """The input size the data will have, without loading it (None: the family's default)."""
    d = spec.data
    if d.input_size:
        return d.input_size
    if d.data_set == "folder" and d.data_path is not None:
        return default_input_size(d.data_path)
    return 224 if d.data_set == "imagenet" else None


def job_arch(spec: RunSpec, cfg: str | Arch, input_size: int | None,
             family: str | None = None) -> Arch:
    """The architecture ``cfg`` means for this job (``--family``, else the family rule)."""
    return resolve_arch(cfg, spec.data.data_set, family=family or spec.model.family,
                        arch=spec.model.arch, input_size=input_size)


def _source_record(spec: RunSpec) -> tuple[Any, str | None, str | None]:
    """What the starting checkpoint records: (its normalisation, its family, its path);
    None for what it does not say (files of other formats record neither)."""
    m = spec.model
    if spec.resume:
        path = state_path(spec.resume)
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


def run_normalize(spec: RunSpec, record: tuple[Any, str | None] | None = None) -> Any:
    """The ``(mean, std)`` a job normalises with: ``normalize`` when given (an error when
    it contradicts the starting checkpoint's record, unless ``force_normalize``), else
    the record, else None (the data set's own). ``record``: (recorded, path) when read."""
    recorded, source = record if record is not None else _source_record(spec)[::2]
    return choose_normalize(spec.model.normalize, recorded, force=spec.model.force_normalize,
                            source=f"{source}" if source else "the checkpoint")


def state_path(resume: str | os.PathLike) -> Path:
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


def sketch_source(spec: RunSpec) -> str:
    """The checkpoint a (non-resumed) sketch job starts from; a UserError when there is none."""
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
    spec = check_spec(spec)
    if spec.command != "sketch" or spec.resume:
        return spec
    sketch_source(spec)
    s = spec.sketch
    if s.rates and spec.model.cfg and not spec.model.refine:
        parse_rates(s.rates, job_arch(spec, spec.model.cfg, input_size_hint(spec)),
                    start_conv=s.start_conv)
    return spec
