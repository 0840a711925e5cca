"""``launch.py export``: a sketchtune checkpoint to ONNX or a ``torch.export`` program.

Writes the file (see :mod:`sketch_core.io.export` for what it holds), runs it on a fixed
seeded batch and prints the largest absolute difference of its logits from PyTorch's.
"""

from __future__ import annotations

import argparse
import json

from sketch_core.io.export import FORMATS, export_checkpoint

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser, command: str = "export") -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a sketchtune checkpoint (a sketch run's model_best.pt, a retrained model.pt)")
    p.add_argument("--to", required=True, help=f"format: {' or '.join(FORMATS)}")
    p.add_argument("--out", default=None,
                   help="output file (default: the checkpoint's name with .onnx or .pt2)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the exported graph (default 1)")
    p.add_argument("--dynamic_batch", action="store_true", help="let the graph take any batch size")
    p.add_argument("--input_size", type=int, default=None,
                   help="input height/width (default: the checkpoint's, else 32 CIFAR / 224 ImageNet)")
    p.add_argument("--force", action="store_true", help="replace --out when it exists")


def run(args: argparse.Namespace) -> int:
    res = export_checkpoint(args.checkpoint, to=args.to, out=args.out, batch=args.batch,
                            dynamic_batch=args.dynamic_batch, force=args.force,
                            input_size=args.input_size)
    meta = res.metadata
    batch = "N" if meta["batch"] == "dynamic" else meta["batch"]
    print(f"wrote {res.path} ({res.format}; {meta['family']} {meta['cfg']}, input "
          f"{batch}x{'x'.join(map(str, json.loads(meta['input_shape'])))}, "
          f"normalised input, normalize from {meta['normalize_source']})")
    print(f"max abs logit difference vs PyTorch: {res.max_abs_diff:.3g}")
    return 0
