"""How numbers and lines are shown on the terminal: percentages, milliseconds, a quiet flag."""

from __future__ import annotations

from typing import Any

__all__ = ["say", "pct", "ms", "millions"]


def say(quiet: bool, text: str) -> None:
    """Print ``text`` (flushed) unless ``quiet``."""
    if not quiet:
        print(text, flush=True)


def pct(x: Any) -> str:
    """``12.34%`` of a fraction; ``-`` for None."""
    return "-" if x is None else f"{100 * float(x):.2f}%"


def ms(x: Any) -> str:
    return "-" if x is None else f"{float(x):.3f} ms"


def millions(x: Any) -> str:
    return "-" if x is None else f"{float(x) / 1e6:.2f}M"
