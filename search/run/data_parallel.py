"""Data-parallel ``sketch`` / ``pretrain`` on several GPUs through Ray Train's TorchTrainer.

The driver checks the :class:`sketch_core.job_spec.RunSpec` and prepares the job folder,
then starts one Ray Train worker per GPU. Ray initialises ``torch.distributed`` in each
worker; every worker receives the spec and runs :func:`sketch_core.jobs.execute` on
its device, where the training loop wraps the model in DistributedDataParallel and
reads its share of each epoch. Rank 0 alone writes the job folder; every rank reports
each epoch's metrics with ``ray.train.report``. Ray is reached through
:func:`search.run.ray_session.ray_session`: an instance already running in this process,
the cluster at ``address`` (or ``RAY_ADDRESS``), else a local instance with usage
statistics off, where only the GPUs of ``spec.gpus`` are visible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from sketch_core.jobs import preflight, prepare_job_dir, select_devices
from sketch_core.errors import UserError
from sketch_core.job_spec import RunSpec

__all__ = ["run_distributed"]


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from sketch_core.jobs import execute, logging_to

    spec: RunSpec = config["spec"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    job = Path(spec.output.job_dir).expanduser()
    if rank != 0:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, progress=False))
    with logging_to(job if rank == 0 else None, enabled=rank == 0):
        execute(spec, device, report=ray.train.report, rank0=rank == 0, prepared=True)


def _user_error(exc: BaseException) -> UserError | None:
    """A worker's UserError, found in the chain of whatever Ray Train raised."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo += [e.__cause__, e.__context__]
        for attr in ("worker_failures", "errors"):
            more = getattr(e, attr, None)
            if isinstance(more, dict):
                todo += list(more.values())
    m = re.search(r"UserError: ([^\n]+)", str(exc))
    return UserError(m.group(1)) if m else None


def run_distributed(spec: RunSpec, *, use_gpu: bool = True, num_workers: int | None = None,
                    address: str | None = None) -> dict[str, Any]:
    """Train ``spec`` (a sketch or pretrain run) on ``spec.gpus`` data-parallel.

    ``use_gpu=False`` runs ``num_workers`` CPU workers over gloo instead (for tests and
    machines without GPUs). ``address`` names a Ray cluster (as ``--address``); a Ray
    instance already running in this process is used as it is. Returns the run's
    ``result.json``.
    """
    from search.run.ray_session import ray_session

    spec = preflight(spec)
    address = address or os.environ.get("RAY_ADDRESS") or None
    # a new local instance of our own unless one is running here or an address names one
    # (checked before Ray is imported, so that bad --gpus are reported at once)
    imported = sys.modules.get("ray")
    local = not (imported is not None and imported.is_initialized()) and address is None
    if use_gpu:
        ids = list(spec.gpus or [0])
        if local and select_devices(ids)[0].type != "cuda":  # on a cluster, Ray places GPUs
            raise UserError("several --gpus need CUDA devices; this machine has none")
        num_workers = num_workers or len(ids)
    elif not num_workers or num_workers < 1:
        raise UserError(f"CPU data-parallel training needs num_workers >= 1, got {num_workers}")

    job = prepare_job_dir(spec)
    if use_gpu and local:  # the local instance sees only the GPUs named by --gpus
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
    with ray_session(address, log_to_driver=True):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(
            _worker, train_loop_config={"spec": spec},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            run_config=RunConfig(name="train", storage_path=str((job / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=0)))
        try:
            trainer.fit()
        except Exception as exc:
            err = _user_error(exc)
            if err is not None:
                raise err from None
            raise
    return json.loads((job / "result.json").read_text())
