"""The search configuration: YAML schema, defaults, overrides and validation.

A config file has one section per concern (``model``, ``sketch``, ``space``,
``sampler``, ``budget``, ``trial``, ``scheduler``, ``resources``, ``storage``,
``retrain``); every key has a type and a default, so a file names only what differs.
Each section is a pydantic model that forbids unknown keys and checks types, choices
and ranges; the rules that tie keys together are model validators. :func:`load_config`
reads a path or the name of a shipped config (``quickstart``), applies
``--set section.key=value`` overrides and validates. Anything wrong is one
:class:`~sketch_core.errors.UserError` naming the dotted key, what was given and what
is expected (an unknown key also gets the closest valid one). The choice lists of the
sketch and the data come from :mod:`sketch_core`. This module needs neither Ray nor
Optuna.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      ValidationError, create_model, field_validator, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from search.results.budgets import Budget, parse_budget
from search.results.picks import parse_pick
from sketch_core.data.sets import DATA_SETS
from sketch_core.errors import UserError
from sketch_core.data.normalize import check_channels, parse_normalize
from sketch_core.models.registration import FAMILIES
from sketch_core.options import MODES, RANDOM_RULES, SELECT_BY, Recipe, SketchOptions
from sketch_core.options import WEIGHT_NORMS as NORMS
from sketch_core.registry import Arch, family_of, list_cfgs, resolve_arch
from sketch_core.data.folder_cache import default_input_size

__all__ = [
    "ModelConfig", "PretrainConfig", "SketchConfig", "SpaceConfig", "SamplerConfig",
    "BudgetConfig", "TrialConfig", "SchedulerConfig", "ResourcesConfig", "StorageConfig",
    "RetrainConfig", "LatencyConfig", "SearchConfig", "load_config", "config_from_dict", "config_to_dict",
    "apply_overrides", "parse_duration", "format_duration", "shipped_configs",
    "resolve_config_path", "recipe_hash",
]

# the search's own choices; the sketch's and the data's are sketch_core's (imported above)
SAMPLERS = ("nsga2", "tpe", "random", "surrogate")
SCHEDULERS = ("asha", "cost_asha", "moasha", "none")
COST_SCHEDULERS = ("cost_asha", "moasha")  # the schedulers that rank by accuracy and cost
GROUPINGS = ("per_unit", "per_stage")
FLOPS_POLICIES = ("reject", "repair")
OBJECTIVES = ("val_acc", "flops", "latency")  # val_acc first; then flops and/or latency
COSTS = ("flops", "latency")
LATENCY_DEVICES = ("cpu", "cuda")
LATENCY_RUNTIMES = ("torch", "onnxruntime")


# --------------------------------------------------------------------------- value types

class _Note:
    """Annotation metadata: a sentence added to a range error of the key it annotates."""

    def __init__(self, text: str) -> None:
        self.text = text


def _integral(value: Any) -> Any:
    """``3.0`` is an integer; nothing else changes (strict validation does the rest)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _bool_word(value: Any) -> Any:
    """``True``/``False`` as strings, the original's spelling, are booleans."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _tuple_as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _config_error(message: str, *keys: str) -> PydanticCustomError:
    """A rule's failure: ``keys`` are the section's keys it names (none: the field's own)."""
    return PydanticCustomError("config", "{message}", {"message": message, "keys": keys})


def _verbatim(exc: UserError) -> PydanticCustomError:
    """A UserError of a parser the schema delegates to, kept word for word."""
    return PydanticCustomError("user_error", "{message}", {"message": str(exc)})


# strict validation (see _Section) plus the few conversions YAML and the original allow
Int = Annotated[int, BeforeValidator(_integral)]
Bool = Annotated[bool, BeforeValidator(_bool_word)]
IntList = Annotated[list[Int], BeforeValidator(_tuple_as_list)]
StrList = Annotated[list[str], BeforeValidator(_tuple_as_list)]
PositiveInt = Annotated[Int, Field(gt=0)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1),
                     _Note("rates and FLOPs budgets are fractions of the unpruned network")]

DataSet = Literal[DATA_SETS]
Family = Literal[FAMILIES]
Mode = Literal[MODES]
SelectBy = Literal[SELECT_BY]
WeightNorm = Literal[NORMS]
RandomRule = Literal[RANDOM_RULES]
Sampler = Literal[SAMPLERS]
Scheduler = Literal[SCHEDULERS]
Grouping = Literal[GROUPINGS]
FlopsPolicy = Literal[FLOPS_POLICIES]
Objective = Literal[OBJECTIVES]
CostName = Literal[COSTS]


# --------------------------------------------------------------------------- sections

class _Section(BaseModel):
    """What every section shares: no unknown keys, no silent conversions, checked updates."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        return {} if data is None else data  # ``trial:`` with nothing under it


# --------------------------------------------------------------------------- sections of the core's options

_RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe) if f.metadata.get("config", True))

def _config_type(tp: Any, default: Any) -> Any:
    """The config's type for a core option's annotation: strict ints and booleans that
    also read ``3.0`` and ``True``, lists for tuples, Optional only when the default is None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        inner = _config_type(args[0], default)
        return inner | None if default is None else inner
    if typing.get_origin(tp) is tuple:
        return IntList
    return {int: Int, bool: Bool}.get(tp, tp)


def section_from(cls: type, name: str, *, defaults: dict[str, Any] | None = None,
                 exclude: tuple[str, ...] = (), doc: str = "",
                 bounds: dict[str, dict[str, float]] | None = None) -> type[BaseModel]:
    """A config section whose keys are the config fields of core dataclass ``cls``
    (:mod:`sketch_core.options`): each key's type, bounds and help come from the field,
    its default too unless ``defaults`` gives the section's own (``bounds``: the
    section's own, e.g. ``{"epochs": {"ge": 1}}``)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("config", True) or f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        if isinstance(default, tuple):
            default = list(default)
        limits = {k: f.metadata[k] for k in ("gt", "ge", "lt", "le") if k in f.metadata}
        limits.update((bounds or {}).get(f.name, {}))
        tp = _config_type(hints[f.name], default)
        info = Field(description=f.metadata.get("help"), **limits)
        if isinstance(default, list):
            value = list(default)
            fields[f.name] = (Annotated[tp, info], Field(default_factory=lambda v=value: list(v)))
        else:
            fields[f.name] = (Annotated[tp, info], default)
    return create_model(name, __base__=_Section, __doc__=doc, **fields)


class PretrainConfig(section_from(
        Recipe, "PretrainRecipe", defaults={"epochs": 30, "lr": 0.1, "lr_decay_step": (15, 25)},
        exclude=("label_smoothing", "step"), bounds={"epochs": {"ge": 1}})):
    """How to train a baseline when ``model.pretrained`` is empty (digits, synthetic)."""

    cache_dir: str | None = Field(None, description=(
        "where pretrained baselines are cached; null: $XDG_CACHE_HOME/sketchtune/baselines, "
        "else ~/.cache/sketchtune/baselines"))

    def recipe(self) -> Recipe:
        """The section as the core's :class:`~sketch_core.options.Recipe`."""
        return Recipe(**self.model_dump(exclude={"cache_dir"}))


class ModelConfig(_Section):
    """The network, its data and its baseline."""

    cfg: str = Field("resnet56", description=(
        "the network's name, e.g. resnet56, vgg16, densenet40, resnet50 (`launch.py info` "
        "lists them)"))
    arch: str | None = Field(None, description=(
        "the architecture kind (resnet, vgg, densenet, googlenet), as the original's --arch; "
        "model.cfg alone decides the network"))
    data_set: DataSet = Field("cifar10", description="the data the baseline is trained, "
                                                     "fine-tuned and scored on")
    data_path: str | None = Field(None, description=(
        "where the data lives; null: data/cifar10 for cifar10 (digits and synthetic need "
        "none)"))
    pretrained: str | None = Field(None, description=(
        "the baseline's checkpoint (sketchtune, the original project's or torchvision's); "
        "null: pretrain one with model.pretrain (digits and synthetic only)"))
    num_classes: PositiveInt | None = Field(None, description=(
        "the classifier's outputs; null: the data's class count"))
    input_size: PositiveInt | None = Field(None, description=(
        "the image side for class folders and synthetic data; null: a folder's own side, "
        "224 for imagenet, else the family's default"))
    family: Family | None = Field(None, description=(
        "the model family cfg is read in; null: the only family that has cfg, else the data "
        "set's"))
    normalize: str | None = Field(None, description=(
        "the input normalisation: cifar, imagenet or MEAN/STD; null: model.pretrained's "
        "record, else the data set's own"))
    force_normalize: Bool = Field(False, description=(
        "use model.normalize even where it contradicts model.pretrained's record"))
    download: Bool = Field(False, description="download CIFAR-10 into data_path when it is "
                                              "missing")
    synthetic: dict | None = Field(None, description=(
        "options of the synthetic data (n_train, n_test, num_classes, channels, size, seed); "
        "null: their defaults"))
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description=(
        "the recipe of a baseline the search pretrains itself (see model.pretrain)"))

    def data_input_size(self) -> int | None:
        """The input size the data will have: ``input_size``, else a folder's images' own
        side (when the folder is there to look at), else None (the family's default)."""
        if self.input_size:
            return self.input_size
        if self.data_set == "folder" and self.data_path and Path(self.data_path).expanduser().is_dir():
            try:
                return default_input_size(Path(self.data_path).expanduser())
            except UserError:
                return None  # loading the data says what is wrong with the folder
        return 224 if self.data_set == "imagenet" else None

    def resolved_arch(self, input_size: int | None = None) -> Arch:
        """The architecture the search sketches (``family``, else the family rule at the
        data's input size)."""
        return resolve_arch(self.cfg, self.data_set, family=self.family,
                            input_size=input_size or self.data_input_size())

    @model_validator(mode="after")
    def _known_cfg(self) -> ModelConfig:
        if not self.cfg:
            raise _config_error("required (e.g. resnet56)", "cfg")
        try:
            resolve_arch(self.cfg, self.data_set, family=self.family,
                                 input_size=self.data_input_size())
        except UserError as exc:
            fam = self.family or family_of(self.data_set, input_size=self.data_input_size())
            raise _config_error(f"{exc}{_did_you_mean(self.cfg, list_cfgs(fam))}",
                                "cfg") from None
        if self.normalize is not None:
            try:
                check_channels(parse_normalize(self.normalize), 1 if self.data_set == "digits"
                               else int((self.synthetic or {}).get("channels", 3)),
                               f"data set {self.data_set}")
            except UserError as exc:
                raise _config_error(str(exc), "normalize") from None
        if self.force_normalize and self.normalize is None:
            raise _config_error("overrides the checkpoint's normalisation with model.normalize: "
                                "set model.normalize too", "force_normalize")
        return self


class SketchConfig(section_from(
        SketchOptions, "SketchSection",
        # select_lsq: what the real-data benchmark supports (docs/benchmarks.md)
        defaults={"mode": "select_lsq", "calibration_batches": 8})):
    """The sketch options trials and the retrain use, and ``start_conv`` (VGG)."""

    start_conv: Int | None = Field(None, ge=0, description=(
        "VGG only: the first conv with a rate; null: 1"))

    def options(self) -> SketchOptions:
        """The section as the core's :class:`~sketch_core.options.SketchOptions`."""
        return SketchOptions(**self.model_dump(exclude={"start_conv"}))


class SpaceConfig(_Section):
    """The rate grid, how rates are grouped, and the vectors evaluated first."""

    low: Fraction = Field(0.2, description="the lowest rate (fraction of a unit's filters "
                                           "kept) a unit may get")
    high: Fraction = Field(1.0, description="the highest rate a unit may get")
    step: Annotated[float, Field(gt=0, le=1)] | None = Field(0.05, description=(
        "the rate grid's step from low; null: continuous rates"))
    grouping: Grouping = Field("per_unit", description=(
        "per_unit: one rate per unit; per_stage: one per ResNet stage, dense block or "
        "Inception group"))
    round_to: PositiveInt = Field(1, description="kept widths rounded up to a multiple of "
                                                 "this")
    paper_rates: StrList = Field(default_factory=list, description=(
        "rate vectors evaluated first, in rate syntax (e.g. `'[0.6]*27'`)"))

    @model_validator(mode="after")
    def _ordered(self) -> SpaceConfig:
        if self.low > self.high:
            raise _config_error(f"low {self.low} is above high {self.high}", "low", "high")
        if (self.step is not None and self.high > self.low
                and self.step > self.high - self.low + 1e-9):
            raise _config_error(f"{self.step} is larger than the range [{self.low}, {self.high}]",
                                "step")
        return self


class SamplerConfig(_Section):
    """The Optuna sampler that proposes rate vectors."""

    name: Sampler = Field("nsga2", description=(
        "Optuna's NSGA-II, TPE or random search, or surrogate: a model-based sampler that "
        "also learns from stopped trials"))
    seed: Int = Field(0, description="the sampler's seed")
    population_size: Annotated[Int, Field(ge=2)] | None = Field(None, description=(
        "NSGA-II's population; null: a quarter of budget.num_samples, 4 to 50 (20 without "
        "it)"))
    anchors: NonNegativeInt = Field(4, description=(
        "uniform vectors `[r]*n` evaluated first (after paper_rates), spread evenly by cost "
        "from the cheapest to one grid step below the unpruned network (or to the budget)"))


_BUDGET_UNIT = {"flops": "'60M' for MACs", "latency": "'3ms' for milliseconds"}


def _budget_value(value: Any, axis: str, key: str) -> Any:
    """A budget key's value in the grammar of :mod:`search.results.budgets`, kept as a
    fraction (a YAML number must be one) or as its text (``'60M'``, ``'3ms'``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _config_error(f"expected a budget (a fraction in (0, 1], '50%' or "
                            f"{_BUDGET_UNIT[axis]}), got {value!r}")
    if isinstance(value, (int, float)):
        if not 0 < float(value) <= 1:
            raise _config_error(f"{float(value)} is outside (0, 1]; a number is a fraction of "
                                f"the unpruned network (write {_BUDGET_UNIT[axis]})")
        return float(value)
    try:
        budget = parse_budget(str(value), axis, f"config key budget.{key}")
    except UserError as exc:
        raise _verbatim(exc) from None
    return budget.value if budget.kind == "ratio" else budget.text


class BudgetConfig(_Section):
    """When the search ends, and the FLOPs or latency a vector may keep."""

    time: str | None = Field(None, description=(
        "wall clock of the search phase, e.g. 90s, 30m, 4h or 1h30m (--budget); null: no "
        "limit"))
    num_samples: PositiveInt | None = Field(32, description=(
        "trials to run, rejected proposals not counted (--num_samples); null: until "
        "budget.time"))
    flops_budget: float | str | None = Field(None, description=(
        "the most FLOPs a trained vector may keep: a fraction, '50%' or MACs like '60M'; "
        "null: none"))
    flops_policy: FlopsPolicy = Field("reject", description=(
        "a proposal over any budget (FLOPs or latency) is rejected, or repaired onto it"))
    latency: float | str | None = Field(None, description=(
        "the most predicted latency a vector may keep: a fraction of the unpruned network's, "
        "'50%' or '3ms'; null: none"))

    @field_validator("flops_budget", mode="before")
    @classmethod
    def _flops(cls, value: Any) -> Any:
        return _budget_value(value, "flops", "flops_budget")

    @field_validator("latency", mode="before")
    @classmethod
    def _latency(cls, value: Any) -> Any:
        return _budget_value(value, "latency", "latency")

    def flops_bound(self) -> Budget | None:
        """``flops_budget`` as a :class:`~search.results.budgets.Budget` (None: no budget)."""
        return None if self.flops_budget is None else parse_budget(self.flops_budget, "flops")

    def latency_bound(self) -> Budget | None:
        """``latency`` as a :class:`~search.results.budgets.Budget` (None: no budget)."""
        return None if self.latency is None else parse_budget(self.latency, "latency")

    @field_validator("time")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration(value, "budget.time")
            except UserError as exc:
                raise _verbatim(exc) from None
        return value

    @model_validator(mode="after")
    def _ends(self) -> BudgetConfig:
        if self.time is None and self.num_samples is None:
            raise _config_error("give one or both; without either the search would never end",
                                "num_samples", "time")
        return self


class TrialConfig(section_from(
        Recipe, "TrialRecipe", defaults={"epochs": 3, "lr": 0.01, "lr_decay_step": ()})):
    """One trial's recipe (a short fine-tune after BN recalibration) and its images."""

    eval_batch_size: PositiveInt = Field(256, description="the batch size of evaluation")
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.1, description=(
        "the fraction of the training split held out to choose on (val_source "
        "train_holdout)"))
    threads: PositiveInt | None = Field(None, description=(
        "torch threads per trial (and for the driver's pretrain and retrain); null: "
        "resources.cpu"))
    train_images: PositiveInt | None = Field(None, description=(
        "training images per trial epoch, drawn anew each epoch; null: all"))
    val_images: PositiveInt | None = Field(None, description=(
        "a fixed seeded subset of the validation split that every trial scores on; null: "
        "all"))
    # which images choose (trials, the retrain's best epoch): see experiment/scoring_split.py
    val_source: Literal["auto", "train_holdout", "test_holdout"] = Field("auto", description=(
        "which images choose (trials, the pick, the retrain's best epoch); auto: by the "
        "baseline's training record"))
    test_holdout: PositiveInt | None = Field(None, description=(
        "test images that choose under test_holdout; null: min(2000, half the test split)"))

    def recipe(self) -> Recipe:
        """The trials' :class:`~sketch_core.options.Recipe`."""
        return Recipe(**self.model_dump(include=set(_RECIPE_KEYS)))

    @model_validator(mode="after")
    def _holdout_needs_test_source(self) -> TrialConfig:
        if self.test_holdout is not None and self.val_source == "train_holdout":
            raise _config_error("sizes the test images that choose, but val_source is "
                                "train_holdout (the validation split chooses); set val_source "
                                "to test_holdout or auto, or drop test_holdout",
                                "test_holdout")
        return self


class SchedulerConfig(_Section):
    """The trial scheduler that stops weak trials early.

    ``asha``: successive halving on ``val_acc`` alone; ``cost_asha``: successive halving
    on ``val_acc`` above the rung's accuracy-vs-``cost`` trend; ``moasha``: successive
    halving promoting by (``val_acc``, ``cost``) fronts (both :mod:`search.run.schedulers`);
    ``none``: every trial runs its full recipe.
    """

    name: Scheduler = Field("cost_asha", description=(
        "asha: accuracy alone; cost_asha: accuracy above the rung's accuracy-vs-cost trend; "
        "moasha: (accuracy, cost) fronts; none: no early stopping"))
    grace_period: PositiveInt = Field(1, description=(
        "epochs before the first rung, where a trial can first be stopped"))
    reduction_factor: Annotated[Int, Field(ge=2)] = Field(2, description=(
        "η: rungs at grace_period times powers of η, and about 1/η of a rung's trials go on"))
    cost: CostName | None = Field(None, description=(
        "the cost axis cost_asha and moasha rank by; null: the search's cost axis"))

    @model_validator(mode="after")
    def _cost_is_a_cost_scheduler_s(self) -> SchedulerConfig:
        if self.cost is not None and self.name not in COST_SCHEDULERS:
            raise _config_error(f"is the cost axis cost_asha or moasha ranks by, but "
                                f"scheduler.name is {self.name}; set scheduler.name to "
                                f"cost_asha or moasha, or drop scheduler.cost", "cost")
        return self


class LatencyConfig(_Section):
    """Where latencies come from when an objective or a budget names latency.

    ``table``: a latency table measured on the deployment target (``launch.py info
    --latency --save_table FILE``); without it the table is measured here (on
    ``device`` with ``runtime``, ``batch``, ``threads``; ``points`` grid widths per
    axis) and cached. A table measured for another target is refused.
    """

    table: str | None = Field(None, description=(
        "a latency table measured on the target; null: measure one here and cache it"))
    device: Literal[LATENCY_DEVICES] = Field("cpu", description="the device a table is "
                                                                "measured on")
    runtime: Literal[LATENCY_RUNTIMES] = Field("torch", description="what runs the timed "
                                                                     "calls")
    batch: PositiveInt = Field(1, description="the batch size latencies are measured at")
    threads: PositiveInt | None = Field(1, description=(
        "CPU threads it is measured with; null: torch's default (all cores)"))
    points: Annotated[Int, Field(ge=2)] = Field(4, description=(
        "grid widths per axis of a table measured here"))
    cache_dir: str | None = Field(None, description=(
        "where measured tables are cached; null: $XDG_CACHE_HOME/sketchtune/latency, else "
        "~/.cache/sketchtune/latency"))


class ResourcesConfig(_Section):
    """What one trial asks of the cluster, and how many may run."""

    cpu: NonNegativeFloat = Field(1.0, description="CPUs one trial asks of Ray")
    gpu: NonNegativeFloat = Field(0.0, description=(
        "GPUs one trial asks of Ray; a fraction shares one GPU (0.25 packs four trials)"))
    max_concurrent_trials: PositiveInt | None = Field(None, description=(
        "the most trials running at once; null: as many as the cluster's resources allow"))
    max_failures: NonNegativeInt = Field(2, description=(
        "retries of a trial whose worker was lost (an error inside a trial is not retried)"))
    reuse_actors: Bool = Field(True, description="Ray Tune's reuse_actors: trial actors are "
                                                 "reused between trials")

    @field_validator("gpu")
    @classmethod
    def _whole_or_shared(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise _config_error(f"{value} GPUs; fractions are for sharing one GPU (e.g. 0.25), "
                                f"more than one must be a whole number")
        return value

    @model_validator(mode="after")
    def _asks_something(self) -> ResourcesConfig:
        if self.cpu == 0 and self.gpu == 0:
            raise _config_error("a trial must ask for some CPU or GPU", "cpu", "gpu")
        return self


class StorageConfig(_Section):
    """Where the experiment folder and the Optuna study live."""

    storage_path: str = Field("experiments", description=(
        "where experiment folders go: a local folder or a URI Ray Tune writes to "
        "(--storage_path)"))
    name: str | None = Field(None, description=(
        "the experiment folder's name (--name); null: `<config name>_<date-time>`"))
    study_storage: str | None = Field(None, description=(
        "an Optuna RDB URL for the study (--study_storage); null: SQLite study.db in the "
        "experiment folder"))

    @field_validator("storage_path")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise _config_error("must not be empty")
        return value

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value in (".", "..")):
            raise _config_error(f"{value!r} is not a folder name")
        return value


class RetrainConfig(section_from(
        Recipe, "RetrainRecipe", defaults={"epochs": 150, "lr": 0.01, "lr_decay_step": (50, 100)},
        exclude=("label_smoothing", "seed", "step"), bounds={"epochs": {"ge": 1}})):
    """The final full retrain of the picked vector (its seed and label smoothing are the
    trials')."""

    enabled: Bool = Field(True, description=(
        "retrain the pick when the search ends (--no_retrain skips it)"))
    pick: str = Field("knee", description=(
        "the trial to retrain: `knee`, `best`, `'flops<=F'`, `'latency<=L'` or `trial=ID`"))
    workers: PositiveInt = Field(1, description=(
        "data-parallel Ray Train workers of the retrain (1: in the driver's process)"))
    gpus_per_worker: NonNegativeFloat = Field(0.0, description=(
        "above 0 (or resources.gpu above 0): the data-parallel workers train on GPUs"))

    def recipe(self, trial: TrialConfig, epochs: int | None = None) -> Recipe:
        """The retrain's :class:`~sketch_core.options.Recipe` (``epochs``: an override)."""
        keys = set(_RECIPE_KEYS) - {"label_smoothing", "seed", "step"}
        fields = self.model_dump(include=keys)
        if epochs is not None:
            fields["epochs"] = epochs
        return Recipe(**fields, label_smoothing=trial.label_smoothing, seed=trial.seed)

    @field_validator("pick")
    @classmethod
    def _pick(cls, value: str) -> str:
        try:
            parse_pick(value)
        except UserError as exc:
            raise _verbatim(exc) from None
        return value


class SearchConfig(_Section):
    """A whole search: one attribute per section (``config.trial.epochs``)."""

    model: ModelConfig = Field(default_factory=ModelConfig, description=(
        "the network, its data and its baseline"))
    sketch: SketchConfig = Field(default_factory=SketchConfig, description=(
        "how trials and the retrain sketch the baseline"))
    space: SpaceConfig = Field(default_factory=SpaceConfig, description=(
        "the rate grid and how rates are grouped"))
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description=(
        "the Optuna sampler that proposes rate vectors"))
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description=(
        "when the search ends, and the FLOPs or latency a vector may keep"))
    trial: TrialConfig = Field(default_factory=TrialConfig, description=(
        "one trial's recipe and images"))
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description=(
        "the rule that stops weak trials early"))
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description=(
        "what one trial asks of the cluster"))
    storage: StorageConfig = Field(default_factory=StorageConfig, description=(
        "where the experiment folder and the Optuna study live"))
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description=(
        "the final full retrain of the picked vector"))
    latency: LatencyConfig = Field(default_factory=LatencyConfig, description=(
        "where predicted latencies come from"))
    objectives: Annotated[list[Objective], BeforeValidator(_tuple_as_list)] = Field(
        default_factory=lambda: ["val_acc", "flops"], description=(
            "what Optuna optimises: val_acc, then flops, latency or both"))
    _source: str | None = PrivateAttr(default=None)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[str]) -> list[str]:
        if (len(value) < 2 or value[0] != "val_acc" or len(set(value)) != len(value)):
            raise _config_error(f"{value!r}: expected val_acc followed by flops, latency or "
                                f"both: [val_acc, flops] (default), [val_acc, latency] or "
                                f"[val_acc, flops, latency]")
        return value

    @property
    def uses_latency(self) -> bool:
        """Whether the search prices vectors by latency (an objective, a budget, the
        scheduler's cost)."""
        return ("latency" in self.objectives or self.budget.latency is not None
                or self.scheduler.cost == "latency")

    @property
    def cost_axis(self) -> str:
        """The cost the front, the knee and the scheduler use: the second objective, or with
        three the budgeted one (latency when ``budget.latency`` is set)."""
        if len(self.objectives) > 2:
            return "latency" if self.budget.latency is not None else "flops"
        return self.objectives[1]

    @property
    def source(self) -> str | None:
        """Where the config came from (a path); not a YAML key, not in :func:`config_to_dict`."""
        return self._source

    @source.setter
    def source(self, value: str | None) -> None:
        self._source = value

    @property
    def early_stopping_note(self) -> str | None:
        """The line said when the scheduler can stop no trial (a grace period not below
        ``trial.epochs``): the search then runs every trial's full recipe. None otherwise."""
        sc, epochs = self.scheduler, self.trial.epochs
        if sc.name == "none" or sc.grace_period < epochs:
            return None
        return (f"scheduler {sc.name}: grace period {sc.grace_period} is not below trial.epochs "
                f"{epochs}, so no trial can be stopped early; every trial runs its full recipe "
                f"(lower scheduler.grace_period or raise trial.epochs to stop early)")

    @property
    def time_budget_s(self) -> float | None:
        return None if self.budget.time is None else parse_duration(self.budget.time, "budget.time")


# --------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | int | float, what: str = "--budget") -> float:
    """Seconds in ``90s``, ``30m``, ``4h``, ``1h30m`` or a plain number of seconds."""
    if isinstance(text, bool):
        raise UserError(f"{what}: expected a duration like 90s, 30m or 4h; got {text!r}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        try:
            seconds = float(s)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _DURATION_RE.finditer(s):
                if s[pos:m.start()].strip():
                    break
                seconds += float(m.group(1)) * _UNIT_S[m.group(2)]
                pos = m.end()
            if pos == 0 or s[pos:].strip():
                raise UserError(f"{what}: cannot parse {text!r}; expected a duration like "
                                f"90s, 30m, 4h or 1h30m") from None
    if not seconds > 0:
        raise UserError(f"{what}: the duration must be positive; got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``1h05m``, ``4m10s`` or ``9s``: a duration for the terminal."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


# --------------------------------------------------------------------------- error messages

_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("a boolean (true/false)", "booleans"), str: ("a string", "strings"),
          dict: ("a mapping", "mappings")}
_MOVED = {"trial.bn_batches": "sketch.calibration_batches"}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _did_you_mean(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _closest(name: str, choices: list[str]) -> str:
    return _did_you_mean(name, choices) or f"; valid keys: {', '.join(choices)}"


def _peel(tp: Any) -> tuple[Any, list, bool]:
    """(type, metadata, nullable) of an annotation, ``Optional`` and ``Annotated`` peeled off."""
    meta: list = []
    nullable = False
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp, *extra = typing.get_args(tp)
            for m in extra:
                meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                return tp, meta, nullable
            tp = args[0]
        else:
            return tp, meta, nullable


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _schema_at(loc: tuple) -> tuple[Any, list, bool] | None:
    """What the schema says about the key at ``loc``: (type, metadata, nullable)."""
    tp, meta, nullable = SearchConfig, [], False
    for part in loc:
        if isinstance(part, int):
            if typing.get_origin(tp) is not list:
                return None
            tp, meta, nullable = _peel(typing.get_args(tp)[0])
        elif _is_section(tp) and part in tp.model_fields:
            info = tp.model_fields[part]
            tp, meta, nullable = _peel(info.annotation)
            meta = list(info.metadata) + meta
        else:
            return None
    return tp, meta, nullable


def _describe(tp: Any, nullable: bool = False) -> str:
    """``an integer``, ``a list of strings``, ``one of a, b`` (``(or null)`` when it may be)."""
    tp = _peel(tp)[0]
    if typing.get_origin(tp) is list:
        inner = _peel(typing.get_args(tp)[0])[0]
        text = f"a list of {_NOUNS.get(inner, ('', getattr(inner, '__name__', str(inner))))[1]}"
    elif typing.get_origin(tp) is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(tp)))
    elif _is_section(tp):
        text = "a mapping"
    else:
        text = _NOUNS.get(tp, (getattr(tp, "__name__", str(tp)),))[0]
    return text + (" (or null)" if nullable else "")


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _range_text(value: Any, tp: Any, meta: list) -> str:
    """``0.0 is outside (0, 1]`` or ``expected a positive value, got 0``."""
    shown = float(value) if tp is float and isinstance(value, (int, float)) else value
    bounds = {name: getattr(m, name) for m in meta
              for name in ("gt", "ge", "lt", "le") if getattr(m, name, None) is not None}
    low = "(" if "gt" in bounds else "[" if "ge" in bounds else None
    high = ")" if "lt" in bounds else "]" if "le" in bounds else None
    lo = bounds.get("gt", bounds.get("ge"))
    hi = bounds.get("lt", bounds.get("le"))
    if low and high:
        text = f"{shown} is outside {low}{lo:g}, {hi:g}{high}"
        notes = [m.text for m in meta if isinstance(m, _Note)]
        return text + "".join(f"; {n}" for n in notes)
    if low:
        wanted = ("a positive value" if low == "(" and lo == 0 else
                  "a non-negative value" if lo == 0 else
                  f"at least {lo}" if low == "[" else f"more than {lo}")
    else:
        wanted = f"at most {hi}" if high == "]" else f"less than {hi}"
    return f"expected {wanted}, got {shown}"


def _message(err: dict) -> str:
    """One line for one pydantic error: the dotted key, what is expected, what was given."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    ctx = err.get("ctx") or {}
    key = _dotted(loc)
    got = f"got {value!r} ({type(value).__name__})"
    if kind in ("extra_forbidden", "invalid_key") and _dotted(loc) in _MOVED:
        return f"config key {_dotted(loc)} is now {_MOVED[_dotted(loc)]}; rename it there"
    if kind in ("extra_forbidden", "invalid_key"):
        prefix, name = _dotted(loc[:-1]), str(loc[-1])
        schema = _schema_at(loc[:-1])
        names = list(schema[0].model_fields) if schema and _is_section(schema[0]) else []
        match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        full = f"{prefix}.{name}" if prefix else name
        hint = (f"; did you mean {(prefix + '.' if prefix else '') + match[0]!r}?" if match
                else f"; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}")
        return f"unknown config key {full!r}{hint}"
    if kind == "user_error":
        return str(ctx["message"])
    if kind == "config":
        keys = tuple(ctx.get("keys") or ())
        names = [f"{key}.{k}" if key else k for k in keys] or [key]
        head = "config key " if len(names) == 1 else "config keys "
        return f"{head}{'/'.join(names)}: {ctx['message']}"
    schema = _schema_at(loc)
    tp, meta, nullable = schema if schema else (None, [], False)
    if _is_section(tp) or not loc:
        return f"config section {key or 'the top level'}: expected a mapping, {got}"
    if kind == "literal_error" and typing.get_origin(tp) is Literal:
        choices = [str(c) for c in typing.get_args(tp)]
        return (f"config key {key}: {value!r} is not one of {', '.join(choices)}"
                f"{_did_you_mean(value, choices)}")
    if kind in _RANGE_ERRORS:
        return f"config key {key}: {_range_text(value, tp, meta)}"
    if tp is not None:
        return f"config key {key}: expected {_describe(tp, nullable)}, {got}"
    return f"config key {key}: {err['msg'].lower()}, {got}"


def _user_error(exc: ValidationError) -> UserError:
    """The first of pydantic's errors as one line (the search stops at the first)."""
    return UserError(_message(exc.errors(include_url=False)[0]))


# --------------------------------------------------------------------------- public API

def config_from_dict(data: dict, source: str | None = None) -> SearchConfig:
    """Build and validate a :class:`SearchConfig` from a (YAML-shaped) mapping."""
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise _user_error(exc) from None
    config.source = source
    return config


def config_to_dict(config: SearchConfig) -> dict:
    """The config as plain data (for config.yaml and manifest.json)."""
    return config.model_dump()


_TOP_LEVEL_KEYS = ("objectives",)  # keys that are not sections


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    valid_sections = list(SearchConfig.model_fields)
    if len(parts) == 1 and dotted in _TOP_LEVEL_KEYS:
        data[dotted] = value
        return
    if len(parts) < 2 or not all(parts):
        raise UserError(f"--set {dotted}=...: expected section.key=value, e.g. "
                        f"trial.epochs=5 (sections: {', '.join(valid_sections)})")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a config mapping."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. trial.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
    return data


def shipped_configs() -> list[str]:
    """Names of the configs that ship with the package (``quickstart``, ...)."""
    root = resources.files("search") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path from a path or the name of a shipped config."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    stem = Path(stem).name
    candidate = resources.files("search") / "configs" / f"{stem}.yaml"
    if candidate.is_file():
        return Path(str(candidate))
    names = shipped_configs()
    hint = _closest(stem, names).replace("valid keys", "shipped configs")
    raise UserError(f"--config {name_or_path!r}: no such file, nor a shipped config{hint}")


def load_config(name_or_path: str, overrides: list[str] | None = None) -> SearchConfig:
    """Read, override and validate a config file (a path or a shipped config's name)."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise UserError(f"--config {path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of sections, got "
                        f"{type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides), source=str(path))


_HASHED_BEFORE = ("epochs", "lr", "lr_decay_step", "batch_size", "weight_decay", "seed")


def _pretrain_recipe(p: PretrainConfig) -> dict:
    """The pretrain keys a baseline's hash covers: those it always covered, and any other
    only when it is not its default (so earlier recipes keep their hash)."""
    fresh = PretrainConfig()
    return {k: v for k, v in p.model_dump(exclude={"cache_dir"}).items()
            if k in _HASHED_BEFORE or v != getattr(fresh, k)}


def recipe_hash(config: SearchConfig) -> str:
    """A short hash of everything that decides a pretrained baseline (for the cache)."""
    m = config.model
    recipe = {"cfg": m.cfg, "data_set": m.data_set, "data_path": m.data_path,
              "num_classes": m.num_classes, "input_size": m.input_size, "synthetic": m.synthetic,
              "val_fraction": config.trial.val_fraction, "split_seed": config.trial.seed,
              "pretrain": _pretrain_recipe(m.pretrain)}
    for key in ("family", "normalize"):  # only when set: earlier recipes keep their hash
        if getattr(m, key) is not None:
            recipe[key] = getattr(m, key)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
