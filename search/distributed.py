"""Data-parallel ``sketch`` / ``pretrain`` on several GPUs through Ray Train's TorchTrainer.

The driver checks the arguments and prepares the job folder, then starts one Ray
Train worker per GPU. Ray initialises ``torch.distributed`` in each worker; every
worker runs :func:`sketch_core.cli.train_args.execute` on its device, where the training
loop wraps the model in DistributedDataParallel and reads its share of each epoch.
Rank 0 alone writes the job folder; every rank reports each epoch's metrics with
``ray.train.report``. Without a running cluster, a local Ray instance is started on
127.0.0.1 with usage statistics off, and only the GPUs named by ``--gpus`` are visible.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from sketch_core.cli.train_args import preflight, prepare_job_dir, select_devices
from sketch_core.errors import UserError

__all__ = ["run_distributed"]


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from sketch_core.cli.train_args import _logging_to, execute

    args = argparse.Namespace(**config["args"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    job = Path(args.job_dir).expanduser()
    if rank != 0:
        args.no_progress = True
    with _logging_to(job if rank == 0 else None, enabled=rank == 0):
        execute(args, device, report=ray.train.report, rank0=rank == 0)


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


def run_distributed(args: argparse.Namespace, *, use_gpu: bool = True,
                    num_workers: int | None = None) -> dict[str, Any]:
    """Train ``args`` (a parsed sketch/pretrain command line) on ``args.gpus`` data-parallel.

    ``use_gpu=False`` runs ``num_workers`` CPU workers over gloo instead (for tests and
    machines without GPUs). Returns the run's ``result.json``.
    """
    preflight(args)
    # a new local instance of our own unless one is running here or RAY_ADDRESS names one
    # (checked before Ray is imported, so that bad --gpus are reported at once)
    imported = sys.modules.get("ray")
    local = not (imported is not None and imported.is_initialized()) \
        and "RAY_ADDRESS" not in os.environ
    if use_gpu:
        ids = list(args.gpus or [0])
        if local and select_devices(ids)[0].type != "cuda":  # on a cluster, Ray places GPUs
            raise UserError("several --gpus need CUDA devices; this machine has none")
        num_workers = num_workers or len(ids)
    elif not num_workers or num_workers < 1:
        raise UserError(f"CPU data-parallel training needs num_workers >= 1, got {num_workers}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job = prepare_job_dir(args)

    started = False
    if not ray.is_initialized():
        if use_gpu and local:  # the local instance sees only the GPUs named by --gpus
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
        # "local" never joins an instance that another program started on this machine
        ray.init(address="local" if local else None, include_dashboard=False,
                 **({"_node_ip_address": "127.0.0.1"} if local else {}))
        started = True
    config = {k: v for k, v in vars(args).items() if k != "func"}
    trainer = TorchTrainer(
        _worker, train_loop_config={"args": config},
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
    finally:
        if started:
            ray.shutdown()
    return json.loads((job / "result.json").read_text())
