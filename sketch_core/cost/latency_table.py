"""The latency model: a per-layer latency table of one architecture on one target.

Every module a rate narrows (each :class:`~sketch_core.plans.ModSpec` of the plan: a
conv, a BN, a linear layer) is timed alone, on its own input shape, on a small grid of
the widths that affect it: its input width (the sum of the runs of channels feeding
it, so a VGG conv's or a DenseNet layer's several producers are one axis) and its
output width. A prediction of a width vector interpolates each module bilinearly
over (input width, output width), sums them and adds the *rest* of the network
(every module no rate touches, activations, pooling, concatenation, call overhead):
a fixed part plus a part proportional to the narrowed modules' output volume, fitted
by least squares to the whole network measured unpruned and at a few uniform rates
(:data:`CALIBRATION_RATES`).

A table is keyed by what its numbers depend on (device, runtime, model, input shape,
batch, threads, torch version); :meth:`LatencyTable.check` refuses a table measured
for something else, naming the fields that differ. Tables are JSON, written
atomically; :func:`cached_table` keeps one per key in a cache folder.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sketch_core.io.atomic import atomic_write_json
from sketch_core.errors import UserError
from sketch_core.cost.flops import input_shape, module_shapes
from sketch_core.plans import ModSpec, Plan
from sketch_core.registry import Arch
from sketch_core.cost.latency import check_latency_args, measure_latency, paired_ratios

__all__ = [
    "CALIBRATION_RATES",
    "FORMAT",
    "KEY_FIELDS",
    "LatencyTable",
    "LayerEntry",
    "build_table",
    "cached_table",
    "calibration_widths",
    "default_cache_dir",
    "grid",
    "load_table",
    "table_key",
]

FORMAT = "sketchtune-latency-table/1"
CALIBRATION_RATES = (0.3, 0.6)  # whole-network measurements besides the unpruned one
# the fields a table's numbers depend on, in the order a mismatch names them
KEY_FIELDS = ("device", "runtime", "family", "cfg", "start_conv", "num_classes", "in_channels",
              "input_shape", "batch", "threads", "torch")


def table_key(arch: Arch, *, device: str = "cpu", runtime: str = "torch", batch: int = 1,
              threads: int | None = None, num_classes: int | None = None,
              in_channels: int | None = None) -> dict:
    """What a table for ``arch`` on this target is keyed by (``threads`` None: torch's count)."""
    inch = arch.in_channels if in_channels is None else in_channels
    if threads is None and device == "cpu":
        threads = torch.get_num_threads()
    return {"device": device, "runtime": runtime, "family": arch.family, "cfg": arch.cfg,
            "start_conv": arch.start_conv, "num_classes": num_classes or arch.num_classes,
            "in_channels": inch, "input_shape": list(input_shape(arch.family, inch, arch.input_size)),
            "batch": batch, "threads": threads if device == "cpu" or runtime != "torch" else None,
            "torch": torch.__version__}


def grid(lo: int, hi: int, points: int) -> list[int]:
    """``points`` integer widths from ``lo`` to ``hi``, evenly spaced, ends included."""
    if hi <= lo or points < 2:
        return [hi]
    return sorted({round(lo + (hi - lo) * i / (points - 1)) for i in range(points)})


def _width_in(segs: Sequence[Sequence[int | None]], widths: Sequence[int]) -> int:
    return sum((n if slot is None else widths[slot]) * rep for slot, n, rep in segs)


def _bracket(axis: list[int], x: float) -> tuple[int, int, float]:
    """Indices (i, j) of the grid points around ``x`` and x's fraction between them."""
    if len(axis) == 1 or x <= axis[0]:
        return 0, 0, 0.0
    if x >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0
    j = bisect.bisect_right(axis, x)
    i = j - 1
    return i, j, (x - axis[i]) / (axis[j] - axis[i])


def _fractions(axis: list[int], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_bracket` of every value of ``x`` (indices i, j and fractions)."""
    a = np.asarray(axis, dtype=np.float64)
    if len(a) == 1:
        zero = np.zeros(len(x), dtype=np.int64)
        return zero, zero, np.zeros(len(x))
    xc = np.clip(x, a[0], a[-1])
    j = np.clip(np.searchsorted(a, xc, side="right"), 1, len(a) - 1)
    i = j - 1
    f = (xc - a[i]) / (a[j] - a[i])
    return i, j, f


def _bilinear(in_grid: list[int], out_grid: list[int], ms: list[list[float]],
              c_in: np.ndarray, c_out: np.ndarray) -> np.ndarray:
    """:meth:`LayerEntry.predict` of arrays of (input, output) widths."""
    m = np.asarray(ms, dtype=np.float64)
    i0, i1, fi = _fractions(in_grid, c_in)
    j0, j1, fj = _fractions(out_grid, c_out)
    top = m[i0, j0] * (1 - fj) + m[i0, j1] * fj
    bottom = m[i1, j0] * (1 - fj) + m[i1, j1] * fj
    return top * (1 - fi) + bottom * fi


@dataclass
class LayerEntry:
    """One module's times (ms) on the grid ``in_grid`` x ``out_grid``.

    ``in_segs`` lays out its input width ([slot or None, channels, repeat] runs);
    ``out_slot`` is the slot its output width follows (None: fixed at ``out_full``).
    """

    path: str
    kind: str
    in_segs: list[list]
    out_slot: int | None
    out_full: int
    in_grid: list[int]
    out_grid: list[int]
    ms: list[list[float]]
    out_hw: int = 1  # output elements per channel (H*W; 1 for a linear layer)

    def out_volume(self, widths: Sequence[int]) -> int:
        """Output elements the slot-narrowed part of the network sees from this module."""
        return 0 if self.out_slot is None else widths[self.out_slot] * self.out_hw

    def widths(self, widths: Sequence[int]) -> tuple[int, int]:
        out = self.out_full if self.out_slot is None else widths[self.out_slot]
        return _width_in(self.in_segs, widths), out

    def predict(self, c_in: float, c_out: float) -> float:
        """Bilinear interpolation of the grid (exact on grid points, clamped outside)."""
        i0, i1, fi = _bracket(self.in_grid, c_in)
        j0, j1, fj = _bracket(self.out_grid, c_out)
        m = self.ms
        top = m[i0][j0] * (1 - fj) + m[i0][j1] * fj
        bottom = m[i1][j0] * (1 - fj) + m[i1][j1] * fj
        return top * (1 - fi) + bottom * fi


@dataclass
class LatencyTable:
    """Per-layer times plus the rest; :meth:`predict` prices a width vector.

    The rest is ``rest_ms + rest_act_ms * v(w) / v(full)``: a fixed part and a part
    proportional to the output volume ``v`` of the narrowed modules (the activations,
    pooling and concatenations that follow them), fitted to the whole network measured
    at a few width vectors (:meth:`fit_rest`).
    """

    key: dict
    entries: list[LayerEntry]
    rest_ms: float
    full_ms: float
    rest_act_ms: float = 0.0
    settings: dict = field(default_factory=dict)

    def layer_ms(self, widths: Sequence[int]) -> list[float]:
        return [e.predict(*e.widths(widths)) for e in self.entries]

    def _volume(self, widths: Sequence[int]) -> float:
        full = sum(e.out_full * e.out_hw for e in self.entries if e.out_slot is not None)
        return sum(e.out_volume(widths) for e in self.entries) / full if full else 0.0

    def rest(self, widths: Sequence[int]) -> float:
        return self.rest_ms + self.rest_act_ms * self._volume(widths)

    def predict(self, widths: Sequence[int] | None) -> float:
        """Predicted latency (ms) at per-slot ``widths`` (None: the unpruned network)."""
        if widths is None:
            return self.full_ms
        return self.rest(widths) + sum(self.layer_ms(widths))

    def predict_many(self, widths: np.ndarray) -> np.ndarray:
        """:meth:`predict` of many width vectors at once (rows of ``widths``)."""
        w = np.asarray(widths, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError("predict_many takes a 2-D array of width vectors")
        total = np.zeros(len(w))
        volume = np.zeros(len(w))
        full_volume = 0.0
        for e in self.entries:
            c_in = sum((w[:, slot] if slot is not None else float(n)) * rep
                       for slot, n, rep in e.in_segs)
            c_in = np.broadcast_to(np.asarray(c_in, dtype=np.float64), (len(w),))
            if e.out_slot is None:
                c_out = np.full(len(w), float(e.out_full))
            else:
                c_out = w[:, e.out_slot]
                volume += c_out * e.out_hw
                full_volume += e.out_full * e.out_hw
            total += _bilinear(e.in_grid, e.out_grid, e.ms, c_in, c_out)
        share = volume / full_volume if full_volume else np.zeros(len(w))
        return total + self.rest_ms + self.rest_act_ms * share

    def fit_rest(self, widths: Sequence[Sequence[int]], measured: Sequence[float]) -> None:
        """Fit the rest's two terms by least squares to whole-network times ``measured``
        at ``widths`` (exact for two vectors; only the fixed part, their mean gap, when
        all have the same volume)."""
        gaps = [m - sum(self.layer_ms(w)) for w, m in zip(widths, measured)]
        vols = [self._volume(w) for w in widths]
        mv, mg = statistics.fmean(vols), statistics.fmean(gaps)
        spread = sum((v - mv) ** 2 for v in vols)
        self.rest_act_ms = (sum((v - mv) * (g - mg) for v, g in zip(vols, gaps)) / spread
                            if spread > 0 else 0.0)
        self.rest_ms = mg - self.rest_act_ms * mv

    def as_dict(self) -> dict:
        return {"format": FORMAT, "key": self.key, "rest_ms": self.rest_ms,
                "rest_act_ms": self.rest_act_ms, "full_ms": self.full_ms, "settings": self.settings, "entries": [vars(e) for e in self.entries]}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.as_dict())

    def check(self, want: dict, source: str = "latency table") -> None:
        """UserError naming every key field where this table differs from ``want``."""
        diff = [f"{k} {self.key.get(k)!r} (expected {want[k]!r})" for k in KEY_FIELDS
                if k in want and want[k] is not None and self.key.get(k) != want[k]]
        if diff:
            raise UserError(f"{source} was measured for another target: {'; '.join(diff)}; "
                            f"rebuild it with launch.py info --latency --save_table FILE")

    @classmethod
    def from_dict(cls, d: dict, source: str = "latency table") -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{source} is not a sketchtune latency table (expected JSON with "
                            f"format {FORMAT!r})")
        try:
            entries = [LayerEntry(**e) for e in d["entries"]]
            return cls(dict(d["key"]), entries, float(d["rest_ms"]), float(d["full_ms"]),
                       float(d.get("rest_act_ms", 0.0)), dict(d.get("settings") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source} is a damaged latency table ({type(e).__name__}: {e}); "
                            f"rebuild it with launch.py info --latency --save_table FILE") from None


def load_table(path: str | Path, want: dict | None = None) -> LatencyTable:
    """A saved table, checked against the key ``want`` when given (UserError otherwise)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"latency table {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"latency table {path} is not readable JSON ({e})") from None
    table = LatencyTable.from_dict(data, f"latency table {path}")
    if want is not None:
        table.check(want, f"latency table {path}")
    return table


# --- measuring -----------------------------------------------------------------------

def _layer(mod: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """A fresh module like ``mod`` with ``c_in`` inputs and ``c_out`` outputs."""
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise ValueError(f"grouped conv {mod} is not in any plan")
        return nn.Conv2d(c_in, c_out, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                         bias=mod.bias is not None)
    if isinstance(mod, nn.Linear):
        return nn.Linear(c_in, c_out, bias=mod.bias is not None)
    if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return type(mod)(c_in)
    raise ValueError(f"no latency model for {type(mod).__name__}")


def _axes(spec: ModSpec, plan: Plan, points: int, points_1d: int
          ) -> tuple[list[list], int | None, int, list, list]:
    """A module's input layout, output slot and full width, and its two grids:
    ``points`` per axis when both widths vary, ``points_1d`` when only one does."""
    segs = [[s.slot, s.n, s.repeat] for s in spec.inputs]
    lo_in = sum((n if slot is None else 1) * rep for slot, n, rep in segs)
    hi_in = sum(n * rep for _, n, rep in segs)
    out_full = plan.slots[spec.out_slot].n if spec.out_slot is not None else 0
    both = spec.out_slot is not None and hi_in > lo_in and spec.kind != "bn"
    k = points if both else points_1d
    out_grid = grid(1, out_full, k) if spec.out_slot is not None else [0]
    return segs, spec.out_slot, out_full, grid(lo_in, hi_in, k), out_grid


def _time_grid(mod: nn.Module, in_shape: tuple, kind: str, in_grid: list, out_grid: list,
               measure) -> list[list[float]]:
    rows = []
    for c_in in in_grid:
        row = []
        for c_out in out_grid:
            c_out = c_in if kind == "bn" else (c_out or _out_fixed(mod))
            row.append(measure(_layer(mod, c_in, c_out), (c_in, *in_shape[1:])))
        rows.append(row)
    return rows


def _out_fixed(mod: nn.Module) -> int:
    return getattr(mod, "out_channels", getattr(mod, "out_features", getattr(mod, "num_features", 0)))


def _median_grid(runs: list[list[list[float]]]) -> list[list[float]]:
    return [[statistics.median(r[i][j] for r in runs) for j in range(len(runs[0][i]))]
            for i in range(len(runs[0]))]


def _plan_entries(arch: Arch, model: nn.Module, shape: tuple, points: int, points_1d: int
                  ) -> tuple[list[tuple[str, LayerEntry]], dict[str, tuple]]:
    """Every planned module's entry (times still empty) and the distinct grids to time:
    modules alike (hyper-parameters, input shape, grid) share one."""
    plan = arch.plan()
    shapes = module_shapes(model, {s.path for s in plan.modules}, shape)
    mods = dict(model.named_modules())
    todo: dict[str, tuple] = {}
    entries = []
    for spec in plan.modules:
        segs, out_slot, out_full, in_grid, out_grid = _axes(spec, plan, points, points_1d)
        mod, (in_shape, out_shape) = mods[spec.path], shapes[spec.path]
        sig = repr((mod, in_shape, in_grid, out_grid, spec.kind))
        todo.setdefault(sig, (mod, in_shape, spec.kind, in_grid, out_grid))
        entries.append((sig, LayerEntry(spec.path, spec.kind, segs, out_slot,
                                        out_full or _out_fixed(mod), in_grid, out_grid, [],
                                        math.prod(out_shape[1:]))))
    return entries, todo


def _scaled(g: list[list[float]], k: float) -> list[list[float]]:
    return [[v * k for v in row] for row in g]


def _passes(todo: dict[str, tuple], nets: Sequence, passes: int, layer_ms, net_ms, ratio
            ) -> tuple[dict[str, list[list[float]]], list[float]]:
    """``passes`` passes over all grids and the calibration networks ``nets[1:]``.

    Every pass starts and ends with a timing of the unpruned network ``nets[0]`` and
    its grids are scaled to the median unpruned time (a pass run while the machine was
    slower counts at the common speed); a calibration network is timed as its median
    ratio to the unpruned network, called alternately (:func:`paired_ratios`). The
    median of the passes is kept. Returns the grids and each network's time (ms).
    """
    grids, fulls, ratios = [], [], []
    for _ in range(passes):
        before = net_ms(nets[0])
        grids.append({sig: _time_grid(*job, layer_ms) for sig, job in todo.items()})
        ratios.append([ratio(net, nets[0]) for net in nets[1:]])
        fulls.append((before + net_ms(nets[0])) / 2)
    ref = statistics.median(fulls)
    scale = [ref / f for f in fulls]
    out = {sig: _median_grid([_scaled(g[sig], k) for g, k in zip(grids, scale)]) for sig in todo}
    whole = [ref * statistics.median(r[i] for r in ratios) for i in range(len(nets) - 1)]
    return out, [ref, *whole]


def calibration_widths(plan: Plan, rate: float) -> list[int]:
    """Every slot at ``rate`` (one of the whole-network vectors the rest is fitted to)."""
    return [max(1, math.floor(rate * s.n + 1e-6)) for s in plan.slots]


def build_table(arch: Arch, *, device: str = "cpu", runtime: str = "torch", batch: int = 1,
                threads: int | None = None, num_classes: int | None = None,
                in_channels: int | None = None, points: int = 5, points_1d: int | None = None,
                repeats: int = 7,
                passes: int = 3, warmup: int = 3, full_repeats: int = 10,
                stat: str = "min") -> LatencyTable:
    """Measure ``arch``'s latency table here.

    Each planned module on a ``points`` x ``points`` grid of (input, output) widths, or
    on ``points_1d`` widths (default ``2 * points - 1``) where only one of the two
    varies (a single axis is cheap to time finely): ``passes`` passes over all grids, the median of
    ``repeats`` calls per point in each, the median of the passes kept. The whole
    network, unpruned and with every rate at each of :data:`CALIBRATION_RATES`, which
    the rest's two terms are fitted to: ``full_repeats`` calls each (alternating with
    the unpruned network), once per pass (:func:`_passes`, which also evens out the
    machine's speed).
    ``stat`` is the statistic of each set of calls: ``min`` (the default: steadiest on
    a machine that also runs other work; on an idle one close to the median) or
    ``median`` (what ``info --latency`` reports first).
    """
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be median or min, got {stat!r}")

    check_latency_args(device, runtime, batch, threads, repeats, warmup)
    key = table_key(arch, device=device, runtime=runtime, batch=batch, threads=threads,
                    num_classes=num_classes, in_channels=in_channels)
    shape = tuple(key["input_shape"])
    kw = dict(device=device, runtime=runtime, batch=batch, threads=key["threads"], warmup=warmup)

    def layer_ms(m: nn.Module, s: tuple) -> float:
        return getattr(measure_latency(m, s, repeats=repeats, **kw), f"{stat}_ms")

    def net_ms(m: nn.Module) -> float:
        return getattr(measure_latency(m, shape, repeats=full_repeats, **kw), f"{stat}_ms")

    def ratio(net: nn.Module, ref: nn.Module) -> float:
        return statistics.median(paired_ratios(net, ref, shape, repeats=full_repeats, **kw)[0])

    model = arch.build(None, key["num_classes"], key["in_channels"])
    points_1d = 2 * points - 1 if points_1d is None else points_1d
    entries, todo = _plan_entries(arch, model, shape, points, points_1d)
    widths = [arch.plan().full_widths()] + [calibration_widths(arch.plan(), r)
                                           for r in CALIBRATION_RATES]
    nets = [model] + [arch.build(w, key["num_classes"], key["in_channels"]) for w in widths[1:]]
    grids, whole = _passes(todo, nets, passes, layer_ms, net_ms, ratio)
    for sig, entry in entries:
        entry.ms = grids[sig]
    table = LatencyTable(key, [e for _, e in entries], 0.0, whole[0], 0.0, {
        "points": points, "points_1d": points_1d, "repeats": repeats, "passes": passes,
        "warmup": warmup,
        "full_repeats": full_repeats, "stat": stat, "timed_grids": len(todo),
        "calibration": [{"rate": r, "ms": ms} for r, ms in zip((1.0, *CALIBRATION_RATES), whole)]})
    table.fit_rest(widths, whole)
    return table


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sketchtune/latency``, else ``~/.cache/sketchtune/latency``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sketchtune" / "latency"


def cached_table(arch: Arch, cache_dir: str | Path | None = None, **kw) -> LatencyTable:
    """The table for ``arch`` on this target from ``cache_dir`` (default:
    :func:`default_cache_dir`), measured (and written there atomically) when no table
    with the same key and settings is cached."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = table_key(arch, **{k: kw[k] for k in ("device", "runtime", "batch", "threads",
                                                "num_classes", "in_channels") if k in kw})
    settings = {k: kw[k] for k in ("points", "points_1d", "repeats", "passes", "warmup",
                                   "full_repeats", "stat") if k in kw}
    digest = hashlib.sha256(json.dumps([key, settings], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"latency-{key['family']}-{key['cfg']}-{digest}.json"
    if path.exists():
        try:
            return load_table(path, key)
        except UserError:
            pass  # a damaged or foreign cache entry is measured again and replaced
    table = build_table(arch, **kw)
    table.save(path)
    return table
