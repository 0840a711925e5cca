"""Measured latency: more work measures slower, the stats are ordered, the thread count
is the one asked for, and ``info --latency`` reports both models (bad input: one line)."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
import torch
from torch import nn

import launch
from sketch_core.cost.latency import LatencyStats, measure_latency, paired_ratios, summarize

HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def _net(width: int) -> nn.Module:
    """Two 3x3 convs 16 -> width -> 16: the MACs grow linearly with ``width``."""
    return nn.Sequential(nn.Conv2d(16, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 16, 3, padding=1))


class _ThreadProbe(nn.Module):
    """Records the torch thread count each call runs with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.conv(x)


def _ordered(s: LatencyStats) -> None:
    assert 0 < s.min_ms <= s.p10_ms <= s.median_ms <= s.p90_ms
    assert s.min_ms <= s.mean_ms


def test_four_times_the_work_measures_slower():
    shape = (16, 32, 32)
    small = measure_latency(_net(32), shape, threads=1, repeats=15, warmup=3)
    big = measure_latency(_net(128), shape, threads=1, repeats=15, warmup=3)
    _ordered(small)
    _ordered(big)
    assert big.median_ms > 1.5 * small.median_ms, (small, big)
    assert small.repeats == 15 and small.warmup == 3 and small.batch == 1
    assert small.device == "cpu" and small.runtime == "torch" and small.input_shape == shape


def test_the_thread_count_is_applied_and_restored():
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    probe = _ThreadProbe().train()
    stats = measure_latency(probe, (3, 8, 8), threads=want, batch=3, repeats=4, warmup=2)
    assert probe.seen == [want] * 6 and stats.threads == want and stats.batch == 3
    assert torch.get_num_threads() == before and probe.training  # the caller's state is back


def test_summary_of_known_times():
    s = summarize([5.0, 1.0, 2.0, 4.0, 3.0], warmup=0, device="cpu", runtime="torch", batch=1,
                  threads=1, input_shape=(1,))
    assert (s.min_ms, s.median_ms, s.mean_ms, s.repeats) == (1.0, 3.0, 3.0, 5)
    assert s.p10_ms == pytest.approx(1.4) and s.p90_ms == pytest.approx(4.6)
    assert s.as_dict()["input_shape"] == [1]


@pytest.mark.skipif(not HAVE_ORT, reason="onnx, onnxscript and onnxruntime are not installed "
                    "(pip install 'sketchtune[export]')")
def test_onnxruntime_measures_too():
    stats = measure_latency(_net(16), (16, 16, 16), threads=1, runtime="onnxruntime", repeats=5,
                            warmup=2)
    _ordered(stats)
    assert stats.runtime == "onnxruntime" and stats.threads == 1


def test_info_latency_reports_both_models(capsys):
    assert launch.main(["info", "--cfg", "resnet20", "--sketch_rate", "[0.3]*9", "--latency",
                        "--threads", "1", "--latency_repeats", "5", "--json"]) == 0
    lat = json.loads(capsys.readouterr().out)["latency"]
    for name in ("unpruned", "sketched"):
        assert lat[name]["threads"] == 1 and lat[name]["repeats"] == 5
        assert lat[name]["input_shape"] == [3, 32, 32]
        assert 0 < lat[name]["p10_ms"] <= lat[name]["median_ms"] <= lat[name]["p90_ms"]
    assert lat["speedup"] == pytest.approx(lat["unpruned"]["median_ms"] / lat["sketched"]["median_ms"])
    assert launch.main(["info", "--cfg", "resnet20", "--latency", "--threads", "1",
                        "--latency_repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "latency (torch on cpu, 1 thread(s), batch 1" in out and "unpruned" in out


@pytest.mark.parametrize("argv, needle", [
    (["--runtime", "tensorrt"], "unknown --runtime 'tensorrt'; expected one of: torch, onnxruntime"),
    (["--latency_batch", "0"], "--latency_batch must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
] + ([] if torch.cuda.is_available() else
     [(["--latency_device", "cuda"], "--latency_device cuda: no CUDA device is available")]))
def test_bad_latency_options_are_one_line(capsys, argv, needle):
    assert launch.main(["info", "--cfg", "resnet20", "--latency", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert captured.out == ""


def test_paired_ratios_compare_two_models_call_by_call():
    small, big = _net(16).train(), _net(96).eval()
    ratios, ref_ms = paired_ratios(big, small, (16, 24, 24), threads=1, repeats=9, warmup=2)
    assert len(ratios) == 9 and len(ref_ms) == 9 and all(t > 0 for t in ref_ms)
    assert statistics.median(ratios) > 2, ratios  # six times the work, measured against the small one
    assert small.training and not big.training  # each model's own mode is back
