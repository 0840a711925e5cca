"""Frequent Directions and the weight-norm options: pure tensor math.

Frequent Directions (Liberty 2013; Ghashami et al. 2016) streams the rows of A (n x d)
through a buffer of 2l rows. When the buffer is full it is decomposed, the (l+1)-th
squared singular value is subtracted from every squared singular value, and the l rows
that stay non-zero are kept; at the end one last shrink leaves exactly l rows. The
result B satisfies ||A^T A - B^T B||_2 <= ||A - A_k||_F^2 / (l - k) for every k < l.

The decomposition of a short, wide buffer goes through its Gram matrix (2l x 2l):
``eigh`` of B B^T is far cheaper than an SVD of B when d >> l.

:func:`released_fd` is the variant of the released FilterSketch code, for users who
want the paper's exact procedure: an l-row buffer shrunk by the squared singular value
at index l // 2, no final shrink, and the last rows skipped once fewer than l // 2 are
left when the buffer is full (so about half the output rows are raw input rows).
"""

from __future__ import annotations

import torch

from sketch_core.errors import UserError
from sketch_core.options import WEIGHT_NORMS

__all__ = ["frequent_directions", "released_fd", "row_space_energy", "weight_norm"]



def _shrink(buf: torch.Tensor, rows: int) -> torch.Tensor:
    """Decompose ``buf`` and keep ``rows`` shrunken directions (rows x d)."""
    gram = buf @ buf.T
    evals, evecs = torch.linalg.eigh(gram)            # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    delta = evals[rows] if evals.numel() > rows else evals.new_zeros(())
    keep = evals[:rows]
    # rows of Sigma V^T are U^T B; scale each by sqrt(sigma^2 - delta) / sigma
    scale = torch.where(keep > 0, torch.sqrt((keep - delta).clamp_min(0) / keep.clamp_min(1e-300)),
                        torch.zeros_like(keep))
    return (evecs[:, :rows].T @ buf) * scale[:, None]


def frequent_directions(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """A sketch of ``matrix`` (n x d) with ``rows`` rows such that B^T B ~ A^T A.

    Computed in float64 on the matrix's device; returned in the matrix's dtype.
    """
    if matrix.dim() != 2:
        raise ValueError(f"frequent_directions takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    if rows < 1:
        raise ValueError(f"a sketch needs at least one row, got {rows}")
    a = matrix.detach().to(torch.float64)
    n, d = a.shape
    buf = a.new_zeros(2 * rows, d)
    filled, i = 0, 0
    while i < n:
        take = min(2 * rows - filled, n - i)
        buf[filled:filled + take] = a[i:i + take]
        filled, i = filled + take, i + take
        if filled == 2 * rows:
            buf[:rows] = _shrink(buf, rows)
            buf[rows:] = 0
            filled = rows
    out = _shrink(buf[:max(filled, 1)], rows) if filled > rows else buf[:rows]
    if out.shape[0] < rows:  # fewer non-zero rows than asked: pad with zero rows
        out = torch.cat([out, out.new_zeros(rows - out.shape[0], d)])
    return out.to(matrix.dtype)



def released_fd(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """The released FilterSketch code's Frequent Directions: ``rows`` rows, float64 inside.

    The rows of ``matrix`` fill an l-row buffer (l = ``rows``). When a row arrives at a
    full buffer: if fewer than l // 2 rows (this one included) are left, they are all
    skipped; otherwise the buffer is replaced by its shrunken directions, each squared
    singular value minus the one at index l // 2 (0-based, clamped at 0), which leaves
    rows l // 2 onward zero, and the row is written at index l // 2. The buffer is
    returned as it stands, without a last shrink. Where the released code's SVD would
    fail (a buffer wider than it is long: d < l), the missing singular values count as 0.
    """
    if matrix.dim() != 2:
        raise ValueError(f"released_fd takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    if rows < 1:
        raise ValueError(f"a sketch needs at least one row, got {rows}")
    a = matrix.detach().to(torch.float64)
    n, d = a.shape
    half = rows // 2
    buf = a.new_zeros(rows, d)
    filled = 0
    for i in range(n):
        if filled == rows:
            if n - i < half:
                break
            _, sigma, vh = torch.linalg.svd(buf, full_matrices=False)
            sq = sigma.pow(2)
            theta = sq[half] if half < sq.numel() else sq.new_zeros(())
            shrunk = torch.sqrt((sq - theta).clamp_min(0))
            buf = buf.new_zeros(rows, d)
            k = shrunk.numel()
            buf[:k] = shrunk[:, None] * vh
            filled = half
        buf[filled] = a[i]
        filled += 1
    return buf.to(matrix.dtype)

def row_space_energy(matrix: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row of ``matrix`` projected onto the row space of ``sketch``."""
    a = matrix.detach().to(torch.float64)
    b = sketch.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh(b @ b.T)
    tol = evals.max().clamp_min(0) * 1e-10
    keep = evals > tol
    if not bool(keep.any()):
        return a.pow(2).sum(1)
    basis = (evecs[:, keep].T @ b) / evals[keep].sqrt()[:, None]   # orthonormal rows
    return (a @ basis.T).pow(2).sum(1)


def weight_norm(weight: torch.Tensor, method: str | None, per_filter: bool = False) -> torch.Tensor:
    """Rescale sketched filters as the original does; ``per_filter`` is --filter_norm."""
    if method in (None, "", "none", "None"):
        return weight
    if method not in WEIGHT_NORMS:
        raise UserError(f"unknown --weight_norm_method {method!r}; valid: {', '.join(WEIGHT_NORMS)}")
    w = weight.reshape(weight.shape[0], -1) if per_filter else weight.reshape(1, -1)
    a = w.abs()
    denom = {
        "max": a.amax(1),
        "sum": a.sum(1),
        "l2": w.pow(2).sum(1).sqrt(),
        "l1": a.sum(1).sqrt(),
        "l2_2": w.pow(2).sum(1),
        "2max": 2 * a.amax(1),
    }[method].clamp_min(1e-12)
    return (w / denom[:, None]).reshape(weight.shape)
