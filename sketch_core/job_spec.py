"""What one ``sketch`` or ``pretrain`` run needs, as plain dataclasses.

A :class:`RunSpec` is the engine's input (:func:`sketch_core.jobs.execute`): the
command line builds one (``sketch_core.cli.train_args.spec_from_args``), so do the
search's retrain and the data-parallel workers, which receive it pickled. The fields
are the command-line options grouped by what they describe; ``None`` means the
command's default (see :data:`sketch_core.jobs.PRETRAIN_DEFAULTS`), resolved by
:func:`sketch_core.jobs.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

__all__ = ["DataSpec", "ModelSpec", "SketchSpec", "TrainSpec", "OutputSpec", "RunSpec"]


@dataclass
class DataSpec:
    """The data set and how it is split and batched (``--data_set`` ... ``--download``)."""

    data_set: str = "cifar10"
    data_path: str | None = None
    train_batch_size: int = 128
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


@dataclass
class SketchSpec:
    """How a sketch run narrows the model (``--sketch_rate``, ``--sketch_mode`` ...).

    ``rates`` takes the rate syntax (``'[0.5]*9'``) or a list of floats.
    """

    rates: str | Sequence[float] | None = None
    mode: str = "sketch"
    select_by: str = "filters"
    weight_norm_method: str | None = None
    filter_norm: bool = False
    sketch_bn: bool = False
    sketch_lastconv: bool = True
    start_conv: int = 1
    random_rule: str = "default"
    calibration_batches: int = 10


@dataclass
class TrainSpec:
    """The fine-tune (or pretrain) schedule; ``None`` takes the command's default."""

    epochs: int | None = None
    lr: float | None = None
    lr_decay_step: list[int] | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    amp: bool | None = None
    compile: bool | str = False


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
    takes :class:`SketchSpec`'s defaults. ``resume`` names a training state to continue
    (``JOB_DIR/checkpoint/train_state.pt``, a file beside it or the job folder);
    ``test_only`` evaluates the checkpoint given by ``model.refine``, ``resume`` or
    ``model.sketch_model`` and writes nothing. ``gpus`` as ``--gpus`` (``None``: GPU 0,
    or the CPU without CUDA).
    """

    command: Literal["sketch", "pretrain"] = "sketch"
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    sketch: SketchSpec | None = None
    train: TrainSpec = field(default_factory=TrainSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    test_only: bool = False
    resume: str | None = None
    gpus: list[int] | None = None
