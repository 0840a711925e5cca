"""The README's Python example of a whole run (``execute`` on a ``RunSpec``), run as written.

The code block after the ``<!-- readme-example: execute -->`` marker is taken from the
README and executed in a temporary folder; the one change is that every ``epochs=N``
becomes ``epochs=1``, so that the test is short. It must still pretrain, sketch and
fine-tune, and leave the command line's files in both job folders.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- readme-example: execute -->"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_example() -> str:
    """The code of the fenced block right after the marker."""
    text = README.read_text()
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, f"README.md has no python block after {MARKER}"
    return found.group(1)


def test_the_example_has_a_pretrain_and_a_sketch_schedule():
    code = readme_example()
    assert len(re.findall(r"\bepochs=\d+", code)) == 2
    assert "execute(" in code and 'command="sketch"' in code


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    code, n = re.subn(r"\bepochs=\d+", "epochs=1", readme_example())
    assert n == 2
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{README.name} ({MARKER})", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert re.search(r"test acc [\d.]+ -> [\d.]+, MACs -\d+%", out), out[-2000:]
    for job in ("runs/base", "runs/sketch"):
        folder = tmp_path / job
        for name in ("result.json", "metrics.csv", "logger.log", "checkpoint/model_best.pt",
                     "checkpoint/model_last.pt", "checkpoint/train_state.pt"):
            assert (folder / name).is_file(), f"{job}/{name}"
        assert json.loads((folder / "result.json").read_text())["epochs"] == 1
    sketched = json.loads((tmp_path / "runs/sketch/result.json").read_text())
    assert sketched["rates"] == [0.5] * 9 and 0.4 < sketched["flops_reduction"] < 0.6
