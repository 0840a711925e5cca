"""Least-squares refit of narrowed consumers (``--sketch_mode select_lsq``).

After ``select`` keeps a subset of each producer's filters, every consumer that lost
input channels is refit so that its output (before its BN) matches the unpruned
network's on a few training batches. For a conv the kept input channels are unfolded
into patches; the solve is a ridge regression in float64, pulled towards the plain
subset weights, so a layer with too few samples stays close to ``select``. A layer
whose solve is ill-conditioned, or whose refit does not reduce the error, keeps the
plain subset and says so in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .plans import Plan

__all__ = ["refit_consumers"]

log = logging.getLogger("sketchtune.lsq")

MAX_ROWS = 16384      # sampled patches per consumer
RIDGE = 1e-3          # relative to the mean diagonal of X^T X
MAX_COND = 1e12


def _patches(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows = samples, columns = the module's inputs per output position."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _outputs(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1]) if y.dim() == 2 else y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _capture(model: nn.Module, path: str, batches: list[torch.Tensor], want: str) -> list[torch.Tensor]:
    mod = model.get_submodule(path)
    got: list[torch.Tensor] = []

    def hook(m, inp, out):
        got.append((inp[0] if want == "in" else out).detach())
        raise _Stop

    h = mod.register_forward_hook(hook)
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


class _Stop(Exception):
    pass


@torch.no_grad()
def refit_consumers(narrow: nn.Module, full: nn.Module, plan: Plan, widths: list[int],
                    batches: Iterable, indices: dict[int, torch.Tensor], *, max_batches: int = 4, seed: int = 0,
                    log_lines: list[str] | None = None) -> int:
    """Refit every consumer of a narrowed slot in ``narrow``; returns how many were refit.

    ``indices`` maps each narrowed slot to the filters ``select`` kept.
    """
    pruned = {s for s, w in enumerate(widths) if w < plan.slots[s].n}
    consumers = [m for m in plan.modules if m.kind in ("conv", "linear")
                 and any(seg.slot in pruned for seg in m.inputs)]
    if not consumers:
        return 0
    device = next(narrow.parameters()).device
    xs = []
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        xs.append((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    if not xs:
        from .errors import UserError
        raise UserError("--sketch_mode select_lsq needs training batches; the data set gave none")
    modes = (narrow.training, full.training)
    narrow.eval(), full.eval()
    gen = torch.Generator().manual_seed(seed)
    refit = 0
    try:
        for spec in consumers:
            mod = narrow.get_submodule(spec.path)
            full_mod = full.get_submodule(spec.path)
            x = torch.cat([_patches(mod, t) for t in _capture(narrow, spec.path, xs, "in")])
            y = torch.cat([_outputs(t) for t in _capture(full, spec.path, xs, "out")])
            if full_mod.bias is not None:
                y = y - full_mod.bias
            if spec.out_slot in pruned:  # this consumer is itself narrowed: match kept outputs only
                y = y[:, indices[spec.out_slot].to(y.device)]
            if x.shape[0] > MAX_ROWS:
                pick = torch.randperm(x.shape[0], generator=gen)[:MAX_ROWS].to(device)
                x, y = x[pick], y[pick]
            msg = _solve(mod, x.double(), y.double())
            if msg:
                line = f"select_lsq: {spec.path}: {msg}; keeping the plain subset"
                log.warning(line)
                if log_lines is not None:
                    log_lines.append(line)
            else:
                refit += 1
    finally:
        narrow.train(modes[0]), full.train(modes[1])
    return refit


def _solve(mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    w0 = mod.weight.reshape(mod.weight.shape[0], -1).double()      # out x in
    gram = x.T @ x
    lam = RIDGE * float(gram.diagonal().mean().clamp_min(1e-12))
    a = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    b = x.T @ y + lam * w0.T
    try:
        evals = torch.linalg.eigvalsh(a)
        cond = float(evals[-1] / evals[0].clamp_min(1e-300))
        if not torch.isfinite(evals).all() or cond > MAX_COND:
            return f"ill-conditioned solve (condition number {cond:.2e})"
        w = torch.linalg.solve(a, b).T
    except RuntimeError as exc:  # singular or not positive definite
        return f"solve failed ({exc.__class__.__name__})"
    if not torch.isfinite(w).all():
        return "solve gave non-finite weights"
    err_new = (x @ w.T - y).pow(2).mean()
    err_old = (x @ w0.T - y).pow(2).mean()
    if err_new > err_old:
        return "refit did not reduce the error"
    mod.weight.copy_(w.reshape(mod.weight.shape).to(mod.weight.dtype))
    return None
