"""Unrolled (iterative) differentiation kernels, ITD (docs/mathematics.md section 2).

Inner loop ``y_t = y_{t-1} - beta grad_y g(x, y_{t-1})``, ``t = 1..T``, ``dy_0/dx = 0``;
the returned gradient is the exact gradient of ``f(x, y_T(x))``. Truncation to the last K
steps drops the dependence through the first ``T - K`` steps (``dy_{T-K}/dx := 0``), in both
modes, so forward and reverse agree to round-off for every K.
"""
import numpy as np
from numba import njit

from .lower import INDEFINITE, NONFINITE, OK, lower_grad_y, lower_lipschitz
from .oracles import (LOWER_GRAD, LOWER_HVP, UPPER_GRAD, UPPER_VALUE, all_finite, grad_of,
                      hvp_of, joint, lower_cross_pair, value_of)


@njit(cache=True)
def _step_size(lfns, largs, lflags, x, y0, beta, counts):
    if beta > 0.0:
        return beta
    L = lower_lipschitz(lfns, largs, lflags, x, y0, counts)
    if not (L > 0.0) or not np.isfinite(L):
        return -1.0
    return 1.0 / L


@njit(cache=True)
def _unroll_store(lfns, largs, lflags, x, y0, T, K, beta, counts):
    """T gradient steps from y0, keeping the last K iterates y_{T-K}..y_{T-1}.

    Returns ``(Y, y_T, ok)``; ok is False when an iterate became non-finite.
    """
    dy = y0.shape[0]
    first = T - K
    Y = np.empty((K, dy))
    y = y0.copy()
    for t in range(T):
        if t >= first:
            Y[t - first] = y
        g = lower_grad_y(lfns, largs, lflags, x, y, counts)
        y = y - beta * g
        if not all_finite(y):
            return Y, y, False
    return Y, y, True


@njit(cache=True)
def _unroll_reverse(lfns, largs, lflags, x, Y, beta, a, h, counts):
    """Reverse pass: adds ``a_T^T d y_T / d x`` to h through the stored steps.

    Returns ``(h, v)`` with ``v = beta * sum_t a_t``.
    """
    dx = x.shape[0]
    dy = a.shape[0]
    a = a.copy()
    v = np.zeros(dy)
    for s in range(Y.shape[0] - 1, -1, -1):
        zt = joint(x, Y[s])
        hx, hy = lower_cross_pair(a, lfns, largs, lflags, zt, dx, counts)
        h -= beta * hx
        v += beta * a
        a = a - beta * hy
    return h, v


@njit(cache=True)
def itd_reverse(ufns, uargs, u_has_value, lfns, largs, lflags, x, y0, T, K, beta, counts):
    """Reverse mode: stores the last K iterates (memory O(K dy)), one HVP per step back.

    Returns ``(grad, y_T, v, fun, status, beta)``; ``v = beta * sum_t a_t`` is the adjoint
    that the unrolled loop implicitly applies (it tends to H_yy^{-1} grad_y f as T grows).
    """
    dx = x.shape[0]
    dy = y0.shape[0]
    beta = _step_size(lfns, largs, lflags, x, y0, beta, counts)
    if beta <= 0.0:
        return np.full(dx, np.nan), y0.copy(), np.zeros(dy), np.nan, INDEFINITE, beta
    Y, y, ok = _unroll_store(lfns, largs, lflags, x, y0, T, K, beta, counts)
    if not ok:
        return np.full(dx, np.nan), y, np.zeros(dy), np.nan, NONFINITE, beta
    z = joint(x, y)
    gf = grad_of(ufns, uargs, z, counts, UPPER_GRAD)
    fun = value_of(ufns, uargs, z, counts, UPPER_VALUE) if u_has_value else np.nan
    h, v = _unroll_reverse(lfns, largs, lflags, x, Y, beta, gf[dx:].copy(),
                           gf[:dx].copy(), counts)
    status = OK if all_finite(h) else NONFINITE
    return h, y, v, fun, status, beta


@njit(cache=True)
def unrolled_vjp(lfns, largs, lflags, x, y0, T, beta, w, counts):
    """``w^T d y_T / d x`` for T gradient steps from a fixed y0 (the innermost level of the
    n-level unrolled baseline). Returns ``(y_T, vjp, ok)``."""
    Y, y, ok = _unroll_store(lfns, largs, lflags, x, y0, T, T, beta, counts)
    if not ok:
        return y, np.full(x.shape[0], np.nan), False
    h, _ = _unroll_reverse(lfns, largs, lflags, x, Y, beta, w, np.zeros(x.shape[0]),
                           counts)
    return y, h, True


@njit(cache=True)
def itd_forward(ufns, uargs, u_has_value, lfns, largs, lflags, x, y0, T, K, beta, counts):
    """Forward mode: carries Z_t = dy_t/dx (dy x dx), dx HVPs per step, no stored iterates.

    Column j of ``A_t Z + B_t`` is the y-block of one joint HVP with direction (e_j, Z[:, j])
    (always the joint ``hvp``: the block ``H_yx e_j`` is not one of the block callbacks).
    Returns ``(grad, y_T, Z_T, fun, status, beta)``.
    """
    dx = x.shape[0]
    dy = y0.shape[0]
    beta = _step_size(lfns, largs, lflags, x, y0, beta, counts)
    Z = np.zeros((dy, dx))
    if beta <= 0.0:
        return np.full(dx, np.nan), y0.copy(), Z, np.nan, INDEFINITE, beta
    first = T - K
    y = y0.copy()
    w = np.zeros(dx + dy)
    Znew = np.empty((dy, dx))
    for t in range(T):
        z = joint(x, y)
        if t >= first:
            for j in range(dx):
                w[:dx] = 0.0
                w[j] = 1.0
                w[dx:] = Z[:, j]
                hv = hvp_of(lfns, largs, lflags, z, w, counts, LOWER_HVP, LOWER_GRAD)
                Znew[:, j] = Z[:, j] - beta * hv[dx:]
            Z[:, :] = Znew
        g = lower_grad_y(lfns, largs, lflags, x, y, counts)
        y = y - beta * g
        if not all_finite(y):
            return np.full(dx, np.nan), y, Z, np.nan, NONFINITE, beta
    z = joint(x, y)
    gf = grad_of(ufns, uargs, z, counts, UPPER_GRAD)
    fun = value_of(ufns, uargs, z, counts, UPPER_VALUE) if u_has_value else np.nan
    grad = gf[:dx] + Z.T @ gf[dx:]
    status = OK if all_finite(grad) else NONFINITE
    return grad, y, Z, fun, status, beta
