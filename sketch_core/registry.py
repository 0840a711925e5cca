"""Resolving a cfg to an architecture, once: family, builder, plan, input size.

:func:`resolve_arch` turns (cfg, data set or family, start_conv, input size) into an
:class:`Arch`, which carries everything the rest of sketch_core needs: the family,
the cfg, the arch name, the builder, the plan with start_conv applied, the unit
count, the unit groups, the input size and the default input channels. Every public
function that takes a cfg string takes an :class:`Arch` too, and resolves a string
once at its entry; nothing downstream looks a name up again.

Which family a cfg means:

1. an explicit family wins (a cfg it lacks is an error naming its valid cfgs);
2. otherwise the only family that has the cfg (``resnet56``: cifar; ``resnet18``,
   ``densenet121``, ``vgg16_bn``: imagenet);
3. for a cfg both have (``resnet50``, ``googlenet``) the data set's: cifar10,
   digits and synthetic -> cifar, imagenet -> imagenet, folder -> cifar when the input
   size is at most 64, else imagenet (imagenet when the input size is not given).

Models register themselves (:func:`sketch_core.models.register`); the lists of
valid cfgs and arch names come from those registrations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Union

from torch import nn

from sketch_core.errors import UserError
from sketch_core.models.registration import FAMILIES, ModelEntry, registered
from sketch_core.plans import Plan, require_default_start_conv, widths_for

__all__ = ["Arch", "CfgLike", "resolve_arch", "build_model", "family_of", "list_cfgs",
           "list_arches", "SMALL_INPUT", "DATA_SETS"]

# the data sets sketchtune reads, and those whose models are the CIFAR family
DATA_SETS = ("cifar10", "imagenet", "folder", "digits", "synthetic")
CIFAR_SETS = ("cifar10", "digits", "synthetic")
# a class-folder set of images at most this size (height/width) uses the CIFAR models
SMALL_INPUT = 64


@dataclass(frozen=True)
class Arch:
    """One resolved architecture: a registration, a cfg, a start_conv, an input size."""

    spec: ModelEntry
    cfg: str
    start_conv: int = 1
    input_size: int = 32
    in_channels: int = 3
    _plan: Plan | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._plan is None:
            if not self.spec.start_conv:
                require_default_start_conv(self.cfg, self.start_conv)
            object.__setattr__(self, "_plan", self.spec.plan(self.cfg, start_conv=self.start_conv))

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def num_units(self) -> int:
        return self._plan.num_units

    @property
    def unit_groups(self) -> tuple[int, ...] | None:
        """Group sizes when a shorter vector (one rate per group of units) is accepted."""
        return self.spec.unit_groups

    @property
    def num_classes(self) -> int:
        """The classifier's default output count (10 for CIFAR, 1000 for ImageNet)."""
        return self.spec.num_classes

    @property
    def label(self) -> str:
        """How messages name it: ``cifar resnet56`` (with a non-default start_conv)."""
        extra = f" with --start_conv {self.start_conv}" if self.start_conv != 1 else ""
        return f"{self.family} {self.cfg}{extra}"

    def plan(self, start_conv: int | None = None) -> Plan:
        """The plan at the resolved start_conv; another ``start_conv`` gives that variant's."""
        if start_conv is None or start_conv == self.start_conv:
            return self._plan
        return self.with_start_conv(start_conv)._plan

    def with_start_conv(self, start_conv: int | None) -> Arch:
        start_conv = 1 if start_conv is None else int(start_conv)
        if start_conv == self.start_conv:
            return self
        return replace(self, start_conv=start_conv, _plan=None)

    def build(self, widths: list[int] | None = None, num_classes: int | None = None,
              in_channels: int | None = None) -> nn.Module:
        """A freshly initialised model; ``widths`` (one per plan slot) narrows it."""
        return self.spec.build(self.cfg, widths=widths, num_classes=num_classes or self.num_classes,
                               in_channels=self.in_channels if in_channels is None else in_channels)


CfgLike = Union[str, Arch]  # what public functions take where they take a cfg


def _explicit(data_set: str | None, family: str | None) -> str | None:
    """The family asked for: ``family``, or a family name given as the data set (``cifar``)."""
    if family is None and data_set in FAMILIES and data_set not in DATA_SETS:
        return data_set
    return family


def _data_set_family(data_set: str | None, input_size: int | None) -> str:
    if data_set == "imagenet":
        return "imagenet"
    if data_set == "folder":
        return "cifar" if input_size is not None and input_size <= SMALL_INPUT else "imagenet"
    return "cifar"


def _having(cfg: str) -> dict[str, ModelEntry]:
    """family -> the registration that builds ``cfg`` in it."""
    out: dict[str, ModelEntry] = {}
    for spec in registered():
        if spec.family not in out and spec.matches(cfg) and spec.refusal(cfg) is None:
            out[spec.family] = spec
    return out


def family_of(data_set: str | None = None, cfg: str | None = None, *, family: str | None = None,
              input_size: int | None = None) -> str:
    """The model family a data set (or a family name) selects; with ``cfg``, the rule above.

    Never raises for an unknown cfg: :func:`resolve_arch` says what is wrong with it.
    """
    family = _explicit(data_set, family)
    if family is not None:
        return family
    if cfg:
        fams = list(_having(cfg))
        if len(fams) == 1:
            return fams[0]
    return _data_set_family(data_set, input_size)


def list_cfgs(family: str | None = None) -> list[str]:
    """Example cfgs of one family (or of all), in listing order."""
    seen: dict[str, None] = {}
    for spec in registered():
        if family is None or spec.family == family:
            seen.update(dict.fromkeys(spec.examples))
    return list(seen)


def list_arches(family: str | None = None) -> list[str]:
    """Arch names (``--arch``) of one family (or of all), in listing order."""
    return list(dict.fromkeys(s.arch for s in registered() if family is None or s.family == family))


def _pick(cfg: str, data_set: str | None, family: str | None, input_size: int | None) -> ModelEntry:
    if family is not None:
        if family not in FAMILIES:
            raise UserError(f"unknown --family {family!r}; valid: {', '.join(FAMILIES)}")
        specs = [s for s in registered() if s.family == family and s.matches(cfg)]
        why = next((s.refusal(cfg) for s in specs if s.refusal(cfg)), None)
        ok = [s for s in specs if s.refusal(cfg) is None]
        if ok:
            return ok[0]
        reason = f" ({why})" if why else ""
        raise UserError(f"the {family} family has no --cfg {cfg!r}{reason}; valid: "
                        f"{', '.join(list_cfgs(family))}")
    having = _having(cfg)
    if len(having) == 1:
        return next(iter(having.values()))
    fam = _data_set_family(data_set, input_size)
    if having:
        return having[fam]
    # no family builds it: a pattern that matched says why (the data set's family first)
    matched = sorted((s for s in registered() if s.matches(cfg)), key=lambda s: s.family != fam)
    if matched:
        raise UserError(str(matched[0].refusal(cfg)))
    where = f"data set {data_set} ({fam} family)" if data_set else f"the {fam} family"
    raise UserError(f"unknown --cfg {cfg!r} for {where}; valid: {', '.join(list_cfgs(fam))}")


def resolve_arch(cfg: str | Arch, data_set: str | None = None, *, family: str | None = None,
                 arch: str | None = None, start_conv: int | None = None,
                 input_size: int | None = None, in_channels: int | None = None) -> Arch:
    """The architecture ``cfg`` means for this data set (or family); see the module doc.

    ``data_set`` may also be the family name ``cifar``, which is then explicit
    (``imagenet`` is a data set too, so it counts as one). ``arch`` (e.g. ``resnet``)
    is checked against the cfg's. An :class:`Arch` passes through (with
    ``start_conv``/``input_size``/``in_channels`` applied when given).
    """
    if isinstance(cfg, Arch):
        out = cfg.with_start_conv(start_conv) if start_conv is not None else cfg
        if input_size is not None and input_size != out.input_size:
            out = replace(out, input_size=int(input_size))
        if in_channels is not None and in_channels != out.in_channels:
            out = replace(out, in_channels=int(in_channels))
    else:
        if not isinstance(cfg, str) or not cfg:
            raise UserError(f"--cfg must name an architecture (e.g. resnet56); got {cfg!r}")
        spec = _pick(cfg, data_set, _explicit(data_set, family), input_size)
        if arch is not None and arch != spec.arch:
            raise UserError(f"--cfg {cfg} belongs to --arch {spec.arch}, not --arch {arch}")
        out = Arch(spec, cfg, 1 if start_conv is None else int(start_conv),
                   int(input_size or spec.input_size), 3 if in_channels is None else int(in_channels))
    if arch is not None and arch != out.arch:
        raise UserError(f"--cfg {out.cfg} belongs to --arch {out.arch}, not --arch {arch}")
    return out


def build_model(cfg: CfgLike, data_set: str = "cifar10", num_classes: int | None = None,
                rates: Sequence[float] | None = None, *, in_channels: int = 3,
                widths: list[int] | None = None, start_conv: int | None = None,
                sketch_lastconv: bool = True, round_to: int = 1) -> nn.Module:
    """A freshly initialised model; with ``rates`` (one per unit, parsed) or ``widths``
    (one per plan slot) the narrow version. ``cfg`` is a name (resolved with
    ``data_set``) or a resolved :class:`Arch`."""
    entry = resolve_arch(cfg, data_set, start_conv=start_conv)
    if widths is None and rates is not None:
        if isinstance(rates, str):
            raise UserError(f"build_model takes rates as numbers; read {rates!r} with "
                            f"sketch_core.rates.parse_rates first")
        rates = [float(r) for r in rates]
        if len(rates) != entry.num_units:
            raise UserError(f"{entry.label} takes {entry.num_units} sketch rates, got {len(rates)}")
        widths = widths_for(entry.plan(), rates, sketch_lastconv, round_to)
    model = entry.build(widths, num_classes, in_channels)
    if widths is not None:
        model.sketch_widths = list(widths)
    return model
