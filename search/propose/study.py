"""The Optuna side that needs no Ray: storage, sampler choice, the FLOPs constraint.

:class:`SQLiteStorage` keeps the study in a local SQLite file that a killed process
cannot corrupt; :func:`make_sampler` picks NSGA-II (default), TPE or random search,
seeded and constrained when a FLOPs budget is set; :func:`open_study` creates or loads
the two-objective study (max ``val_acc``, min ``flops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from search.propose.optuna_compat import NSGAIISampler

__all__ = ["SQLiteStorage", "FlopsConstraint", "make_sampler", "population_size",
           "open_study", "constrain", "METRICS", "MODES"]

METRICS = ["val_acc", "flops"]
MODES = ["max", "min"]
_DIRECTIONS = {"max": "maximize", "min": "minimize"}


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage on a local SQLite file, in WAL mode with ``synchronous=NORMAL``.

    A commit then waits for no disk flush: measured here, an ask/suggest/tell cycle of a
    9-rate trial took 0.19 s with SQLite's defaults and 0.03 s this way. A killed process
    loses nothing (the log is in the OS's hands); a power cut may lose the last commits.
    Picklable like its parent (Ray Tune saves the searcher with it).
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._tune()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._tune()

    def _tune(self) -> None:
        import sqlalchemy

        sqlalchemy.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.engine.dispose()  # connections opened before the listener are dropped


class FlopsConstraint:
    """Optuna constraint (<= 0 is feasible): the largest cost - budget, from the trial's attrs."""

    def __call__(self, trial: optuna.trial.FrozenTrial) -> list[float]:
        return [float(trial.user_attrs.get("constraint", 0.0))]


_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5


def constrain(trial: optuna.Trial, value: float, name: str = "flops_budget") -> None:
    """Record the largest ``cost ratio - budget`` (<= 0 feasible) where the sampler reads it
    (``name``: ``flops_budget``, or ``budget`` when a latency budget takes part)."""
    trial.set_user_attr("constraint", value)
    if _HAS_SET_CONSTRAINT:
        trial.set_constraint(name, value)


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
    cons = FlopsConstraint() if constrained and not _HAS_SET_CONSTRAINT else None
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
        from search.propose.samplers.surrogate import SurrogateSampler

        return SurrogateSampler(space, seed=seed, flops_budget=flops_budget, budgets=budgets,
                                cost=cost)
    raise ValueError(f"unknown sampler {name!r}")


def open_study(storage: optuna.storages.BaseStorage | str | None, study_name: str,
               sampler: optuna.samplers.BaseSampler,
               objectives: Sequence[str] = ("val_acc", "flops")) -> optuna.Study:
    """The search's study (created, or loaded when it exists): max val_acc, then min each
    cost objective (``flops`` by default; ``latency``)."""
    directions = ["maximize"] + ["minimize"] * (len(objectives) - 1)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=study_name,
                                directions=directions, load_if_exists=True)
    if len(study.directions) != len(directions):
        from sketch_core.errors import UserError

        raise UserError(f"study {study_name!r} has {len(study.directions)} objectives, this "
                        f"config {len(directions)} ({', '.join(objectives)}); continue it with "
                        f"its own config or start a new search")
    return study
