"""The Optuna study of a search: its storage, its objectives, the budget constraint.

:class:`SQLiteStorage` keeps the study in a local SQLite file that a killed process
cannot corrupt (:func:`open_storage` opens it, or an RDB URL); :func:`open_study` creates
or loads the study (max ``val_acc``, min each cost objective); :func:`constrain` records
how far a proposal is above its budgets where the samplers read it. No Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from sketch_core.errors import UserError

__all__ = ["open_storage", "SQLiteStorage", "FlopsConstraint", "open_study", "constrain"]



def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage on a local SQLite file, in WAL mode with ``synchronous=NORMAL``.

    A commit then waits for no disk flush (docs/benchmarks.md has the figure). A killed process
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
        import sqlalchemy  # optional: sqlalchemy, only with an RDB storage

        sqlalchemy.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.engine.dispose()  # connections opened before the listener are dropped


class FlopsConstraint:
    """Optuna constraint (<= 0 is feasible): the largest cost - budget, from the trial's attrs."""

    def __call__(self, trial: optuna.trial.FrozenTrial) -> list[float]:
        return [float(trial.user_attrs.get("constraint", 0.0))]


HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5


def constrain(trial: optuna.Trial, value: float, name: str = "flops_budget") -> None:
    """Record the largest ``cost ratio - budget`` (<= 0 feasible) where the sampler reads it
    (``name``: ``flops_budget``, or ``budget`` when a latency budget takes part)."""
    trial.set_user_attr("constraint", value)
    if HAS_SET_CONSTRAINT:
        trial.set_constraint(name, value)


def open_study(storage: optuna.storages.BaseStorage | str | None, study_name: str,
               sampler: optuna.samplers.BaseSampler,
               objectives: Sequence[str] = ("val_acc", "flops")) -> optuna.Study:
    """The search's study (created, or loaded when it exists): max val_acc, then min each
    cost objective (``flops`` by default; ``latency``)."""
    directions = ["maximize"] + ["minimize"] * (len(objectives) - 1)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=study_name,
                                directions=directions, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise UserError(f"study {study_name!r} has {len(study.directions)} objectives, this "
                        f"config {len(directions)} ({', '.join(objectives)}); continue it with "
                        f"its own config or start a new search")
    return study


def open_storage(url: str | None, exp_dir: Path) -> tuple[Any, str]:
    """(storage, url) of a search's study: ``url`` (an Optuna RDB URL), or SQLite in the
    experiment folder; a UserError naming the URL when it cannot be opened."""
    url = url or f"sqlite:///{exp_dir / 'study.db'}"
    try:
        if url.startswith("sqlite:"):
            return SQLiteStorage(url), url
        return optuna.storages.RDBStorage(url), url
    except Exception as exc:  # SQLAlchemy and Optuna raise many kinds for a bad URL
        raise UserError(f"--study_storage {url}: cannot open it as an Optuna RDB storage "
                        f"({str(exc).splitlines()[0]})") from None
