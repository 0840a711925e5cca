"""How trials share GPUs: trials per GPU for a fraction, a GPU per worker process, CUDA MPS.

``resources.gpu`` below 1 lets several trials share one GPU; Ray (and the local loop)
pack ``floor(1 / fraction)`` of them on each, so a fraction that does not divide a GPU
into whole trials (0.3) packs fewer than it seems to ask for (3, with 0.1 of each GPU
unused): :func:`packing_note` says so in one line. Processes on one GPU are
time-sliced; with the CUDA MPS daemon running their kernels can run together, which
helps trials that launch-bound the GPU (:func:`mps_status` says which holds; nothing
here starts the daemon). :func:`gpu_slots` deals worker processes out to GPUs.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from sketch_core.errors import UserError

__all__ = ["trials_per_gpu", "packing_note", "mps_status", "gpu_slots", "MPS_CONTROL"]

MPS_CONTROL = "nvidia-cuda-mps-control"
_EPS = 1e-9


def trials_per_gpu(fraction: float) -> int:
    """How many trials asking ``fraction`` of a GPU fit on one (1 for a whole GPU or more)."""
    if fraction <= 0:
        raise UserError(f"a trial's GPU share must be positive, got {fraction:g}")
    return max(1, math.floor(1 / fraction + _EPS)) if fraction < 1 else 1


def packing_note(fraction: float, what: str = "resources.gpu") -> str | None:
    """One line when ``fraction`` (< 1) does not divide a GPU into whole trials, else None."""
    if not 0 < fraction < 1:
        return None
    k = trials_per_gpu(fraction)
    unused = 1 - k * fraction
    if unused <= 1e-6:
        return None
    return (f"{what} {fraction:g} does not divide a GPU into whole trials: {k} trials share "
            f"each GPU ({unused:.2g} of it unused; {1 / k:.4g} would say so exactly)")


def mps_status() -> str:
    """Whether CUDA MPS is installed and its control daemon running, in a few words."""
    if shutil.which(MPS_CONTROL) is None:
        return f"CUDA MPS not installed ({MPS_CONTROL} not found): processes are time-sliced"
    pipes = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if (pipes / "control").exists():
        return "CUDA MPS on: the processes' kernels can run together"
    return (f"CUDA MPS installed but off (`{MPS_CONTROL} -d` starts it): processes are "
            f"time-sliced")


def gpu_slots(gpus: int, processes: int) -> list[int]:
    """The GPU index of each of ``processes`` worker processes, dealt round the ``gpus``."""
    return [i % gpus for i in range(processes)] if gpus > 0 else []
