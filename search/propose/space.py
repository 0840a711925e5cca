"""The search space: rate vectors from an Optuna trial, their cost, the FLOPs budget.

:class:`RateSpace` is plain, picklable data (it travels inside Ray Tune's searcher
state). Called with an Optuna trial it is the define-by-run space: one
``rate_XX`` per unit (``grouping: per_unit``) or one ``stage_X`` per stage
(``per_stage``), on a grid of ``step`` between ``low`` and ``high``. It also knows the
cost of a vector without building a network: MACs and parameters are exactly
bilinear in the slot widths, so :class:`CostModel` records each layer's geometry
once (one forward pass on the meta device) and then prices any width vector in
microseconds. That is what lets the driver check every proposal against a FLOPs
budget, and repair one (shrink it onto the budget, staying on the grid) when asked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from sketch_core.errors import UserError
from sketch_core.cost.flops import module_shapes
from sketch_core.plans import widths_for
from sketch_core.rates import parse_rates
from sketch_core.registry import Arch, CfgLike, resolve_arch

__all__ = ["CostModel", "RateSpace", "Cost", "stage_groups", "BUDGET_KEYS"]

# budget keys (fractions of the unpruned network) -> how a message names them
BUDGET_KEYS = {"flops_ratio": "budget.flops_budget", "latency_ratio": "budget.latency"}
_SHORT = {"flops_ratio": "flops_budget", "latency_ratio": "latency budget"}


@dataclass(frozen=True)
class Cost:
    widths: tuple[int, ...]
    flops: int
    params: int
    flops_ratio: float
    params_ratio: float
    latency_ms: float | None = None     # predicted by the space's latency table, if any
    latency_ratio: float | None = None  # latency_ms over the unpruned network's prediction

    def value(self, name: str) -> float | None:
        """The cost called ``name`` (a :data:`BUDGET_KEYS` key or an objective's column)."""
        return getattr(self, name)


def stage_groups(cfg: CfgLike, data_set: str = "cifar10",
                 start_conv: int | None = None) -> list[list[int]]:
    """Unit indices grouped by stage (ResNet layerN, DenseNet block, GoogLeNet 3/4/5, VGG width)."""
    entry = resolve_arch(cfg, data_set, start_conv=start_conv)
    plan = entry.plan()
    groups = entry.unit_groups
    if groups and sum(groups) == plan.num_units:
        out, i = [], 0
        for k in groups:
            out.append(list(range(i, i + k)))
            i += k
        return out

    def key(u: int) -> tuple:
        name = plan.unit_names[u]
        if "." in name:  # layer1.0, dense2.3
            return name.rsplit(".", 1)[0],
        stripped = re.sub(r"[A-Za-z]+$", "", name)  # inception3a -> inception3
        if stripped != name:
            return stripped,
        return re.sub(r"[A-Za-z]+(?=\d+$)", "", name),  # inception_a3 -> inception_3

    keys = [key(u) for u in range(plan.num_units)]
    if len(set(keys)) == 1:  # one name prefix for all (VGG's features.N): split by width
        keys = [(plan.slots[plan.units[u][0]].n,) for u in range(plan.num_units)]
    out: list[list[int]] = []
    for u, k in enumerate(keys):
        if out and keys[out[-1][-1]] == k:
            out[-1].append(u)
        else:
            out.append([u])
    return out


class CostModel:
    """Exact MACs and parameters of (cfg, widths) from the unpruned network's geometry.

    ``cfg`` is a name (resolved with ``data_set``, ``start_conv``, ``input_size``) or an
    :class:`~sketch_core.registry.Arch`.
    """

    def __init__(self, cfg: CfgLike, data_set: str = "cifar10", num_classes: int | None = None,
                 in_channels: int = 3, input_size: int | None = None,
                 start_conv: int | None = None) -> None:
        entry = resolve_arch(cfg, data_set, start_conv=start_conv, input_size=input_size)
        self.cfg, self.data_set, self.arch = entry.cfg, data_set, entry
        self.plan = entry.plan()
        size = entry.input_size
        with torch.device("meta"):
            model = entry.build(None, num_classes, in_channels)
        modules = dict(model.named_modules())
        counted = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        shapes = module_shapes(model, counted, (in_channels, size, size))
        positions = {}  # output positions per output channel of each conv and linear layer
        for n, (_, out) in shapes.items():
            m = modules[n]
            channels = out[0] if isinstance(m, nn.Conv2d) else m.out_features
            positions[n] = math.prod(out) // channels
        self.full_flops = 0
        for n, m in modules.items():
            if n in positions:
                w = m.weight
                self.full_flops += positions[n] * w.shape[0] * w[0].numel()
        self.full_params = sum(p.numel() for p in model.parameters())
        full_w = self.plan.full_widths()
        # per planned module: (kind, out_slot, inputs, full out, per-channel cost terms, bias)
        self._terms: list[tuple] = []
        seen: dict[str, int] = {}
        for spec in self.plan.modules:
            m = modules.get(spec.path)
            if m is None:
                raise ValueError(f"plan of {cfg} names {spec.path}, which the model lacks")
            if spec.kind == "bn":
                term = ("bn", None, spec.inputs, 0, 0, 0)
            else:
                w = m.weight
                groups = getattr(m, "groups", 1)
                if groups != 1:
                    raise ValueError(f"{spec.path}: grouped convolutions are not priced")
                k = w[0, 0].numel() if w.dim() > 2 else 1
                term = (spec.kind, spec.out_slot, spec.inputs, w.shape[0], w.shape[1], k,
                        positions.get(spec.path, 0), m.bias is not None)
            seen[spec.path] = len(self._terms)
            self._terms.append(term)
        self._full_widths = full_w
        self._delta0 = self._raw(full_w)

    @staticmethod
    def _in(inputs: Sequence, widths: Sequence[int], full_in: int) -> int:
        if not inputs:
            return full_in
        return sum((widths[s.slot] if s.slot is not None else s.n) * s.repeat for s in inputs)

    def _raw(self, widths: Sequence[int]) -> tuple[int, int]:
        flops = params = 0
        for term in self._terms:
            if term[0] == "bn":
                params += 2 * self._in(term[2], widths, 0)
                continue
            _, out_slot, inputs, full_out, full_in, k, pos, bias = term
            out = widths[out_slot] if out_slot is not None else full_out
            cin = self._in(inputs, widths, full_in)
            flops += pos * out * cin * k
            params += out * cin * k + (out if bias else 0)
        return flops, params

    def flops_many(self, widths: np.ndarray) -> np.ndarray:
        """MACs of many width vectors at once (rows of ``widths``), as :meth:`cost` gives."""
        w = np.asarray(widths, dtype=np.float64)
        flops = np.zeros(len(w))
        for term in self._terms:
            if term[0] == "bn":
                continue
            _, out_slot, inputs, full_out, full_in, k, pos, _bias = term
            out = w[:, out_slot] if out_slot is not None else full_out
            if inputs:
                cin = sum((w[:, i.slot] if i.slot is not None else i.n) * i.repeat
                          for i in inputs)
            else:
                cin = full_in
            flops = flops + pos * out * cin * k
        return self.full_flops + flops - self._delta0[0]

    def cost(self, widths: Sequence[int]) -> tuple[int, int]:
        """(MACs, params) of the network built at ``widths`` (one int per plan slot)."""
        f, p = self._raw(widths)
        return self.full_flops + f - self._delta0[0], self.full_params + p - self._delta0[1]


@dataclass
class RateSpace:
    """Define-by-run rate space for one architecture, with costs and budget repair.

    Call it with an Optuna trial to sample ``{"rates": [...]}``. Everything here is
    plain data plus a lazily built :class:`CostModel`, so it pickles cheaply.
    """

    cfg: CfgLike
    data_set: str = "cifar10"
    low: float = 0.2
    high: float = 1.0
    step: float | None = 0.05
    grouping: str = "per_unit"
    round_to: int = 1
    start_conv: int | None = None
    sketch_lastconv: bool = True
    num_classes: int | None = None
    in_channels: int = 3
    input_size: int | None = None
    latency: Any = field(default=None, repr=False, compare=False)  # a LatencyTable, or None
    _cost: CostModel | None = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.arch = resolve_arch(self.cfg, self.data_set, start_conv=self.start_conv,
                                 input_size=self.input_size)
        if isinstance(self.cfg, Arch):
            self.cfg = self.arch.cfg
        plan = self.plan = self.arch.plan()
        self.num_units = plan.num_units
        self.unit_names = list(plan.unit_names)
        self.slot_n = [s.n for s in plan.slots]
        self.units = [list(u) for u in plan.units]
        if self.grouping == "per_stage":
            self.groups = stage_groups(self.arch)
        else:
            self.groups = [[u] for u in range(self.num_units)]
        width = 2 if len(self.groups) <= 100 else 3
        prefix = "stage" if self.grouping == "per_stage" else "rate"
        self.param_names = [f"{prefix}_{i:0{width}d}" for i in range(len(self.groups))]
        if self.step is not None:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            self.grid = [round(self.low + i * self.step, 10) for i in range(n + 1)]
        else:
            self.grid = None

    def __getstate__(self) -> dict:
        # the resolved architecture travels as its family and is resolved again on arrival
        state = dict(self.__dict__)
        state["_cost"] = None
        state["_cache"] = {}
        state["family"] = state.pop("arch").family
        state.pop("plan", None)
        return state

    def __setstate__(self, state: dict) -> None:
        family = state.pop("family")
        self.__dict__.update(state)
        self.arch = resolve_arch(self.cfg, family=family, start_conv=self.start_conv,
                                 input_size=self.input_size)
        self.plan = self.arch.plan()

    # ---------------------------------------------------------------- sampling

    def __call__(self, trial: Any) -> dict:
        values = [round(trial.suggest_float(name, self.low, self.high, step=self.step), 10)
                  for name in self.param_names]
        return {"rates": self.expand(values)}

    def expand(self, values: Sequence[float]) -> list[float]:
        """Per-unit rates from one value per parameter (group)."""
        rates = [0.0] * self.num_units
        for v, g in zip(values, self.groups):
            for u in g:
                rates[u] = float(v)
        return rates

    def rates_from_params(self, params: dict) -> list[float]:
        return self.expand([params[n] for n in self.param_names])

    def params_from_rates(self, rates: Sequence[float]) -> dict[str, float] | None:
        """Parameters that give ``rates``; None when the vector is not constant per group."""
        if len(rates) != self.num_units:
            return None
        out = {}
        for name, g in zip(self.param_names, self.groups):
            vals = {float(rates[u]) for u in g}
            if len(vals) != 1:
                return None
            out[name] = vals.pop()
        return out

    def in_space(self, rates: Sequence[float]) -> bool:
        return all(self.low - 1e-9 <= r <= self.high + 1e-9 for r in rates) and (
            self.grid is None or all(min(abs(r - g) for g in self.grid) < 1e-6 for r in rates))

    def paper_points(self, texts: Sequence[str]) -> list[tuple[str, dict]]:
        """``(text, params)`` for each rate string that the space can express."""
        points = []
        for text in texts:
            rates = parse_rates(text, self.arch)
            params = self.params_from_rates(rates)
            if params is None:
                raise UserError(f"space.paper_rates {text!r}: not one rate per stage, which "
                                f"space.grouping per_stage needs")
            if not self.in_space(rates):
                raise UserError(f"space.paper_rates {text!r}: outside the space "
                                f"[{self.low}, {self.high}] step {self.step}; widen the space or "
                                f"drop the vector")
            points.append((text, params))
        return points

    # ---------------------------------------------------------------- cost

    @property
    def cost_model(self) -> CostModel:
        if self._cost is None:
            self._cost = CostModel(self.arch, self.data_set, self.num_classes, self.in_channels,
                                   self.input_size)
        return self._cost

    def widths(self, rates: Sequence[float]) -> list[int]:
        """Per-slot widths of a per-unit vector (:func:`sketch_core.rates.widths_for`)."""
        return widths_for(self.plan, rates, self.sketch_lastconv, self.round_to)

    def cost(self, rates: Sequence[float]) -> Cost:
        widths = tuple(self.widths(rates))
        hit = self._cache.get(widths)
        if hit is None:
            cm = self.cost_model
            flops, params = cm.cost(widths)
            lat = ratio = None
            if self.latency is not None:
                lat = float(self.latency.predict(widths))
                ratio = lat / self.full_latency_ms
            hit = Cost(widths, flops, params, flops / cm.full_flops, params / cm.full_params,
                       lat, ratio)
            if len(self._cache) < 100_000:
                self._cache[widths] = hit
        return hit

    def flops_ratios(self, rates: Sequence[Sequence[float]]) -> np.ndarray:
        """FLOPs ratios of many per-unit vectors at once (the same values as :meth:`cost`)."""
        cm = self.cost_model
        widths = np.array([self.widths(r) for r in rates], dtype=np.float64)
        return cm.flops_many(widths) / cm.full_flops

    def use_latency(self, table: Any) -> None:
        """Price vectors by ``table`` (a latency table, or None) from now on; costs priced
        before are dropped."""
        self.latency = table
        self._cache = {}

    @property
    def full_latency_ms(self) -> float:
        """The latency table's prediction for the unpruned network (ratios are of this)."""
        if self.latency is None:
            raise ValueError("this space has no latency table")
        full = self._cache.get("full_latency_ms")
        if full is None:
            full = self._cache["full_latency_ms"] = float(
                self.latency.predict(self.plan.full_widths()))
        return full

    def ratios(self, rates: Sequence[Sequence[float]], key: str = "flops_ratio") -> np.ndarray:
        """``flops_ratio`` or ``latency_ratio`` of many per-unit vectors at once."""
        if key == "flops_ratio":
            return self.flops_ratios(rates)
        if key != "latency_ratio":
            raise ValueError(f"unknown cost {key!r}")
        widths = np.array([self.widths(r) for r in rates], dtype=np.float64)
        return self.latency.predict_many(widths) / self.full_latency_ms

    def feasible_many(self, rates: Sequence[Sequence[float]],
                      budgets: dict[str, float] | None) -> np.ndarray:
        """Which of many per-unit vectors meet every budget (``{cost key: fraction}``)."""
        ok = np.ones(len(rates), dtype=bool)
        for key, limit in (budgets or {}).items():
            ok &= self.ratios(rates, key) <= limit + 1e-12
        return ok

    @staticmethod
    def overruns(cost: Cost, budgets: dict[str, float] | None) -> list[str]:
        """What ``cost`` exceeds, one phrase per budget (empty: within all of them)."""
        out = []
        for key, limit in (budgets or {}).items():
            value = cost.value(key)
            if value is None or value <= limit + 1e-12:
                continue
            text = f"{key} {value:.4f} above {_SHORT.get(key, key)} {limit:g}"
            if key == "latency_ratio" and cost.latency_ms and value > 0:  # the same in ms
                text += f" ({cost.latency_ms:.3f} ms above {limit * cost.latency_ms / value:.3f} ms)"
            out.append(text)
        return out

    @staticmethod
    def violation(cost: Cost, budgets: dict[str, float] | None) -> float:
        """Optuna's constraint value: the largest ``cost - budget`` (<= 0: feasible)."""
        return max((cost.value(k) - b for k, b in (budgets or {}).items()), default=0.0)

    def snap_down(self, r: float) -> float:
        """``r`` clipped to [low, high] and, on a grid, the grid value at or below it."""
        if self.grid is None:
            return min(self.high, max(self.low, r))
        below = [g for g in self.grid if g <= r + 1e-9]
        return below[-1] if below else self.grid[0]

    def repair(self, rates: Sequence[float], budgets: dict[str, float] | float
               ) -> list[float] | None:
        """The vector scaled down (uniformly, then snapped to the grid) onto the budgets.

        ``budgets``: ``{cost key: fraction}`` (:data:`BUDGET_KEYS`), or a FLOPs budget
        alone. Returns the largest such vector within every budget, or None when even
        the space's lowest rates are above one.
        """
        if not isinstance(budgets, dict):
            budgets = {"flops_ratio": float(budgets)}
        values = [rates[g[0]] for g in self.groups]

        def fits(r: list[float]) -> bool:
            return not self.overruns(self.cost(r), budgets)

        if fits(list(rates)):
            return list(rates)

        def scaled(s: float) -> list[float]:
            return self.expand([self.snap_down(v * s) for v in values])

        if not fits(scaled(0.0)):
            return None
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            if fits(scaled(mid)):
                lo = mid
            else:
                hi = mid
        return scaled(lo)

    def check_budget(self, budgets: dict[str, float] | float | None) -> None:
        """UserError when no vector of the space meets the budgets (or a FLOPs budget)."""
        if budgets is None:
            return
        if not isinstance(budgets, dict):
            budgets = {"flops_ratio": float(budgets)}
        lowest = self.cost([self.low] * self.num_units)
        for key, limit in budgets.items():
            value = lowest.value(key)
            if value is not None and value > limit + 1e-12:
                what = "of the FLOPs" if key == "flops_ratio" else (
                    f"of the unpruned latency ({lowest.latency_ms:.3f} ms predicted)")
                given = f"{limit:g}" if key == "flops_ratio" else (
                    f"{limit:g} ({limit * self.full_latency_ms:.3f} ms)")
                raise UserError(f"{BUDGET_KEYS[key]} {given}: even every rate at space.low "
                                f"{self.low} keeps {value:.3f} {what}, the lowest reachable; "
                                f"lower space.low or raise the budget")
