"""What each rate of a vector controls: the prunable units of an architecture.

A *slot* is one group of output channels that can be narrowed: the filters of a
producer conv (plus the BN right after it). A *unit* is what one rate of the vector
controls: one or more slots (a GoogLeNet module narrows three convs with one rate).
Every module whose weights change when a slot narrows is listed as a
:class:`ModSpec`: which slot its output channels belong to and how its input
channels are laid out (runs of channels from slots, or fixed runs that never change).
The sketch code in :mod:`sketch_core.pruning.prune` reads only this description; it never
branches on architecture names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sketch_core.errors import UserError

__all__ = ["Seg", "ModSpec", "Slot", "Plan", "PlanBuilder", "require_default_start_conv",
           "kept_width", "widths_for"]


@dataclass(frozen=True)
class Seg:
    """A run of ``n`` input channels; ``slot`` is None when the run is never narrowed.

    ``repeat`` is the number of input features per channel, for a linear layer fed by
    a flattened feature map (channel-major): channel c owns features c*repeat ... .
    """

    slot: int | None
    n: int
    repeat: int = 1


@dataclass(frozen=True)
class ModSpec:
    """A module whose weights a slot touches.

    kind is ``conv``, ``linear`` or ``bn``. For conv/linear, ``out_slot`` narrows dim 0
    and ``inputs`` lays out dim 1. For BN, ``inputs`` lays out its channels.
    """

    path: str
    kind: str
    out_slot: int | None
    inputs: tuple[Seg, ...]


@dataclass(frozen=True)
class Slot:
    """The filters of conv ``producer`` (and of BN ``bn`` after it), ``n`` of them."""

    producer: str
    n: int
    bn: str | None = None


@dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    units: tuple[tuple[int, ...], ...]
    unit_names: tuple[str, ...]
    modules: tuple[ModSpec, ...]

    @property
    def num_units(self) -> int:
        return len(self.units)

    def full_widths(self) -> list[int]:
        return [s.n for s in self.slots]


@dataclass
class PlanBuilder:
    """Helper the architecture files use to write their plans in forward order."""

    slots: list[Slot] = field(default_factory=list)
    modules: list[ModSpec] = field(default_factory=list)
    units: list[tuple[int, ...]] = field(default_factory=list)
    unit_names: list[str] = field(default_factory=list)

    def slot(self, producer: str, n: int, bn: str | None = None) -> int:
        self.slots.append(Slot(producer, n, bn))
        return len(self.slots) - 1

    def module(self, path: str, kind: str, out_slot: int | None = None,
               inputs: tuple[Seg, ...] | list[Seg] = ()) -> None:
        self.modules.append(ModSpec(path, kind, out_slot, tuple(inputs)))

    def conv(self, path: str, out_slot: int | None, inputs: list[Seg] | tuple[Seg, ...],
             bn: str | None = None) -> None:
        """A conv (and its BN) only listed when a slot touches it."""
        touched = out_slot is not None or any(s.slot is not None for s in inputs)
        if not touched:
            return
        self.module(path, "conv", out_slot, inputs)
        if bn is not None and out_slot is not None:
            self.module(bn, "bn", None, (Seg(out_slot, self.slots[out_slot].n),))

    def unit(self, name: str, *slots: int) -> None:
        self.units.append(tuple(slots))
        self.unit_names.append(name)

    def build(self) -> Plan:
        return Plan(tuple(self.slots), tuple(self.units), tuple(self.unit_names),
                    tuple(self.modules))


def require_default_start_conv(cfg: str, start_conv: int | None) -> None:
    """Only VGG has a first conv to choose; every other architecture takes the default 1."""
    if start_conv not in (None, 1):
        raise UserError(f"--start_conv only applies to VGG; {cfg} takes the default 1 "
                        f"(got {start_conv})")


def kept_width(rate: float, n: int, round_to: int = 1) -> int:
    kept = max(1, math.floor(rate * n + 1e-6))
    if round_to > 1:
        kept = min(n, max(round_to, int(math.ceil(kept / round_to)) * round_to))
    return kept


def widths_for(plan: Plan, rates: Sequence[float], sketch_lastconv: bool = True,
               round_to: int = 1) -> list[int]:
    """Per-slot widths for one checked rate per unit: the one place rates become widths.

    With ``sketch_lastconv`` False the last unit keeps its full width.
    """
    widths = plan.full_widths()
    last = plan.num_units - 1
    for u, (slots, rate) in enumerate(zip(plan.units, rates)):
        if not sketch_lastconv and u == last:
            continue
        for s in slots:
            widths[s] = kept_width(rate, plan.slots[s].n, round_to)
    return widths
