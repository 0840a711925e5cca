"""Frequent Directions, row-space energy and weight norms: the pure math."""

import pytest
import torch

from sketch_core import frequent_directions
from sketch_core.fd import row_space_energy, weight_norm


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


@pytest.mark.parametrize("method,expect", [
    ("max", lambda w: w.abs().max()), ("sum", lambda w: w.abs().sum()),
    ("l2", lambda w: w.pow(2).sum().sqrt()), ("l1", lambda w: w.abs().sum().sqrt()),
    ("l2_2", lambda w: w.pow(2).sum()), ("2max", lambda w: 2 * w.abs().max()),
])
def test_weight_norm_methods_divide_by_their_norm(method, expect):
    w = torch.randn(4, 3, 3, 3)
    whole = weight_norm(w, method, per_filter=False)
    assert torch.allclose(whole, w / expect(w))
    per = weight_norm(w, method, per_filter=True)
    for i in range(4):
        assert torch.allclose(per[i], w[i] / expect(w[i]))
    assert weight_norm(w, None) is w
