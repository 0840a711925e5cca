"""Model registration: each model file of this package says, once, which cfgs it builds.

A model file ends with one :func:`register` call naming its family, its cfg pattern,
its arch name (``--arch``), example cfgs (what listings and error messages show), its
default input size, its builder and its plan. :func:`registered` lists every
registration; the first call imports every module of this package, so a new model is
one new file here and nothing else. Resolution (which registration a cfg means, for
which family) lives in :mod:`sketch_core.registry`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from sketch_core.plans import Plan

__all__ = ["ModelEntry", "register", "unregister", "registered", "FAMILIES"]

FAMILIES = ("cifar", "imagenet")
_DEFAULT_CLASSES = {"cifar": 10, "imagenet": 1000}


@dataclass(frozen=True)
class ModelEntry:
    """One registration: the cfgs of one family that one builder and one plan serve.

    ``build(cfg, widths=None, num_classes=..., in_channels=...)`` returns the model;
    ``plan(cfg, start_conv=1)`` its prunable units. ``check(cfg)`` returns why a cfg the
    pattern matches is still not one of these (e.g. a ResNet depth that is not 6n+2),
    or None. ``unit_groups``: group sizes when one rate per group of units is accepted
    too. ``start_conv``: the architecture has a first conv to choose (VGG).
    ``order`` places the registration in listings within its family.
    """

    family: str
    arch: str
    pattern: str
    examples: tuple[str, ...]
    input_size: int
    build: Callable[..., nn.Module]
    plan: Callable[..., Plan]
    check: Callable[[str], str | None] | None = None
    unit_groups: tuple[int, ...] | None = None
    start_conv: bool = False
    num_classes: int = 10
    order: int = 100

    def matches(self, cfg: str) -> bool:
        return re.fullmatch(self.pattern, cfg) is not None

    def refusal(self, cfg: str) -> str | None:
        """Why ``cfg`` (matching the pattern) is not built here; None when it is."""
        return self.check(cfg) if self.check is not None else None


_SPECS: list[ModelEntry] = []
_LOADED = False


def register(family: str, arch: str, pattern: str, *, examples: Sequence[str], input_size: int,
             build: Callable[..., nn.Module], plan: Callable[..., Plan],
             check: Callable[[str], str | None] | None = None,
             unit_groups: Sequence[int] | None = None, start_conv: bool = False,
             num_classes: int | None = None, order: int = 100) -> ModelEntry:
    """Make ``pattern``'s cfgs of ``family`` known; returns the registration.

    Registering the same (family, pattern) again replaces the earlier registration.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    re.compile(pattern)
    spec = ModelEntry(family, arch, pattern, tuple(examples), int(input_size), build, plan, check,
                     tuple(unit_groups) if unit_groups else None, bool(start_conv),
                     int(num_classes or _DEFAULT_CLASSES[family]), int(order))
    for i, old in enumerate(_SPECS):
        if (old.family, old.pattern) == (family, pattern):
            _SPECS[i] = spec
            break
    else:
        _SPECS.append(spec)
    return spec


def unregister(spec: ModelEntry) -> None:
    """Forget a registration (e.g. one a test made)."""
    if spec in _SPECS:
        _SPECS.remove(spec)


def _load_package() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = __name__.rpartition(".")[0]
    folder = str(Path(__file__).resolve().parent)
    for info in sorted(pkgutil.iter_modules([folder]), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name != "registration":
            importlib.import_module(f"{package}.{info.name}")


def registered() -> list[ModelEntry]:
    """Every registration, in listing order (family, then ``order``, then registration)."""
    _load_package()
    seq = {id(s): i for i, s in enumerate(_SPECS)}
    return sorted(_SPECS, key=lambda s: (FAMILIES.index(s.family), s.order, seq[id(s)]))
