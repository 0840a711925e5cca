"""Pruning quality at equal widths: the three sketch modes against Torch-Pruning's L1.

Digits (scikit-learn's 8x8 images), a CIFAR ResNet-20 pretrained by the project's own
``launch.py pretrain`` (digits defaults), uniform rates 0.9 0.7 0.5 0.4 0.3 0.2 0.1.
Each rate vector is pruned by

- ``sketch``, ``select``, ``select_lsq`` (``sketch_core.sketch`` in that mode; the
  selection modes rank by the producer's filters, ``select_by="filters"``),
- ``select_ch``, ``select_lsq_ch``: the same two modes with ``select_by="channels"``
  (each channel's weights in its consumers, scaled by its BN gain), and
- ``tp_l1``: Torch-Pruning's L1 magnitude pruning (``MagnitudeImportance(p=1)`` on each
  dependency group, the lowest-scoring channels removed through its ``DependencyGraph``),
  restricted to the same block-internal channels: only each block's conv1 (with its BN
  and conv2's inputs), to exactly the widths ``rates_to_widths`` gives;

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
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from _common import Clock, hypervolume, mean_sd, pretrained, seeded

# method -> (sketch mode, select_by)
MODES = {"sketch": ("sketch", "filters"), "select": ("select", "filters"),
         "select_lsq": ("select_lsq", "filters"), "select_ch": ("select", "channels"),
         "select_lsq_ch": ("select_lsq", "channels")}
METHODS = tuple(MODES) + ("tp_l1",)
RATES = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1)
CFG = "resnet20"


def tp_l1(model, cfg: str, rates: list[float], data_set: str, example):
    """Torch-Pruning's L1 magnitude pruning of each plan slot's producer, to our widths."""
    import torch_pruning as tp

    from sketch_core import get_arch, rates_to_widths

    plan = get_arch(cfg, data_set).plan()
    widths = rates_to_widths(cfg, rates, data_set)
    net = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    importance = tp.importance.MagnitudeImportance(p=1)
    for slot, width in zip(plan.slots, widths):
        conv = net.get_submodule(slot.producer)
        n = conv.out_channels
        if width >= n:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
        scores = importance(group)
        drop = scores.argsort()[: n - width].tolist()
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
    return net


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (a search trial's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bn_batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; default 1 (small 8x8 convolutions: more threads gain "
                         "little, and on a busy machine they wait on each other)")
    ap.add_argument("--work", default=None,
                    help="folder for the pretrained baseline (reused by a later run); "
                         "default: a temporary folder")
    ap.add_argument("--pretrain_args", default="",
                    help="extra `launch.py pretrain` options, e.g. '--num_epochs 20'")
    args = ap.parse_args()
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise SystemExit("torch-pruning is missing: pip install -e \".[bench]\"")
    import torch

    from sketch_core import (count_flops, get_arch, load_checkpoint, rates_to_widths, recalibrate_bn,
                             sketch)
    from sketch_core.data import load_data
    from sketch_core.train import evaluate, fit

    if args.threads:
        torch.set_num_threads(args.threads)
    rates = [float(r) for r in args.rates.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
    clock = Clock()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="pruning_quality-")
        work = Path(tmp.name)
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    pre_argv = ["--data_set", "digits", "--arch", "resnet", "--cfg", CFG, *args.pretrain_args.split()]
    print(f"[{clock()}] pretraining {CFG} on digits: launch.py pretrain {' '.join(pre_argv)}",
          flush=True)
    ckpt = pretrained(work, pre_argv)
    full = load_checkpoint(ckpt).model.eval()
    data = load_data("digits", batch_size=128, val_fraction=0.1, seed=0)
    calib = data.calibration_batches(args.bn_batches)
    base_macs = count_flops(full, data.shape)[0]
    base = evaluate(full, data.test)
    base_acc = base["acc"]
    print(f"[{clock()}] baseline: test acc {100 * base_acc:.2f}% ({base['n']} test images), "
          f"{base_macs / 1e6:.2f}M MACs", flush=True)
    plan = get_arch(CFG, "digits").plan()
    example = calib[0][0][:1]

    # acc[method][rate][seed][e] = test accuracy after e fine-tune epochs (e = 0: after BN)
    acc: dict[str, dict[float, list[list[float]]]] = {m: {} for m in methods}
    macs_ratio: dict[str, dict[float, float]] = {m: {} for m in methods}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for rate in rates:
        vec = [rate] * 9
        widths = rates_to_widths(CFG, vec, "digits")
        for method in methods:
            t0 = time.perf_counter()
            if method == "tp_l1":
                net = tp_l1(full, CFG, vec, "digits", example)
            else:
                mode, select_by = MODES[method]
                net = sketch(full, CFG, vec, "digits", mode=mode, select_by=select_by,
                             batches=calib)
            t_prune = time.perf_counter() - t0
            got = [net.get_submodule(s.producer).out_channels for s in plan.slots]
            assert got == widths, f"{method} at {rate}: widths {got}, expected {widths}"
            recalibrate_bn(net, calib)
            macs_ratio[method][rate] = count_flops(net, data.shape)[0] / base_macs
            acc_bn = evaluate(net, data.test)["acc"]
            start = copy.deepcopy(net.state_dict())
            acc[method][rate] = []
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                net.load_state_dict(start)
                seeded(seed)
                data.train.seed = seed  # the fine-tune's shuffle and augmentation; same split
                curve = [acc_bn]
                fit(net, data, epochs=args.epochs, lr=0.01, momentum=0.9, weight_decay=5e-4,
                    lr_decay_step=[], seed=seed, progress=False,
                    on_epoch=lambda e, _m, net=net, curve=curve:
                        curve.append(evaluate(net, data.test)["acc"]))
                acc[method][rate].append(curve)
            t_epoch = (time.perf_counter() - t0) / max(1, args.seeds * args.epochs)
            times[method].append((t_prune, t_epoch))
            m, sd = mean_sd([c[-1] for c in acc[method][rate]])
            print(f"[{clock()}] rate {rate:<4} {method:<10} widths {widths}  MACs "
                  f"{macs_ratio[method][rate]:.3f}  after BN {100 * acc_bn:6.2f}%  after "
                  f"fine-tune {100 * m:6.2f}% (sd {100 * sd:.2f})  prune {t_prune:.1f}s, "
                  f"fine-tune {t_epoch:.1f}s/epoch", flush=True)

    # every method prunes to the same widths: the same MACs
    for rate in rates:
        ratios = {round(macs_ratio[m][rate], 9) for m in methods}
        assert len(ratios) == 1, f"methods differ in MACs at rate {rate}: {ratios}"

    E = args.epochs
    print()
    print(f"digits, {CFG} (baseline test acc {100 * base_acc:.2f}%), uniform rates, BN "
          f"recalibrated on {args.bn_batches} batches, then a {E}-epoch fine-tune, "
          f"{args.seeds} seeds; test accuracy % (mean over seeds)")
    print(f"{'rate':>5} {'MACs':>6} | " + " | ".join(f"{m:>19}" for m in methods))
    print(f"{'':>5} {'ratio':>6} | " + " | ".join(f"{'BN':>7} {'fine-tuned':>11}" for _ in methods))
    for rate in rates:
        cells = []
        for m in methods:
            runs = acc[m][rate]
            cells.append(f"{100 * runs[0][0]:7.2f} {100 * mean_sd([c[-1] for c in runs])[0]:11.2f}")
        print(f"{rate:>5} {macs_ratio[methods[0]][rate]:6.3f} | " + " | ".join(cells))

    def hv(m: str, seed: int, e: int) -> float:
        return hypervolume([(acc[m][r][seed][e], macs_ratio[m][r]) for r in rates])

    print()
    print("hypervolume of (accuracy, MACs ratio), reference (0, 1), after e fine-tune epochs "
          "(mean over seeds; sd in brackets); pruning time and time per fine-tune epoch")
    print(f"{'method':<13} " + " ".join(f"{f'e={e}':>16}" for e in range(E + 1))
          + f" {'prune s':>8} {'s/epoch':>8}")
    hvs = {m: [mean_sd([hv(m, s, e) for s in range(args.seeds)]) for e in range(E + 1)]
           for m in methods}
    for m in methods:
        t_prune = mean_sd([t[0] for t in times[m]])[0]
        t_epoch = mean_sd([t[1] for t in times[m]])[0]
        print(f"{m:<13} " + " ".join(f"{v:8.4f} ({sd:.4f})" for v, sd in hvs[m])
              + f" {t_prune:8.2f} {t_epoch:8.2f}")
    print(f"total time {clock()}")
    modes = [m for m in methods if m in MODES]
    if "tp_l1" not in methods or not modes:
        print("ratio=nan")
        return 0
    for e in range(E + 1):
        best = max(modes, key=lambda m: hvs[m][e][0])
        print(f"after {e} epoch(s): best mode {best}, hypervolume / Torch-Pruning L1's = "
              f"{hvs[best][e][0]:.4f} / {hvs['tp_l1'][e][0]:.4f} = "
              f"{hvs[best][e][0] / hvs['tp_l1'][e][0]:.4f}")
    best = max(modes, key=lambda m: hvs[m][E][0])
    # seed s fine-tunes every method with the same shuffles and augmentation: a paired ratio
    paired = [hv(best, s, E) / hv("tp_l1", s, E) for s in range(args.seeds)]
    print(f"{best} / Torch-Pruning L1 per seed after {E} epoch(s): "
          + ", ".join(f"{r:.4f}" for r in paired)
          + f" (mean {mean_sd(paired)[0]:.4f}, sd {mean_sd(paired)[1]:.4f})")
    print(f"ratio={hvs[best][E][0] / hvs['tp_l1'][E][0]:.4f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
