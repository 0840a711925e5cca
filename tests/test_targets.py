"""Vectors placed by cost: shifted offset patterns, uniform controls, the targets' spread."""

from __future__ import annotations

import pytest

from search.propose.space import RateSpace
from search.propose.targets import at_target, cost_of, cost_targets, uniform_at, unit_groups


@pytest.fixture(scope="module")
def r20() -> RateSpace:
    return RateSpace("resnet20", "cifar10", low=0.1, high=1.0, step=None)


@pytest.fixture(scope="module")
def r20_grid() -> RateSpace:
    return RateSpace("resnet20", "cifar10", low=0.1, high=1.0, step=0.05)


def test_groups_split_each_stage_in_halves(r20):
    # ResNet-20: three stages of three blocks; the first half of a stage holds two
    assert unit_groups(r20, "stages") == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert unit_groups(r20, "halves") == [[0, 1], [2], [3, 4], [5], [6, 7], [8]]
    assert unit_groups(r20, "units") == [[u] for u in range(9)]
    with pytest.raises(ValueError, match="halves, stages or units"):
        unit_groups(r20, "blocks")


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_the_uniform_control_is_the_dearest_uniform_vector_within_the_target(r20, target):
    rates = uniform_at(r20, target)
    assert len(set(rates)) == 1
    cost = cost_of(r20, rates)
    assert cost <= target
    # one channel more in the widest stage's units would pass the target: raise the rate
    # until the widths change and the cost is above it
    r = rates[0]
    while r20.cost([r] * 9).widths == r20.cost(rates).widths:
        r += 1e-3
    assert cost_of(r20, [r] * 9) > target


def test_an_offset_pattern_is_shifted_onto_the_target_keeping_its_shape(r20):
    groups = unit_groups(r20, "halves")
    offsets = [0.1, -0.1, 0.05, 0.0, -0.05, 0.1]
    rates = at_target(r20, offsets, 0.5, groups)
    assert cost_of(r20, rates) <= 0.5
    # the offsets survive the shift (no rate is clipped at this cost)
    shift = rates[0] - offsets[0]
    for off, g in zip(offsets, groups):
        for u in g:
            assert rates[u] == pytest.approx(off + shift)
    # zero offsets are the uniform control
    assert at_target(r20, [0.0] * 6, 0.5, groups) == pytest.approx(uniform_at(r20, 0.5))


def test_on_a_grid_every_rate_is_a_grid_value_and_an_unreachable_target_is_none(r20_grid):
    rates = at_target(r20_grid, [0.1, -0.1, 0.0, 0.0, 0.0, 0.1], 0.4,
                      unit_groups(r20_grid, "halves"))
    assert all(round(r / 0.05) * 0.05 == pytest.approx(r) for r in rates)
    assert cost_of(r20_grid, rates) <= 0.4
    lowest = cost_of(r20_grid, [0.1] * 9)
    assert uniform_at(r20_grid, lowest / 2) is None
    assert uniform_at(r20_grid, 1.0) == [1.0] * 9


def test_targets_spread_evenly_from_the_cheapest_vector_short_of_the_unpruned(r20_grid):
    ts = cost_targets(r20_grid, 5)
    assert ts[0] == pytest.approx(cost_of(r20_grid, [0.1] * 9))
    assert ts[-1] == pytest.approx(cost_of(r20_grid, [0.95] * 9)) and ts[-1] < 1.0
    steps = [b - a for a, b in zip(ts, ts[1:])]
    assert max(steps) == pytest.approx(min(steps))
    assert cost_targets(r20_grid, 0) == [] and cost_targets(r20_grid, 1, top=0.6) == [0.6]
