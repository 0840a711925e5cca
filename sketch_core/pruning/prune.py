"""Pretrained model + widths -> narrow model of the same builder.

One generic pass over the architecture's plan (:mod:`sketch_core.plans`): for every
slot that narrows, the producer's filters are either replaced by their Frequent
Directions sketch (mode ``sketch``, the paper's method with textbook FD;
``sketch_released``, the same with the released code's FD arithmetic) or a subset of
them is kept (``select`` / ``select_lsq``, and the original's ``random_rule``
baselines); each
consumer's input channels follow (channel sketch, transposed as it should be, or the
same subset). The result is loaded strictly into ``build(widths)``: a pruned network
is a constructor call, never graph surgery. Nothing here branches on architecture.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sketch_core.errors import UserError
from sketch_core.options import SKETCH_MODES, SketchOptions
from sketch_core.plans import ModSpec, Plan, Seg
from sketch_core.pruning.fd import frequent_directions, released_fd, row_space_energy, weight_norm
from sketch_core.pruning.lsq import refit_consumers
from sketch_core.registry import Arch

__all__ = ["sketch", "model_io"]

log = logging.getLogger("sketchtune.sketching")


def model_io(model: nn.Module) -> tuple[int, int]:
    """(in_channels, num_classes) of a model: its first conv's input, its last linear's output."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs[0].in_channels, linears[-1].out_features


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


class _Pruner:
    def __init__(self, state: dict[str, torch.Tensor], plan: Plan, widths: list[int], *,
                 mode: str, random_rule: str, weight_norm_method: str | None, filter_norm: bool,
                 sketch_bn: bool, seed: int, select_by: str = "filters") -> None:
        self.src, self.plan, self.widths = state, plan, widths
        self.select_by = select_by
        self.index_mode = mode not in SKETCH_MODES or random_rule != "default"
        self.fd = released_fd if mode == "sketch_released" else frequent_directions
        self.mode, self.random_rule = mode, random_rule
        self.norm, self.filter_norm, self.sketch_bn = weight_norm_method, filter_norm, sketch_bn
        self.gen = torch.Generator().manual_seed(seed)
        self.out: dict[str, torch.Tensor] = {}
        self.indices: dict[int, torch.Tensor] = {}
        self.bn_from_sketch: dict[str, dict[str, torch.Tensor]] = {}

    def pruned(self, slot: int | None) -> bool:
        return slot is not None and self.widths[slot] < self.plan.slots[slot].n

    # which filters a subset keeps ------------------------------------------------------
    def keep(self, slot: int) -> torch.Tensor:
        if slot not in self.indices:
            w = _rows(self.src[self.plan.slots[slot].producer + ".weight"])
            n, l = w.shape[0], self.widths[slot]
            if self.random_rule == "random_pretrain":
                idx = torch.randperm(n, generator=self.gen)[:l]
            elif self.random_rule == "l1_pretrain":
                idx = w.abs().sum(1).topk(l).indices
            else:  # select: energy in the row space of an FD sketch of the slot's rows
                rows = w if self.select_by == "filters" else self.channel_rows(slot, w)
                idx = row_space_energy(rows, frequent_directions(rows, l)).topk(l).indices
            self.indices[slot] = idx.sort().values.to(w.device)
        return self.indices[slot]

    def channel_rows(self, slot: int, filters: torch.Tensor) -> torch.Tensor:
        """Row i: every consumer's weights for channel i, times the size channel i arrives with.

        Behind a BN a filter's own scale is normalised away: channel i reaches its
        consumers as |gamma_i| times a unit-variance signal, gamma_i from the slot's own BN
        (post-activation) or from the BN in front of the consumer (pre-activation, as in
        DenseNet). A channel with no BN on its way arrives with its filter's norm
        (``filters``: the producer's filters, one per row).
        """
        info = self.plan.slots[slot]
        filt = filters.norm(dim=1)
        own = self.src[info.bn + ".weight"].abs() if info.bn else None
        parts, front = [], None
        for spec in self.plan.modules:
            if spec.kind == "bn":
                front = spec
                continue
            off = 0
            for seg in spec.inputs:
                span = seg.n * seg.repeat
                if seg.slot == slot:
                    w = self.src[spec.path + ".weight"].narrow(1, off, span)
                    rows = w.reshape(w.shape[0], seg.n, -1).transpose(0, 1).reshape(seg.n, -1)
                    size = own
                    if size is None and front is not None and front.inputs == spec.inputs:
                        size = self.src[front.path + ".weight"].narrow(0, off, span)
                        size = size.reshape(seg.n, seg.repeat)[:, 0].abs()
                    parts.append(rows * (filt if size is None else size)[:, None])
                off += span
            front = None
        return torch.cat(parts, 1) if parts else filters

    # producers -------------------------------------------------------------------------
    def filters(self, spec: ModSpec, w: torch.Tensor, b: torch.Tensor | None):
        slot = spec.out_slot
        if not self.pruned(slot):
            return w, b
        if self.index_mode:
            idx = self.keep(slot)
            return w[idx], (None if b is None else b[idx])
        l, info = self.widths[slot], self.plan.slots[slot]
        cols = [_rows(w)]
        if b is not None:
            cols.append(b[:, None])
        bn = info.bn if (self.sketch_bn and info.bn) else None
        if bn:
            cols += [self.src[bn + ".weight"][:, None], self.src[bn + ".bias"][:, None]]
        sk = self.fd(torch.cat(cols, 1), l)
        d = cols[0].shape[1]
        new_w = weight_norm(sk[:, :d].reshape(l, *w.shape[1:]), self.norm, self.filter_norm)
        new_b = sk[:, d] if b is not None else None
        if bn:
            k = d + (b is not None)
            self.bn_from_sketch[bn] = {"weight": sk[:, k], "bias": sk[:, k + 1]}
        return new_w, new_b

    # consumers -------------------------------------------------------------------------
    def channels(self, spec: ModSpec, w: torch.Tensor, dim: int) -> torch.Tensor:
        """Lay out ``w``'s dim ``dim`` (input channels, or BN channels) by the plan."""
        if not any(self.pruned(s.slot) for s in spec.inputs):
            return w
        pieces, off = [], 0
        for seg in spec.inputs:
            span = seg.n * seg.repeat
            part = w.narrow(dim, off, span)
            off += span
            if self.pruned(seg.slot):
                part = self._narrow_seg(part, seg, dim)
            pieces.append(part)
        if off != w.shape[dim]:
            raise UserError(f"{spec.path}: the plan lays out {off} input channels but the weight has "
                            f"{w.shape[dim]}; is the checkpoint of another architecture?")
        return torch.cat(pieces, dim)

    def _narrow_seg(self, part: torch.Tensor, seg: Seg, dim: int) -> torch.Tensor:
        l = self.widths[seg.slot]
        shape = list(part.shape)
        # view the segment as (..., n, repeat, ...) so a channel owns `repeat` features
        grouped = part.reshape(*shape[:dim], seg.n, seg.repeat, *shape[dim + 1:])
        if self.index_mode:
            out = grouped.index_select(dim, self.keep(seg.slot))
        elif part.dim() == 1:  # a BN in front of a consumer: no sketch of statistics
            raise AssertionError("BN segments are handled by _bn_channels")
        else:  # channel sketch: channels are the rows (the transpose the original forgot)
            moved = grouped.movedim(dim, 0)
            sk = self.fd(moved.reshape(seg.n, -1), l)
            out = sk.reshape(l, *moved.shape[1:]).movedim(0, dim)
        return out.reshape(*shape[:dim], l * seg.repeat, *shape[dim + 1:])

    def bn_channels(self, spec: ModSpec) -> None:
        names = ("weight", "bias", "running_mean", "running_var")
        if spec.path in self.bn_from_sketch:
            l = next(iter(self.bn_from_sketch[spec.path].values())).shape[0]
            self.out.update({f"{spec.path}.{k}": v for k, v in self.bn_from_sketch[spec.path].items()})
            self._bn_stats(spec.path, l)
            return
        if self.index_mode:
            for k in names:
                self.out[f"{spec.path}.{k}"] = self.channels(spec, self.src[f"{spec.path}.{k}"], 0)
            return
        # sketch mode: the channels are new combinations; keep the layer's average affine
        # parameters and leave the statistics to BN recalibration
        for k in names:
            t = self.src[f"{spec.path}.{k}"]
            pieces, off = [], 0
            for seg in spec.inputs:
                part = t[off:off + seg.n]
                off += seg.n
                if self.pruned(seg.slot):
                    fill = {"weight": part.mean(), "bias": part.mean(), "running_mean": 0.0,
                            "running_var": 1.0}[k]
                    part = torch.full((self.widths[seg.slot],), float(fill), dtype=t.dtype, device=t.device)
                pieces.append(part)
            self.out[f"{spec.path}.{k}"] = torch.cat(pieces)

    def _bn_stats(self, path: str, l: int) -> None:
        ref = self.src[f"{path}.running_mean"]
        self.out[f"{path}.running_mean"] = ref.new_zeros(l)
        self.out[f"{path}.running_var"] = ref.new_ones(l)

    def run(self) -> dict[str, torch.Tensor]:
        for spec in self.plan.modules:
            if spec.kind == "bn":
                self.bn_channels(spec)
                continue
            w = self.src[spec.path + ".weight"]
            b = self.src.get(spec.path + ".bias")
            w, b = self.filters(spec, w, b)
            w = self.channels(spec, w, 1)
            self.out[spec.path + ".weight"] = w
            if b is not None:
                self.out[spec.path + ".bias"] = b
        # a producer's BN in sketch mode without --sketch_bn: average affine parameters
        for s, info in enumerate(self.plan.slots):
            if (self.pruned(s) and not self.index_mode and info.bn
                    and info.bn not in self.bn_from_sketch):
                l = self.widths[s]
                for k in ("weight", "bias"):
                    t = self.src[f"{info.bn}.{k}"]
                    self.out[f"{info.bn}.{k}"] = t.new_full((l,), float(t.mean()))
                self._bn_stats(info.bn, l)
        return self.out


def _layers(keys: Iterable[str], limit: int = 6) -> str:
    names = sorted({k.rsplit(".", 1)[0] for k in keys})
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _check_covered(state: dict[str, torch.Tensor], entry: Arch, in_ch: int,
                   classes: int) -> dict[str, torch.Tensor]:
    """The model's layers must be exactly those of the unpruned ``cfg`` that the plan describes."""
    cfg = entry.cfg
    with torch.device("meta"):
        ref = entry.build(None, classes, in_ch).state_dict()
    missing, extra = set(ref) - set(state), set(state) - set(ref)
    if missing:
        also = f"; it also has {_layers(extra)}, which a {cfg} has not" if extra else ""
        raise UserError(f"the model is not a {entry.family} {cfg}: it lacks {_layers(missing)}{also}")
    if extra:
        raise UserError(f"the model has layer(s) that the {entry.family} {cfg} plan does not cover: "
                        f"{_layers(extra)}; sketch an unmodified {cfg} (as built by sketchtune)")
    return ref


def _check_unpruned(state: dict[str, torch.Tensor], entry: Arch, in_ch: int,
                    classes: int) -> None:
    """The model must be the unpruned network the plan describes, layer for layer."""
    ref = _check_covered(state, entry, in_ch, classes)
    cfg = entry.cfg
    for s in entry.plan().slots:
        key = s.producer + ".weight"
        if state[key].shape[0] != s.n:
            raise UserError(f"{key} has {state[key].shape[0]} filters, the unpruned {cfg} has {s.n}: "
                            f"sketch an unpruned model (fine-tune a pruned one with --refine)")
    for key, t in ref.items():
        if state[key].shape != t.shape:
            raise UserError(f"{key} has shape {tuple(state[key].shape)}, the unpruned {cfg} has "
                            f"{tuple(t.shape)}: sketch an unpruned model")


def sketch(model: nn.Module, arch: Arch, widths: Sequence[int],
           options: SketchOptions = SketchOptions(), *, batches: Iterable | None = None,
           seed: int = 0, lsq_log: list[str] | None = None) -> nn.Module:
    """Return a new, narrower model of the same builder, sketched from ``model``.

    ``arch`` is the resolved architecture (:func:`sketch_core.registry.resolve_arch`),
    ``widths`` one width per plan slot (:func:`sketch_core.rates.widths_for` turns a rate
    vector into them), ``options`` how to narrow (:class:`~sketch_core.options.SketchOptions`).
    ``batches`` (an iterable of ``(x, y)``) is needed by ``select_lsq``; ``seed`` drives
    the random rules and the refit's sampling. BN statistics of sketched layers are not
    recomputed here: call :func:`sketch_core.pruning.bn.recalibrate_bn` before evaluating.
    """
    o = options
    if o.mode == "select_lsq" and batches is None:
        raise UserError("--sketch_mode select_lsq refits layers on training batches and needs a data "
                        "set; pass batches (or use --sketch_mode select)")
    plan = arch.plan()
    if len(widths) != len(plan.slots):
        raise UserError(f"{arch.cfg} has {len(plan.slots)} prunable slots, got {len(widths)} widths")
    state = model.state_dict()
    in_ch, classes = model_io(model)
    _check_unpruned(state, arch, in_ch, classes)
    with torch.no_grad():
        pruner = _Pruner(state, plan, list(widths), mode=o.mode, random_rule=o.random_rule,
                         weight_norm_method=o.weight_norm_method, filter_norm=o.filter_norm,
                         sketch_bn=o.sketch_bn, seed=seed, select_by=o.select_by)
        changed = pruner.run()
    p = next(model.parameters())
    with torch.device("meta"):
        narrow = arch.build(list(widths), classes, in_ch)
    if hasattr(model, "transform_input"):
        narrow.transform_input = model.transform_input
    new_state = {k: changed.get(k, v).clone().contiguous() for k, v in state.items()}
    narrow.load_state_dict(new_state, strict=True, assign=True)
    narrow.to(device=p.device)
    narrow.train(model.training)
    narrow.sketch_widths = list(widths)
    if o.mode == "select_lsq":
        refit_consumers(narrow, model, plan, list(widths), batches, pruner.indices, seed=seed,
                        log_lines=lsq_log)
    return narrow
