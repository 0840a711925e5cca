"""The Pareto front, its knee and the best point: one rule for every caller, on plain arrays.

Points are (accuracy, cost) pairs: accuracy is maximised, cost (FLOPs, or their ratio
to the unpruned network) minimised. :func:`front_mask` also takes a loss matrix of any
number of objectives, every column minimised.

- **Front.** A point is on the front unless another point is at least as good in every
  objective and strictly better in one. Exact duplicates do not dominate each other,
  so every copy of a non-dominated point is on the front. A point with a non-finite
  value (NaN, inf) is never on the front and dominates nothing.
- **Order.** :func:`front_indices` lists the front by cost, lowest first. Two front
  points of equal cost also have equal accuracy (otherwise one would dominate the
  other), so the only ties left are exact duplicates, which keep their input order.
- **Knee.** Each axis is scaled to [0, 1] over the front (an axis that does not vary
  stays 0); the knee is the front point farthest from the straight line between the
  front's two ends (lowest cost, highest cost). Distances equal to 12 decimals tie;
  a tie goes to the more accurate point, then to the earliest in input order. So on a
  front of one or two distinct points the knee is the most accurate point.
- **Best.** :func:`best_index` is the most accurate point (optionally among those with
  cost at most a bound); ties go to the lower cost, then to the earliest.

Optuna has no public routine for the front of plain arrays (``Study.best_trials``
works on a study's trials), so the front is computed here; the tests check it against
Optuna's own non-domination routine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["front_mask", "front_indices", "knee_index", "best_index", "COST_COLUMNS"]

# the cost axes a front is drawn on -> (the fraction of the unpruned, the absolute column)
COST_COLUMNS = {"flops": ("flops_ratio", "flops"), "latency": ("latency_ratio", "latency_ms")}

Values = Sequence[float | None] | np.ndarray


def _unique_front(rows: np.ndarray) -> np.ndarray:
    """Non-domination of distinct rows sorted lexicographically (all columns minimised).

    In lexicographic order a row can only be dominated by an earlier one, and when
    some earlier row dominates it, so does an earlier row that is itself on the front.
    """
    m, k = rows.shape
    on = np.zeros(m, dtype=bool)
    if m == 0:
        return on
    if k == 1:
        on[0] = True
        return on
    if k == 2:
        # the second column must reach a new minimum (rows of an equal first column
        # come with a larger second one, so they never do)
        lowest = np.minimum.accumulate(rows[:, 1])
        on[0] = True
        on[1:] = rows[1:, 1] < lowest[:-1]
        return on
    kept: list[int] = []
    for i in range(m):
        if not kept or not np.any(np.all(rows[kept] <= rows[i], axis=1)):
            kept.append(i)
    on[kept] = True
    return on


def front_mask(loss: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Which rows of ``loss`` (n points x k objectives, every column minimised) are on the front.

    The rule is the module's: non-dominated rows, every copy of a duplicate, never a row
    with a non-finite value. A 1-D array is one objective.
    """
    values = np.asarray(loss, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"expected a matrix of points x objectives, got shape {values.shape}")
    on = np.zeros(len(values), dtype=bool)
    finite = np.flatnonzero(np.isfinite(values).all(axis=1))
    if len(finite) == 0 or values.shape[1] == 0:
        return on
    rows, inverse = np.unique(values[finite], axis=0, return_inverse=True)
    on[finite] = _unique_front(rows)[inverse.reshape(-1)]
    return on


def _pair(acc: Values, cost: Values) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(acc, dtype=float).reshape(-1)
    c = np.asarray(cost, dtype=float).reshape(-1)
    if a.shape != c.shape:
        raise ValueError(f"accuracy and cost differ in length ({len(a)} and {len(c)})")
    return a, c


def front_indices(acc: Values, cost: Values) -> np.ndarray:
    """Indices of the front's points (max ``acc``, min ``cost``), lowest cost first.

    None and NaN count as missing: such a point is never on the front.
    """
    a, c = _pair(acc, cost)
    idx = np.flatnonzero(front_mask(np.column_stack([-a, c])))
    return idx[np.lexsort((idx, -a[idx], c[idx]))]


def knee_index(acc: Values, cost: Values) -> int | None:
    """Index of the front's knee (see the module docstring); None when there is no front."""
    a, c = _pair(acc, cost)
    front = front_indices(a, c)
    if len(front) == 0:
        return None
    xs, ys = c[front], a[front]
    sx = float(xs.max() - xs.min()) or 1.0
    sy = float(ys.max() - ys.min()) or 1.0
    px, py = (xs - xs.min()) / sx, (ys - ys.min()) / sy
    ax, ay, bx, by = px[0], py[0], px[-1], py[-1]
    norm = math.hypot(bx - ax, by - ay) or 1.0
    dist = np.abs((bx - ax) * (ay - py) - (ax - px) * (by - ay)) / norm
    dist = np.array([round(float(d), 12) for d in dist])
    return int(front[np.lexsort((front, -ys, -dist))[0]])


def best_index(acc: Values, cost: Values, max_cost: float | None = None) -> int | None:
    """Index of the most accurate point (ties: lower cost, then the earliest).

    With ``max_cost``, only points whose cost is at most that compete; points with a
    missing accuracy or cost never do. None when no point qualifies.
    """
    a, c = _pair(acc, cost)
    ok = np.isfinite(a) & np.isfinite(c)
    if max_cost is not None:
        ok &= c <= max_cost
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return None
    return int(idx[np.lexsort((idx, c[idx], -a[idx]))[0]])
