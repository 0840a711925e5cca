"""A search's config and baseline, resolved once into the frozen :class:`SearchPlan`.

The search config is read here and nowhere below: :func:`plan_search` turns it (with the
baseline the experiment sketches and the experiment folder) into the architecture, the
rate space priced by its cost model (and the latency table when the search uses
latency), the budgets as fractions, the data request of the images that choose and
report, the sketch options and the trials' recipe, and the settings of the sampler, the
scheduler and the resources. The drivers (:mod:`search.run.ray_driver`,
:mod:`search.run.local_loop`) receive the plan, not the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.experiment.config import (ResourcesConfig, RetrainConfig, SamplerConfig,
                                      SchedulerConfig, SearchConfig)
from search.experiment.pricing import budget_words, budgets, rate_space
from search.experiment.scoring_split import data_request
from search.propose.space import RateSpace
from search.propose.targets import anchor_points
from search.results.pareto import COST_COLUMNS
from sketch_core.data.request import DataRequest
from sketch_core.errors import UserError
from sketch_core.options import Recipe, SketchOptions
from sketch_core.registry import Arch

__all__ = ["SearchPlan", "plan_search"]


@dataclass(frozen=True)
class SearchPlan:
    """Everything a search's drivers need, resolved from its config and baseline."""

    name: str
    exp_dir: Path
    storage_path: str
    baseline: dict[str, Any]
    arch: Arch
    space: RateSpace
    budgets: dict[str, float] | None  # {cost ratio column: fraction of the unpruned}
    objectives: tuple[str, ...]
    cost_axis: str                     # flops or latency
    cost: str                          # the front's cost axis as a ratio column
    points: tuple[tuple[str, dict], ...]   # the paper's vectors, run first
    anchors: tuple[tuple[str, dict], ...]  # uniform vectors across the cost range
    data: DataRequest                  # the trials' images: val chooses, test reports
    options: SketchOptions
    recipe: Recipe
    round_to: int
    train_images: int | None
    val_images: int | None
    threads: int | None
    num_samples: int | None
    time_budget_s: float | None
    flops_policy: str
    sampler: SamplerConfig
    scheduler: SchedulerConfig
    resources: ResourcesConfig
    retrain: RetrainConfig
    early_stopping_note: str | None = None
    budget_text: str = ""              # ", budget 2h, FLOPs <= 50%": for the start line

    @property
    def trials_file(self) -> Path:
        return self.exp_dir / "trials.jsonl"


def plan_search(config: SearchConfig, baseline: dict, exp_dir: Path, name: str,
                storage_path: str) -> SearchPlan:
    """The plan of the search ``config`` describes, on ``baseline`` (the manifest's
    summary), in ``exp_dir``."""
    space = rate_space(config, baseline, exp_dir)
    limits = budgets(config, space)
    space.check_budget(limits)
    cost_key = COST_COLUMNS[config.cost_axis][0]
    t, r = config.trial, config.resources
    data = data_request(config.model, t, baseline.get("scores"),
                        normalize=baseline.get("normalize"))
    return SearchPlan(
        name=name, exp_dir=exp_dir, storage_path=storage_path, baseline=dict(baseline),
        arch=space.arch, space=space, budgets=limits, objectives=tuple(config.objectives),
        cost_axis=config.cost_axis, cost=cost_key,
        points=tuple(space.paper_points(config.space.paper_rates)),
        anchors=tuple(anchor_points(space, config.sampler.anchors, cost_key,
                                    (limits or {}).get(cost_key))), data=data,
        options=config.sketch.options(), recipe=t.recipe(), round_to=config.space.round_to,
        train_images=t.train_images, val_images=t.val_images,
        threads=t.threads or max(1, int(r.cpu or 1)), num_samples=config.budget.num_samples,
        time_budget_s=config.time_budget_s, flops_policy=config.budget.flops_policy,
        sampler=config.sampler, scheduler=config.scheduler, resources=r,
        retrain=config.retrain, early_stopping_note=config.early_stopping_note,
        budget_text=(f", budget {config.budget.time}" if config.budget.time else "")
        + budget_words(config))
