"""Whole-model sketch time vs one exact thin SVD of every matrix the sketch reads.

For ImageNet ResNet-50 at [0.5]*16 and CIFAR ResNet-56 at [0.5]*27 (random weights: the
cost does not depend on the values), time ``sketch_core.pruning.prune.sketch`` (mode ``sketch``: every
filter sketch and channel sketch, model rebuild included) and, in the same run,
``torch.linalg.svd(A, full_matrices=False)`` of every matrix the sketch decomposes.
Last line: ``ratio=<sketch time / SVD time for ResNet-50>``; goal <= 1.0.
``--device cuda`` runs both on the GPU (the weights and matrices moved there first,
the device synchronised before each clock read).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import ROOT  # noqa: F401  (puts the repository on sys.path)

from sketch_core.options import SketchOptions
from sketch_core.plans import widths_for
from sketch_core.pruning.prune import sketch
from sketch_core.registry import resolve_arch

OPTIONS = SketchOptions(mode="sketch")


def matrices(model, arch, widths):
    """The matrices the sketch decomposes: filter matrices and transposed channel blocks."""
    plan = arch.plan()
    state = model.state_dict()
    pruned = {s for s, w in enumerate(widths) if w < plan.slots[s].n}
    out = []
    for spec in plan.modules:
        if spec.kind == "bn":
            continue
        w = state[spec.path + ".weight"]
        if spec.out_slot in pruned:
            out.append(w.reshape(w.shape[0], -1))
        off = 0
        for seg in spec.inputs:
            span = seg.n * seg.repeat
            if seg.slot in pruned:
                part = w.narrow(1, off, span).transpose(0, 1)
                out.append(part.reshape(seg.n, -1))
            off += span
    return out


def best_of(fn, repeat, device):
    """The fastest of ``repeat`` runs after one warm-up run (kernel loading, solver handles)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ratios = {}
    for cfg, data_set, rates in (("resnet56", "cifar10", [0.5] * 27), ("resnet50", "imagenet", [0.5] * 16)):
        arch = resolve_arch(cfg, data_set)
        widths = widths_for(arch.plan(), rates, OPTIONS.sketch_lastconv)
        model = arch.build().eval().to(device)
        mats = matrices(model, arch, widths)
        t_sketch = best_of(lambda: sketch(model, arch, widths, OPTIONS), args.repeat, device)
        t_svd = best_of(lambda: [torch.linalg.svd(m, full_matrices=False) for m in mats],
                        args.repeat, device)
        ratios[cfg] = t_sketch / t_svd
        print(f"{data_set:9} {cfg:9} {len(mats):3d} matrices  sketch {t_sketch:7.3f} s  "
              f"thin SVD {t_svd:7.3f} s  ratio {ratios[cfg]:.3f}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, threads={torch.get_num_threads()}"
    print(f"device: {where}")
    print(f"ratio={ratios['resnet50']:.3f}")


if __name__ == "__main__":
    main()
