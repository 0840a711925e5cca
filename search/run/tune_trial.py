"""The Ray Tune function trainable: one rate vector, start to end (or from its checkpoint).

:func:`run_trial` adapts :func:`search.run.trial.train_trial` to Tune: the baseline's
weights come through ``tune.with_parameters`` (stored once in Ray's object store, so each
node receives them once); every epoch's report goes to ``tune.report`` with a
``tune.Checkpoint`` of the full training state, so a trial that Tune moves or restarts
continues from it. A trial that had ended before the driver was killed reports its
recorded result again. Only the loss of a worker (node death) reaches Tune's
``FailureConfig`` retries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from search.run.trial import STATE_FILE, TrialSetup, train_trial
from sketch_core.training.loop import load_state

__all__ = ["run_trial"]


def _node_id() -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker
        return None


def _start_state() -> dict | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(Path(d) / STATE_FILE)


def run_trial(config: dict, setup: TrialSetup, baseline: dict[str, torch.Tensor]) -> None:
    """The function trainable (``config``: the proposal, ``rates`` and ``widths``)."""
    trial_id = tune.get_context().get_trial_id()
    node = _node_id()
    if trial_id in setup.ended:  # finished before the driver was killed: report it again
        tune.report({**setup.ended[trial_id], "node": node, "resumed_finished": True})
        return
    priced = {k: config[k] for k in ("latency_ms", "latency_ratio") if k in config}

    def report(metrics: dict, state_file: Path | None) -> None:
        metrics = {**metrics, **priced}  # the latency the proposal was priced at, every report
        if state_file is None:
            tune.report(metrics)
            return
        ckdir = Path(tempfile.mkdtemp(prefix="ckpt-", dir=state_file.parent))
        os.replace(state_file, ckdir / STATE_FILE)
        try:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckdir)))
        finally:
            shutil.rmtree(ckdir, ignore_errors=True)

    train_trial(config["rates"], setup, baseline, report, _start_state(), node,
                widths=config.get("widths"))
