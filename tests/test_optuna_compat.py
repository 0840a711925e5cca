"""The sampler side on Optuna's API: the one private member, ask/tell, one status rule."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from search.propose.optuna_compat import close_running, trial_handle
from search.propose.proposer import RateProposer, close_unstarted, outcome
from search.propose.samplers import make_sampler
from search.propose.study import SQLiteStorage
from search.propose.space import RateSpace
from search.results.record import NO_RESULT, NO_SCORES, trial_status

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _storage(tmp_path) -> SQLiteStorage:
    return SQLiteStorage(f"sqlite:///{tmp_path / 'study.db'}")


def test_trial_handle_writes_to_a_trial_another_process_asked(tmp_path):
    storage = _storage(tmp_path)
    asked = optuna.create_study(storage=storage, study_name="s", directions=["maximize"])
    number = asked.ask().number
    study = optuna.load_study(study_name="s", storage=_storage(tmp_path))  # a new driver
    handle = trial_handle(study, number)
    assert handle.number == number
    handle.set_user_attr("k", 1)
    close_running(study, number, "lost")
    (frozen,) = study.get_trials()
    assert frozen.state == TrialState.FAIL and frozen.user_attrs == {"k": 1, "status": "lost"}
    with pytest.raises(KeyError):
        trial_handle(study, number + 1)



@pytest.mark.parametrize("name", ["nsga2", "tpe", "random"])
def test_every_sampler_pickles_and_keeps_its_random_state(name):
    """Ray Tune pickles the searcher with its sampler (Optuna 5.1's NSGA-II holds a lock)."""
    sampler = make_sampler(name, seed=3, num_samples=16)
    study = optuna.create_study(sampler=sampler, directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), 6)
    clone = pickle.loads(pickle.dumps(sampler))
    assert type(clone) is type(sampler)
    twin = optuna.create_study(sampler=clone, directions=["maximize", "minimize"])
    for t in study.get_trials():
        twin.add_trial(t)
    ahead = [study.ask().suggest_float("x", 0, 1) for _ in range(3)]
    again = [twin.ask().suggest_float("x", 0, 1) for _ in range(3)]
    assert ahead == again

def _proposer(tmp_path, **kw) -> RateProposer:
    space = RateSpace("resnet20", "digits", in_channels=1, input_size=8, low=0.1)
    return RateProposer(space, sampler=make_sampler("nsga2", 0, 8, constrained=True),
                        storage=_storage(tmp_path), study_name="p", full_epochs=2,
                        points=space.paper_points(["[0.6]*9"]), **kw)


def test_proposer_asks_tells_and_survives_a_new_driver(tmp_path):
    p = _proposer(tmp_path, num_samples=3)
    first = p.ask("a")
    assert first["paper_rates"] == "[0.6]*9" and first["rates"] == [0.6] * 9
    p.tell("a", {"val_acc": 0.9, "flops": 100, "epoch": 2})
    p.tell("a", {"val_acc": 0.1, "flops": 100, "epoch": 2})  # told once only
    p.ask("b")
    p.tell("b", {"val_acc": 0.8, "flops": 90, "epoch": 1})
    p.ask("c")
    state = p.state_dict()
    again = pickle.loads(pickle.dumps(p))  # a driver killed here, its state restored
    again.load_state_dict(state)
    assert again.reconcile(again.unfinished()) == {"started": 3, "resumable": 1, "lost": 0}
    assert again.ask("d") is None  # num_samples reached
    again.tell("c", None, error=True)
    trials = again.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].values == [0.9, 100.0] and trials[1].user_attrs["status"] == "stopped"
    assert close_unstarted(again.study) == 0


def test_reconcile_closes_trials_that_will_not_continue(tmp_path):
    p = _proposer(tmp_path)
    p.ask("a")
    p.study.ask()  # asked, never became a trial
    assert p.reconcile(set()) == {"started": 0, "resumable": 0, "lost": 2}
    assert {t.user_attrs["status"] for t in p.study.get_trials()} == {"lost"}


def test_one_status_rule_for_the_study_and_the_records():
    from search.run.progress import record_from_trial

    full = {"val_acc": 0.9, "flops": 100, "epoch": 3}
    cases = [(full, False, "completed"), ({**full, "epoch": 1}, False, "stopped"),
             ({**full, "failed": True, "error": "boom"}, False, "failed"),
             (full, True, "failed"), ({}, False, "failed"),
             ({**full, "val_acc": float("nan")}, False, "failed"),
             ({**full, "flops": None}, False, "failed")]
    states = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED,
              "failed": TrialState.FAIL}
    for result, errored, status in cases:
        assert trial_status(result, errored, 3)[0] == status
        state, _, attrs = outcome(result, errored, 3)
        assert state == states[status] and attrs["status"] == status
        trial = SimpleNamespace(trial_id="t", last_result=result, config={"rates": [1.0]},
                                run_metadata=None, error_file=None)
        assert record_from_trial(trial, 3, errored, "asha", 1.0)["status"] == status
    assert trial_status({}, False, 3) == ("failed", NO_RESULT)
    assert trial_status({**full, "val_acc": None}, False, 3) == ("failed", NO_SCORES)
    assert trial_status({**full, "failed": True, "error": "boom"}, False, 3) == ("failed", "boom")


class _ListsTheFolder:
    """Pickles to nothing, recording what the folder held while the state was written."""

    seen: list[list[str]] = []

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        _ListsTheFolder.seen.append(sorted(os.listdir(self.folder)))
        return (str, ("probe",))


def test_the_searcher_state_folder_never_holds_a_half_written_file(tmp_path, monkeypatch):
    """Tune copies the folder in a background thread while the driver saves into it."""
    from types import MethodType

    from ray.tune.search import SearchGenerator, Searcher

    from search.run.tune_searcher import SketchSearch, search_algorithm

    space = RateSpace("resnet20", "digits", in_channels=1, input_size=8, low=0.1)
    (tmp_path / "db").mkdir()

    def generator():
        searcher = SketchSearch(RateProposer(space, sampler=make_sampler("nsga2", 0, 8),
                                             storage=_storage(tmp_path / "db"), study_name="s",
                                             full_epochs=2, num_samples=4))
        return searcher, search_algorithm(searcher, 2)

    searcher, gen = generator()
    assert gen.searcher.suggest("a")["rates"]  # through Tune's concurrency limiter
    folder = tmp_path / "driver_artifacts"
    folder.mkdir()
    real = searcher.proposer.state_dict, gen.get_state
    searcher.proposer.state_dict = lambda: {**real[0](), "probe": _ListsTheFolder(folder)}
    gen.get_state = lambda: {**real[1](), "probe": _ListsTheFolder(folder)}
    _ListsTheFolder.seen.clear()
    searcher.save_to_dir = MethodType(Searcher.save_to_dir, searcher)
    SearchGenerator.save_to_dir(gen, str(folder), "x")  # Tune's own: the probes see temp files
    assert any(n.endswith("-tmp-searcher-state-x.pkl") for n in _ListsTheFolder.seen[0])
    assert any(n.endswith("-tmp-search_gen_state-x.json") for n in _ListsTheFolder.seen[1])
    del searcher.save_to_dir
    for name in os.listdir(folder):
        os.unlink(folder / name)
    _ListsTheFolder.seen.clear()
    moves, real_replace = [], os.replace

    def replace(src, dst):  # the moment a written file goes in: where was it written?
        moves.append((os.path.dirname(src), sorted(os.listdir(folder))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    gen.save_to_dir(str(folder), "x")
    gen.save_to_dir(str(folder), "x")  # the second save replaces complete files
    monkeypatch.undo()
    complete = ["search_gen_state-x.json", "searcher-state-x.pkl"]
    assert all(set(names) <= set(complete) for names in _ListsTheFolder.seen)
    assert len(moves) == 4 and all(d == str(tmp_path) and set(names) <= set(complete)
                                   for d, names in moves)
    assert len(_ListsTheFolder.seen) == 4 and sorted(os.listdir(folder)) == complete
    assert sorted(os.listdir(tmp_path)) == ["db", "driver_artifacts"]  # nothing left beside
    searcher.proposer.state_dict, gen.get_state = real

    again, again_gen = generator()  # a resumed driver: Tune's restore reads our files
    again_gen.restore_from_dir(str(folder))
    assert again.started == 1 and again.proposer.unfinished() == {"a"}
    assert again_gen.searcher.live_trials == {"a"}


def test_a_network_already_handed_out_is_not_trained_again(tmp_path, monkeypatch):
    """0.55 and 0.6 round to the same widths: one network, asked for once."""
    import search.propose.proposer as proposer

    space = RateSpace("resnet20", "digits", in_channels=1, input_size=8, low=0.1, round_to=16)
    assert space.widths([0.55] * 9) == space.widths([0.6] * 9) != space.widths([0.8] * 9)
    p = RateProposer(space, sampler=make_sampler("random", 0, 8), storage=_storage(tmp_path),
                     study_name="r", full_epochs=2,
                     points=space.paper_points(["[0.55]*9", "[0.6]*9", "[0.8]*9"]))
    assert p.ask("a")["rates"] == [0.55] * 9
    assert p.ask("b")["rates"] == [0.8] * 9  # [0.6]*9 was closed, not handed out
    closed = [t for t in p.study.get_trials() if t.user_attrs.get("status") == "repeat"]
    assert len(closed) == 1 and closed[0].state == TrialState.FAIL
    assert closed[0].params == space.params_from_rates([0.6] * 9)
    assert "tune_trial_id" not in closed[0].user_attrs and p.started == 2

    again = pickle.loads(pickle.dumps(p))  # a resumed driver reads what ran from the study
    again.load_state_dict(p.state_dict())
    monkeypatch.setattr(proposer, "MAX_REPEATS", 2)
    for _ in range(3):
        again.study.enqueue_trial(space.params_from_rates([0.7] * 9))
    third = again.ask("c")  # two repeats closed, then the third runs: a space worn out
    assert third["rates"] == [0.7] * 9 and again.started == 3
    states = [t.user_attrs.get("status") for t in again.study.get_trials()]
    assert states.count("repeat") == 3
