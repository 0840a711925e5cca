"""The real-data benchmark's bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pruning_quality.py"
DATA = ROOT.parent / "shared" / "data"


def bench(*argv: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *argv, "--work_dir", str(tmp / "work")],
                          capture_output=True, text=True, env=env, timeout=120)


def test_missing_real_data_names_the_paths_and_the_flag(tmp_path):
    out = bench("--data", "real", "--data_root", str(tmp_path / "nowhere"), tmp=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --data real needs")
    for part in ("cifar10-jpg/train", "pretrained/resnet56-4bfd9763.th", "--data_root",
                 str(tmp_path / "nowhere")):
        assert part in lines[0]
    assert not (tmp_path / "work").exists()


def test_a_fine_tune_larger_than_the_training_split_is_refused(tmp_path):
    if not (DATA / "cifar10-jpg" / "train").exists() or not (DATA / "pretrained").exists():
        pytest.skip(f"real data not found: {DATA} (expected ../shared/data beside the repository)")
    out = bench("--data", "real", "--finetune_images", "50001", tmp=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert lines == [f"error: --finetune_images 50001: expected 1 to 50000 (the training split "
                     f"of {DATA / 'cifar10-jpg' / 'train'})"]
    assert not (tmp_path / "work").exists()
