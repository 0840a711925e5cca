"""ImageNet VGG16-BN with torchvision's state_dict keys, built narrow.

torchvision's ``vgg16_bn``: 13 3x3 convs with bias (``features.N``), each followed by
BatchNorm (``features.N+1``) and ReLU, max-pools after convs 2, 4, 7, 10 and 13, an
AdaptiveAvgPool2d(7) and the classifier ``Linear(512*7*7, 4096) - ReLU - Dropout -
Linear(4096, 4096) - ReLU - Dropout - Linear(4096, num_classes)``.

Slots: one per conv (13, in forward order). Units are the convs ``start_conv..12``
(index from 0, so 12 units by default); a slot outside the units keeps its width.
Each conv's input follows the previous slot; the last conv's consumer is
``classifier.0``, fed by the flattened 512x7x7 map (channel-major), so its input is
``Seg(slot, 512, repeat=49)``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from sketch_core.models.registration import register
from sketch_core.errors import UserError
from sketch_core.plans import Plan, PlanBuilder, Seg
from sketch_core.models.imagenet_resnet import check_widths

__all__ = ["VGG", "CONFIGS", "build", "plan", "conv_indices"]

# cfg -> layer list: an int is a 3x3 conv with that many filters, "M" a 2x2 max-pool
CONFIGS: dict[str, list[int | str]] = {
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                 512, 512, 512, "M"],
}
_POOL = 7


class VGG(nn.Module):
    """torchvision's VGG with BN; ``widths`` gives each conv's filters (None = the config's)."""

    def __init__(self, layers: list[int | str], widths: list[int] | None = None,
                 num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        convs = [v for v in layers if v != "M"]
        widths = list(widths) if widths is not None else [int(v) for v in convs]
        mods: list[nn.Module] = []
        cin, k = in_channels, 0
        for v in layers:
            if v == "M":
                mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            cout = widths[k]
            k += 1
            mods += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout),
                     nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*mods)
        self.avgpool = nn.AdaptiveAvgPool2d((_POOL, _POOL))
        self.classifier = nn.Sequential(
            nn.Linear(cin * _POOL * _POOL, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _layers(cfg: str) -> list[int | str]:
    if cfg not in CONFIGS:
        raise UserError(f"unknown ImageNet VGG cfg {cfg!r}; expected one of {', '.join(CONFIGS)}")
    return CONFIGS[cfg]


def conv_indices(cfg: str) -> list[int]:
    """Index in ``features`` of every conv of ``cfg`` (its BN is the next index)."""
    out, i = [], 0
    for v in _layers(cfg):
        if v == "M":
            i += 1
        else:
            out.append(i)
            i += 3
    return out


@lru_cache(maxsize=None)
def _plan(cfg: str, start_conv: int) -> Plan:
    layers = _layers(cfg)
    filters = [int(v) for v in layers if v != "M"]
    idx = conv_indices(cfg)
    if not 0 <= start_conv < len(filters):
        raise UserError(f"--start_conv {start_conv} is out of range for {cfg}; expected 0..."
                        f"{len(filters) - 1} (index of the first conv with a rate)")
    b = PlanBuilder()
    prev: Seg = Seg(None, 3)
    for k, (i, n) in enumerate(zip(idx, filters)):
        s = b.slot(f"features.{i}", n, bn=f"features.{i + 1}")
        b.conv(f"features.{i}", s, [prev], bn=f"features.{i + 1}")
        prev = Seg(s, n)
        if k >= start_conv:
            b.unit(f"features.{i}", s)
    b.module("classifier.0", "linear", None, [Seg(prev.slot, prev.n, repeat=_POOL * _POOL)])
    return b.build()


def plan(cfg: str, start_conv: int = 1) -> Plan:
    """13 slots (one per conv); units are convs ``start_conv..12``."""
    return _plan(cfg, int(start_conv))


def build(cfg: str, widths: list[int] | None = None, num_classes: int = 1000,
          in_channels: int = 3) -> VGG:
    """torchvision's ``cfg`` with each conv's filters set by ``widths`` (13 ints, plan order)."""
    layers = _layers(cfg)
    widths = check_widths(cfg, widths, _plan(cfg, 1))
    return VGG(layers, widths, num_classes=num_classes, in_channels=in_channels)


register("imagenet", "vgg", r"vgg16_bn", examples=("vgg16_bn",), input_size=224, build=build,
         plan=plan, start_conv=True, order=20)
