"""Matrix-free linear-solver kernels (CPU, njit).

Every solver takes an operator tuple ``op`` and computes products as ``apply_op(op, p)``
(see :mod:`.operators`); through ``.py_func`` the same code runs interpreted with a Python
product (scipy ``LinearOperator``s) and a Python per-iteration ``callback``.

Info codes follow ``scipy.sparse.linalg.cg``: 0 converged, ``> 0`` the iteration count when
``maxiter`` was reached, ``< 0`` a failure (see ``INFO_*``).
"""
import numpy as np
from numba import njit

from .operators import apply_op, apply_precond, notify

INFO_BREAKDOWN = -1          #: p^T A p == 0 or a non-finite value: cannot go on
INFO_NEGATIVE_CURVATURE = -2  #: p^T A p < 0: the operator is not positive definite
INFO_DIVERGED = -3           #: Neumann/Richardson residual grew: step eta too large
INFO_NOT_PD = -4             #: Cholesky failed: the operator is not positive definite



@njit(cache=True)
def cg_core(op, b, x0, rtol, atol, maxiter, M, callback):
    """Preconditioned conjugate gradient for SPD A (slides, Algorithm 7).

    ``M`` approximates ``A^{-1}``: ``()`` none, ``(d,)`` diagonal, ``(P,)`` dense (see
    :func:`.operators.apply_precond`).

    Returns ``(x, info, nit, residual_norm, n_matvec)``. Curvature ``p^T A p <= 0`` stops
    the iteration with ``INFO_NEGATIVE_CURVATURE`` (or ``INFO_BREAKDOWN`` when zero or not
    finite) instead of dividing by it; x is then the last iterate.
    """
    x = x0.copy()
    nmv = 0
    if np.any(x0 != 0.0):
        r = b - apply_op(op, x)
        nmv += 1
    else:
        r = b.copy()
    bnorm = np.sqrt(b @ b)
    tol = max(rtol * bnorm, atol)
    rnorm = np.sqrt(r @ r)
    if not np.isfinite(rnorm):
        return x, INFO_BREAKDOWN, 0, rnorm, nmv
    if rnorm <= tol:
        return x, 0, 0, rnorm, nmv
    zv = apply_precond(M, r)
    rz = r @ zv
    if not (rz > 0.0):
        return x, INFO_BREAKDOWN, 0, rnorm, nmv
    p = zv.copy()
    for k in range(maxiter):
        Ap = apply_op(op, p)
        nmv += 1
        pAp = p @ Ap
        if not np.isfinite(pAp):
            return x, INFO_BREAKDOWN, k, rnorm, nmv
        if pAp <= 0.0:
            if pAp < 0.0:
                return x, INFO_NEGATIVE_CURVATURE, k, rnorm, nmv
            return x, INFO_BREAKDOWN, k, rnorm, nmv
        alpha = rz / pAp
        x += alpha * p
        r -= alpha * Ap
        rnorm = np.sqrt(r @ r)
        notify(callback, x)
        if rnorm <= tol:
            return x, 0, k + 1, rnorm, nmv
        zv = apply_precond(M, r)
        rz_new = r @ zv
        if not (rz_new > 0.0):
            return x, INFO_BREAKDOWN, k + 1, rnorm, nmv
        p = zv + (rz_new / rz) * p
        rz = rz_new
    return x, max(maxiter, 1), maxiter, rnorm, nmv


@njit(cache=True)
def neumann_core(op, b, x0, eta, rtol, atol, maxiter, callback):
    """Truncated Neumann series ``eta * sum_q (I - eta A)^q b`` as Richardson iteration.

    From ``x0 = 0``, k iterations give exactly the series truncated after k terms; a nonzero
    ``x0`` warm-starts it. Requires ``0 < eta < 2 / lambda_max(A)`` (``eta <= 1/L`` is the
    usual choice). Returns ``(x, info, nit, residual_norm, n_matvec)``.
    """
    x = x0.copy()
    nmv = 0
    if np.any(x0 != 0.0):
        r = b - apply_op(op, x)
        nmv += 1
    else:
        r = b.copy()
    bnorm = np.sqrt(b @ b)
    tol = max(rtol * bnorm, atol)
    rnorm = np.sqrt(r @ r)
    r0 = max(rnorm, bnorm)
    for k in range(maxiter):
        if rnorm <= tol:
            return x, 0, k, rnorm, nmv
        Ar = apply_op(op, r)
        nmv += 1
        x += eta * r
        r -= eta * Ar
        rnorm = np.sqrt(r @ r)
        notify(callback, x)
        if not np.isfinite(rnorm) or rnorm > 1e4 * r0:
            return x, INFO_DIVERGED, k + 1, rnorm, nmv
    if rnorm <= tol:
        return x, 0, maxiter, rnorm, nmv
    return x, max(maxiter, 1), maxiter, rnorm, nmv


@njit(cache=True)
def power_iteration(op, n, iters):
    """Rayleigh-quotient estimate of the largest eigenvalue of a symmetric PSD operator.

    Deterministic start vector, so two calls on the same operator agree bit for bit
    (forward and reverse ITD then use the same step). Returns ``(estimate, n_matvec)``;
    the estimate approaches lambda_max from below.
    """
    v = np.empty(n)
    for i in range(n):  # a fixed low-discrepancy start: no simple pattern (constant,
        # alternating, periodic) can be orthogonal to it
        t = i * 0.6180339887498949 + 0.3183098861837907
        v[i] = t - np.floor(t) - 0.5 + 1e-3
    v /= np.sqrt(v @ v)
    lam = 0.0
    for _ in range(iters):
        w = apply_op(op, v)
        lam = v @ w
        nw = np.sqrt(w @ w)
        if nw == 0.0 or not np.isfinite(nw):
            return lam, _ + 1
        v = w / nw
    return lam, iters


@njit(cache=True)
def dense_from_matvec(op, n):
    """The n x n matrix of a linear operator, column by column (n products)."""
    A = np.empty((n, n))
    e = np.zeros(n)
    for j in range(n):
        e[j] = 1.0
        A[:, j] = apply_op(op, e)
        e[j] = 0.0
    return A


@njit(cache=True)
def cholesky_solve(A, b):
    """Solve SPD ``A x = b`` by Cholesky on the symmetric part. Returns ``(x, info)``."""
    S = 0.5 * (A + A.T)
    n = b.shape[0]
    for v in S.ravel():  # numba's Cholesky does not reject NaN
        if not np.isfinite(v):
            return np.zeros(n), INFO_BREAKDOWN
    try:
        L = np.linalg.cholesky(S)
    except Exception:  # numba raises LinAlgError for a matrix that is not PD
        return np.zeros(n), INFO_NOT_PD
    y = np.empty(n)
    for i in range(n):  # forward substitution L y = b
        s = b[i]
        for k in range(i):
            s -= L[i, k] * y[k]
        y[i] = s / L[i, i]
    x = np.empty(n)
    for i in range(n - 1, -1, -1):  # back substitution L^T x = y
        s = y[i]
        for k in range(i + 1, n):
            s -= L[k, i] * x[k]
        x[i] = s / L[i, i]
    return x, 0


@njit(cache=True)
def direct_core(op, b):
    """Dense reference solve: assemble A by n products, then Cholesky.

    Returns ``(x, info, nit, residual_norm, n_matvec)`` like the iterative solvers.
    """
    n = b.shape[0]
    A = dense_from_matvec(op, n)
    x, info = cholesky_solve(A, b)
    r = b - A @ x
    return x, info, 1, np.sqrt(r @ r), n


@njit(cache=True)
def lbfgs_two_loop(S, Y, count, newest, grad, free, every, eps2):
    """The L-BFGS two-loop recursion (Nocedal & Wright 2006, Algorithm 7.4) on the
    components where ``free`` (all of them if ``every``), over the curvature pairs held in
    the ring buffers ``S``, ``Y`` (rows; ``count`` pairs, the newest in row ``newest``).
    A pair restricted to the free components is used only if ``s^T y > 0`` and
    ``(s^T y)^2 > eps2 |s|^2 |y|^2``; the initial matrix is ``s^T y / y^T y`` of the newest
    pair used.

    Returns ``(r, scale)``: ``r`` approximates ``H^{-1} grad`` on the free components (zero
    on the others) and ``scale`` is the initial matrix, or -1.0 with no usable pair.
    """
    m, n = S.shape
    q = np.empty(n)
    for j in range(n):
        q[j] = grad[j] if every or free[j] else 0.0
    alpha = np.zeros(m)
    rho = np.zeros(m)
    scale = -1.0
    for k in range(count):  # newest first
        i = (newest - k) % m
        sy = 0.0
        ss = 0.0
        yy = 0.0
        for j in range(n):
            if every or free[j]:
                sy += S[i, j] * Y[i, j]
                ss += S[i, j] * S[i, j]
                yy += Y[i, j] * Y[i, j]
        if not (sy > 0.0 and sy * sy > eps2 * ss * yy):
            continue
        if scale < 0.0:
            scale = sy / yy
        rho[i] = 1.0 / sy
        a = 0.0
        for j in range(n):
            if every or free[j]:
                a += S[i, j] * q[j]
        a *= rho[i]
        alpha[i] = a
        for j in range(n):
            if every or free[j]:
                q[j] -= a * Y[i, j]
    if scale < 0.0:
        return q, scale
    for j in range(n):
        q[j] *= scale
    for k in range(count - 1, -1, -1):  # oldest first
        i = (newest - k) % m
        if rho[i] == 0.0:
            continue
        b = 0.0
        for j in range(n):
            if every or free[j]:
                b += Y[i, j] * q[j]
        c = alpha[i] - rho[i] * b
        for j in range(n):
            if every or free[j]:
                q[j] += c * S[i, j]
    return q, scale
