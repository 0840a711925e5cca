"""Frequent Directions, row-space energy and weight norms: the pure math."""

import pytest
import torch

from sketch_core.pruning.fd import frequent_directions
from sketch_core.pruning.fd import row_space_energy, weight_norm


def test_fd_error_bound_on_many_random_matrices():
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(150):
        n = int(torch.randint(5, 150, (1,), generator=gen))
        d = int(torch.randint(3, 90, (1,), generator=gen))
        l = int(torch.randint(1, min(n, d) + 1, (1,), generator=gen))
        decay = torch.rand(d, generator=gen, dtype=torch.float64) ** 3
        a = torch.randn(n, d, generator=gen, dtype=torch.float64) * decay
        b = frequent_directions(a, l)
        assert b.shape == (l, d)
        err = torch.linalg.matrix_norm(a.T @ a - b.T @ b, 2)
        s2 = torch.linalg.svdvals(a) ** 2
        for k in range(l):
            assert err <= s2[k:].sum() / (l - k) * (1 + 1e-9) + 1e-9
            checked += 1
    assert checked > 500


def test_fd_never_overestimates_and_is_exact_at_full_rank():
    a = torch.randn(40, 12, dtype=torch.float64)
    b = frequent_directions(a, 12)
    # B^T B <= A^T A (positive semi-definite difference); at l = d = rank it is exact
    diff = a.T @ a - b.T @ b
    assert torch.linalg.eigvalsh(diff).min() > -1e-8
    assert torch.allclose(b.T @ b, a.T @ a, atol=1e-8)


def test_fd_keeps_dtype_and_returns_requested_rows():
    a = torch.randn(30, 20)
    assert frequent_directions(a, 7).dtype == torch.float32
    assert frequent_directions(a, 7).shape == (7, 20)
    with pytest.raises(ValueError):
        frequent_directions(a, 0)


def test_row_space_energy_ranks_filters_in_the_sketch_space():
    a = torch.zeros(6, 4, dtype=torch.float64)
    a[0, 0], a[1, 0], a[2, 1] = 5.0, 4.0, 0.1
    b = frequent_directions(a, 1)
    e = row_space_energy(a, b)
    assert e.argsort(descending=True)[:2].tolist() == [0, 1]
    assert e[2] < 1e-12


# W has two filters, [3, -4] and [1, 2] (shape 2x1x1x2). Norms worked out by hand:
# whole layer |w| = 3, 4, 1, 2: max 4, sum 10, l2 sqrt(30), l1 sqrt(10), l2_2 30, 2max 8;
# filter 0: max 4, sum 7, l2 5, l1 sqrt(7), l2_2 25, 2max 8;
# filter 1: max 2, sum 3, l2 sqrt(5), l1 sqrt(3), l2_2 5, 2max 4.
HAND = {
    "max": (4.0, (4.0, 2.0)),
    "sum": (10.0, (7.0, 3.0)),
    "l2": (30 ** 0.5, (5.0, 5 ** 0.5)),
    "l1": (10 ** 0.5, (7 ** 0.5, 3 ** 0.5)),
    "l2_2": (30.0, (25.0, 5.0)),
    "2max": (8.0, (8.0, 4.0)),
}


@pytest.mark.parametrize("method", sorted(HAND))
def test_weight_norm_methods_match_hand_computed_values(method):
    w = torch.tensor([[3.0, -4.0], [1.0, 2.0]], dtype=torch.float64).reshape(2, 1, 1, 2)
    whole, (f0, f1) = HAND[method]
    got = weight_norm(w, method, per_filter=False).reshape(2, 2)
    want = torch.tensor([[3.0, -4.0], [1.0, 2.0]], dtype=torch.float64) / whole
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    got = weight_norm(w, method, per_filter=True).reshape(2, 2)
    want = torch.tensor([[3.0 / f0, -4.0 / f0], [1.0 / f1, 2.0 / f1]], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert got.shape == (2, 2) and weight_norm(w, method).shape == w.shape


def test_weight_norm_none_and_unknown():
    w = torch.randn(4, 3, 3, 3)
    assert weight_norm(w, None) is w
    with pytest.raises(Exception, match="unknown --weight_norm_method 'l3'"):
        weight_norm(w, "l3")
