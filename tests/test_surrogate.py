"""The surrogate sampler: stopped trials reach it, never a result; proposals it makes."""

from __future__ import annotations

import pickle

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search.propose.proposer import RateProposer
from search.propose.samplers import make_sampler
from search.propose.study import SQLiteStorage
from search.propose.space import RateSpace
from search.propose.targets import anchor_points
from search.propose.samplers.surrogate import STOPPED_WEIGHT, SurrogateSampler, observations, rung_key

optuna.logging.set_verbosity(optuna.logging.WARNING)

FULL = 3


def _space() -> RateSpace:
    return RateSpace("resnet20", "digits", low=0.1, high=1.0, step=0.05, in_channels=1,
                     input_size=8)


def _acc(rates: list[float]) -> float:
    """A smooth task: accuracy rises with every rate, the first blocks matter most."""
    sens = np.linspace(2.0, 0.2, len(rates))
    return float(0.95 - 0.9 * np.sum(sens * (1 - np.array(rates)) ** 2) / sens.sum())


def _run(proposer: RateProposer, key: str, rates_acc=_acc, stop_at: int | None = None,
         offset: float = 0.1) -> dict:
    """One trial through ask / note / tell: its score climbs ``offset`` over the epochs."""
    config = proposer.ask(key)
    final = rates_acc(config["rates"])
    flops = proposer.space.cost(config["rates"]).flops
    last = None
    for epoch in range(0, (FULL if stop_at is None else stop_at) + 1):
        last = {"val_acc": final - offset * (FULL - epoch) / FULL, "flops": flops,
                "epoch": epoch}
        proposer.note(key, last)
    proposer.tell(key, last)
    return config


def _proposer(tmp_path, sampler, name="s") -> RateProposer:
    return RateProposer(_space(), sampler=sampler,
                        storage=SQLiteStorage(f"sqlite:///{tmp_path / 'study.db'}"),
                        study_name=name, full_epochs=FULL)


def test_a_stopped_trial_informs_the_sampler_and_is_never_a_result(tmp_path):
    space = _space()
    sampler = make_sampler("surrogate", seed=0, space=space)
    proposer = _proposer(tmp_path, sampler)
    for i in range(9):
        _run(proposer, f"c{i}")  # completed: final = score after 1 epoch + 2/3 of 0.1
    worse = lambda rates: _acc(rates) - 0.3  # noqa: E731  a surprise the curve reveals early
    stopped_cfg = _run(proposer, "stop", rates_acc=worse, stop_at=1)
    study = proposer.study
    (stopped,) = [t for t in study.trials if t.user_attrs.get("tune_trial_id") == "stop"]
    assert stopped.state == TrialState.PRUNED and stopped.values is None
    assert stopped.user_attrs["status"] == "stopped"
    assert stopped.user_attrs[rung_key(0)] < stopped.user_attrs[rung_key(1)]
    assert rung_key(2) not in stopped.user_attrs
    assert stopped not in study.best_trials  # not on the study's front
    assert all(t.state == TrialState.COMPLETE for t in study.best_trials)

    obs = {o.number: o for o in observations(study, space)}
    seen = obs[stopped.number]
    assert seen.stopped and seen.weight == STOPPED_WEIGHT
    # the completed trials' curves say final = score at epoch 1 + 0.0667: so its estimate
    assert seen.acc == pytest.approx(worse(stopped_cfg["rates"]), abs=1e-6)
    assert sum(not o.stopped for o in obs.values()) == 9

    # the same study without the stopped trial, and a sampler in the same random state
    (tmp_path / "b").mkdir()
    other = _proposer(tmp_path / "b", pickle.loads(pickle.dumps(sampler)), "b")
    for t in study.trials:
        if t.user_attrs.get("tune_trial_id") != "stop":
            other.study.add_trial(t)
    proposer.ask("next")
    other.ask("next")
    assert any(o.stopped for o in sampler.last_fit["observations"])
    assert not any(o.stopped for o in other.sampler.last_fit["observations"])
    at = [[stopped_cfg["rates"][g[0]] for g in space.groups]]
    with_stop, without = sampler.predict(at)[0][0], other.sampler.predict(at)[0][0]
    assert with_stop < without - 0.01  # the model learnt what the stopped trial showed


def test_proposals_stay_in_the_space_below_the_budget_and_are_new(tmp_path):
    space = _space()
    sampler = SurrogateSampler(space, seed=1, flops_budget=0.5, startup=4)
    proposer = RateProposer(space, sampler=sampler, storage=None, study_name="b",
                            full_epochs=FULL, flops_budget=0.5,
                            anchors=anchor_points(space, 4))
    vectors = []
    for i in range(16):
        config = _run(proposer, f"t{i}")
        vectors.append(tuple(config["rates"]))
        assert space.in_space(config["rates"])
        assert space.cost(config["rates"]).flops_ratio <= 0.5 + 1e-12
    assert sampler.last_fit["model"] is not None  # the model proposed the later ones
    assert len(set(vectors)) == len(vectors)
    rejected = [t for t in proposer.study.trials if t.user_attrs.get("status") == "rejected"]
    assert rejected and all("anchor" in t.user_attrs for t in rejected)  # none of its own
    clone = pickle.loads(pickle.dumps(sampler))  # Ray Tune pickles the searcher with it
    study = proposer.study
    assert (clone.sample_relative(study, study.trials[-1], clone.infer_relative_search_space(
        study, study.trials[-1])) == sampler.sample_relative(
        study, study.trials[-1], sampler.infer_relative_search_space(study, study.trials[-1])))


def test_the_model_learns_which_rates_matter():
    """After 24 trials its predictions rank 200 unseen vectors as the task does."""
    space = _space()
    sampler = SurrogateSampler(space, seed=0, startup=4)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _, params in anchor_points(space, 4):
        study.enqueue_trial(params)
    for _ in range(24):
        trial = study.ask()
        rates = space(trial)["rates"]
        study.tell(trial, [_acc(rates), space.cost(rates).flops])
    rng = np.random.RandomState(5)
    grid = np.array(space.grid)
    unseen = grid[rng.randint(len(grid), size=(200, space.num_units))]
    pred, _ = sampler.predict(unseen)
    truth = np.array([_acc(list(v)) for v in unseen])
    rho = np.corrcoef(np.argsort(np.argsort(pred)), np.argsort(np.argsort(truth)))[0, 1]
    assert rho > 0.8, rho


@pytest.mark.parametrize("cfg", ["resnet56", "vgg16", "densenet40", "googlenet"])
def test_flops_of_many_vectors_at_once_match_one_at_a_time(cfg):
    space = RateSpace(cfg, "cifar10", low=0.1, high=1.0, step=0.05)
    rng = np.random.RandomState(0)
    vectors = [[float(x) for x in rng.choice(space.grid, size=space.num_units)]
               for _ in range(20)] + [[1.0] * space.num_units]
    one_by_one = [space.cost(v).flops_ratio for v in vectors]
    assert space.flops_ratios(vectors).tolist() == pytest.approx(one_by_one, rel=1e-12)
    assert one_by_one[-1] == 1.0


class _AlwaysFull(optuna.samplers.RandomSampler):
    """Proposes the largest rates every time: always above a FLOPs budget."""

    def sample_independent(self, study, trial, name, distribution):
        return distribution.high


def test_after_the_last_rejection_the_repaired_vector_runs():
    space = _space()
    proposer = RateProposer(space, sampler=_AlwaysFull(seed=0), storage=None, study_name="r",
                            full_epochs=FULL, flops_budget=0.5, flops_policy="reject")
    config = proposer.ask("t0")
    assert config is not None and space.cost(config["rates"]).flops_ratio <= 0.5
    states = [t.user_attrs.get("status") for t in proposer.study.trials]
    assert states.count("rejected") == 500 and states.count("repaired") == 1


def test_under_a_tight_budget_every_proposal_of_its_own_is_feasible_and_new():
    """ResNet-56 at 0.35 of the FLOPs: random grid vectors almost never fit (rates drawn
    independently keep ~0.35 on average only at the low end), so without shrinking the
    candidates the proposer rejected hundreds in a row. Scaled onto the budget, none of
    the sampler's own proposals is rejected, and they are spread over the budget."""
    space = RateSpace("resnet56", "cifar10", low=0.1, high=1.0, step=0.05)
    grid = np.array(space.grid)
    rng = np.random.RandomState(0)
    raw = grid[rng.randint(len(grid), size=(512, space.num_units))]
    assert space.flops_ratios([list(v) for v in raw]).mean() > 0.35  # the trap itself
    sampler = SurrogateSampler(space, seed=3, flops_budget=0.35, startup=4, candidates=128)
    proposer = RateProposer(space, sampler=sampler, storage=None, study_name="tight",
                            full_epochs=FULL, flops_budget=0.35)
    ratios = []
    for i in range(10):
        config = _run(proposer, f"t{i}")
        ratios.append(space.cost(config["rates"]).flops_ratio)
    states = [t.user_attrs.get("status") for t in proposer.study.trials]
    assert "rejected" not in states and "repaired" not in states
    assert max(ratios) <= 0.35 + 1e-12 and max(ratios) > 0.3  # close to the budget too
    shrunk = sampler._shrink(raw)
    fits = space.flops_ratios([list(v) for v in shrunk]) <= 0.35 + 1e-12
    assert fits.all() and np.isin(shrunk, grid).all()


def test_candidates_hold_every_uniform_vector_and_near_uniform_ones():
    """The family a user sweeps by hand is always on offer: every [r]*n of the grid,
    then a quarter of random vectors, a quarter within two grid steps of one level."""
    space = _space()
    sampler = SurrogateSampler(space, seed=0, candidates=64)
    grid = np.array(space.grid)
    k = len(space.param_names)
    cand = sampler._candidates([], [[0.5] * k])
    assert cand.shape == (len(grid) + 64, k)
    assert (cand[:len(grid)] == grid[:, None]).all()  # every uniform vector, in order
    pos = np.abs(cand[:, :, None] - grid[None, None, :]).argmin(axis=2)
    spread = pos.max(axis=1) - pos.min(axis=1)
    near = spread[len(grid) + 16:len(grid) + 32]
    assert (near <= 4).all() and (near > 0).any()
    assert np.isin(cand, grid).all()  # on the grid
