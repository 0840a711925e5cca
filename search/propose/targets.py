"""Cost targets: vectors placed at a chosen cost, and the groups their offsets move.

A uniform sweep covers the cost axis evenly; a sampler that draws rates independently
lands near the middle. Everything here places a vector *by its cost*: a pattern of
per-group offsets is shifted by one constant, bisected to the largest cost at or below
a target (:func:`at_target`); zero offsets give the uniform vector of that cost
(:func:`uniform_at`). :func:`cost_targets` spreads targets over the space's range the
way a uniform sweep spreads its points, and :func:`anchor_points` puts a search's first
(uniform) trials on them, none at the unpruned cost; :func:`unit_groups` names the groups whose
offsets a pattern holds (stage halves by default).
"""

from __future__ import annotations

from collections.abc import Sequence

from search.propose.space import RateSpace, stage_groups

__all__ = ["at_target", "uniform_at", "cost_targets", "anchor_points", "unit_groups", "cost_of"]

_STEPS = 40  # bisection steps on the shift: far below one channel of any real network


def cost_of(space: RateSpace, rates: Sequence[float], key: str = "flops_ratio") -> float:
    """The cost called ``key`` (``flops_ratio``, ``latency_ratio``, ...) of ``rates``."""
    value = space.cost(list(rates)).value(key)
    if value is None:
        raise ValueError(f"the space prices no {key}")
    return float(value)


def unit_groups(space: RateSpace, how: str = "halves") -> list[list[int]]:
    """Per-unit index groups: ``stages`` (:func:`~search.propose.space.stage_groups`),
    ``halves`` (each stage split into its first and second half, a stage of one unit
    kept whole) or ``units`` (one group per unit)."""
    if how == "units":
        return [[u] for u in range(space.num_units)]
    stages = stage_groups(space.arch)
    if how == "stages":
        return stages
    if how != "halves":
        raise ValueError(f"unit groups {how!r}: expected halves, stages or units")
    out: list[list[int]] = []
    for g in stages:
        k = (len(g) + 1) // 2
        out.extend(part for part in (g[:k], g[k:]) if part)
    return out


def _shifted(space: RateSpace, offsets: Sequence[float], groups: Sequence[Sequence[int]],
             shift: float) -> list[float]:
    rates = [space.high] * space.num_units
    for off, g in zip(offsets, groups):
        for u in g:
            rates[u] = space.snap_down(off + shift)
    return rates


def at_target(space: RateSpace, offsets: Sequence[float], target: float,
              groups: Sequence[Sequence[int]] | None = None, key: str = "flops_ratio"
              ) -> list[float] | None:
    """The per-unit vector ``offsets + c`` (one offset per group, clipped to the space
    and snapped to its grid) with the largest ``c`` whose cost ``key`` is at most
    ``target``; None when even the space's lowest rates cost more."""
    groups = unit_groups(space, "units") if groups is None else groups
    if len(offsets) != len(groups):
        raise ValueError(f"{len(offsets)} offsets for {len(groups)} groups")
    lo = space.low - max(offsets) - 1e-9   # every rate at space.low
    hi = space.high - min(offsets) + 1e-9  # every rate at space.high
    if cost_of(space, _shifted(space, offsets, groups, lo), key) > target + 1e-12:
        return None
    if cost_of(space, _shifted(space, offsets, groups, hi), key) <= target + 1e-12:
        return _shifted(space, offsets, groups, hi)
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        if cost_of(space, _shifted(space, offsets, groups, mid), key) <= target + 1e-12:
            lo = mid
        else:
            hi = mid
    return _shifted(space, offsets, groups, lo)


def uniform_at(space: RateSpace, target: float, key: str = "flops_ratio") -> list[float] | None:
    """The uniform vector of the largest cost at most ``target`` (None: none fits)."""
    return at_target(space, [0.0], target, [list(range(space.num_units))], key)


def cost_targets(space: RateSpace, count: int, key: str = "flops_ratio",
                 top: float | None = None) -> list[float]:
    """``count`` cost levels spread evenly from the space's cheapest vector (every rate
    at ``space.low``) to ``top`` (default: the cost of a uniform vector one grid step
    below ``space.high``, or 95% of it without a grid): no target at the unpruned cost.
    """
    if count <= 0:
        return []
    low = cost_of(space, [space.low] * space.num_units, key)
    if top is None:
        below = [g for g in (space.grid or []) if g < space.high - 1e-9]
        r = below[-1] if below else space.low + 0.95 * (space.high - space.low)
        top = cost_of(space, [r] * space.num_units, key)
    if count == 1:
        return [top]
    return [low + (top - low) * i / (count - 1) for i in range(count)]


def anchor_points(space: RateSpace, count: int, key: str = "flops_ratio",
                  budget: float | None = None) -> list[tuple[str, dict]]:
    """A search's ``count`` anchor trials: the uniform vectors (on the space's grid) of
    :func:`cost_targets` from the cheapest vector to ``budget`` (or to the default top
    when there is none or it is above it), as ``(text, params)``; a rate two targets
    share is listed once."""
    if count <= 0:
        return []
    top = None
    if budget is not None:
        top = min(budget, cost_targets(space, 1, key)[0])
    rates: list[float] = []
    for t in cost_targets(space, count, key, top):
        found = uniform_at(space, t, key)
        if found is not None and found[0] not in rates:
            rates.append(found[0])
    return [(f"[{r:g}]*{space.num_units}", {n: r for n in space.param_names}) for r in rates]
