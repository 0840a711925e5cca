"""The job folder of a ``sketch`` / ``pretrain`` job, its log, and the devices it runs on.

:func:`prepare_job_dir` refuses a folder that holds another run (unless ``reset`` or
``resume``); :func:`job_folder` removes a folder the job made again when bad input ends
it before anything was saved; :func:`logging_to` sends the job's log lines to stdout and
``logger.log``; :func:`select_devices` turns ``--gpus`` into devices.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from sketch_core.errors import UserError
from sketch_core.job_checks import STATE_FILE
from sketch_core.job_spec import RunSpec

__all__ = ["select_devices", "prepare_job_dir", "job_folder", "logging_to", "JOB_FILES",
           "RUN_MARKERS"]

log = logging.getLogger("sketchtune")

# what a run writes into the job folder (and what reset removes; nothing else is touched)
JOB_FILES = ("checkpoint", "metrics.csv", "logger.log", "result.json", "tensorboard", "ray")
# what makes a job folder hold a run (a failed start leaves none of these)
RUN_MARKERS = ("checkpoint/" + STATE_FILE, "checkpoint/model_last.pt", "checkpoint/model_best.pt",
               "metrics.csv", "result.json")


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
