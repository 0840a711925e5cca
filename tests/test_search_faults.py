"""Faults during a search: a trial that raises, a NaN loss, the driver killed and resumed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import ray.cloudpickle
from optuna.trial import TrialState

from search.experiment.config import load_config
from search.results.trials_file import read_records

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent

# the workers cannot import this test module: ship its functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def faulty_trial(config, setup, baseline):
    """The real trainable, except for two of the paper's vectors:
    [0.6]*9 raises before training (as a crash would), [0.5]*9 diverges (lr 1e12)."""
    from search.run.tune_trial import run_trial

    calls = Path(os.environ["SKETCHTUNE_TEST_CALLS"])
    with open(calls, "a") as f:
        f.write(json.dumps(config.get("paper_rates")) + "\n")
    if config.get("paper_rates") == "[0.6]*9":
        raise RuntimeError("injected failure")
    if config.get("paper_rates") == "[0.5]*9":
        setup = dataclasses.replace(setup, recipe=dataclasses.replace(setup.recipe, lr=1e12))
    run_trial(config, setup, baseline)


def test_a_trial_that_raises_and_one_that_diverges(tmp_path, search_cache_dir, monkeypatch,
                                                   capsys):
    from search.run.ray_driver import run_search

    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("SKETCHTUNE_TEST_CALLS", str(calls))  # inherited by the local Ray
    config = load_config("quickstart", [
        f"storage.storage_path={tmp_path}", "storage.name=faults",
        f"model.pretrain.cache_dir={search_cache_dir}", "retrain.enabled=false",
        "trial.epochs=1", "budget.num_samples=6", "resources.max_failures=1",
        "space.paper_rates=['[0.6]*9', '[0.5]*9', '[0.4]*9']"])
    out = run_search(config, quiet=False, trainable=faulty_trial)
    # one epoch per trial: the shipped scheduler cannot stop anything, and says so
    assert ("[search] scheduler cost_asha: grace period 1 is not below trial.epochs 1, so no "
            "trial can be stopped early; every trial runs its full recipe") in capsys.readouterr().out
    records = {r.get("paper_rates"): r for r in out.records}
    assert len(out.records) == 6 == len({r["trial_id"] for r in out.records})
    crashed, diverged = records["[0.6]*9"], records["[0.5]*9"]
    assert crashed["status"] == "failed" and "injected failure" in crashed["error"]
    assert diverged["status"] == "failed" and "NaN or infinite" in diverged["error"]
    others = [r for r in out.records if r["status"] != "failed"]
    assert len(others) == 4 and all(r["status"] == "completed" for r in others)
    # a crash is retried (max_failures 1), a deterministic divergence is not
    seen = Counter(json.loads(line) for line in calls.read_text().splitlines())
    assert seen["[0.6]*9"] == 2 and seen["[0.5]*9"] == 1
    study = optuna.load_study(study_name="faults",
                              storage=f"sqlite:///{out.exp_dir / 'study.db'}")
    states = {t.user_attrs.get("paper_rates"): t.state for t in study.trials}
    assert states["[0.6]*9"] == states["[0.5]*9"] == TrialState.FAIL
    # 3 paper vectors and 4 anchors were enqueued for 6 trials: the last anchor waits
    assert Counter(t.state for t in study.trials) == {TrialState.FAIL: 2,
                                                      TrialState.COMPLETE: 4,
                                                      TrialState.WAITING: 1}


def test_driver_killed_and_resumed(tmp_path, search_cache_dir):
    args = [sys.executable, str(ROOT / "launch.py"), "search", "--config", "quickstart",
            "--storage_path", str(tmp_path), "--name", "killed", "--num_samples", "8",
            "--set", "trial.epochs=2", "--set", "retrain.enabled=false",
            "--set", f"model.pretrain.cache_dir={search_cache_dir}"]
    trials = tmp_path / "killed" / "trials.jsonl"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(read_records(trials, warn=False)) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:  # the local Ray instance it started, in its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = read_records(trials)
    assert 3 <= len(before) < 8
    study = optuna.load_study(study_name="killed",
                              storage=f"sqlite:///{tmp_path / 'killed' / 'study.db'}")
    assert any(t.state == TrialState.RUNNING for t in study.trials)  # killed mid-trial

    resumed = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_records(trials)
    ids = [r["trial_id"] for r in after]
    assert len(ids) == len(set(ids)) == 8  # each trial once, the total asked for
    assert after[:len(before)] == before  # every finished trial kept as it was
    study = optuna.load_study(study_name="killed",
                              storage=f"sqlite:///{tmp_path / 'killed' / 'study.db'}")
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    told = {t.user_attrs["tune_trial_id"]: t.state for t in study.trials
            if "tune_trial_id" in t.user_attrs and t.user_attrs.get("status") != "lost"}
    assert set(told) == set(ids)
    for r in after:
        expected = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED}[r["status"]]
        assert told[r["trial_id"]] == expected
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert len(manifest["resumes"]) == 1 and "resuming killed" in resumed.stdout
