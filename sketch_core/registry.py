"""(family, cfg) -> architecture: its builder, its plan, its input size.

The family is ``imagenet`` for ImageNet-style data (224x224, class folders) and
``cifar`` for everything else (cifar10, digits, synthetic). ``resnet50`` is thus
torchvision's ResNet-50 in the ImageNet family and ResNet-(6*8+2) in the CIFAR family.
Every caller goes through :func:`get_arch`; nothing else branches on names.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from torch import nn

from .errors import UserError
from .plans import Plan, require_default_start_conv

__all__ = ["ArchEntry", "get_arch", "family_of", "list_cfgs", "FAMILIES"]

FAMILIES = ("cifar", "imagenet")
IMAGENET_SETS = ("imagenet", "folder")

# family -> list of (cfg pattern, arch name, module, default input HxW)
_TABLE: dict[str, list[tuple[str, str, str, int]]] = {
    "cifar": [
        (r"resnet\d+", "resnet", "sketch_core.models.cifar_resnet", 32),
        (r"vgg16", "vgg", "sketch_core.models.cifar_vgg", 32),
        (r"googlenet", "googlenet", "sketch_core.models.cifar_googlenet", 32),
        (r"densenet40", "densenet", "sketch_core.models.cifar_densenet", 32),
    ],
    "imagenet": [
        (r"resnet(18|34|50|101|152)", "resnet", "sketch_core.models.imagenet_resnet", 224),
        (r"vgg16_bn", "vgg", "sketch_core.models.imagenet_vgg", 224),
        (r"googlenet", "googlenet", "sketch_core.models.imagenet_googlenet", 224),
        (r"densenet(121|161|169|201)", "densenet", "sketch_core.models.imagenet_densenet", 224),
    ],
}
_EXAMPLES = {
    "cifar": ["vgg16", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "googlenet",
              "densenet40"],
    "imagenet": ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16_bn",
                 "googlenet", "densenet121", "densenet161", "densenet169", "densenet201"],
}


@dataclass(frozen=True)
class ArchEntry:
    """One architecture of one family. ``module`` exposes ``build`` and ``plan``."""

    family: str
    cfg: str
    arch: str
    module: str
    input_size: int

    @property
    def _mod(self):
        return importlib.import_module(self.module)

    def build(self, widths: list[int] | None = None, num_classes: int | None = None,
              in_channels: int = 3) -> nn.Module:
        num_classes = num_classes or (1000 if self.family == "imagenet" else 10)
        return self._mod.build(self.cfg, widths=widths, num_classes=num_classes,
                               in_channels=in_channels)

    def plan(self, start_conv: int | None = None) -> Plan:
        if self.arch != "vgg":
            require_default_start_conv(self.cfg, start_conv)
        return self._mod.plan(self.cfg, start_conv=1 if start_conv is None else start_conv)

    @property
    def unit_groups(self) -> tuple[int, ...] | None:
        """Group sizes when a shorter vector (one rate per group of units) is accepted."""
        return getattr(self._mod, "UNIT_GROUPS", None)


def family_of(data_set: str) -> str:
    """The model family a data set name (or a family name) selects."""
    if data_set in FAMILIES:
        return data_set
    return "imagenet" if data_set in IMAGENET_SETS else "cifar"


def list_cfgs(family: str | None = None) -> list[str]:
    fams = [family] if family else list(FAMILIES)
    return [c for f in fams for c in _EXAMPLES[f]]


def get_arch(cfg: str, data_set: str = "cifar10", arch: str | None = None) -> ArchEntry:
    """Look up ``cfg`` in the family of ``data_set``; ``arch`` (e.g. ``resnet``) is checked."""
    family = family_of(data_set)
    for pattern, arch_name, module, size in _TABLE[family]:
        if re.fullmatch(pattern, cfg or ""):
            if family == "cifar" and arch_name == "resnet":
                depth = int(cfg[6:])
                if depth < 8 or (depth - 2) % 6:
                    raise UserError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...); "
                                    f"got {cfg}")
            if arch is not None and arch != arch_name:
                raise UserError(f"--cfg {cfg} belongs to --arch {arch_name}, not --arch {arch}")
            return ArchEntry(family, cfg, arch_name, module, size)
    raise UserError(f"unknown --cfg {cfg!r} for data set {data_set} ({family} family); valid: "
                    f"{', '.join(_EXAMPLES[family])}")
