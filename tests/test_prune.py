"""Sketching every CIFAR architecture (and the ImageNet ones on small inputs): widths,
forward, measured MACs against `info`, each option of the original changing the result."""

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sketch_core.cost.flops import count_arch, count_flops
from sketch_core.errors import UserError
from sketch_core.pruning.bn import recalibrate_bn
from conftest import sketch_at
from sketch_core.registry import build_model, resolve_arch
from sketch_core.cli.info import info

CIFAR = ["resnet20", "vgg16", "googlenet", "densenet40"]


def _random_rates(cfg, data_set="cifar10", seed=0):
    n = resolve_arch(cfg, data_set).plan().num_units
    rng = random.Random(seed)
    return [rng.choice([0.2, 0.35, 0.5, 0.75, 1.0]) for _ in range(n)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {cfg: resolve_arch(cfg).build().eval() for cfg in CIFAR}


@pytest.mark.parametrize("cfg", CIFAR)
@pytest.mark.parametrize("mode", ["sketch", "select"])
def test_each_cifar_arch_sketches_runs_and_matches_info(models, cfg, mode):
    rates = _random_rates(cfg, seed=len(cfg))
    narrow = sketch_at(models[cfg], cfg, rates, mode=mode)
    recalibrate_bn(narrow, [torch.randn(6, 3, 32, 32)])
    narrow.eval()
    with torch.no_grad():
        y = narrow(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    macs, params = count_flops(narrow, (3, 32, 32))
    rep = info(cfg, sketch_rate=str(rates))
    assert (macs, params) == (rep["flops"], rep["params"])
    assert macs < rep["base_flops"]
    # the same architecture built narrower: same keys as the unpruned model
    assert list(narrow.state_dict()) == list(models[cfg].state_dict())


@pytest.mark.parametrize("cfg", CIFAR)
def test_flop_counter_mode_agrees(cfg):
    model = build_model(cfg, rates=_random_rates(cfg, seed=3)).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    # FlopCounterMode counts 2 FLOPs per MAC, conv and matmul only
    assert counter.get_total_flops() == 2 * count_flops(model, (3, 32, 32))[0]


def test_reference_numbers():
    assert count_arch("resnet56") == (125485696, 853018)
    macs, params = count_arch("googlenet")
    assert abs(macs / 1.52e9 - 1) < 0.01 and abs(params / 6.15e6 - 1) < 0.01
    macs, params = count_arch("resnet50", "imagenet")
    assert abs(macs / 4.09e9 - 1) < 0.01 and abs(params / 25.56e6 - 1) < 0.01
    r = info("resnet56", sketch_rate="[0.6]*27")
    assert round(r["flops"] / 1e6, 2) == 73.36 and round(r["flops_reduction_pct"], 1) == 41.5


@pytest.mark.parametrize("cfg", CIFAR)
def test_rate_one_keeps_every_width(models, cfg):
    n = resolve_arch(cfg).plan().num_units
    for mode in ("sketch", "select"):
        narrow = sketch_at(models[cfg], cfg, [1.0] * n, mode=mode)
        for k, v in models[cfg].state_dict().items():
            assert narrow.state_dict()[k].shape == v.shape
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(sketch_at(models[cfg], cfg, [1.0] * n, mode="select").eval()(x), models[cfg](x))


@pytest.mark.parametrize("cfg,rates", [("resnet18", "[0.5]*8"), ("resnet50", "[0.6]*16"),
                                       ("googlenet", "[0.4]*9")])
def test_imagenet_archs_sketch_and_run(cfg, rates):
    torch.manual_seed(0)
    model = resolve_arch(cfg, "imagenet").build(num_classes=7).eval()
    narrow = sketch_at(model, cfg, rates, "imagenet", mode="sketch")
    recalibrate_bn(narrow, [torch.randn(2, 3, 64, 64)])
    with torch.no_grad():
        assert narrow.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert count_flops(narrow, (3, 224, 224)) == (info(cfg, "imagenet", rates, num_classes=7)["flops"],
                                                   info(cfg, "imagenet", rates, num_classes=7)["params"])


# --- options of the original --------------------------------------------------------------

@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(1)
    m = resolve_arch("resnet20").build().eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m


def _w(model, key="layer1.0.conv1.weight"):
    return model.state_dict()[key]


def test_filter_sketch_preserves_second_order_information(r20):
    narrow = sketch_at(r20, "resnet20", [0.5] * 9)
    a = _w(r20).reshape(16, -1).double()
    b = _w(narrow).reshape(8, -1).double()
    err = torch.linalg.matrix_norm(a.T @ a - b.T @ b, 2)
    s2 = torch.linalg.svdvals(a) ** 2
    assert err <= s2.sum() / 8 + 1e-6
    assert not any(torch.allclose(b[i], a[j]) for i in range(8) for j in range(16))


def test_channel_sketch_is_transposed(r20):
    """The consumer's input channels are the rows that are sketched: B^T B ~ A^T A over them."""
    narrow = sketch_at(r20, "resnet20", [0.5] * 9)
    w = _w(r20, "layer1.0.conv2.weight").double()           # 16 x 16 x 3 x 3
    a = w.transpose(0, 1).reshape(16, -1)                   # channels are rows
    b = _w(narrow, "layer1.0.conv2.weight").double().transpose(0, 1).reshape(8, -1)
    assert b.shape == (8, 16 * 9)
    err = torch.linalg.matrix_norm(a.T @ a - b.T @ b, 2)
    assert err <= (torch.linalg.svdvals(a) ** 2).sum() / 8 + 1e-6


@pytest.mark.parametrize("method", ["max", "sum", "l2", "l1", "l2_2", "2max"])
def test_weight_norm_rescales_sketched_filters(r20, method):
    plain = _w(sketch_at(r20, "resnet20", [0.5] * 9))
    normed = _w(sketch_at(r20, "resnet20", [0.5] * 9, weight_norm_method=method))
    scale = plain.reshape(-1) / normed.reshape(-1)
    assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-4)     # one factor per layer
    per = _w(sketch_at(r20, "resnet20", [0.5] * 9, weight_norm_method=method, filter_norm=True))
    ratios = (plain.reshape(8, -1) / per.reshape(8, -1))[:, 0]
    assert not torch.allclose(ratios, ratios[0].expand_as(ratios))         # one factor per filter
    if method == "max":
        assert torch.allclose(per.reshape(8, -1).abs().amax(1), torch.ones(8))


def test_sketch_bn_sketches_gamma_and_beta_with_the_filters(r20):
    plain = sketch_at(r20, "resnet20", [0.5] * 9).state_dict()
    with_bn = sketch_at(r20, "resnet20", [0.5] * 9, sketch_bn=True).state_dict()
    g_plain, g_bn = plain["layer1.0.bn1.weight"], with_bn["layer1.0.bn1.weight"]
    assert torch.allclose(g_plain, g_plain[0].expand_as(g_plain))          # averaged without it
    assert not torch.allclose(g_bn, g_bn[0].expand_as(g_bn))               # sketched with it
    assert not torch.allclose(plain["layer1.0.conv1.weight"], with_bn["layer1.0.conv1.weight"])


def test_sketch_lastconv_false_keeps_last_unit(r20):
    narrow = sketch_at(r20, "resnet20", [0.5] * 9, sketch_lastconv=False)
    assert _w(narrow, "layer3.2.conv1.weight").shape[0] == 64
    assert _w(narrow, "layer3.1.conv1.weight").shape[0] == 32


def test_start_conv_only_for_vgg_and_shifts_units():
    vgg = resolve_arch("vgg16").build().eval()
    narrow = sketch_at(vgg, "vgg16", [0.5] * 13, start_conv=0, mode="select")
    assert narrow.state_dict()["features.0.weight"].shape[0] == 32
    narrow = sketch_at(vgg, "vgg16", [0.5] * 12, start_conv=1, mode="select")
    assert narrow.state_dict()["features.0.weight"].shape[0] == 64
    assert narrow.state_dict()["features.3.weight"].shape == (32, 64, 3, 3)
    assert narrow.state_dict()["classifier.linear1.weight"].shape == (512, 256)
    with pytest.raises(UserError, match="only applies to VGG"):
        sketch_at(resolve_arch("resnet20").build(), "resnet20", [0.5] * 9, start_conv=2)


def test_random_rules_keep_pretrained_filters(r20):
    src = _w(r20).reshape(16, -1)
    for rule in ("random_pretrain", "l1_pretrain"):
        kept = _w(sketch_at(r20, "resnet20", [0.5] * 9, random_rule=rule, seed=3)).reshape(8, -1)
        rows = [int((src == k).all(1).nonzero()) for k in kept]
        assert len(set(rows)) == 8
        if rule == "l1_pretrain":
            assert sorted(rows) == sorted(src.abs().sum(1).topk(8).indices.tolist())
    picks = set()
    for seed in range(20):   # the original never picked the last filter
        kept = _w(sketch_at(r20, "resnet20", [0.5] * 9, random_rule="random_pretrain", seed=seed))
        picks |= {int((src == k).all(1).nonzero()) for k in kept.reshape(8, -1)}
    assert 15 in picks and len(picks) == 16


def test_bad_options_are_user_errors(r20):
    with pytest.raises(UserError, match="valid: sketch, select, select_lsq"):
        sketch_at(r20, "resnet20", [0.5] * 9, mode="prune")
    with pytest.raises(UserError, match="random_rule"):
        sketch_at(r20, "resnet20", [0.5] * 9, random_rule="magic")
    with pytest.raises(UserError, match="weight_norm_method"):
        sketch_at(r20, "resnet20", [0.5] * 9, weight_norm_method="l3")
    with pytest.raises(UserError, match="needs a data"):
        sketch_at(r20, "resnet20", [0.5] * 9, mode="select_lsq")
    with pytest.raises(UserError, match="takes 9 sketch rates, got 8"):
        sketch_at(r20, "resnet20", [0.5] * 8)
    with pytest.raises(UserError, match="unpruned"):
        sketch_at(sketch_at(r20, "resnet20", [0.5] * 9), "resnet20", [0.5] * 9)
    with pytest.raises(UserError, match="unknown --cfg"):
        sketch_at(r20, "resnet21x", [0.5] * 9)


def test_sketched_model_does_not_alias_the_source(r20):
    before = {k: v.clone() for k, v in r20.state_dict().items()}
    narrow = sketch_at(r20, "resnet20", [1.0] * 9, mode="select")
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(1.0)
    for k, v in r20.state_dict().items():
        assert torch.equal(v, before[k])
