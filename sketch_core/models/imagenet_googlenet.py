"""ImageNet GoogLeNet (Inception v1) with torchvision's state_dict keys, built narrow.

torchvision's ``googlenet`` without the auxiliary heads: every conv is a
``BasicConv2d`` (conv without bias, BN with eps=0.001, ReLU); an Inception module has
``branch1`` (1x1), ``branch2`` (1x1 reduce -> 3x3), ``branch3`` (1x1 reduce -> 3x3;
torchvision's "5x5" branch uses a 3x3) and ``branch4`` (3x3 max-pool -> 1x1).

Slots: per module, ``branch2.0`` (consumer ``branch2.1``) and ``branch3.0`` (consumer
``branch3.1``), in that order; one unit per module holds both (9 units). Module
outputs, and so every concatenation, keep their widths.

Released torchvision files carry ``aux1``/``aux2`` keys and expect
``transform_input=True``; dropping those keys is the checkpoint loader's job, and
``build(..., transform_input=True)`` builds the matching model.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from sketch_core.models.registration import register
from sketch_core.errors import UserError
from sketch_core.plans import Plan, PlanBuilder, Seg, require_default_start_conv
from sketch_core.models.imagenet_resnet import check_widths

__all__ = ["BasicConv2d", "Inception", "GoogLeNet", "MODULES", "build", "plan"]

# name -> (in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), in forward order
MODULES: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}
_CFGS = ("googlenet",)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN (eps=0.001) -> ReLU, keys ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four branches concatenated; ``red3``/``red5`` are the (prunable) reduce widths."""

    def __init__(self, cin: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(cin, pool_proj, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet without aux heads; ``reduce_widths`` = (red3, red5) per module."""

    def __init__(self, reduce_widths: list[tuple[int, int]] | None = None, num_classes: int = 1000,
                 in_channels: int = 3, transform_input: bool = False, aux_logits: bool = False,
                 dropout: float = 0.2, init_weights: bool = True):
        super().__init__()
        if aux_logits:
            raise UserError("GoogLeNet is built without auxiliary heads; expected aux_logits=False")
        if transform_input and in_channels != 3:
            raise UserError(f"transform_input needs 3 input channels (RGB); got {in_channels}")
        self.aux_logits = False
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(in_channels, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        widths = reduce_widths or [(m[2], m[4]) for m in MODULES.values()]
        for (name, m), (r3, r5) in zip(MODULES.items(), widths):
            setattr(self, name, Inception(m[0], m[1], r3, m[3], r5, m[5], m[6]))
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        if init_weights:
            for mod in self.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(mod.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(mod, nn.BatchNorm2d):
                    nn.init.ones_(mod.weight)
                    nn.init.zeros_(mod.bias)

    def _transform_input(self, x: Tensor) -> Tensor:
        """Map inputs normalised with ImageNet mean/std to the (x - 0.5) / 0.5 the weights expect."""
        if not self.transform_input:
            return x
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        return x * (std / 0.5) + (mean - 0.5) / 0.5

    def forward(self, x: Tensor) -> Tensor:
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.inception3b(self.inception3a(x))
        x = self.maxpool3(x)
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5b(self.inception5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def _check_cfg(cfg: str) -> None:
    if cfg not in _CFGS:
        raise UserError(f"unknown ImageNet GoogLeNet cfg {cfg!r}; expected googlenet")


@lru_cache(maxsize=None)
def _plan(cfg: str) -> Plan:
    _check_cfg(cfg)
    b = PlanBuilder()
    for name, (cin, _, red3, _, red5, _, _) in MODULES.items():
        s2 = b.slot(f"{name}.branch2.0.conv", red3, bn=f"{name}.branch2.0.bn")
        b.conv(f"{name}.branch2.0.conv", s2, [Seg(None, cin)], bn=f"{name}.branch2.0.bn")
        b.conv(f"{name}.branch2.1.conv", None, [Seg(s2, red3)])
        s3 = b.slot(f"{name}.branch3.0.conv", red5, bn=f"{name}.branch3.0.bn")
        b.conv(f"{name}.branch3.0.conv", s3, [Seg(None, cin)], bn=f"{name}.branch3.0.bn")
        b.conv(f"{name}.branch3.1.conv", None, [Seg(s3, red5)])
        b.unit(name, s2, s3)
    return b.build()


def plan(cfg: str, start_conv: int = 1) -> Plan:
    """Two slots per Inception module (the two reduce convs), one unit per module."""
    require_default_start_conv(cfg, start_conv)
    return _plan(cfg)


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 1000,
          in_channels: int = 3, transform_input: bool = False) -> GoogLeNet:
    """torchvision's GoogLeNet (no aux heads) with the reduce widths of ``widths`` (18 ints)."""
    _check_cfg(cfg)
    widths = check_widths(cfg, widths, _plan(cfg))
    pairs = [(widths[i], widths[i + 1]) for i in range(0, len(widths), 2)]
    return GoogLeNet(pairs, num_classes=num_classes, in_channels=in_channels,
                     transform_input=transform_input)


register("imagenet", "googlenet", r"googlenet", examples=_CFGS, input_size=224, build=build,
         plan=plan, order=30)
