"""Cost-aware early stopping (cost-ASHA, MO-ASHA) against single-objective ASHA.

The task of every test here: accuracy rises with cost (plus a little noise), so
single-objective ASHA starves the cheap trials, while cost-ASHA (accuracy above the
rung's accuracy-vs-cost trend) and MO-ASHA (fronts of accuracy against cost) let the
cheapest third reach the full recipe about as often as the dearest third and still stop
about (1 - 1/eta) of the trials at each rung. The rule is tested as pure functions, both
schedulers are driven by a simulated asynchronous run (no Ray instance), and one short
run on a local Ray instance checks the scheduler inside a real Tuner.
"""

from __future__ import annotations

import heapq
import math
import pickle
import random
import types

import pytest
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search.experiment.config import SCHEDULERS as SCHEDULER_NAMES, config_from_dict
from search.results.pareto import fronts
from search.run.schedulers import (make_scheduler, CostASHAScheduler, MOASHAScheduler, promotes,
                           promotion_order, rung_milestones, spread_order, trend_promotes,
                           trend_residuals)
from search.run.progress import SearchCallback, rung_summary
from sketch_core.errors import UserError

EPOCHS, GRACE, ETA = 9, 1, 3


def _accuracy(cost: float, epoch: int, noise: float) -> float:
    return (0.3 + 0.6 * cost) * (1 - 0.5 / epoch) + noise


def _moasha(**kw) -> MOASHAScheduler:
    return MOASHAScheduler(max_t=EPOCHS, grace_period=GRACE, reduction_factor=ETA, **kw)


def _cost_asha(**kw) -> CostASHAScheduler:
    return CostASHAScheduler(max_t=EPOCHS, grace_period=GRACE, reduction_factor=ETA, **kw)


SCHEDULERS = {"moasha": _moasha, "cost_asha": _cost_asha}


def _asha() -> ASHAScheduler:
    return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=EPOCHS,
                         grace_period=GRACE, reduction_factor=ETA)


# --------------------------------------------------------------------------- the rule

def test_fronts_crowding_and_order():
    pts = [(0.9, 1.0), (0.5, 0.2), (0.7, 0.5), (0.6, 0.6), (0.4, 0.9)]
    assert fronts(*zip(*pts)) == [[0, 1, 2], [3], [4]]
    # the front in epsilon-net order: median cost (0.7, 0.5), then the farthest end
    assert spread_order(pts, [0, 1, 2]) == [2, 0, 1]
    assert promotion_order(pts) == [2, 0, 1, 3, 4]
    line = [(0.1 * i, 0.1 * i) for i in range(9)]  # a front: every prefix spreads out
    assert spread_order(line, range(9))[:3] == [4, 8, 0]
    # equal cost: the more accurate dominates; equal points share a front
    assert fronts(*zip(*[(0.5, 1.0), (0.6, 1.0), (0.6, 1.0)])) == [[1, 2], [0]]


def test_promotes_the_cheap_end_of_the_front():
    # ten points on a rising front, one below it: any cheap front point beats the
    # dominated dear one, which single-objective ranking would promote
    recorded = {f"t{i}": (0.5 + 0.04 * i, 0.1 + 0.09 * i) for i in range(10)}
    recorded["low"] = (0.7, 0.95)
    assert promotes(recorded, "t0", ETA)  # the cheapest: a boundary of the front
    assert promotes(recorded, "t9", ETA)  # the most accurate: the other boundary
    assert not promotes(recorded, "low", ETA)
    passing = [k for k in recorded if promotes(recorded, k, ETA)]
    assert len(passing) == len(recorded) // ETA
    assert promotes({"only": (0.1, 1.0)}, "only", ETA)  # the first arrival goes on


def test_trend_rule_ranks_accuracy_above_the_cost_trend():
    rng = random.Random(3)
    costs = [0.1 * 1.3 ** i for i in range(12)]  # the trend: 0.9 + 0.1 log(cost)
    recorded = {f"t{i}": (0.9 + 0.1 * math.log(c) + rng.gauss(0, 0.005), c)
                for i, c in enumerate(costs)}
    recorded["cheap"] = (0.9 + 0.1 * math.log(0.05) + 0.03, 0.05)  # well above at its cost
    recorded["dear"] = (0.9 + 0.1 * math.log(4.0) - 0.03, 4.0)  # well below, most accurate
    assert recorded["cheap"][0] == min(a for a, _ in recorded.values())
    assert recorded["dear"][0] == max(a for a, _ in recorded.values())
    res = dict(zip(recorded, trend_residuals(list(recorded.values()))))
    assert max(res, key=res.get) == "cheap" and min(res, key=res.get) == "dear"
    assert trend_promotes(recorded, "cheap", ETA) and not trend_promotes(recorded, "dear", ETA)
    passing = [k for k in recorded if trend_promotes(recorded, k, ETA)]
    assert len(recorded) // ETA <= len(passing) <= len(recorded) // ETA + 1
    # few points: the first arrival goes on; below 3 points, or at one cost, it is
    # ASHA on accuracy
    assert trend_promotes({"only": (0.1, 1.0)}, "only", ETA)
    two = {"a": (0.5, 1.0), "b": (0.6, 2.0)}
    assert trend_promotes(two, "b", ETA) and not trend_promotes(two, "a", ETA)
    flat = {f"t{i}": (0.1 * i, 1.0) for i in range(9)}
    assert [k for k in flat if trend_promotes(flat, k, ETA)] == ["t6", "t7", "t8"]


def _three_per_cost(costs: list[float], d: float) -> dict[str, tuple[float, float]]:
    """A rung whose accuracy lies on a parabola in log cost, three trials at each cost:
    on it, ``d`` above and ``d`` below. Each triple's mean is on the parabola, so the
    least-squares trend is the parabola itself and the residuals are exactly -d, 0, +d."""
    out = {}
    for i, c in enumerate(costs):
        x = math.log(c)
        trend = 0.2 + 0.1 * x - 0.004 * x * x
        for tag, r in (("lo", -d), ("on", 0.0), ("hi", d)):
            out[f"{tag}{i}"] = (trend + r, c)
    return out


def test_on_a_known_trend_both_cost_rules_pass_one_trial_per_cost_and_asha_the_dearest():
    costs = [2.0 ** k for k in range(12)]  # 36 trials, costs 1 to 2048
    rung = _three_per_cost(costs, d=0.01)
    res = dict(zip(rung, trend_residuals(list(rung.values()))))
    for key, r in res.items():
        assert r == pytest.approx({"lo": -0.01, "on": 0.0, "hi": 0.01}[key[:2]], abs=1e-9)
    # the 2/3 percentile of 12 x (-d, 0, +d) lies a third of the way from 0 to +d: the
    # twelve "hi" trials pass, one at each cost
    hi = {f"hi{i}" for i in range(12)}
    assert {k for k in rung if trend_promotes(rung, k, ETA)} == hi
    # the "hi" trials are the first front of (accuracy up, cost down) and 36 // 3 pass
    assert {k for k in rung if promotes(rung, k, ETA)} == hi
    # single-objective ASHA keeps the 12 most accurate: the dearest four costs, all three
    # trials of each (the trend rises 0.1 per e-fold, far above 2d)
    by_acc = sorted(rung, key=lambda k: rung[k][0], reverse=True)[:12]
    assert {rung[k][1] for k in by_acc} == set(costs[-4:])


def test_rungs():
    assert rung_milestones(9, 1, 3) == [1, 3]
    assert rung_milestones(3, 1, 3) == [1]
    assert rung_milestones(10, 2, 2) == [2, 4, 8]
    with pytest.raises(ValueError, match="grace_period"):
        MOASHAScheduler(max_t=3, grace_period=3, reduction_factor=3)


# --------------------------------------------------------------------------- simulated run

def _simulate(scheduler, n: int, seed: int, slots: int = 3) -> dict[float, int]:
    """An asynchronous run of ``n`` trials, ``slots`` at a time, each epoch one time unit
    (with jitter); the epochs each trial trained, by its cost."""
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 1.0) for _ in range(n)]
    noise = [rng.gauss(0, 0.01) for _ in range(n)]
    trials = [types.SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(n)]
    for t in trials:
        scheduler.on_trial_add(None, t)
    waiting, events, reached = list(range(n)), [], {}
    for _ in range(slots):
        i = waiting.pop(0)
        heapq.heappush(events, (1 + rng.random() * 0.1, i, 1))
    while events:
        now, i, epoch = heapq.heappop(events)
        result = {"epoch": epoch, "val_acc": _accuracy(costs[i], epoch, noise[i]),
                  "flops": costs[i]}
        action = scheduler.on_trial_result(None, trials[i], result)
        if action == TrialScheduler.CONTINUE and epoch < EPOCHS:
            heapq.heappush(events, (now + 1 + rng.random() * 0.1, i, epoch + 1))
            continue
        scheduler.on_trial_complete(None, trials[i], result)
        reached[costs[i]] = epoch
        if waiting:
            j = waiting.pop(0)
            heapq.heappush(events, (now + 1 + rng.random() * 0.1, j, 1))
    return reached


def _rates(runs: list[dict[float, int]]) -> dict[str, float]:
    """Share of the cheapest / dearest third that trained the full recipe; share of all
    trials past rung 1, and past rung 3."""
    cheap = dear = past1 = past3 = total = third_total = 0
    for reached in runs:
        costs = sorted(reached)
        k = len(costs) // 3
        cheap += sum(reached[c] == EPOCHS for c in costs[:k])
        dear += sum(reached[c] == EPOCHS for c in costs[-k:])
        past1 += sum(e > 1 for e in reached.values())
        past3 += sum(e > 3 for e in reached.values())
        total, third_total = total + len(costs), third_total + k
    return {"cheap": cheap / third_total, "dear": dear / third_total,
            "rung1": past1 / total, "rung3": past3 / total}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_simulated_cheap_trials_reach_the_full_recipe(name):
    mo = _rates([_simulate(SCHEDULERS[name](), 90, seed) for seed in range(5)])
    single = _rates([_simulate(_asha(), 90, seed) for seed in range(5)])
    # the cheap third finishes about as often as the dear third
    assert mo["cheap"] > 0.05 and mo["cheap"] >= 0.6 * mo["dear"], mo
    assert mo["dear"] >= 0.6 * mo["cheap"], mo
    # and stopping still happens: about 1/eta pass each rung (the asynchronous early
    # arrivals pass a little more often, as with ASHA)
    assert 1 / ETA - 0.05 <= mo["rung1"] <= 1 / ETA + 0.15, mo
    assert mo["rung3"] <= 1 / ETA ** 2 + 0.15, mo
    # single-objective ASHA starves the cheap third
    assert single["cheap"] <= 0.35 * single["dear"], single
    assert single["cheap"] < mo["cheap"], (single, mo)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_cost_from_the_config_first_and_failed_reports_ignored(name):
    s = SCHEDULERS[name]()
    trial = types.SimpleNamespace(trial_id="a", config={"flops": 5.0})
    assert s.on_trial_result(None, trial, {"epoch": 1, "val_acc": 0.5, "flops": 9.0}) \
        == TrialScheduler.CONTINUE
    assert s.rungs[1]["a"] == (0.5, 5.0)
    failed = types.SimpleNamespace(trial_id="b", config={})
    assert s.on_trial_result(None, failed, {"epoch": 1, "val_acc": 0.0, "failed": True,
                                            "flops": None}) == TrialScheduler.CONTINUE
    assert "b" not in s.rungs[1]
    assert s.on_trial_result(None, trial, {"epoch": EPOCHS, "val_acc": 0.9, "flops": 5.0}) \
        == TrialScheduler.STOP  # the full recipe is done


# --------------------------------------------------------------------------- state

def _feed(s: MOASHAScheduler, n: int, start: int = 0) -> list[str]:
    rng = random.Random(start)
    out = []
    for i in range(start, start + n):
        c = rng.uniform(0.1, 1.0)
        trial = types.SimpleNamespace(trial_id=f"t{i}", config={})
        out.append(s.on_trial_result(None, trial, {"epoch": 1, "val_acc": _accuracy(c, 1, 0),
                                                   "flops": c}))
    return out


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_state_pickles_and_restores(tmp_path, name):
    s = SCHEDULERS[name]()
    _feed(s, 12)
    copy = pickle.loads(pickle.dumps(s))
    assert type(copy) is type(s)
    assert copy.rungs == s.rungs and copy.decisions == s.decisions
    assert _feed(copy, 6, start=100) == _feed(s, 6, start=100)  # the same decisions on
    s.save(str(tmp_path / "ck"))
    fresh = SCHEDULERS[name]()
    fresh.restore(str(tmp_path / "ck"))
    assert fresh.rungs == s.rungs and fresh.decisions == s.decisions


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_state_file_survives_a_resume(tmp_path, name):
    """Tune's restore unpickles the scheduler as it was built; the state file brings
    back what the rungs recorded since."""
    state = tmp_path / "scheduler_state.json"
    s = SCHEDULERS[name](state_file=state)
    as_built = pickle.dumps(s)  # what Tuner(...) pickled at the start of the search
    _feed(s, 15)
    assert state.is_file()
    restored = pickle.loads(as_built)
    assert restored.rungs == s.rungs and restored.decisions == s.decisions
    assert _feed(restored, 5, start=50) == _feed(s, 5, start=50)


# --------------------------------------------------------------------------- config

def test_config_names_and_the_grace_period():
    with pytest.raises(UserError, match="is not one of asha, cost_asha, moasha, none; "
                                        "did you mean 'moasha'"):
        config_from_dict({"scheduler": {"name": "mosha"}})
    # a grace period not below trial.epochs stops nothing: every scheduler falls back to
    # running the full recipe, and the search says so in one line
    for name in SCHEDULER_NAMES:
        config = config_from_dict({"scheduler": {"name": name, "grace_period": 3},
                                   "trial": {"epochs": 3}})
        assert isinstance(make_scheduler(config.scheduler, config.trial.epochs)[0], FIFOScheduler)
        note = config.early_stopping_note
        assert note is None if name == "none" else (
            note.startswith(f"scheduler {name}: grace period 3 is not below trial.epochs 3")
            and "every trial runs its full recipe" in note and "\n" not in note)
    assert config_from_dict({"trial": {"epochs": 3}}).early_stopping_note is None
    assert config_from_dict({}).scheduler.name == "cost_asha"
    with pytest.raises(UserError, match="set scheduler.name to cost_asha or moasha"):
        config_from_dict({"scheduler": {"name": "asha", "cost": "flops"}})


def test_make_scheduler(tmp_path):
    def build(name: str):
        config = config_from_dict({"scheduler": {"name": name, "reduction_factor": 3},
                                   "trial": {"epochs": 9}})
        return make_scheduler(config.scheduler, config.trial.epochs, config.cost_axis,
                              tmp_path / "scheduler_state.json")
    mo, rungs = build("moasha")
    assert type(mo) is MOASHAScheduler and rungs == mo.milestones == [1, 3]
    assert mo.state_file == str(tmp_path / "scheduler_state.json")
    trend, rungs = build("cost_asha")
    assert type(trend) is CostASHAScheduler and rungs == trend.milestones == [1, 3]
    assert trend._cost_attr == "flops" and trend.state_file == mo.state_file
    asha, rungs = build("asha")
    assert isinstance(asha, ASHAScheduler) and rungs == [1, 3]
    none, rungs = build("none")
    assert type(none) is FIFOScheduler and rungs == []


def test_rung_summary_per_cost_band(tmp_path):
    records = [{"trial_id": f"t{i}", "status": "completed" if e == 9 else "stopped",
                "flops": i, "epochs": e, "stop_reason": None if e == 9 else "moasha"}
               for i, e in enumerate([1, 3, 9, 1, 9, 1, 3, 1, 9])]
    records.append({"trial_id": "f", "status": "failed", "flops": None, "epochs": 0})
    lines = rung_summary(records, [1, 3])
    assert lines[0] == ("[search] rung at epoch 1: promoted 5/9 "
                        "(cheap 2/3, middle 1/3, dear 2/3)")
    assert lines[1] == ("[search] rung at epoch 3: promoted 3/5 "
                        "(cheap 1/2, middle 1/1, dear 1/2)")
    cb = SearchCallback(str(tmp_path / "trials.jsonl"), full_epochs=9, quiet=True,
                        scheduler="moasha", sampler="nsga2", rungs=[1, 3])
    assert cb.summary()[0] == "[search] scheduler moasha (rungs at epoch 1, 3), sampler nsga2"
    cb = SearchCallback(str(tmp_path / "trials.jsonl"), full_epochs=3, quiet=True,
                        scheduler="none", sampler="tpe")
    assert cb.summary() == ["[search] scheduler none (no early stopping), sampler tpe"]


# --------------------------------------------------------------------------- on Ray

RAY_EPOCHS = 3  # one rung (epoch 1): a short run on a small machine


@pytest.mark.cluster
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_on_ray_promotes_along_the_front(tmp_path, name):
    """A real Tuner on a local Ray instance: the scheduler decides on arrival against
    the trials recorded at the rung, stops trials, lets cheap ones finish, and keeps
    its rungs in its state file. (The rates over many trials: the simulated runs.)"""
    import json

    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from search.run.ray_session import ray_session

    rng = random.Random(5)
    n = 24  # one at a time: the arrival order is the grid's, so the run is deterministic
    points = [{"flops": 0.1 + 0.9 * (i + rng.random()) / n, "noise": rng.gauss(0, 0.01)}
              for i in rng.sample(range(n), n)]
    epochs: dict[float, int] = {}

    def fake_trial(config: dict) -> None:  # defined here: the workers get it by value
        import time

        from ray import tune

        cost, noise = config["point"]["flops"], config["point"]["noise"]
        for epoch in range(1, RAY_EPOCHS + 1):
            time.sleep(0.003)
            acc = (0.3 + 0.6 * cost) * (1 - 0.5 / epoch) + noise
            tune.report({"epoch": epoch, "flops": cost, "val_acc": acc})

    class Epochs(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            epochs[trial.config["point"]["flops"]] = int(result["epoch"])

    state = tmp_path / "scheduler_state.json"
    kind = CostASHAScheduler if name == "cost_asha" else MOASHAScheduler
    scheduler = kind(max_t=RAY_EPOCHS, grace_period=1, reduction_factor=ETA, state_file=state)
    rule = trend_promotes if name == "cost_asha" else promotes
    with ray_session(None, 2):
        tune.Tuner(
            tune.with_resources(fake_trial, {"cpu": 1}),
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1,
                                        max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(name="mo", storage_path=str(tmp_path), verbose=0,
                                      callbacks=[Epochs(), JsonLoggerCallback()])).fit()
    assert len(epochs) == n
    costs = sorted(epochs)
    full = [epochs[c] == RAY_EPOCHS for c in costs]
    assert sum(full) <= n // 2, epochs  # stopping happens (the first arrivals all pass)
    assert sum(full[: n // 3]) >= 1, epochs  # the cheap third reaches the full recipe
    saved = json.loads(state.read_text())
    assert len(saved["rungs"]["1"]) == n
    assert sum(saved["decisions"]["1"].values()) == sum(full)
    # each decision was taken on arrival against the trials recorded before it
    arrived: dict[str, tuple[float, float]] = {}
    for key, point in saved["rungs"]["1"].items():  # in the order they arrived
        arrived[key] = tuple(point)
        assert rule(arrived, key, ETA) == saved["decisions"]["1"][key], key


@pytest.mark.parametrize("extra, message", [
    (["--set", "scheduler.name=mosha"], "'mosha' is not one of asha, cost_asha, moasha, none"),
    (["--set", "scheduler.name=asha", "--set", "scheduler.cost=flops"],
     "set scheduler.name to cost_asha or moasha, or drop scheduler.cost"),
])
def test_bad_scheduler_input_is_one_line_and_leaves_nothing(capsys, tmp_path, extra, message):
    import launch

    rc = launch.main(["search", "--config", "quickstart", "--storage_path", str(tmp_path),
                      "--name", "bad", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err and not (tmp_path / "bad").exists()


@pytest.mark.cluster  # a benchmark end to end
def test_the_scheduler_benchmark_runs_tiny(search_cache_dir):
    """benchmarks/scheduler_quality.py --smoke drives the real schedulers over real
    trials and prints its table and ratio= line."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "scheduler_quality.py"),
                           "--smoke", "--cache_dir", str(search_cache_dir)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio=") and float(lines[-1][6:]) > 0
    assert all(any(line.startswith(f"{name} ") for line in lines)
               for name in ("asha", "cost_asha", "moasha"))
    assert "cost-ASHA/ASHA at equal trials" in proc.stdout and "MO-ASHA/ASHA" in proc.stdout
