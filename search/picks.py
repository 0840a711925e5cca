"""Which searched configuration to retrain: ``knee``, ``best``, ``flops<=F``, ``trial=ID``.

Works on plain trial records (the dicts of ``trials.jsonl``), so it needs neither Ray
nor pandas. Only trials that ran their full schedule (status ``completed``) compete.

- ``knee``: on the Pareto front in (flops_ratio, val_acc), each axis scaled to [0, 1]
  over the front, the point farthest from the straight line between the front's two
  ends (ties: the more accurate one, then the earliest);
- ``best``: the highest validation accuracy (ties: fewer FLOPs, then the earliest);
- ``flops<=F``: the most accurate trial whose FLOPs are at most fraction F of the
  unpruned network's (ties as for ``best``);
- ``trial=ID``: that trial, whatever its rank.

The front, the knee and the tie rules are those of :mod:`search.pareto`; "the
earliest" is the first in ``trials.jsonl`` order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from search.pareto import best_index, front_indices, knee_index
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


def _completed(records: list[dict]) -> tuple[list[dict], list[float], list[float]]:
    done = [r for r in records if _ok(r)]
    return done, [r["val_acc"] for r in done], [r["flops_ratio"] for r in done]


def pareto_records(records: list[dict]) -> list[dict]:
    """Completed records on the Pareto front (max val_acc, min flops_ratio), sorted by
    flops_ratio; every copy of an exact duplicate is kept (the rule of :mod:`search.pareto`)."""
    done, acc, cost = _completed(records)
    return [done[i] for i in front_indices(acc, cost)]


def knee_record(records: list[dict]) -> dict | None:
    """The knee of the front (see the module docstring); None when nothing completed."""
    done, acc, cost = _completed(records)
    i = knee_index(acc, cost)
    return None if i is None else done[i]


def select_record(records: list[dict], pick: Pick | str) -> dict:
    """The record ``pick`` names; UserError when none qualifies."""
    pick = parse_pick(pick) if isinstance(pick, str) else pick
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
    done, acc, cost = _completed(records)
    if not done:
        raise UserError(f"--pick {pick.label}: no trial of this experiment completed its schedule")
    if pick.kind == "best":
        return done[best_index(acc, cost)]
    if pick.kind == "flops":
        i = best_index(acc, cost, max_cost=pick.flops + 1e-12)
        if i is None:
            raise UserError(f"--pick flops<={pick.flops:g}: no completed trial is that small "
                            f"(the smallest keeps {min(cost):.3f} of the FLOPs)")
        return done[i]
    return done[knee_index(acc, cost)]
