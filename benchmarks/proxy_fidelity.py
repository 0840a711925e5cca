"""Does a search trial's short score rank rate vectors the way a full retrain does?

A task where the ranking is measurable (on digits it is not: 360 test images, and
every reasonable vector retrains to 97-98%): a generated ``teacher`` data set. Inputs
are smooth random images (``--size`` x ``--size``, ``--channels`` channels: noise at
half resolution, upsampled, plus fine noise); labels are the argmax of a fixed random
convolutional teacher (``--teacher_depth`` 3x3 conv + ReLU layers of
``--teacher_hidden`` channels, global average pool, linear), its logits standardised
per class so that the classes are about balanced. A one-layer teacher of 64 random
filters is learnable from 12,000 images yet needs many filters to imitate, so narrower
students end measurably lower. Training, validation and test images are generated
apart (``--n_train``, ``--n_val``, ``--n_test``); the large validation and test sets
measure accuracy to a fraction of a point. A CIFAR ResNet-20 baseline is trained on it
with ``sketch_core.training.loop.fit`` (the loop ``launch.py pretrain`` runs: SGD lr 0.1, decay
x0.1 at 1/2 and 3/4 of ``--pretrain_epochs``, best epoch on validation).

``--vectors`` random rate vectors (9 rates on the search's 0.05 grid: levels spread over
[``--low``, ``--high``], one uniform draw per equal stratum, each rate the level plus
uniform jitter of +-``--jitter``, clipped) are each scored

- by the search's trial recipe, ``search.run.trial.train_trial`` itself with the trial
  defaults of the search config (the sketch mode under test, BN recalibration on 8
  batches, a 3-epoch fine-tune at lr 0.01, validation accuracy of the last epoch;
  ``trial_data`` is pointed at the generated set), and
- by two full retrains with different seeds (the ``retrain`` recipe: the same sketch,
  BN recalibration, ``--retrain_epochs`` epochs at lr 0.01 decayed x0.1 at 1/3 and 2/3,
  as the original's 150 epochs decay at 50 and 100, best epoch on validation, then test
  accuracy).

Printed: per vector the MACs ratio, the trial score (and the score right after the
sketch and BN recalibration, before any fine-tune), both retrains' test accuracies;
then per mode the Spearman correlation of the trial scores with the retrains (mean of
the correlations with each retrain) with a bootstrap 90% interval over vectors, next to
the ceiling: the Spearman correlation between the two retrains. Last line
``ratio=<first mode's 3-epoch trial correlation / its ceiling>`` (goal >= 0.9). The
modes default to the search config's default ``sketch.mode``.

    pip install -e ".[bench]"
    python benchmarks/proxy_fidelity.py [--vectors 20] [--modes select,select_lsq]
        [--retrain_epochs 8] [--work DIR] [--smoke]

``--smoke`` shrinks everything (4 vectors, 1,024 training images, 2 pretrain epochs, one
retrain epoch) to a check of a minute; its figures mean nothing.

The defaults take about 25 minutes per mode on a 2-core CPU (one torch thread). A full
retrain in a real search is 150 epochs; here it is 8 (on a GPU, raise
``--retrain_epochs``, ``--n_train`` and ``--vectors``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from _common import Clock, bootstrap_interval, mean_sd, seeded, spearman

import search.run.trial as trainable
from search.experiment.config import SearchConfig, SketchConfig
from sketch_core.cost.flops import count_flops
from sketch_core.data.request import DataRequest
from sketch_core.data.sets import Data, TensorLoader
from sketch_core.options import SketchOptions
from sketch_core.plans import widths_for
from sketch_core.pruning.bn import recalibrate_bn
from sketch_core.pruning.prune import sketch
from sketch_core.registry import resolve_arch
from sketch_core.training.loop import evaluate, fit

CFG = "resnet20"
DATA_SET = "synthetic"  # the family (cifar) and name the generated set goes by
RETRAIN_BN_BATCHES = 8


def partial_spearman(a, b, given) -> float:
    """Spearman correlation of ``a`` and ``b`` with the ranks of ``given`` regressed out."""
    from scipy.stats import rankdata  # optional: the bench extra

    z = np.c_[np.ones(len(given)), rankdata(given)]

    def residual(x):
        r = rankdata(x)
        return r - z @ np.linalg.lstsq(z, r, rcond=None)[0]

    ea, eb = residual(a), residual(b)
    den = math.sqrt(float(ea @ ea) * float(eb @ eb))
    return float(ea @ eb) / den if den > 0 else math.nan


def teacher_task(n: int, size: int, channels: int, classes: int, seed: int, depth: int = 1,
                 hidden: int = 64):
    """(x, y): ``n`` smooth random images labelled by a fixed random conv network: ``depth``
    3x3 conv + ReLU layers of ``hidden`` channels, global average pool, linear."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, max(1, size // 2), max(1, size // 2), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(n, channels, size, size, generator=g)
    x = (x - x.mean()) / x.std()
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1), nn.ReLU()]
        teacher = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(hidden, classes)).eval()
    with torch.no_grad():
        logits = torch.cat([teacher(x[i:i + 4096]) for i in range(0, n, 4096)])
    logits = (logits - logits.mean(0)) / logits.std(0)
    return x, logits.argmax(1)


def teacher_data(args, seed: int = 0):
    """The generated set as a ``sketch_core.data.sets.Data``: training, validation (generated
    apart from the training images, so its size is free) and test splits; no augmentation,
    which would change the teacher's labels."""
    n_tr, n_va = args.n_train, args.n_val
    x, y = teacher_task(n_tr + n_va + args.n_test, args.size, args.channels, args.classes,
                        args.task_seed, args.teacher_depth, args.teacher_hidden)
    common = dict(mean=(0.0,), std=(1.0,), seed=seed)
    train = TensorLoader(x[:n_tr], y[:n_tr], batch_size=128, shuffle=True, **common)
    val = TensorLoader(x[n_tr:n_tr + n_va], y[n_tr:n_tr + n_va], batch_size=256, **common)
    test = TensorLoader(x[n_tr + n_va:], y[n_tr + n_va:], batch_size=256, **common)
    cperm = torch.randperm(n_tr, generator=torch.Generator().manual_seed(seed + 1))
    calib = TensorLoader(x[:n_tr][cperm], y[:n_tr][cperm], batch_size=128, **common)
    return Data("teacher", "cifar", args.classes, args.channels, args.size, train, val, test, calib)


def random_vectors(k: int, low: float, high: float, jitter: float, seed: int,
                   units: int = 9, step: float = 0.05) -> list[list[float]]:
    """``k`` vectors: levels stratified over [low, high] (one uniform draw in each of ``k``
    equal strata, shuffled), each rate the level plus uniform jitter, on the grid."""
    rng = np.random.default_rng(seed)
    levels = low + (high - low) * (np.arange(k) + rng.uniform(size=k)) / k
    out = []
    for level in rng.permutation(levels):
        rates = np.clip(level + rng.uniform(-jitter, jitter, units), low, high)
        out.append([round(round(r / step) * step, 4) for r in rates])
    return out


def pretrain(args, data, work: Path, clock: Clock):
    """The baseline's state dict, trained once per task and kept in ``work``."""
    key = hashlib.sha1(json.dumps([args.n_train, args.n_val, args.size, args.channels,
                                   args.classes, args.task_seed, args.teacher_depth,
                                   args.teacher_hidden, args.pretrain_epochs]
                                  ).encode()).hexdigest()[:12]
    path = work / f"baseline-{key}.pt"
    seeded(0)  # the initial weights: torch's own generator starts at a random seed
    model = arch_of(args).build(None, args.classes, args.channels)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        print(f"[{clock()}] pretraining the {CFG} baseline, {args.pretrain_epochs} epochs",
              flush=True)
        e = args.pretrain_epochs
        seeded(0)
        res = fit(model, data, epochs=e, lr=0.1, lr_decay_step=[e // 2, (3 * e) // 4],
                  seed=0, progress=False)
        model.load_state_dict(res.best_state)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    model.eval()
    acc = evaluate(model, data.test)
    print(f"[{clock()}] baseline: test acc {100 * acc['acc']:.2f}% on {acc['n']} images "
          f"({args.classes} classes, chance {100 / args.classes:.0f}%)", flush=True)
    return model, key


def arch_of(args):
    """The CIFAR ResNet-20 at the generated images' size and channels."""
    return resolve_arch(CFG, DATA_SET, input_size=args.size, in_channels=args.channels)


def split_mode(name: str) -> tuple[str, str]:
    """``select`` -> (select, filters); ``select:channels`` -> (select, channels)."""
    mode, _, select_by = name.partition(":")
    return mode, select_by or "filters"


def retrain(full, arch, rates, mode, data, epochs: int, seed: int, bn_batches: int) -> float:
    """The retrain recipe: sketch, recalibrate BN, fine-tune, best on val; test accuracy."""
    calib = data.calibration_batches(bn_batches)
    mode, select_by = split_mode(mode)
    net = sketch(full, arch, widths_for(arch.plan(), rates),
                 SketchOptions(mode=mode, select_by=select_by), batches=calib, seed=0)
    recalibrate_bn(net, calib)
    data.train.seed = seed
    seeded(seed)
    res = fit(net, data, epochs=epochs, lr=0.01, momentum=0.9, weight_decay=5e-4,
              lr_decay_step=[epochs // 3, (2 * epochs) // 3], seed=seed, progress=False)
    net.load_state_dict(res.best_state)
    data.train.seed = 0
    return evaluate(net, data.test)["acc"]


class RetrainCache:
    """Retrain results by (mode, rates, epochs, seed) in a JSON file beside the baseline (one
    per mode), so a second run (another trial recipe) retrains only what it has not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, fn, mode: str, rates: list[float], epochs: int, seed: int) -> float:
        key = json.dumps([mode, rates, epochs, seed])
        if key not in self.data:
            self.data[key] = fn()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=0))
            tmp.replace(self.path)
        return self.data[key]


def trial_config(overrides: list[str]):
    """The search config's trial defaults with ``KEY=VALUE`` overrides (YAML values)."""
    t = SearchConfig().trial
    names = set(type(t).model_fields)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--trial {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(names))}")
        t = t.model_copy(update={key: yaml.safe_load(value)})
    return t


SMOKE = dict(vectors=4, n_train=1024, n_val=512, n_test=512, pretrain_epochs=2,
             retrain_epochs=1, boot=200)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=20)
    ap.add_argument("--modes", default=None,
                    help="comma-separated sketch modes, each optionally MODE:SELECT_BY (e.g. "
                         "select:channels); default: the search config's default")
    ap.add_argument("--n_train", type=int, default=12000)
    ap.add_argument("--n_val", type=int, default=10000, help="the trials' validation images")
    ap.add_argument("--n_test", type=int, default=10000)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--task_seed", type=int, default=0)
    ap.add_argument("--teacher_depth", type=int, default=1)
    ap.add_argument("--teacher_hidden", type=int, default=64)
    ap.add_argument("--pretrain_epochs", type=int, default=20)
    ap.add_argument("--retrain_epochs", type=int, default=8)
    ap.add_argument("--low", type=float, default=0.2, help="the search space's default low")
    ap.add_argument("--high", type=float, default=1.0)
    ap.add_argument("--jitter", type=float, default=0.15)
    ap.add_argument("--trial", action="append", default=[], metavar="KEY=VALUE",
                    help="change the trial recipe (the search config's trial section), e.g. "
                         "--trial lr_decay_step=[2]; repeatable")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; default 1 (small 8x8 convolutions: more threads gain "
                         "little, and on a busy machine they wait on each other)")
    ap.add_argument("--work", default=None, help="folder to keep the baseline in (reused)")
    ap.add_argument("--smoke", action="store_true", help="a check in about a minute: "
                    + ", ".join(f"{k} {v}" for k, v in SMOKE.items()))
    args = ap.parse_args()
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    return args


def trial_setup(args, mode: str, t, key: str, full) -> trainable.TrialSetup:
    """A search trial's setup on the generated set: the config's sketch section in
    ``mode`` (BN recalibrated as it says), the trial recipe ``t``."""
    mode_name, select_by = split_mode(mode)
    macs, params = count_flops(full, (args.channels, args.size, args.size))
    return trainable.TrialSetup(
        arch=arch_of(args), data=DataRequest(data_set=DATA_SET),  # trial_data is replaced
        options=SketchConfig(mode=mode_name, select_by=select_by).options(),
        recipe=t.recipe(), num_classes=args.classes, in_channels=args.channels,
        threads=args.threads, baseline_key=key, baseline_flops=macs, baseline_params=params)


def score_mode(args, mode: str, t, vectors, data, full, key: str, work: Path,
               clock: Clock) -> np.ndarray:
    """Per vector: MACs ratio, trial score after the sketch, trial score, two retrains."""
    cache = RetrainCache(work / f"retrains-{key}-{mode.replace(':', '-')}.json")
    setup = trial_setup(args, mode, t, key, full)
    baseline_state = {k: v.clone() for k, v in full.state_dict().items()}
    rows = []
    for i, rates in enumerate(vectors):
        reports: list[dict] = []
        trainable.train_trial(rates, setup, baseline_state, lambda m, _s: reports.append(m))
        last = reports[-1]
        if last.get("failed"):
            raise SystemExit(f"trial failed: {last.get('error')}")
        r1, r2 = (cache.get(lambda s=s: retrain(full, setup.arch, rates, mode, data,
                                                args.retrain_epochs, s, RETRAIN_BN_BATCHES),
                            mode, rates, args.retrain_epochs, s) for s in (1, 2))
        rows.append((last["flops_ratio"], last["val_acc_sketched"], last["val_acc"], r1, r2))
        print(f"[{clock()}] {mode} {i + 1:>2}/{len(vectors)} rates {rates}  MACs "
              f"{last['flops_ratio']:.3f}  trial: sketched {100 * last['val_acc_sketched']:5.1f}%"
              f" -> {100 * last['val_acc']:5.1f}%  retrains {100 * r1:5.2f}% {100 * r2:5.2f}%",
              flush=True)
        torch.set_num_threads(args.threads)  # a trial sets its own thread count
    return np.array(rows)


def correlation(arr: np.ndarray, idx, col, partial: bool) -> float:
    """Spearman (``partial``: given the MACs ratio) of column ``col`` with the retrains
    (mean over the two), or of the two retrains (``col`` ``"ceiling"``)."""
    f = partial_spearman if partial else (lambda a, b, _z: spearman(a, b))
    if col == "ceiling":
        return f(arr[idx, 3], arr[idx, 4], arr[idx, 0])
    return 0.5 * (f(arr[idx, col], arr[idx, 3], arr[idx, 0])
                  + f(arr[idx, col], arr[idx, 4], arr[idx, 0]))


def mode_table(mode: str, arr: np.ndarray, t, boot: int) -> float:
    """One mode's rows of the table; its trial / ceiling ratio."""
    n = len(arr)
    everything = np.arange(n)
    scores = ((2, f"trial ({t.epochs} epochs)"), (1, "sketched + BN (0 epochs)"),
              (0, "MACs ratio alone"), ("ceiling", "ceiling: retrain vs retrain"))
    for col, label in scores:
        c = correlation(arr, everything, col, False)
        iv = bootstrap_interval(lambda idx: correlation(arr, idx, col, False), n, boot=boot)
        if col == 0:  # MACs given MACs: nothing left
            tail = f"{'':>10} {'':>16}"
        else:
            pc = correlation(arr, everything, col, True)
            piv = bootstrap_interval(lambda idx: correlation(arr, idx, col, True), n, boot=boot)
            tail = f"{pc:10.3f} {piv[0]:7.3f} .. {piv[1]:5.3f}"
        print(f"{mode:<11} {label:<28} {c:8.3f} {iv[0]:7.3f} .. {iv[1]:5.3f}  {tail}")
    ratio = correlation(arr, everything, 2, False) / correlation(arr, everything, "ceiling", False)
    partial_ratio = (correlation(arr, everything, 2, True)
                     / correlation(arr, everything, "ceiling", True))
    print(f"{mode:<11} trial / ceiling: {ratio:.3f} (given MACs: {partial_ratio:.3f}); retrain "
          f"test acc {100 * arr[:, 3].min():.1f}..{100 * arr[:, 3].max():.1f}% (sd "
          f"{100 * mean_sd(arr[:, 3])[1]:.2f}), |retrain 1 - retrain 2| mean "
          f"{100 * np.abs(arr[:, 3] - arr[:, 4]).mean():.2f} points")
    return ratio


def report(args, t, results: dict[str, np.ndarray], modes: list[str], clock: Clock) -> None:
    print()
    print(f"teacher task ({args.n_train} train, {args.n_test} test, {args.channels}x{args.size}"
          f"x{args.size}), {CFG}; {args.vectors} vectors, trial = {t.epochs}-epoch fine-tune at "
          f"lr {t.lr} (decay at {list(t.lr_decay_step)}), val acc; retrain = "
          f"{args.retrain_epochs} epochs, test acc, 2 seeds")
    print("Spearman correlation with the two retrains' test accuracies (mean of the two), and "
          "partial Spearman given the MACs ratio (how well it ranks vectors of equal cost); "
          "bootstrap 90% intervals over vectors")
    print(f"{'mode':<11} {'score':<28} {'Spearman':>8} {'90% interval':>16}  "
          f"{'given MACs':>10} {'90% interval':>16}")
    ratios = {mode: mode_table(mode, arr, t, args.boot) for mode, arr in results.items()}
    print(f"total time {clock()}")
    print(f"ratio={ratios.get(modes[0], math.nan):.4f}")


def main() -> int:
    args = parse_args()
    t = trial_config(args.trial)
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",") if args.modes else [SearchConfig().sketch.mode]
    clock = Clock()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="proxy_fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    data = teacher_data(args)
    counts = torch.bincount(data.test.y, minlength=args.classes).tolist()
    print(f"[{clock()}] teacher task: {args.n_train} training, {args.n_val} validation, "
          f"{args.n_test} test images, {args.channels}x{args.size}x{args.size}, test class "
          f"counts {counts}", flush=True)
    full, key = pretrain(args, data, work, clock)
    # the trial recipe, exactly as a search trial runs it, on the generated set
    trainable.trial_data = lambda setup, device: data
    vectors = random_vectors(args.vectors, args.low, args.high, args.jitter, seed=1)
    results = {mode: score_mode(args, mode, t, vectors, data, full, key, work, clock)
               for mode in modes}
    report(args, t, results, modes, clock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
