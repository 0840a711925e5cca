"""Which searched configuration to retrain: ``knee``, ``best``, ``flops<=F``,
``latency<=L``, ``trial=ID``.

Works on plain trial records (the dicts of ``trials.jsonl``), so it needs neither Ray
nor pandas. Only trials that ran their full schedule (status ``completed``) compete.

- ``knee``: on the Pareto front in (flops_ratio, val_acc), each axis scaled to [0, 1]
  over the front, the point farthest from the straight line between the front's two
  ends (ties: the more accurate one, then the earliest);
- ``best``: the highest validation accuracy (ties: fewer FLOPs, then the earliest);
- ``flops<=F``: the most accurate trial whose FLOPs are at most fraction F of the
  unpruned network's (ties as for ``best``);
- ``latency<=L``: the same with the predicted latency: L a fraction of the unpruned
  network's (``latency<=0.6``) or milliseconds (``latency<=3ms``);
- ``trial=ID``: that trial, whatever its rank.

The front and the knee are over the search's cost axis (``cost``: ``flops_ratio`` by
default, ``latency_ratio`` for a search whose cost axis is latency).

The front, the knee and the tie rules are those of :mod:`search.results.pareto`; "the
earliest" is the first in ``trials.jsonl`` order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from search.results.pareto import best_index, front_indices, knee_index
from sketch_core.errors import UserError

__all__ = ["Pick", "parse_pick", "parse_latency_bound", "pareto_records", "knee_record",
           "select_record", "front_cost"]

_FLOPS_RE = re.compile(r"flops\s*<=\s*([0-9]*\.?[0-9]+(?:e-?\d+)?)\s*$", re.IGNORECASE)
_LATENCY_RE = re.compile(r"latency\s*<=\s*(.+?)\s*$", re.IGNORECASE)
_BOUND_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e-?\d+)?)\s*(ms|%)?$", re.IGNORECASE)


def parse_latency_bound(text: str | float, what: str = "latency bound") -> tuple[str, float]:
    """``'0.6'`` or ``'60%'`` -> ('ratio', 0.6) (of the unpruned); ``'3ms'`` -> ('ms', 3.0)."""
    m = _BOUND_RE.match(str(text).strip())
    if m:
        value, unit = float(m.group(1)), (m.group(2) or "").lower()
        if unit == "ms" and value > 0:
            return "ms", value
        ratio = value / 100.0 if unit == "%" else value
        if unit != "ms" and 0.0 < ratio <= 1.0:
            return "ratio", ratio
    raise UserError(f"{what} {text!r}: expected a fraction of the unpruned network's latency "
                    f"in (0, 1] ('0.6', '60%') or milliseconds ('3ms')")


@dataclass(frozen=True)
class Pick:
    kind: str  # knee | best | flops | latency | trial
    flops: float | None = None
    trial_id: str | None = None
    latency: tuple[str, float] | None = None  # ('ratio', fraction) or ('ms', milliseconds)

    @property
    def label(self) -> str:
        """A folder name for ``retrain/<label>/``."""
        if self.kind == "flops":
            return f"flops_le_{self.flops:g}"
        if self.kind == "trial":
            return f"trial_{self.trial_id}"
        if self.kind == "latency":
            kind, value = self.latency
            return f"latency_le_{value:g}{'ms' if kind == 'ms' else ''}"
        return self.kind


def parse_pick(text: str) -> Pick:
    """Parse ``knee``, ``best``, ``flops<=0.5``, ``latency<=0.6`` (``60%``, ``3ms``) or
    ``trial=ID``."""
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
    m = _LATENCY_RE.match(t)
    if m:
        return Pick("latency", latency=parse_latency_bound(m.group(1), f"--pick {text!r}:"))
    if t.startswith("trial="):
        tid = t[len("trial="):].strip()
        if tid:
            return Pick("trial", trial_id=tid)
    raise UserError(f"--pick {text!r}: expected knee, best, flops<=F (F in (0, 1]), "
                    f"latency<=L (L in (0, 1] or milliseconds like 3ms) or trial=ID")


def _ok(r: dict, cost: str = "flops_ratio") -> bool:
    acc, c = r.get("val_acc"), r.get(cost)
    return (r.get("status") == "completed" and isinstance(acc, (int, float))
            and isinstance(c, (int, float)) and math.isfinite(acc) and math.isfinite(c))


def _completed(records: list[dict], cost: str = "flops_ratio"
               ) -> tuple[list[dict], list[float], list[float]]:
    done = [r for r in records if _ok(r, cost)]
    return done, [r["val_acc"] for r in done], [r[cost] for r in done]


def front_cost(records: list[dict], cost: str = "flops_ratio") -> str:
    """``cost``, or ``flops_ratio`` when no completed trial carries it (trials priced
    before the search had latency)."""
    return cost if cost == "flops_ratio" or _completed(records, cost)[0] else "flops_ratio"


def pareto_records(records: list[dict], cost: str = "flops_ratio") -> list[dict]:
    """Completed records on the Pareto front (max val_acc, min ``cost``), sorted by
    cost; every copy of an exact duplicate is kept (the rule of :mod:`search.results.pareto`)."""
    done, acc, c = _completed(records, cost)
    return [done[i] for i in front_indices(acc, c)]


def knee_record(records: list[dict], cost: str = "flops_ratio") -> dict | None:
    """The knee of the front (see the module docstring); None when nothing completed."""
    done, acc, c = _completed(records, cost)
    i = knee_index(acc, c)
    return None if i is None else done[i]


def select_record(records: list[dict], pick: Pick | str, cost: str = "flops_ratio") -> dict:
    """The record ``pick`` names; UserError when none qualifies. ``cost``: the cost
    axis of ``knee`` and ``best``'s ties (``flops_ratio`` or ``latency_ratio``)."""
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
    if pick.kind == "latency":
        kind, value = pick.latency
        col = "latency_ratio" if kind == "ratio" else "latency_ms"
        if not any(_ok(r) for r in records):
            raise UserError(f"--pick {pick.label}: no trial of this experiment completed its "
                            f"schedule")
        done, acc, c = _completed(records, col)
        if not done:
            raise UserError(f"--pick {pick.label}: the trials of this experiment carry no "
                            "latency; search with objectives [val_acc, latency] or a "
                            "budget.latency")
        i = best_index(acc, c, max_cost=value * (1 + 1e-12))
        if i is None:
            unit = " ms" if kind == "ms" else " of the unpruned latency"
            raise UserError(f"--pick latency<={value:g}{'ms' if kind == 'ms' else ''}: no "
                            f"completed trial is that fast (the fastest keeps "
                            f"{min(c):.3f}{unit})")
        return done[i]
    done, acc, c = _completed(records, front_cost(records, cost))
    if not done:
        raise UserError(f"--pick {pick.label}: no trial of this experiment completed its schedule")
    if pick.kind == "best":
        return done[best_index(acc, c)]
    if pick.kind == "flops":
        done, acc, c = _completed(records)
        i = best_index(acc, c, max_cost=pick.flops + 1e-12)
        if i is None:
            raise UserError(f"--pick flops<={pick.flops:g}: no completed trial is that small "
                            f"(the smallest keeps {min(c):.3f} of the FLOPs)")
        return done[i]
    return done[knee_index(acc, c)]
