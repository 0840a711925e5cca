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

from sketch_core.plans import Plan
from sketch_core.errors import UserError

__all__ = ["refit_consumers"]

log = logging.getLogger("sketchtune.lsq")

MAX_ROWS = 16384      # sampled patches per consumer
RIDGE = 1e-3          # relative to the mean diagonal of X^T X
MAX_COND = 1e12


def _out_positions(mod: nn.Module, out: torch.Tensor) -> int:
    """Rows one image contributes: output positions of a conv, 1 for a linear layer."""
    return 1 if out.dim() == 2 else out.shape[2] * out.shape[3]


def _rows_out(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The sampled rows (image-major, then position) of an output, as samples x channels."""
    if y.dim() == 2:
        return y[rows]
    n, c = y.shape[:2]
    return y.flatten(2).transpose(1, 2).reshape(-1, c)[rows]


def _rows_in(mod: nn.Module, x: torch.Tensor, rows: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The input patches behind the sampled output rows, laid out as ``F.unfold`` would."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])[rows]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    wo = out_hw[1]
    img, pos = rows // (out_hw[0] * wo), rows % (out_hw[0] * wo)
    i, j = pos // wo, pos % wo
    xp = F.pad(x, (pw, pw, ph, ph))
    r = (i * sh)[:, None] + torch.arange(kh, device=x.device) * dh          # R x kh
    c = (j * sw)[:, None] + torch.arange(kw, device=x.device) * dw          # R x kw
    patch = xp[img[:, None, None], :, r[:, :, None], c[:, None, :]]         # R x kh x kw x C
    return patch.permute(0, 3, 1, 2).reshape(rows.shape[0], -1)


class _Stop(Exception):
    pass


def _sequential_parent(model: nn.Module, path: str) -> tuple[str, int] | None:
    """The outermost plain ``nn.Sequential`` above ``path`` and the index of its child on the way.

    Inside a plain Sequential the output of child i is exactly the input of child i+1,
    so a forward can resume there from a saved input.
    """
    parts = path.split(".")
    for k in range(len(parts) - 1):
        parent = ".".join(parts[:k])
        mod = model.get_submodule(parent) if parent else model
        if isinstance(mod, nn.Sequential) and type(mod).forward is nn.Sequential.forward \
                and parts[k].isdigit():
            return parent, int(parts[k])
    return None


class _NarrowInputs:
    """Inputs of the narrow network's consumers, one consumer at a time, after earlier refits.

    The obvious way runs the network from its input up to each consumer: for a deep
    network that is most of a forward pass per consumer. Here the input of the
    Sequential child that holds the consumer is kept: the next consumer in the same
    Sequential resumes from it, running only the children in between. A refit inside
    that child leaves its input as it was; everything else kept is dropped.
    """

    def __init__(self, model: nn.Module, xs: list[torch.Tensor]) -> None:
        self.model, self.xs = model, xs
        self.kept: tuple[str, int, list[torch.Tensor]] | None = None

    def capture(self, path: str) -> list[torch.Tensor]:
        mod = self.model.get_submodule(path)
        where = _sequential_parent(self.model, path)
        got: list[torch.Tensor] = []
        saved: list[torch.Tensor] = []

        def grab(m, inp):  # before the consumer runs: its own output is not needed
            got.append(inp[0].detach())
            raise _Stop

        handles = [mod.register_forward_pre_hook(grab)]
        try:
            if where and self.kept and self.kept[0] == where[0] and self.kept[1] <= where[1]:
                seq = self.model.get_submodule(where[0])
                start, inputs = self.kept[1], self.kept[2]
                for x in inputs:
                    h = x.clone()
                    try:
                        for k in range(start, where[1] + 1):
                            if k == where[1]:
                                saved.append(h.clone())
                            h = seq[k](h)
                    except _Stop:
                        pass
            else:
                if where:
                    child = self.model.get_submodule(where[0])[where[1]]
                    handles.append(child.register_forward_pre_hook(
                        lambda m, inp: saved.append(inp[0].detach().clone())))
                for x in self.xs:
                    try:
                        self.model(x)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        self.kept = (where[0], where[1], saved) if where and len(saved) == len(self.xs) else None
        return got


def _sample_rows(full: nn.Module, consumers: list, xs: list[torch.Tensor],
                 gen: torch.Generator) -> dict[str, tuple[list[torch.Tensor], tuple[int, int]]]:
    """Per consumer: the rows each batch contributes to its solve, and its output size.

    The rows are drawn as if every batch's patches were stacked and ``MAX_ROWS`` of them
    picked at random (all of them when there are fewer), consumer after consumer from
    one seeded generator.
    """
    shapes: dict[str, tuple[int, int]] = {}

    def hook(path):
        def fn(m, inp, out):
            shapes[path] = (1, 1) if out.dim() == 2 else (out.shape[2], out.shape[3])
        return fn

    handles = [full.get_submodule(s.path).register_forward_hook(hook(s.path)) for s in consumers]
    try:
        full(xs[0][:1])
    finally:
        for h in handles:
            h.remove()
    sizes = [int(x.shape[0]) for x in xs]
    out = {}
    for spec in consumers:
        per_image = shapes[spec.path][0] * shapes[spec.path][1]
        total = sum(sizes) * per_image
        pick = torch.randperm(total, generator=gen)[:MAX_ROWS] if total > MAX_ROWS else torch.arange(total)
        rows, offset = [], 0
        for n in sizes:
            here = pick[(pick >= offset) & (pick < offset + n * per_image)] - offset
            rows.append(here.sort().values)
            offset += n * per_image
        out[spec.path] = (rows, shapes[spec.path])
    return out


def _full_outputs(full: nn.Module, consumers: list, xs: list[torch.Tensor],
                  rows: dict[str, tuple[list[torch.Tensor], tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """The unpruned network's sampled outputs of every consumer, in one pass per batch."""
    got: dict[str, list[torch.Tensor]] = {s.path: [] for s in consumers}
    batch = [0]

    def hook(path):
        def fn(m, inp, out):
            r = rows[path][0][batch[0]].to(out.device)
            got[path].append(_rows_out(out.detach(), r))
        return fn

    handles = [full.get_submodule(s.path).register_forward_hook(hook(s.path)) for s in consumers]
    try:
        for b, x in enumerate(xs):
            batch[0] = b
            full(x)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(v) for p, v in got.items()}


@torch.no_grad()
def refit_consumers(narrow: nn.Module, full: nn.Module, plan: Plan, widths: list[int],
                    batches: Iterable, indices: dict[int, torch.Tensor], *, max_batches: int = 4, seed: int = 0,
                    log_lines: list[str] | None = None) -> int:
    """Refit every consumer of a narrowed slot in ``narrow``; returns how many were refit.

    ``indices`` maps each narrowed slot to the filters ``select`` kept. Consumers are
    refit in plan order, each on the inputs the narrow network gives it after the
    refits before it.
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
        raise UserError("--sketch_mode select_lsq needs training batches; the data set gave none")
    modes = (narrow.training, full.training)
    narrow.eval(), full.eval()
    refit = 0
    try:
        rows = _sample_rows(full, consumers, xs, torch.Generator().manual_seed(seed))
        targets = _full_outputs(full, consumers, xs, rows)
        inputs = _NarrowInputs(narrow, xs)
        for spec in consumers:
            mod = narrow.get_submodule(spec.path)
            per_batch, out_hw = rows[spec.path]
            x = torch.cat([_rows_in(mod, t, r.to(t.device), out_hw)
                           for t, r in zip(inputs.capture(spec.path), per_batch)])
            y = targets.pop(spec.path)
            full_mod = full.get_submodule(spec.path)
            if full_mod.bias is not None:
                y = y - full_mod.bias
            if spec.out_slot in pruned:  # this consumer is itself narrowed: match kept outputs only
                y = y[:, indices[spec.out_slot].to(y.device)]
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
    # ||x w^T - y||^2 = sum((w G) * w) - 2 sum(w * (x^T y)^T) + ||y||^2, from what the solve
    # already has, instead of two more products with the sampled rows
    xty = b - lam * w0.T
    yy = y.pow(2).sum()

    def err(v: torch.Tensor) -> torch.Tensor:
        return ((v @ gram) * v).sum() - 2 * (v * xty.T).sum() + yy

    err_new, err_old = err(w), err(w0)
    if err_new > err_old:
        return "refit did not reduce the error"
    mod.weight.copy_(w.reshape(mod.weight.shape).to(mod.weight.dtype))
    return None
