"""What a search produced: :class:`SearchOutcome` (its folder, records, phases, baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.results.record import TrialRecord

__all__ = ["SearchOutcome"]


@dataclass
class SearchOutcome:
    """What a search produced: its folder, trials.jsonl records, phase times, baseline."""

    exp_dir: Path
    records: list[TrialRecord]
    phases: dict[str, float]
    baseline: dict[str, Any]
    retrain: dict | None = None
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
