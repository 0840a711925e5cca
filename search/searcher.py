"""Ray Tune's side of the sampler: a public ``Searcher`` around :class:`RateProposer`.

:class:`SketchSearch` subclasses ``ray.tune.search.Searcher`` (suggest /
on_trial_result / on_trial_complete / save / restore) and leaves everything about the
study to :class:`search.proposer.RateProposer` (multi-objective: max ``val_acc``, min
``flops`` and/or ``latency``; define-by-run :class:`~search.space.RateSpace`; FLOPs and
latency budgets; PRUNED for
early stops). It says ``FINISHED`` at ``num_samples``; ``restore`` (``--resume``)
loads the saved state and reconciles the study with the trials Tune will continue.
The Ray-free names (storage, samplers, :func:`outcome`) are re-exported from here.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from typing import Any

import optuna
from ray.tune.search import Searcher

from search.proposer import (MAX_REJECTIONS, OBJECTIVE_COLUMNS, RateProposer, close_unstarted,
                             outcome)
from search.records import TrialLog
from search.sampling import (METRICS, MODES, FlopsConstraint, SQLiteStorage, make_sampler,
                             population_size)
from search.space import RateSpace

__all__ = ["SketchSearch", "SQLiteStorage", "make_sampler", "population_size", "FlopsConstraint",
           "close_unstarted", "outcome", "METRICS", "MODES", "MAX_REJECTIONS"]

log = logging.getLogger("sketchtune.search")


class SketchSearch(Searcher):
    """Ray Tune searcher: proposals and results go through a :class:`RateProposer`."""

    def __init__(self, space: RateSpace, *, sampler: optuna.samplers.BaseSampler,
                 storage: optuna.storages.BaseStorage | None, study_name: str,
                 full_epochs: int, num_samples: int | None = None,
                 flops_budget: float | None = None, flops_policy: str = "reject",
                 points: list[tuple[str, dict]] | None = None,
                 anchors: list[tuple[str, dict]] | None = None,
                 trial_log: TrialLog | None = None,
                 budgets: dict[str, float] | None = None,
                 objectives: list[str] | tuple[str, ...] = ("val_acc", "flops")) -> None:
        super().__init__(metric=["val_acc"] + [OBJECTIVE_COLUMNS[o] for o in objectives[1:]],
                         mode=["max"] + ["min"] * (len(objectives) - 1))
        self.proposer = RateProposer(
            space, sampler=sampler, storage=storage, study_name=study_name,
            full_epochs=full_epochs, num_samples=num_samples, flops_budget=flops_budget,
            flops_policy=flops_policy, points=points, anchors=anchors, trial_log=trial_log,
            budgets=budgets, objectives=objectives)

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
        """Save the state under Tune's file name, writing it first beside the folder.

        Tune's own version writes a temporary file inside ``checkpoint_dir`` and renames
        it. Tune copies that folder to the experiment in a background thread while the
        driver saves, so the copy could list the temporary file, find it renamed and log a
        traceback. Here the folder only ever holds complete states.
        """
        final = os.path.join(checkpoint_dir, self.CKPT_FILE_TMPL.format(session_str))
        parent = os.path.dirname(os.path.abspath(checkpoint_dir))
        fd, tmp = tempfile.mkstemp(prefix=".searcher-state-", suffix=".pkl", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(self.proposer.state_dict(), f)
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

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
