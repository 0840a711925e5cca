"""``trials.jsonl``: one JSON line per ended trial, appended and flushed by the driver.

A record holds :data:`TRIAL_FIELDS` (plus extras such as ``val_acc_sketched``,
``stop_reason``, ``proposed_rates`` or ``paper_rates``). Status is one of
``completed`` (ran its full schedule), ``stopped`` (ended early by ASHA or the time
budget), ``failed`` (raised, diverged, or lost its worker too often) and ``rejected``
(above the FLOPs budget, never trained). Readers skip a half-written last line (and
any line that is not a JSON object or has no trial_id) with a warning and keep the
first record of a trial id. Every reader goes through :func:`parse_records`, which
works on text, so a local file (:func:`read_records`) and remote storage (the
analysis) are read alike. No Ray here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["TRIAL_FIELDS", "STATUSES", "TrialLog", "read_records", "parse_records", "json_lines",
           "NOT_AN_OBJECT", "NO_TRIAL_ID", "clean_number"]

log = logging.getLogger("sketchtune.search")

TRIAL_FIELDS = ("trial_id", "status", "rates", "widths", "val_acc", "flops", "flops_ratio",
                "params", "params_ratio", "epochs", "time_s", "node", "error", "started", "ended")
STATUSES = ("completed", "stopped", "failed", "rejected")


def clean_number(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TrialLog:
    """Appends records to ``path`` (one flushed, fsynced line each); each trial id once.

    Picklable: it holds only the path and the ids it has written, and opens the file
    for every append, so it can live inside Ray Tune's pickled callbacks and searcher.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._ids: set[str] | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_ids": None}

    @property
    def ids(self) -> set[str]:
        if self._ids is None:
            self._ids = {str(r["trial_id"]) for r in read_records(self.path, warn=False)}
        return self._ids

    def append(self, record: dict) -> bool:
        """Write ``record`` unless its trial id is already there; True if written."""
        tid = str(record["trial_id"])
        if tid in self.ids:
            return False
        full = {k: record.get(k) for k in TRIAL_FIELDS}
        full.update({k: v for k, v in record.items() if k not in full})
        line = json.dumps({k: clean_number(v) for k, v in full.items()}, default=str)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.ids.add(tid)
        return True


NOT_AN_OBJECT = "not a JSON object"
NO_TRIAL_ID = "no trial_id"


def json_lines(text: str, skipped: Callable[[int, str], None] | None = None) -> list[dict]:
    """The JSON objects of ``text``, one per line; blank lines are ignored.

    A line that is not a JSON object (a torn last line, say) is left out and, when
    ``skipped`` is given, reported as ``skipped(line_number, NOT_AN_OBJECT)``.
    """
    return [obj for _, obj in _numbered_objects(text, skipped)]


def _numbered_objects(text: str, skipped: Callable[[int, str], None] | None):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            yield number, obj
        elif skipped is not None:
            skipped(number, NOT_AN_OBJECT)


def parse_records(text: str, skipped: Callable[[int, str], None] | None = None) -> list[dict]:
    """The complete records in the text of a ``trials.jsonl``, first per trial id, in file order.

    A line that is not a JSON object, or whose ``trial_id`` is missing or null, is left
    out and reported as ``skipped(line_number, NOT_AN_OBJECT or NO_TRIAL_ID)``. Records
    are returned as written; ids are compared as strings. Callers read the text (a
    local file, remote storage) and say what a skipped line means to them.
    """
    out: list[dict] = []
    seen: set[str] = set()
    for number, rec in _numbered_objects(text, skipped):
        if rec.get("trial_id") is None:
            if skipped is not None:
                skipped(number, NO_TRIAL_ID)
            continue
        tid = str(rec["trial_id"])
        if tid not in seen:
            seen.add(tid)
            out.append(rec)
    return out


def read_records(path: str | os.PathLike, warn: bool = True) -> list[dict]:
    """All complete records of ``path`` (first per trial id); [] when there is no file.

    With ``warn``, each skipped line is logged (see :func:`parse_records`).
    """
    try:
        # a torn last line may end inside a multi-byte character: replace it, skip the line
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []

    def skipped(number: int, reason: str) -> None:
        log.warning("%s: line %d is not a complete record; skipped", path, number)

    return parse_records(text, skipped if warn else None)


def count_statuses(records: Iterable[dict]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[r.get("status", "failed")] = counts.get(r.get("status", "failed"), 0) + 1
    return counts
