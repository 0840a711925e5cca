"""CIFAR VGG-16 (the original's latest vgg.py) built from per-conv widths.

13 3x3 convs with bias, each followed by BN and ReLU, max-pools after convs 2, 4, 7
and 10, then average pooling, Linear(512, 512), BatchNorm1d, ReLU, Linear(512, classes).
State-dict keys: ``features.<i>`` (sequential indices) and ``classifier.linear1``,
``classifier.norm1``, ``classifier.linear2``. Every conv is a slot; rate i narrows conv
``start_conv + i`` and the next layer's inputs follow (the classifier's for the last).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from sketch_core.models.registration import register
from sketch_core.plans import Plan, PlanBuilder, Seg
from sketch_core.errors import UserError

__all__ = ["CifarVGG", "build", "plan", "CFG"]

CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                        512, 512, 512]


def _conv_indices() -> list[int]:
    """Position in ``features`` of each conv (conv, BN, ReLU take 3 slots, a pool 1)."""
    idx, pos = [], 0
    for x in CFG:
        if x == "M":
            pos += 1
        else:
            idx.append(pos)
            pos += 3
    return idx


class CifarVGG(nn.Module):
    def __init__(self, widths: list[int] | None = None, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        full = [x for x in CFG if x != "M"]
        widths = list(full if widths is None else widths)
        if len(widths) != len(full):
            raise ValueError(f"expected {len(full)} widths, got {len(widths)}")
        layers: list[nn.Module] = []
        inp, k = in_channels, 0
        for x in CFG:
            if x == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                w = widths[k]
                layers += [nn.Conv2d(inp, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                inp, k = w, k + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(inp, 512)),
            ("norm1", nn.BatchNorm1d(512)),
            ("relu1", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(512, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 10,
          in_channels: int = 3) -> CifarVGG:
    return CifarVGG(widths, num_classes, in_channels)


def plan(cfg: str, start_conv: int = 1) -> Plan:
    full = [x for x in CFG if x != "M"]
    if not 0 <= start_conv < len(full):
        raise UserError(f"--start_conv must be in 0..{len(full) - 1} for {cfg}; got {start_conv}")
    pos = _conv_indices()
    pb = PlanBuilder()
    slots = [pb.slot(f"features.{p}", n, bn=f"features.{p + 1}") for p, n in zip(pos, full)]
    for i, (p, n) in enumerate(zip(pos, full)):
        inputs = [Seg(slots[i - 1], full[i - 1])] if i > 0 else [Seg(None, 3)]
        # convs before start_conv never narrow, so they take no part in the plan
        out = slots[i] if i >= start_conv else None
        inp = inputs if i > start_conv else [Seg(None, inputs[0].n)]
        pb.conv(f"features.{p}", out, inp, bn=f"features.{p + 1}")
    pb.module("classifier.linear1", "linear", None, [Seg(slots[-1], full[-1])])
    for i in range(start_conv, len(full)):
        pb.unit(f"features.{pos[i]}", slots[i])
    return pb.build()


register("cifar", "vgg", r"vgg16", examples=("vgg16",), input_size=32, build=build, plan=plan,
         start_conv=True, order=10)
