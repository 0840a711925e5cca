"""The configuration reference, ``docs/configuration.md``, generated from the config schema.

This module owns that file: :func:`reference_markdown` walks the pydantic model of
:class:`~search.experiment.config.SearchConfig` (its sections in declaration order, a
nested section such as ``model.pretrain`` right after its parent) and renders one
Markdown table per section: each key's type (with its bounds and choices), its default
as YAML writes it and its description (the field's ``description``). Nothing here lists
keys by hand, so a key added to the schema appears in the reference, and
``tests/test_config_reference.py`` fails while the committed file is stale.

Regenerate it with ``python -m search.experiment.config_reference > docs/configuration.md``
(or ``python -m search.experiment.config_reference --write``).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from search.experiment.config import SearchConfig

__all__ = ["reference_markdown", "sections", "type_text", "default_text", "REFERENCE_PATH",
           "REGENERATE", "main"]

REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "python -m search.experiment.config_reference > docs/configuration.md"
_BOUNDS = ("gt", "ge", "lt", "le")


# --------------------------------------------------------------------------- the schema

def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def sections(root: type[BaseModel] = SearchConfig, prefix: str = ""
             ) -> list[tuple[str, type[BaseModel]]]:
    """(dotted name, model) of every section under ``root``, in declaration order, each
    nested section right after the section that holds it."""
    out: list[tuple[str, type[BaseModel]]] = []
    for name, info in root.model_fields.items():
        if _is_section(info.annotation):
            dotted = f"{prefix}{name}"
            out.append((dotted, info.annotation))
            out.extend(sections(info.annotation, dotted + "."))
    return out


def _peel(tp: Any, meta: list) -> tuple[Any, dict[str, Any], bool]:
    """(type, bounds, nullable) of an annotation: ``Annotated`` and ``Optional`` peeled
    off, the bounds gathered from the field's and the annotation's metadata."""
    bounds: dict[str, Any] = {}
    nullable = False

    def take(items: list) -> None:
        for m in items:
            for m2 in (m.metadata if isinstance(m, FieldInfo) else [m]):
                for name in _BOUNDS:
                    if getattr(m2, name, None) is not None:
                        bounds[name] = getattr(m2, name)

    take(meta)
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp, *extra = typing.get_args(tp)
            take(extra)
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                return typing.Union[tuple(args)], bounds, nullable
            tp = args[0]
        else:
            return tp, bounds, nullable


_NAMES = {bool: "bool", int: "int", float: "float", str: "str", dict: "mapping"}


def _bounds_text(tp: Any, bounds: dict[str, Any]) -> str:
    """``>= 1``, ``> 0`` or ``in (0, 1]``: an int's strict bound as the inclusive one."""
    lo = hi = None
    if tp is int:
        if "gt" in bounds:
            bounds = {**{k: v for k, v in bounds.items() if k != "gt"}, "ge": bounds["gt"] + 1}
        if "lt" in bounds:
            bounds = {**{k: v for k, v in bounds.items() if k != "lt"}, "le": bounds["lt"] - 1}
    if "gt" in bounds or "ge" in bounds:
        lo = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"])
    if "lt" in bounds or "le" in bounds:
        hi = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"])
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    if hi:
        return f"{'<' if hi[0] == ')' else '<='} {hi[1]:g}"
    return ""


def _base_text(tp: Any, bounds: dict[str, Any]) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(map(str, typing.get_args(tp)))
    if origin is list:
        inner, inner_bounds, inner_null = _peel(typing.get_args(tp)[0], [])
        text = _base_text(inner, inner_bounds) + (" or null" if inner_null else "")
        return f"list, each {text}" if typing.get_origin(inner) is Literal else f"list of {text}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_base_text(*_peel(a, [])[:2]) for a in typing.get_args(tp))
    if _is_section(tp):
        return "section"
    name = _NAMES.get(tp, getattr(tp, "__name__", str(tp)))
    limits = _bounds_text(tp, bounds) if tp in (int, float) else ""
    return f"{name} {limits}" if limits else name


def type_text(info: FieldInfo) -> str:
    """A key's type as the reference shows it: ``int >= 1``, ``float in (0, 1]``,
    ``one of: nsga2, tpe, ...``, ``list of str``, ``... or null``."""
    tp, bounds, nullable = _peel(info.annotation, list(info.metadata))
    return _base_text(tp, bounds) + (" or null" if nullable else "")


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (int, float)):
        return yaml.safe_dump(value).splitlines()[0]  # 0.0005, 1.0e-05: YAML reads them back
    return str(value)


def default_text(info: FieldInfo) -> str:
    """A key's default as it would be written in YAML (``null``, ``[]``, ``0.05``,
    ``'knee'``); empty for a section (its keys have their own)."""
    if _is_section(info.annotation):
        return ""
    return _yaml(info.get_default(call_default_factory=True))


# --------------------------------------------------------------------------- Markdown

def _rst_to_markdown(text: str) -> str:
    """Docstring markup as Markdown: ``x`` and :role:`~a.b.x` become `x`."""
    text = re.sub(r":[a-z]+:`~[\w.]*?\.?(\w+)`", r"`\1`", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    """One table cell: one line, ``|`` escaped; outside code spans ``*`` and ``<`` too."""
    text = " ".join(_rst_to_markdown(text).split())
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = parts[i].replace("*", r"\*").replace("<", "&lt;")
    return "`".join(parts).replace("|", r"\|")


def _first_paragraph(cls: type) -> str:
    doc = inspect.cleandoc(cls.__doc__ or "")
    return " ".join(_rst_to_markdown(doc.split("\n\n")[0]).split())


def _anchor(name: str) -> str:
    """GitHub's anchor of a heading made of a section's dotted name."""
    return re.sub(r"[^a-z0-9_ -]", "", name.lower()).replace(" ", "-")


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            dotted = f"{prefix}{name}"
            kind = f"section [{dotted}](#{_anchor(dotted)})"
        else:
            kind = _cell(type_text(info))
        default = default_text(info)
        rows.append(f"| `{name}` | {kind} | {_cell('`' + default + '`') if default else ''} | "
                    f"{_cell(info.description or '')} |")
    return rows


def reference_markdown() -> str:
    """The whole of ``docs/configuration.md``, from :class:`SearchConfig`'s schema."""
    out = [
        "# Configuration reference",
        "",
        f"*Generated from the schema in `search/experiment/config.py`; do not edit by hand. "
        f"Regenerate it with `{REGENERATE}`.*",
        "",
        "A search config is YAML with one mapping per section. Every key has a default, so a "
        "file names only what differs; `--set section.key=value` overrides any key (the value "
        "in YAML syntax). What the keys do together is in the "
        "[user guide](user-guide.md#search).",
        "",
        "## Top level",
        "",
        _first_paragraph(SearchConfig),
        "",
        *_table(SearchConfig, ""),
    ]
    for dotted, model in sections():
        out += ["", f"## {dotted}", "", _first_paragraph(model), "",
                *_table(model, dotted + ".")]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the reference (``--write``: write it to ``docs/configuration.md``)."""
    parser = argparse.ArgumentParser(prog="python -m search.experiment.config_reference",
                                     description="The configuration reference, generated "
                                                 "from the config schema.")
    parser.add_argument("--write", action="store_true",
                        help=f"write it to {REFERENCE_PATH} instead of printing it")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.write:
        REFERENCE_PATH.write_text(text)
        print(f"wrote {REFERENCE_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
