"""Input normalisation as part of a network's description: parse, compare, record.

A network is trained on pixels in [0, 1] shifted by a per-channel mean and divided by
a per-channel std; a checkpoint records the pair it was trained with, and every later
run uses it. :func:`parse_normalize` reads the command-line and config spelling: a
preset name (``cifar``, ``imagenet``) or ``MEAN/STD`` with comma-separated values
(``0.5,0.5,0.5/0.25,0.25,0.25``; one value per channel, or one for all). Bad text is
one :class:`~sketch_core.errors.UserError` line saying what is expected.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

from sketch_core.errors import UserError

__all__ = ["Normalization", "PRESETS", "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD",
           "parse_normalize", "format_normalize", "same_normalize", "check_channels",
           "as_record", "from_record", "choose_normalize"]

Normalization = Tuple[Tuple[float, ...], Tuple[float, ...]]  # (mean, std) on [0, 1] pixels

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRESETS: dict[str, Normalization] = {"cifar": (CIFAR_MEAN, CIFAR_STD),
                                     "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
_EXPECTED = ("cifar, imagenet or MEAN/STD with comma-separated values, one per channel "
             "(e.g. 0.5,0.5,0.5/0.25,0.25,0.25)")


def _floats(text: str, what: str, original: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--normalize {original!r}: the {what} is not a list of numbers; "
                        f"expected {_EXPECTED}") from None
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"--normalize {original!r}: the {what} holds a non-finite value")
    return values


def parse_normalize(value: Any, channels: int | None = None) -> Normalization | None:
    """``value`` as ``(mean, std)``; None stays None (the data set's own statistics).

    Takes a preset name, ``MEAN/STD`` text, or a ``(mean, std)`` pair of sequences.
    With ``channels``, the lists must have one value or ``channels`` values.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in PRESETS:
            norm = PRESETS[text.lower()]
        else:
            parts = text.split("/")
            if len(parts) != 2:
                raise UserError(f"--normalize {value!r}: unknown preset or not MEAN/STD; "
                                f"expected {_EXPECTED}")
            norm = _floats(parts[0], "mean", value), _floats(parts[1], "std", value)
    else:
        try:
            mean, std = value
            norm = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        except (TypeError, ValueError):
            raise UserError(f"--normalize {value!r}: expected {_EXPECTED}") from None
    mean, std = norm
    if not mean or len(mean) != len(std):
        raise UserError(f"--normalize {format_normalize(norm)}: the mean has {len(mean)} values "
                        f"and the std {len(std)}; give both one value per channel")
    if min(std) <= 0:
        raise UserError(f"--normalize {format_normalize(norm)}: every std must be positive")
    if channels is not None:
        check_channels(norm, channels)
    return norm


def check_channels(norm: Normalization, channels: int, what: str = "the data") -> None:
    """One value, or one per channel: else a UserError naming both counts."""
    if len(norm[0]) not in (1, channels):
        raise UserError(f"--normalize {format_normalize(norm)} has {len(norm[0])} values per "
                        f"list; {what} has {channels} channel(s): give {channels} (or 1)")


def format_normalize(norm: Normalization | None) -> str:
    """The command-line spelling: a preset's name, else ``MEAN/STD``."""
    if norm is None:
        return "the data set's own"
    for name, preset in PRESETS.items():
        if same_normalize(norm, preset):
            return name
    return "/".join(",".join(f"{v:g}" for v in part) for part in norm)


def same_normalize(a: Normalization | None, b: Normalization | None) -> bool:
    """Equal to 6 decimals (a one-value list equals the same value repeated)."""
    if a is None or b is None:
        return a is b

    def norm(part: Sequence[float], n: int) -> list[float]:
        vals = list(part) * (n if len(part) == 1 else 1)
        return [round(float(v), 6) for v in vals]

    n = max(len(a[0]), len(b[0]))
    return all(norm(x, n) == norm(y, n) for x, y in zip(a, b))


def as_record(norm: Normalization | None) -> dict[str, list[float]] | None:
    """What a checkpoint stores: ``{"mean": [...], "std": [...]}`` (plain lists)."""
    if norm is None:
        return None
    return {"mean": [float(v) for v in norm[0]], "std": [float(v) for v in norm[1]]}


def from_record(record: Any) -> Normalization | None:
    """A checkpoint's record back as ``(mean, std)``; None when there is none."""
    if not isinstance(record, dict) or "mean" not in record or "std" not in record:
        return None
    return tuple(float(v) for v in record["mean"]), tuple(float(v) for v in record["std"])


def choose_normalize(flag: Any, recorded: Normalization | None, *, force: bool = False,
                     source: str = "the checkpoint") -> Normalization | None:
    """The normalisation a run uses: the recorded one, unless a flag is given.

    A flag that contradicts the record is an error naming both, unless ``force``;
    without a record the flag (or None: the data set's own) is used.
    """
    asked = parse_normalize(flag)
    if asked is None:
        return recorded
    if recorded is not None and not same_normalize(asked, recorded) and not force:
        raise UserError(f"--normalize {format_normalize(asked)} contradicts {source}, whose "
                        f"network was trained with --normalize {format_normalize(recorded)}; "
                        f"drop --normalize, or add --force_normalize to use it anyway")
    return asked
