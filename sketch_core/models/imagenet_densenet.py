"""ImageNet DenseNets (121/161/169/201) with torchvision's state_dict keys, built narrow.

torchvision's DenseNet-BC: ``features`` holds ``conv0``, ``norm0``, ``relu0``,
``pool0``, then ``denseblockX`` (layers ``denselayerY``: ``norm1``, ``relu1``,
``conv1`` 1x1 to bn_size*growth, ``norm2``, ``relu2``, ``conv2`` 3x3 to growth) and
``transitionX`` (``norm``, ``relu``, ``conv`` halving the channels, ``pool``), and
``norm5``; then ReLU, global average pool and ``classifier``.

Slots: one per dense layer, its bottleneck ``conv1`` (+ ``norm2``); the consumer is
``conv2``'s input. One unit per slot. The new feature maps (growth) and every
concatenation keep their widths.

Released torchvision files use legacy keys (``norm.1`` for ``norm1``);
:func:`remap_legacy_keys` renames them as torchvision does when it loads them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from functools import lru_cache
from typing import Mapping

import torch
from torch import Tensor, nn

from sketch_core.models.registration import register
from sketch_core.errors import UserError
from sketch_core.plans import Plan, PlanBuilder, Seg, require_default_start_conv
from sketch_core.models.imagenet_resnet import check_widths

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "CONFIGS", "build", "plan",
           "remap_legacy_keys"]

# cfg -> (growth rate, layers per block, stem filters)
CONFIGS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}
BN_SIZE = 4


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (``width`` filters) - BN-ReLU-3x3 (``growth`` filters) on the concatenation."""

    def __init__(self, cin: int, growth: int, width: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, width, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        x = self.conv2(self.relu2(self.norm2(x)))
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x


class DenseBlock(nn.ModuleDict):
    """``denselayer1..N``; each sees the concatenation of the input and all earlier outputs."""

    def __init__(self, cin: int, growth: int, widths: list[int], drop_rate: float = 0.0):
        super().__init__()
        for i, w in enumerate(widths):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, w, drop_rate))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool between blocks."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC; ``layer_widths`` gives each dense layer's bottleneck width."""

    def __init__(self, growth: int, block_config: tuple[int, ...], init_features: int,
                 layer_widths: list[int] | None = None, bn_size: int = BN_SIZE,
                 drop_rate: float = 0.0, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        if layer_widths is None:
            layer_widths = [bn_size * growth] * sum(block_config)
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, init_features, kernel_size=7, stride=2, padding=3,
                                bias=False)),
            ("norm0", nn.BatchNorm2d(init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        n, k = init_features, 0
        for b, layers in enumerate(block_config, start=1):
            self.features.add_module(f"denseblock{b}", DenseBlock(n, growth, layer_widths[k:k + layers],
                                                                 drop_rate))
            k += layers
            n += layers * growth
            if b != len(block_config):
                self.features.add_module(f"transition{b}", Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.features(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


def _config(cfg: str) -> tuple[int, tuple[int, ...], int]:
    if cfg not in CONFIGS:
        raise UserError(f"unknown ImageNet DenseNet cfg {cfg!r}; expected one of {', '.join(CONFIGS)}")
    return CONFIGS[cfg]


@lru_cache(maxsize=None)
def _plan(cfg: str) -> Plan:
    growth, block_config, n = _config(cfg)
    width = BN_SIZE * growth
    b = PlanBuilder()
    for blk, layers in enumerate(block_config, start=1):
        for i in range(layers):
            p = f"features.denseblock{blk}.denselayer{i + 1}"
            s = b.slot(f"{p}.conv1", width, bn=f"{p}.norm2")
            b.conv(f"{p}.conv1", s, [Seg(None, n + i * growth)], bn=f"{p}.norm2")
            b.conv(f"{p}.conv2", None, [Seg(s, width)])
            b.unit(p, s)
        n += layers * growth
        if blk != len(block_config):
            n //= 2
    return b.build()


def plan(cfg: str, start_conv: int = 1) -> Plan:
    """One slot and one unit per dense layer (its bottleneck width)."""
    require_default_start_conv(cfg, start_conv)
    return _plan(cfg)


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 1000,
          in_channels: int = 3) -> DenseNet:
    """torchvision's ``cfg`` with each dense layer's bottleneck width set by ``widths``."""
    growth, block_config, init_features = _config(cfg)
    widths = check_widths(cfg, widths, _plan(cfg))
    return DenseNet(growth, block_config, init_features, widths, num_classes=num_classes,
                    in_channels=in_channels)


_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\."
                     r"(weight|bias|running_mean|running_var|num_batches_tracked)$")


def remap_legacy_keys(state_dict: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Rename legacy dense-layer keys (``...denselayer1.norm.1.weight`` -> ``...norm1.weight``).

    Released torchvision DenseNet files predate the current module names; torchvision
    renames these keys itself on load. Other keys pass through; order is kept.
    """
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        m = _LEGACY.match(key)
        out[f"{m.group(1)}{m.group(2)}.{m.group(3)}" if m else key] = value
    return out


register("imagenet", "densenet", r"densenet(121|161|169|201)", examples=tuple(CONFIGS),
         input_size=224, build=build, plan=plan, order=40)
