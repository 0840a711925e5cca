"""search.results.pareto: one front, knee and best rule, shared by the picks and the analysis; one trials.jsonl reader."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pandas as pd
import pytest

from search.results import dataframe as A
from search.results.pareto import best_index, front_indices, front_mask, knee_index
from search.results.picks import knee_record, pareto_records, select_record
from search.results.trials_file import NO_TRIAL_ID, NOT_AN_OBJECT, json_lines, parse_records, read_records


def _brute(loss: np.ndarray) -> np.ndarray:
    ok = np.isfinite(loss).all(axis=1)
    return np.array([ok[i] and not any(ok[j] and np.all(loss[j] <= p) and np.any(loss[j] < p)
                                       for j in range(len(loss))) for i, p in enumerate(loss)])


# ---------------------------------------------------------------- the front


def test_duplicates_are_all_on_the_front_in_input_order():
    acc = [0.9, 0.8, 0.9, 0.7, 0.8, 0.9]
    cost = [0.5, 0.3, 0.5, 0.3, 0.6, 0.5]
    # 0, 2 and 5 are one point; 1 beats 3 (same cost) and 4 (same accuracy, less cost)
    assert list(front_indices(acc, cost)) == [1, 0, 2, 5]
    assert list(front_mask(np.column_stack([np.negative(acc), cost]))) == [True, True, True, False, False, True]


def test_missing_values_are_never_on_the_front_and_dominate_nothing():
    acc = [0.5, None, float("nan"), 0.6, float("inf")]
    cost = [0.5, 0.1, 0.1, float("nan"), 0.9]
    assert list(front_indices(acc, cost)) == [0]
    assert front_indices([], []).tolist() == [] and knee_index([], []) is None
    with pytest.raises(ValueError, match="differ in length"):
        front_indices([0.5], [0.5, 0.6])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_front_of_k_objectives_matches_brute_force(k):
    rng = np.random.default_rng(k)
    loss = np.round(rng.uniform(0, 1, (150, k)), 1)  # many ties and exact duplicates
    loss[7, 0] = np.nan
    assert np.array_equal(front_mask(loss), _brute(loss))
    # the general path on a constant extra column says what the two-column path says
    if k == 2:
        assert np.array_equal(front_mask(np.column_stack([loss, np.zeros(len(loss))])), front_mask(loss))


def test_front_matches_optuna_with_three_objectives():
    try:
        from optuna.study._multi_objective import _is_pareto_front
    except ImportError:
        pytest.skip("optuna.study._multi_objective._is_pareto_front moved")
    loss = np.round(np.random.default_rng(1).uniform(0, 1, (300, 3)), 1)
    assert np.array_equal(_is_pareto_front(loss, assume_unique_lexsorted=False), front_mask(loss))


# ---------------------------------------------------------------- knee and best


def test_knee_ties_go_to_the_more_accurate_then_the_earliest():
    # scaled, the ends are (0, 0) and (1, 1); (0.25, 0.5) and (0.5, 0.75) are equally far
    cost = [0.25, 0.0, 1.0, 0.5]
    acc = [0.5, 0.0, 1.0, 0.75]
    assert knee_index(acc, cost) == 3
    # an exact copy of the knee: the earlier one
    assert knee_index(acc + [0.75], cost + [0.5]) == 3
    assert knee_index([0.75] + acc, [0.5] + cost) == 0
    # one or two distinct points: the more accurate (all distances are 0)
    assert knee_index([0.6, 0.9, 0.9], [0.2, 0.7, 0.7]) == 1
    assert knee_index([0.6], [0.2]) == 0


def test_knee_is_the_farthest_from_the_line_between_the_ends():
    cost, acc = [0.2, 0.4, 0.7, 1.0, 0.5], [0.60, 0.90, 0.93, 0.94, 0.80]
    assert knee_index(acc, cost) == 1  # scaled: (0, 0), (0.25, 0.882), (0.625, 0.971), (1, 1)
    # scaling makes the knee independent of the units of either axis
    assert knee_index([100 * a for a in acc], [1e8 * c for c in cost]) == 1


def test_best_breaks_accuracy_ties_by_cost_then_order():
    acc = [0.8, 0.9, 0.9, 0.9, None]
    cost = [0.1, 0.6, 0.4, 0.4, 0.05]
    assert best_index(acc, cost) == 2
    assert best_index(acc, cost, max_cost=0.3) == 0
    assert best_index(acc, cost, max_cost=0.05) is None


# ---------------------------------------------------------------- the picks and the analysis agree


def _records() -> list[dict]:
    rows = [("a", 0.6, 0.2), ("b", 0.9, 0.4), ("c", 0.93, 0.7), ("b2", 0.9, 0.4), ("d", 0.94, 1.0),
            ("e", 0.8, 0.5), ("f", 0.9, 0.45)]
    recs = [{"trial_id": t, "status": "completed", "val_acc": a, "flops_ratio": f, "flops": int(f * 1000),
             "rates": [f]} for t, a, f in rows]
    return recs + [{"trial_id": "s", "status": "stopped", "val_acc": 0.99, "flops_ratio": 0.1, "flops": 100}]


def test_picks_and_analysis_share_one_front():
    recs = _records()
    ids = [r["trial_id"] for r in pareto_records(recs)]
    assert ids == ["a", "b", "b2", "c", "d"]
    df = pd.DataFrame(recs)
    assert list(A.pareto_front(df)["trial_id"]) == ids
    # the front of the analysis is non-dominated and dominates every other completed trial
    front = A.pareto_front(df)
    for (_, p), (_, q) in itertools.permutations(front.iterrows(), 2):
        assert not (p["val_acc"] >= q["val_acc"] and p["flops"] <= q["flops"]
                    and (p["val_acc"] > q["val_acc"] or p["flops"] < q["flops"]))
    assert knee_record(recs)["trial_id"] == "b" == select_record(recs, "knee")["trial_id"]


def test_best_within_a_budget_and_the_flops_pick_agree():
    recs = _records()
    df = pd.DataFrame(recs)
    for bound in (0.45, 0.5, 0.2, 1.0):
        assert A.best_within(df, bound)["trial_id"] == select_record(recs, f"flops<={bound}")["trial_id"]
    assert select_record(recs, "flops<=0.5")["trial_id"] == "b"  # b, b2, f: 0.9; b is cheapest and first
    assert select_record(recs, "best")["trial_id"] == "d"


# ---------------------------------------------------------------- one trials.jsonl reader


TEXT = "\n".join([
    json.dumps({"trial_id": "a", "status": "completed"}),
    "",
    json.dumps({"status": "failed"}),
    json.dumps({"trial_id": None, "status": "failed"}),
    "[1, 2]",
    json.dumps({"trial_id": 7, "status": "stopped"}),
    json.dumps({"trial_id": "a", "status": "failed"}),
    '{"trial_id": "cut", "status": "compl',
])


def test_parse_records_keeps_the_first_complete_record_of_each_id():
    skipped: list[tuple[int, str]] = []
    recs = parse_records(TEXT, lambda n, why: skipped.append((n, why)))
    assert [r.trial_id for r in recs] == ["a", "7"] and recs[0]["status"] == "completed"
    assert skipped == [(3, NO_TRIAL_ID), (4, NO_TRIAL_ID), (5, NOT_AN_OBJECT), (8, NOT_AN_OBJECT)]
    assert parse_records(TEXT) == recs
    assert len(json_lines(TEXT)) == 5  # every JSON object, with or without an id


def test_local_and_analysis_readers_agree(tmp_path, caplog):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "trials.jsonl").write_bytes(TEXT.encode() + "é".encode()[:1])  # torn inside a character
    with caplog.at_level(logging.WARNING, logger="sketchtune.search"):
        local = read_records(folder / "trials.jsonl")
    assert [r.trial_id for r in local] == ["a", "7"]
    assert [m for m in caplog.messages if "is not a complete record" in m] == [
        f"{folder / 'trials.jsonl'}: line {n} is not a complete record; skipped" for n in (3, 4, 5, 8)]
    with pytest.warns(A.ResultsWarning) as caught:
        df = A.load_results(folder)
    assert list(df["trial_id"]) == ["a", "7"]
    texts = [str(w.message) for w in caught]
    assert sum("a record without trial_id was skipped" in t for t in texts) == 2
    assert any("trials.jsonl line 8 is not a complete JSON object (half-written?)" in t for t in texts)
    assert any("trials.jsonl line 5 is not a complete JSON object" in t for t in texts)


# ---------------------------------------------------------------- fronts and hypervolume


def _grid_volume(loss: np.ndarray, ref: np.ndarray, cells: int = 40) -> float:
    """Volume dominated by ``loss`` on a grid of points of the box [0, ref] (brute force,
    exact for points on the grid's own coordinates)."""
    axes = [np.arange(cells) / cells * r + r / (2 * cells) for r in ref]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(ref))
    covered = np.zeros(len(mesh), dtype=bool)
    for p in loss:
        covered |= np.all(mesh >= p, axis=1)
    return float(covered.mean() * np.prod(ref))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hypervolume_matches_a_grid_count_and_optuna(k):
    from optuna._hypervolume import compute_hypervolume

    from search.results.pareto import hypervolume_of_loss

    rng = np.random.default_rng(k)
    for _ in range(20):
        loss = rng.integers(0, 40, size=(rng.integers(1, 12), k)) / 40  # on the grid
        ref = np.ones(k)
        got = hypervolume_of_loss(loss, ref)
        assert got == pytest.approx(_grid_volume(loss, ref), abs=1e-12)
        inside = loss[(loss < ref).all(axis=1)]
        assert got == pytest.approx(compute_hypervolume(inside, ref) if len(inside) else 0.0)


def test_hypervolume_of_accuracy_and_cost_by_hand():
    from search.results.pareto import hypervolume

    # (0.9, 0.5) covers 0.9 x 0.5; (0.5, 0.2) adds 0.5 x 0.3 below it
    assert hypervolume([0.9, 0.5], [0.5, 0.2]) == pytest.approx(0.45 + 0.15)
    assert hypervolume([0.9, 0.9, 0.3], [0.5, 0.5, 0.9]) == pytest.approx(0.45)  # copies, dominated
    assert hypervolume([0.9, float("nan")], [1.0, 0.1]) == 0.0  # at the reference cost: nothing
    assert hypervolume([0.6], [0.5], ref=(0.5, 0.7)) == pytest.approx(0.1 * 0.2)
    assert hypervolume([], []) == 0.0


def test_fronts_peel_the_front_then_the_rest():
    from search.results.pareto import fronts

    acc = [0.9, 0.8, 0.7, 0.95, 0.6, float("nan")]
    cost = [0.5, 0.3, 0.6, 0.9, 0.2, 0.1]
    assert fronts(acc, cost) == [[0, 1, 3, 4], [2]]
    assert fronts([], []) == []
