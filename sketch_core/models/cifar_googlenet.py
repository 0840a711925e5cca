"""CIFAR GoogLeNet (the original project's layout) built from per-module widths.

A 3x3 stem 3->192 (bias, BN, ReLU), Inception a3, b3, max-pool, a4..e4, max-pool, a5,
b5, average pooling, Linear(1024, classes); every conv has a bias and the "5x5" branch
is 1x1 -> 3x3 -> 3x3. Keys match the original's checkpoints (``pre_layers``,
``inception_a3.branch3x3.0``, ..., ``linear``). One rate per Inception module narrows
three slots: the 3x3-reduce, the 5x5-reduce and the first 3x3 of the 5x5 branch.
"""

from __future__ import annotations

import torch
from torch import nn

from sketch_core.models.registration import register
from sketch_core.plans import Plan, PlanBuilder, Seg

__all__ = ["CifarGoogLeNet", "Inception", "build", "plan", "MODULES"]

# name, in_planes, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes
MODULES = [
    ("inception_a3", 192, 64, 96, 128, 16, 32, 32),
    ("inception_b3", 256, 128, 128, 192, 32, 96, 64),
    ("inception_a4", 480, 192, 96, 208, 16, 48, 64),
    ("inception_b4", 512, 160, 112, 224, 24, 64, 64),
    ("inception_c4", 512, 128, 128, 256, 24, 64, 64),
    ("inception_d4", 512, 112, 144, 288, 32, 64, 64),
    ("inception_e4", 528, 256, 160, 320, 32, 128, 128),
    ("inception_a5", 832, 256, 160, 320, 32, 128, 128),
    ("inception_b5", 832, 384, 192, 384, 48, 128, 128),
]


def _cbr(inp: int, out: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(inp, out, k, padding=k // 2), nn.BatchNorm2d(out), nn.ReLU(True)]


class Inception(nn.Module):
    def __init__(self, inp: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int,
                 pool_planes: int, n5x5mid: int | None = None) -> None:
        super().__init__()
        mid = n5x5 if n5x5mid is None else n5x5mid
        self.branch1x1 = nn.Sequential(*_cbr(inp, n1x1, 1))
        self.branch3x3 = nn.Sequential(*_cbr(inp, n3x3red, 1), *_cbr(n3x3red, n3x3, 3))
        self.branch5x5 = nn.Sequential(*_cbr(inp, n5x5red, 1), *_cbr(n5x5red, mid, 3),
                                       *_cbr(mid, n5x5, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         *_cbr(inp, pool_planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x),
                          self.branch_pool(x)], 1)


class CifarGoogLeNet(nn.Module):
    def __init__(self, widths: list[int] | None = None, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        full = [w for m in MODULES for w in (m[3], m[5], m[6])]
        widths = list(full if widths is None else widths)
        if len(widths) != len(full):
            raise ValueError(f"expected {len(full)} widths, got {len(widths)}")
        self.pre_layers = nn.Sequential(*_cbr(in_channels, 192, 3))
        for i, (name, inp, n1, _, n3, _, n5, pp) in enumerate(MODULES):
            r3, r5, m5 = widths[3 * i: 3 * i + 3]
            setattr(self, name, Inception(inp, n1, r3, n3, r5, n5, pp, n5x5mid=m5))
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre_layers(x)
        out = self.maxpool1(self.inception_b3(self.inception_a3(out)))
        for name in ("inception_a4", "inception_b4", "inception_c4", "inception_d4", "inception_e4"):
            out = getattr(self, name)(out)
        out = self.inception_b5(self.inception_a5(self.maxpool2(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 10,
          in_channels: int = 3) -> CifarGoogLeNet:
    return CifarGoogLeNet(widths, num_classes, in_channels)


def plan(cfg: str, start_conv: int = 1) -> Plan:
    pb = PlanBuilder()
    for name, inp, _, n3red, n3, n5red, n5, _ in MODULES:
        b3, b5 = f"{name}.branch3x3", f"{name}.branch5x5"
        s3 = pb.slot(f"{b3}.0", n3red, bn=f"{b3}.1")
        pb.conv(f"{b3}.0", s3, [Seg(None, inp)], bn=f"{b3}.1")
        pb.conv(f"{b3}.3", None, [Seg(s3, n3red)])
        s5 = pb.slot(f"{b5}.0", n5red, bn=f"{b5}.1")
        pb.conv(f"{b5}.0", s5, [Seg(None, inp)], bn=f"{b5}.1")
        m5 = pb.slot(f"{b5}.3", n5, bn=f"{b5}.4")
        pb.conv(f"{b5}.3", m5, [Seg(s5, n5red)], bn=f"{b5}.4")
        pb.conv(f"{b5}.6", None, [Seg(m5, n5)])
        pb.unit(name, s3, s5, m5)
    return pb.build()


register("cifar", "googlenet", r"googlenet", examples=("googlenet",), input_size=32, build=build,
         plan=plan, order=30)
