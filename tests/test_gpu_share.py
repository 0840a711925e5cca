"""Trials sharing GPUs: what a fraction packs, the line that says so, processes pinned to GPUs."""

from __future__ import annotations

import os
import queue

import pytest
import torch

from search.run import local_loop
from search.run.gpu_share import gpu_slots, mps_status, packing_note, trials_per_gpu
from conftest import trial_setup_for
from sketch_core.errors import UserError


@pytest.mark.parametrize("fraction,k", [(0.3, 3), (0.25, 4), (0.5, 2), (0.125, 8), (1.0, 1),
                                        (2.0, 1), (1 / 3, 3), (0.7, 1)])
def test_trials_per_gpu(fraction, k):
    assert trials_per_gpu(fraction) == k


def test_a_fraction_that_does_not_divide_a_gpu_says_what_it_packs():
    assert packing_note(0.3) == ("resources.gpu 0.3 does not divide a GPU into whole trials: "
                                 "3 trials share each GPU (0.1 of it unused; 0.3333 would say "
                                 "so exactly)")
    assert "1 trials share each GPU (0.3 of it unused" in packing_note(0.7)
    for exact in (0.25, 0.5, 0.125, 1 / 3, 1.0, 2.0, 0.0):
        assert packing_note(exact) is None
    with pytest.raises(UserError, match="must be positive"):
        trials_per_gpu(0)


def test_mps_status_and_slots(monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert mps_status().startswith("CUDA MPS not installed")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert mps_status().startswith("CUDA MPS installed but off")
    (tmp_path / "control").touch()
    assert mps_status().startswith("CUDA MPS on")
    assert gpu_slots(2, 6) == [0, 1, 0, 1, 0, 1] and gpu_slots(0, 3) == []


def _setup():
    return trial_setup_for("resnet20", "synthetic", 4, 3)


def test_packing_without_cuda_keeps_the_cpu_workers(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    workers, slots, setup = local_loop._pack(0.3, 2, _setup(), quiet=True)
    assert (workers, slots, setup.use_gpu) == (2, None, False)
    out = capsys.readouterr().out.splitlines()
    assert out == ["[local] gpus_per_trial 0.3 does not divide a GPU into whole trials: 3 trials "
                   "share each GPU (0.1 of it unused; 0.3333 would say so exactly)",
                   "[local] gpus_per_trial 0.3: no CUDA GPU here; 2 worker(s) on the CPU"]
    with pytest.raises(UserError, match=r"in \(0, 1\]; got 2"):
        local_loop._pack(2.0, 1, _setup(), quiet=True)


def test_packing_on_two_gpus_pins_one_process_per_trial(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    workers, slots, setup = local_loop._pack(0.25, 1, _setup(), quiet=False)
    assert (workers, slots, setup.use_gpu) == (8, [0, 1] * 4, True)
    assert "[local] 4 trial(s) per GPU on 2 GPU(s): 8 worker process(es); CUDA MPS" in \
        capsys.readouterr().out
    assert local_loop._pack(0.25, 3, _setup(), quiet=True)[:2] == (3, [0, 1, 0])  # workers cap
    q = queue.Queue()
    q.put(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    local_loop._take_gpu(q)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"


def test_the_local_loop_entry_point_reports_bad_input_in_one_line(capsys):
    assert local_loop.main(["--config", "no_such_config_here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --config 'no_such_config_here': no such")
    assert local_loop.main(["--config", "quickstart", "--workers", "0"]) == 2
