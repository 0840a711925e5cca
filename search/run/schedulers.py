"""Early stopping that does not starve cheap trials: cost-ASHA (the default) and MO-ASHA.

Plain ASHA promotes a trial at a rung when its accuracy is in the top 1/eta there; in
an accuracy-vs-cost search a cheap vector always scores below a dear one after a few
epochs, so the cheap end of the front is stopped first. Both schedulers here keep
ASHA's rungs (``grace_period * eta**k`` epochs below ``max_t``) and its asynchrony: a
trial is recorded at a rung when it first reports there and decided against the trials
recorded so far, itself included.

- :class:`CostASHAScheduler` ranks by accuracy above the rung's accuracy-vs-log-cost
  trend (least squares: a constant below 3 points, a line below 6, a parabola from 6
  on) and promotes at or above the ``100 * (1 - 1/eta)`` percentile of those residuals
  (:func:`trend_promotes`), so about 1/eta pass in every cost band.
- :class:`MOASHAScheduler` (Schmucker et al. 2021) promotes the first ``max(1, n // eta)``
  points in non-dominated order, an epsilon-net tie-break inside each front
  (:func:`spread_order`, :func:`promotes`).

The cost (``cost_attr``: ``flops`` or ``latency_ms``) is known before the trial trains
and read from its config, else its report; a report without time, accuracy or cost (a
failed trial) changes nothing. State (the recorded points and decisions per rung) is
plain data, pickled with the scheduler and written to ``state_file`` after every
decision, so a resumed search keeps deciding against what was recorded.
:func:`make_scheduler` builds the one a config names. Measured behaviour:
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search.experiment.config import COST_SCHEDULERS, SchedulerConfig
from search.results.pareto import COST_COLUMNS, fronts
from sketch_core.io.atomic import atomic_write_text

__all__ = ["MOASHAScheduler", "CostASHAScheduler", "spread_order",
           "promotion_order", "promotes", "trend_residuals", "trend_promotes",
           "rung_milestones", "make_scheduler"]

Point = tuple[float, float]  # (accuracy: higher is better, cost: lower is better)


def spread_order(points: Sequence[Point], members: Sequence[int],
                 scale: tuple[float, float] = (1.0, 1.0)) -> list[int]:
    """``members`` (one front) in epsilon-net order: the member nearest the centre of
    the front's extent first, then each time the member farthest from all those already
    taken (Euclidean distance, each axis divided by ``scale``), so any prefix of the
    order is spread evenly along the front, however densely its parts are populated (a
    noisy front is densest at its cheap end). Ties: higher accuracy, lower cost."""
    left = sorted(members, key=lambda i: (points[i][1], -points[i][0], i))
    if not left:
        return []
    sa, sc = (scale[0] or 1.0), (scale[1] or 1.0)
    mid_a = (min(points[i][0] for i in left) + max(points[i][0] for i in left)) / 2
    mid_c = (min(points[i][1] for i in left) + max(points[i][1] for i in left)) / 2
    first = min(left, key=lambda i: (round(math.hypot((points[i][0] - mid_a) / sa,
                                                      (points[i][1] - mid_c) / sc), 12),
                                     -points[i][0], points[i][1], i))
    left.remove(first)
    taken = [first]
    gap = {i: math.inf for i in left}
    while left:
        last = points[taken[-1]]
        for i in left:
            d = math.hypot((points[i][0] - last[0]) / sa, (points[i][1] - last[1]) / sc)
            gap[i] = min(gap[i], d)
        best = max(left, key=lambda i: (gap[i], points[i][0], -points[i][1], -i))
        left.remove(best)
        taken.append(best)
    return taken


def promotion_order(points: Sequence[Point]) -> list[int]:
    """Indices of ``points``, best first: front by front, each in :func:`spread_order`
    (axes scaled by the range of all ``points``)."""
    if not points:
        return []
    accs, costs = [p[0] for p in points], [p[1] for p in points]
    scale = (max(accs) - min(accs), max(costs) - min(costs))
    order: list[int] = []
    for front in fronts([p[0] for p in points], [p[1] for p in points]):
        order.extend(spread_order(points, front, scale))
    return order


def promotes(recorded: dict[str, Point], key: str, reduction_factor: float) -> bool:
    """Whether trial ``key`` goes on from a rung where ``recorded`` (itself included)
    holds every trial's (accuracy, cost): it is among the first ``max(1, n // eta)``."""
    keys = list(recorded)
    order = promotion_order([recorded[k] for k in keys])
    passing = max(1, int(len(keys) // reduction_factor))
    return keys.index(key) in order[:passing]


def trend_residuals(points: Sequence[Point]) -> list[float]:
    """Each point's accuracy minus the least-squares fit of accuracy on log cost (cost
    itself where a cost is not positive): the mean below 3 points or with one cost, a
    line below 6 points, a parabola from 6 on."""
    acc = np.asarray([p[0] for p in points], dtype=float)
    cost = np.asarray([p[1] for p in points], dtype=float)
    x = np.log(cost) if (cost > 0).all() else cost
    if len(acc) < 3 or np.ptp(x) == 0:
        return (acc - acc.mean()).tolist() if len(acc) else []
    x = (x - x.mean()) / np.ptp(x)
    design = np.stack([x ** d for d in range(3 if len(acc) >= 6 else 2)], axis=1)
    coef, *_ = np.linalg.lstsq(design, acc, rcond=None)
    return (acc - design @ coef).tolist()


def trend_promotes(recorded: dict[str, Point], key: str, reduction_factor: float) -> bool:
    """Whether trial ``key`` goes on from a rung where ``recorded`` (itself included)
    holds every trial's (accuracy, cost): its :func:`trend_residuals` value is at or
    above the rung's ``100 * (1 - 1/eta)`` percentile (linear interpolation, ASHA's)."""
    keys = list(recorded)
    res = trend_residuals([recorded[k] for k in keys])
    cutoff = float(np.percentile(res, 100 * (1 - 1 / reduction_factor)))
    return res[keys.index(key)] >= cutoff - 1e-12


def rung_milestones(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The rungs, ascending: ``grace_period * eta**k`` below ``max_t`` (ASHA's)."""
    out, t = [], float(grace_period)
    while t < max_t:
        out.append(int(math.ceil(t - 1e-9)))
        t *= reduction_factor
    return out


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class MOASHAScheduler(FIFOScheduler):
    """Asynchronous successive halving promoting by (accuracy, cost); see the module."""

    _rule = staticmethod(promotes)
    _label = "MO-ASHA"

    def __init__(self, *, time_attr: str = "epoch", metric: str = "val_acc",
                 cost_attr: str = "flops", max_t: int, grace_period: int = 1,
                 reduction_factor: float = 3, state_file: str | Path | None = None) -> None:
        if not max_t > grace_period > 0:
            raise ValueError(f"{self._label} needs 0 < grace_period < max_t; got grace period "
                             f"{grace_period}, max_t {max_t}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction factor must be above 1, got {reduction_factor}")
        super().__init__()
        self._time_attr, self._metric, self._cost_attr = time_attr, metric, cost_attr
        self._max_t, self._grace, self._eta = int(max_t), int(grace_period), reduction_factor
        self.milestones = rung_milestones(self._max_t, self._grace, reduction_factor)
        # milestone -> trial id -> (accuracy, cost); milestone -> trial id -> promoted
        self.rungs: dict[int, dict[str, Point]] = {m: {} for m in self.milestones}
        self.decisions: dict[int, dict[str, bool]] = {m: {} for m in self.milestones}
        self.state_file = None if state_file is None else str(state_file)
        self.num_stopped = 0

    # ------------------------------------------------------------------ Tune hooks

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # both objectives are the scheduler's own

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        t = _number(result.get(self._time_attr))
        if t is None:
            return TrialScheduler.CONTINUE
        if t >= self._max_t:
            self.num_stopped += 1
            return TrialScheduler.STOP
        if result.get("failed"):
            return TrialScheduler.CONTINUE
        action = self.decide(trial.trial_id, t, result.get(self._metric),
                             self._cost_of(trial, result))
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result and not result.get("failed"):
            t = _number(result.get(self._time_attr))
            if t is not None and t < self._max_t:
                self.decide(trial.trial_id, t, result.get(self._metric),
                            self._cost_of(trial, result))

    def debug_string(self) -> str:
        rungs = " | ".join(f"epoch {m}: {sum(self.decisions[m].values())}/"
                           f"{len(self.decisions[m])} promoted" for m in self.milestones)
        return f"Using {self._label} ({self._metric} vs {self._cost_attr}): {rungs}"

    # ------------------------------------------------------------------ the rule

    def _cost_of(self, trial: Any, result: dict) -> float | None:
        config = getattr(trial, "config", None) or {}
        cost = config.get(self._cost_attr) if isinstance(config, dict) else None
        return _number(cost if cost is not None else result.get(self._cost_attr))

    def decide(self, trial_id: str, t: float, accuracy: Any, cost: Any) -> str:
        """Record trial ``trial_id`` at the highest rung ``t`` reached that it has not
        been recorded at, and say whether it goes on (CONTINUE) or stops (STOP)."""
        acc, cost = _number(accuracy), _number(cost)
        if acc is None or cost is None:
            return TrialScheduler.CONTINUE
        for milestone in reversed(self.milestones):
            if t < milestone:
                continue
            recorded = self.rungs[milestone]
            if trial_id in recorded:  # decided here already
                went_on = self.decisions[milestone].get(trial_id, True)
                return TrialScheduler.CONTINUE if went_on else TrialScheduler.STOP
            recorded[trial_id] = (acc, cost)
            go_on = self._rule(recorded, trial_id, self._eta)
            self.decisions[milestone][trial_id] = go_on
            self._write_state()
            return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """The recorded rungs as plain data (JSON-ready)."""
        return {"milestones": self.milestones, "num_stopped": self.num_stopped,
                "rungs": {str(m): {k: list(v) for k, v in self.rungs[m].items()}
                          for m in self.milestones},
                "decisions": {str(m): dict(self.decisions[m]) for m in self.milestones}}

    def load_state(self, state: dict) -> None:
        """Take over the rungs of :meth:`state` (those of this scheduler's milestones)."""
        for m in self.milestones:
            for k, v in (state.get("rungs") or {}).get(str(m), {}).items():
                self.rungs[m][k] = (float(v[0]), float(v[1]))
            self.decisions[m].update((state.get("decisions") or {}).get(str(m), {}))
        self.num_stopped = max(self.num_stopped, int(state.get("num_stopped") or 0))

    def _write_state(self) -> None:
        if self.state_file is not None:
            atomic_write_text(self.state_file, json.dumps(self.state()))

    def _read_state(self) -> None:
        if self.state_file is not None and Path(self.state_file).is_file():
            try:
                self.load_state(json.loads(Path(self.state_file).read_text()))
            except (OSError, ValueError, TypeError, KeyError, IndexError):
                pass  # an unreadable file: start the rungs afresh, as ASHA would

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._read_state()

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.state()))

    def restore(self, checkpoint_path: str) -> None:
        self.load_state(json.loads(Path(checkpoint_path).read_text()))


class CostASHAScheduler(MOASHAScheduler):
    """Asynchronous successive halving on accuracy relative to the rung's accuracy-vs-
    cost trend (:func:`trend_promotes`); rungs, hooks and state as
    :class:`MOASHAScheduler`'s."""

    _rule = staticmethod(trend_promotes)
    _label = "cost-ASHA"


def make_scheduler(section: SchedulerConfig, full_epochs: int, cost_axis: str = "flops",
                   state_file: Path | None = None) -> tuple[Any, list[int]]:
    """The trial scheduler a config's ``scheduler`` section names, and its rungs (epochs;
    none for FIFO).

    ``asha``: Ray's ASHA on ``val_acc``; ``cost_asha`` and ``moasha``:
    :class:`CostASHAScheduler` and :class:`MOASHAScheduler` on (``val_acc``, the cost:
    ``section.cost``, else ``cost_axis``), their rungs kept in ``state_file``; ``none``,
    or any of them with a grace period not below ``full_epochs``: every trial runs its
    full recipe.
    """
    sc = section
    if sc.name == "none" or full_epochs <= sc.grace_period:  # the config says so in a note
        return FIFOScheduler(), []
    rungs = rung_milestones(full_epochs, sc.grace_period, sc.reduction_factor)
    if sc.name in COST_SCHEDULERS:
        cost = COST_COLUMNS[sc.cost or cost_axis][1]  # flops, or latency_ms (priced)
        kind = CostASHAScheduler if sc.name == "cost_asha" else MOASHAScheduler
        return kind(time_attr="epoch", metric="val_acc", cost_attr=cost, max_t=full_epochs,
                    grace_period=sc.grace_period, reduction_factor=sc.reduction_factor,
                    state_file=state_file), rungs
    return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=full_epochs,
                         grace_period=sc.grace_period,
                         reduction_factor=sc.reduction_factor), rungs
