"""Which searched configuration to retrain: ``knee``, ``best``, ``flops<=B``,
``latency<=B``, ``trial=ID``.

Works on trial records (:class:`~search.results.record.TrialRecord`, or the dicts of
``trials.jsonl``), so it needs neither Ray nor pandas. Only the trials that
:func:`~search.results.record.scored` keeps compete (completed, finite scores).

- ``knee``: on the Pareto front in (cost, val_acc), each axis scaled to [0, 1] over the
  front, the point farthest from the straight line between the front's two ends (ties:
  the more accurate one, then the earliest);
- ``best``: the highest validation accuracy (ties: lower cost, then the earliest);
- ``flops<=B``: the most accurate trial whose FLOPs are within budget B (ties as for
  ``best``); ``latency<=B`` the same with the predicted latency. B is read by the one
  budget grammar (:mod:`search.results.budgets`: ``0.5``, ``50%``, ``60M``, ``3ms``);
- ``trial=ID``: that trial, whatever its rank.

The front and the knee are over the search's cost axis (``cost``: ``flops_ratio`` by
default, ``latency_ratio`` for a search whose cost axis is latency). The front, the
knee and the tie rules are those of :mod:`search.results.pareto`; "the earliest" is the
first in ``trials.jsonl`` order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from search.results.budgets import Budget, parse_budget
from search.results.pareto import best_index, front_indices, knee_index
from search.results.record import TrialRecord, scored
from sketch_core.errors import UserError

__all__ = ["Pick", "parse_pick", "pareto_records", "knee_record", "select_record",
           "front_cost"]

_BOUND_RE = re.compile(r"^(flops|latency)\s*<=\s*(.+?)\s*$", re.IGNORECASE)
_EXPECTED = ("expected knee, best, flops<=F, latency<=L (a fraction like 0.5, a "
             "percentage like 50%, MACs like 60M for F or milliseconds like 3ms for L) or "
             "trial=ID")
Records = Sequence[TrialRecord | dict]


@dataclass(frozen=True)
class Pick:
    kind: str  # knee | best | budget | trial
    budget: Budget | None = None
    trial_id: str | None = None

    @property
    def label(self) -> str:
        """A folder name for ``retrain/<label>/``."""
        if self.kind == "budget":
            return f"{self.budget.axis}_le_{self.budget.text}"
        if self.kind == "trial":
            return f"trial_{self.trial_id}"
        return self.kind


def parse_pick(text: str) -> Pick:
    """Parse ``knee``, ``best``, ``flops<=B``, ``latency<=B`` or ``trial=ID``."""
    t = (text or "").strip()
    if t in ("knee", "best"):
        return Pick(t)
    m = _BOUND_RE.match(t)
    if m:
        axis = m.group(1).lower()
        return Pick("budget", budget=parse_budget(m.group(2), axis, f"--pick {t}"))
    if t.startswith("trial="):
        tid = t[len("trial="):].strip()
        if tid:
            return Pick("trial", trial_id=tid)
    raise UserError(f"--pick {text!r}: {_EXPECTED}")


def _typed(records: Records) -> list[TrialRecord]:
    return [r if isinstance(r, TrialRecord) else TrialRecord.from_dict(r) for r in records]


def _completed(records: list[TrialRecord], cost: str = "flops_ratio"
               ) -> tuple[list[TrialRecord], list[float], list[float]]:
    done = scored(records, cost)
    return done, [r.val_acc for r in done], [r[cost] for r in done]


def front_cost(records: Records, cost: str = "flops_ratio") -> str:
    """``cost``, or ``flops_ratio`` when no completed trial carries it (trials priced
    before the search had latency)."""
    return cost if cost == "flops_ratio" or _completed(_typed(records), cost)[0] \
        else "flops_ratio"


def pareto_records(records: Records, cost: str = "flops_ratio") -> list[TrialRecord]:
    """Completed records on the Pareto front (max val_acc, min ``cost``), sorted by
    cost; every copy of an exact duplicate is kept (the rule of :mod:`search.results.pareto`)."""
    done, acc, c = _completed(_typed(records), cost)
    return [done[i] for i in front_indices(acc, c)]


def knee_record(records: Records, cost: str = "flops_ratio") -> TrialRecord | None:
    """The knee of the front (see the module docstring); None when nothing completed."""
    done, acc, c = _completed(_typed(records), cost)
    i = knee_index(acc, c)
    return None if i is None else done[i]


def _by_id(records: list[TrialRecord], pick: Pick) -> TrialRecord:
    for r in records:
        if r.trial_id == pick.trial_id:
            if r.rates is None:
                raise UserError(f"--pick trial={pick.trial_id}: that trial has no rate vector")
            return r
    known = ", ".join(r.trial_id for r in records[:8])
    raise UserError(f"--pick trial={pick.trial_id}: no such trial in this experiment "
                    f"({len(records)} trials{': ' + known if known else ''}"
                    f"{', ...' if len(records) > 8 else ''})")


def _within(records: list[TrialRecord], pick: Pick) -> TrialRecord:
    b = pick.budget
    done, acc, c = _completed(records, b.column)
    if not done and b.axis == "latency":
        raise UserError(f"--pick {pick.label}: the trials of this experiment carry no "
                        "latency; search with objectives [val_acc, latency] or a "
                        "budget.latency")
    i = best_index(acc, c, max_cost=b.value * (1 + 1e-12))
    if i is None and not c:
        raise UserError(f"--pick {b.axis}<={b.text}: the completed trials of this experiment "
                        f"carry no {b.column}")
    if i is None:
        small = "fast" if b.axis == "latency" else "small"
        unit = {"flops_ratio": " of the FLOPs", "flops": " MACs", "latency_ms": " ms",
                "latency_ratio": " of the unpruned latency"}[b.column]
        low = f"{min(c):.3f}" if b.kind == "ratio" or b.axis == "latency" else f"{min(c):.4g}"
        raise UserError(f"--pick {b.axis}<={b.text}: no completed trial is that {small} "
                        f"(the {'fastest' if small == 'fast' else 'smallest'} keeps "
                        f"{low}{unit})")
    return done[i]


def select_record(records: Records, pick: Pick | str, cost: str = "flops_ratio"
                  ) -> TrialRecord:
    """The record ``pick`` names; UserError when none qualifies. ``cost``: the cost
    axis of ``knee`` and ``best``'s ties (``flops_ratio`` or ``latency_ratio``)."""
    pick = parse_pick(pick) if isinstance(pick, str) else pick
    records = _typed(records)
    if pick.kind == "trial":
        return _by_id(records, pick)
    if not scored(records):
        raise UserError(f"--pick {pick.label}: no trial of this experiment completed its "
                        f"schedule")
    if pick.kind == "budget":
        return _within(records, pick)
    done, acc, c = _completed(records, front_cost(records, cost))
    if pick.kind == "best":
        return done[best_index(acc, c)]
    return done[knee_index(acc, c)]
