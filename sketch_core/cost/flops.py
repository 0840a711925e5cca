"""FLOPs (multiply-accumulates of conv and linear layers) and parameter counts.

Convention: ``flops`` everywhere in sketchtune means MACs of Conv2d and Linear layers
at the data set's input size; params are all learnable parameters. Counting runs the
model on the ``meta`` device: shapes only, no memory, no arithmetic, so ResNet-152
counts in milliseconds. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs
per MAC: halve it to cross-check.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn

from sketch_core.registry import CfgLike, resolve_arch

__all__ = ["count_flops", "count_arch", "input_shape", "module_shapes"]


def _on_meta(model: nn.Module) -> nn.Module:
    if all(p.device.type == "meta" for p in model.parameters()):
        return model
    clone = copy.deepcopy(model, memo={id(t): torch.empty_like(t, device="meta")
                                       for t in list(model.parameters()) + list(model.buffers())})
    return clone


def _run_hooked(meta: nn.Module, hooks: dict[nn.Module, Callable], input_size: Sequence[int]
                ) -> None:
    """One eval-mode forward pass of one meta input with a forward hook on each module."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    was_training = meta.training
    try:
        meta.eval()
        with torch.no_grad():
            meta(torch.empty(1, *input_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
        meta.train(was_training)


def count_flops(model: nn.Module, input_size: Sequence[int]) -> tuple[int, int]:
    """(MACs, params) of ``model`` for one input of shape ``input_size`` = (C, H, W)."""
    params = sum(p.numel() for p in model.parameters())
    meta = _on_meta(model)
    macs = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            macs += out.numel() // out.shape[0] * per_out
        elif isinstance(mod, nn.Linear):
            macs += out.numel() // out.shape[0] * mod.in_features

    _run_hooked(meta, {m: hook for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))},
                input_size)
    return int(macs), int(params)


def module_shapes(model: nn.Module, paths: Collection[str], input_size: Sequence[int]
                  ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape), without the batch, of each module named in ``paths``.

    Shapes at the module's first call in one forward pass of one input of shape
    ``input_size`` = (C, H, W), run on the meta device.
    """
    meta = _on_meta(model)
    mods = dict(meta.named_modules())
    missing = sorted(set(paths) - set(mods))
    if missing:
        raise ValueError(f"the model has no module named {', '.join(missing)}")
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(path: str):
        def record(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            seen.setdefault(path, (tuple(inp[0].shape[1:]), tuple(out.shape[1:])))
        return record

    _run_hooked(meta, {mods[p]: hook(p) for p in paths}, input_size)
    return seen


def input_shape(family: str, in_channels: int = 3, input_size: int | None = None) -> tuple[int, int, int]:
    size = input_size or (224 if family == "imagenet" else 32)
    return (in_channels, size, size)


def count_arch(cfg: CfgLike, data_set: str = "cifar10", widths: list[int] | None = None,
               num_classes: int | None = None, in_channels: int = 3,
               input_size: int | None = None) -> tuple[int, int]:
    """(MACs, params) of an architecture (a name or an :class:`Arch`) at some widths.

    Built on the meta device, at ``input_size`` or the architecture's input size.
    """
    entry = resolve_arch(cfg, data_set, input_size=input_size)
    with torch.device("meta"):
        model = entry.build(widths, num_classes, in_channels)
    return count_flops(model, input_shape(entry.family, in_channels, entry.input_size))
