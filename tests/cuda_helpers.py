"""Shared by the CUDA test files: a dense SPD test matrix and a matrix-free device
operator (the tridiagonal matrix, as a device callback and densely for the reference)."""
import numpy as np
from numba import cuda

from mlocore.cuda import _linalg as dl


def spd(n, seed=0, shift=1.0):
    """``(A, b)``: ``A = M M^T / n + shift I`` (eigenvalues >= shift), b standard normal."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    return M @ M.T / n + shift * np.eye(n), rng.standard_normal(n)


@cuda.jit
def _tridiagonal_kernel(p, out, diag, off):
    n = p.shape[0]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        s = diag * p[i]
        if i > 0:
            s += off * p[i - 1]
        if i + 1 < n:
            s += off * p[i + 1]
        out[i] = s


def tridiagonal_matvec(p, out, diag, off):
    """A device callback: out = T p with T = tridiag(off, diag, off)."""
    _tridiagonal_kernel[dl.grid_for(p.shape[0]), dl.THREADS_PER_BLOCK](p, out, diag, off)


def tridiagonal(n, diag, off):
    """T densely (the reference)."""
    return diag * np.eye(n) + off * (np.eye(n, k=1) + np.eye(n, k=-1))
