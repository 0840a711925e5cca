"""The one run: prune -> recalibrate BN -> evaluate -> fine-tune -> checkpoint.

:func:`prune_and_finetune` is the path every run takes: ``launch.py sketch`` and
``pretrain`` (:mod:`sketch_core.jobs`), a search trial, the search's retrain, on one
device or data-parallel. The caller resolves everything first (the architecture, the
model with its weights, the widths, the :class:`~sketch_core.options.SketchOptions`,
the :class:`~sketch_core.options.Recipe`, the loaded data) and says where the run
writes (:class:`Outputs`) and what it hears after each epoch (``report``).

:func:`prune_and_score` is the zero-shot half alone (narrow, recalibrate BN, score on
the images that choose): what a cheap evaluation of many width vectors repeats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sketch_core.cost.flops import count_flops
from sketch_core.data.sets import Data
from sketch_core.io.checkpoint import save_checkpoint
from sketch_core.options import Recipe, SketchOptions
from sketch_core.pruning.bn import recalibrate_bn
from sketch_core.pruning.prune import sketch
from sketch_core.registry import Arch
from sketch_core.training.loop import FitResult, evaluate, fit

__all__ = ["prune_and_finetune", "prune_and_score", "Outputs", "CheckpointRecord", "RunResult",
           "Score"]


@dataclass(frozen=True)
class CheckpointRecord:
    """What every checkpoint of a run records beside its weights and widths."""

    rates: list[float] | None = None
    split: dict | None = None  # the training split the network saw
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Outputs:
    """Where a run writes; each item is optional, and only rank 0 writes.

    ``job_dir``: ``metrics.csv`` (and TensorBoard); ``state``: the resumable training
    state after every epoch; ``last``/``best``: a checkpoint after every epoch / of the
    best epoch so far; ``final``: the best epoch's checkpoint at the end, with its test
    metrics.
    """

    job_dir: Path | None = None
    state: Path | None = None
    last: Path | None = None
    best: Path | None = None
    final: Path | None = None
    record: CheckpointRecord = field(default_factory=CheckpointRecord)
    final_metrics: dict = field(default_factory=dict)  # added to the final checkpoint's
    progress: bool = False
    rank0: bool = True


@dataclass
class Score:
    """Accuracy (a fraction) and mean cross-entropy on some images."""

    acc: float
    loss: float
    images: int


@dataclass
class RunResult:
    """What a run leaves: the model at its best epoch (on the device), its cost and scores."""

    model: nn.Module
    widths: list[int] | None
    flops: int
    params: int
    fit: FitResult
    before: Score | None = None     # the unpruned model on the images that choose
    sketched: Score | None = None   # right after prune + BN, on the images that choose
    test: dict[str, float] | None = None  # the best epoch on the test split


def _choosing(data: Data) -> Any:
    return data.val if data.val is not None else data.test


def score(model: nn.Module, batches: Any, device: torch.device) -> Score:
    """:func:`~sketch_core.training.loop.evaluate` as a :class:`Score`."""
    out = evaluate(model, batches, device)
    return Score(out["acc"], out["loss"], out["n"])


def prune_and_score(arch: Arch, model: nn.Module, widths: list[int], options: SketchOptions,
                    data: Data, device: torch.device | str, *, seed: int = 0,
                    batches: Any = None, lsq_log: list[str] | None = None
                    ) -> tuple[nn.Module, Score | None]:
    """The narrow network at ``widths`` (BN recalibrated on ``options.calibration_batches``
    training batches) and its score on the images that choose (``data.val``, else the
    test split); the score is None when there are no such images. ``batches``: the
    calibration batches when the caller already holds them."""
    device = torch.device(device)
    calib = batches if batches is not None else data.calibration_batches(
        max(1, options.calibration_batches))
    narrow = sketch(model, arch, widths, options, batches=calib, seed=seed, lsq_log=lsq_log)
    if options.calibration_batches:
        recalibrate_bn(narrow, calib[:options.calibration_batches], device)
    choose = _choosing(data)
    return narrow, (None if choose is None else score(narrow, choose, device))


def _saver(arch: Arch, data: Data, out: Outputs, widths: list[int] | None
           ) -> Callable[[Path, nn.Module, dict], None]:
    def save(path: Path, model: nn.Module, metrics: dict) -> None:
        r = out.record
        save_checkpoint(path, model, cfg=arch, num_classes=data.num_classes,
                        in_channels=data.in_channels, rates=r.rates, widths=widths,
                        metrics=metrics, extra=r.extra, normalize=data.normalize, split=r.split)
    return save


def _epoch_hook(save: Callable, model: nn.Module, out: Outputs,
                report: Callable[[int, dict], None] | None) -> Callable[[int, dict], None]:
    def on_epoch(epoch: int, metrics: dict) -> None:
        row = {k: v for k, v in metrics.items() if v is not None}
        if out.rank0 and out.last is not None:
            save(out.last, model, row)
        if out.rank0 and out.best is not None and metrics.get("is_best"):
            save(out.best, model, row)
        if report is not None:
            report(epoch, row)
    return on_epoch


def _narrow(arch: Arch, model: nn.Module, widths: list[int] | None, options: SketchOptions | None,
            data: Data, device: torch.device, seed: int, start_state: dict | None,
            lsq_log: list[str] | None) -> tuple[nn.Module, Score | None]:
    """The model to train and its score after pruning (None when nothing was pruned)."""
    if start_state is not None:  # a resumed run: ``model`` is built at the widths, the state holds the weights
        kept = start_state["meta"].get("sketched")
        return model.to(device), None if kept is None else Score(**kept)
    if widths is None or options is None:
        return model.to(device), None
    return prune_and_score(arch, model.to(device), widths, options, data, device, seed=seed,
                           lsq_log=lsq_log)


def _before(model: nn.Module, data: Data, device: torch.device, asked: bool,
            start_state: dict | None) -> Score | None:
    if start_state is not None:
        kept = start_state["meta"].get("before")
        return None if kept is None else Score(**kept)
    return score(model.to(device), _choosing(data), device) if asked else None


def prune_and_finetune(arch: Arch, model: nn.Module, widths: list[int] | None,
                       options: SketchOptions | None, recipe: Recipe, data: Data, *,
                       device: torch.device | str, outputs: Outputs = Outputs(),
                       report: Callable[[int, dict], None] | None = None,
                       stop: Callable[[], bool] | None = None, start_state: dict | None = None,
                       state_meta: dict | None = None, evaluate_before: bool = False,
                       test: bool = False, lsq_log: list[str] | None = None,
                       on_pruned: Callable[[nn.Module, Score | None, Score | None], None] | None = None
                       ) -> RunResult:
    """Narrow ``model`` (the unpruned network with its weights) to ``widths`` by ``options``,
    recalibrate BN, score it, fine-tune it by ``recipe``, checkpoint it.

    ``widths`` None (or ``options`` None): nothing is pruned; ``model`` is trained as it
    is (a pretrain, a fine-tune of a network already narrow). ``start_state`` continues
    an interrupted run from its training state (``model`` is then the network built at
    ``widths``). ``report(epoch, metrics)`` hears every
    epoch; ``stop()`` is polled between batches (see :func:`~sketch_core.training.loop.fit`).
    ``evaluate_before`` also scores the unpruned model; ``test`` scores the best epoch on
    the test split; ``on_pruned(model, before, sketched)`` hears the network about to be
    trained and its scores. Returns the model at its best epoch and the scores.
    """
    device = torch.device(device)
    before = _before(model, data, device, evaluate_before, start_state)
    narrow, sketched = _narrow(arch, model, widths, options, data, device, recipe.seed,
                               start_state, lsq_log)
    if on_pruned is not None:
        on_pruned(narrow, before, sketched)
    flops, params = count_flops(narrow, data.shape)
    save = _saver(arch, data, outputs, widths)
    meta = {**(state_meta or {}), "widths": widths if widths is not None
            else (state_meta or {}).get("widths"),
            "sketched": None if sketched is None else asdict(sketched),
            "before": None if before is None else asdict(before),
            "val_acc_sketched": None if sketched is None else sketched.acc}
    result = fit(narrow, data, recipe, device=device, job_dir=outputs.job_dir,
                 progress=outputs.progress, start_state=start_state, state_path=outputs.state,
                 state_meta=meta, on_epoch=_epoch_hook(save, narrow, outputs, report), stop=stop)
    narrow.load_state_dict(result.best_state)
    if outputs.rank0 and not result.history:  # no epoch ran: the checkpoints of the start
        for path in (outputs.best, outputs.last):
            if path is not None:
                save(path, narrow, {})
    tested = evaluate(narrow, data.test, device, amp=recipe.amp) if test else None
    if outputs.rank0 and outputs.final is not None:
        save(outputs.final, narrow, {"val_acc": result.best_val_acc, "flops": flops,
                                     "params": params, "best_epoch": result.best_epoch,
                                     **({"test_acc": tested["acc"], "test_top5": tested["top5"]}
                                        if tested else {}),
                                     "val_acc_sketched": None if sketched is None else sketched.acc,
                                     **outputs.final_metrics})
    return RunResult(narrow, widths, flops, params, result, before, sketched, tested)
