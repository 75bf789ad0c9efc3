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

from .._kernels import implicit as _imp
from .._kernels import lower as _low
from .._kernels.linalg import INFO_BREAKDOWN, INFO_NOT_PD
from .._results import (HypergradResult, counts_dict, linear_info_message, status_message)
from .._validation import check_int, check_positive
from . import _linalg as dl
from ._device import Transfers, to_device

__all__ = ["direct_device", "solve_direct", "direct_hypergrad", "implicit_direct"]

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
def implicit_direct(sess, x, xd, z, v0, solve_lower_flag, lower, output):
    """The CPU ``implicit_hypergrad`` kernel with ``solver=DIRECT`` on the device (the device
    ``_implicit`` with a dense Cholesky solve of ``H_yy v = grad_y f``): same statuses,
    messages and result fields. ``v0`` (device or None) is only returned when the lower
    solve fails, as on the CPU."""
    from ._implicit import _HyyOperator, _host_x, lower_core
    dx, dy, n = sess.dx, sess.dy, sess.n
    lower_nit, lower_gnorm, lower_status = 0, math.nan, _low.OK
    if solve_lower_flag:
        z, lower_status, lower_nit, lower_gnorm, _ = lower_core(sess, z, *lower)
    grad = dl.empty(dx)
    dl.fill(grad, np.nan)
    v = v0
    fun, info, nit, res = math.nan, 0, 0, math.nan
    status = lower_status
    if lower_status in (_low.OK, _low.MAXITER):  # maxiter still gives a (less exact) answer
        gf = dl.empty(n)
        sess.upper.grad(z, gf)
        if sess.upper.has_value:
            fun = sess.upper.value(z)
        op = _HyyOperator(sess, z)
        v, info, nit, res, _ = direct_device(op, gf[dx:], sess.counter)
        dl.copy(v, op.w[dx:])               # direction (0, v): x block of w is zero
        sess.lower.hvp(z, op.w, op.h)       # (H_xy v, H_yy v)
        dl.axpy_into(grad, gf[:dx], -1.0, op.h[:dx])
        if info != 0:
            status = _imp.LINEAR_FAILED
        else:
            sess.scalars.abs_sum(grad, dl.S_AUX)
            if not math.isfinite(sess.scalars.read()[dl.S_AUX]):
                status = _imp.NONFINITE_RESULT
    if v is None:
        v = dl.zeros(dy)
    detail = ""
    if solve_lower_flag:
        detail = f"Lower level: |grad_y g| = {lower_gnorm:.3e} after {lower_nit} iterations."
    if status == _imp.LINEAR_FAILED:
        detail += f" Linear solve (direct): {linear_info_message(info)}, residual {res:.3e}."
    out = HypergradResult(
        grad=sess.to_output(grad, output), x=_host_x(x, xd),
        y=sess.to_output(z[dx:], output), v=sess.to_output(v, output), fun=fun,
        method="direct", success=status == 0, status=int(status),
        message=status_message(status, detail), nit=int(nit), lin_info=int(info),
        lin_residual=float(res), lower_nit=int(lower_nit), lower_grad_norm=float(lower_gnorm),
        lower_status=int(lower_status), eta=None)
    calls = counts_dict(sess.counts)
    out.oracle_calls = calls
    out.ngrad = calls["upper_grad"] + calls["lower_grad"]
    out.nhvp = calls["upper_hvp"] + calls["lower_hvp"]
    out.transfers = sess.counter.as_dict()
    return out


def direct_hypergrad(problem, x, y=None, *, tol=1e-10, atol=0.0, maxiter=None, v0=None,
                     eta=None, lower_solved=False, lower_method="newton-cg", lower_tol=None,
                     lower_maxiter=None, lower_step=None, output="numpy", **unused):
    """``hypergrad(device_problem, x, y, method="direct")``: the implicit hypergradient with
    ``H_yy v = grad_y f`` solved by a dense Cholesky on the device (:func:`direct_device`;
    H_yy assembled from dy lower Hessian-vector products). Options and result as the CPU
    (``tol``, ``atol``, ``maxiter`` and ``v0`` are accepted and unused by the solve, as
    there; ``tol`` sets the default ``lower_tol = min(tol, 1e-10)``), plus ``transfers``.
    Called by :func:`mlocore.cuda._implicit.hypergrad` after its backend check."""
    from ._implicit import _Session, _inputs, _lower_options
    given = [k for k, v in unused.items() if v is not None and not (k == "T" and v == 100)]
    if given:
        raise TypeError(f"options {', '.join(sorted(given))} do not apply to method="
                        "'direct' (unrolled methods only)")
    if eta is not None:
        raise TypeError("option eta does not apply to method='direct'")
    if y is None:
        raise TypeError("hypergrad(problem, x, y): y, the lower-level start, is required")
    tol = check_positive("tol", tol, allow_zero=True)
    check_positive("atol", atol, allow_zero=True)
    lower = _lower_options(lower_method, min(tol, 1e-10) if lower_tol is None else lower_tol,
                           1000 if lower_maxiter is None else lower_maxiter, lower_step)
    if maxiter is not None:
        check_int("maxiter", maxiter, 0)
    sess = _Session(problem)
    xd, yd = _inputs(sess, x, y, "y")
    v0d = None if v0 is None else to_device("v0", v0, sess.counter, problem.dy)
    z = sess.joint(xd, yd)
    sess.check_once(z)
    return implicit_direct(sess, x, xd, z, v0d, not lower_solved, lower, output)
