"""Rate vectors: the original's syntax, validation, widths."""

import math

import pytest

from sketch_core.errors import UserError
from sketch_core.rates import format_rates, parse_rates, rates_to_widths
from sketch_core.plans import kept_width


def test_original_syntax_and_alternatives():
    r = parse_rates("[0.5]*9+[0.6]*9+[0.4]*9")
    assert r == [0.5] * 9 + [0.6] * 9 + [0.4] * 9
    assert parse_rates("0.5, 0.6,0.7") == [0.5, 0.6, 0.7]
    assert parse_rates("[0.5, 0.6]") == [0.5, 0.6]
    assert parse_rates("[0.5,0.6]*2+[0.3]") == [0.5, 0.6, 0.5, 0.6, 0.3]
    assert parse_rates("[0.6]") == [0.6]


@pytest.mark.parametrize("text", ["[0.5]*9+", "[abc]*3", "[0.5]*x", "", "0.5;0.6", "[[0.5]]"])
def test_unparsable_rates_are_user_errors(text):
    with pytest.raises(UserError):
        parse_rates(text)


@pytest.mark.parametrize("bad", ["[0]*27", "[1.2]*27", "[nan]*27", "[-0.5]*27", "[inf]*27"])
def test_out_of_range_rates(bad):
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        parse_rates(bad, "resnet56")


def test_count_is_checked_against_the_architecture():
    with pytest.raises(UserError, match="resnet56 takes 27 sketch rates, got 26"):
        parse_rates("[0.5]*26", "resnet56")
    assert len(parse_rates("[0.5]*12", "vgg16")) == 12
    assert len(parse_rates("[0.5]*13", "vgg16", start_conv=0)) == 13
    assert len(parse_rates("[0.5]*9", "googlenet")) == 9
    assert len(parse_rates("[0.5]*54", "resnet110")) == 54
    assert len(parse_rates("[0.5]*36", "densenet40")) == 36
    assert parse_rates("[0.5]+[0.6]+[0.7]", "densenet40") == [0.5] * 12 + [0.6] * 12 + [0.7] * 12


def test_format_round_trips():
    for r in ([0.5] * 9 + [0.6] * 9 + [0.4] * 9, [0.1, 0.2, 0.2, 0.3], [0.123456789] * 3):
        text = format_rates(r)
        assert parse_rates(text) == r
    assert format_rates([0.5] * 9 + [0.6]) == "[0.5]*9+[0.6]"


def test_kept_width_floors_without_float_surprises():
    assert kept_width(0.29, 100) == 29          # int(0.29 * 100) would give 28
    assert kept_width(0.01, 16) == 1            # never zero filters
    assert kept_width(0.5, 64, round_to=8) == 32
    assert kept_width(0.3, 64, round_to=8) == 24    # 19 -> 24
    assert kept_width(0.05, 64, round_to=8) == 8
    assert kept_width(1.0, 12, round_to=8) == 12


def test_widths_follow_rates_and_lastconv_option():
    w = rates_to_widths("resnet20", [0.5] * 9)
    assert w == [8] * 3 + [16] * 3 + [32] * 3
    w = rates_to_widths("resnet20", [0.5] * 9, sketch_lastconv=False)
    assert w[-1] == 64 and w[:-1] == [8] * 3 + [16] * 3 + [32] * 2
    full = rates_to_widths("resnet56", [1.0] * 27)
    assert full == [16] * 9 + [32] * 9 + [64] * 9
    assert math.isclose(sum(rates_to_widths("googlenet", [1.0] * 9)),
                        sum(x for m in __import__("sketch_core.models.cifar_googlenet",
                                                   fromlist=["M"]).MODULES for x in (m[3], m[5], m[6])))
