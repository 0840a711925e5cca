"""Adaptive BN: recompute batch-norm running statistics from a few batches.

After sketching, the statistics that BN layers hold no longer describe their inputs;
evaluating before recomputing them measures nothing. :func:`recalibrate_bn` resets
every BN layer and averages exact batch statistics over the given batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, device: torch.device | str | None = None,
                   max_batches: int | None = None) -> int:
    """Recompute every BN layer's running mean/var; returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    device = device or next(model.parameters()).device
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    used = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device, non_blocking=True))
            used += 1
            if max_batches is not None and used >= max_batches:
                break
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    return used
