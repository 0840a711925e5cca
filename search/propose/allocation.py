"""Per-layer allocation at a cost target, learnt from cheap zero-shot evaluations.

At one cost target the uniform vector is the control. :func:`probe_sensitivity` lowers
one group of units at a time (by ``delta`` below the control) and records how much the
choosing loss rises per unit of cost saved: the groups' sensitivities (a rung 0, cheap
when each evaluation is zero-shot). :func:`allocate` turns them into offset patterns
(the more sensitive a group, the higher its rate; several strengths), shifts each onto
the target (:func:`search.propose.targets.at_target`), refines the best in a trust
region around it, and keeps whichever vector the choosing images rank best, the
control included: a pattern must win on the choosing images to replace it.

Nothing here knows how a vector is scored: ``evaluate(rates)`` returns a
:class:`Evaluation` (accuracy and mean loss on the images that choose), so the same
code runs on a search's trials and on a synthetic task with a known optimum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from search.propose.space import RateSpace
from search.propose.targets import at_target, cost_of, uniform_at

__all__ = ["Evaluation", "Allocation", "probe_sensitivity", "allocate", "pattern", "better"]


@dataclass(frozen=True)
class Evaluation:
    """One vector on the images that choose: accuracy (higher is better), mean loss."""

    acc: float
    loss: float


Evaluate = Callable[[list[float]], Evaluation]


@dataclass
class Allocation:
    """What :func:`allocate` found at one target: the chosen vector, the control, every
    vector it evaluated (in order) and the groups' sensitivities."""

    target: float
    control: list[float]
    chosen: list[float]
    sensitivity: list[float]
    tried: list[tuple[list[float], Evaluation]] = field(default_factory=list)

    @property
    def kept_control(self) -> bool:
        return self.chosen == self.control


def _lowered(space: RateSpace, rates: Sequence[float], group: Sequence[int],
             delta: float) -> list[float]:
    out = list(rates)
    for u in group:
        out[u] = max(space.low, out[u] - delta)
    return out


def probe_sensitivity(evaluate: Evaluate, space: RateSpace, control: list[float],
                      groups: Sequence[Sequence[int]], *, delta: float = 0.1,
                      key: str = "flops_ratio", base: Evaluation | None = None
                      ) -> tuple[list[float], list[tuple[list[float], Evaluation]]]:
    """Each group's rise in choosing loss per unit of cost saved when it alone is lowered
    by ``delta`` from ``control``; a group that cannot be lowered gets +inf (keep it).
    Returns the sensitivities and the probes evaluated."""
    base = evaluate(control) if base is None else base
    c0 = cost_of(space, control, key)
    sens, tried = [], []
    for g in groups:
        rates = _lowered(space, control, g, delta)
        saved = c0 - cost_of(space, rates, key)
        if saved <= 1e-12:
            sens.append(float("inf"))
            continue
        ev = evaluate(rates)
        tried.append((rates, ev))
        sens.append((ev.loss - base.loss) / saved)
    return sens, tried


def pattern(sensitivity: Sequence[float], strength: float) -> list[float]:
    """Offsets from ``-strength`` (the least sensitive group) to ``+strength`` (the most),
    linear in the groups' sensitivity rank (ties share their mean rank)."""
    s = np.asarray(sensitivity, dtype=float)
    n = len(s)
    if n < 2:
        return [0.0] * n
    order = np.argsort(np.where(np.isfinite(s), s, np.inf), kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=float)
    for v in np.unique(s):  # ties: mean rank
        ranks[s == v] = ranks[s == v].mean()
    return (strength * (2 * ranks / (n - 1) - 1)).tolist()


def better(a: Evaluation, b: Evaluation) -> bool:
    """``a`` beats ``b`` on the choosing images: higher accuracy, then lower loss."""
    return (a.acc, -a.loss) > (b.acc, -b.loss)


def allocate(evaluate: Evaluate, space: RateSpace, target: float,
             groups: Sequence[Sequence[int]], *, strengths: Sequence[float] = (0.15, 0.3),
             delta: float = 0.1, refine: int = 2, radius: float = 0.05, seed: int = 0,
             key: str = "flops_ratio") -> Allocation | None:
    """The best vector found at ``target``: probe, pattern at each strength, refine the
    best pattern by ``refine`` trust-region steps of ``radius``; the control unless a
    vector beats it on the choosing images. None when no vector meets the target."""
    control = uniform_at(space, target, key)
    if control is None:
        return None
    base = evaluate(control)
    sens, tried = probe_sensitivity(evaluate, space, control, groups, delta=delta, key=key,
                                    base=base)
    out = Allocation(target, control, control, sens, [(control, base), *tried])
    best_offsets, best_ev = [0.0] * len(groups), base
    patterns = [pattern(sens, s) for s in strengths]
    rng = np.random.default_rng(seed)
    for step in range(len(patterns) + refine):
        if step < len(patterns):
            offsets = patterns[step]
        else:  # a step around the best pattern so far
            offsets = (np.asarray(best_offsets) + rng.normal(0, radius, len(groups))).tolist()
        rates = at_target(space, offsets, target, groups, key)
        if rates is None or any(rates == r for r, _ in out.tried):
            continue
        ev = evaluate(rates)
        out.tried.append((rates, ev))
        if better(ev, best_ev):
            best_offsets, best_ev, out.chosen = offsets, ev, rates
    return out
