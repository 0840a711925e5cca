"""Which searched configuration to retrain: ``knee``, ``best``, ``flops<=F``, ``trial=ID``.

Works on plain trial records (the dicts of ``trials.jsonl``), so it needs neither Ray
nor pandas. Only trials that ran their full schedule (status ``completed``) compete.

- ``knee``: on the Pareto front in (flops_ratio, val_acc), each axis scaled to [0, 1]
  over the front, the point farthest from the straight line between the front's two
  ends (ties: the more accurate one);
- ``best``: the highest validation accuracy (ties: fewer FLOPs);
- ``flops<=F``: the most accurate trial whose FLOPs are at most fraction F of the
  unpruned network's;
- ``trial=ID``: that trial, whatever its rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sketch_core.errors import UserError

__all__ = ["Pick", "parse_pick", "pareto_records", "knee_record", "select_record"]

_FLOPS_RE = re.compile(r"flops\s*<=\s*([0-9]*\.?[0-9]+(?:e-?\d+)?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Pick:
    kind: str  # knee | best | flops | trial
    flops: float | None = None
    trial_id: str | None = None

    @property
    def label(self) -> str:
        """A folder name for ``retrain/<label>/``."""
        if self.kind == "flops":
            return f"flops_le_{self.flops:g}"
        if self.kind == "trial":
            return f"trial_{self.trial_id}"
        return self.kind


def parse_pick(text: str) -> Pick:
    """Parse ``knee``, ``best``, ``flops<=0.5`` or ``trial=ID``."""
    t = (text or "").strip()
    if t in ("knee", "best"):
        return Pick(t)
    m = _FLOPS_RE.match(t)
    if m:
        f = float(m.group(1))
        if not 0.0 < f <= 1.0:
            raise UserError(f"--pick {text!r}: the FLOPs bound is a fraction of the unpruned "
                            f"network in (0, 1]; got {f}")
        return Pick("flops", flops=f)
    if t.startswith("trial="):
        tid = t[len("trial="):].strip()
        if tid:
            return Pick("trial", trial_id=tid)
    raise UserError(f"--pick {text!r}: expected knee, best, flops<=F (F in (0, 1]) or trial=ID")


def _ok(r: dict) -> bool:
    acc, fr = r.get("val_acc"), r.get("flops_ratio")
    return (r.get("status") == "completed" and isinstance(acc, (int, float))
            and isinstance(fr, (int, float)) and math.isfinite(acc) and math.isfinite(fr))


def pareto_records(records: list[dict]) -> list[dict]:
    """Completed records that no other completed record dominates (max val_acc, min FLOPs),
    sorted by flops_ratio; exact duplicates of a point are kept once."""
    pts = sorted((r for r in records if _ok(r)), key=lambda r: (r["flops_ratio"], -r["val_acc"]))
    front: list[dict] = []
    best_acc = -math.inf
    for r in pts:
        if r["val_acc"] > best_acc:
            front.append(r)
            best_acc = r["val_acc"]
    return front


def knee_record(records: list[dict]) -> dict | None:
    """The knee of the front (see the module docstring); None when nothing completed."""
    front = pareto_records(records)
    if len(front) <= 2:
        return max(front, key=lambda r: (r["val_acc"], -r["flops_ratio"])) if front else None
    xs = [r["flops_ratio"] for r in front]
    ys = [r["val_acc"] for r in front]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (x1 - x0) or 1.0
    sy = (y1 - y0) or 1.0
    pts = [((x - x0) / sx, (y - y0) / sy) for x, y in zip(xs, ys)]
    (ax, ay), (bx, by) = pts[0], pts[-1]
    norm = math.hypot(bx - ax, by - ay) or 1.0

    def dist(p: tuple[float, float]) -> float:
        return abs((bx - ax) * (ay - p[1]) - (ax - p[0]) * (by - ay)) / norm

    best = max(range(len(front)), key=lambda i: (round(dist(pts[i]), 12), ys[i]))
    return front[best]


def select_record(records: list[dict], pick: Pick | str) -> dict:
    """The record ``pick`` names; UserError when none qualifies."""
    pick = parse_pick(pick) if isinstance(pick, str) else pick
    done = [r for r in records if _ok(r)]
    if pick.kind == "trial":
        for r in records:
            if str(r.get("trial_id")) == pick.trial_id:
                if r.get("rates") is None:
                    raise UserError(f"--pick trial={pick.trial_id}: that trial has no rate vector")
                return r
        known = ", ".join(str(r.get("trial_id")) for r in records[:8])
        raise UserError(f"--pick trial={pick.trial_id}: no such trial in this experiment "
                        f"({len(records)} trials{': ' + known if known else ''}"
                        f"{', ...' if len(records) > 8 else ''})")
    if not done:
        raise UserError(f"--pick {pick.label}: no trial of this experiment completed its schedule")
    if pick.kind == "best":
        return max(done, key=lambda r: (r["val_acc"], -r["flops_ratio"]))
    if pick.kind == "flops":
        fit = [r for r in done if r["flops_ratio"] <= pick.flops + 1e-12]
        if not fit:
            low = min(r["flops_ratio"] for r in done)
            raise UserError(f"--pick flops<={pick.flops:g}: no completed trial is that small "
                            f"(the smallest keeps {low:.3f} of the FLOPs)")
        return max(fit, key=lambda r: (r["val_acc"], -r["flops_ratio"]))
    rec = knee_record(done)
    assert rec is not None
    return rec
