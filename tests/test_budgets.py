"""search.results.budgets: one budget grammar, read the same in the config, --pick and analyze."""

from __future__ import annotations

import pytest

import launch
from search.experiment.config import load_config
from search.results.budgets import Budget, parse_budget
from search.results.picks import parse_pick
from sketch_core.errors import UserError


@pytest.mark.parametrize("text, axis, want", [
    ("0.5", "flops", Budget("flops", "ratio", 0.5)),
    ("50%", "flops", Budget("flops", "ratio", 0.5)),
    ("100%", "latency", Budget("latency", "ratio", 1.0)),
    ("60M", "flops", Budget("flops", "absolute", 60e6)),
    ("1.2g", "flops", Budget("flops", "absolute", 1.2e9)),
    ("5K", "flops", Budget("flops", "absolute", 5e3)),
    ("73360000", "flops", Budget("flops", "absolute", 73360000.0)),
    ("3ms", "latency", Budget("latency", "absolute", 3.0)),
    (" 2.5 ms ", "latency", Budget("latency", "absolute", 2.5)),
    (0.25, "latency", Budget("latency", "ratio", 0.25)),
])
def test_the_grammar(text, axis, want):
    assert parse_budget(text, axis) == want


@pytest.mark.parametrize("text, axis, needle", [
    ("lots", "flops", "cannot read 'lots'"),
    ("0", "flops", "is not positive"),
    ("-1", "latency", "cannot read '-1'"),
    ("150%", "flops", "is above 100%"),
    ("3ms", "flops", "milliseconds, which bound a latency"),
    ("60M", "latency", "a count of MACs, which bounds FLOPs"),
    ("2", "latency", "2 is outside (0, 1]"),
    (True, "flops", "cannot read True"),
])
def test_bad_budgets_name_what_is_expected(text, axis, needle):
    with pytest.raises(UserError) as exc:
        parse_budget(text, axis, "budget")
    assert needle in str(exc.value) and "expected" in str(exc.value)


def test_ratio_of_an_absolute_budget_needs_the_unpruned_cost():
    assert parse_budget("60M").ratio(120e6) == pytest.approx(0.5)
    assert parse_budget("3ms", "latency").ratio(6.0) == pytest.approx(0.5)
    assert parse_budget("0.4").ratio() == 0.4
    assert parse_budget("60M").text == "60M" and parse_budget("3ms", "latency").text == "3ms"


def test_the_same_grammar_in_the_config_the_pick_and_analyze(tmp_path, capsys):
    c = load_config("quickstart", ["budget.flops_budget=60M", "budget.latency='50%'"])
    assert c.budget.flops_bound() == Budget("flops", "absolute", 60e6)
    assert c.budget.latency_bound() == Budget("latency", "ratio", 0.5)
    assert load_config("quickstart", ["budget.flops_budget=0.3"]).budget.flops_bound().value == 0.3
    assert parse_pick("flops<=60M").budget == Budget("flops", "absolute", 60e6)
    assert parse_pick("latency<=50%").label == "latency_le_0.5"
    assert parse_pick("flops<=60M").label == "flops_le_60M"
    with pytest.raises(UserError, match="budget.flops_budget"):
        load_config("quickstart", ["budget.flops_budget=lots"])
    assert launch.main(["analyze", str(tmp_path), "--flops_budget", "3ms"]) == 2
    assert "--flops_budget: '3ms' is milliseconds" in capsys.readouterr().err
