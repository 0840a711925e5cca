"""``trials.jsonl``: one JSON line per ended trial, appended and flushed by the driver.

A record holds :data:`TRIAL_FIELDS` (plus extras such as ``val_acc_sketched``,
``stop_reason``, ``proposed_rates`` or ``paper_rates``). Status is one of
``completed`` (ran its full schedule), ``stopped`` (ended early by ASHA or the time
budget), ``failed`` (raised, diverged, or lost its worker too often) and ``rejected``
(above the FLOPs budget, never trained). Readers skip a half-written last line with a
warning and keep the first record of a trial id. No Ray here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["TRIAL_FIELDS", "STATUSES", "TrialLog", "read_records", "clean_number"]

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


def read_records(path: str | os.PathLike, warn: bool = True) -> list[dict]:
    """All complete records of ``path`` (first per trial id); [] when there is no file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out: list[dict] = []
    seen: set[str] = set()
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            tid = str(rec["trial_id"])
        except (ValueError, KeyError, TypeError):
            if warn:
                log.warning("%s: line %d is not a complete record; skipped", path, no)
            continue
        if tid not in seen:
            seen.add(tid)
            out.append(rec)
    return out


def count_statuses(records: Iterable[dict]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[r.get("status", "failed")] = counts.get(r.get("status", "failed"), 0) + 1
    return counts
