"""The fine-tune / evaluate loop: SGD with multi-step decay, as the original, made fast.

:func:`fit` trains a model on a :class:`sketch_core.data.sets.Data` by a :class:`Recipe` (the
hyperparameters, in one place), tracks the best epoch on the validation split and
returns a :class:`FitResult`. One screen holds the loop: data is already on the device,
so a step is forward, backward, update; everything around it (evaluation, files, the
progress bar, NaN detection, the stop signal, the caller's callback) is a hook from
:mod:`sketch_core.training.hooks`, called on the shared :class:`Run`. Models and batches are
channels_last (faster on the CPU for CIFAR ResNets; docs/benchmarks.md); CUDA adds bf16 autocast and optional ``torch.compile``; the CPU
stays in fp32 unless ``amp=True``. Under a seed it is deterministic on the CPU.

Training state (weights, optimizer, scheduler, epoch and batch position, RNG, best
so far, history) is a plain dict of tensors and numbers: :func:`fit` writes it to
``state_path`` after every epoch (and when ``stop()`` turns true mid-epoch) and takes
it back as ``start_state``; the continued run ends with the same weights as one that
was never interrupted. Everything saved loads with ``torch.load(weights_only=True)``.

Accuracies are fractions in [0, 1]. If ``torch.distributed`` is initialised, the model
is wrapped in DistributedDataParallel, each rank reads its share of every epoch and
only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sketch_core.io.atomic import atomic_write_text
from sketch_core.io.checkpoint import atomic_save, read_checkpoint
from sketch_core.options import Recipe
from sketch_core.training.cuda_graph import GraphStep, graph_unavailable
from sketch_core.errors import UserError
from sketch_core.training.hooks import (METRIC_FIELDS, EpochCallback, EpochLog, FiniteLoss, Hook, MetricsCSV,
                    ProgressBar, StopSignal, TensorBoard, TrainingDiverged, TrainingInterrupted,
                    TrainState, Validation, emit)

__all__ = ["fit", "evaluate", "Run", "FitResult", "TrainingInterrupted",
           "TrainingDiverged", "save_state", "load_state", "resolve_device", "atomic_write_text",
           "STATE_FORMAT", "METRIC_FIELDS"]

STATE_FORMAT = "sketchtune-train-state-v1"
log = logging.getLogger("sketchtune")


@dataclass
class FitResult:
    """What :func:`fit` leaves: best epoch on validation, its weights (CPU), the history.

    Without a validation split, the last epoch counts as the best.
    """

    best_val_acc: float | None
    best_epoch: int
    epochs: int
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means the current CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    return torch.device(device)


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state atomically."""
    atomic_save(state, path)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training state written by :func:`fit`; a UserError if it is not one."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a sketchtune training state (expected one written by "
                        f"a sketch/pretrain run, e.g. JOB_DIR/checkpoint/train_state.pt)")
    return state


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: str | torch.device | None = None, *, amp: bool | None = None
             ) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) and mean cross-entropy of ``model`` on ``batches``."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    amp = device.type == "cuda" if amp is None else amp
    was_training = model.training
    model.eval()
    correct = top5 = loss = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        loss = loss + F.cross_entropy(out, y, reduction="sum").double()
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices
        hit = pred == y.view(-1, 1)
        correct = correct + hit[:, 0].sum()
        top5 = top5 + hit.any(dim=1).sum()
        n += len(y)
    model.train(was_training)
    if n == 0:
        raise UserError("cannot evaluate on an empty data split")
    return {"acc": correct.item() / n, "top5": top5.item() / n, "loss": loss.item() / n, "n": n}


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _zero_partial() -> dict[str, Any]:
    return {"loss": 0.0, "correct": 0, "n": 0}


class Run:
    """One fit in progress: what the loop and its hooks share.

    Set up once: ``recipe``, ``data``, ``device``, ``amp`` (resolved), ``rank``, ``raw``
    (the model on the device), ``net`` (what the step calls: ``raw``, wrapped for DDP
    and ``torch.compile`` as asked), ``optimizer``, ``scheduler``, ``criterion``,
    ``step`` (``step(x, y) -> (logits, loss)``: :meth:`eager_step` or a
    :class:`~sketch_core.training.cuda_graph.GraphStep`).
    Position: ``epoch``, ``batch`` (in ``on_batch_end`` the batch just done; at the
    start of an epoch the batch it starts at), ``epoch_done``. This epoch's tallies:
    ``loss_sum`` and ``correct`` (device tensors, read them sparingly), ``seen`` (images,
    a resumed epoch's part included), ``seen_now`` (images in this process), ``t0``.
    Best so far: ``best_acc``, ``best_epoch``, ``best_state`` (CPU), ``is_best``.
    ``metrics`` is the epoch's row (:data:`METRIC_FIELDS`), ``history`` all rows.
    """

    def __init__(self, model: nn.Module, data: Any, recipe: Recipe, device: torch.device,
                 start_state: dict[str, Any] | None = None) -> None:
        r = self.recipe = recipe
        self.data, self.device, cuda = data, device, device.type == "cuda"
        if cuda:  # shapes stay fixed for a whole run: let cuDNN time its algorithms once
            torch.backends.cudnn.benchmark = True
        self.amp = cuda if r.amp is None else r.amp
        self.rank = _rank()
        self.raw = model.to(device)
        if r.channels_last:
            self.raw = self.raw.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.raw.parameters(), lr=r.lr, momentum=r.momentum,
                                         weight_decay=r.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(r.lr_decay_step), gamma=r.gamma)
        self.epoch = self.batch = 0
        self.epoch_done, self.is_best = False, False
        self.best_acc, self.best_epoch, self.best_state = None, -1, None
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.partial = _zero_partial()
        if start_state is None:
            torch.manual_seed(r.seed)
        else:
            self.load_state_dict(start_state)
        self.net: nn.Module = self.raw
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            self.net = nn.parallel.DistributedDataParallel(
                self.raw, device_ids=[device.index] if cuda else None)
        if r.compile:
            self.net = torch.compile(self.net) if r.compile is True \
                else torch.compile(self.net, mode=str(r.compile))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
        self.step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = \
            self.eager_step
        if r.step == "graph":
            why = graph_unavailable(device, distributed=distributed, compiled=r.compile)
            if why is None:
                self.step = GraphStep(self.raw, self.optimizer, self.criterion, self.eager_step,
                                      device, amp=self.amp,
                                      batch_size=getattr(data.train, "batch_size", None))
            else:
                log.warning("graph step asked for, but %s: running eager steps", why)

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and the optimizer's step on one batch: (logits, loss)."""
        with _autocast(self.device, self.amp):
            out = self.net(x)
            loss = self.criterion(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return out, loss

    def close(self) -> None:
        """Release what the step holds (a captured graph)."""
        if isinstance(self.step, GraphStep):
            self.step.close()

    def begin_epoch(self, epoch: int) -> None:
        """Train mode, the epoch's batch order, tallies from a resumed epoch's part."""
        self.epoch, self.epoch_done = epoch, False
        self.net.train()
        self.data.train.set_epoch(epoch, self.batch)
        self.t0 = time.perf_counter()
        self.loss_sum = torch.tensor(float(self.partial["loss"]), device=self.device,
                                     dtype=torch.float64)
        self.correct = torch.tensor(int(self.partial["correct"]), device=self.device)
        self.seen, self.seen_now = int(self.partial["n"]), 0

    def count(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch to the epoch's tallies (no device sync)."""
        self.loss_sum += loss.detach().double() * len(y)
        self.correct += (out.detach().argmax(1) == y).sum()
        self.seen, self.seen_now = self.seen + len(y), self.seen_now + len(y)

    def end_epoch(self) -> None:
        """Time the epoch, step the schedule, make the row and add it to the history.

        The validation fields are None here; :class:`sketch_core.training.hooks.Validation` fills them.
        """
        loss_sum = self.loss_sum.item()  # waits for the device: the time below is complete
        train_time = time.perf_counter() - self.t0
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.batch, self.partial, self.epoch_done = 0, _zero_partial(), True
        self.metrics = {"epoch": self.epoch, "lr": lr, "train_loss": loss_sum / max(self.seen, 1),
                        "train_acc": self.correct.item() / max(self.seen, 1),
                        "val_loss": None, "val_acc": None, "val_top5": None,
                        "best_val_acc": self.best_acc, "time_s": round(train_time, 3),
                        "img_s": round(self.seen_now / max(train_time, 1e-9), 1),
                        "train_images": self.seen}  # this process's share under data parallelism
        self.history.append(self.metrics)

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """:func:`evaluate` of the model on this run's device and autocast setting."""
        return evaluate(self.raw, batches, self.device, amp=self.amp)

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state_dict."""
        return _cpu_copy(self.raw)

    def state_dict(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """The resumable state: after batch ``batch`` mid-epoch, or after the ended epoch."""
        if self.epoch_done:
            epoch, batch, part = self.epoch + 1, 0, self.partial
        else:
            epoch, batch = self.epoch, self.batch + 1
            part = {"loss": self.loss_sum.item(), "correct": int(self.correct.item()),
                    "n": self.seen}
        return {"format": STATE_FORMAT, "epoch": epoch, "batch": batch,
                "epochs": self.recipe.epochs, "model": self.weights(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.device),
                "best": {"val_acc": self.best_acc, "epoch": self.best_epoch,
                         "model": self.best_state},
                "history": self.history, "partial": part, "seed": self.recipe.seed,
                "meta": meta or {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (weights, optimizer, schedule, RNG, position)."""
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.device)
        self.epoch, self.batch = state["epoch"], state["batch"]
        best = state["best"]
        self.best_acc, self.best_epoch, self.best_state = best["val_acc"], best["epoch"], \
            best["model"]
        self.history = list(state["history"])
        self.partial = dict(state.get("partial", self.partial))

    def result(self) -> FitResult:
        """The best epoch, its weights (the model as it came after zero epochs), the history."""
        best_state = self.best_state if self.best_state is not None else self.weights()
        return FitResult(self.best_acc, self.best_epoch, self.recipe.epochs, best_state,
                         self.history)


def fit(model: nn.Module, data: Any, recipe: Recipe | None = None, *,
        device: str | torch.device | None = None, job_dir: str | os.PathLike | None = None,
        progress: bool = True, start_state: dict[str, Any] | None = None,
        state_path: str | os.PathLike | None = None, state_meta: dict[str, Any] | None = None,
        on_epoch: Callable[[int, dict[str, Any]], Any] | None = None,
        stop: Callable[[], bool] | None = None, hooks: Iterable[Hook] = (),
        **hyper: Any) -> FitResult:
    """Train ``model`` on ``data.train`` by ``recipe``, choosing the best epoch on ``data.val``.

    The hyperparameters come as a :class:`Recipe`, as its fields in keywords
    (``fit(model, data, epochs=30, lr=0.1)``), or both (the keywords win). After every
    epoch the metrics row (:data:`METRIC_FIELDS`, 0-based ``epoch``) goes to
    ``job_dir/metrics.csv``, the full state to ``state_path`` (``state_meta`` under
    ``"meta"``), then ``on_epoch(epoch, metrics)`` is called; ``metrics["is_best"]`` says
    whether this epoch is the best so far. ``start_state`` (from :func:`load_state`)
    continues a run. ``stop`` is polled after every batch: when it returns true, the
    state is saved and :class:`TrainingInterrupted` raised. A NaN loss raises
    :class:`TrainingDiverged` before anything of that epoch is saved. ``hooks`` run after
    the built-in ones that write files, before ``on_epoch`` (see :mod:`sketch_core.training.hooks`).
    """
    recipe = (Recipe(**hyper) if recipe is None else replace(recipe, **hyper)).complete()
    run = Run(model, data, recipe, resolve_device(device), start_state)
    rank0 = run.rank == 0
    job = Path(job_dir) if job_dir is not None and rank0 else None
    state = TrainState(str(state_path) if state_path is not None and rank0 else None, state_meta)
    finite = FiniteLoss(state.path)
    hooks = [ProgressBar(progress and rank0), finite, Validation(data.val), EpochLog(),
             MetricsCSV(job), TensorBoard(job), state, *hooks, EpochCallback(on_epoch),
             StopSignal(stop, state, finite)]
    try:
        emit(hooks, "on_fit_start", run)
        for epoch in range(run.epoch, recipe.epochs):
            run.begin_epoch(epoch)
            emit(hooks, "on_epoch_start", run)
            for run.batch, (x, y) in enumerate(data.train, start=run.batch):
                x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
                if recipe.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out, loss = run.step(x, y)
                run.count(loss, out, y)
                emit(hooks, "on_batch_end", run)
            run.end_epoch()
            emit(hooks, "on_epoch_end", run)
    finally:
        emit(hooks, "on_fit_end", run)
        run.close()
    return run.result()
