"""Latency in the search: vectors priced by a latency table before they train.

Unit level: the vectorised prediction equals the scalar one, a rate space prices
latency (the unpruned network at ratio 1), repairs a vector onto a latency budget and
refuses a budget below the lowest reachable latency. End to end, through Ray Tune and
real Optuna on the digits quickstart: ``objectives: [val_acc, latency]`` with a latency
budget and a table measured elsewhere (``latency.table``): no trial predicted above
the budget trains, Optuna is told the predicted latency, MO-ASHA ranks on it, the
knee is taken on it, and the retrained pick reports its measured latency beside its
prediction; ``analyze --latency_budget`` and ``retrain --pick latency<=L`` read it.
Bad input is one line with exit code 2 and leaves no experiment folder.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import optuna
import pytest

import launch
from search.experiment.config import load_config
from search.propose.space import RateSpace
from sketch_core.errors import UserError
from sketch_core.cost.latency_table import build_table, load_table

TINY = dict(threads=1, points=3, repeats=2, passes=2, warmup=1, full_repeats=3)


def _space(**kw) -> RateSpace:
    return RateSpace("resnet20", "digits", low=0.1, num_classes=10, in_channels=1,
                     input_size=8, **kw)


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory):
    """A latency table of the quickstart's network (1-channel 8x8 digits), saved as a
    file the way ``info --latency --save_table`` writes one."""
    space = _space()
    table = build_table(space.arch, num_classes=10, in_channels=1, **TINY)
    path = tmp_path_factory.mktemp("latency") / "digits_r20.json"
    table.save(path)
    return path


@pytest.fixture(scope="module")
def budget(digits_table) -> float:
    """A latency budget (fraction of the unpruned) that this machine's table can meet
    and that cuts the space: halfway between the lowest reachable ratio (every rate at
    ``space.low``) and the median of random vectors. Measured, not fixed, because the
    digits network is small enough that per-call overhead (which differs between
    machines) sets most of its latency."""
    space = _space(latency=load_table(digits_table))
    lowest = space.cost([space.low] * space.num_units).latency_ratio
    rng = np.random.RandomState(1)
    median = float(np.median(space.ratios(
        [list(rng.choice(space.grid, space.num_units)) for _ in range(200)], "latency_ratio")))
    assert lowest < 0.97 and lowest < median, (
        f"the measured table shows no speed-up from pruning (lowest {lowest:.3f}, "
        f"median {median:.3f}): too noisy to test a budget")
    return math.ceil((lowest + median) / 2 * 1000) / 1000


def test_vectorised_prediction_matches_and_the_space_prices_latency(digits_table, budget):
    table = load_table(digits_table)
    space = _space(latency=table)
    rng = np.random.RandomState(0)
    rates = [list(rng.choice(space.grid, space.num_units)) for _ in range(40)]
    widths = np.array([space.widths(r) for r in rates], dtype=float)
    one = np.array([table.predict([int(w) for w in row]) for row in widths])
    assert table.predict_many(widths) == pytest.approx(one, rel=1e-12)
    ratios = space.ratios(rates, "latency_ratio")
    assert ratios == pytest.approx([space.cost(r).latency_ratio for r in rates], rel=1e-12)
    full = space.cost([1.0] * space.num_units)
    assert full.latency_ratio == pytest.approx(1.0)
    assert full.latency_ms == pytest.approx(table.predict(space.plan.full_widths()))
    lowest = space.cost([space.low] * space.num_units).latency_ratio
    assert lowest < budget < ratios.max()  # the budget below cuts the space


def test_repair_meets_a_latency_budget_and_an_unreachable_one_is_refused(digits_table, budget):
    space = _space(latency=load_table(digits_table))
    budgets = {"latency_ratio": budget}
    dear = [1.0] * space.num_units
    assert space.overruns(space.cost(dear), budgets)
    fixed = space.repair(dear, budgets)
    assert fixed is not None and not space.overruns(space.cost(fixed), budgets)
    assert space.in_space(fixed) and space.cost(fixed).latency_ratio > budget - 0.1
    lowest = space.cost([space.low] * space.num_units).latency_ratio
    assert space.repair(dear, {"latency_ratio": lowest / 2}) is None
    with pytest.raises(UserError, match=r"budget.latency .*lowest reachable"):
        space.check_budget({"latency_ratio": lowest / 2})
    both = {"latency_ratio": budget, "flops_ratio": 0.3}
    fixed = space.repair(dear, both)
    assert not space.overruns(space.cost(fixed), both)


@pytest.mark.parametrize("sets, needle", [
    (["objectives=[val_acc,speed]"], "objectives[1]: 'speed' is not one of val_acc, flops, latency"),
    (["objectives=[flops,val_acc]"], "expected val_acc followed by flops, latency or both"),
    (["budget.latency=1.5"], "budget.latency: 1.5 is outside (0, 1]"),
    (["budget.latency=fast"], "budget.latency: cannot read 'fast'"),
    (["latency.runtime=tensorrt"], "latency.runtime: 'tensorrt' is not one of torch, onnxruntime"),
    (["scheduler.name=asha", "scheduler.cost=latency"],
     "scheduler.cost: is the cost axis cost_asha or moasha ranks by, but scheduler.name is asha"),
])
def test_bad_latency_config_is_one_line(sets, needle):
    with pytest.raises(UserError) as exc:
        load_config("quickstart", sets)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_config_reads_latency_budgets_and_the_cost_axis():
    c = load_config("quickstart", ["objectives=[val_acc,latency]", "budget.latency=3ms"])
    assert c.budget.latency_bound().value == 3.0 and c.budget.latency_bound().kind == "absolute" and c.cost_axis == "latency" and c.uses_latency
    c = load_config("quickstart", ["objectives=[val_acc,flops,latency]", "budget.latency=0.5"])
    assert c.cost_axis == "latency" and c.budget.latency_bound().kind == "ratio"
    c = load_config("quickstart", ["objectives=[val_acc,flops,latency]"])
    assert c.cost_axis == "flops"
    assert not load_config("quickstart").uses_latency


def _launch_error(capsys, argv) -> tuple[int, str]:
    """Exit code and stderr of a search refused before anything started (one line)."""
    code = launch.main(argv)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return code, err


def test_bad_latency_input_to_a_search_is_exit_2_and_leaves_no_folder(
        tmp_path, capsys, digits_table, search_cache_dir):
    base = ["search", "--config", "quickstart", "--storage_path", str(tmp_path),
            "--set", f"model.pretrain.cache_dir={search_cache_dir}",
            "--set", "objectives=[val_acc,latency]", "--set", f"latency.table={digits_table}"]
    code, err = _launch_error(capsys, base + ["--name", "low", "--set", "budget.latency=0.05"])
    assert code == 2 and re.search(r"budget.latency 0.05 \(\d+\.\d{3} ms\): even every rate at "
                                   r"space.low", err), err
    assert "lowest reachable" in err
    foreign = tmp_path / "cuda_table.json"
    data = json.loads(digits_table.read_text())
    data["key"]["device"], data["key"]["threads"] = "cuda", None
    foreign.write_text(json.dumps(data))
    code, err = _launch_error(capsys, base + ["--name", "foreign",
                                              "--set", f"latency.table={foreign}"])
    assert code == 2 and "measured for another target: device 'cuda' (expected 'cpu')" in err
    code, err = _launch_error(capsys, base + ["--name", "missing",
                                              "--set", f"latency.table={tmp_path / 'no.json'}"])
    assert code == 2 and "does not exist" in err
    assert not any((tmp_path / n).exists() for n in ("low", "foreign", "missing"))


@pytest.fixture(scope="module")
def latency_search(tmp_path_factory, digits_table, budget, search_cache_dir):
    """One real search: objectives [val_acc, latency], budget.latency, MO-ASHA on the
    predicted latency, a saved table, the knee retrained for one epoch."""
    from search.run.ray_driver import run_search

    root = tmp_path_factory.mktemp("latency_search")
    config = load_config("quickstart", [
        f"storage.storage_path={root}", "storage.name=lat", f"model.pretrain.cache_dir={search_cache_dir}",
        "objectives=[val_acc,latency]", f"budget.latency={budget}", f"latency.table={digits_table}",
        "budget.num_samples=10", "trial.epochs=2", "scheduler.name=moasha",
        "scheduler.grace_period=1", "scheduler.reduction_factor=2", "retrain.epochs=1",
        "space.paper_rates=['[1.0]*9', '[0.3]*9']"])
    return run_search(config, quiet=True)


@pytest.mark.cluster  # a real search end to end (shared fixture)
def test_no_trial_predicted_above_the_latency_budget_trains(latency_search, budget):
    records = latency_search.records
    trained = [r for r in records if r["status"] != "rejected"]
    rejected = [r for r in records if r["status"] == "rejected"]
    assert len(trained) == 10 and rejected  # [1.0]*9 is the unpruned network: above
    assert all(r["latency_ratio"] <= budget + 1e-12 for r in trained)
    assert all(r["latency_ratio"] > budget and r["epochs"] == 0
               and "latency budget" in r["error"] for r in rejected)
    assert any(r["rates"] == [1.0] * 9 for r in rejected)
    space = _space(latency=load_table(latency_search.exp_dir / "latency_table.json"))
    for r in trained:  # the record carries the price the table gives its vector
        assert r["latency_ms"] == pytest.approx(space.cost(r["rates"]).latency_ms)


@pytest.mark.cluster  # a real search end to end (shared fixture)
def test_optuna_is_told_the_predicted_latency(latency_search):
    study = optuna.load_study(study_name="lat", storage=optuna.storages.RDBStorage(
        f"sqlite:///{latency_search.exp_dir / 'study.db'}"))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = {r["trial_id"]: r for r in latency_search.records if r["status"] == "completed"}
    told = [t for t in study.trials if t.user_attrs.get("tune_trial_id") in done]
    assert told and all(t.state == optuna.trial.TrialState.COMPLETE for t in told)
    for t in told:
        r = done[t.user_attrs["tune_trial_id"]]
        assert t.values == pytest.approx([r["val_acc"], r["latency_ms"]])
    rejected = [t for t in study.trials if t.user_attrs.get("status") == "rejected"]
    assert rejected and all(t.constraints["budget"] > 0 for t in rejected)


@pytest.mark.cluster  # a real search end to end (shared fixture)
def test_moasha_ranks_on_the_predicted_latency(latency_search):
    state = json.loads((latency_search.exp_dir / "scheduler_state.json").read_text())
    by_id = {r["trial_id"]: r for r in latency_search.records}
    points = [(tid, p) for rung in state["rungs"].values() for tid, p in rung.items()]
    assert points
    for tid, (_acc, cost) in points:
        assert cost == pytest.approx(by_id[tid]["latency_ms"])


@pytest.mark.cluster  # a real search end to end (shared fixture)
def test_the_knee_and_the_retrained_pick_are_on_latency(latency_search, budget):
    from search.results.picks import knee_record

    result = latency_search.retrain
    assert result is not None and result["pick"] == "knee"
    knee = knee_record(latency_search.records, "latency_ratio")
    assert result["trial_id"] == knee["trial_id"]
    lat = result["latency"]
    assert lat["predicted_ms"] == pytest.approx(knee["latency_ms"])
    assert lat["measured_ms"] > 0 and lat["device"] == "cpu" and lat["threads"] == 1
    saved = json.loads((latency_search.exp_dir / "retrain" / "knee" / "result.json").read_text())
    assert saved["latency"]["measured_ms"] == pytest.approx(lat["measured_ms"])
    manifest = json.loads((latency_search.exp_dir / "manifest.json").read_text())
    assert manifest["objectives"] == ["val_acc", "latency"]
    assert manifest["cost_axis"] == "latency" and manifest["latency"]["budget"] == budget


@pytest.mark.cluster  # a real search end to end (shared fixture)
def test_analysis_and_picks_read_the_latency(latency_search, capsys, tmp_path, budget):
    from search.results.dataframe import load_experiment, pareto_front
    from search.results.picks import select_record

    exp = load_experiment(latency_search.exp_dir)
    assert exp.cost_axis == "latency"
    done = exp.trials[exp.trials["status"] == "completed"]
    assert done["latency_ms"].notna().all() and (done["latency_ratio"] <= budget + 1e-12).all()
    front = pareto_front(exp.trials, cost="latency")
    lat = front["latency_ms"].to_numpy()
    assert len(front) and (np.diff(lat) >= 0).all()
    acc = np.diff(front["val_acc"].to_numpy())
    # networks tied in both objectives all stay on the front
    step = np.diff(lat)
    assert (((acc > 0) & (step > 0)) | ((acc == 0) & (step == 0))).all()
    fastest = done["latency_ratio"].min()
    rec = select_record(latency_search.records, f"latency<={fastest + 1e-9}")
    assert rec["latency_ratio"] == pytest.approx(fastest)
    with pytest.raises(UserError, match="no completed trial is that fast"):
        select_record(latency_search.records, f"latency<={fastest / 2}")
    ms = math.ceil(float(done["latency_ms"].max()) * 1e6) / 1e6  # printed rounded up: within
    code = launch.main(["analyze", str(latency_search.exp_dir), "--latency_budget",
                        f"{ms:.6f}ms", "--out", str(tmp_path / "a"), "--no_plots"])
    out = capsys.readouterr().out
    assert code == 0 and "best trial within the latency budget" in out
    assert "min predicted latency" in out and "latency (pred.)" in out
    from search.results.dataframe import read_export  # the exported front is the latency front

    written = read_export(next((tmp_path / "a").glob("front.*")))
    assert sorted(written["trial_id"]) == sorted(front["trial_id"])
    assert select_record(latency_search.records, f"latency <= {math.ceil(ms * 1e4) / 1e4:.4f} ms") is not None


def test_the_progress_line_counts_the_latency_front_and_budget():
    from search.results.record import TrialRecord
    from search.run.progress import rung_summary, status_line

    def rec(tid, acc, fr, lr, epochs=3):
        return TrialRecord(trial_id=tid, status="completed", val_acc=acc, flops_ratio=fr,
                           flops=fr * 1e6, latency_ratio=lr, epochs=epochs)

    records = [rec("a", 0.9, 0.4, 0.9), rec("b", 0.8, 0.5, 0.5), rec("c", 0.7, 0.3, 0.4)]
    by_flops = status_line(records, 0, {"flops_ratio": 0.45}, None, None)
    assert "Pareto front 2" in by_flops and "FLOPs<=0.45: 90.00%" in by_flops
    line = status_line(records, 0, {"latency_ratio": 0.6}, None, 3, "latency_ratio")
    assert "Pareto front 3" in line and "latency<=0.6: 80.00% (latency 50.0%)" in line
    assert "best at latency<=0.3: -" in status_line(records, 0, {"latency_ratio": 0.3}, None,
                                                     None, "latency_ratio")
    # cost bands by latency: the cheapest third is c (FLOPs 0.3) by either, the dearest differs
    records[0] = records[0].replace(epochs=1)
    by_latency = rung_summary(records, [1], cost="latency_ratio")[0]
    assert "dear 0/1" in by_latency and "dear 0/1" not in rung_summary(records, [1])[0]


def test_three_objectives_tell_optuna_accuracy_flops_and_latency(digits_table):
    from search.propose.proposer import RateProposer
    from search.propose.samplers import make_sampler

    space = _space(latency=load_table(digits_table))
    proposer = RateProposer(space, sampler=make_sampler("random", 0), storage=None,
                            study_name="three", full_epochs=1, num_samples=3,
                            objectives=["val_acc", "flops", "latency"])
    config = proposer.ask("t0")
    cost = space.cost(config["rates"])
    assert config["latency_ms"] == pytest.approx(cost.latency_ms)
    proposer.tell("t0", {"val_acc": 0.9, "flops": cost.flops, "epoch": 1,
                         "rates": config["rates"]})
    study = proposer.study
    assert len(study.directions) == 3
    assert study.trials[0].values == pytest.approx([0.9, cost.flops, cost.latency_ms])
    with pytest.raises(UserError, match="has 3 objectives, this config 2"):
        from search.propose.study import open_study

        open_study(study._storage, "three", make_sampler("random", 0))


def test_a_measured_table_is_cached_and_copied_into_the_experiment(tmp_path, monkeypatch):
    import sketch_core.cost.latency_table as lt
    from search.experiment.pricing import LATENCY_FILE, saved_table, search_table

    config = load_config("quickstart", ["objectives=[val_acc,latency]",
                                        f"latency.cache_dir={tmp_path / 'cache'}",
                                        "latency.points=2"])
    space = _space()
    real = lt.build_table
    monkeypatch.setattr(lt, "build_table", lambda arch, **kw: real(arch, **{**kw, **TINY,
                                                                           "points": 2}))
    lines: list[str] = []
    (tmp_path / "a").mkdir()
    first = search_table(config, space, tmp_path / "a", lines.append)
    assert first.key["threads"] == 1 and first.key["in_channels"] == 1
    assert saved_table(tmp_path / "a").as_dict() == first.as_dict()
    assert (tmp_path / "a" / LATENCY_FILE).is_file() and any("cached" in t for t in lines)

    def no_timing(*a, **kw):
        raise AssertionError("a cached table was measured again")

    monkeypatch.setattr(lt, "build_table", no_timing)
    (tmp_path / "b").mkdir()
    again = search_table(config, space, tmp_path / "b", lines.append)
    assert again.as_dict() == first.as_dict()
    assert search_table(load_config("quickstart"), space, tmp_path / "b") is None
