"""The search end to end: experiment folder, Optuna study, FLOPs budget, time budget, bad input."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import launch
from search.experiment.config import load_config
from search.results.trials_file import read_records
from search.propose.space import RateSpace
from search.propose.samplers.surrogate import observations, rung_key
from sketch_core.rates import rates_to_widths

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent


def run_launch(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python launch.py ARGS`` in a subprocess with its own Ray instance."""
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=timeout)

MANIFEST_KEYS = {"name", "command", "config", "cfg", "data_set", "family", "num_units",
                 "unit_names", "baseline", "paper_rates", "started", "ended", "phases",
                 "versions", "git_commit", "seeds"}


def _study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


def test_quickstart_experiment_folder(quickstart_experiment):
    folder = quickstart_experiment
    manifest = json.loads((folder / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["cfg"] == "resnet20" and manifest["num_units"] == 9
    assert set(manifest["baseline"]) >= {"flops", "params", "val_acc", "test_acc"}
    assert manifest["baseline"]["test_acc"] > 0.9
    assert manifest["paper_rates"]["[0.6]*9"] == [0.6] * 9
    for phase in ("pretrain_s", "search_s", "retrain_s"):
        assert manifest["phases"][phase] >= 0
    assert (folder / "baseline.pt").is_file() and (folder / "config.yaml").is_file()

    records = read_records(folder / "trials.jsonl")
    assert len(records) == 12 == len({r["trial_id"] for r in records})
    statuses = Counter(r["status"] for r in records)
    assert set(statuses) <= {"completed", "stopped"} and statuses["completed"] >= 2
    assert statuses["stopped"] >= 1  # cost-ASHA stopped some after one epoch
    space = RateSpace("resnet20", "digits", in_channels=1, input_size=8)
    for r in records:
        assert r["widths"] == rates_to_widths("resnet20", r["rates"], "digits")
        cost = space.cost(r["rates"])
        assert (r["flops"], r["params"]) == (cost.flops, cost.params)
        assert r["flops_ratio"] == pytest.approx(r["flops"] / manifest["baseline"]["flops"])
        assert re.fullmatch(r"[0-9a-f]{40,}", r["node"])
        assert 0 <= r["val_acc"] <= 1 and r["started"] <= r["ended"]
        assert r["epochs"] == (2 if r["status"] == "completed" else 1)
        if r["status"] == "stopped":
            assert r["stop_reason"] == "cost_asha"
    # the paper's vectors ran first
    first = {r["paper_rates"]: r["optuna_number"] for r in records if r.get("paper_rates")}
    assert sorted(first.values()) == [0, 1, 2] and first["[0.6]*9"] == 0
    # then uniform anchors spread by MACs, none at the unpruned cost
    anchors = {r["anchor"]: r for r in records if r.get("anchor")}
    assert set(anchors) == {"[0.1]*9", "[0.35]*9", "[0.65]*9", "[0.95]*9"}
    assert all(r["flops_ratio"] < 1 for r in records)

    study = _study(folder, "quickstart")
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.RUNNING] == 0
    assert states[TrialState.COMPLETE] == statuses["completed"]
    assert states[TrialState.PRUNED] == statuses["stopped"]  # early stops are not results
    assert len({tuple(r["widths"]) for r in records}) == len(records)  # no network twice
    by_tid = {t.user_attrs["tune_trial_id"]: t for t in study.trials
              if "tune_trial_id" in t.user_attrs}
    for r in records:
        t = by_tid[r["trial_id"]]
        assert space.rates_from_params(t.params) == pytest.approx(r["rates"], abs=1e-9)
        if r["status"] == "completed":
            assert t.values == [r["val_acc"], r["flops"]]
        else:
            assert t.values is None
        # every epoch's score went from Tune's reports into the study, beside the trial
        curve = {k: v for k, v in t.user_attrs.items() if k.startswith("rung_acc_")}
        assert sorted(curve) == [rung_key(e) for e in range(r["epochs"] + 1)]
        assert curve[rung_key(r["epochs"])] == pytest.approx(r["val_acc"])
    # the surrogate sampler sees the stopped trials, as estimates of their final scores
    seen = observations(study, RateSpace("resnet20", "digits", low=0.1, high=1.0, step=0.05,
                                         in_channels=1, input_size=8))
    assert sum(o.stopped for o in seen) == statuses["stopped"]
    assert sum(not o.stopped for o in seen) == statuses["completed"]
    assert all(t.state == TrialState.COMPLETE for t in study.best_trials)

    # one checkpoint kept per trial
    for trial_dir in folder.glob("trial_*"):
        assert len(list(trial_dir.glob("checkpoint_*"))) <= 1

    out = (folder.parent / "quickstart_stdout.txt").read_text()
    assert "[search] trials 12/12 ended" in out and "Pareto front" in out
    assert re.search(r"phases: pretrain [\d.]+s, search [\d.]+s, retrain [\d.]+s", out)
    assert f"experiment folder: {folder}" in out
    assert (folder / "trials.csv").is_file()


def _small_config(tmp_path, cache, **over):
    sets = [f"storage.storage_path={tmp_path}", f"model.pretrain.cache_dir={cache}",
            "retrain.enabled=false", "trial.epochs=0", "budget.num_samples=8",
            "space.paper_rates=['[0.6]*9']"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
    return load_config("quickstart", sets)


def test_flops_budget_rejects_without_training_and_teaches_optuna(tmp_path, search_cache_dir):
    from search.run.ray_driver import run_search

    config = _small_config(tmp_path, search_cache_dir, storage__name="rej",
                           budget__flops_budget=0.4, budget__flops_policy="reject",
                           budget__num_samples=5)
    out = run_search(config, quiet=True)
    records = out.records
    trained = [r for r in records if r["status"] != "rejected"]
    rejected = [r for r in records if r["status"] == "rejected"]
    assert len(trained) == 5 and rejected  # the paper's [0.6]*9 alone is above 0.4
    assert all(r["flops_ratio"] <= 0.4 for r in trained)
    assert all(r["flops_ratio"] > 0.4 and r["epochs"] == 0 and r["node"] is None
               and "above flops_budget 0.4" in r["error"] for r in rejected)
    assert any(r["rates"] == [0.6] * 9 for r in rejected)
    study = _study(out.exp_dir, "rej")
    infeasible = [t for t in study.trials if t.user_attrs.get("status") == "rejected"]
    assert len(infeasible) == len(rejected)
    assert all(t.constraints["flops_budget"] > 0 for t in infeasible)
    assert all(t.constraints["flops_budget"] <= 0 for t in study.trials
               if t.user_attrs.get("status") == "completed")


def test_surrogate_sampler_runs_a_search_through_ray_tune(tmp_path, search_cache_dir):
    """Tune pickles the searcher with it; every trial in the budget, no vector twice (the
    model's proposals themselves: tests/test_surrogate.py)."""
    from search.run.ray_driver import run_search

    config = _small_config(tmp_path, search_cache_dir, storage__name="sur",
                           sampler__name="surrogate", budget__num_samples=11,
                           budget__flops_budget=0.7)
    out = run_search(config, quiet=True)
    trained = [r for r in out.records if r["status"] != "rejected"]
    assert len(trained) == 11 and all(r["status"] == "completed" for r in trained)
    assert all(r["flops_ratio"] <= 0.7 + 1e-9 for r in trained)
    study = _study(out.exp_dir, "sur")
    sampled = [t for t in study.trials if t.user_attrs.get("status") == "completed"
               and not ({"paper_rates", "anchor"} & set(t.user_attrs))]
    assert len(sampled) >= 3
    assert len({tuple(r["rates"]) for r in trained}) == len(trained)


def test_flops_budget_repair_trains_the_repaired_vector(tmp_path, search_cache_dir):
    from search.run.ray_driver import run_search

    # no anchors: [0.6]*9 is repaired to [0.4]*9, the network of an anchor, run only once
    config = _small_config(tmp_path, search_cache_dir, storage__name="rep",
                           budget__flops_budget=0.4, budget__flops_policy="repair",
                           budget__num_samples=5, sampler__anchors=0)
    out = run_search(config, quiet=True)
    records = out.records
    assert len(records) == 5 and all(r["status"] == "completed" for r in records)
    assert all(r["flops_ratio"] <= 0.4 for r in records)
    repaired = [r for r in records if r.get("flops_policy") == "repaired"]
    assert repaired and any(r["proposed_rates"] == [0.6] * 9 for r in repaired)
    study = _study(out.exp_dir, "rep")
    by_tid = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    space = RateSpace("resnet20", "digits", low=0.1, in_channels=1, input_size=8)
    for r in repaired:  # Optuna was told the vector that was trained
        t = by_tid[r["trial_id"]]
        assert space.rates_from_params(t.params) == pytest.approx(r["rates"], abs=1e-9)
        assert t.user_attrs["proposed_rates"] == r["proposed_rates"]
        assert study.trials[t.user_attrs["repaired_from"]].state == TrialState.PRUNED


def test_time_budget_ends_the_search_phase(tmp_path, search_cache_dir):
    proc = run_launch(["search", "--config", "quickstart", "--budget", "30s",
                       "--num_samples", "100000", "--storage_path", str(tmp_path),
                       "--name", "timed", "--no_retrain",
                       "--set", f"model.pretrain.cache_dir={search_cache_dir}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "timed" / "manifest.json").read_text())
    search_s = manifest["phases"]["search_s"]
    assert search_s <= 30 + 15
    assert re.search(r"phases: pretrain \S+, search \S+ \(([\d.]+)s\)", proc.stdout)
    records = read_records(tmp_path / "timed" / "trials.jsonl")
    assert len(records) >= 4
    study = _study(tmp_path / "timed", "timed")
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    if any(r.get("stop_reason") == "budget" for r in records):  # cut by the budget: pruned
        tid = next(r["trial_id"] for r in records if r.get("stop_reason") == "budget")
        t = next(t for t in study.trials if t.user_attrs.get("tune_trial_id") == tid)
        assert t.state == TrialState.PRUNED


# ----------------------------------------------------------------------------- bad input

def _one_line_error(capsys, argv) -> str:
    rc = launch.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--set", "trial.epoch=2"], "did you mean 'trial.epochs'"),
    (["--set", "trial.epochs=two"], "expected an integer"),
    (["--set", "space.high=1.2"], "outside (0, 1]"),
    (["--flops_budget", "0"], "outside (0, 1]"),
    (["--budget", "ten minutes"], "cannot parse 'ten minutes'"),
    (["--set", "space.paper_rates=['[0.6]*8']"], "takes 9 sketch rates, got 8"),
])
def test_bad_search_input_is_one_line_and_leaves_nothing(capsys, tmp_path, extra, message):
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--storage_path",
                                   str(tmp_path), "--name", "bad", *extra])
    assert message in err
    assert not (tmp_path / "bad").exists()


def test_bad_config_file_suggests_the_closest_key(capsys, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model: {cfg: resnet20, data_set: digits}\ntrail: {epochs: 2}\n")
    err = _one_line_error(capsys, ["search", "--config", str(cfg)])
    assert "unknown config key 'trail'; did you mean 'trial'?" in err


def test_address_with_no_cluster_fails_fast(capsys, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--address",
                                   f"127.0.0.1:{port}", "--storage_path", str(tmp_path)])
    assert time.time() - t0 < 30
    assert f"--address 127.0.0.1:{port}: no Ray cluster answers there" in err


def test_resources_no_node_has(capsys, tmp_path, search_cache_dir):
    t0 = time.time()
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--storage_path",
                                   str(tmp_path), "--name", "big", "--set", "resources.gpu=2"])
    assert "asks for 1 CPU and 2 GPU" in err and "the largest" in err
    assert time.time() - t0 < 60
    assert not (tmp_path / "big").exists()


def test_resume_of_a_folder_without_experiment(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--storage_path",
                                   str(tmp_path), "--name", "empty", "--resume"])
    assert "holds no experiment" in err
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--resume",
                                   "--storage_path", str(tmp_path)])
    assert "--resume needs --name" in err


def test_pretrained_checkpoint_that_does_not_match(capsys, tmp_path, quickstart_experiment):
    baseline = quickstart_experiment / "baseline.pt"  # a digits ResNet-20
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--storage_path",
                                   str(tmp_path), "--name", "mismatch", "--cfg", "resnet32",
                                   "--set", "space.paper_rates=[]", "--pretrained",
                                   str(baseline)])
    assert "resnet20, not a resnet32" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--storage_path",
                                   str(tmp_path), "--name", "junk", "--pretrained", str(junk)])
    assert "junk.pt" in err
    assert not (tmp_path / "mismatch").exists() and not (tmp_path / "junk").exists()


def test_existing_experiment_is_not_overwritten(capsys, quickstart_experiment):
    err = _one_line_error(capsys, ["search", "--config", "quickstart", "--storage_path",
                                   str(quickstart_experiment.parent), "--name", "quickstart"])
    assert "already exists; continue it with --resume" in err
    assert (quickstart_experiment / "manifest.json").is_file()

