"""Ray Tune's side of the sampler: a public ``Searcher`` around :class:`RateProposer`.

:class:`SketchSearch` subclasses ``ray.tune.search.Searcher`` (suggest /
on_trial_result / on_trial_complete / save / restore) and leaves everything about the
study to :class:`search.propose.proposer.RateProposer` (multi-objective: max ``val_acc``, min
``flops`` and/or ``latency``; define-by-run :class:`~search.propose.space.RateSpace`; FLOPs and
latency budgets; PRUNED for
early stops). It says ``FINISHED`` at ``num_samples``; ``restore`` (``--resume``)
loads the saved state and reconciles the study with the trials Tune will continue.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import optuna
from ray import cloudpickle
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

from search.propose.proposer import OBJECTIVE_COLUMNS, RateProposer
from sketch_core.io.atomic import atomic_write_bytes

__all__ = ["SketchSearch", "SketchSearchGenerator", "search_algorithm"]

log = logging.getLogger("sketchtune.search")


class SketchSearch(Searcher):
    """Ray Tune searcher: proposals and results go through a :class:`RateProposer`."""

    def __init__(self, proposer: RateProposer) -> None:
        objectives = proposer.objectives
        super().__init__(metric=["val_acc"] + [OBJECTIVE_COLUMNS[o] for o in objectives[1:]],
                         mode=["max"] + ["min"] * (len(objectives) - 1))
        self.proposer = proposer

    @property
    def study(self) -> optuna.Study:
        return self.proposer.study

    @property
    def started(self) -> int:
        return self.proposer.started

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return True  # the space and objectives are the searcher's own

    def suggest(self, trial_id: str) -> dict | str | None:
        config = self.proposer.ask(trial_id)
        return Searcher.FINISHED if config is None else config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.proposer.note(trial_id, result)  # kept beside the trial, never a result

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.proposer.tell(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.proposer.state_dict(), f)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Save the state under Tune's file name, written beside the folder first
        (:func:`_save_beside`)."""
        _save_beside(checkpoint_dir, self.CKPT_FILE_TMPL.format(session_str),
                     pickle.dumps(self.proposer.state_dict()))

    def restore(self, checkpoint_path: str) -> None:
        """Load the state of Tune's last experiment snapshot, then reconcile the study.

        The trials Tune will continue are those suggested but not completed at that time.
        """
        with open(checkpoint_path, "rb") as f:
            self.proposer.load_state_dict(pickle.load(f))
        summary = self.reconcile(self.proposer.unfinished())
        log.info("study reconciled with the restored experiment: %s", summary)

    def reconcile(self, resumable: set[str]) -> dict[str, int]:
        """See :meth:`RateProposer.reconcile`."""
        return self.proposer.reconcile(resumable)


def _save_beside(folder: str, name: str, data: bytes) -> None:
    """Write ``folder/name`` whole, its temporary file in ``folder``'s parent.

    Tune's own saves write a temporary file inside the driver's folder and rename it.
    Tune copies that folder to the experiment in a background thread while the driver
    saves, so the copy could list a temporary file, find it renamed and log a
    traceback. Saved this way, the folder only ever holds complete files. Where the
    parent is not writable, the temporary file is written in ``folder``, as Tune does.
    """
    parent = os.path.dirname(os.path.abspath(folder))
    atomic_write_bytes(os.path.join(folder, name), data,
                       tmp_dir=parent if os.access(parent, os.W_OK) else None)


class SketchSearchGenerator(SearchGenerator):
    """Tune's ``SearchGenerator`` around a :class:`SketchSearch`, its own state saved
    like the searcher's (:func:`_save_beside`). Its file and contents are Tune's."""

    def save_to_dir(self, dirpath: str, session_str: str) -> None:
        state = self.get_state()
        inner = self.searcher
        while hasattr(inner, "searcher"):  # the wrappers' states, as Tune keeps them
            state["name:" + type(inner).__name__] = inner.get_state()
            inner = inner.searcher
        inner.save_to_dir(dirpath, session_str)
        _save_beside(dirpath, self.CKPT_FILE_TMPL.format(session_str), cloudpickle.dumps(state))


def search_algorithm(searcher: SketchSearch, max_concurrent: int | None) -> SketchSearchGenerator:
    """What ``TuneConfig(search_alg=...)`` takes: ``searcher`` behind Tune's
    ``ConcurrencyLimiter`` (at ``max_concurrent`` trials at once, when set), in a
    :class:`SketchSearchGenerator`. Pass ``max_concurrent_trials=None`` beside it."""
    inner = searcher if not max_concurrent else ConcurrencyLimiter(searcher, max_concurrent)
    return SketchSearchGenerator(inner)
