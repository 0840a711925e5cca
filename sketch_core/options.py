"""How a network is pruned and how it is fine-tuned: :class:`SketchOptions` and :class:`Recipe`.

Each option is declared here once, with its type, its default, its bounds and one line
of help (:func:`option`); every place that takes these options builds on these two
dataclasses: the ``sketch`` / ``pretrain`` command line, the search config's
``sketch``, ``trial``, ``retrain`` and ``model.pretrain`` sections (built from the
fields, a few with their own defaults), the trials and the retrain. Both are frozen and
check their values when made; a bad value is a :class:`~sketch_core.errors.UserError`
naming the option, the value and what is expected.

The choice lists of the sketch (:data:`MODES`, :data:`SELECT_BY`, :data:`RANDOM_RULES`,
:data:`WEIGHT_NORMS`) and of the training step (:data:`STEPS`) live here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from sketch_core.errors import UserError

__all__ = ["SketchOptions", "Recipe", "option", "option_help", "MODES", "SKETCH_MODES",
           "SELECT_BY", "RANDOM_RULES", "WEIGHT_NORMS", "STEPS"]

# sketch_released: `sketch` with the released FilterSketch code's FD arithmetic
MODES = ("sketch", "select", "select_lsq", "sketch_released")
SKETCH_MODES = ("sketch", "sketch_released")  # the modes that replace filters by their sketch
# what the selection modes sketch to rank a slot's channels: the producer's filters, or
# the channels as the consumers receive them
SELECT_BY = ("filters", "channels")
RANDOM_RULES = ("default", "random_pretrain", "l1_pretrain")
WEIGHT_NORMS = ("max", "sum", "l2", "l1", "l2_2", "2max")
STEPS = ("eager", "graph")

Mode = Literal["sketch", "select", "select_lsq", "sketch_released"]
SelectBy = Literal["filters", "channels"]
RandomRule = Literal["default", "random_pretrain", "l1_pretrain"]
WeightNorm = Literal["max", "sum", "l2", "l1", "l2_2", "2max"]
Step = Literal["eager", "graph"]


def option(default: Any = dataclasses.MISSING, *, help: str, gt: float | None = None,
           ge: float | None = None, lt: float | None = None, le: float | None = None,
           config: bool = True, flag: str | None = None) -> Any:
    """A dataclass field with its help line and bounds (``gt``/``ge``/``lt``/``le``) as
    metadata; ``config=False`` keeps it out of the search config's sections; ``flag`` is
    the command-line option that sets it (for messages)."""
    meta = {"help": help, "config": config, "flag": flag,
            **{k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def option_help(cls: type, name: str) -> str:
    """The help line of option ``name`` of ``cls``."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


def _bounds_text(meta: dict) -> str:
    low = f"> {meta['gt']:g}" if "gt" in meta else f">= {meta['ge']:g}" if "ge" in meta else ""
    high = f"< {meta['lt']:g}" if "lt" in meta else f"<= {meta['le']:g}" if "le" in meta else ""
    return " and ".join(t for t in (low, high) if t)


def _check_value(owner: str, f: dataclasses.Field, tp: Any, value: Any) -> None:
    """One field against its type's choices and its bounds; UserError naming it."""
    name = f.metadata.get("flag") or f"{owner}.{f.name}"
    if value is None:
        return
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    literals = [a for a in args if typing.get_origin(a) is Literal] or (
        [tp] if typing.get_origin(tp) is Literal else [])
    if literals:
        choices = typing.get_args(literals[0])
        if value not in choices:
            raise UserError(f"unknown {name} {value!r}; valid: {', '.join(map(str, choices))}")
        return
    meta = f.metadata
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = (math.isfinite(float(value)) and ("gt" not in meta or value > meta["gt"])
              and ("ge" not in meta or value >= meta["ge"])
              and ("lt" not in meta or value < meta["lt"])
              and ("le" not in meta or value <= meta["le"]))
        if not ok:
            raise UserError(f"{name} must be {_bounds_text(meta)}, got {value}")


def _check_fields(obj: Any) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_value(type(obj).__name__, f, hints[f.name], getattr(obj, f.name))


@dataclass(frozen=True)
class SketchOptions:
    """How a pretrained network is narrowed: the original's sketch options and the mode.

    The widths themselves (what each rate keeps) are not options: they are the
    pipeline's input (:func:`sketch_core.rates.widths_for`).
    """

    mode: Mode = option("sketch", flag="--sketch_mode", help=(
        "sketch (the paper: filters replaced by their Frequent Directions sketch), "
        "sketch_released (the released code's FD arithmetic), select (keep the filters with "
        "most energy in the sketch's row space) or select_lsq (select, then refit the "
        "consumers by least squares)"))
    select_by: SelectBy = option("filters", flag="--select_by", help=(
        "what select / select_lsq sketch to rank channels: filters (the producer's) or "
        "channels (each channel's weights in its consumers, scaled by its BN gain)"))
    weight_norm_method: WeightNorm | None = option(None, flag="--weight_norm_method", help=(
        "normalise the sketched filters: max, sum, l2, l1, l2_2 or 2max (none by default)"))
    filter_norm: bool = option(False, flag="--filter_norm",
                               help="normalise filter by filter instead of the whole layer")
    sketch_bn: bool = option(False, flag="--sketch_bn",
                             help="sketch the BN weights with the filters")
    sketch_lastconv: bool = option(True, flag="--sketch_lastconv",
                                   help="sketch the last unit too (False: it keeps every filter)")
    random_rule: RandomRule = option("default", flag="--random_rule", help=(
        "default sketches; random_pretrain / l1_pretrain keep random / largest-L1 "
        "pretrained filters instead (the original's baselines)"))
    calibration_batches: int = option(10, ge=0, flag="--calibration_batches", help=(
        "training batches that recompute the BN statistics after pruning and calibrate "
        "select_lsq (0: no BN recalibration; select_lsq still reads one)"))

    def __post_init__(self) -> None:
        if self.weight_norm_method in ("", "none", "None"):
            object.__setattr__(self, "weight_norm_method", None)
        _check_fields(self)


@dataclass(frozen=True)
class Recipe:
    """How a network is trained: SGD with momentum and weight decay, the learning rate
    multiplied by ``gamma`` at each epoch of ``lr_decay_step``.

    ``epochs``, ``lr`` and ``lr_decay_step`` may be None in a run's description (the
    command's default is filled in before training); :func:`~sketch_core.training.loop.fit`
    needs them set. ``amp``: bf16 autocast, None = on CUDA only. ``compile``: True for
    ``torch.compile``'s default mode or a mode's name. ``step`` ``graph`` replays the whole
    training step as one CUDA graph (eager where it cannot run, with one log line).
    """

    epochs: int | None = option(None, ge=0, flag="--num_epochs", help="epochs of training")
    lr: float | None = option(0.01, gt=0, flag="--lr", help="learning rate")
    lr_decay_step: tuple[int, ...] | None = option((50, 100), flag="--lr_decay_step", help=(
        "epochs at which the learning rate is multiplied by 0.1"))
    momentum: float = option(0.9, ge=0, flag="--momentum", help="SGD momentum")
    weight_decay: float = option(5e-4, ge=0, flag="--weight_decay", help="weight decay")
    label_smoothing: float = option(0.0, ge=0, lt=1, flag="--label_smoothing",
                                    help="label smoothing of the cross-entropy")
    batch_size: int = option(128, gt=0, flag="--train_batch_size", help="training batch size")
    seed: int = option(0, flag="--seed", help="seed of the shuffling, the initial weights "
                                              "and the pruning's randomness")
    step: Step = option("eager", help="eager, or graph: the training step as one CUDA graph "
                                      "(on CUDA)")
    gamma: float = option(0.1, gt=0, config=False, help="learning-rate decay factor")
    amp: bool | None = option(None, config=False, flag="--amp", help="bf16 autocast")
    compile: bool | str = option(False, config=False, flag="--compile",
                                 help="torch.compile, or the name of a compile mode")
    channels_last: bool | None = option(True, config=False,
                                        help="model and batches channels_last (None: True)")

    def __post_init__(self) -> None:
        steps = self.lr_decay_step
        if steps is not None:
            milestones = tuple(int(m) for m in steps)
            if list(milestones) != sorted(milestones) or any(m < 0 for m in milestones):
                raise UserError(f"--lr_decay_step must be non-negative epochs in increasing "
                                f"order, got {list(milestones)}")
            object.__setattr__(self, "lr_decay_step", milestones)
        if self.step not in STEPS:
            close = difflib.get_close_matches(str(self.step), STEPS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"the training step must be one of {', '.join(STEPS)}, "
                            f"got {self.step!r}{hint}")
        if self.channels_last is None:
            object.__setattr__(self, "channels_last", True)
        _check_fields(self)

    def complete(self) -> Recipe:
        """This recipe, checked to have ``epochs``, ``lr`` and ``lr_decay_step`` set."""
        unset = [f for f in ("epochs", "lr", "lr_decay_step") if getattr(self, f) is None]
        if unset:
            raise UserError(f"the training recipe leaves {', '.join(unset)} unset")
        return self

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)
