"""The final retrain of a searched configuration: picks, outputs, and what reads them."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest

import launch
from search.results.picks import knee_record
from search.results.trials_file import read_records
from sketch_core.io.checkpoint import load_checkpoint

pytestmark = pytest.mark.cluster


@pytest.fixture
def experiment_copy(quickstart_experiment, tmp_path):
    """A private copy of the shared experiment (other tests read the original as it is)."""
    dst = tmp_path / "exp"
    shutil.copytree(quickstart_experiment, dst,
                    ignore=shutil.ignore_patterns("checkpoint_*", "trial_*"))
    return dst


def test_search_retrained_the_knee(quickstart_experiment, capsys):
    folder = quickstart_experiment
    records = read_records(folder / "trials.jsonl")
    result = json.loads((folder / "retrain" / "knee" / "result.json").read_text())
    knee = knee_record(records)
    assert result["trial_id"] == knee["trial_id"] and result["rates"] == knee["rates"]
    assert result["pick"] == "knee" and result["epochs"] == 2
    assert 0.5 < result["test_acc"] <= 1
    assert result["flops"] == knee["flops"] and result["params"] == knee["params"]
    assert result["flops_reduction"] == pytest.approx(1 - knee["flops_ratio"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert result["baseline_test_acc"] == manifest["baseline"]["test_acc"]
    rows = list(csv.DictReader(open(folder / "retrain" / "knee" / "metrics.csv")))
    assert len(rows) == 2

    model = folder / "retrain" / "knee" / "model.pt"
    loaded = load_checkpoint(model)
    assert loaded.meta["rates"] == knee["rates"] and loaded.meta["widths"] == knee["widths"]
    assert launch.main(["sketch", "--test_only", "--refine", str(model),
                        "--data_set", "digits"]) == 0
    out = capsys.readouterr().out
    assert f"test acc {100 * result['test_acc']:.2f}%" in out
    assert launch.main(["info", "--sketch_model", str(model), "--input_size", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["flops"] == result["flops"] and info["params"] == result["params"]


def test_retrain_picks_from_the_command_line(experiment_copy, capsys):
    records = read_records(experiment_copy / "trials.jsonl")
    assert launch.main(["retrain", "--experiment", str(experiment_copy), "--pick", "flops<=0.7",
                        "--epochs", "1", "--quiet"]) == 0
    result = json.loads((experiment_copy / "retrain" / "flops_le_0.7" / "result.json").read_text())
    fit = [r for r in records if r["status"] == "completed" and r["flops_ratio"] <= 0.7]
    # the most accurate; equal accuracies (likely on a small validation split): the cheapest
    want = max(fit, key=lambda r: (r["val_acc"], -r["flops_ratio"]))
    assert result["trial_id"] == want["trial_id"]
    assert result["flops_ratio"] <= 0.7 and result["epochs"] == 1

    stopped = next(r for r in records if r["status"] == "stopped")
    assert launch.main(["retrain", "--experiment", str(experiment_copy), "--pick",
                        f"trial={stopped['trial_id']}", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[retrain\] test acc [\d.]+%", out)
    result = json.loads((experiment_copy / "retrain" / f"trial_{stopped['trial_id']}"
                         / "result.json").read_text())
    assert result["rates"] == stopped["rates"]


@pytest.mark.parametrize("pick, message", [
    ("trial=nosuchtrial", "--pick trial=nosuchtrial: no such trial in this experiment"),
    ("flops<=0.001", "--pick flops<=0.001: no completed trial is that small"),
    ("cheapest", "expected knee, best, flops<=F"),
])
def test_bad_picks_are_one_line(experiment_copy, capsys, pick, message):
    assert launch.main(["retrain", "--experiment", str(experiment_copy), "--pick", pick]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (experiment_copy / "retrain" / pick).exists()


def test_retrain_of_a_folder_without_experiment(tmp_path, capsys):
    assert launch.main(["retrain", "--experiment", str(tmp_path)]) == 2
    assert "holds no experiment" in capsys.readouterr().err


def test_retrain_data_parallel_on_two_workers(experiment_copy, capsys):
    assert launch.main(["retrain", "--experiment", str(experiment_copy), "--pick", "best",
                        "--epochs", "1", "--workers", "2", "--quiet"]) == 0
    job = experiment_copy / "retrain" / "best"
    result = json.loads((job / "result.json").read_text())
    assert result["workers"] == 2 and 0 < result["test_acc"] <= 1
    best = max((r for r in read_records(experiment_copy / "trials.jsonl")
                if r["status"] == "completed"), key=lambda r: (r["val_acc"], -r["flops_ratio"]))
    loaded = load_checkpoint(job / "model.pt")
    assert loaded.meta["rates"] == best["rates"]
    assert result["flops"] == best["flops"]
