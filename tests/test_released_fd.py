"""``released_fd`` (the released FilterSketch code's FD arithmetic) and the mode using it.

The expected sketches are worked out by hand in the comments. Each case uses rows
that are orthogonal, so every SVD can be read off: the singular values are the row
norms, the right singular vectors are the rows' directions. A singular vector's sign
is arbitrary, so rows are compared in absolute value.
"""

from __future__ import annotations

import math

import pytest
import torch

from sketch_core.options import MODES
from conftest import sketch_at
from sketch_core.registry import build_model
from sketch_core.pruning.fd import frequent_directions, released_fd


def test_two_rows_shrink_at_index_one_and_the_last_row_is_raw():
    # l = 2, so l // 2 = 1. A = [3,0], [0,4], [1,0], [0,1].
    # rows 0, 1 fill the buffer: B = [[3,0],[0,4]].
    # row 2 meets a full buffer with 2 rows left (>= 1): SVD of B gives sigma^2 =
    #   16 (along e2) and 9 (along e1); subtract sigma^2[1] = 9: 7 and 0, so
    #   B = [[0, sqrt 7], [0, 0]]; row 2 goes to index 1: B = [[0, sqrt 7], [1, 0]].
    # row 3 meets a full buffer with 1 row left (>= 1): sigma^2 = 7 (e2), 1 (e1);
    #   minus 1: 6 and 0, B = [[0, sqrt 6], [0, 0]]; row 3 at index 1.
    # result, no last shrink: [[0, sqrt 6], [0, 1]].
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    got = released_fd(a, 2)
    assert torch.allclose(got.abs(), torch.tensor([[0.0, math.sqrt(6)], [0.0, 1.0]],
                                                  dtype=torch.float64), atol=1e-12)


def test_the_last_rows_are_never_inserted_once_fewer_than_half_are_left():
    # l = 4, so l // 2 = 2; A has 7 rows of width 4:
    # rows 0-3 = 4 e1, 3 e2, 2 e3, 1 e4 fill the buffer.
    # row 4 (= 2 e4) meets a full buffer with 3 rows left (>= 2): sigma^2 = 16, 9, 4, 1;
    #   minus sigma^2[2] = 4: 12, 5, 0, 0, so B = [sqrt12 e1, sqrt5 e2, 0, 0]; row 4 at
    #   index 2.
    # row 5 (= 1 e3) goes to the free index 3: B = [sqrt12 e1, sqrt5 e2, 2 e4, 1 e3].
    # row 6 (= [5, 5, 5, 5]) meets a full buffer with 1 row left (< 2): skipped.
    a = torch.tensor([[4, 0, 0, 0], [0, 3, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1],
                      [0, 0, 0, 2], [0, 0, 1, 0], [5, 5, 5, 5]], dtype=torch.float32)
    want = torch.tensor([[math.sqrt(12), 0, 0, 0], [0, math.sqrt(5), 0, 0], [0, 0, 0, 2],
                         [0, 0, 1, 0]])
    got = released_fd(a, 4)
    assert got.dtype == torch.float32 and got.shape == (4, 4)
    assert torch.allclose(got.abs(), want, atol=1e-5)


def test_a_full_buffer_with_too_few_rows_left_returns_the_raw_rows():
    # l = 4, 5 rows: rows 0-3 fill the buffer; row 4 meets it with 1 row left (< 2) and
    # is skipped. Nothing was ever shrunk: the first four rows come back unchanged.
    a = torch.arange(20, dtype=torch.float64).reshape(5, 4)
    assert torch.equal(released_fd(a, 4), a[:4])
    # fewer rows than l: the buffer is the rows, then zero rows
    assert torch.equal(released_fd(a[:2], 4), torch.cat([a[:2], torch.zeros(2, 4, dtype=a.dtype)]))


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="2-D"):
        released_fd(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="at least one row"):
        released_fd(torch.zeros(3, 3), 0)


def test_sketch_released_mode_uses_it_for_filters_and_channels():
    assert "sketch_released" in MODES
    torch.manual_seed(0)
    model = build_model("resnet20", "cifar10").eval()
    rates = [0.5] * 9
    released = sketch_at(model, "resnet20", rates, "cifar10", mode="sketch_released")
    textbook = sketch_at(model, "resnet20", rates, "cifar10", mode="sketch")
    w1 = model.layer1[0].conv1.weight.detach()
    w2 = model.layer1[0].conv2.weight.detach()
    l = released.layer1[0].conv1.out_channels
    assert l == textbook.layer1[0].conv1.out_channels == 8
    # the producer's filters: the released sketch of its 16 filter rows
    want = released_fd(w1.reshape(16, -1), l).reshape(l, *w1.shape[1:])
    assert torch.allclose(released.layer1[0].conv1.weight, want)
    # the consumer's input channels: the released sketch of the transposed weight
    rows = w2.transpose(0, 1).reshape(16, -1)
    want = released_fd(rows, l).reshape(l, w2.shape[0], 3, 3).transpose(0, 1)
    assert torch.allclose(released.layer1[0].conv2.weight, want)
    # textbook FD differs from it
    assert torch.allclose(textbook.layer1[0].conv1.weight,
                          frequent_directions(w1.reshape(16, -1), l).reshape(l, *w1.shape[1:]))
    assert not torch.allclose(released.layer1[0].conv1.weight, textbook.layer1[0].conv1.weight)
    x = torch.randn(2, 3, 32, 32)
    assert released(x).shape == (2, 10)
