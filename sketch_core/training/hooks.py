"""The jobs around the training loop, as hooks: files, bar, checks, callbacks, the stop signal.

:func:`sketch_core.training.loop.fit` runs the loop and calls every hook at five points, in
list order: ``on_fit_start``, ``on_epoch_start``, ``on_batch_end`` (after the
optimizer step), ``on_epoch_end`` (after the epoch's row is made and the learning
rate stepped) and ``on_fit_end`` (however the fit ends, exceptions included, to close
what a hook holds). A hook reads and fills the :class:`sketch_core.training.loop.Run` it is
given (``run.epoch``, ``run.batch``, ``run.metrics``, ``run.history``, ...); that
module imports this one, so here the run is typed ``Any``.

The built-in hooks, in the order ``fit`` installs them: :class:`ProgressBar`,
:class:`FiniteLoss` (a NaN loss raises :class:`TrainingDiverged`), :class:`Validation`
(evaluation and best epoch), :class:`EpochLog`, :class:`MetricsCSV`,
:class:`TensorBoard`, :class:`TrainState` (``train_state.pt`` for resuming), the
caller's own hooks, :class:`EpochCallback` (``on_epoch``) and :class:`StopSignal`
(:class:`TrainingInterrupted`). Only rank 0 is given paths to write to.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from sketch_core.io.atomic import atomic_write_text
from sketch_core.io.checkpoint import atomic_save
from sketch_core.errors import UserError

__all__ = ["Hook", "ProgressBar", "FiniteLoss", "Validation", "EpochLog", "MetricsCSV",
           "TensorBoard", "TrainState", "EpochCallback", "StopSignal", "TrainingInterrupted",
           "TrainingDiverged", "METRIC_FIELDS", "emit"]

log = logging.getLogger("sketchtune")
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5",
                 "best_val_acc", "time_s", "img_s", "train_images")


class TrainingInterrupted(Exception):
    """``stop()`` turned true: the state was saved to ``state_path`` (if given)."""

    def __init__(self, epoch: int, batch: int, state_path: str | None) -> None:
        where = f"; resumable state saved to {state_path}" if state_path else ""
        super().__init__(f"training interrupted in epoch {epoch + 1} after batch {batch}{where}")
        self.epoch, self.batch, self.state_path = epoch, batch, state_path


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing of the bad epoch was saved."""


class Hook:
    """A job around the loop. Every method does nothing here: override the ones you need."""

    def on_fit_start(self, run: Any) -> None:
        """Before the first epoch (also when a resumed run has no epoch left)."""

    def on_epoch_start(self, run: Any) -> None:
        """After ``run.begin_epoch``: ``run.batch`` is the batch the epoch starts at."""

    def on_batch_end(self, run: Any) -> None:
        """After the optimizer step of batch ``run.batch``."""

    def on_epoch_end(self, run: Any) -> None:
        """After ``run.end_epoch``: ``run.metrics`` is the epoch's row, already in the history."""

    def on_fit_end(self, run: Any) -> None:
        """When fit ends, normally or by an exception."""


def emit(hooks: Iterable[Hook], event: str, run: Any) -> None:
    """Call ``event`` (e.g. ``"on_batch_end"``) on every hook, in order."""
    for hook in hooks:
        getattr(hook, event)(run)


class ProgressBar(Hook):
    """A tqdm bar per epoch with running loss, accuracy and img/s (shown on a terminal only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def on_epoch_start(self, run: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm  # heavy: tqdm, only with a progress bar

        # disable=None: shown on a terminal, silent when output is redirected
        self.bar = tqdm(total=len(run.data.train), initial=run.batch, leave=False, disable=None,
                        desc=f"epoch {run.epoch + 1}/{run.recipe.epochs}", dynamic_ncols=True)

    def on_batch_end(self, run: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if run.batch % 10 == 0 or run.batch + 1 == len(run.data.train):
            dt = time.perf_counter() - run.t0
            self.bar.set_postfix(loss=f"{run.loss_sum.item() / run.seen:.3f}",
                                 acc=f"{run.correct.item() / run.seen:.3f}",
                                 img_s=f"{run.seen_now / max(dt, 1e-9):.0f}")

    def on_epoch_end(self, run: Any) -> None:
        self.on_fit_end(run)

    def on_fit_end(self, run: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class FiniteLoss(Hook):
    """A NaN or infinite training loss raises :class:`TrainingDiverged` naming the epoch.

    Installed before every hook that saves, so nothing of the bad epoch is written.
    """

    def __init__(self, state_path: str | None) -> None:
        self.state_path = state_path

    def check(self, run: Any) -> None:
        if not math.isfinite(run.loss_sum.item()):
            kept = f"; the last good state is kept in {self.state_path}" if self.state_path else ""
            raise TrainingDiverged(f"the training loss became NaN or infinite in epoch "
                                   f"{run.epoch + 1}{kept}; try a lower --lr")

    def on_epoch_end(self, run: Any) -> None:
        self.check(run)


class Validation(Hook):
    """Evaluates each epoch on ``batches`` (the validation split) and keeps the best epoch.

    Fills the row's ``val_*`` and ``best_val_acc`` and sets ``run.is_best``; with no
    split (``batches`` None) every epoch counts as the best, so the last one wins.
    """

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def on_epoch_end(self, run: Any) -> None:
        val = run.evaluate(self.batches) if self.batches is not None else None
        acc = val["acc"] if val else None
        run.is_best = run.best_acc is None or acc is None or acc > run.best_acc
        if run.is_best:
            run.best_acc, run.best_epoch, run.best_state = acc, run.epoch, run.weights()
        if val:
            run.metrics.update(val_loss=val["loss"], val_acc=acc, val_top5=val["top5"])
        run.metrics["best_val_acc"] = run.best_acc


class EpochLog(Hook):
    """One log line per epoch: learning rate, loss, accuracies, speed."""

    def on_epoch_end(self, run: Any) -> None:
        m = run.metrics
        val = f"  val acc {100 * m['val_acc']:.2f}% (best {100 * m['best_val_acc']:.2f}%)" \
            if m["val_acc"] is not None else ""
        log.info("epoch %d/%d  lr %.4g  loss %.4f  train acc %.2f%%%s  %.0f img/s", run.epoch + 1,
                 run.recipe.epochs, m["lr"], m["train_loss"], 100 * m["train_acc"], val, m["img_s"])


class MetricsCSV(Hook):
    """``job_dir/metrics.csv``: one row per epoch (:data:`METRIC_FIELDS`), rewritten whole."""

    def __init__(self, job_dir: Path | None) -> None:
        self.job_dir = job_dir

    def on_epoch_end(self, run: Any) -> None:
        if self.job_dir is None:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(run.history)
        atomic_write_text(self.job_dir / "metrics.csv", buf.getvalue())


class TensorBoard(Hook):
    """Scalars per epoch under ``job_dir/tensorboard`` when tensorboard is installed."""

    KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")

    def __init__(self, job_dir: Path | None) -> None:
        self.job_dir, self.writer = job_dir, None

    def on_fit_start(self, run: Any) -> None:
        if self.job_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard
        except Exception:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(self.job_dir / "tensorboard"))

    def on_epoch_end(self, run: Any) -> None:
        if self.writer is not None:
            for key in self.KEYS:
                if run.metrics[key] is not None:
                    self.writer.add_scalar(key, run.metrics[key], run.epoch)

    def on_fit_end(self, run: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrainState(Hook):
    """Saves the resumable state (``run.state_dict(meta)``) to ``path`` after every epoch."""

    def __init__(self, path: str | None, meta: dict[str, Any] | None) -> None:
        self.path, self.meta = path, meta

    def save(self, run: Any) -> None:
        """Save now (mid-epoch too); nothing without a path."""
        if self.path:
            atomic_save(run.state_dict(self.meta), self.path)

    def on_epoch_end(self, run: Any) -> None:
        self.save(run)


class EpochCallback(Hook):
    """Calls ``fn(epoch, metrics)`` after each epoch; ``metrics["is_best"]``: best so far."""

    def __init__(self, fn: Callable[[int, dict[str, Any]], Any] | None) -> None:
        self.fn = fn

    def on_epoch_end(self, run: Any) -> None:
        if self.fn is not None:
            self.fn(run.epoch, {**run.metrics, "is_best": run.is_best})


class StopSignal(Hook):
    """Polls ``stop()`` after every batch and epoch; when true, raises TrainingInterrupted.

    Mid-epoch, the loss is checked (:class:`FiniteLoss`) and the state saved
    (:class:`TrainState`) first, so a resumed run continues after that batch. The last
    batch of an epoch waits for the epoch's end, where the state is already saved; after
    the last epoch there is nothing left to interrupt.
    """

    def __init__(self, stop: Callable[[], bool] | None, state: TrainState,
                 finite: FiniteLoss) -> None:
        self.stop, self.state, self.finite = stop, state, finite

    def on_batch_end(self, run: Any) -> None:
        if self.stop is not None and self.stop() and run.batch + 1 < len(run.data.train):
            self.finite.check(run)
            self.state.save(run)
            raise TrainingInterrupted(run.epoch, run.batch + 1, self.state.path)

    def on_epoch_end(self, run: Any) -> None:
        if self.stop is not None and self.stop() and run.epoch + 1 < run.recipe.epochs:
            raise TrainingInterrupted(run.epoch + 1, 0, self.state.path)
