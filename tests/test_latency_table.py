"""The latency table: measured on a real (small) network, exact on its grid points and
at its calibration widths, a synthetic table predicts the hand-computed sum, tables
survive a save/load round trip and the cache, and ``info`` refuses a table measured for
another target in one line (exit 2). The benchmark's core runs in tiny mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import launch
from sketch_core.cost.latency_table import (
    CALIBRATION_RATES,
    FORMAT,
    LatencyTable,
    LayerEntry,
    build_table,
    cached_table,
    calibration_widths,
    grid,
    load_table,
    table_key,
)
from sketch_core.registry import resolve_arch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(threads=1, points=3, repeats=2, passes=2, warmup=1, full_repeats=3)


@pytest.fixture(scope="module")
def r20_table() -> LatencyTable:
    return build_table(resolve_arch("resnet20", "cifar10"), **TINY)


def _synthetic() -> LatencyTable:
    """Slot 0 (n=8) feeds conv b; conv a produces it; f(in, out) = 1 + in/10 + out/100."""
    f = lambda i, o: 1 + i / 10 + o / 100
    a = LayerEntry("a", "conv", [[None, 3, 1]], 0, 8, [3], [1, 4, 8],
                   [[f(3, o) for o in (1, 4, 8)]], out_hw=4)
    b = LayerEntry("b", "conv", [[0, 8, 1], [None, 2, 1]], None, 5, [3, 6, 10], [0],
                   [[f(i, 5)] for i in (3, 6, 10)], out_hw=1)
    key = {"device": "cpu", "runtime": "torch", "cfg": "toy"}
    return LatencyTable(key, [a, b], rest_ms=0.5, full_ms=99.0, rest_act_ms=2.0)


def test_grid_spans_the_range_evenly():
    assert grid(1, 16, 5) == [1, 5, 8, 12, 16]
    assert grid(24, 168, 4) == [24, 72, 120, 168]
    assert grid(64, 64, 5) == [64] and grid(1, 3, 5) == [1, 2, 3]


def test_interpolation_is_exact_on_grid_points_and_for_bilinear_times():
    f = lambda i, o: 0.3 + 0.02 * i + 0.05 * o + 0.001 * i * o
    ins, outs = [4, 10, 32], [1, 8, 16, 64]
    e = LayerEntry("c", "conv", [[0, 32, 1]], 1, 64, ins, outs, [[f(i, o) for o in outs] for i in ins])
    for i in ins:
        for o in outs:
            assert e.predict(i, o) == pytest.approx(f(i, o), rel=1e-12)
    for i, o in ((7, 5), (20.5, 40), (31, 63)):
        assert e.predict(i, o) == pytest.approx(f(i, o), rel=1e-12)
    assert e.predict(1, 0) == pytest.approx(f(4, 1)) and e.predict(99, 99) == pytest.approx(f(32, 64))


def test_synthetic_table_predicts_the_hand_computed_sum():
    t = _synthetic()
    # widths[0] = 4: a sees (3 in, 4 out); b sees (4 + 2 in, 5 out); volume 4*4 / (8*4)
    want = 0.5 + 2.0 * (16 / 32) + (1 + 0.3 + 0.04) + (1 + 0.6 + 0.05)
    assert t.predict([4]) == pytest.approx(want)
    assert t.layer_ms([8]) == pytest.approx([1 + 0.3 + 0.08, 1 + 1.0 + 0.05])
    assert t.predict(None) == 99.0  # the unpruned network: its measured time
    t.fit_rest([[8], [2]], [10.0, 6.0])  # the rest now fits both measurements exactly
    assert t.predict([8]) == pytest.approx(10.0) and t.predict([2]) == pytest.approx(6.0)
    rest = lambda w: 0.7 + 3.0 * (w * 4 / 32)
    t.fit_rest([[8], [5], [2]], [rest(w) + sum(t.layer_ms([w])) for w in (8, 5, 2)])
    assert (t.rest_ms, t.rest_act_ms) == (pytest.approx(0.7), pytest.approx(3.0))


def test_a_real_table_is_exact_on_its_grid_and_at_both_measured_widths(r20_table):
    arch = resolve_arch("resnet20", "cifar10")
    t = r20_table
    assert [e.path for e in t.entries] == [m.path for m in arch.plan().modules]
    assert t.settings["timed_grids"] < len(t.entries)  # the alike blocks were timed once
    for e in t.entries:
        assert all(v > 0 for row in e.ms for v in row)
        for a, c_in in enumerate(e.in_grid):
            for b, c_out in enumerate(e.out_grid):
                assert e.predict(c_in, c_out or e.out_full) == e.ms[a][b]
    cal = t.settings["calibration"]  # the rest is the least-squares fit to these times
    assert [c["rate"] for c in cal] == [1.0, *CALIBRATION_RATES] and cal[0]["ms"] == t.full_ms
    resid = [t.predict(calibration_widths(arch.plan(), c["rate"])) - c["ms"] for c in cal]
    assert sum(resid) == pytest.approx(0, abs=1e-9) and t.predict(None) == t.full_ms
    assert t.key["cfg"] == "resnet20" and t.key["threads"] == 1 and t.key["batch"] == 1
    vgg = build_table(resolve_arch("vgg16", "cifar10"), **{**TINY, "points": 2, "passes": 1})
    conv = next(e for e in vgg.entries if e.path == "features.7")  # both widths follow slots
    assert len(conv.in_grid) == 2 and len(conv.out_grid) == 2 and conv.ms[1][1] > conv.ms[0][0]


def test_save_load_round_trip_and_cache(tmp_path, r20_table, monkeypatch):
    path = tmp_path / "t.json"
    r20_table.save(path)
    back = load_table(path, table_key(resolve_arch("resnet20", "cifar10"), threads=1))
    assert back.as_dict() == r20_table.as_dict()
    widths = [3] * 3 + [9] * 3 + [40] * 3
    assert back.predict(widths) == r20_table.predict(widths)
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary left behind

    arch = resolve_arch("resnet20", "cifar10")
    first = cached_table(arch, tmp_path / "cache", **TINY)
    import sketch_core.cost.latency_table as lt

    monkeypatch.setattr(lt, "build_table", lambda *a, **k: pytest.fail("measured again"))
    assert cached_table(arch, tmp_path / "cache", **TINY).as_dict() == first.as_dict()
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_text("{not json")
    monkeypatch.setattr(lt, "build_table", lambda *a, **k: r20_table)
    assert cached_table(arch, tmp_path / "cache", **TINY) is r20_table  # damaged: measured anew
    assert load_table(cached).as_dict() == r20_table.as_dict()


def _info(capsys, *argv: str) -> tuple[int, str, str]:
    rc = launch.main(["info", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_info_saves_a_table_and_predicts_from_it(tmp_path, capsys):
    path = tmp_path / "r20.json"
    rc, out, _ = _info(capsys, "--cfg", "resnet20", "--sketch_rate", "[0.5]*9", "--threads", "1",
                       "--latency_repeats", "3", "--table_points", "2", "--save_table", str(path),
                       "--json")
    assert rc == 0 and path.exists()
    saved = json.loads(out)["latency_model"]
    assert saved["saved"] and saved["sketched_ms"] > 0 and "latency" in json.loads(out)
    rc, out, _ = _info(capsys, "--cfg", "resnet20", "--sketch_rate", "[0.5]*9",
                       "--latency_table", str(path), "--json")
    loaded = json.loads(out)["latency_model"]
    assert rc == 0 and not loaded["saved"] and "latency" not in json.loads(out)
    assert loaded["sketched_ms"] == saved["sketched_ms"] and loaded["speedup"] > 1
    rc, out, _ = _info(capsys, "--cfg", "resnet20", "--sketch_rate", "[0.5]*9",
                       "--latency_table", str(path))
    assert rc == 0 and "fastest-call latency predicted by the table" in out and "speed-up" in out
    rc, out, err = _info(capsys, "--cfg", "resnet20", "--save_table", str(tmp_path / "x.json"),
                         "--table_points", "1")
    assert rc == 2 and out == "" and "--table_points must be at least 2, got 1" in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("field, value, argv, needle", [
    ("device", "cuda", [], "device 'cuda' (expected 'cpu')"),
    ("runtime", "onnxruntime", [], "runtime 'onnxruntime' (expected 'torch')"),
    ("torch", "1.0.0", [], "torch '1.0.0' (expected '"),
    (None, None, ["--cfg", "resnet32", "--sketch_rate", "[0.5]*15"], "cfg 'resnet20' (expected 'resnet32')"),
    (None, None, ["--latency_batch", "8"], "batch 1 (expected 8)"),
    (None, None, ["--threads", "2"], "threads 1 (expected 2)"),
])
def test_a_table_for_another_target_is_one_line_exit_2(tmp_path, capsys, r20_table, field, value,
                                                       argv, needle):
    data = r20_table.as_dict()
    if field:
        data["key"][field] = value
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    base = ["--cfg", "resnet20", "--sketch_rate", "[0.5]*9"] if "--cfg" not in argv else []
    rc, out, err = _info(capsys, *base, *argv, "--latency_table", str(path))
    assert rc == 2 and out == ""
    assert err.startswith(f"error: latency table {path} was measured for another target: ")
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("text, needle", [
    ("{not json", "is not readable JSON"),
    (json.dumps({"format": "other"}), f"is not a sketchtune latency table (expected JSON with format {FORMAT!r})"),
    (json.dumps({"format": FORMAT, "key": {}}), "is a damaged latency table"),
])
def test_a_file_that_is_no_table_is_one_line_exit_2(tmp_path, capsys, text, needle):
    path = tmp_path / "t.json"
    path.write_text(text)
    rc, out, err = _info(capsys, "--cfg", "resnet20", "--latency_table", str(path))
    assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, err
    rc, _, err = _info(capsys, "--cfg", "resnet20", "--latency_table", str(tmp_path / "none.json"))
    assert rc == 2 and "does not exist" in err


def test_the_benchmark_core_runs_tiny(capsys):
    spec = importlib.util.spec_from_file_location("latency_bench", ROOT / "benchmarks" / "latency_table.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--models", "resnet20", "--vectors", "5", "--fit_vectors", "3",
                       "--repeats", "3", "--points", "2", "--round_to_study",
                       "--round_to_targets", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("ratio=") and float(lines[-1][6:]) > 0
    assert any(line.startswith("latency model Spearman: resnet20 ") for line in lines)
    study = [line.split() for line in lines if line.startswith("  resnet20 ")]
    assert sorted(int(row[2]) for row in study) == [1, 8, 16]
    assert all(0.3 < float(row[3]) < 0.8 for row in study)  # MACs near the 0.5 target
