"""The samplers that propose rate vectors, one a module; :func:`make_sampler` picks one.

``nsga2`` (:mod:`.nsga2`, the default), ``tpe`` and ``random`` (Optuna's own), and
``surrogate`` (:mod:`.surrogate`, a model-based sampler of the rate space).
"""

from __future__ import annotations

from typing import Any

import optuna

from search.propose.samplers.nsga2 import NSGAIISampler
from search.propose.samplers.surrogate import SurrogateSampler
from search.propose.study import HAS_SET_CONSTRAINT, FlopsConstraint

__all__ = ["make_sampler", "population_size"]


def population_size(num_samples: int | None, requested: int | None = None) -> int:
    """NSGA-II population sized to the trial budget: about a quarter of it, 4..50."""
    if requested:
        return requested
    if not num_samples:
        return 20
    return int(min(50, max(4, round(num_samples / 4))))


def make_sampler(name: str, seed: int = 0, num_samples: int | None = None,
                 population: int | None = None, constrained: bool = False,
                 space: Any = None, flops_budget: float | None = None,
                 budgets: dict[str, float] | None = None, cost: str = "flops_ratio"
                 ) -> optuna.samplers.BaseSampler:
    """``nsga2`` (default), ``tpe``, ``random`` or ``surrogate``, seeded; constrained when a
    budget is set. ``surrogate`` (:mod:`search.propose.samplers.surrogate`) needs the ``space`` it proposes
    in, and keeps below ``flops_budget`` (or every one of ``budgets``) itself; ``cost``
    (``flops_ratio`` or ``latency_ratio``) is the cost axis of its front."""
    # Optuna 5 reads constraints set on the trial; older versions need constraints_func
    cons = FlopsConstraint() if constrained and not HAS_SET_CONSTRAINT else None
    if name == "nsga2":
        return NSGAIISampler(population_size=population_size(num_samples, population),
                                             seed=seed, constraints_func=cons)
    if name == "tpe":
        startup = max(4, min(10, (num_samples or 40) // 4))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                          multivariate=True, constraints_func=cons)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "surrogate":
        if space is None:
            raise ValueError("the surrogate sampler needs the rate space")
        return SurrogateSampler(space, seed=seed, flops_budget=flops_budget, budgets=budgets,
                                cost=cost)
    raise ValueError(f"unknown sampler {name!r}")
