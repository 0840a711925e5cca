"""One trial, whatever runs it: the baseline sketched at the trial's widths, BN
recalibrated, fine-tuned briefly, every epoch reported.

:class:`TrialSetup` is everything a trial needs besides its rate vector, resolved once
in the driver (the architecture, the sketch options, the recipe, which images train,
choose and report) and pickled to the workers. :func:`train_trial` runs one trial
through the one pipeline (:func:`sketch_core.pipeline.prune_and_finetune`); the Ray
Tune trainable (:mod:`search.run.tune_trial`) and the Ray-free loop
(:mod:`search.run.local_loop`) are short adapters over it. The data set and the
baseline are cached per worker process, so reused actors pay for neither again.

``train_images`` and ``val_images`` size the recipe by images
(:func:`sketch_core.data.subsets.sized_data`): each epoch trains on that many images
drawn anew (seeded by the recipe's seed, the trial's rates and the epoch), and every
trial is scored on the same seeded subset of the validation split.

Errors inside the trial (a NaN loss, a bad vector, any exception of the training code)
are deterministic: the trial reports ``failed: True`` with the message and ends.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from search.experiment.resolve import SearchPlan
from sketch_core.cost.flops import count_flops
from sketch_core.data.request import DataRequest
from sketch_core.data.sets import Data
from sketch_core.data.subsets import sized_data
from sketch_core.options import Recipe, SketchOptions
from sketch_core.pipeline import Outputs, prune_and_finetune
from sketch_core.plans import widths_for
from sketch_core.registry import Arch
from sketch_core.training.hooks import TrainingDiverged

__all__ = ["TrialSetup", "trial_setup", "train_trial", "trial_data", "baseline_model", "STATE_FILE"]

STATE_FILE = "train_state.pt"
_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares, resolved; plain data, pickled to the workers.

    ``data`` loads the images as the search scores them (``val``: the images that
    choose); ``threads``: torch threads per trial; ``ended``: final reports of trials
    that ended before a resume (trial id -> report).
    """

    arch: Arch
    data: DataRequest
    options: SketchOptions
    recipe: Recipe
    num_classes: int
    in_channels: int
    round_to: int = 1
    train_images: int | None = None
    val_images: int | None = None
    threads: int | None = None
    use_gpu: bool = False
    baseline_key: str = ""
    baseline_flops: int = 1
    baseline_params: int = 1
    transform_input: bool = False
    ended: dict[str, dict] = field(default_factory=dict)

    def widths(self, rates: list[float]) -> list[int]:
        """Per-slot widths of a per-unit rate vector."""
        return widths_for(self.arch.plan(), rates, self.options.sketch_lastconv, self.round_to)


def trial_setup(plan: SearchPlan, ended: dict[str, dict] | None = None) -> TrialSetup:
    """The trials' setup of a search plan (``ended``: final reports kept for a resume)."""
    b = plan.baseline
    return TrialSetup(
        arch=plan.arch, data=plan.data, options=plan.options, recipe=plan.recipe,
        num_classes=int(b["num_classes"]), in_channels=int(b["in_channels"]),
        round_to=plan.round_to, train_images=plan.train_images, val_images=plan.val_images,
        threads=plan.threads, use_gpu=plan.resources.gpu > 0, baseline_key=str(b.get("key")),
        baseline_flops=int(b["flops"]), baseline_params=int(b["params"]),
        transform_input=bool(b.get("transform_input")), ended=dict(ended or {}))


def trial_data(setup: TrialSetup, device: str) -> Data:
    """The data set as the search scores it, loaded once per worker process and device."""
    key = repr(("data", setup.data, device))
    if key not in _CACHE:
        _CACHE[key] = setup.data.load(device)
    return _CACHE[key]


def baseline_model(setup: TrialSetup, state: dict[str, torch.Tensor], device: str
                   ) -> torch.nn.Module:
    """The unpruned model with the baseline's weights, built once per worker process."""
    key = repr(("model", setup.baseline_key, device))
    if key not in _CACHE:
        for k in [k for k in _CACHE if k.startswith("('model'")]:
            del _CACHE[k]  # one baseline per process at a time
        model = setup.arch.build(None, setup.num_classes, setup.in_channels)
        model.load_state_dict(state)
        if setup.transform_input:
            model.transform_input = True
        _CACHE[key] = model.to(device).eval()
    return _CACHE[key]


def _error_text(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


class _Reports:
    """The trial's reports: what every report carries, and the epoch reached."""

    def __init__(self, setup: TrialSetup, rates: list[float], node: str | None,
                 report: Callable[[dict, Path | None], None], data: Data) -> None:
        self.setup, self.report, self.data = setup, report, data
        self.base: dict[str, Any] = {"rates": rates, "node": node, "failed": False,
                                     "flops": None, "flops_ratio": None, "params": None,
                                     "params_ratio": None}
        self.epoch, self.state_file = 0, None

    def pruned(self, model: torch.nn.Module, before: Any, sketched: Any) -> None:
        flops, params = count_flops(model, self.data.shape)
        s = self.setup
        self.base.update(flops=flops, params=params, flops_ratio=flops / s.baseline_flops,
                         params_ratio=params / s.baseline_params,
                         val_acc_sketched=None if sketched is None else sketched.acc)

    def epoch_end(self, epoch: int, metrics: dict) -> None:
        self.epoch = epoch + 1
        self.report({**self.base, "val_acc": metrics["val_acc"], "epoch": epoch + 1,
                     "train_loss": metrics["train_loss"], "train_acc": metrics["train_acc"],
                     "best_val_acc": metrics["best_val_acc"], "lr": metrics["lr"]},
                    self.state_file)

    def failed(self, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, TrainingDiverged) else _error_text(exc)
        self.report({**self.base, "val_acc": 0.0, "epoch": self.epoch, "failed": True,
                     "error": message}, None)


def train_trial(rates: list[float], setup: TrialSetup, baseline: dict[str, torch.Tensor],
                report: Callable[[dict, Path | None], None],
                start_state: dict | None = None, node: str | None = None,
                widths: list[int] | None = None) -> None:
    """One trial: sketch the baseline at ``widths`` (those of ``rates`` when not given;
    or continue ``start_state``), fine-tune, and ``report(metrics, state_file)`` each
    epoch (the file holding the full training state; None when there is none). A
    failure becomes one last report with ``failed: True``."""
    started = time.time()
    torch.set_num_threads(setup.threads or 1)
    device = "cuda" if setup.use_gpu and torch.cuda.is_available() else "cpu"
    rates = [float(r) for r in rates]
    reports = _Reports(setup, rates, node, report, None)
    work = None
    try:
        reports.data = data = sized_data(trial_data(setup, device), setup.train_images,
                                         setup.val_images, setup.recipe.seed, rates)
        widths = list(widths) if widths is not None else setup.widths(rates)
        reports.base["widths"] = widths
        model = baseline_model(setup, baseline, device) if start_state is None else \
            setup.arch.build(widths, setup.num_classes, setup.in_channels)
        if start_state is not None:
            reports.epoch = int(start_state["epoch"])
        if setup.recipe.epochs:
            work = Path(tempfile.mkdtemp(prefix="sketchtune-trial-"))
            reports.state_file = work / STATE_FILE
        out = prune_and_finetune(
            setup.arch, model, widths, setup.options, setup.recipe, data, device=device,
            outputs=Outputs(state=reports.state_file), report=reports.epoch_end,
            start_state=start_state, state_meta={"rates": rates}, on_pruned=reports.pruned)
        if not setup.recipe.epochs:  # zero-shot: the score after the sketch is the result
            report({**reports.base, "val_acc": reports.base["val_acc_sketched"], "epoch": 0,
                    "time_total_s_trial": time.time() - started}, None)
        del out
    except Exception as exc:  # deterministic: report it, do not let Tune retry it
        reports.failed(exc)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
