"""The one budget grammar: how much FLOPs or latency a vector may keep.

A budget is read the same way wherever one is accepted (the config's
``budget.flops_budget`` and ``budget.latency``, ``retrain --pick flops<=B`` and
``latency<=B``, ``analyze --flops_budget`` and ``--latency_budget``):

- a fraction of the unpruned network, in (0, 1]: ``0.5``;
- a percentage of it: ``50%``;
- for FLOPs, an absolute count of multiply-accumulates: ``60M``, ``1.2G``, ``5K`` or a
  plain number above 1 (``73360000``);
- for latency, milliseconds: ``3ms``.

:func:`parse_budget` gives a :class:`Budget`; :meth:`Budget.ratio` turns it into the
fraction of the unpruned network once that network's cost is known. Anything else is a
:class:`~sketch_core.errors.UserError` naming what was given and what is expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from sketch_core.errors import UserError

__all__ = ["Budget", "parse_budget", "AXES"]

AXES = ("flops", "latency")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"[0-9]*\.?[0-9]+(?:e[-+]?\d+)?"
_TEXT = re.compile(rf"^({_NUMBER})\s*(%|ms|[kmgt])?$", re.IGNORECASE)
_EXPECTED = {
    "flops": "a fraction of the unpruned FLOPs in (0, 1] ('0.5'), a percentage ('50%') or "
             "MACs ('60M', '1.2G')",
    "latency": "a fraction of the unpruned latency in (0, 1] ('0.5'), a percentage ('50%') "
               "or milliseconds ('3ms')",
}


@dataclass(frozen=True)
class Budget:
    """A bound on one cost: ``kind`` ``ratio`` (of the unpruned network) or ``absolute``
    (MACs for FLOPs, milliseconds for latency)."""

    axis: Literal["flops", "latency"]
    kind: Literal["ratio", "absolute"]
    value: float

    def ratio(self, unpruned: float | None = None) -> float:
        """The bound as a fraction of the unpruned network's cost (``unpruned``: its MACs
        or milliseconds, needed for an absolute bound)."""
        if self.kind == "ratio":
            return self.value
        if not unpruned:
            raise ValueError(f"an absolute {self.axis} budget needs the unpruned network's cost")
        return self.value / float(unpruned)

    @property
    def column(self) -> str:
        """The trial column the bound applies to as given (``flops_ratio``, ``flops``,
        ``latency_ratio`` or ``latency_ms``)."""
        if self.kind == "ratio":
            return f"{self.axis}_ratio"
        return "flops" if self.axis == "flops" else "latency_ms"

    @property
    def text(self) -> str:
        """The budget written back in the grammar (``0.5``, ``60M``, ``3ms``)."""
        if self.kind == "ratio":
            return f"{self.value:g}"
        if self.axis == "latency":
            return f"{self.value:g}ms"
        for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if self.value >= div:
                return f"{self.value / div:g}{unit}"
        return f"{self.value:g}"


def parse_budget(text: str | float | int, axis: str = "flops", what: str = "budget") -> Budget:
    """Read ``text`` as a budget on ``axis`` (``flops`` or ``latency``); ``what`` names
    where it came from in the error (``--pick flops<=...``, ``budget.latency``)."""
    if axis not in AXES:
        raise ValueError(f"unknown budget axis {axis!r}")
    if isinstance(text, bool):
        raise UserError(f"{what}: cannot read {text!r}; expected {_EXPECTED[axis]}")
    m = _TEXT.match(str(text).strip().replace("_", ""))
    if m is None:
        raise UserError(f"{what}: cannot read {text!r}; expected {_EXPECTED[axis]}")
    value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{what}: {text!r} is not positive; expected {_EXPECTED[axis]}")
    if unit == "%":
        if value > 100:
            raise UserError(f"{what}: {text!r} is above 100%; expected "
                            f"{_EXPECTED[axis]}")
        return Budget(axis, "ratio", value / 100.0)
    if unit == "ms":
        if axis != "latency":
            raise UserError(f"{what}: {text!r} is milliseconds, which bound a latency; expected "
                            f"{_EXPECTED[axis]}")
        return Budget(axis, "absolute", value)
    if unit:
        if axis != "flops":
            raise UserError(f"{what}: {text!r} is a count of MACs, which bounds FLOPs; expected "
                            f"{_EXPECTED[axis]}")
        return Budget(axis, "absolute", value * _SUFFIX[unit])
    if value <= 1.0:
        return Budget(axis, "ratio", value)
    if axis == "flops":
        return Budget(axis, "absolute", value)
    raise UserError(f"{what}: {value:g} is outside (0, 1]; expected {_EXPECTED[axis]}")
