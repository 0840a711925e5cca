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
- **Fronts.** :func:`fronts` sorts points into successive fronts (the front, then the
  front of what is left, ...), the non-dominated sorting of NSGA-II.
- **Hypervolume.** :func:`hypervolume` is the area dominated by (accuracy, cost) points
  and bounded by a reference point (by default accuracy 0 and cost ratio 1, so it lies in
  [0, 1] for fractions); :func:`hypervolume_of_loss` is the same for any number of
  minimised objectives. Only points on the front count, each once.

Optuna has no public routine for the front or the hypervolume of plain arrays
(``Study.best_trials`` works on a study's trials), so both are computed here; the tests
check them against Optuna's own routines and against brute force.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["front_mask", "front_indices", "fronts", "knee_index", "best_index", "hypervolume",
           "hypervolume_of_loss", "COST_COLUMNS"]

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


def fronts(acc: Values, cost: Values) -> list[list[int]]:
    """Indices of the points by successive front (max ``acc``, min ``cost``): the front,
    then the front of the rest, and so on; each front in input order. Points with a
    missing value come in no front."""
    a, c = _pair(acc, cost)
    loss = np.column_stack([-a, c])
    left = np.flatnonzero(np.isfinite(loss).all(axis=1))
    out: list[list[int]] = []
    while len(left):
        on = front_mask(loss[left])
        out.append([int(i) for i in left[on]])
        left = left[~on]
    return out


def _volume(rows: np.ndarray, ref: np.ndarray) -> float:
    """Dominated volume of ``rows`` (each <= ``ref`` in every column, minimised), by
    slicing along the last objective (exact; fine for the few objectives a search has)."""
    if len(rows) == 0:
        return 0.0
    if rows.shape[1] == 1:
        return float(ref[0] - rows[:, 0].min())
    rows = rows[front_mask(rows)]
    rows = np.unique(rows, axis=0)
    if rows.shape[1] == 2:
        order = np.argsort(rows[:, 0], kind="stable")
        xs, ys = rows[order, 0], rows[order, 1]  # on a 2-D front y falls as x rises
        widths = np.append(xs[1:], ref[0]) - xs
        return float(np.sum(widths * (ref[1] - ys)))
    last = np.unique(rows[:, -1])
    bounds = np.append(last[1:], ref[-1])
    total = 0.0
    for level, upper in zip(last, bounds):
        slab = rows[rows[:, -1] <= level][:, :-1]
        total += (upper - level) * _volume(slab, ref[:-1])
    return float(total)


def hypervolume_of_loss(loss: np.ndarray | Sequence[Sequence[float]],
                        ref: Sequence[float]) -> float:
    """Volume dominated by the rows of ``loss`` (every column minimised) and bounded by
    ``ref``; rows that are not below ``ref`` in every column, or not finite, add nothing."""
    rows = np.asarray(loss, dtype=float)
    ref_arr = np.asarray(ref, dtype=float)
    if rows.ndim != 2 or rows.shape[1] != len(ref_arr):
        raise ValueError(f"expected points x {len(ref_arr)} objectives, got shape {rows.shape}")
    keep = np.isfinite(rows).all(axis=1) & (rows < ref_arr).all(axis=1)
    return _volume(rows[keep], ref_arr)


def hypervolume(acc: Values, cost: Values, ref: tuple[float, float] = (0.0, 1.0)) -> float:
    """Area dominated by (``acc`` max, ``cost`` min) points and bounded by ``ref`` =
    (accuracy, cost); points not better than ``ref`` in both add nothing."""
    a, c = _pair(acc, cost)
    return hypervolume_of_loss(np.column_stack([-a, c]), (-float(ref[0]), float(ref[1])))
