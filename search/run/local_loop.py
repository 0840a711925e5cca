"""The search on one machine without Ray: ask the study, price, train, tell, record.

:func:`run_local` runs the same proposals (:class:`search.propose.proposer.RateProposer`: the
sampler, the paper's vectors and anchors, FLOPs budget reject / repair) and the same
trial code (:func:`search.run.trial.train_trial` with the same
:class:`~search.run.trial.TrialSetup`) as ``launch.py search``, in this process or in a
few worker processes, and writes the same experiment folder (manifest.json,
config.yaml, baseline.pt, study.db, trials.jsonl). There is no early stopping here:
each trial runs its full schedule unless the time budget ends it (``stopped``, stop
reason ``budget``), and no retrain. Nothing on this path imports Ray.

``gpus_per_trial`` packs trials onto GPUs: ``floor(1 / gpus_per_trial)`` worker
processes share each visible GPU (:mod:`search.run.gpu_share`; one line says what is
packed and whether CUDA MPS is on). ``python -m search.run.local_loop --config ...`` runs
it from a shell.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from search.experiment.config import SearchConfig, load_config
from search.experiment.folder import experiment_location
from search.experiment.opening import check_folder, finish_manifest, open_search
from search.experiment.resolve import SearchPlan
from search.propose.proposer import close_unstarted
from search.results.record import TrialRecord, trial_status
from search.results.text import pct, say
from search.results.trials_file import TrialLog, read_records
from search.run.gpu_share import gpu_slots, mps_status, packing_note, trials_per_gpu
from search.run.outcome import SearchOutcome
from search.run.proposals import make_proposer
from search.run.trial import TrialSetup, train_trial, trial_setup
from sketch_core.data.folder_cache import prepare_folder_cache
from sketch_core.errors import UserError

__all__ = ["run_local", "run_one", "main"]

log = logging.getLogger("sketchtune.search")


class _BudgetOver(BaseException):
    """Raised from the report callback to end a trial when the time budget is spent
    (a BaseException, so that the trial code does not report it as a failure)."""


def run_one(rates: list[float], setup: TrialSetup, baseline: dict, deadline: float | None,
            on_epoch: Callable[[dict], None] | None = None,
            widths: list[int] | None = None) -> tuple[dict | None, bool]:
    """One trial, start to end: (its last report, whether the time budget ended it)."""
    last: dict | None = None

    def report(metrics: dict, state_file: Path | None) -> None:
        nonlocal last
        last = dict(metrics)
        if on_epoch is not None:
            on_epoch(last)
        more = int(metrics.get("epoch", 0)) < setup.recipe.epochs and not metrics.get("failed")
        if more and deadline is not None and time.time() >= deadline:
            raise _BudgetOver

    try:
        train_trial(rates, setup, baseline, report, widths=widths)
    except _BudgetOver:
        return last, True
    return last, False


def run_local(config: SearchConfig, exp_dir: str | Path | None = None, *, workers: int = 1,
              command: str = "", quiet: bool = False,
              on_epoch: Callable[[str, dict], None] | None = None,
              gpus_per_trial: float | None = None) -> SearchOutcome:
    """The search of ``config`` without Ray, into ``exp_dir`` (a new folder; by default
    where ``launch.py search`` would put it).

    ``workers`` > 1 trains that many trials at a time in worker processes; with one,
    trials run in this process and ``on_epoch(trial_id, metrics)`` sees every epoch's
    report. ``gpus_per_trial`` (in (0, 1]) trains on the GPUs, ``floor(1 /
    gpus_per_trial)`` trials at a time on each, one worker process per trial (a
    ``workers`` above 1 caps the number of processes); on a machine without CUDA it
    says so and keeps ``workers`` on the CPU.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if exp_dir is None:
        exp_dir, storage_path, name = experiment_location(config.storage, config.source)
    else:
        exp_dir = Path(exp_dir).expanduser().resolve()
        storage_path, name = str(exp_dir.parent), config.storage.name or exp_dir.name
    config, _ = check_folder(config, exp_dir, resume=False)
    t_start = time.time()
    opened = open_search(config, exp_dir, name, storage_path, command=command, quiet=quiet)
    plan = opened.plan
    outcome = _run_plan(plan, opened.study_storage, opened.state, workers, quiet, on_epoch,
                        gpus_per_trial)
    phases = finish_manifest(exp_dir, outcome.pop("search_s"), False, t_start, command, quiet)
    return SearchOutcome(exp_dir, read_records(plan.trials_file), phases, plan.baseline,
                         extra={"runner": "local", "workers": outcome["workers"]})


def _run_plan(plan: SearchPlan, study_storage: Any, state: dict, workers: int, quiet: bool,
              on_epoch: Callable | None, gpus_per_trial: float | None) -> dict:
    """The trials of ``plan``, serially or in worker processes; the search's seconds."""
    if plan.data.data_set == "folder" and plan.data.data_path:  # decoded once, before any trial
        prepare_folder_cache(Path(plan.data.data_path).expanduser())
    proposer = make_proposer(plan, study_storage)
    setup, slots = trial_setup(plan), None
    if gpus_per_trial is not None:
        workers, slots, setup = _pack(gpus_per_trial, workers, setup, quiet)
    say(quiet, f"[local] {plan.name}: {plan.num_samples or 'unlimited'} trials"
               f"{plan.budget_text}, "
               f"sampler {plan.sampler.name}, {workers} worker(s), no Ray")
    deadline = None if plan.time_budget_s is None else time.time() + plan.time_budget_s
    loop = _Loop(proposer, setup, state, deadline, TrialLog(plan.trials_file), quiet)
    t_search = time.time()
    if workers > 1:
        loop.parallel(workers, slots)
    else:
        loop.serial(on_epoch)
    close_unstarted(proposer.study)
    return {"search_s": time.time() - t_search, "workers": workers}


def _pack(gpus_per_trial: float, workers: int, setup: TrialSetup, quiet: bool
          ) -> tuple[int, list[int] | None, TrialSetup]:
    """(worker processes, the GPU of each, the setup) for trials sharing the GPUs."""
    if not 0 < gpus_per_trial <= 1:
        raise UserError(f"gpus_per_trial: a local trial uses a share of one GPU, in (0, 1]; "
                        f"got {gpus_per_trial:g}")
    per_gpu = trials_per_gpu(gpus_per_trial)
    if (note := packing_note(gpus_per_trial, "gpus_per_trial")) is not None:
        say(False, f"[local] {note}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        say(False, f"[local] gpus_per_trial {gpus_per_trial:g}: no CUDA GPU here; "
                   f"{workers} worker(s) on the CPU")
        return workers, None, setup
    processes = gpus * per_gpu if workers <= 1 else min(workers, gpus * per_gpu)
    say(quiet, f"[local] {per_gpu} trial(s) per GPU on {gpus} GPU(s): {processes} worker "
               f"process(es); {mps_status()}")
    return processes, gpu_slots(gpus, processes), dataclasses.replace(setup, use_gpu=True)


def _take_gpu(slots: Any) -> None:
    """A worker process's initializer: see only the GPU of the next free slot."""
    gpu = slots.get()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[gpu] if ids and gpu < len(ids) else str(gpu)


class _Loop:
    """Ask, train, tell and record, one trial at a time or a few in worker processes."""

    def __init__(self, proposer: RateProposer, setup: TrialSetup, state: dict,
                 deadline: float | None, trial_log: TrialLog, quiet: bool) -> None:
        self.proposer, self.setup, self.state = proposer, setup, state
        self.deadline, self.log, self.quiet = deadline, trial_log, quiet
        self.count = 0  # trials asked
        self.ended = 0

    def _next(self) -> tuple[str, dict] | None:
        if self.deadline is not None and time.time() >= self.deadline:
            return None
        key = f"local_{self.count:05d}"
        config = self.proposer.ask(key)
        if config is None:
            return None
        self.count += 1
        return key, config

    def _end(self, key: str, config: dict, started: float, last: dict | None,
             budget_ended: bool, error: str | None = None) -> None:
        status, message = trial_status(last, error is not None, self.setup.recipe.epochs)
        record = TrialRecord.from_report(key, last or {}, config, status, error or message,
                                         started, "budget" if budget_ended else None)
        self.log.append(record)
        self.proposer.tell(key, last, error is not None)
        self.ended += 1
        total = self.proposer.num_samples
        say(self.quiet, f"[local] trial {key} ({self.ended}{'/' + str(total) if total else ''})"
                        f" {status}: val acc {pct(record['val_acc'])}, FLOPs "
                        f"{pct(record['flops_ratio'])}, {record['epochs']} epoch(s)")

    def serial(self, on_epoch: Callable[[str, dict], None] | None) -> None:
        while (nxt := self._next()) is not None:
            key, config = nxt
            started = time.time()
            hook = None if on_epoch is None else (lambda m, k=key: on_epoch(k, m))
            last, budget_ended = run_one(config["rates"], self.setup, self.state,
                                         self.deadline, hook, config.get("widths"))
            self._end(key, config, started, last, budget_ended)

    def parallel(self, workers: int, slots: list[int] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no forked torch threads
        running: dict[cf.Future, tuple[str, dict, float]] = {}
        pinned: dict[str, Any] = {}
        if slots:  # each process sees one GPU, taken from the queue as it starts
            queue = ctx.Queue()
            for gpu in slots:
                queue.put(gpu)
            pinned = {"initializer": _take_gpu, "initargs": (queue,)}
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **pinned) as pool:
            while True:
                while len(running) < workers and (nxt := self._next()) is not None:
                    key, config = nxt
                    try:
                        future = pool.submit(run_one, config["rates"], self.setup, self.state,
                                             self.deadline, None, config.get("widths"))
                    except Exception as exc:  # the pool broke: no trial runs any more
                        self._end(key, config, time.time(), None, False,
                                  f"{type(exc).__name__}: {exc}")
                        raise
                    running[future] = (key, config, time.time())
                if not running:
                    return
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    key, config, started = running.pop(future)
                    try:
                        last, budget_ended = future.result()
                    except Exception as exc:  # the worker process died
                        self._end(key, config, started, None, False,
                                  f"{type(exc).__name__}: {exc}")
                    else:
                        self._end(key, config, started, last, budget_ended)


def main(argv: list[str] | None = None) -> int:
    """``python -m search.run.local_loop --config C [--set k=v ...] [--workers N]
    [--gpus_per_trial G] [--exp_dir DIR]``: the search without Ray, from a shell."""
    p = argparse.ArgumentParser(prog="python -m search.run.local_loop",
                                description="the rate search without Ray, on this machine")
    p.add_argument("--config", required=True, help="a config file or a shipped config's name")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="trials at a time (processes)")
    p.add_argument("--gpus_per_trial", type=float, default=None,
                   help="a trial's share of a GPU: floor(1/G) trials per GPU, one process each")
    p.add_argument("--exp_dir", default=None, help="the new experiment folder")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.workers < 1:
            raise UserError(f"--workers must be at least 1, got {args.workers}")
        config = load_config(args.config, args.set)
        out = run_local(config, args.exp_dir, workers=args.workers, quiet=args.quiet,
                        gpus_per_trial=args.gpus_per_trial,
                        command=" ".join(["python -m search.run.local_loop", *(argv or sys.argv[1:])]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ended = [r for r in out.records if r.get("status") != "rejected"]
    print(f"[local] {len(ended)} trial(s) ended in {out.exp_dir}")
    return 0


if __name__ == "__main__":  # the imported module's main: worker processes find its functions
    from search.run import local_loop

    sys.exit(local_loop.main())
