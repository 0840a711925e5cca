"""CIFAR DenseNet-40 (growth 12, no compression) built from per-layer widths.

A 3x3 stem 3->24, three dense blocks of 12 pre-activation layers (BN, ReLU, 3x3 conv),
transitions without compression (168 and 312 channels), BN, ReLU, average pooling,
Linear(456, classes). Keys match the original's checkpoints (``conv1``,
``dense1.0.bn1``, ``dense1.0.conv1``, ``trans1.bn1``, ``trans1.conv1``, ``bn``, ``fc``).
Each dense layer's new feature maps are one slot; every later consumer follows,
including the BN in front of each consumer (the layers have no BN of their own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sketch_core.models.registration import register
from sketch_core.plans import Plan, PlanBuilder, Seg

__all__ = ["CifarDenseNet", "build", "plan"]

GROWTH, LAYERS, STEM = 12, 12, 24


class DenseLayer(nn.Module):
    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, out, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv1(self.relu(self.bn1(x)))], 1)


class Transition(nn.Module):
    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, out, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


class CifarDenseNet(nn.Module):
    def __init__(self, widths: list[int] | None = None, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        widths = list([GROWTH] * 3 * LAYERS if widths is None else widths)
        if len(widths) != 3 * LAYERS:
            raise ValueError(f"expected {3 * LAYERS} widths, got {len(widths)}")
        self.conv1 = nn.Conv2d(in_channels, STEM, 3, padding=1, bias=False)
        inp, full_inp = STEM, STEM
        for b in range(3):
            layers = []
            for k in range(LAYERS):
                w = widths[b * LAYERS + k]
                layers.append(DenseLayer(inp, w))
                inp, full_inp = inp + w, full_inp + GROWTH
            setattr(self, f"dense{b + 1}", nn.Sequential(*layers))
            if b < 2:
                setattr(self, f"trans{b + 1}", Transition(inp, full_inp))
                inp = full_inp
        self.bn = nn.BatchNorm2d(inp)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense1(self.conv1(x))
        x = self.dense3(self.trans2(self.dense2(self.trans1(x))))
        return self.fc(torch.flatten(self.avgpool(self.relu(self.bn(x))), 1))


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 10,
          in_channels: int = 3) -> CifarDenseNet:
    return CifarDenseNet(widths, num_classes, in_channels)


def plan(cfg: str, start_conv: int = 1) -> Plan:
    pb = PlanBuilder()
    layout: list[Seg] = [Seg(None, STEM)]
    for b in range(3):
        for k in range(LAYERS):
            pre = f"dense{b + 1}.{k}"
            pb.module(f"{pre}.bn1", "bn", None, layout)
            slot = pb.slot(f"{pre}.conv1", GROWTH)
            pb.conv(f"{pre}.conv1", slot, layout)
            layout = layout + [Seg(slot, GROWTH)]
            pb.unit(pre, slot)
        if b < 2:
            width = sum(s.n for s in layout)
            pb.module(f"trans{b + 1}.bn1", "bn", None, layout)
            pb.module(f"trans{b + 1}.conv1", "conv", None, layout)
            layout = [Seg(None, width)]
    pb.module("bn", "bn", None, layout)
    pb.module("fc", "linear", None, layout)
    return pb.build()
UNIT_GROUPS = (LAYERS, LAYERS, LAYERS)  # one rate per dense block also parses


register("cifar", "densenet", r"densenet40", examples=("densenet40",), input_size=32, build=build,
         plan=plan, unit_groups=UNIT_GROUPS, order=40)
