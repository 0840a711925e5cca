"""Rate vectors: the original's syntax, validation against an architecture, widths.

Syntax (the original's): terms joined by ``+``, each ``[x]`` or ``[x]*k`` (also
``[x, y]*k``), e.g. ``[0.5]*9+[0.6]*9+[0.4]*9``. Plain comma lists (``0.5,0.6``) and JSON
lists (``[0.5, 0.6]``) parse too. A rate is the fraction of filters kept:
kept = max(1, floor(rate * n + 1e-6)), optionally rounded up to a multiple.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import UserError

__all__ = ["parse_rates", "format_rates", "validate_rates", "kept_width", "rates_to_widths",
           "expand_rates"]

_TERM = re.compile(r"^\[([^\[\]]*)\](?:\*(\d+))?$")


def _number(tok: str, text: str) -> float:
    try:
        return float(tok)
    except ValueError:
        raise UserError(f"cannot parse rate {tok.strip()!r} in {text!r}; expected numbers like "
                        f"'[0.5]*9+[0.6]*9+[0.4]*9', '0.5,0.6' or '[0.5, 0.6]'") from None


def _parse_syntax(text: str) -> list[float]:
    s = re.sub(r"\s+", "", text)
    if not s:
        raise UserError("empty rate vector; expected e.g. '[0.5]*9+[0.6]*9+[0.4]*9'")
    if "[" not in s:
        return [_number(t, text) for t in s.split(",") if t != ""]
    if s.startswith("[") and s.endswith("]") and "+" not in s and "*" not in s:
        return [_number(t, text) for t in s[1:-1].split(",") if t != ""]
    rates: list[float] = []
    for term in s.split("+"):
        m = _TERM.match(term)
        if not m:
            raise UserError(f"cannot parse term {term!r} of rate vector {text!r}; expected terms "
                            f"like '[0.5]' or '[0.5]*9' joined by '+'")
        values = [_number(t, text) for t in m.group(1).split(",") if t != ""]
        rates += values * int(m.group(2) or 1)
    return rates


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


def parse_rates(text: str | Sequence[float], cfg: str | None = None, data_set: str = "cifar10",
                start_conv: int | None = None) -> list[float]:
    """Parse a rate vector; with ``cfg``, check it against that architecture's unit count."""
    rates = _parse_syntax(text) if isinstance(text, str) else [float(r) for r in text]
    if cfg is None:
        return validate_rates(rates)
    from .registry import get_arch

    entry = get_arch(cfg, data_set)
    n = entry.plan(start_conv).num_units
    rates = expand_rates(rates, n, entry.unit_groups)
    return validate_rates(rates, n, f"{entry.family} {cfg}"
                          + (f" with --start_conv {start_conv}" if start_conv not in (None, 1) else ""))


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


def kept_width(rate: float, n: int, round_to: int = 1) -> int:
    kept = max(1, math.floor(rate * n + 1e-6))
    if round_to > 1:
        kept = min(n, max(round_to, int(math.ceil(kept / round_to)) * round_to))
    return kept


def rates_to_widths(cfg: str, rates: Sequence[float], data_set: str = "cifar10",
                    start_conv: int | None = None, sketch_lastconv: bool = True,
                    round_to: int = 1) -> list[int]:
    """Per-slot widths of the pruned model (one int per plan slot)."""
    from .registry import get_arch

    plan = get_arch(cfg, data_set).plan(start_conv)
    rates = parse_rates(list(rates), cfg, data_set, start_conv)
    widths = plan.full_widths()
    for u, (slots, rate) in enumerate(zip(plan.units, rates)):
        if not sketch_lastconv and u == plan.num_units - 1:
            continue
        for s in slots:
            widths[s] = kept_width(rate, plan.slots[s].n, round_to)
    return widths
