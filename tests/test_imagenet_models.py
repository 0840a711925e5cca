"""ImageNet models: torchvision's keys and logits, per-slot widths, and the plans' layouts."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sketch_core.errors import UserError
from sketch_core.cost.flops import count_flops
from sketch_core.models import imagenet_densenet, imagenet_googlenet
from sketch_core.plans import Plan
from sketch_core.registry import resolve_arch

UNITS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50,
         "vgg16_bn": 12, "googlenet": 9, "densenet121": 58, "densenet161": 78,
         "densenet169": 82, "densenet201": 98}
SLOTS_PER_UNIT = {"resnet50": 2, "resnet101": 2, "resnet152": 2, "googlenet": 2}
ALL = list(UNITS)
# built with real weights and run at 64x64 (the others only on the meta device)
FLOAT = ["resnet18", "resnet50", "vgg16_bn", "googlenet", "densenet121"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs: one intra-op thread avoids OpenMP spin-waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tv_model(cfg: str, **kwargs) -> nn.Module:
    if cfg == "googlenet":
        return torchvision.models.googlenet(aux_logits=False, init_weights=False, **kwargs)
    return getattr(torchvision.models, cfg)(**kwargs)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_widths(plan: Plan, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, s.n) for s in plan.slots]


def perturb(model: nn.Module, seed: int) -> None:
    """Realistic BN statistics (one train-mode pass) and random BN affine parameters."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the statistics of this one batch
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=g))
        for m in bns:
            m.momentum = 0.1
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    model.eval()


@pytest.mark.parametrize("cfg", ALL)
def test_state_dict_keys_and_shapes_equal_torchvision(cfg):
    arch = resolve_arch(cfg, "imagenet")
    assert arch.family == "imagenet" and arch.input_size == 224
    for classes in (1000, 7):
        with torch.device("meta"):
            ours = arch.build(num_classes=classes)
            ref = tv_model(cfg, num_classes=classes)
        assert list(shapes(ours)) == list(shapes(ref))
        assert shapes(ours) == shapes(ref)
    eps = [(n, m.eps) for n, m in ours.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert eps == [(n, m.eps) for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("cfg", FLOAT)
def test_torchvision_weights_load_strict_and_give_same_logits(cfg):
    torch.manual_seed(0)
    ref = tv_model(cfg).eval()
    perturb(ref, 1)
    with torch.device("meta"):  # skip the random init; every tensor comes from ref
        ours = resolve_arch(cfg, "imagenet").build().eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert want.shape == (2, 1000)
    assert want.std() > 1e-3  # the comparison is not between two constant outputs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_googlenet_transform_input_matches_torchvision():
    torch.manual_seed(0)
    ref = torchvision.models.googlenet(aux_logits=False, init_weights=False,
                                       transform_input=True).eval()
    perturb(ref, 3)
    ours = imagenet_googlenet.build("googlenet", transform_input=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    plain = imagenet_googlenet.build("googlenet").eval()
    plain.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert not torch.allclose(plain(x), want, atol=1e-3)


def test_googlenet_rejects_aux_heads_and_transform_without_rgb():
    with pytest.raises(UserError, match="aux"):
        imagenet_googlenet.GoogLeNet(aux_logits=True)
    with pytest.raises(UserError, match="3 input channels"):
        imagenet_googlenet.build("googlenet", in_channels=1, transform_input=True)


@pytest.mark.parametrize("cfg", ALL)
def test_plan_slots_are_full_widths_and_units_match_the_counts(cfg):
    arch = resolve_arch(cfg, "imagenet")
    plan = arch.plan()
    assert plan.num_units == UNITS[cfg]
    per_unit = SLOTS_PER_UNIT.get(cfg, 1)
    assert all(len(u) == per_unit for u in plan.units)
    assert len(plan.unit_names) == plan.num_units == len(set(plan.unit_names))
    in_units = sorted(s for u in plan.units for s in u)
    assert in_units == sorted(set(in_units))  # no slot in two units
    with torch.device("meta"):
        full = arch.build()
    mods = dict(full.named_modules())
    for slot in plan.slots:
        assert mods[slot.producer].out_channels == slot.n
        assert mods[slot.bn].num_features == slot.n
    # slots in forward order = the order the producers run in
    order: list[str] = []
    hooks = [mods[s.producer].register_forward_hook(
        lambda m, i, o, name=s.producer: order.append(name)) for s in plan.slots]
    full.eval()(torch.empty(1, 3, 224, 224, device="meta"))
    for h in hooks:
        h.remove()
    assert order == [s.producer for s in plan.slots]


def _expected_in(spec, widths: list[int]) -> int:
    return sum((seg.n if seg.slot is None else widths[seg.slot]) * seg.repeat for seg in spec.inputs)


@pytest.mark.parametrize("cfg", ALL)
def test_narrow_model_matches_plan_layout_and_runs(cfg):
    arch = resolve_arch(cfg, "imagenet")
    plan = arch.plan()
    widths = random_widths(plan, seed=len(cfg))
    with torch.device("meta"):
        full = arch.build()
        narrow = arch.build(widths)
    mods = dict(narrow.named_modules())
    listed = set()
    for spec in plan.modules:
        m = mods[spec.path]
        listed.add(spec.path)
        if spec.kind == "bn":
            assert isinstance(m, nn.BatchNorm2d) and spec.out_slot is None
            assert m.num_features == _expected_in(spec, widths)
            continue
        assert spec.kind == ("conv" if isinstance(m, nn.Conv2d) else "linear")
        n_out = m.weight.shape[0]
        assert n_out == (widths[spec.out_slot] if spec.out_slot is not None else
                         dict(full.named_modules())[spec.path].weight.shape[0])
        assert m.weight.shape[1] == _expected_in(spec, widths)
    for i, slot in enumerate(plan.slots):  # producers and their BNs are listed with their slot
        assert any(s.path == slot.producer and s.out_slot == i for s in plan.modules)
        assert any(s.path == slot.bn and s.kind == "bn" and s.inputs[0].slot == i
                   for s in plan.modules)
    # every tensor that narrowing changes belongs to a listed module
    full_shapes, narrow_shapes = shapes(full), shapes(narrow)
    assert list(full_shapes) == list(narrow_shapes)
    changed = {k.rsplit(".", 1)[0] for k in full_shapes if full_shapes[k] != narrow_shapes[k]}
    assert changed and changed <= listed
    out = narrow.eval()(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, 1000)


@pytest.mark.parametrize("cfg", FLOAT)
def test_narrow_model_runs_forward_on_real_tensors(cfg):
    arch = resolve_arch(cfg, "imagenet")
    plan = arch.plan()
    widths = random_widths(plan, seed=7)
    assert widths != plan.full_widths()
    torch.manual_seed(0)
    model = arch.build(widths, num_classes=5, in_channels=1)
    out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _index(spec, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """Indices of the kept input channels (features) of ``spec`` in the full model."""
    parts, base = [], 0
    for seg in spec.inputs:
        ch = torch.arange(seg.n) if seg.slot is None else kept[seg.slot]
        feats = (ch[:, None] * seg.repeat + torch.arange(seg.repeat)).reshape(-1)
        parts.append(base + feats)
        base += seg.n * seg.repeat
    return torch.cat(parts)


@pytest.mark.parametrize("cfg", FLOAT)
def test_plan_is_exact_for_a_subnetwork(cfg):
    """Silence the dropped filters (BN gamma = beta = 0) in the full model, slice every
    module the plan lists, and the narrow model computes the same logits."""
    arch = resolve_arch(cfg, "imagenet")
    plan = arch.plan()
    torch.manual_seed(0)
    full = arch.build().eval()
    perturb(full, 5)
    g = torch.Generator().manual_seed(6)
    widths = random_widths(plan, seed=8)
    kept = {i: torch.randperm(s.n, generator=g)[:widths[i]].sort().values
            for i, s in enumerate(plan.slots)}
    mods = dict(full.named_modules())
    with torch.no_grad():
        for i, s in enumerate(plan.slots):
            drop = torch.ones(s.n, dtype=torch.bool)
            drop[kept[i]] = False
            mods[s.bn].weight[drop] = 0
            mods[s.bn].bias[drop] = 0
    state = full.state_dict()
    for spec in plan.modules:
        if spec.kind == "bn":
            idx = _index(spec, kept)
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[f"{spec.path}.{name}"] = state[f"{spec.path}.{name}"][idx]
            continue
        w = state[f"{spec.path}.weight"]
        if spec.out_slot is not None:
            w = w[kept[spec.out_slot]]
            if f"{spec.path}.bias" in state:
                state[f"{spec.path}.bias"] = state[f"{spec.path}.bias"][kept[spec.out_slot]]
        state[f"{spec.path}.weight"] = w[:, _index(spec, kept)]
    with torch.device("meta"):
        narrow = arch.build(widths).eval()
    narrow.load_state_dict(state, strict=True, assign=True)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        want, got = full(x), narrow(x)
    assert want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_resnet50_macs_and_params_match_design_numbers():
    arch = resolve_arch("resnet50", "imagenet")
    plan = arch.plan()
    with torch.device("meta"):
        full = arch.build()
        # the paper's [0.6]*16 keeps floor(0.6 * n) filters in both slots of every unit
        pruned = arch.build([math.floor(0.6 * s.n + 1e-6) for s in plan.slots])

    def macs(model: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter:
            model.eval()(torch.empty(1, 3, 224, 224, device="meta"))
        return counter.get_total_flops() // 2

    def params(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert round(macs(full) / 1e9, 2) == 4.09
    assert count_flops(full, (3, 224, 224)) == (macs(full), params(full))
    assert count_flops(pruned, (3, 224, 224)) == (macs(pruned), params(pruned))
    assert round(params(full) / 1e6, 2) == 25.56
    assert round(params(pruned) / 1e6, 2) == 14.53
    assert 0.45 < 1 - macs(pruned) / macs(full) < 0.48


def test_vgg_start_conv_chooses_the_units():
    arch = resolve_arch("vgg16_bn", "imagenet")
    for start in (0, 1, 5, 12):
        plan = arch.plan(start)
        assert len(plan.slots) == 13
        assert plan.num_units == 13 - start
        assert [u[0] for u in plan.units] == list(range(start, 13))
    last = arch.plan().modules[-1]
    assert (last.path, last.kind, last.inputs[0].slot, last.inputs[0].n, last.inputs[0].repeat) == \
        ("classifier.0", "linear", 12, 512, 49)
    for bad in (-1, 13):
        with pytest.raises(UserError, match="start_conv"):
            arch.plan(bad)


@pytest.mark.parametrize("cfg", ["resnet18", "resnet50", "googlenet", "densenet121"])
def test_start_conv_other_than_default_is_an_error(cfg):
    mod = resolve_arch(cfg, "imagenet").spec
    assert mod.plan(cfg, start_conv=1).num_units == UNITS[cfg]
    with pytest.raises(UserError, match="start_conv"):
        mod.plan(cfg, start_conv=2)


@pytest.mark.parametrize("cfg", ["resnet50", "vgg16_bn", "googlenet", "densenet121"])
def test_bad_widths_are_user_errors(cfg):
    arch = resolve_arch(cfg, "imagenet")
    full = arch.plan().full_widths()
    with pytest.raises(UserError, match=f"{len(full)} widths"):
        arch.build(full[:-1])
    too_wide = list(full)
    too_wide[0] += 1
    with pytest.raises(UserError, match="out of range"):
        arch.build(too_wide)
    with pytest.raises(UserError, match="out of range"):
        arch.build([0] + full[1:])


def test_unknown_cfg_is_a_user_error():
    for mod, cfg in [(imagenet_densenet, "densenet100"), (imagenet_googlenet, "inception")]:
        with pytest.raises(UserError, match="unknown"):
            mod.build(cfg)
        with pytest.raises(UserError, match="unknown"):
            mod.plan(cfg)


def test_densenet_legacy_keys_remap_and_load_strict():
    torch.manual_seed(0)
    ref = torchvision.models.densenet121().eval()
    current = ref.state_dict()
    legacy = {}
    for k, v in current.items():
        for old, new in (("norm1.", "norm.1."), ("norm2.", "norm.2."), ("conv1.", "conv.1."),
                         ("conv2.", "conv.2.")):
            if ".denselayer" in k and f".{old}" in k:
                k = k.replace(f".{old}", f".{new}")
        legacy[k] = v
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock1.denselayer1.norm1.weight" not in legacy
    remapped = imagenet_densenet.remap_legacy_keys(legacy)
    assert list(remapped) == list(current)
    assert all(remapped[k] is current[k] for k in current)
    ours = imagenet_densenet.build("densenet121")
    ours.load_state_dict(remapped, strict=True)
    # transitions and the stem are never renamed
    assert imagenet_densenet.remap_legacy_keys({"features.transition1.norm.weight": 1}) == \
        {"features.transition1.norm.weight": 1}
