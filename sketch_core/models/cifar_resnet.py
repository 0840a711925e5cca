"""CIFAR ResNet-(6n+2) built from per-block widths.

The original project's layout: a 3x3 stem 3->16, three stages of n basic blocks (16, 32,
64 planes), convs without bias, a parameter-free shortcut (stride-2 subsample and
zero-padded channels), global average pooling, Linear(64, classes). State-dict keys
(``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``) match the original's checkpoints.
Each block's ``conv1`` width is one slot: the block's output width (the residual) never
changes, so a pruned model only narrows the inside of each block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sketch_core.models.registration import register
from sketch_core.plans import Plan, PlanBuilder, Seg

__all__ = ["CifarResNet", "BasicBlock", "build", "plan", "depth_blocks"]

STAGE_PLANES = (16, 32, 64)


def conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad the channels."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out - inp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    def __init__(self, inp: int, planes: int, mid: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inp, mid, stride)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (PadShortcut(inp, planes, stride) if stride != 1 or inp != planes
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def depth_blocks(cfg: str) -> int:
    depth = int(cfg.removeprefix("resnet"))
    return (depth - 2) // 6


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, widths: list[int] | None = None,
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        n = blocks_per_stage
        full = [p for p in STAGE_PLANES for _ in range(n)]
        widths = list(full if widths is None else widths)
        if len(widths) != len(full):
            raise ValueError(f"expected {len(full)} widths, got {len(widths)}")
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        inp, k = 16, 0
        for s, planes in enumerate(STAGE_PLANES):
            layer = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                layer.append(BasicBlock(inp, planes, widths[k], stride))
                inp, k = planes, k + 1
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 10,
          in_channels: int = 3) -> CifarResNet:
    return CifarResNet(depth_blocks(cfg), widths, num_classes, in_channels)


def plan(cfg: str, start_conv: int = 1) -> Plan:
    n = depth_blocks(cfg)
    pb = PlanBuilder()
    for s, planes in enumerate(STAGE_PLANES):
        inp = 16 if s == 0 else STAGE_PLANES[s - 1]
        for b in range(n):
            pre = f"layer{s + 1}.{b}"
            slot = pb.slot(f"{pre}.conv1", planes, bn=f"{pre}.bn1")
            pb.conv(f"{pre}.conv1", slot, [Seg(None, inp if b == 0 else planes)], bn=f"{pre}.bn1")
            pb.conv(f"{pre}.conv2", None, [Seg(slot, planes)])
            pb.unit(pre, slot)
    return pb.build()


def _depth_check(cfg: str) -> str | None:
    depth = int(cfg.removeprefix("resnet"))
    if depth < 8 or (depth - 2) % 6:
        return f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...); got {cfg}"
    return None


register("cifar", "resnet", r"resnet\d+", examples=("resnet20", "resnet32", "resnet44", "resnet56",
                                                   "resnet110"),
         input_size=32, build=build, plan=plan, check=_depth_check, order=20)
