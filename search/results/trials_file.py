"""``trials.jsonl``: one JSON line per ended trial, appended and flushed by the driver.

Each line is one :class:`~search.results.record.TrialRecord` (its fields, statuses and
rules live there). Readers skip a half-written last line (and any line that is not a
JSON object or has no trial_id) with a warning and keep the first record of a trial id.
Every reader goes through :func:`parse_records`, which works on text, so a local file
(:func:`read_records`) and remote storage (the analysis) are read alike. No Ray here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from search.results.record import TrialRecord

__all__ = ["TrialLog", "read_records", "parse_records", "json_lines", "NOT_AN_OBJECT",
           "NO_TRIAL_ID"]

log = logging.getLogger("sketchtune.search")


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
            self._ids = {r.trial_id for r in read_records(self.path, warn=False)}
        return self._ids

    def append(self, record: TrialRecord | dict) -> bool:
        """Write ``record`` (a :class:`TrialRecord`, or a dict of its fields) unless its
        trial id is already there; True if written."""
        if not isinstance(record, TrialRecord):
            record = TrialRecord.from_dict(record)
        tid = record.trial_id
        if tid in self.ids:
            return False
        line = json.dumps(record.as_dict(), default=str)
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


def parse_records(text: str, skipped: Callable[[int, str], None] | None = None
                  ) -> list[TrialRecord]:
    """The complete records in the text of a ``trials.jsonl``, first per trial id, in file order.

    A line that is not a JSON object, or whose ``trial_id`` is missing or null, is left
    out and reported as ``skipped(line_number, NOT_AN_OBJECT or NO_TRIAL_ID)``. Records
    are returned as written; ids are compared as strings. Callers read the text (a
    local file, remote storage) and say what a skipped line means to them.
    """
    out: list[TrialRecord] = []
    seen: set[str] = set()
    for number, rec in _numbered_objects(text, skipped):
        if rec.get("trial_id") is None:
            if skipped is not None:
                skipped(number, NO_TRIAL_ID)
            continue
        tid = str(rec["trial_id"])
        if tid not in seen:
            seen.add(tid)
            out.append(TrialRecord.from_dict(rec))
    return out


def read_records(path: str | os.PathLike, warn: bool = True) -> list[TrialRecord]:
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
