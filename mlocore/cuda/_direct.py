"""Dense direct (Cholesky) solves on the device: ``mlocore.linalg.solve_direct`` with
``backend="cuda"`` and the implicit hypergradient ``method="direct"``.

The CPU reference (:func:`mlocore._kernels.linalg.direct_core`) step for step:

1. assemble the dense matrix A column by column from n operator products with the unit
   vectors ``e_j`` (for a hypergradient, n lower-level Hessian-vector products with direction
   ``(0, e_j)``), every column on the device;
2. take the symmetric part ``S = (A + A^T) / 2``; a non-finite entry gives info -1
   (breakdown), as the CPU (numba's Cholesky does not reject NaN);
3. factor ``S = L L^T`` by a right-looking, column-by-column Cholesky in one thread block
   (pivot, scale the column below it, rank-one update of the trailing lower triangle, one
   thread per row); a pivot that is not ``> 0`` means S is not positive definite: info -4
   (the CPU's LAPACK failure), x = 0;
4. forward and back substitution (column-oriented, in the same block);
5. the residual ``|b - A x|`` (dense product with the assembled, unsymmetrized A).

Info and residual come back in one counted read-back of the scalars array; no vector leaves
the device. Cost: n products, O(n^2) memory and O(n^3 / threads) time in one block: meant for
moderate n (the CPU's "dense reference" role), as on the CPU.

Kernels take float64 arrays, use explicit grids and never allocate, raise or call CPU code.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, int32

from .._kernels.linalg import INFO_BREAKDOWN, INFO_NOT_PD
from . import _linalg as dl
from ._device import Transfers

__all__ = ["direct_device", "solve_direct"]

_TPB = dl.THREADS_PER_BLOCK
_FLAG_OK = 0
_FLAG_NONFINITE = 1
_FLAG_NOT_PD = 2
_INFO_BREAKDOWN_F = float(INFO_BREAKDOWN)
_INFO_NOT_PD_F = float(INFO_NOT_PD)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
@cuda.jit
def _unit_kernel(e, j):
    """``e = e_j`` (the j-th unit vector)."""
    for i in range(cuda.grid(1), e.shape[0], cuda.gridsize(1)):
        if i == j:
            e[i] = 1.0
        else:
            e[i] = 0.0


@cuda.jit
def _store_column_kernel(H, col, j):
    """``H[:, j] = col``."""
    for i in range(cuda.grid(1), H.shape[0], cuda.gridsize(1)):
        H[i, j] = col[i]


@cuda.jit
def _symmetric_part_kernel(H, S):
    """``S = (H + H^T) / 2`` as the CPU computes it: ``0.5 * (H[i, j] + H[j, i])``."""
    n = H.shape[0]
    for idx in range(cuda.grid(1), n * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        S[i, j] = 0.5 * (H[i, j] + H[j, i])


@cuda.jit
def _cholesky_solve_kernel(S, b, x, scalars, info_slot):
    """One block: factor S (overwritten by L in its lower triangle), solve ``L L^T x = b``
    and write the info code (0, -1 non-finite S, -4 not positive definite) as a float in
    ``scalars[info_slot]``. On failure x = 0 (the CPU's result).

    Every thread of the block runs every ``syncthreads``: the branches around them depend
    only on the shared flag, read by all threads between two barriers.
    """
    flag = cuda.shared.array(1, int32)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = S.shape[0]
    if t == 0:
        flag[0] = _FLAG_OK
    cuda.syncthreads()
    for i in range(t, n, nt):
        for j in range(n):
            v = S[i, j]
            if math.isnan(v) or math.isinf(v):
                flag[0] = _FLAG_NONFINITE   # every writer writes the same value
    cuda.syncthreads()
    state = flag[0]
    cuda.syncthreads()                      # all have read before thread 0 writes again
    if state == _FLAG_OK:
        for j in range(n):
            if t == 0:
                d = S[j, j]
                if d > 0.0:
                    S[j, j] = math.sqrt(d)
                else:                       # also NaN: not positive definite
                    flag[0] = _FLAG_NOT_PD
            cuda.syncthreads()
            if flag[0] != _FLAG_OK:         # uniform: read by all after the barrier
                break
            ljj = S[j, j]
            for i in range(j + 1 + t, n, nt):
                S[i, j] = S[i, j] / ljj
            cuda.syncthreads()
            for i in range(j + 1 + t, n, nt):   # trailing update of row i (k = j+1..i)
                lij = S[i, j]
                for k in range(j + 1, i + 1):
                    S[i, k] -= lij * S[k, j]
            cuda.syncthreads()
        state = flag[0]                     # written before the last barrier passed
    if state == _FLAG_OK:
        for i in range(t, n, nt):
            x[i] = b[i]
        cuda.syncthreads()
        for j in range(n):                  # L y = b (y in x), the CPU's order of terms
            if t == 0:
                x[j] = x[j] / S[j, j]
            cuda.syncthreads()
            xj = x[j]
            for i in range(j + 1 + t, n, nt):
                x[i] -= S[i, j] * xj
            cuda.syncthreads()
        for jj in range(n):                 # L^T x = y
            j = n - 1 - jj
            if t == 0:
                x[j] = x[j] / S[j, j]
            cuda.syncthreads()
            xj = x[j]
            for i in range(t, j, nt):
                x[i] -= S[j, i] * xj
            cuda.syncthreads()
    else:
        for i in range(t, n, nt):
            x[i] = 0.0
    if t == 0:
        if state == _FLAG_OK:
            scalars[info_slot] = 0.0
        elif state == _FLAG_NONFINITE:
            scalars[info_slot] = _INFO_BREAKDOWN_F
        else:
            scalars[info_slot] = _INFO_NOT_PD_F


# ---------------------------------------------------------------------------------------
# The solve
# ---------------------------------------------------------------------------------------
def _matrix(n):
    return cuda.device_array((int(n), int(n)), dtype=np.float64)


def direct_device(matvec, b, counter=None, args=()):
    """Dense Cholesky solve of ``A x = b`` on the device, the CPU ``direct_core``.

    Parameters
    ----------
    matvec : callable or DeviceOperator
        ``matvec(p, out, *args)`` writing ``A p`` into ``out``; called n times, with the unit
        vectors, to assemble A.
    b : device array, shape (n,)
        Not modified.
    counter : Transfers
        Counts the one read-back (info and residual).

    Returns
    -------
    (x, info, nit, residual_norm, n_matvec)
        x a device vector (zeros on failure); info 0, -1 (non-finite A) or -4 (A not
        positive definite); nit 1; n_matvec n.
    """
    counter = Transfers() if counter is None else counter
    n = b.shape[0]
    op = dl.as_operator(matvec, n, args)
    start = op.n_matvec
    H = _matrix(n)
    e = dl.empty(n)
    col = dl.empty(n)
    grid = dl.grid_for(n)
    for j in range(n):
        _unit_kernel[grid, _TPB](e, j)
        op.apply(e, col)
        _store_column_kernel[grid, _TPB](H, col, j)
    S = _matrix(n)
    _symmetric_part_kernel[dl.grid_for(n * n), _TPB](H, S)
    x = dl.empty(n)
    scalars = dl.Scalars(counter)
    _cholesky_solve_kernel[1, _TPB](S, b, x, scalars.device, dl.S_AUX2)
    r = dl.empty(n)
    dl.dense_matvec(x, r, H)
    dl.axpy_into(r, b, -1.0, r)
    scalars.dot(r, r, dl.S_AUX)
    s = scalars.read()
    return x, int(s[dl.S_AUX2]), 1, math.sqrt(s[dl.S_AUX]), op.n_matvec - start


def solve_direct(A, b, *, args=(), full_output=False, output="numpy"):
    """:func:`mlocore.linalg.solve_direct` with ``backend="cuda"``: dense Cholesky on the
    device, assembling A by n products.

    Parameters
    ----------
    A : 2-D array (host or device) or callable
        A dense matrix (host: validated and copied once, counted) or a device callback
        ``matvec(p, out, *args)`` writing A p into the device array ``out``.
    b : array_like or device array, shape (n,)
    full_output : bool
        Also return an ``OptimizeResult`` (``nit`` 1, ``residual_norm``, ``n_matvec`` n,
        ``message``, ``transfers``).
    output : {"numpy", "device"}
        Type of x.

    Returns
    -------
    x, info (and the result with ``full_output``): info -4 when A is not positive definite,
    -1 when it has non-finite entries (x is then zero), as the CPU.
    """
    dl.check_output(output, "cuda")
    counter = Transfers()
    b = dl._device_vector("b", b, counter)
    op = dl.make_operator(A, args, b.shape[0], counter)
    x, info, nit, res, nmv = direct_device(op, b, counter)
    return dl._finish(x, info, nit, res, nmv, full_output, output, counter)


# ---------------------------------------------------------------------------------------
# The implicit hypergradient with the direct solve
# ---------------------------------------------------------------------------------------
