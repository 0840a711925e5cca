"""``launch.py sketch`` and ``launch.py pretrain``: the arguments of the original, one or many GPUs.

The options and the single-device run live in :mod:`sketch_core.cli.train_args`; this thin
module only sends a run on several ``--gpus``, as a :class:`sketch_core.job_spec.RunSpec`, to
:mod:`search.run.data_parallel`, which trains data-parallel through Ray Train.
"""

from __future__ import annotations

import argparse

from sketch_core.cli.train_args import add_arguments, run as run_single, spec_from_args

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    """One device: :func:`sketch_core.cli.train_args.run`; several GPUs: Ray Train's TorchTrainer."""
    if args.gpus and len(args.gpus) > 1 and not args.test_only:
        from search.run.data_parallel import run_distributed  # heavy: ray

        run_distributed(spec_from_args(args))
        return 0
    return run_single(args)
