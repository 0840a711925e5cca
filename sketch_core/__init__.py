"""sketch_core: everything about one model (no Ray, no Optuna in here).

Public API (a ``cfg`` is a name, resolved once, or a resolved :class:`Arch`)::

    resolve_arch(cfg, data_set=None, family=None, start_conv=None, input_size=None) -> Arch
    build_model(cfg, data_set="cifar10", num_classes=None, rates=None, ...)
    load_checkpoint(path, cfg, data_set=..., num_classes=...)
    save_checkpoint(path, model, cfg=..., data_set=..., rates=..., metrics=...)
    sketch(model, cfg, rates, data_set=..., mode="sketch", **options)
    count_flops(model, input_size)        -> (macs, params)
    parse_rates(text, cfg=None, data_set=...)
    format_rates(rates)                   -> "[0.5]*9+[0.6]*9"
    rates_to_widths(cfg, rates, data_set=...)
    frequent_directions(matrix, rows)
    recalibrate_bn(model, batches)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sketch_core.pruning.bn import recalibrate_bn
from sketch_core.io.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from sketch_core.errors import UserError
from sketch_core.cost.flops import count_arch, count_flops, input_shape
from sketch_core.pruning.prune import MODES, RANDOM_RULES, SELECT_BY, sketch
from sketch_core.rates import format_rates, parse_rates, rates_to_widths
from sketch_core.registry import Arch, CfgLike, family_of, get_arch, list_cfgs, register, resolve_arch
from sketch_core.pruning.fd import frequent_directions
from sketch_core.job_spec import DataSpec, ModelSpec, OutputSpec, RunSpec, SketchSpec, TrainSpec
from sketch_core.jobs import execute

__all__ = [
    "build_model", "load_checkpoint", "save_checkpoint", "LoadedModel", "sketch", "count_flops",
    "count_arch", "input_shape", "parse_rates", "format_rates", "rates_to_widths",
    "frequent_directions", "recalibrate_bn", "get_arch", "family_of", "list_cfgs", "UserError",
    "MODES", "RANDOM_RULES", "SELECT_BY", "Arch", "resolve_arch", "register",
    "RunSpec", "DataSpec", "ModelSpec", "SketchSpec", "TrainSpec", "OutputSpec", "execute",
]


def build_model(cfg: CfgLike, data_set: str = "cifar10", num_classes: int | None = None,
                rates: Sequence[float] | str | None = None, *, in_channels: int = 3,
                widths: list[int] | None = None, start_conv: int | None = None,
                sketch_lastconv: bool = True, round_to: int = 1) -> nn.Module:
    """A freshly initialised model; with ``rates`` (or ``widths``) the narrow version.

    ``cfg`` is a name (resolved with ``data_set``) or a resolved :class:`Arch`.
    """
    entry = resolve_arch(cfg, data_set, start_conv=start_conv)
    if widths is None and rates is not None:
        widths = rates_to_widths(entry, rates, sketch_lastconv=sketch_lastconv, round_to=round_to)
    model = entry.build(widths, num_classes, in_channels)
    if widths is not None:
        model.sketch_widths = list(widths)
    return model
