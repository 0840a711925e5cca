"""ImageNet ResNets (18/34/50/101/152) with torchvision's state_dict keys, built narrow.

The network is torchvision's ResNet (v1.5: the bottleneck's stride sits on the 3x3
conv), written again so every block can be built with its own inner widths. A pruned
ResNet is the same classes built narrower, so its state_dict keys equal torchvision's.

Slots (plan order = forward order):

- BasicBlock (resnet18/34): one slot per block, ``layerX.Y.conv1`` (+ ``bn1``); its
  consumer is ``conv2``'s input. One unit per block.
- Bottleneck (resnet50/101/152): two slots per block, ``conv1`` (+ ``bn1``) and
  ``conv2`` (+ ``bn2``); ``conv2``'s input follows the first, ``conv3``'s input the
  second. One unit per block holds both. The block's output width (residual) never
  changes.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from sketch_core.models.registration import register
from sketch_core.errors import UserError
from sketch_core.plans import Plan, PlanBuilder, Seg, require_default_start_conv

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "CONFIGS", "build", "plan", "check_widths"]

# cfg -> (block kind, blocks per stage)
CONFIGS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
_PLANES = (64, 128, 256, 512)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """3x3 -> 3x3 with identity (or 1x1 projection) shortcut; ``widths = (conv1 filters,)``."""

    expansion = 1
    num_slots = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, widths: tuple[int, ...] | None = None):
        super().__init__()
        (mid,) = widths or (planes,)
        self.conv1 = _conv3x3(inplanes, mid, stride)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(mid, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 x4; ``widths = (conv1 filters, conv2 filters)``."""

    expansion = 4
    num_slots = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, widths: tuple[int, ...] | None = None):
        super().__init__()
        w1, w2 = widths or (planes, planes)
        self.conv1 = _conv1x1(inplanes, w1)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = _conv3x3(w1, w2, stride)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = _conv1x1(w2, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet; ``block_widths`` gives each block's inner widths (None = full)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...] | list[int],
                 block_widths: list[tuple[int, ...]] | None = None, num_classes: int = 1000,
                 in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = iter(block_widths) if block_widths is not None else None
        self.layer1 = self._make_layer(block, 64, layers[0], 1, widths)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, widths)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, widths)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, widths) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = []
        for i in range(blocks):
            w = next(widths) if widths is not None else None
            layers.append(block(self.inplanes, planes, stride if i == 0 else 1,
                                downsample if i == 0 else None, widths=w))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _config(cfg: str) -> tuple[str, tuple[int, int, int, int]]:
    if cfg not in CONFIGS:
        raise UserError(f"unknown ImageNet ResNet cfg {cfg!r}; expected one of {', '.join(CONFIGS)}")
    return CONFIGS[cfg]


@lru_cache(maxsize=None)
def _plan(cfg: str) -> Plan:
    kind, layers = _config(cfg)
    b = PlanBuilder()
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip(_PLANES, layers), start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            if kind == "basic":
                s = b.slot(f"{p}.conv1", planes, bn=f"{p}.bn1")
                b.conv(f"{p}.conv1", s, [Seg(None, inplanes)], bn=f"{p}.bn1")
                b.conv(f"{p}.conv2", None, [Seg(s, planes)])
                b.unit(p, s)
                inplanes = planes
            else:
                s1 = b.slot(f"{p}.conv1", planes, bn=f"{p}.bn1")
                s2 = b.slot(f"{p}.conv2", planes, bn=f"{p}.bn2")
                b.conv(f"{p}.conv1", s1, [Seg(None, inplanes)], bn=f"{p}.bn1")
                b.conv(f"{p}.conv2", s2, [Seg(s1, planes)], bn=f"{p}.bn2")
                b.conv(f"{p}.conv3", None, [Seg(s2, planes)])
                b.unit(p, s1, s2)
                inplanes = planes * 4
    return b.build()


def plan(cfg: str, start_conv: int = 1) -> Plan:
    """The prunable slots and units of ImageNet ``cfg``; ``start_conv`` must stay 1."""
    require_default_start_conv(cfg, start_conv)
    return _plan(cfg)


def check_widths(cfg: str, widths: list[int] | None, p: Plan) -> list[int]:
    """``widths`` (one int per slot, 1 <= w <= full) or the full widths when None."""
    full = p.full_widths()
    if widths is None:
        return full
    widths = [int(w) for w in widths]
    if len(widths) != len(full):
        raise UserError(f"{cfg} needs {len(full)} widths (one per slot); got {len(widths)}")
    for i, (w, n) in enumerate(zip(widths, full)):
        if not 1 <= w <= n:
            raise UserError(f"{cfg}: width {w} of slot {i} ({p.slots[i].producer}) is out of "
                            f"range; expected 1..{n}")
    return widths


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 1000,
          in_channels: int = 3) -> ResNet:
    """torchvision's ``cfg`` with each slot's filters set by ``widths`` (plan.slots order)."""
    kind, layers = _config(cfg)
    widths = check_widths(cfg, widths, _plan(cfg))
    block = BasicBlock if kind == "basic" else Bottleneck
    k = block.num_slots
    block_widths = [tuple(widths[i:i + k]) for i in range(0, len(widths), k)]
    return ResNet(block, layers, block_widths, num_classes=num_classes, in_channels=in_channels)


register("imagenet", "resnet", r"resnet(18|34|50|101|152)", examples=tuple(CONFIGS), input_size=224,
         build=build, plan=plan, order=10)
