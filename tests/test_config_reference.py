"""docs/configuration.md: generated from the config schema, complete, and not stale."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from search.experiment.config import SearchConfig
from search.experiment.config_reference import REGENERATE, reference_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """{heading: {key: {column: cell}}} of every ``## heading`` and the table under it."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    heading, columns = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, columns = line[3:].strip(), None
            out[heading] = {}
        elif heading and line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if columns is None:
                columns = cells
            elif not set("".join(cells)) <= set("- "):
                row = dict(zip(columns, cells))
                out[heading][row["key"].strip("`")] = row
    return out


def _schema_keys(model: type[BaseModel], section: str) -> list[tuple[str, str]]:
    """(section heading, key) of every key under ``model``, walked here on its own."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append((section, name))
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            child = name if section == "Top level" else f"{section}.{name}"
            keys += _schema_keys(info.annotation, child)
    return keys


def test_committed_reference_is_current():
    assert DOC.is_file(), f"docs/configuration.md is missing; generate it: {REGENERATE}"
    assert DOC.read_text() == reference_markdown(), (
        f"docs/configuration.md is stale (the config schema changed); regenerate it: "
        f"{REGENERATE}")


def test_every_key_has_a_row_and_a_description():
    tables = _tables(reference_markdown())
    keys = _schema_keys(SearchConfig, "Top level")
    assert len(keys) > 60
    for section, key in keys:
        assert section in tables, f"no section {section!r} in the reference"
        row = tables[section].get(key)
        assert row is not None, f"{section}.{key} has no row in the reference"
        assert row["description"], f"{section}.{key} has no description"
        assert len(row["description"]) < 300, f"{section}.{key}: a description is one sentence"
        assert row["type"], f"{section}.{key} has no type"
    # and no row the schema does not have
    assert sum(len(rows) for rows in tables.values()) == len(keys)


def test_schema_fields_carry_their_descriptions():
    def walk(model: type[BaseModel], where: str) -> None:
        for name, info in model.model_fields.items():
            assert info.description and info.description.strip(), f"{where}{name}"
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{where}{name}.")
    walk(SearchConfig, "")


def test_spot_checks():
    tables = _tables(reference_markdown())
    order = list(tables)
    assert order[:3] == ["Top level", "model", "model.pretrain"]
    assert order.index("sketch") < order.index("retrain") < order.index("latency")
    step = tables["space"]["step"]
    assert step["default"] == "`0.05`"
    assert step["type"] == "float in (0, 1] or null"
    assert tables["space"]["paper_rates"]["default"] == "`[]`"
    assert tables["space"]["low"]["type"] == "float in (0, 1]"
    assert tables["retrain"]["pick"]["default"] == "`'knee'`"
    assert tables["retrain"]["lr_decay_step"]["default"] == "`[50, 100]`"
    assert tables["retrain"]["lr_decay_step"]["type"] == "list of int"
    name = tables["sampler"]["name"]
    assert name["type"] == "one of: nsga2, tpe, random, surrogate"
    assert name["default"] == "`'nsga2'`"
    assert tables["sampler"]["population_size"]["type"] == "int >= 2 or null"
    assert tables["trial"]["epochs"]["default"] == "`3`"
    assert tables["trial"]["val_fraction"]["type"] == "float in (0, 1)"
    assert tables["trial"]["label_smoothing"]["type"] == "float in [0, 1)"
    assert tables["budget"]["num_samples"]["type"] == "int >= 1 or null"
    assert tables["latency"]["threads"]["default"] == "`1`"
    assert tables["model"]["pretrained"]["default"] == "`null`"
    assert tables["model"]["download"]["default"] == "`false`"
    assert tables["model.pretrain"]["weight_decay"]["default"] == "`0.0005`"
    assert tables["sketch"]["calibration_batches"]["default"] == "`8`"
    assert tables["Top level"]["objectives"]["default"] == "`['val_acc', 'flops']`"
    assert "[model.pretrain](#modelpretrain)" in tables["model"]["pretrain"]["type"]
    assert "Frequent Directions" in tables["sketch"]["mode"]["description"]  # the core's help
    assert REGENERATE in reference_markdown().split("\n\n")[1]
