"""The real-data allocation benchmark's choices read only the choosing images, and its
ledger counts every evaluation a method asked for (on a generated stand-in task)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _allocation_real import CALIBRATION_IMAGES, SeedView, greedy  # noqa: E402
from _real_task import Outcome  # noqa: E402

from search.propose.allocation import allocate  # noqa: E402
from search.propose.space import RateSpace  # noqa: E402
from search.propose.targets import unit_groups  # noqa: E402

POOL = 400
CHOOSE = np.arange(0, POOL, 2)   # even positions choose
REPORT = np.arange(1, POOL, 2)   # odd ones report


class StandIn:
    """A task whose per-image hits are a seeded function of the widths; ``poison``
    replaces every reporting image's hit and loss by noise of its own seed."""

    def __init__(self, poison: int | None = None) -> None:
        self.space = RateSpace("resnet20", "cifar10", low=0.1, high=1.0, step=None)
        self.poison, self.reads = poison, 0

    def evaluate(self, rates):
        cost = self.space.cost(rates)
        self.reads += 1
        rng = np.random.default_rng(abs(hash(cost.widths)) % 2**32)
        quality = np.mean([r * (1 + u % 3) for u, r in enumerate(rates)]) / 2
        hit = rng.random(POOL) < quality
        loss = rng.random(POOL).astype(np.float32) + (1 - quality)
        if self.poison is not None:
            noise = np.random.default_rng(self.poison)
            hit[REPORT] = noise.random(len(REPORT)) < 0.5
            loss[REPORT] = noise.random(len(REPORT))
        return Outcome(list(rates), cost.widths, cost.flops_ratio, hit, loss)


def _choices(task: StandIn) -> tuple[list, list, SeedView]:
    groups = unit_groups(task.space, "halves")
    view = SeedView(task, CHOOSE)
    searched = [allocate(view, task.space, t, groups, seed=0).chosen for t in (0.3, 0.6)]
    picked = [greedy(SeedView(task, CHOOSE), task, t) for t in (0.3, 0.6)]
    return searched, picked, view


def test_no_choice_changes_when_the_reporting_images_do():
    clean = _choices(StandIn())
    for seed in (1, 2):
        poisoned = _choices(StandIn(poison=seed))
        assert poisoned[0] == clean[0] and poisoned[1] == clean[1]


def test_the_ledger_counts_each_vector_asked_for_once_by_its_macs():
    task = StandIn()
    view = SeedView(task, CHOOSE)
    a, b = [0.5] * 9, [0.3] * 9
    for rates in (a, b, a):
        view(rates)
    ra, rb = (task.space.cost(r).flops_ratio for r in (a, b))
    by_hand = sum(CALIBRATION_IMAGES * (1 + r) + CALIBRATION_IMAGES * r + len(CHOOSE) * r
                  for r in (ra, rb))
    assert view.ledger() == pytest.approx(by_hand)
    assert len(view.asked) == 2 and task.reads == 3
