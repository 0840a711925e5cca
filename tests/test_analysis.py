"""search.results.dataframe, search.results.plots and `launch.py analyze` on experiment folders written to disk."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper beside this file, however pytest imports

import launch  # noqa: E402
from analysis_synthetic import BASE_FLOPS, write_experiment  # noqa: E402
from search.results import dataframe as A  # noqa: E402
from search.results.pareto import front_mask  # noqa: E402
from sketch_core.rates import parse_rates  # noqa: E402

N_UNITS = 9


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory) -> tuple[Path, dict]:
    """80 trials of every status, 2 running Ray trial folders, a retrain, a half-written last line."""
    folder = tmp_path_factory.mktemp("analysis") / "resnet-search"
    info = write_experiment(folder, 80, N_UNITS, seed=3, running=2)
    # a Ray folder for a trial that has ended: trials.jsonl wins, no duplicate row
    ended = info["records"][5]
    d = folder / f"trainable_{ended['trial_id']}"
    d.mkdir()
    (d / "result.json").write_text(json.dumps({"trial_id": ended["trial_id"], "val_acc": 0.1, "epoch": 1,
                                               "config": {"rates": ended["rates"]}}) + "\n")
    with open(folder / "trials.jsonl", "a") as fh:
        fh.write('{"trial_id": "cut", "status": "compl')
    return folder, info


@pytest.fixture(scope="module")
def df(exp_dir) -> pd.DataFrame:
    with pytest.warns(A.ResultsWarning, match=r"trials.jsonl line 81 .*half-written"):
        return A.load_results(exp_dir[0])


def dominates(a_acc, a_cost, b_acc, b_cost) -> bool:
    return a_acc >= b_acc and a_cost <= b_cost and (a_acc > b_acc or a_cost < b_cost)


# ---------------------------------------------------------------- loading


def test_load_results_rows_columns_and_types(df, exp_dir):
    records = exp_dir[1]["records"]
    assert len(df) == 80 + 2  # every ended trial once, plus two running ones; the cut line is skipped
    assert df["trial_id"].is_unique
    for col in ["trial_id", "status", "val_acc", "flops", "flops_ratio", "params", "params_ratio", "epochs",
                "time_s", "node", "error", "test_acc"] + [f"rate_{i:02d}" for i in range(N_UNITS)]:
        assert col in df.columns, col
    assert "experiment" not in df.columns
    assert set(df["status"]) <= set(A.STATUSES)
    by_id = df.set_index("trial_id")
    for rec in records:
        row = by_id.loc[rec["trial_id"]]
        assert row["status"] == rec["status"]
        assert A.rates_of(row) == rec["rates"]
        assert int(row["flops"]) == rec["flops"]
        if rec["val_acc"] is None:
            assert math.isnan(row["val_acc"])
        else:
            assert row["val_acc"] == rec["val_acc"]
        assert (row["error"] if isinstance(row["error"], str) else None) == rec["error"]
    assert df["flops"].dtype == "Int64" and df["val_acc"].dtype == "float64"


def test_running_trials_show_latest_report(df, exp_dir):
    running = df[df["status"] == "running"].set_index("trial_id")
    assert sorted(running.index) == sorted(exp_dir[1]["running_ids"])
    for _, row in running.iterrows():
        assert row["epochs"] == 2 and row["val_acc"] == pytest.approx(0.7)  # the complete last line
        assert row["flops"] == 60_000_000 and not math.isnan(row["rate_00"])


def test_retrain_and_paper_rates_are_attached(df, exp_dir):
    best = exp_dir[1]["best"]
    with_test = df[df["test_acc"].notna()]
    assert list(with_test["trial_id"]) == [best["trial_id"]]
    assert with_test["test_acc"].iloc[0] == 0.9211 and with_test["pick"].iloc[0] == "best"
    paper = df[df["paper_rate"].notna()]
    records = exp_dir[1]["records"]
    assert list(paper["trial_id"]) == [records[0]["trial_id"], records[1]["trial_id"]]
    # the first matched the manifest's paper_rates, the second carried its label in the record
    assert list(paper["paper_rate"]) == [f"[0.6]*{N_UNITS}", f"[0.4]*{N_UNITS}"]


def test_ratios_filled_from_the_baseline_when_missing(tmp_path):
    write_experiment(tmp_path / "e", 12, 4, seed=1, retrain=False)
    lines = (tmp_path / "e" / "trials.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    for r in recs:
        del r["flops_ratio"]
    (tmp_path / "e" / "trials.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    df = A.load_results(tmp_path / "e")
    np.testing.assert_allclose(df["flops_ratio"], [r["flops"] / BASE_FLOPS for r in recs], rtol=1e-12)


def test_storage_uri_and_several_folders(tmp_path):
    write_experiment(tmp_path / "a", 20, 4, seed=1, name="same")
    write_experiment(tmp_path / "b", 15, 4, seed=2, name="same")
    one = A.load_results(f"file://{tmp_path / 'a'}")
    assert len(one) == 20
    both = A.load_results([tmp_path / "a", tmp_path / "b"])
    assert both["experiment"].value_counts().to_dict() == {"same": 20, "same#2": 15}
    assert list(both.columns[:3]) == ["experiment", "trial_id", "status"]


def test_folder_without_experiment_is_a_user_error(tmp_path):
    from sketch_core.errors import UserError

    with pytest.raises(UserError, match="holds no experiment"):
        A.load_results(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        A.load_results(tmp_path / "missing")


# ---------------------------------------------------------------- front and hypervolume


def _brute_hypervolume(points: list[tuple[float, float]], ref_acc: float, ref_ratio: float) -> float:
    """Union of rectangles [acc_ref, acc] x [ratio, ratio_ref], by cells of the coordinate grid."""
    pts = [(a, r) for a, r in points if a >= ref_acc and r <= ref_ratio]
    xs = sorted({ref_acc, *(a for a, _ in pts)})
    ys = sorted({ref_ratio, *(r for _, r in pts)})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if any(a >= cx and r <= cy for a, r in pts):
                area += (x1 - x0) * (y1 - y0)
    return area


def test_pareto_front_is_non_dominated_and_dominates_the_rest(df):
    front = A.pareto_front(df)
    done = df[df["status"] == "completed"]
    assert 1 <= len(front) < len(done)
    assert set(front["status"]) == {"completed"}
    assert list(front["flops"]) == sorted(front["flops"])
    for (_, a), (_, b) in itertools.permutations(front.iterrows(), 2):
        assert not dominates(a["val_acc"], a["flops"], b["val_acc"], b["flops"])
    on = set(front["trial_id"])
    for _, row in done.iterrows():
        if row["trial_id"] not in on:
            assert any(dominates(f["val_acc"], f["flops"], row["val_acc"], row["flops"])
                       for _, f in front.iterrows()), row["trial_id"]
    # stopped-early trials are never on the front, even when they would dominate
    stopped = df[df["status"] == "stopped"].copy()
    stopped["val_acc"] = 1.0
    assert set(A.pareto_front(pd.concat([df, stopped.assign(trial_id="s" + stopped["trial_id"])]))
               ["trial_id"]) == on


def test_front_fallback_matches_optuna_with_ties():
    rng = np.random.default_rng(0)
    loss = np.round(rng.uniform(0, 1, (400, 2)), 1)  # many exact ties
    brute = np.array([not any(np.all(q <= p) and np.any(q < p) for q in loss) for p in loss])
    assert np.array_equal(front_mask(loss), brute)
    try:  # Optuna's own non-domination routine, as a cross-check (not a public name)
        from optuna.study._multi_objective import _is_pareto_front
    except ImportError:
        pytest.skip("optuna.study._multi_objective._is_pareto_front moved")
    assert np.array_equal(_is_pareto_front(loss, assume_unique_lexsorted=False), front_mask(loss))


def test_hypervolume_matches_brute_force(df):
    done = df[(df["status"] == "completed")]
    points = list(zip(done["val_acc"], done["flops_ratio"]))
    assert A.hypervolume(df) == pytest.approx(_brute_hypervolume(points, 0.0, 1.0), rel=1e-12, abs=1e-15)
    assert A.hypervolume(df, ref=(0.5, 0.7)) == pytest.approx(_brute_hypervolume(points, 0.5, 0.7), rel=1e-12)
    from search.results.pareto import hypervolume

    assert hypervolume(done["val_acc"], done["flops_ratio"]) == pytest.approx(A.hypervolume(df), rel=1e-12)


def test_hypervolume_ignores_points_beyond_the_reference():
    df = pd.DataFrame({"status": ["completed"] * 3, "val_acc": [0.8, 0.9, 0.95],
                       "flops_ratio": [0.5, 1.2, 0.9], "flops": [5, 12, 9]})
    assert A.hypervolume(df) == pytest.approx(0.8 * 0.5 + 0.95 * 0.1 - 0.8 * 0.1)  # union of two boxes
    assert A.hypervolume(df.iloc[1:2]) == 0.0


def test_history_is_monotone_and_ends_at_the_hypervolume(df):
    hist = A.hypervolume_history(df)
    assert len(hist) == int(df["status"].isin(A.ENDED_STATUSES).sum())
    assert (np.diff(hist["hypervolume"]) >= -1e-15).all()
    assert hist["hypervolume"].iloc[-1] == pytest.approx(A.hypervolume(df), rel=1e-12)
    assert hist["best_val_acc"].iloc[-1] == df.loc[df["status"] == "completed", "val_acc"].max()
    # after k trials, the hypervolume is that of the first k trials alone
    ended = df[df["status"].isin(A.ENDED_STATUSES)].sort_values("ended")
    assert hist["hypervolume"].iloc[29] == pytest.approx(A.hypervolume(ended.iloc[:30]), rel=1e-12)


# ---------------------------------------------------------------- sensitivity and picks


def test_layer_sensitivity_finds_the_sensitive_layer(tmp_path):
    sens = [0.0, 0.0, 0.0, 0.15, 0.0, 0.0]
    write_experiment(tmp_path / "e", 200, 6, seed=5, sens=sens, statuses=False)
    df = A.load_results(tmp_path / "e")
    table = A.layer_sensitivity(df, ["a", "b", "c", "d", "e", "f"])
    assert list(table["rate"]) == [f"rate_{i:02d}" for i in range(6)]
    assert table.loc[table["partial_spearman"].idxmax(), "unit_name"] == "d"
    assert table.loc[3, "partial_spearman"] > 0.5 and table.loc[3, "p_value"] < 1e-6
    others = table.drop(index=3)
    assert (others["partial_spearman"] < 0.2).all()
    assert (table["n"] == 200).all()
    # the unit names come from the manifest that load_results leaves in df.attrs
    assert list(A.layer_sensitivity(df)["unit_name"][:4]) == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]


def test_budget_and_top_trials(df):
    done = df[df["status"] == "completed"]
    for text, col, value in [("0.7", "flops_ratio", 0.7), ("70%", "flops_ratio", 0.7),
                             (f"{BASE_FLOPS * 0.7 / 1e6:.3f}M", "flops", BASE_FLOPS * 0.7)]:
        best = A.best_within(df, text)
        fits = done[done[col] <= value * (1 + 1e-9)]
        assert best["val_acc"] == fits["val_acc"].max() and best[col] <= value * (1 + 1e-9)
    assert A.best_within(df, "1K") is None
    top = A.top_trials(df, 5)
    assert list(top["val_acc"]) == sorted(done["val_acc"], reverse=True)[:5]
    from search.results.budgets import Budget, parse_budget
    from sketch_core.errors import UserError

    assert parse_budget("1.2G") == Budget("flops", "absolute", 1.2e9)
    for bad in ("abc", "-1", "0", "150%", "3ms"):
        with pytest.raises(UserError):
            parse_budget(bad)


def test_rate_vectors_print_in_the_original_syntax_and_parse_back(df):
    for _, row in A.pareto_front(df).iterrows():
        text = A.format_rate_vector(A.rates_of(row))
        assert re.fullmatch(r"(\[[0-9.e-]+\](\*\d+)?\+)*\[[0-9.e-]+\](\*\d+)?", text)
        assert parse_rates(text) == A.rates_of(row)
    assert A.format_rate_vector([0.6] * 27) == "[0.6]*27"


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", A.EXPORT_FORMATS)
def test_export_round_trips_exactly(df, tmp_path, fmt):
    frame = df.copy()
    frame.loc[0, "trial_id"] = "00012"  # must stay a string
    frame.loc[1, "flops"] = pd.NA  # a missing integer
    frame.loc[2, "val_acc"] = 0.1 + 0.2  # a float with a long repr
    path = A.export(frame, tmp_path, fmt)
    assert path == tmp_path / f"trials.{fmt}"
    back = A.read_export(path)
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_export_of_several_experiments_round_trips(tmp_path):
    write_experiment(tmp_path / "a", 12, 4, seed=1)
    write_experiment(tmp_path / "b", 12, 5, seed=2)
    both = A.load_results([tmp_path / "a", tmp_path / "b"])
    assert both["rate_04"].isna().sum() == 12
    for fmt in ("csv", "parquet"):
        pd.testing.assert_frame_equal(A.read_export(A.export(both, tmp_path / "out", fmt)), both,
                                      check_exact=True)


# ---------------------------------------------------------------- plots


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_sensible_pngs_and_svgs(df, exp_dir, tmp_path):
    from search.results import plots

    with pytest.warns(A.ResultsWarning):
        exp = A.load_experiment(exp_dir[0])
    written = plots.write_plots(exp, tmp_path)
    names = {p.name for p in written}
    for stem in ("tradeoff", "front_rates", "convergence", "sensitivity"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
        png = tmp_path / f"{stem}.png"
        w, h = _png_size(png)
        assert 500 <= w <= 2500 and 300 <= h <= 2000, (stem, w, h)
        assert png.stat().st_size > 10_000
        svg = (tmp_path / f"{stem}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    tradeoff = (tmp_path / "tradeoff.svg").read_text()
    for label in ("validation accuracy (%)", "MACs (millions)", "Pareto front", f"[0.6]*{N_UNITS}", "retrained",
                  "unpruned baseline"):
        assert label in tradeoff, label
    # a bare DataFrame from load_results plots the same (its manifest travels in df.attrs)
    plots.save_figure(plots.plot_tradeoff(df[df["status"] != "failed"]), tmp_path, "from_df", ["svg"])
    assert "unpruned baseline" in (tmp_path / "from_df.svg").read_text()


# ---------------------------------------------------------------- the command line


def test_analyze_command(exp_dir, df, tmp_path, capsys):
    folder, _ = exp_dir
    out = tmp_path / "out"
    rc = launch.main(["analyze", str(folder), "--flops_budget", "0.7", "--top", "4", "--out", str(out),
                      "--format", "parquet", "--no_plots"])  # plots: the test above and the 10,000 one
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "warning:" in cap.err and "half-written" in cap.err
    text = cap.out
    assert "top 4 completed trials" in text and "Pareto front" in text
    hv = float(re.search(r"hypervolume: ([0-9.]+)", text).group(1))
    assert hv == pytest.approx(A.hypervolume(df), abs=1e-4)
    best = A.best_within(df, "0.7")
    line = re.search(r"best trial within the FLOPs budget .*: (\S+):", text)
    assert line.group(1) == best["trial_id"]
    printed = re.search(r"--sketch_rate '([^']+)'", text.split("best trial within")[1]).group(1)
    assert parse_rates(printed, "resnet20") == A.rates_of(best)  # 9 units, as ResNet-20
    assert str(out) in text
    trials = A.read_export(out / "trials.parquet")
    pd.testing.assert_frame_equal(trials, df, check_exact=True)
    for name in ("front.parquet", "sensitivity.parquet", "history.parquet"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.png"))


def test_analyze_compares_several_folders(tmp_path, capsys):
    write_experiment(tmp_path / "a", 30, 4, seed=1)
    write_experiment(tmp_path / "b", 25, 4, seed=2)
    rc = launch.main(["analyze", str(tmp_path / "a"), str(tmp_path / "b"), "--no_plots"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "comparison:" in out and "== experiment a" in out and "== experiment b" in out
    front = A.read_export(tmp_path / "a" / "analysis" / "front.csv")
    assert set(front["experiment"]) == {"a", "b"}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_analyze_bad_input(tmp_path, capsys):
    assert launch.main(["analyze", str(tmp_path)]) == 2
    assert "holds no experiment" in _error_line(capsys)

    # an experiment with running trials only
    info = write_experiment(tmp_path / "young", 1, 4, seed=1, running=1, retrain=False)
    (tmp_path / "young" / "trials.jsonl").write_text("")
    assert launch.main(["analyze", str(tmp_path / "young")]) == 2
    line = _error_line(capsys)
    assert "no finished trial yet" in line and info["running_ids"][0] in line

    # an output folder that cannot be written (a path under a regular file)
    write_experiment(tmp_path / "done", 12, 4, seed=1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert launch.main(["analyze", str(tmp_path / "done"), "--out", str(blocker / "sub")]) == 2
    assert "cannot write to the output folder" in _error_line(capsys)

    assert launch.main(["analyze", str(tmp_path / "done"), "--flops_budget", "lots"]) == 2
    assert "--flops_budget: cannot read 'lots'" in _error_line(capsys)


def test_analyze_10000_trials_is_fast(tmp_path, capsys):
    """The benchmark (benchmarks/analyze_speed.py) measures this; here a generous bound."""
    write_experiment(tmp_path / "big", 10_000, 27, seed=0)
    t0 = time.perf_counter()
    rc = launch.main(["analyze", str(tmp_path / "big"), "--flops_budget", "0.5"])
    elapsed = time.perf_counter() - t0
    capsys.readouterr()
    assert rc == 0
    assert elapsed < 30.0, elapsed
    assert len(A.read_export(tmp_path / "big" / "analysis" / "trials.csv")) == 10_000
    for stem in ("tradeoff", "front_rates", "convergence", "sensitivity"):
        assert _png_size(tmp_path / "big" / "analysis" / f"{stem}.png")[0] >= 500
    shutil.rmtree(tmp_path / "big")


# ---------------------------------------------------------------- a real quickstart experiment


def _experiment_path(value) -> Path:
    """The folder behind whatever the shared fixture returns (a path, or an object/dict holding one)."""
    if isinstance(value, (str, Path)):
        return Path(value)
    for key in ("exp_dir", "path", "folder", "experiment"):
        inner = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if isinstance(inner, (str, Path)) and (Path(inner) / "manifest.json").is_file():
            return Path(inner)
    raise AssertionError(f"cannot find the experiment folder in {value!r}")


@pytest.mark.cluster
def test_real_quickstart_experiment(request, tmp_path, capsys):
    try:
        folder = _experiment_path(request.getfixturevalue("quickstart_experiment"))
    except pytest.FixtureLookupError:
        pytest.skip("no quickstart_experiment fixture in tests/conftest.py")
    manifest = json.loads((folder / "manifest.json").read_text())
    lines = [json.loads(x) for x in (folder / "trials.jsonl").read_text().splitlines() if x.strip()]
    df = A.load_results(folder)
    ended = df[df["status"].isin(A.ENDED_STATUSES)]
    assert sorted(ended["trial_id"]) == sorted(str(r["trial_id"]) for r in lines)
    assert len(A.rate_columns(df)) == manifest["num_units"]
    for _, row in ended.iterrows():
        rec = next(r for r in lines if str(r["trial_id"]) == row["trial_id"])
        if rec.get("rates"):
            assert A.rates_of(row) == [float(x) for x in rec["rates"]]
    done = df[df["status"] == "completed"]
    front = A.pareto_front(df)
    assert len(front) >= 1
    for (_, a), (_, b) in itertools.permutations(front.iterrows(), 2):
        assert not dominates(a["val_acc"], a["flops"], b["val_acc"], b["flops"])
    for _, row in done[~done["trial_id"].isin(front["trial_id"])].iterrows():
        assert any(dominates(f["val_acc"], f["flops"], row["val_acc"], row["flops"]) for _, f in front.iterrows())
    points = list(zip(done["val_acc"], done["flops_ratio"]))
    assert A.hypervolume(df) == pytest.approx(_brute_hypervolume(points, 0.0, 1.0), rel=1e-12, abs=1e-15)
    for fmt in ("csv", "parquet"):
        pd.testing.assert_frame_equal(A.read_export(A.export(df, tmp_path, fmt)), df, check_exact=True)

    out = tmp_path / "out"
    assert launch.main(["analyze", str(folder), "--flops_budget", "1.0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    printed = re.search(r"--sketch_rate '([^']+)'", text.split("best trial within")[1]).group(1)
    best = A.best_within(df, "1.0")
    assert parse_rates(printed, manifest["cfg"], manifest["data_set"]) == A.rates_of(best)
    w, h = _png_size(out / "tradeoff.png")
    assert w >= 500 and h >= 300
