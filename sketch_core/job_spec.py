"""What one ``sketch`` or ``pretrain`` job needs, as plain dataclasses, and its defaults.

A :class:`RunSpec` is the job's input (:func:`sketch_core.jobs.execute`): the command
line builds one (``sketch_core.cli.train_args.spec_from_args``), so do the data-parallel
workers, which receive it pickled. The groups mirror the command-line options; the
training schedule is a :class:`~sketch_core.options.Recipe` and the sketch options are
:class:`~sketch_core.options.SketchOptions` (declared once, there). ``None`` means the
command's default (:data:`PRETRAIN_DEFAULTS`, :data:`SKETCH_DEFAULTS`), filled in by
:func:`resolve`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from sketch_core.errors import UserError
from sketch_core.options import Recipe, SketchOptions

__all__ = ["DataSpec", "ModelSpec", "SketchSpec", "OutputSpec", "RunSpec", "resolve", "run_recipe",
           "run_defaults", "PRETRAIN_DEFAULTS", "SKETCH_DEFAULTS", "COMMANDS"]

# pretrain defaults per data set (sketch keeps the original's 150 epochs at lr 0.01)
PRETRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"num_epochs": 40, "lr": 0.1, "lr_decay_step": [20, 30]},
    "synthetic": {"num_epochs": 30, "lr": 0.1, "lr_decay_step": [15, 25]},
    "default": {"num_epochs": 200, "lr": 0.1, "lr_decay_step": [100, 150]},
}
SKETCH_DEFAULTS: dict[str, Any] = {"num_epochs": 150, "lr": 0.01, "lr_decay_step": [50, 100]}
COMMANDS = ("sketch", "pretrain")


@dataclass
class DataSpec:
    """The data set and how it is split (``--data_set`` ... ``--download``).

    ``seed`` seeds the validation split (the recipe's seed, the shuffling and the
    initial weights; the command line sets both from ``--seed``).
    """

    data_set: str = "cifar10"
    data_path: str | None = None
    eval_batch_size: int = 100
    val_fraction: float = 0.1
    seed: int = 0
    input_size: int | None = None
    num_classes: int | None = None
    num_workers: int | None = None
    download: bool = False


@dataclass
class ModelSpec:
    """The architecture and where its weights come from.

    ``sketch_model`` is the pretrained checkpoint a sketch run sketches, ``refine`` an
    already sketched one that it only fine-tunes; ``arch``/``cfg`` default to the
    checkpoint's (for pretrain, to ``vgg``/``vgg16``). Paths may be ``str`` or ``Path``.

    ``init`` (pretrain only) is a loadable checkpoint of the unpruned network to start
    from instead of a fresh initialisation. ``family`` (``cifar``/``imagenet``) picks the
    model family explicitly (default: :func:`sketch_core.registry.resolve_arch`'s rule).
    ``normalize`` is the input normalisation (``cifar``, ``imagenet``, ``MEAN/STD`` or a
    ``(mean, std)`` pair; default: the checkpoint's record, else the data set's own); one
    that contradicts the checkpoint's record is an error unless ``force_normalize``.
    """

    arch: str | None = None
    cfg: str | None = None
    sketch_model: str | None = None
    refine: str | None = None
    init: str | None = None
    family: str | None = None
    normalize: Any = None
    force_normalize: bool = False


@dataclass(frozen=True)
class SketchSpec(SketchOptions):
    """How a sketch run narrows the model: the rate vector (``--sketch_rate``, the rate
    syntax ``'[0.5]*9'`` or a list of floats), ``--start_conv`` and the
    :class:`~sketch_core.options.SketchOptions` (``mode``, ``select_by``, ...)."""

    rates: str | Sequence[float] | None = None
    start_conv: int = 1

    @property
    def options(self) -> SketchOptions:
        """The sketch options alone."""
        return SketchOptions(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(SketchOptions)})


def run_recipe(**fields: Any) -> Recipe:
    """A run's :class:`Recipe` whose unset ``epochs``, ``lr`` and ``lr_decay_step`` take
    the command's defaults (``run_recipe(epochs=40)``)."""
    return Recipe(**{"lr": None, "lr_decay_step": None, **fields})


@dataclass
class OutputSpec:
    """The job folder and what is shown while training."""

    job_dir: str = "./experiments"
    reset: bool = False
    progress: bool = True


@dataclass
class RunSpec:
    """One run: ``command`` ``sketch`` (sketch a checkpoint, fine-tune) or ``pretrain``.

    ``sketch`` is ``None`` for pretrain (an unpruned model); a sketch run without one
    takes :class:`SketchSpec`'s defaults. ``train``'s unset ``epochs``, ``lr`` and
    ``lr_decay_step`` take the command's defaults. ``resume`` names a training state to
    continue (``JOB_DIR/checkpoint/train_state.pt``, a file beside it or the job
    folder); ``test_only`` evaluates the checkpoint given by ``model.refine``,
    ``resume`` or ``model.sketch_model`` and writes nothing. ``gpus`` as ``--gpus``
    (``None``: GPU 0, or the CPU without CUDA).
    """

    command: Literal["sketch", "pretrain"] = "sketch"
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    sketch: SketchSpec | None = None
    train: Recipe = field(default_factory=run_recipe)
    output: OutputSpec = field(default_factory=OutputSpec)
    test_only: bool = False
    resume: str | None = None
    gpus: list[int] | None = None


def run_defaults(command: str, data_set: str) -> dict[str, Any]:
    """``num_epochs``, ``lr`` and ``lr_decay_step`` of ``command`` on ``data_set``."""
    if command == "pretrain":
        table = PRETRAIN_DEFAULTS.get(data_set, PRETRAIN_DEFAULTS["default"])
    else:
        table = SKETCH_DEFAULTS
    return {k: list(v) if isinstance(v, list) else v for k, v in table.items()}


def resolve(spec: RunSpec) -> RunSpec:
    """A copy of ``spec`` with the command's defaults filled in (the spec is not changed)."""
    if spec.command not in COMMANDS:
        raise UserError(f"unknown command {spec.command!r}; valid: {', '.join(COMMANDS)}")
    d = run_defaults(spec.command, spec.data.data_set)
    t = spec.train
    train = t.replace(epochs=d["num_epochs"] if t.epochs is None else t.epochs,
                      lr=d["lr"] if t.lr is None else t.lr,
                      lr_decay_step=tuple(d["lr_decay_step"] if t.lr_decay_step is None
                                          else t.lr_decay_step),
                      seed=spec.data.seed)
    sketch = spec.sketch
    if spec.command == "sketch":
        sketch = sketch if sketch is not None else SketchSpec()
    elif sketch is not None:
        raise UserError("pretrain trains an unpruned model: it takes no sketch options "
                        "(leave RunSpec.sketch None)")
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data),
                               model=dataclasses.replace(spec.model), sketch=sketch, train=train,
                               output=dataclasses.replace(spec.output),
                               gpus=None if spec.gpus is None else list(spec.gpus))
