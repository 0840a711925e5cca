"""Early stopping over two objectives: MO-ASHA, a Ray Tune trial scheduler.

Single-objective ASHA promotes a trial at a rung when its accuracy is in the top
1/eta of the accuracies recorded there. In an accuracy-vs-cost search a cheap rate
vector always scores below a dear one after a few epochs, so the cheap end of the
front is stopped first, whatever its quality at its cost.

:class:`MOASHAScheduler` keeps ASHA's rungs and its asynchrony (Schmucker et al. 2021,
"Multi-objective asynchronous successive halving"): rungs at ``grace_period *
eta**k`` epochs below ``max_t``; when a trial first reports at or past a rung, its
(accuracy, cost) is recorded there and the decision is taken at once against the
trials recorded at that rung so far, itself included. The promotion rule is
non-dominated sorting of the recorded points (higher accuracy and lower cost are
better) with an epsilon-net tie-break inside a front, after the paper's EpsNet variant
(here :func:`spread_order`: the member nearest the centre of the front first, of two
the more accurate, then greedily the member farthest from those already taken, the
axes scaled by the rung's ranges). The trial goes on when it is among the first
``max(1, n // eta)`` of the ``n`` points in that order, so about 1/eta of the trials
pass each rung (a little more while a rung holds few trials, as with ASHA), spread
along the front instead of gathered at its dear end. NSGA-II's crowding distance was
tried as the tie-break: a noisy front is densest at its cheap end, where crowding
distances are small, so it still favoured the dear third about 3:2 in the simulated
runs of the tests. A trial whose decision at a rung is to stop is stopped; one that
reaches ``max_t`` is stopped as finished.

The cost axis is generic: ``cost_attr`` names a metric (``flops`` now) that is known
before the trial trains, read from the trial's config or, failing that, from its
report. A report without the time attribute, the accuracy or the cost (a failed
trial) is not recorded and changes nothing.

State: the recorded points and decisions per rung, plain data. The object pickles
(Tune's ``Tuner.restore`` unpickles the scheduler it was built with); given a
``state_file`` it also writes its rungs there (JSON, atomically) after every decision
and reads them back when unpickled, so a resumed search keeps deciding against what
was recorded before the driver stopped. :func:`promotion_order` and
:func:`promotes` are the rule as pure functions.

:class:`CostASHAScheduler` keeps the same rungs, asynchrony and state, with ASHA's own
rule applied to accuracy relative to cost: at each decision the rung's recorded
accuracies are fitted against log cost by least squares (a constant below 3 points, a
line below 6, a parabola from 6 on), and a trial goes on when its residual (accuracy
above the fit at its cost) is at or above the ``100 * (1 - 1/eta)`` percentile of the
rung's residuals (:func:`trend_promotes`), as Ray's ASHA does with raw accuracies. The
ranking of a trial does not depend on where it falls along the front, so a cheap
newcomer is not stopped for being cheap nor for being at the front's end: about 1/eta
pass in every cost band, also while a rung holds few trials. In a real quickstart rung
replayed one trial at a time (32 trials, eta 3), MO-ASHA's order promoted 5 (cheap,
middle, dear third: 1, 1, 3), ASHA 11 (2, 2, 7), this rule 11 (3, 6, 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.results.pareto import fronts
from sketch_core.io.atomic import atomic_write_text

__all__ = ["MOASHAScheduler", "CostASHAScheduler", "spread_order",
           "promotion_order", "promotes", "trend_residuals", "trend_promotes",
           "rung_milestones"]

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
