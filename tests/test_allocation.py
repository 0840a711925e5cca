"""Allocation at a cost target on generated tasks whose optimum is known."""

from __future__ import annotations

import numpy as np
import pytest

from search.propose.allocation import Evaluation, allocate, pattern, probe_sensitivity
from search.propose.space import RateSpace
from search.propose.targets import at_target, cost_of, uniform_at, unit_groups


@pytest.fixture(scope="module")
def space() -> RateSpace:
    return RateSpace("resnet20", "cifar10", low=0.1, high=1.0, step=None)


def _task(space: RateSpace, weights: list[float], groups):
    """Loss = sum over groups of weight x mean (1 - rate)^2: a group's harm per rate
    lost grows with its weight. ResNet-20's three stages cost the same MACs, so the
    optimum at a fixed cost gives the heavier stage the higher rate."""
    calls = []

    def evaluate(rates):
        calls.append(list(rates))
        loss = sum(w * np.mean([(1 - rates[u]) ** 2 for u in g]) for w, g in zip(weights, groups))
        return Evaluation(acc=1 - loss, loss=loss)
    return evaluate, calls


def test_the_three_stages_cost_the_same(space):
    # the premise of the generated task: lowering any one stage saves the same MACs
    saved = []
    for g in unit_groups(space, "stages"):
        rates = [1.0] * 9
        for u in g:
            rates[u] = 0.5
        saved.append(1 - cost_of(space, rates))
    assert max(saved) - min(saved) < 0.02


@pytest.mark.parametrize("weights", [[1.0, 4.0, 2.0], [3.0, 1.0, 0.5], [0.5, 1.0, 6.0]])
def test_probes_rank_the_stages_and_the_allocation_follows_the_weights(space, weights):
    groups = unit_groups(space, "stages")
    evaluate, calls = _task(space, weights, groups)
    control = uniform_at(space, 0.5)
    sens, probes = probe_sensitivity(evaluate, space, control, groups)
    assert np.argsort(sens).tolist() == np.argsort(weights).tolist()
    assert len(probes) == 3
    found = allocate(evaluate, space, 0.5, groups, seed=0)
    assert not found.kept_control
    assert cost_of(space, found.chosen) <= 0.5
    stage_rate = [np.mean([found.chosen[u] for u in g]) for g in groups]
    assert np.argsort(stage_rate).tolist() == np.argsort(weights).tolist()
    by_hand = evaluate(found.chosen).loss
    assert by_hand < evaluate(control).loss
    # it is about as good as the best of 300 random patterns at the same cost
    rng = np.random.default_rng(1)
    best_random = min(evaluate(at_target(space, rng.uniform(-0.3, 0.3, 3).tolist(), 0.5,
                                         groups)).loss for _ in range(300))
    assert by_hand <= best_random + 0.1 * (evaluate(control).loss - best_random)


def test_equal_harm_keeps_the_uniform_control(space):
    # harm per MAC equal everywhere: every pattern is a zero pattern, the control stays
    groups = unit_groups(space, "stages")
    evaluate, calls = _task(space, [1.0, 1.0, 1.0], groups)
    found = allocate(evaluate, space, 0.4, groups, refine=0)
    assert found.kept_control and found.chosen == uniform_at(space, 0.4)
    assert pattern([2.0, 2.0, 2.0], 0.3) == [0.0, 0.0, 0.0]


def test_a_pattern_must_win_on_the_choosing_images_to_replace_the_control(space):
    # an evaluation where every vector but the control scores worse: the control stays,
    # however strong the (misleading) probes
    groups = unit_groups(space, "halves")
    control = uniform_at(space, 0.3)

    def evaluate(rates):
        if rates == control:
            return Evaluation(0.7, 1.0)
        return Evaluation(0.6, 1.0 + rates[0])
    found = allocate(evaluate, space, 0.3, groups)
    assert found.kept_control
    assert len(found.tried) > 1 + len(groups)  # probes, patterns, trust-region steps


def test_pattern_is_linear_in_rank():
    assert pattern([5.0, 1.0, 3.0], 0.2) == pytest.approx([0.2, -0.2, 0.0])
    assert pattern([1.0, float("inf")], 0.1) == pytest.approx([-0.1, 0.1])
    assert pattern([1.0], 0.3) == [0.0]
