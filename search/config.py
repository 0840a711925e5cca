"""The search configuration: YAML schema, defaults, overrides and validation.

A config file has one section per concern (``model``, ``sketch``, ``space``,
``sampler``, ``budget``, ``trial``, ``scheduler``, ``resources``, ``storage``,
``retrain``); every key has a type and a default, so a file names only what differs.
:func:`load_config` reads a path or the name of a shipped config (``quickstart``),
applies ``--set section.key=value`` overrides and checks every value. Anything wrong
is a :class:`~sketch_core.errors.UserError` naming the key, what was given and what is
expected (an unknown key also gets the closest valid one). This module needs neither
Ray nor Optuna.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sketch_core.errors import UserError

__all__ = [
    "ModelConfig", "PretrainConfig", "SketchConfig", "SpaceConfig", "SamplerConfig",
    "BudgetConfig", "TrialConfig", "SchedulerConfig", "ResourcesConfig", "StorageConfig",
    "RetrainConfig", "SearchConfig", "load_config", "config_from_dict", "config_to_dict",
    "apply_overrides", "parse_duration", "format_duration", "shipped_configs",
    "resolve_config_path", "recipe_hash",
]

DATA_SETS = ("cifar10", "imagenet", "folder", "digits", "synthetic")
MODES = ("sketch", "select", "select_lsq")
NORMS = ("max", "sum", "l2", "l1", "l2_2", "2max")
RANDOM_RULES = ("default", "random_pretrain", "l1_pretrain")
SELECT_BY = ("filters", "channels")
SAMPLERS = ("nsga2", "tpe", "random")
SCHEDULERS = ("asha", "none")
GROUPINGS = ("per_unit", "per_stage")
FLOPS_POLICIES = ("reject", "repair")


@dataclass
class PretrainConfig:
    """How to train a baseline when ``model.pretrained`` is empty (digits, synthetic)."""

    epochs: int = 30
    lr: float = 0.1
    lr_decay_step: list[int] = field(default_factory=lambda: [15, 25])
    batch_size: int = 128
    weight_decay: float = 5e-4
    seed: int = 0
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/sketchtune or ~/.cache/sketchtune


@dataclass
class ModelConfig:
    cfg: str = "resnet56"
    arch: str | None = None
    data_set: str = "cifar10"
    data_path: str | None = None
    pretrained: str | None = None
    num_classes: int | None = None
    input_size: int | None = None
    download: bool = False
    synthetic: dict | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class SketchConfig:
    """The original's sketch options, plus the mode trials use."""

    mode: str = "select"
    select_by: str = "filters"
    weight_norm_method: str | None = None
    filter_norm: bool = False
    sketch_bn: bool = False
    sketch_lastconv: bool = True
    start_conv: int | None = None
    random_rule: str = "default"


@dataclass
class SpaceConfig:
    low: float = 0.2
    high: float = 1.0
    step: float | None = 0.05
    grouping: str = "per_unit"
    round_to: int = 1
    paper_rates: list[str] = field(default_factory=list)


@dataclass
class SamplerConfig:
    name: str = "nsga2"
    seed: int = 0
    population_size: int | None = None  # None: sized to the trial budget
    anchors: int = 4  # uniform vectors [r]*n spread over the space, evaluated first


@dataclass
class BudgetConfig:
    time: str | None = None
    num_samples: int | None = 32
    flops_budget: float | None = None
    flops_policy: str = "reject"


@dataclass
class TrialConfig:
    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_step: list[int] = field(default_factory=list)
    batch_size: int = 128
    eval_batch_size: int = 256
    bn_batches: int = 8
    val_fraction: float = 0.1
    seed: int = 0
    label_smoothing: float = 0.0
    threads: int | None = None  # torch threads per trial; None: the trial's CPU count


@dataclass
class SchedulerConfig:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class ResourcesConfig:
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 2
    reuse_actors: bool = True


@dataclass
class StorageConfig:
    storage_path: str = "experiments"
    name: str | None = None
    study_storage: str | None = None


@dataclass
class RetrainConfig:
    enabled: bool = True
    pick: str = "knee"
    epochs: int = 150
    lr: float = 0.01
    lr_decay_step: list[int] = field(default_factory=lambda: [50, 100])
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    workers: int = 1
    gpus_per_worker: float = 0.0


@dataclass
class SearchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    source: str | None = None  # where the config came from (not a YAML key)

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
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


# --------------------------------------------------------------------------- schema checks

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}s"
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string",
            dict: "mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError as exc:
                errors.append(exc)
        raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r} "
                        f"({type(value).__name__})")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r} "
                            f"({type(value).__name__})")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key}: expected a number, got {value!r} "
                            f"({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"config key {key}: expected an integer, got {value!r} "
                            f"({type(value).__name__})")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):  # the original's spelling
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise UserError(f"config key {key}: expected a boolean (true/false), got {value!r} "
                            f"({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key {key}: expected a string, got {value!r} "
                            f"({type(value).__name__})")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping, got {value!r} "
                            f"({type(value).__name__})")
        return dict(value)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not user input


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(choices)}"


def _build(cls: type, data: Any, prefix: str) -> Any:
    """A dataclass instance of ``cls`` from a mapping, checking every key and type."""
    where = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section {where}: expected a mapping, got {data!r} "
                        f"({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            match = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = (f"; did you mean {(prefix + '.' if prefix else '') + match[0]!r}?" if match
                    else f"; valid keys{' of ' + prefix if prefix else ''}: {', '.join(fields)}")
            raise UserError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _choice(value: Any, choices: tuple, key: str) -> None:
    if value not in choices:
        match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise UserError(f"config key {key}: {value!r} is not one of "
                        f"{', '.join(map(str, choices))}{hint}")


def _in_unit(value: float | None, key: str) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise UserError(f"config key {key}: {value} is outside (0, 1]; rates and FLOPs budgets "
                        f"are fractions of the unpruned network")


def _positive(value: float | int | None, key: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UserError(f"config key {key}: expected a {'non-negative' if allow_zero else 'positive'}"
                        f" value, got {value}")


def _validate(c: SearchConfig) -> None:
    m = c.model
    _choice(m.data_set, DATA_SETS, "model.data_set")
    if not m.cfg:
        raise UserError("config key model.cfg: required (e.g. resnet56)")
    _positive(m.num_classes, "model.num_classes")
    _positive(m.input_size, "model.input_size")
    _positive(m.pretrain.epochs, "model.pretrain.epochs")
    _positive(m.pretrain.lr, "model.pretrain.lr")
    s = c.sketch
    _choice(s.mode, MODES, "sketch.mode")
    _choice(s.select_by, SELECT_BY, "sketch.select_by")
    if s.weight_norm_method is not None:
        _choice(s.weight_norm_method, NORMS, "sketch.weight_norm_method")
    _choice(s.random_rule, RANDOM_RULES, "sketch.random_rule")
    sp = c.space
    _in_unit(sp.low, "space.low")
    _in_unit(sp.high, "space.high")
    if sp.low > sp.high:
        raise UserError(f"config keys space.low/space.high: low {sp.low} is above high {sp.high}")
    if sp.step is not None:
        if not 0.0 < sp.step <= 1.0:
            raise UserError(f"config key space.step: {sp.step} is outside (0, 1]")
        if sp.step > sp.high - sp.low + 1e-9 and sp.high > sp.low:
            raise UserError(f"config key space.step: {sp.step} is larger than the range "
                            f"[{sp.low}, {sp.high}]")
    _choice(sp.grouping, GROUPINGS, "space.grouping")
    _positive(sp.round_to, "space.round_to")
    _choice(c.sampler.name, SAMPLERS, "sampler.name")
    _positive(c.sampler.anchors, "sampler.anchors", allow_zero=True)
    if c.sampler.population_size is not None and c.sampler.population_size < 2:
        raise UserError("config key sampler.population_size: expected at least 2")
    b = c.budget
    if b.time is not None:
        parse_duration(b.time, "budget.time")
    _positive(b.num_samples, "budget.num_samples")
    _in_unit(b.flops_budget, "budget.flops_budget")
    _choice(b.flops_policy, FLOPS_POLICIES, "budget.flops_policy")
    if b.time is None and b.num_samples is None:
        raise UserError("config: give budget.num_samples or budget.time (or both); "
                        "without either the search would never end")
    t = c.trial
    _positive(t.epochs, "trial.epochs", allow_zero=True)
    _positive(t.lr, "trial.lr")
    _positive(t.batch_size, "trial.batch_size")
    _positive(t.eval_batch_size, "trial.eval_batch_size")
    _positive(t.bn_batches, "trial.bn_batches", allow_zero=True)
    if not 0.0 < t.val_fraction < 1.0:
        raise UserError(f"config key trial.val_fraction: {t.val_fraction} is outside (0, 1)")
    _positive(t.threads, "trial.threads")
    sc = c.scheduler
    _choice(sc.name, SCHEDULERS, "scheduler.name")
    _positive(sc.grace_period, "scheduler.grace_period")
    if sc.reduction_factor < 2:
        raise UserError(f"config key scheduler.reduction_factor: expected at least 2, "
                        f"got {sc.reduction_factor}")
    r = c.resources
    _positive(r.cpu, "resources.cpu", allow_zero=True)
    _positive(r.gpu, "resources.gpu", allow_zero=True)
    if r.gpu > 1 and r.gpu != int(r.gpu):
        raise UserError(f"config key resources.gpu: {r.gpu} GPUs; fractions are for sharing one "
                        f"GPU (e.g. 0.25), more than one must be a whole number")
    if r.cpu == 0 and r.gpu == 0:
        raise UserError("config keys resources.cpu/gpu: a trial must ask for some CPU or GPU")
    _positive(r.max_concurrent_trials, "resources.max_concurrent_trials")
    _positive(r.max_failures, "resources.max_failures", allow_zero=True)
    if not c.storage.storage_path:
        raise UserError("config key storage.storage_path: must not be empty")
    if c.storage.name is not None and (not c.storage.name or "/" in c.storage.name
                                       or c.storage.name in (".", "..")):
        raise UserError(f"config key storage.name: {c.storage.name!r} is not a folder name")
    rt = c.retrain
    from search.picks import parse_pick  # noqa: PLC0415  (tiny module, no Ray)
    parse_pick(rt.pick)
    _positive(rt.epochs, "retrain.epochs")
    _positive(rt.lr, "retrain.lr")
    _positive(rt.workers, "retrain.workers")
    _positive(rt.batch_size, "retrain.batch_size")
    _positive(rt.gpus_per_worker, "retrain.gpus_per_worker", allow_zero=True)


# --------------------------------------------------------------------------- public API

def config_from_dict(data: dict, source: str | None = None) -> SearchConfig:
    """Build and validate a :class:`SearchConfig` from a (YAML-shaped) mapping."""
    config = _build(SearchConfig, data, "")
    config.source = source
    _validate(config)
    return config


def config_to_dict(config: SearchConfig) -> dict:
    """The config as plain data (for config.yaml and manifest.json)."""
    data = dataclasses.asdict(config)
    data.pop("source", None)
    return data


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    valid_sections = [f.name for f in dataclasses.fields(SearchConfig) if f.name != "source"]
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


def recipe_hash(config: SearchConfig) -> str:
    """A short hash of everything that decides a pretrained baseline (for the cache)."""
    m = config.model
    recipe = {"cfg": m.cfg, "data_set": m.data_set, "data_path": m.data_path,
              "num_classes": m.num_classes, "input_size": m.input_size, "synthetic": m.synthetic,
              "val_fraction": config.trial.val_fraction, "split_seed": config.trial.seed,
              "pretrain": {k: v for k, v in dataclasses.asdict(m.pretrain).items()
                           if k != "cache_dir"}}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
