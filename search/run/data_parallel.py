"""Data-parallel training through Ray Train's TorchTrainer: ``sketch``/``pretrain`` on
several GPUs, and the search's retrain on several workers.

One path for both: :func:`train_data_parallel` starts one Ray Train worker per GPU (or
CPU worker over gloo); Ray initialises ``torch.distributed`` in each, and every worker
calls the same job function on its device (:func:`sketch_core.jobs.execute` for a
:class:`~sketch_core.job_spec.RunSpec`; :func:`search.run.retrain.run_retrain_job`
for a retrain), whose training loop wraps the model in DistributedDataParallel and reads
its share of each epoch. Rank 0 alone writes files; every rank reports each epoch with
``ray.train.report``. Ray is reached through :func:`search.run.ray_session.ray_session`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from search.run.ray_session import ray_session
from sketch_core.errors import UserError
from sketch_core.job_checks import preflight
from sketch_core.job_folder import logging_to, prepare_job_dir, select_devices
from sketch_core.job_spec import RunSpec
from sketch_core.jobs import execute

__all__ = ["run_distributed", "train_data_parallel"]


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: ``config["job"](config["payload"], device, rank0, report)``."""
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config["job"](config["payload"], device, rank == 0, ray.train.report)


def _run_spec(spec: RunSpec, device: torch.device, rank0: bool, report: Callable) -> None:
    """A ``sketch``/``pretrain`` job on one data-parallel worker."""
    job = Path(spec.output.job_dir).expanduser()
    if not rank0:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, progress=False))
    with logging_to(job if rank0 else None, enabled=rank0):
        execute(spec, device, report=report, rank0=rank0, prepared=True)


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


def train_data_parallel(job: Callable, payload: Any, *, num_workers: int, use_gpu: bool,
                        ray_dir: Path, address: str | None = None) -> None:
    """Run ``job(payload, device, rank0, report)`` on ``num_workers`` Ray Train workers
    (``job`` a module-level function; Ray Train's own files under ``ray_dir``). A
    worker's :class:`UserError` is raised here as it is."""
    with ray_session(address, log_to_driver=True):
        trainer = TorchTrainer(
            _worker, train_loop_config={"job": job, "payload": payload},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            run_config=RunConfig(name="train", storage_path=str(ray_dir.resolve()),
                                 failure_config=FailureConfig(max_failures=0)))
        try:
            trainer.fit()
        except Exception as exc:  # Ray Train wraps a worker's exception in its own
            err = _user_error(exc)
            if err is not None:
                raise err from None
            raise


def run_distributed(spec: RunSpec, *, use_gpu: bool = True, num_workers: int | None = None,
                    address: str | None = None) -> dict[str, Any]:
    """Train ``spec`` (a sketch or pretrain run) on ``spec.gpus`` data-parallel.

    ``use_gpu=False`` runs ``num_workers`` CPU workers over gloo instead (for tests and
    machines without GPUs). ``address`` names a Ray cluster (as ``--address``); a Ray
    instance already running in this process is used as it is. Returns the run's
    ``result.json``.
    """
    spec = preflight(spec)
    address = address or os.environ.get("RAY_ADDRESS") or None
    # a new local instance of our own unless one is running here or an address names one
    # (checked before Ray starts, so that bad --gpus are reported at once)
    local = not ray.is_initialized() and address is None
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
    train_data_parallel(_run_spec, spec, num_workers=num_workers, use_gpu=use_gpu,
                        ray_dir=job / "ray", address=address)
    return json.loads((job / "result.json").read_text())
