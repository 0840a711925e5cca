"""Architectures: registration, resolution once, the family rule, one rates -> widths.

A small model registered from this file goes through everything a shipped one does:
built narrow, sketched in every mode, its rates parsed, its FLOPs counted, saved and
loaded. The family a cfg means follows one rule (explicit family, else the only family
that has it, else the data set's), and a rate vector of the wrong length is refused
from its syntax, before anything is expanded.
"""

from __future__ import annotations

import pickle
import time

import pytest
import torch
from torch import nn

from sketch_core.cost.flops import count_arch, count_flops
from sketch_core.io.checkpoint import load_checkpoint, save_checkpoint
from sketch_core.options import MODES
from conftest import sketch_at
from sketch_core.rates import parse_rates, rates_to_widths
from sketch_core.registry import build_model, family_of, resolve_arch
from sketch_core.errors import UserError
from sketch_core.cli.info import info
from sketch_core.plans import PlanBuilder, Seg
from sketch_core.models.registration import register, unregister
from sketch_core.plans import widths_for
from sketch_core.rates import MAX_RATES
from sketch_core.registry import Arch, list_arches, list_cfgs, resolve_arch
from search.propose.space import RateSpace


# ------------------------------------------------------------------ a model of our own

class TwoConvNet(nn.Module):
    """conv-BN-ReLU twice (base and 2*base filters), global pooling, a linear classifier."""

    def __init__(self, base: int, widths: list[int] | None, num_classes: int, in_channels: int):
        super().__init__()
        w1, w2 = widths or (base, 2 * base)
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _base(cfg: str) -> int:
    return int(cfg.removeprefix("twoconv"))


def _build(cfg: str, widths=None, num_classes: int = 10, in_channels: int = 3) -> TwoConvNet:
    return TwoConvNet(_base(cfg), widths, num_classes, in_channels)


def _plan(cfg: str, start_conv: int = 1):
    n = _base(cfg)
    pb = PlanBuilder()
    s1 = pb.slot("conv1", n, bn="bn1")
    pb.conv("conv1", s1, [Seg(None, 3)], bn="bn1")
    s2 = pb.slot("conv2", 2 * n, bn="bn2")
    pb.conv("conv2", s2, [Seg(s1, n)], bn="bn2")
    pb.module("fc", "linear", None, [Seg(s2, 2 * n)])
    pb.unit("conv1", s1)
    pb.unit("conv2", s2)
    return pb.build()


def _check(cfg: str) -> str | None:
    return None if _base(cfg) >= 2 else f"a two-conv net needs a base width of 2 or more; got {cfg}"


@pytest.fixture
def twoconv():
    spec = register("cifar", "twoconv", r"twoconv\d+", examples=("twoconv8",), input_size=16,
                    build=_build, plan=_plan, check=_check)
    yield spec
    unregister(spec)
    assert "twoconv8" not in list_cfgs()


def _macs_params(w1: int, w2: int, size: int = 16, classes: int = 10) -> tuple[int, int]:
    pos = size * size
    macs = pos * w1 * 3 * 9 + pos * w2 * w1 * 9 + w2 * classes
    params = 27 * w1 + 2 * w1 + 9 * w1 * w2 + 2 * w2 + w2 * classes + classes
    return macs, params


def test_a_registered_model_goes_through_everything(twoconv, tmp_path):
    assert "twoconv8" in list_cfgs("cifar") and "twoconv" in list_arches()
    arch = resolve_arch("twoconv8", "cifar10")
    assert (arch.family, arch.arch, arch.num_units, arch.input_size) == ("cifar", "twoconv", 2, 16)
    assert parse_rates("[0.5]*2", "twoconv8") == [0.5, 0.5]
    with pytest.raises(UserError, match="cifar twoconv8 takes 2 sketch rates, got 3"):
        parse_rates("[0.5]*3", arch)
    with pytest.raises(UserError, match="base width of 2"):
        resolve_arch("twoconv1")

    narrow = build_model("twoconv8", rates=[0.5, 0.25])
    assert narrow.conv1.out_channels == 4 and narrow.conv2.out_channels == 4
    assert narrow.sketch_widths == [4, 4] == rates_to_widths(arch, [0.5, 0.25])
    assert count_arch("twoconv8") == _macs_params(8, 16)
    assert count_arch(arch, widths=[4, 4]) == _macs_params(4, 4)
    assert count_flops(narrow, (3, 16, 16)) == _macs_params(4, 4)

    torch.manual_seed(0)
    full = arch.build().eval()
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    for mode in MODES:
        out = sketch_at(full, arch, [0.5, 0.25], mode=mode, batches=batches)
        assert out.sketch_widths == [4, 4], mode
        assert out(batches[0][0]).shape == (8, 10)
    path = tmp_path / "twoconv.pt"
    save_checkpoint(path, out, cfg=arch, rates=[0.5, 0.25])
    loaded = load_checkpoint(path, arch)
    assert loaded.meta["widths"] == [4, 4] and loaded.meta["family"] == "cifar"
    res = info("twoconv8", sketch_rate="[0.5]*2")
    assert res["num_rates"] == 2 and res["flops"] == _macs_params(4, 8)[0]


# ------------------------------------------------------------------ which family

@pytest.mark.parametrize("cfg,data_set,kw,family", [
    ("resnet56", "folder", {}, "cifar"),            # only CIFAR has it
    ("resnet56", "imagenet", {}, "cifar"),
    ("resnet18", "cifar10", {}, "imagenet"),        # only ImageNet has it
    ("densenet121", "digits", {}, "imagenet"),
    ("vgg16_bn", "synthetic", {}, "imagenet"),
    ("resnet50", "cifar10", {}, "cifar"),           # both: the data set's
    ("resnet50", "digits", {}, "cifar"),
    ("googlenet", "synthetic", {}, "cifar"),
    ("resnet50", "imagenet", {}, "imagenet"),
    ("resnet50", "folder", {}, "imagenet"),
    ("googlenet", "folder", {"input_size": 64}, "cifar"),
    ("googlenet", "folder", {"input_size": 65}, "imagenet"),
    ("resnet50", "imagenet", {"family": "cifar"}, "cifar"),   # explicit wins
    ("googlenet", "cifar10", {"family": "imagenet"}, "imagenet"),
])
def test_the_family_rule(cfg, data_set, kw, family):
    arch = resolve_arch(cfg, data_set, **kw)
    assert arch.family == family
    assert family_of(data_set, cfg, **kw) == family
    assert resolve_arch(cfg, data_set, family=kw.get("family"),
                       input_size=kw.get("input_size")).family == family


def test_a_family_without_the_cfg_is_an_error_naming_its_cfgs():
    with pytest.raises(UserError, match=r"the cifar family has no --cfg 'densenet121'; valid: "
                                        r"vgg16, resnet20.*densenet40"):
        resolve_arch("densenet121", family="cifar")
    with pytest.raises(UserError, match=r"imagenet family has no --cfg 'resnet56'.*valid: resnet18"):
        resolve_arch("resnet56", "cifar10", family="imagenet")
    with pytest.raises(UserError, match="6n\\+2"):
        resolve_arch("resnet18", family="cifar")
    with pytest.raises(UserError, match="unknown --family 'mnist'"):
        resolve_arch("resnet56", family="mnist")
    with pytest.raises(UserError, match="6n\\+2"):
        resolve_arch("resnet57", "folder")
    with pytest.raises(UserError, match="unknown --cfg 'mobilenet' for data set folder \\(imagenet"):
        resolve_arch("mobilenet", "folder")


def test_a_family_name_as_data_set_is_explicit():
    assert resolve_arch("resnet50", "cifar").family == "cifar"
    assert resolve_arch("resnet50", "imagenet").family == "imagenet"
    with pytest.raises(UserError, match="cifar family has no"):
        resolve_arch("densenet121", "cifar")


# ------------------------------------------------------------------ the resolved object

def test_an_arch_passes_through_and_pickles():
    arch = resolve_arch("vgg16", start_conv=2)
    assert arch.num_units == 11 and arch.plan().num_units == 11 and arch.plan(0).num_units == 13
    assert resolve_arch(arch) is arch
    assert resolve_arch(arch, start_conv=0).num_units == 13
    assert parse_rates("[0.5]*11", arch) == [0.5] * 11
    with pytest.raises(UserError, match="cifar vgg16 with --start_conv 2 takes 11 sketch rates"):
        parse_rates("[0.5]*12", arch)
    back = pickle.loads(pickle.dumps(arch))
    assert isinstance(back, Arch) and back == arch and back.plan() == arch.plan()
    with pytest.raises(UserError, match="belongs to --arch vgg"):
        resolve_arch("vgg16", arch="resnet")


@pytest.mark.parametrize("cfg,data_set,kw", [
    ("resnet56", "cifar10", {}),
    ("densenet40", "cifar10", {"round_to": 8}),
    ("vgg16", "cifar10", {"start_conv": 0, "sketch_lastconv": False}),
    ("resnet50", "imagenet", {"round_to": 8, "sketch_lastconv": False}),
])
def test_one_rates_to_widths_for_every_caller(cfg, data_set, kw):
    arch = resolve_arch(cfg, data_set, start_conv=kw.get("start_conv"))
    rates = [(0.2 + 0.07 * i) % 1 or 1.0 for i in range(arch.num_units)]
    space = RateSpace(cfg, data_set, step=None, round_to=kw.get("round_to", 1),
                      start_conv=kw.get("start_conv"), sketch_lastconv=kw.get("sketch_lastconv", True))
    want = widths_for(arch.plan(), rates, kw.get("sketch_lastconv", True), kw.get("round_to", 1))
    assert space.widths(rates) == want
    assert rates_to_widths(cfg, rates, data_set, **kw) == want
    model = build_model(cfg, data_set, rates=rates, **kw)
    assert model.sketch_widths == want
    assert list(space.cost(rates).widths) == want
    assert pickle.loads(pickle.dumps(space)).widths(rates) == want


# ------------------------------------------------------------------ huge expansions

def test_a_huge_repeat_is_refused_before_it_is_expanded():
    start = time.perf_counter()
    with pytest.raises(UserError, match="cifar resnet56 takes 27 sketch rates, got 1000000000"):
        parse_rates("[0.5]*1000000000", "resnet56")
    with pytest.raises(UserError, match="cifar densenet40 takes 36 sketch rates, got 2000000006"):
        parse_rates("[0.5, 0.6]*1000000000+[0.5]*6", "densenet40")
    with pytest.raises(UserError, match=f"1000000000 rates; at most {MAX_RATES}"):
        parse_rates("[0.5]*1000000000")
    with pytest.raises(UserError, match="takes 27 sketch rates, got 10000000000"):
        rates_to_widths("resnet56", "[0.5]*10000000000")
    assert time.perf_counter() - start < 5
    assert len(parse_rates("[0.5]*1000")) == 1000
    assert parse_rates("[0.5]*3", "densenet40") == [0.5] * 36
