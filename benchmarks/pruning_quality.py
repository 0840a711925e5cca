"""Pruning quality at equal widths: the three sketch modes against Torch-Pruning's L1.

Digits (scikit-learn's 8x8 images), a CIFAR ResNet-20 pretrained by the project's own
``launch.py pretrain`` (digits defaults), uniform rates 0.9 0.7 0.5 0.4 0.3 0.2 0.1.
Each rate vector is pruned by

- ``sketch``, ``select``, ``select_lsq`` (``sketch_core.pruning.prune.sketch`` in that mode; the
  selection modes rank by the producer's filters, ``select_by="filters"``),
- ``select_ch``, ``select_lsq_ch``: the same two modes with ``select_by="channels"``
  (each channel's weights in its consumers, scaled by its BN gain), and
- ``tp_l1``: Torch-Pruning's L1 magnitude pruning (``MagnitudeImportance(p=1)`` on each
  dependency group, the lowest-scoring channels removed through its ``DependencyGraph``),
  restricted to the same block-internal channels: only each block's conv1 (with its BN
  and conv2's inputs), to exactly the widths ``sketch_core.plans.widths_for`` gives;

then every network gets the same treatment as a search trial: BN statistics recomputed
on the same 8 training batches, then the same short fine-tune (``--epochs`` epochs of
SGD, lr 0.01, momentum 0.9, weight decay 5e-4, constant rate) with ``--seeds`` seeds
(each seed its own shuffling and augmentation of the same training split).
Test accuracy is measured after BN recalibration and after the fine-tune (the last
epoch's model: nothing is chosen on the test set).

The table gives each method's MACs ratio (identical for all four: same widths) and
mean accuracies; then each method's hypervolume of its (accuracy, MACs ratio) points,
accuracy maximised, MACs ratio minimised, reference (0, 1), per seed (mean, sd), after
BN and after the fine-tune, and the mean time of the pruning step and of one fine-tune
epoch (wall clock, so only comparable within one run). Last line:
``ratio=<best sketchtune mode's fine-tuned hypervolume / Torch-Pruning L1's>`` (goal > 1).

    pip install -e ".[bench]"
    python benchmarks/pruning_quality.py [--epochs 3] [--seeds 3] [--work DIR]

``--data real`` runs the same comparison on the public CIFAR ResNet-56 and the JPEG copy
of CIFAR-10 (``--data_root``, default ``../shared/data`` beside the repository): the
network adapted to the JPEG training images first (cached in ``--work_dir``; ``--no_adapt``
skips it), rates 0.9 0.6 0.4 0.2 zero-shot (BN recalibrated on 10 training batches) on
all 10,000 test images, rates 0.6 0.4 0.2 after one pass over a fixed 2,000 training
images with 2 seeds, each method's prune time; Markdown tables, last line ``ratio=``.
``--smoke`` shrinks it to a check of a minute or two (500 test images, one rate, one
seed, 100 fine-tune images, a 256-image adaptation).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, Clock, columns, mean_sd, pretrained, require_real_data, seeded

from search.results.pareto import hypervolume
from sketch_core.cost.flops import count_flops
from sketch_core.data.sets import IMAGENET_MEAN, IMAGENET_STD, load_data
from sketch_core.errors import UserError
from sketch_core.io.checkpoint import load_checkpoint, save_checkpoint
from sketch_core.options import SketchOptions
from sketch_core.plans import widths_for
from sketch_core.pruning.bn import recalibrate_bn
from sketch_core.pruning.prune import sketch
from sketch_core.registry import Arch, resolve_arch
from sketch_core.training.loop import evaluate, fit

# method -> (sketch mode, select_by)
MODES = {"sketch": ("sketch", "filters"), "select": ("select", "filters"),
         "select_lsq": ("select_lsq", "filters"), "select_ch": ("select", "channels"),
         "select_lsq_ch": ("select_lsq", "channels")}
METHODS = tuple(MODES) + ("tp_l1",)
RATES = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1)
CFG = "resnet20"


def require_torch_pruning() -> None:
    try:
        import torch_pruning  # noqa: F401  (optional: the bench extra)
    except ImportError:
        raise SystemExit("torch-pruning is missing: pip install -e \".[bench]\"")


def tp_l1(model, arch: Arch, widths: list[int], example):
    """Torch-Pruning's L1 magnitude pruning of each plan slot's producer, to our widths."""
    import torch_pruning as tp  # optional: the bench extra

    net = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    importance = tp.importance.MagnitudeImportance(p=1)
    for slot, width in zip(arch.plan().slots, widths):
        conv = net.get_submodule(slot.producer)
        n = conv.out_channels
        if width >= n:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
        scores = importance(group)
        drop = scores.argsort()[: n - width].tolist()
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
    return net


def prune(full, arch: Arch, method: str, widths: list[int], calib, example):
    """``full`` pruned to ``widths`` by ``method``, BN statistics recomputed on ``calib``;
    and the seconds the pruning itself took."""
    t0 = time.perf_counter()
    if method == "tp_l1":
        net = tp_l1(full, arch, widths, example)
    else:
        mode, select_by = MODES[method]
        net = sketch(full, arch, widths, SketchOptions(mode=mode, select_by=select_by),
                     batches=calib)
    seconds = time.perf_counter() - t0
    got = [net.get_submodule(s.producer).out_channels for s in arch.plan().slots]
    assert got == widths, f"{method}: widths {got}, expected {widths}"
    recalibrate_bn(net, calib)
    return net, seconds


def fine_tune(net, data, epochs: int, seed: int, on_epoch=None) -> None:
    """The trials' short fine-tune: SGD lr 0.01, momentum 0.9, weight decay 5e-4, constant
    rate; ``seed`` the shuffle and augmentation of the same training split."""
    seeded(seed)
    data.train.seed = seed
    fit(net, data, epochs=epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, lr_decay_step=[],
        seed=seed, progress=False, on_epoch=on_epoch)


# ----------------------------------------------------------------------------------------
# --data digits: a ResNet-20 pretrained here

class DigitsRun:
    """The digits comparison: the baseline, and per method and rate the MACs ratio, the
    test accuracy after BN and after each fine-tune epoch per seed, the times."""

    def __init__(self, args: argparse.Namespace, work: Path, clock: Clock) -> None:
        self.args, self.clock = args, clock
        self.rates = [float(r) for r in args.rates.split(",")]
        self.methods = [m for m in args.methods.split(",") if m]
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
        pre_argv = ["--data_set", "digits", "--arch", "resnet", "--cfg", CFG,
                    *args.pretrain_args.split()]
        print(f"[{clock()}] pretraining {CFG} on digits: launch.py pretrain "
              f"{' '.join(pre_argv)}", flush=True)
        self.full = load_checkpoint(pretrained(work, pre_argv)).model.eval()
        self.data = load_data("digits", batch_size=128, val_fraction=0.1, seed=0)
        self.calib = self.data.calibration_batches(args.bn_batches)
        self.arch = resolve_arch(CFG, "digits")
        self.base_macs = count_flops(self.full, self.data.shape)[0]
        base = evaluate(self.full, self.data.test)
        self.base_acc = base["acc"]
        print(f"[{clock()}] baseline: test acc {100 * self.base_acc:.2f}% ({base['n']} test "
              f"images), {self.base_macs / 1e6:.2f}M MACs", flush=True)
        # acc[method][rate][seed][e] = test accuracy after e fine-tune epochs (e = 0: after BN)
        self.acc: dict[str, dict[float, list[list[float]]]] = {m: {} for m in self.methods}
        self.macs_ratio: dict[str, dict[float, float]] = {m: {} for m in self.methods}
        self.times: dict[str, list[tuple[float, float]]] = {m: [] for m in self.methods}

    def one(self, method: str, rate: float) -> None:
        """Prune at ``[rate]*9`` by ``method``, then fine-tune once per seed."""
        args, data = self.args, self.data
        widths = widths_for(self.arch.plan(), [rate] * self.arch.num_units)
        net, t_prune = prune(self.full, self.arch, method, widths, self.calib,
                             self.calib[0][0][:1])
        self.macs_ratio[method][rate] = count_flops(net, data.shape)[0] / self.base_macs
        acc_bn = evaluate(net, data.test)["acc"]
        start = copy.deepcopy(net.state_dict())
        self.acc[method][rate] = []
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            net.load_state_dict(start)
            curve = [acc_bn]
            fine_tune(net, data, args.epochs, seed, on_epoch=lambda e, _m, curve=curve:
                      curve.append(evaluate(net, data.test)["acc"]))
            self.acc[method][rate].append(curve)
        t_epoch = (time.perf_counter() - t0) / max(1, args.seeds * args.epochs)
        self.times[method].append((t_prune, t_epoch))
        m, sd = mean_sd([c[-1] for c in self.acc[method][rate]])
        print(f"[{self.clock()}] rate {rate:<4} {method:<10} widths {widths}  MACs "
              f"{self.macs_ratio[method][rate]:.3f}  after BN {100 * acc_bn:6.2f}%  after "
              f"fine-tune {100 * m:6.2f}% (sd {100 * sd:.2f})  prune {t_prune:.1f}s, "
              f"fine-tune {t_epoch:.1f}s/epoch", flush=True)

    def run(self) -> None:
        for rate in self.rates:
            for method in self.methods:
                self.one(method, rate)
        # every method prunes to the same widths: the same MACs
        for rate in self.rates:
            ratios = {round(self.macs_ratio[m][rate], 9) for m in self.methods}
            assert len(ratios) == 1, f"methods differ in MACs at rate {rate}: {ratios}"

    def hv(self, m: str, seed: int, e: int) -> float:
        return hypervolume(*columns([(self.acc[m][r][seed][e], self.macs_ratio[m][r])
                                     for r in self.rates]))

    def accuracy_table(self) -> None:
        args, methods = self.args, self.methods
        print()
        print(f"digits, {CFG} (baseline test acc {100 * self.base_acc:.2f}%), uniform rates, BN "
              f"recalibrated on {args.bn_batches} batches, then a {args.epochs}-epoch fine-tune, "
              f"{args.seeds} seeds; test accuracy % (mean over seeds)")
        print(f"{'rate':>5} {'MACs':>6} | " + " | ".join(f"{m:>19}" for m in methods))
        print(f"{'':>5} {'ratio':>6} | "
              + " | ".join(f"{'BN':>7} {'fine-tuned':>11}" for _ in methods))
        for rate in self.rates:
            cells = []
            for m in methods:
                runs = self.acc[m][rate]
                cells.append(f"{100 * runs[0][0]:7.2f} "
                             f"{100 * mean_sd([c[-1] for c in runs])[0]:11.2f}")
            print(f"{rate:>5} {self.macs_ratio[methods[0]][rate]:6.3f} | " + " | ".join(cells))

    def hv_epoch_table(self) -> dict[str, list[tuple[float, float]]]:
        """Per method and epoch the (mean, sd) hypervolume over seeds, printed with the times."""
        E, seeds = self.args.epochs, self.args.seeds
        print()
        print("hypervolume of (accuracy, MACs ratio), reference (0, 1), after e fine-tune epochs "
              "(mean over seeds; sd in brackets); pruning time and time per fine-tune epoch")
        print(f"{'method':<13} " + " ".join(f"{f'e={e}':>16}" for e in range(E + 1))
              + f" {'prune s':>8} {'s/epoch':>8}")
        hvs = {m: [mean_sd([self.hv(m, s, e) for s in range(seeds)]) for e in range(E + 1)]
               for m in self.methods}
        for m in self.methods:
            t_prune = mean_sd([t[0] for t in self.times[m]])[0]
            t_epoch = mean_sd([t[1] for t in self.times[m]])[0]
            print(f"{m:<13} " + " ".join(f"{v:8.4f} ({sd:.4f})" for v, sd in hvs[m])
                  + f" {t_prune:8.2f} {t_epoch:8.2f}")
        return hvs

    def ratio(self, hvs: dict[str, list[tuple[float, float]]]) -> None:
        """The best mode's hypervolume over Torch-Pruning L1's, per epoch and per seed."""
        E, seeds = self.args.epochs, self.args.seeds
        modes = [m for m in self.methods if m in MODES]
        if "tp_l1" not in self.methods or not modes:
            print("ratio=nan")
            return
        for e in range(E + 1):
            best = max(modes, key=lambda m: hvs[m][e][0])
            print(f"after {e} epoch(s): best mode {best}, hypervolume / Torch-Pruning L1's = "
                  f"{hvs[best][e][0]:.4f} / {hvs['tp_l1'][e][0]:.4f} = "
                  f"{hvs[best][e][0] / hvs['tp_l1'][e][0]:.4f}")
        best = max(modes, key=lambda m: hvs[m][E][0])
        # seed s fine-tunes every method with the same shuffles and augmentation: a paired ratio
        paired = [self.hv(best, s, E) / self.hv("tp_l1", s, E) for s in range(seeds)]
        print(f"{best} / Torch-Pruning L1 per seed after {E} epoch(s): "
              + ", ".join(f"{r:.4f}" for r in paired)
              + f" (mean {mean_sd(paired)[0]:.4f}, sd {mean_sd(paired)[1]:.4f})")
        print(f"ratio={hvs[best][E][0] / hvs['tp_l1'][E][0]:.4f}")


def run_digits(args: argparse.Namespace) -> int:
    """The digits benchmark (ResNet-20 pretrained here, epochs of fine-tune)."""
    require_torch_pruning()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="pruning_quality-") as tmp:
        work = Path(args.work) if args.work is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = DigitsRun(args, work, clock)
        run.run()
        run.accuracy_table()
        hvs = run.hv_epoch_table()
        print(f"total time {clock()}")
        run.ratio(hvs)
    return 0


# ----------------------------------------------------------------------------------------
# --data real: the public ResNet-56 on the JPEG copy of CIFAR-10

REAL_CFG = "resnet56"
REAL_CKPT = "pretrained/resnet56-4bfd9763.th"
REAL_JPEG = "cifar10-jpg"
REAL_RATES = (0.9, 0.6, 0.4, 0.2)
REAL_FT_RATES = (0.6, 0.4, 0.2)
LABELS = {"sketch": "`sketch`", "select": "`select`", "select_lsq": "`select_lsq`",
          "select_ch": "`select`, channels", "select_lsq_ch": "`select_lsq`, channels",
          "tp_l1": "Torch-Pruning L1, same widths"}
SMOKE = dict(test_images=500, rates="0.4", ft_rates="0.4", seeds=1, finetune_images=100,
             adapt_images=256)


def default_data_root() -> Path:
    """``../shared/data`` beside the repository (the folder its README describes)."""
    return ROOT.parent / "shared" / "data"


def default_work_dir() -> Path:
    """``$XDG_CACHE_HOME/sketchtune/pruning_quality``, else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sketchtune" / "pruning_quality"


def check_real_inputs(root: Path, finetune_images: int, adapt_images: int | None,
                      test_images: int | None) -> int:
    """The real data's presence and the sizes asked for; the number of training images."""
    require_real_data(root, REAL_JPEG, REAL_CKPT, "ResNet-56")
    train_dir = root / REAL_JPEG / "train"
    n_train = sum(len(os.listdir(d)) for d in train_dir.iterdir() if d.is_dir())
    if not 1 <= finetune_images <= n_train:
        raise UserError(f"--finetune_images {finetune_images}: expected 1 to {n_train} (the "
                        f"training split of {train_dir})")
    if adapt_images is not None and not 1 <= adapt_images <= n_train:
        raise UserError(f"--adapt_images {adapt_images}: expected 1 to {n_train} (the training "
                        f"split of {train_dir})")
    if test_images is not None and test_images < 1:
        raise UserError(f"--test_images {test_images}: expected a positive number (at most the "
                        f"test split's size)")
    return n_train


def subset(loader, n: int | None, seed: int):
    """A copy of ``loader`` serving a fixed seeded random ``n`` of its images (all: None)."""
    if n is None or n >= len(loader.index):
        return loader
    out = copy.copy(loader)
    pick = torch.randperm(len(loader.index), generator=torch.Generator().manual_seed(seed))[:n]
    out.index = loader.index[pick.to(loader.index.device)].sort().values
    return out


def adapted_baseline(public: Path, data, work: Path, *, epochs: int, images: int | None,
                     lr: float, clock: Clock):
    """The public ResNet-56 fine-tuned on the JPEG training images; cached in ``work``.

    ``epochs`` passes of SGD (momentum 0.9, weight decay 5e-4, constant ``lr``) over
    ``images`` training images (all: None). Returns (model, test acc before, after).
    """
    n_test = len(data.test.index)
    tag = f"{REAL_CFG}-jpeg-e{epochs}-n{images or 'all'}-lr{lr:g}"
    ckpt, info = work / f"{tag}.pt", work / f"{tag}.json"
    facts = json.loads(info.read_text()) if info.exists() else {}
    public_model = load_checkpoint(public, REAL_CFG).model.eval()
    if ckpt.exists():
        model = load_checkpoint(ckpt).model.eval()
        print(f"[{clock()}] adapted baseline reused: {ckpt}", flush=True)
    else:
        model = copy.deepcopy(public_model)
        train = subset(data.train, images, seed=7)
        n = len(train.index)
        print(f"[{clock()}] adapting the public {REAL_CFG} to the JPEG training images: {epochs} "
              f"epoch(s) over {n} images, SGD lr {lr:g} (cached as {ckpt})", flush=True)
        seeded(0)
        fit(model, dataclasses.replace(data, train=train, val=None), epochs=epochs, lr=lr,
            momentum=0.9, weight_decay=5e-4, lr_decay_step=[], seed=0, progress=False)
        model.eval()
        work.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, model, cfg=REAL_CFG, data_set="cifar10",
                        extra={"adapted_from": public.name, "epochs": epochs, "images": n, "lr": lr})
        facts = {}
    key = str(n_test)
    if key not in facts:
        facts[key] = {"before": evaluate(public_model, data.test)["acc"],
                      "after": evaluate(model, data.test)["acc"]}
        work.mkdir(parents=True, exist_ok=True)
        tmp = info.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(facts, indent=1))
        tmp.replace(info)
    return model, facts[key]["before"], facts[key]["after"]


def hv_table(rows: list[tuple[str, list[str], str, str]], rates: list[float], title: str) -> None:
    """A Markdown table: method | one cell per rate | hypervolume | extra column."""
    print()
    print(title)
    print()
    print("| method | " + " | ".join(f"{r:g}" for r in rates) + " | hypervolume | "
          + rows[0][3] + " |")
    print("| --- | " + " | ".join("---" for _ in rates) + " | --- | --- |")
    for label, cells, hv, _ in rows[1:]:
        print(f"| {label} | " + " | ".join(cells) + f" | {hv} | {_} |")


@dataclasses.dataclass(frozen=True)
class RealSettings:
    """What ``--data real`` runs: the flags, else the ``--smoke`` values, else the defaults."""

    rates: list[float]
    ft_rates: list[float]
    seeds: int
    n_ft: int
    n_adapt: int | None
    n_test: int | None
    bn_batches: int
    methods: list[str]


def real_settings(args: argparse.Namespace) -> RealSettings:
    """The settings, checked (a UserError names the flag)."""
    smoke = SMOKE if args.smoke else {}

    def pick(name: str, default):
        """The flag when given, else the smoke value (with --smoke), else ``default``."""
        value = getattr(args, name)
        return value if value is not None else smoke.get(name, default)

    def rate_list(name: str, default: tuple[float, ...]) -> list[float]:
        return [float(r) for r in pick(name, ",".join(map(str, default))).split(",") if r]

    s = RealSettings(rate_list("rates", REAL_RATES), rate_list("ft_rates", REAL_FT_RATES),
                     pick("seeds", 2), pick("finetune_images", 2000), pick("adapt_images", None),
                     pick("test_images", None), pick("bn_batches", 10),
                     [m for m in args.methods.split(",") if m])
    if not s.rates or s.seeds < 1 or s.bn_batches < 1:
        raise UserError(f"--rates needs at least one rate, --seeds and --bn_batches at least 1; "
                        f"got rates {s.rates}, seeds {s.seeds}, bn_batches {s.bn_batches}")
    unknown = set(s.methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
    bad = [r for r in s.rates + s.ft_rates if not 0 < r <= 1]
    if bad:
        raise UserError(f"rates must be in (0, 1], got {bad}")
    return s


def real_baseline(args: argparse.Namespace, root: Path, data, s: RealSettings, n_train: int,
                  clock: Clock):
    """(the network pruned here, test acc before adaptation, after, what it is)."""
    public = root / REAL_CKPT
    if args.no_adapt:
        full = load_checkpoint(public, REAL_CFG).model.eval()
        before = after = evaluate(full, data.test)["acc"]
        print(f"[{clock()}] public {REAL_CFG} (not adapted, --no_adapt): test acc "
              f"{100 * before:.2f}%", flush=True)
        return full, before, after, f"the public {REAL_CFG}, not adapted"
    work = Path(args.work).expanduser() if args.work else default_work_dir()
    full, before, after = adapted_baseline(public, data, work, epochs=args.adapt_epochs,
                                           images=s.n_adapt, lr=args.adapt_lr, clock=clock)
    print(f"[{clock()}] public {REAL_CFG} test acc {100 * before:.2f}% before adaptation, "
          f"{100 * after:.2f}% after", flush=True)
    return full, before, after, (f"the public {REAL_CFG} adapted to the JPEG training images "
                                 f"({args.adapt_epochs} epoch(s) over {s.n_adapt or n_train} "
                                 f"images)")


def pct(a: float) -> str:
    return f"{100 * a:.1f}%"


def span(ts: list[float]) -> str:
    lo, hi = min(ts), max(ts)
    return f"{lo:.1f} s" if hi - lo < 0.05 else f"{lo:.1f}-{hi:.1f} s"


class RealRun:
    """Every method at every rate: zero-shot test accuracy, the short fine-tune's per
    seed, the MACs ratio (the same for all methods) and the prune times."""

    def __init__(self, s: RealSettings, full, data, n_train: int, clock: Clock) -> None:
        self.s, self.full, self.data, self.n_train, self.clock = s, full, data, n_train, clock
        self.calib = data.calibration_batches(s.bn_batches)
        self.base_macs = count_flops(full, data.shape)[0]
        self.arch = resolve_arch(REAL_CFG, "cifar10")
        self.ft_data = dataclasses.replace(data, train=subset(data.train, s.n_ft, seed=5),
                                           val=None)
        self.zero: dict[str, dict[float, float]] = {m: {} for m in s.methods}
        self.tuned: dict[str, dict[float, list[float]]] = {m: {} for m in s.methods}
        self.macs: dict[float, float] = {}
        self.prune_s: dict[str, list[float]] = {m: [] for m in s.methods}

    def one(self, method: str, rate: float) -> None:
        s, data = self.s, self.data
        widths = widths_for(self.arch.plan(), [rate] * self.arch.num_units)
        net, seconds = prune(self.full, self.arch, method, widths, self.calib,
                             self.calib[0][0][:1])
        self.prune_s[method].append(seconds)
        ratio = count_flops(net, data.shape)[0] / self.base_macs
        assert abs(self.macs.setdefault(rate, ratio) - ratio) < 1e-9, f"MACs differ at {rate}"
        line = f"rate {rate:<4} {method:<13} MACs {ratio:.3f}  prune {seconds:5.1f}s"
        if rate in s.rates:
            self.zero[method][rate] = evaluate(net, data.test)["acc"]
            line += f"  zero-shot {100 * self.zero[method][rate]:6.2f}%"
        if rate in s.ft_rates:
            start = copy.deepcopy(net.state_dict())
            self.tuned[method][rate] = []
            for seed in range(s.seeds):
                net.load_state_dict(start)
                fine_tune(net, self.ft_data, 1, seed)
                self.tuned[method][rate].append(evaluate(net, data.test)["acc"])
            line += "  fine-tuned " + ", ".join(f"{100 * a:.2f}%"
                                                for a in self.tuned[method][rate])
        print(f"[{self.clock()}] {line}", flush=True)

    def run(self) -> None:
        for rate in sorted(set(self.s.rates) | set(self.s.ft_rates), reverse=True):
            for method in self.s.methods:
                self.one(method, rate)

    def zero_shot_table(self) -> dict[str, float]:
        s, rates = self.s, self.s.rates
        rows = [("", [], "", "prune time here")]
        hv_zero = {}
        for m in s.methods:
            hv_zero[m] = hypervolume(*columns([(self.zero[m][r], self.macs[r]) for r in rates]))
            rows.append((LABELS[m], [pct(self.zero[m][r]) for r in rates], f"{hv_zero[m]:.3f}",
                         span(self.prune_s[m])))
        hv_table(rows, rates, f"zero-shot (BN recalibrated on {s.bn_batches} training batches "
                              f"of 128, no fine-tune), test accuracy:")
        return hv_zero

    def fine_tune_table(self) -> dict[str, list[float]]:
        s, ft_rates = self.s, self.s.ft_rates
        if not ft_rates:
            return {}
        hv_seed = {m: [hypervolume(*columns([(self.tuned[m][r][i], self.macs[r])
                                             for r in ft_rates])) for i in range(s.seeds)]
                   for m in s.methods}
        rows = [("", [], "", "hypervolume over seeds (min-max)")]
        for m in s.methods:
            cells = [pct(mean_sd(self.tuned[m][r])[0]) for r in ft_rates]
            rows.append((LABELS[m], cells, f"{mean_sd(hv_seed[m])[0]:.3f}",
                         f"{min(hv_seed[m]):.3f}-{max(hv_seed[m]):.3f}"))
        hv_table(rows, ft_rates,
                 f"after the short fine-tune (BN recalibrated, then one pass of SGD lr 0.01, "
                 f"momentum 0.9, weight decay 5e-4, batch 128, over the same {s.n_ft} of the "
                 f"{self.n_train} training images; {s.seeds} seed(s), each its own shuffle and "
                 f"augmentation), test accuracy (mean over seeds):")
        return hv_seed

    def ratio(self, hv_zero: dict[str, float], hv_seed: dict[str, list[float]]) -> None:
        s = self.s
        modes = [m for m in s.methods if m in MODES]
        if "tp_l1" not in s.methods or not modes:
            print("ratio=nan")
            return
        best0 = max(modes, key=lambda m: hv_zero[m])
        print(f"zero-shot: best mode {best0}, hypervolume / Torch-Pruning L1's = "
              f"{hv_zero[best0]:.4f} / {hv_zero['tp_l1']:.4f} = "
              f"{hv_zero[best0] / hv_zero['tp_l1']:.4f}")
        if not s.ft_rates:
            print(f"ratio={hv_zero[best0] / hv_zero['tp_l1']:.4f}")
            return
        best = max(modes, key=lambda m: mean_sd(hv_seed[m])[0])
        paired = [hv_seed[best][i] / hv_seed["tp_l1"][i] for i in range(s.seeds)]
        ratio = mean_sd(hv_seed[best])[0] / mean_sd(hv_seed["tp_l1"])[0]
        print(f"after the fine-tune: best mode {best}, hypervolume / Torch-Pruning L1's = "
              f"{mean_sd(hv_seed[best])[0]:.4f} / {mean_sd(hv_seed['tp_l1'])[0]:.4f} = "
              f"{ratio:.4f}; per seed (the same shuffles for every method): "
              + ", ".join(f"{r:.4f}" for r in paired)
              + f" (range {min(paired):.4f}-{max(paired):.4f} over {s.seeds} seed(s): the spread "
                f"the choice of {s.seeds} seed(s), {s.n_ft} fine-tune images and "
                f"{len(s.ft_rates)} rate(s) leaves)")
        print(f"ratio={ratio:.4f}")


def real_heading(what: str, before: float, after: float, no_adapt: bool, run: RealRun) -> None:
    n_test = len(run.data.test.index)
    accs = (f"test acc {pct(before)} (the network pruned here)" if no_adapt else
            f"test acc {pct(before)} before adaptation, {pct(after)} after (the network pruned "
            f"here)")
    print()
    print(f"{what}: {accs}; {n_test} test images, uniform rates, MACs ratios "
          + ", ".join(f"{r:g}: {run.macs[r]:.3f}" for r in sorted(run.macs, reverse=True)))
    print(f"(one accuracy on {n_test} test images has a sampling sd of at most "
          f"{50 / n_test ** 0.5:.2f} points)")


def run_real(args: argparse.Namespace) -> int:
    """The real benchmark: zero-shot and short-fine-tune tables on the JPEG CIFAR-10."""
    s = real_settings(args)
    root = Path(args.data_root).expanduser() if args.data_root else default_data_root()
    n_train = check_real_inputs(root, s.n_ft, s.n_adapt, s.n_test)
    require_torch_pruning()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    clock = Clock()
    data = load_data("folder", root / REAL_JPEG, input_size=32,
                     normalize=(IMAGENET_MEAN, IMAGENET_STD), batch_size=128, eval_batch_size=500,
                     val_fraction=0.0, seed=0)
    data.test = subset(data.test, s.n_test, seed=3)
    print(f"[{clock()}] JPEG CIFAR-10: {len(data.train.index)} training images, "
          f"{len(data.test.index)} test images; torch threads {torch.get_num_threads()}",
          flush=True)
    full, before, after, what = real_baseline(args, root, data, s, n_train, clock)
    run = RealRun(s, full, data, n_train, clock)
    run.run()
    real_heading(what, before, after, args.no_adapt, run)
    hv_zero = run.zero_shot_table()
    hv_seed = run.fine_tune_table()
    print()
    print(f"total time {clock()}")
    run.ratio(hv_zero, hv_seed)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("digits", "real"), default="digits",
                    help="digits (default: a ResNet-20 pretrained here) or real (the public "
                         "ResNet-56 on the JPEG CIFAR-10 copy)")
    ap.add_argument("--epochs", type=int, default=3,
                    help="digits: fine-tune epochs (a search trial's)")
    ap.add_argument("--seeds", type=int, default=None, help="default: 3 (digits), 2 (real)")
    ap.add_argument("--rates", default=None,
                    help=f"default: {','.join(map(str, RATES))} (digits), "
                         f"{','.join(map(str, REAL_RATES))} (real, zero-shot)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bn_batches", type=int, default=None, help="default: 8 (digits), 10 (real)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; digits default 1 (small 8x8 convolutions: more threads "
                         "gain little, and on a busy machine they wait on each other); real "
                         "default: one per CPU core")
    ap.add_argument("--work", "--work_dir", dest="work", default=None,
                    help="folder for the baseline (reused by a later run); default: a temporary "
                         "folder (digits), $XDG_CACHE_HOME or ~/.cache /sketchtune/pruning_quality "
                         "(real)")
    ap.add_argument("--pretrain_args", default="",
                    help="digits: extra `launch.py pretrain` options, e.g. '--num_epochs 20'")
    real = ap.add_argument_group("--data real")
    real.add_argument("--data_root", default=None,
                      help="the folder holding cifar10-jpg/ and pretrained/resnet56-4bfd9763.th "
                           "(default: ../shared/data beside the repository)")
    real.add_argument("--no_adapt", action="store_true",
                      help="prune the public network as it is (no adaptation to the JPEG images)")
    real.add_argument("--adapt_epochs", type=int, default=1)
    real.add_argument("--adapt_images", type=int, default=None,
                      help="training images of the adaptation (default: all)")
    real.add_argument("--adapt_lr", type=float, default=0.01)
    real.add_argument("--ft_rates", default=None,
                      help=f"rates fine-tuned (default {','.join(map(str, REAL_FT_RATES))}; '' for "
                           f"zero-shot only)")
    real.add_argument("--finetune_images", type=int, default=None,
                      help="training images of the short fine-tune, one pass (default 2000)")
    real.add_argument("--test_images", type=int, default=None,
                      help="a fixed random subset of the test split (default: all 10,000)")
    real.add_argument("--smoke", action="store_true",
                      help="a check in about a minute: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.data == "real":
            return run_real(args)
        args.seeds = 3 if args.seeds is None else args.seeds
        args.rates = args.rates or ",".join(map(str, RATES))
        args.bn_batches = 8 if args.bn_batches is None else args.bn_batches
        args.threads = 1 if args.threads is None else args.threads
        return run_digits(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
