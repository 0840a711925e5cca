"""The sampler and the proposer of a search plan: what both drivers ask for rate vectors.

:func:`make_proposer` builds the plan's Optuna sampler (:mod:`search.propose.samplers`)
and the :class:`~search.propose.proposer.RateProposer` around the study: the paper's
vectors and the uniform anchors first, every proposal priced and held to the budgets,
rejections logged in trials.jsonl. The Ray driver wraps it in a Tune searcher; the
local loop asks it directly.
"""

from __future__ import annotations

from typing import Any

from search.experiment.resolve import SearchPlan
from search.propose.proposer import RateProposer
from search.propose.samplers import make_sampler
from search.results.trials_file import TrialLog

__all__ = ["make_proposer"]


def make_proposer(plan: SearchPlan, study_storage: Any) -> RateProposer:
    """The plan's proposer, its study in ``study_storage`` under the plan's name."""
    s = plan.sampler
    sampler = make_sampler(s.name, s.seed, plan.num_samples, s.population_size,
                           constrained=bool(plan.budgets), space=plan.space,
                           budgets=plan.budgets, cost=plan.cost)
    return RateProposer(plan.space, sampler=sampler, storage=study_storage,
                        study_name=plan.name, full_epochs=plan.recipe.epochs,
                        num_samples=plan.num_samples, flops_policy=plan.flops_policy,
                        budgets=plan.budgets, objectives=plan.objectives,
                        points=list(plan.points), anchors=list(plan.anchors),
                        trial_log=TrialLog(plan.trials_file))
