"""The trial record: one ended (or running) trial, typed, and the rules read off it.

:class:`TrialRecord` is what ``trials.jsonl`` holds one line of, what the picks and the
progress line read, and what every row of the results DataFrame comes from. Its fields
are declared here once (:data:`RECORD_FIELDS`, in file order); keys a record carries
beyond them (written by an earlier or later version) are kept in ``extra`` and written
back. Statuses: ``completed`` (ran its full schedule), ``stopped`` (ended early by the
scheduler or the time budget), ``failed`` (raised, diverged, or lost its worker too
often), ``rejected`` (above a budget, never trained) and, in the analysis only,
``running``.

Two rules are decided here for every caller:

- :func:`trial_status`: how a trial ended, from its last report (what Optuna is told
  and what the record says);
- :func:`scored`: which trials count for the front, the knee, the picks, the
  hypervolume and the sensitivity: completed, with a finite accuracy and a finite cost.

No Ray here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["TrialRecord", "RECORD_FIELDS", "STATUSES", "ENDED_STATUSES", "trial_status",
           "scored", "scored_mask", "NO_RESULT", "NO_SCORES", "clean_number"]

STATUSES = ("completed", "stopped", "failed", "rejected", "running")
ENDED_STATUSES = STATUSES[:-1]
SCORED_STATUS = "completed"
NO_RESULT = "the trial ended without reporting a result"
NO_SCORES = "the trial reported no finite val_acc and flops"


def clean_number(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _count(value: Any) -> int:
    """A whole number of epochs; 0 for anything that is not one."""
    return int(value) if _finite(value) else 0


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


@dataclass(frozen=True)
class TrialRecord:
    """One trial as ``trials.jsonl`` records it (fields in file order).

    ``val_acc`` is a fraction (None for failed and rejected trials); ``flops`` are MACs;
    ``*_ratio`` are fractions of the unpruned network; ``latency_ms`` is the latency
    table's prediction when the search priced by latency. ``get`` and ``[...]`` read a
    field (or an ``extra`` key) by name, as the JSON line would.
    """

    trial_id: str
    status: str
    rates: list[float] | None = None
    widths: list[int] | None = None
    val_acc: float | None = None
    flops: int | None = None
    flops_ratio: float | None = None
    params: int | None = None
    params_ratio: float | None = None
    epochs: int = 0
    time_s: float | None = None
    node: str | None = None
    error: str | None = None
    started: float | None = None
    ended: float | None = None
    val_acc_sketched: float | None = None
    optuna_number: int | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    stop_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------ reading

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        """A record from a JSON object (``trial_id`` required; unknown keys go to ``extra``)."""
        known = {k: data[k] for k in RECORD_FIELDS if k in data}
        known["trial_id"] = str(data["trial_id"])
        known["status"] = str(data.get("status") or "failed")
        known["epochs"] = _count(data.get("epochs"))
        rates = data.get("rates")
        known["rates"] = ([float(r) for r in rates] if isinstance(rates, (list, tuple)) and rates
                          and all(_finite(r) for r in rates) else None)
        extra = {k: v for k, v in data.items() if k not in RECORD_FIELDS and k != "extra"}
        return cls(**known, extra=extra)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of the record: its fields in order, then the extra keys;
        non-finite numbers as None."""
        out = {k: getattr(self, k) for k in RECORD_FIELDS}
        for k in _WRITTEN_IF_SET:
            if out[k] is None:
                del out[k]
        out.update(self.extra)
        return {k: clean_number(v) for k, v in out.items()}

    def get(self, key: str, default: Any = None) -> Any:
        if key in _FIELD_SET:
            value = getattr(self, key)
            return default if value is None else value
        return self.extra.get(key, default)

    def __getitem__(self, key: str) -> Any:
        if key in _FIELD_SET:
            return getattr(self, key)
        return self.extra[key]

    def __contains__(self, key: str) -> bool:
        return (key in _FIELD_SET and getattr(self, key) is not None) or key in self.extra

    def replace(self, **changes: Any) -> TrialRecord:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ building

    @classmethod
    def from_report(cls, trial_id: str, result: dict, config: dict, status: str,
                    error: str | None, started: float, stop_reason: str | None = None,
                    ended: float | None = None) -> TrialRecord:
        """The record of an ended trial from its last report (``result``) and its config."""
        res, cfg = result, config
        now = time.time() if ended is None else ended
        extra: dict[str, Any] = {}
        if cfg.get("proposed_rates") is not None:
            extra.update(proposed_rates=cfg["proposed_rates"], flops_policy="repaired")
        for key in ("paper_rates", "anchor", "target"):
            if cfg.get(key):
                extra[key] = cfg[key]
        priced = cfg.get("latency_ms") is not None  # priced by the latency table when proposed
        return cls(
            trial_id=str(trial_id), status=status,
            rates=res.get("rates") or cfg.get("rates"), widths=res.get("widths"),
            val_acc=None if status == "failed" else res.get("val_acc"),
            flops=res.get("flops"), flops_ratio=res.get("flops_ratio"),
            params=res.get("params"), params_ratio=res.get("params_ratio"),
            epochs=int(res.get("epoch", 0) or 0),
            time_s=round(float(res.get("time_total_s", now - started)), 3),
            node=res.get("node"), error=error, started=started, ended=now,
            val_acc_sketched=res.get("val_acc_sketched"), optuna_number=cfg.get("optuna_number"),
            latency_ms=cfg["latency_ms"] if priced else None,
            latency_ratio=cfg.get("latency_ratio") if priced else None,
            stop_reason=stop_reason if status == "stopped" else None, extra=extra)

    def final_report(self) -> dict[str, Any]:
        """The last report of an ended trial as the trial code made it (what a resumed Tune
        hands a trial that had ended before the driver stopped)."""
        failed = self.status == "failed"
        out = {"val_acc": 0.0 if failed or self.val_acc is None else self.val_acc,
               "flops": self.flops, "flops_ratio": self.flops_ratio, "params": self.params,
               "params_ratio": self.params_ratio, "epoch": self.epochs, "rates": self.rates,
               "widths": self.widths, "failed": failed, "error": self.error,
               "val_acc_sketched": self.val_acc_sketched}
        if self.latency_ms is not None:
            out.update(latency_ms=self.latency_ms, latency_ratio=self.latency_ratio)
        return out


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(TrialRecord) if f.name != "extra")
_FIELD_SET = frozenset(RECORD_FIELDS)
# written only when set (older lines have none of them)
_WRITTEN_IF_SET = ("latency_ms", "latency_ratio", "stop_reason")


# ---------------------------------------------------------------- the rules

def trial_status(result: dict | None, errored: bool, full_epochs: int
                 ) -> tuple[str, str | None]:
    """``(status, error)`` of a trial whose last report is ``result``.

    ``failed`` when it raised (``errored``; the caller knows the message, so error is
    None), reported ``failed``, reported nothing, or has no finite ``val_acc`` and
    ``flops``; ``stopped`` when it ended before ``full_epochs``; else ``completed``.
    """
    if errored:
        return "failed", None
    if not result:
        return "failed", NO_RESULT
    if result.get("failed"):
        return "failed", str(result.get("error"))
    acc, flops = result.get("val_acc"), result.get("flops")
    if acc is None or flops is None or not math.isfinite(float(acc)):
        return "failed", NO_SCORES
    if int(result.get("epoch", 0) or 0) < full_epochs:
        return "stopped", None
    return "completed", None


def scored_mask(status: Sequence[Any] | np.ndarray, acc: Sequence[Any] | np.ndarray,
                cost: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Which trials count for fronts, picks and hypervolumes: completed, with a finite
    accuracy and a finite cost (the one rule; arrays of equal length)."""
    def numbers(values: Any) -> np.ndarray:
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            if _finite(v):
                out[i] = float(v)
        return out

    st = np.asarray([s == SCORED_STATUS for s in status], dtype=bool)
    return st & np.isfinite(numbers(acc)) & np.isfinite(numbers(cost))


def scored(records: Sequence[TrialRecord], cost: str = "flops_ratio") -> list[TrialRecord]:
    """The records that :func:`scored_mask` keeps, in their order (``cost``: the column
    of the cost axis)."""
    mask = scored_mask([r.status for r in records], [r.get("val_acc") for r in records],
                       [r.get(cost) for r in records])
    return [r for r, ok in zip(records, mask) if ok]
