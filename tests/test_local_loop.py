"""The search without Ray: search.run.local_loop in a process where ``import ray`` fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.results.trials_file import read_records
from search.propose.space import RateSpace

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["ray"] = None  # any import of ray now raises ImportError
    from search.experiment.config import load_config
    from search.run.local_loop import run_local

    exp_dir, cache = sys.argv[1], sys.argv[2]
    extra, workers = json.loads(sys.argv[3]), int(sys.argv[4])
    sets = [f"model.pretrain.cache_dir={cache}", "retrain.enabled=false", "trial.epochs=1",
            "budget.num_samples=4", "space.paper_rates=['[0.6]*9']", *extra]
    out = run_local(load_config("quickstart", sets), exp_dir, quiet=True, workers=workers)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "ray" and sys.modules[m])
    print(json.dumps({"records": len(out.records), "ray_modules": loaded}))
""")


def _run_without_ray(exp_dir: Path, cache: Path, extra: list[str], workers: int = 1) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(exp_dir), str(cache),
                           json.dumps(extra), str(workers)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}")


@pytest.mark.parametrize("workers", [1, 2])
def test_local_loop_runs_without_ray(tmp_path, search_cache_dir, workers):
    folder = tmp_path / "local"
    out = _run_without_ray(folder, search_cache_dir, [], workers)
    assert out["ray_modules"] == [] and out["records"] == 4
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["versions"]["ray"] is None and manifest["phases"]["search_s"] >= 0
    records = read_records(folder / "trials.jsonl")
    assert len(records) == 4 == len({r["trial_id"] for r in records})
    assert {r["status"] for r in records} == {"completed"}
    space = RateSpace("resnet20", "digits", in_channels=1, input_size=8)
    for r in records:
        cost = space.cost(r["rates"])
        assert (r["flops"], r["params"]) == (cost.flops, cost.params)
        assert r["epochs"] == 1 and 0 <= r["val_acc"] <= 1 and r["started"] <= r["ended"]
    paper = [r for r in records if r.get("paper_rates")]
    assert [(r["paper_rates"], r["optuna_number"]) for r in paper] == [("[0.6]*9", 0)]
    study = _study(folder)
    states = Counter(t.state for t in study.trials)  # anchors not reached stay WAITING
    assert states[TrialState.COMPLETE] == 4 and set(states) <= {TrialState.COMPLETE,
                                                                 TrialState.WAITING}
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials
             if t.state == TrialState.COMPLETE}
    for r in records:
        t = by_id[r["trial_id"]]
        assert t.values == [r["val_acc"], r["flops"]] and t.user_attrs["status"] == "completed"
        assert space.rates_from_params(t.params) == pytest.approx(r["rates"], abs=1e-9)


def test_local_loop_rejects_over_budget_and_tells_the_sampler(tmp_path, search_cache_dir):
    folder = tmp_path / "local_budget"
    _run_without_ray(folder, search_cache_dir, ["trial.epochs=0", "budget.flops_budget=0.4",
                                                "budget.flops_policy=reject"])
    records = read_records(folder / "trials.jsonl")
    trained = [r for r in records if r["status"] != "rejected"]
    rejected = [r for r in records if r["status"] == "rejected"]
    assert len(trained) == 4 and all(r["flops_ratio"] <= 0.4 for r in trained)
    assert any(r["rates"] == [0.6] * 9 for r in rejected)
    study = _study(folder)
    infeasible = [t for t in study.trials if t.user_attrs.get("status") == "rejected"]
    assert len(infeasible) == len(rejected)
    assert all(t.constraints["flops_budget"] > 0 for t in infeasible)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


def test_time_budget_ends_a_local_trial_as_stopped(monkeypatch):
    import search.run.local_loop as local_loop
    from search.experiment.config import TrialConfig
    from conftest import trial_setup_for
    from search.results.record import trial_status

    def fake_train(rates, setup, baseline, report, widths=None):
        for epoch in range(1, setup.recipe.epochs + 1):
            report({"val_acc": 0.5, "flops": 10, "epoch": epoch}, None)

    monkeypatch.setattr(local_loop, "train_trial", fake_train)
    setup = trial_setup_for("resnet20", "digits", 10, 1, trial=TrialConfig(epochs=3))
    seen = []
    last, ended = local_loop.run_one([1.0] * 9, setup, {}, None, seen.append)
    assert (last["epoch"], ended, len(seen)) == (3, False, 3)
    last, ended = local_loop.run_one([1.0] * 9, setup, {}, 0.0)  # the budget is spent
    assert (last["epoch"], ended) == (1, True)
    assert trial_status(last, False, 3) == ("stopped", None)
