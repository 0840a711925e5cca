"""How a trial ended, decided once: completed, stopped, failed (and its record).

:func:`trial_status` is the rule that the Optuna side (what the study is told) and the
trials.jsonl side (what the record says) both apply to a trial's last report.
``rejected`` trials never run, so they never reach it. :func:`trial_record` builds the
trials.jsonl record from the last report and the trial's config. No Ray here.
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["trial_status", "trial_record", "NO_RESULT", "NO_SCORES"]

NO_RESULT = "the trial ended without reporting a result"
NO_SCORES = "the trial reported no finite val_acc and flops"


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


def trial_record(trial_id: str, result: dict, config: dict, status: str, error: str | None,
                 started: float, stop_reason: str | None = None,
                 ended: float | None = None) -> dict:
    """The trials.jsonl record of an ended trial (``result``: its last report)."""
    res, cfg = result, config
    now = time.time() if ended is None else ended
    rec: dict[str, Any] = {
        "trial_id": trial_id, "status": status,
        "rates": res.get("rates") or cfg.get("rates"), "widths": res.get("widths"),
        "val_acc": None if status == "failed" else res.get("val_acc"),
        "flops": res.get("flops"), "flops_ratio": res.get("flops_ratio"),
        "params": res.get("params"), "params_ratio": res.get("params_ratio"),
        "epochs": int(res.get("epoch", 0) or 0),
        "time_s": round(float(res.get("time_total_s", now - started)), 3),
        "node": res.get("node"), "error": error, "started": started, "ended": now,
        "val_acc_sketched": res.get("val_acc_sketched"),
        "optuna_number": cfg.get("optuna_number"),
    }
    if cfg.get("latency_ms") is not None:  # priced by the latency table when proposed
        rec["latency_ms"] = cfg["latency_ms"]
        rec["latency_ratio"] = cfg.get("latency_ratio")
    if status == "stopped":
        rec["stop_reason"] = stop_reason
    if cfg.get("proposed_rates") is not None:
        rec["proposed_rates"] = cfg["proposed_rates"]
        rec["flops_policy"] = "repaired"
    if cfg.get("paper_rates"):
        rec["paper_rates"] = cfg["paper_rates"]
    if cfg.get("anchor"):
        rec["anchor"] = cfg["anchor"]
    return rec
