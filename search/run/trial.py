"""One Ray Tune trial: sketch the baseline, recalibrate BN, fine-tune briefly, report.

:func:`run_trial` is a plain function trainable (``config["rates"]`` is the proposal).
The baseline's weights come through ``tune.with_parameters`` (stored once in Ray's
object store, so each node receives them once) and, like the data set, are cached per
worker process, so reused actors pay for neither again. Every epoch reports
``val_acc``, ``flops``, ``flops_ratio``, ``params``, ``params_ratio``, ``epoch``
(epochs done) and the node id, with a ``tune.Checkpoint`` of the full training state;
a trial that Tune moves or restarts continues from it.

``trial.train_images`` and ``trial.val_images`` size the recipe by images
(:func:`sized_data`): each epoch trains on that many images drawn anew from the
training split (seeded by ``trial.seed``, the trial's rates and the epoch), and every
trial is scored on the same seeded subset of the validation split.
The validation split is what ``setup.scores`` says (:mod:`search.experiment.scoring_split`): held out of
the training split, or ``trial.test_holdout`` images of the test split (the trial's
``val_acc`` is then measured there and the training split is used whole).
:func:`check_trial_images` is the driver's check that both fit their splits.

Errors inside the trial (a NaN loss, a bad vector, any exception of the training
code) are deterministic: the trial reports ``failed: True`` with the message and
ends, so Tune does not retry it. Only the loss of a worker (node death) reaches Tune's
``FailureConfig`` retries.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from search.experiment.config import SketchConfig, TrialConfig
from sketch_core.errors import UserError

__all__ = ["TrialSetup", "run_trial", "train_trial", "trial_data", "baseline_model",
           "sized_data", "check_trial_images", "trial_seed", "EpochSample"]

STATE_FILE = "train_state.pt"
_CACHE: dict[str, Any] = {}


@dataclass
class TrialSetup:
    """Everything a trial needs besides its rates; plain data, pickled to the workers.

    ``sketch`` and ``trial`` are the search config's sections as they are; ``threads``
    is the resolved torch thread count (``trial.threads`` or the trial's CPUs).
    """

    cfg: str
    data_set: str
    num_classes: int
    in_channels: int
    data_path: str | None = None
    input_size: int | None = None
    synthetic: dict | None = None
    sketch: SketchConfig = field(default_factory=SketchConfig)   # the config's own sections
    trial: TrialConfig = field(default_factory=TrialConfig)
    round_to: int = 1
    threads: int | None = None
    use_gpu: bool = False
    baseline_key: str = ""
    baseline_flops: int = 1
    baseline_params: int = 1
    transform_input: bool = False
    ended: dict[str, dict] = field(default_factory=dict)  # trial id -> final report (resume)
    family: str | None = None        # the baseline's model family (None: the family rule)
    normalize: dict | None = None    # the baseline's recorded (mean, std); None: the data set's
    scores: dict | None = None       # which images choose (search.experiment.scoring_split); None: train_holdout

    def arch(self):
        """The resolved architecture of the baseline (its family, the data's input size)."""
        from sketch_core.registry import resolve_arch

        return resolve_arch(self.cfg, self.data_set, family=self.family,
                            input_size=self.input_size)


def trial_data(setup: TrialSetup, device: str):
    """The data set as the search scores it (``setup.scores``: ``val`` is the images that
    choose), loaded once per worker process and device."""
    from search.experiment.scoring_split import data_val_fraction, scored_data
    from sketch_core.data.sets import load_data
    from sketch_core.data.normalize import from_record

    t = setup.trial
    source = (setup.scores or {}).get("val_source", "train_holdout")
    key = repr(("data", setup.data_set, setup.data_path, setup.input_size, setup.synthetic,
                t.batch_size, t.eval_batch_size, t.val_fraction, t.seed, device, setup.normalize,
                setup.scores))
    if key not in _CACHE:
        data = load_data(setup.data_set, setup.data_path, batch_size=t.batch_size,
                         eval_batch_size=t.eval_batch_size,
                         val_fraction=data_val_fraction(t, source), seed=t.seed, device=device,
                         input_size=setup.input_size, synthetic=setup.synthetic,
                         normalize=from_record(setup.normalize))
        _CACHE[key] = scored_data(data, t, setup.scores, setup.data_set)
    return _CACHE[key]


def _indices(loader: Any) -> torch.Tensor:
    """The rows of its split a loader serves (TensorLoader.index, FolderLoader.indices)."""
    return loader.index if hasattr(loader, "index") else loader.indices


def _serving(loader: Any, rows: torch.Tensor) -> Any:
    """A shallow copy of ``loader`` serving ``rows`` (the data tensors are shared)."""
    view = copy.copy(loader)
    setattr(view, "index" if hasattr(loader, "index") else "indices", rows)
    return view


def _draw(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` of ``rows``, drawn without replacement by a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed % (2**63))
    pick = torch.randperm(len(rows), generator=g)[:n].sort().values
    return rows[pick.to(rows.device)]


class EpochSample:
    """A training loader that serves ``n`` images of its split per epoch, drawn anew
    each epoch (seeded by ``seed`` and the epoch); otherwise the loader it wraps."""

    def __init__(self, loader: Any, n: int, seed: int) -> None:
        self.loader, self.n, self.seed = loader, int(n), int(seed)
        self.rows = _indices(loader)
        self.epoch, self.start_batch = 0, 0

    def rows_of(self, epoch: int) -> torch.Tensor:
        """The rows epoch ``epoch`` trains on."""
        return _draw(self.rows, self.n, self.seed * 1_000_003 + epoch * 7919 + 1)

    def __len__(self) -> int:
        return len(_serving(self.loader, self.rows[:self.n]))

    def __repr__(self) -> str:
        return f"EpochSample({self.n} of {len(self.rows)} images per epoch, {self.loader!r})"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "loader" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        view = _serving(self.loader, self.rows_of(epoch))
        view.set_epoch(epoch, start)
        return iter(view)


def _split_sizes(data: Any) -> tuple[int, int]:
    return len(_indices(data.train)), 0 if data.val is None else len(_indices(data.val))


def check_trial_images(trial: TrialConfig, data: Any) -> None:
    """``trial.train_images`` / ``trial.val_images`` fit the training / validation split
    of ``data``; a :class:`UserError` naming both numbers when one does not."""
    n_train, n_val = _split_sizes(data)
    if trial.train_images is not None and trial.train_images > n_train:
        raise UserError(f"trial.train_images: {trial.train_images} is larger than the "
                        f"training split ({n_train} images)")
    if trial.val_images is not None and trial.val_images > n_val:
        raise UserError(f"trial.val_images: {trial.val_images} is larger than the "
                        f"validation split ({n_val} images)")


def trial_seed(trial: TrialConfig, rates: list[float]) -> int:
    """The seed of one trial's image draws: ``trial.seed`` and the rate vector."""
    text = ",".join(f"{float(r):.6g}" for r in rates)
    return trial.seed * 1_000_003 + zlib.crc32(text.encode())


def sized_data(data: Any, trial: TrialConfig, rates: list[float]) -> Any:
    """``data`` as one trial sees it: ``trial.train_images`` per epoch and the fixed
    ``trial.val_images`` subset (the same for every trial); ``data`` itself when both
    are None. The loaders share ``data``'s tensors."""
    if trial.train_images is None and trial.val_images is None:
        return data
    check_trial_images(trial, data)
    changes: dict[str, Any] = {}
    if trial.train_images is not None:
        changes["train"] = EpochSample(data.train, trial.train_images, trial_seed(trial, rates))
    if trial.val_images is not None and data.val is not None:
        rows = _draw(_indices(data.val), trial.val_images, trial.seed * 1_000_003 + 17)
        changes["val"] = _serving(data.val, rows)
    return dataclasses.replace(data, **changes)


def baseline_model(setup: TrialSetup, state: dict[str, torch.Tensor], device: str) -> torch.nn.Module:
    """The unpruned model with the baseline's weights, built once per worker process."""
    key = repr(("model", setup.baseline_key, device))
    if key not in _CACHE:
        for k in [k for k in _CACHE if k.startswith("('model'")]:
            del _CACHE[k]  # one baseline per process at a time
        model = setup.arch().build(None, setup.num_classes, setup.in_channels)
        model.load_state_dict(state)
        if setup.transform_input:
            model.transform_input = True
        _CACHE[key] = model.to(device).eval()
    return _CACHE[key]


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _error_text(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def train_trial(rates: list[float], setup: TrialSetup, baseline: dict[str, torch.Tensor],
                report: Callable[[dict, Path | None], None],
                start_state: dict | None = None, node: str | None = None) -> None:
    """One trial's work, whatever runs it: sketch (or continue ``start_state``), fine-tune.

    ``report(metrics, state_file)`` receives each epoch's metrics and the file holding
    the full training state (None when there is none); a failure becomes one last
    report with ``failed: True``.
    """
    from sketch_core.pruning.bn import recalibrate_bn
    from sketch_core.cost.flops import count_flops
    from sketch_core.pruning.prune import sketch
    from sketch_core.rates import rates_to_widths
    from sketch_core.training.loop import TrainingDiverged, evaluate, fit

    started = time.time()
    sk, t = setup.sketch, setup.trial
    torch.set_num_threads(setup.threads or 1)
    device = "cuda" if setup.use_gpu and torch.cuda.is_available() else "cpu"
    rates = [float(r) for r in rates]
    base: dict[str, Any] = {"rates": rates, "node": node, "failed": False, "flops": None,
                            "flops_ratio": None, "params": None, "params_ratio": None}
    epoch_done = 0
    try:
        data = sized_data(trial_data(setup, device), t, rates)
        entry = setup.arch()
        widths = rates_to_widths(entry, rates, setup.data_set, sk.start_conv,
                                 sk.sketch_lastconv, setup.round_to)
        if start_state is not None:
            narrow = entry.build(widths, setup.num_classes, setup.in_channels).to(device)
            val_sketched = start_state["meta"].get("val_acc_sketched")
            epoch_done = int(start_state["epoch"])
        else:
            full = baseline_model(setup, baseline, device)
            calib = data.calibration_batches(max(1, t.bn_batches))
            narrow = sketch(full, entry, rates, setup.data_set, **sk.model_dump(),
                            round_to=setup.round_to, seed=t.seed, batches=calib, widths=widths)
            if t.bn_batches:
                recalibrate_bn(narrow, calib, device)
            val_sketched = evaluate(narrow, data.val, device)["acc"] if data.val is not None else None
        flops, params = count_flops(narrow, data.shape)
        base.update(widths=widths, flops=flops, params=params,
                    flops_ratio=flops / setup.baseline_flops,
                    params_ratio=params / setup.baseline_params,
                    val_acc_sketched=val_sketched)
        if t.epochs == 0:
            report({**base, "val_acc": val_sketched, "epoch": 0,
                    "time_total_s_trial": time.time() - started}, None)
            return
        work = Path(tempfile.mkdtemp(prefix="sketchtune-trial-"))
        state_path = work / STATE_FILE

        def on_epoch(epoch: int, metrics: dict) -> None:
            nonlocal epoch_done
            epoch_done = epoch + 1
            report({**base, "val_acc": metrics["val_acc"], "epoch": epoch + 1,
                    "train_loss": metrics["train_loss"], "train_acc": metrics["train_acc"],
                    "best_val_acc": metrics["best_val_acc"], "lr": metrics["lr"]}, state_path)

        try:
            fit(narrow, data, epochs=t.epochs, lr=t.lr, momentum=t.momentum,
                weight_decay=t.weight_decay, lr_decay_step=t.lr_decay_step,
                label_smoothing=t.label_smoothing, device=device, seed=t.seed, step=t.step,
                progress=False, start_state=start_state, state_path=state_path,
                state_meta={"val_acc_sketched": val_sketched, "rates": rates},
                on_epoch=on_epoch)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except Exception as exc:  # deterministic: report it, do not let Tune retry it
        message = str(exc) if isinstance(exc, TrainingDiverged) else _error_text(exc)
        report({**base, "val_acc": 0.0, "epoch": epoch_done, "failed": True,
                "error": message}, None)


def run_trial(config: dict, setup: TrialSetup, baseline: dict[str, torch.Tensor]) -> None:
    """The function trainable: one rate vector, start to end (or from its checkpoint)."""
    from ray import tune

    from sketch_core.training.loop import load_state

    trial_id = tune.get_context().get_trial_id()
    node = _node_id()
    if trial_id in setup.ended:  # finished before the driver was killed: report it again
        tune.report({**setup.ended[trial_id], "node": node, "resumed_finished": True})
        return
    start_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start_state = load_state(Path(d) / STATE_FILE)

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

    train_trial(config["rates"], setup, baseline, report, start_state, node)
