"""Rate vectors: the original's syntax, validation against an architecture, widths.

Syntax (the original's): terms joined by ``+``, each ``[x]`` or ``[x]*k`` (also
``[x, y]*k``), e.g. ``[0.5]*9+[0.6]*9+[0.4]*9``. Plain comma lists (``0.5,0.6``) and JSON
lists (``[0.5, 0.6]``) parse too. A rate is the fraction of filters kept:
kept = max(1, floor(rate * n + 1e-6)), optionally rounded up to a multiple;
:func:`sketch_core.plans.widths_for` is the one place a vector becomes per-slot widths. A vector's
length is read from its syntax and checked before it is expanded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from sketch_core.errors import UserError
from sketch_core.plans import widths_for
from sketch_core.registry import Arch, CfgLike, resolve_arch

__all__ = ["parse_rates", "format_rates", "validate_rates", "rates_to_widths", "expand_rates",
           "MAX_RATES"]

_TERM = re.compile(r"^\[([^\[\]]*)\](?:\*(\d+))?$")

# the most rates a vector may hold when no architecture says how many it takes
MAX_RATES = 100_000

def _number(tok: str, text: str) -> float:
    try:
        return float(tok)
    except ValueError:
        raise UserError(f"cannot parse rate {tok.strip()!r} in {text!r}; expected numbers like "
                        f"'[0.5]*9+[0.6]*9+[0.4]*9', '0.5,0.6' or '[0.5, 0.6]'") from None


def _terms(text: str) -> list[tuple[list[float], int]]:
    """The vector as (values, repeat) terms, nothing expanded yet."""
    s = re.sub(r"\s+", "", text)
    if not s:
        raise UserError("empty rate vector; expected e.g. '[0.5]*9+[0.6]*9+[0.4]*9'")
    if "[" not in s:
        return [([_number(t, text) for t in s.split(",") if t != ""], 1)]
    if s.startswith("[") and s.endswith("]") and "+" not in s and "*" not in s:
        return [([_number(t, text) for t in s[1:-1].split(",") if t != ""], 1)]
    terms: list[tuple[list[float], int]] = []
    for term in s.split("+"):
        m = _TERM.match(term)
        if not m:
            raise UserError(f"cannot parse term {term!r} of rate vector {text!r}; expected terms "
                            f"like '[0.5]' or '[0.5]*9' joined by '+'")
        terms.append(([_number(t, text) for t in m.group(1).split(",") if t != ""],
                      int(m.group(2) or 1)))
    return terms


def _check_count(count: int, arch: Arch | None) -> None:
    """Refuse a vector of the wrong length before it is expanded."""
    if arch is None:
        if count > MAX_RATES:
            raise UserError(f"the rate vector has {count} rates; at most {MAX_RATES} are accepted "
                            f"(an architecture takes one per unit, at most a few hundred)")
        return
    groups = arch.unit_groups
    if count != arch.num_units and not (groups and count == len(groups)):
        raise UserError(f"{arch.label} takes {arch.num_units} sketch rates, got {count}")


def validate_rates(rates: Sequence[float], expected: int | None = None,
                   arch_name: str = "the architecture") -> list[float]:
    rates = [float(r) for r in rates]
    if expected is not None and len(rates) != expected:
        raise UserError(f"{arch_name} takes {expected} sketch rates, got {len(rates)}")
    for i, r in enumerate(rates):
        if not math.isfinite(r) or r <= 0 or r > 1:
            raise UserError(f"sketch rate {i} is {r}; every rate must be in (0, 1] "
                            f"(the fraction of filters kept)")
    return rates


def expand_rates(rates: list[float], num_units: int, group_sizes: Sequence[int] | None) -> list[float]:
    """Let an architecture accept one rate per group of units (DenseNet-40: 3 for 36)."""
    if group_sizes and len(rates) == len(group_sizes) and len(rates) != num_units:
        return [r for r, k in zip(rates, group_sizes) for _ in range(k)]
    return rates


def parse_rates(text: str | Sequence[float], cfg: CfgLike | None = None, data_set: str = "cifar10",
                start_conv: int | None = None) -> list[float]:
    """Parse a rate vector; with ``cfg`` (a name or an :class:`~sketch_core.registry.Arch`),
    check it against that architecture's unit count.

    The count is read from the syntax (``[0.5]*9`` is 9 rates) and checked before
    anything is expanded, so a huge repeat is refused at once.
    """
    arch = None if cfg is None else resolve_arch(cfg, data_set, start_conv=start_conv)
    if isinstance(text, str):
        terms = _terms(text)
        _check_count(sum(len(values) * k for values, k in terms), arch)
        rates = [r for values, k in terms for r in values * k]
    else:
        rates = [float(r) for r in text]
        _check_count(len(rates), arch)
    if arch is None:
        return validate_rates(rates)
    rates = expand_rates(rates, arch.num_units, arch.unit_groups)
    return validate_rates(rates, arch.num_units, arch.label)


def format_rates(rates: Sequence[float]) -> str:
    """Compact original syntax; ``parse_rates(format_rates(r)) == r``."""
    if not rates:
        raise ValueError("empty rate vector")
    terms: list[str] = []
    i = 0
    while i < len(rates):
        j = i
        while j + 1 < len(rates) and rates[j + 1] == rates[i]:
            j += 1
        k = j - i + 1
        val = repr(float(rates[i]))
        terms.append(f"[{val}]" + (f"*{k}" if k > 1 else ""))
        i = j + 1
    return "+".join(terms)


def rates_to_widths(cfg: CfgLike, rates: Sequence[float] | str, data_set: str = "cifar10",
                    start_conv: int | None = None, sketch_lastconv: bool = True,
                    round_to: int = 1) -> list[int]:
    """Per-slot widths of the pruned model (one int per plan slot); rates are checked."""
    arch = resolve_arch(cfg, data_set, start_conv=start_conv)
    rates = parse_rates(rates if isinstance(rates, str) else list(rates), arch)
    return widths_for(arch.plan(), rates, sketch_lastconv, round_to)
