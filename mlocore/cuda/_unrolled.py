"""Unrolled (iterative) differentiation, ITD, on the device ("one large problem" mode).

The CPU kernels :func:`mlocore._kernels.unrolled.itd_reverse` and
:func:`~mlocore._kernels.unrolled.itd_forward` step for step, on a
:class:`~mlocore.cuda._problem.DeviceBilevelProblem` (docs/mathematics.md section 2): T gradient
steps ``y_{t+1} = y_t - beta grad_y g(x, y_t)`` from ``y_0``, and the exact gradient of
``f(x, y_T(x))`` through the last K of them (``dy_{T-K}/dx := 0``; K = T by default). The
inner step beta defaults to ``1/L``, L the power-iteration estimate of ``lambda_max(H_yy)`` at
``(x, y_0)`` times the 1.05 safety factor (as on the CPU, so both modes use the same step).

Every vector stays on the device:

* reverse mode keeps the K differentiated iterates in one ``(K, dy)`` device array and runs
  the adjoint recursion ``h -= beta H_xy a``, ``v += beta a``, ``a -= beta H_yy a`` backwards,
  both products from the lower block oracles ``hvp_xy`` and ``hvp_yy`` when both are given,
  else from one lower joint Hessian-vector product with direction ``(0, a)``;
* forward mode carries ``Z_t = dy_t/dx`` as its transpose, a ``(dx, dy)`` device array (one
  contiguous row per column of Z), with dx joint products per step (directions
  ``(e_j, Z[:, j])``; always the joint ``hvp``, as on the CPU).

The inner steps call the lower ``grad_y`` block when given (the CPU kernels' choices).

Read-backs (counted in ``res.transfers``): the power iteration's estimate (one, unless the
step is given), one finiteness test of ``y_T`` and one of the gradient (each a dot product
with a zero vector: 0 when finite, NaN otherwise, immune to overflow), and the outputs.

Difference from the CPU: the CPU tests every iterate and stops at the first non-finite one;
here only ``y_T`` is tested (a non-finite entry stays non-finite under ``y - beta g``), so the
status is the same but, in that failure case, the remaining steps still run (and are counted
in ``oracle_calls``) and ``y`` is the last iterate rather than the first non-finite one.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .._kernels import lower as _low
from .._options import unrolled_steps
from .._results import HypergradResult, status_message
from . import _linalg as dl
from ._session import _HyyOperator, _Session, _host_x, _inputs, check_problem_backend

__all__ = ["unrolled_hypergrad", "unrolled_core", "UNROLLED_METHODS"]

UNROLLED_METHODS = ("itd-reverse", "itd-forward")


@cuda.jit
def _transpose_kernel(src, dst):
    """``dst = src^T`` for 2-D arrays, one entry per thread (grid-stride)."""
    rows, cols = src.shape
    for e in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        i = e // cols
        j = e - i * cols
        dst[j, i] = src[i, j]


def _matrix(rows, cols):
    """A zero float64 ``(rows, cols)`` device matrix (at least one row; no transfer)."""
    M = cuda.device_array((max(int(rows), 1), int(cols)), dtype=np.float64)
    dl.fill(M.reshape(M.shape[0] * M.shape[1]), 0.0)
    return M


def _transposed(M):
    out = cuda.device_array((M.shape[1], M.shape[0]), dtype=np.float64)
    _transpose_kernel[dl.grid_for(M.shape[0] * M.shape[1]), dl.THREADS_PER_BLOCK](M, out)
    return out


def _finite(sess, a, zeros) -> bool:
    """All entries of the device vector a finite? ``a . 0`` is 0 exactly when they are (NaN
    otherwise, whatever their size); one counted read-back."""
    sess.scalars.dot(a, zeros[:a.shape[0]], dl.S_AUX)
    return sess.scalars.read()[dl.S_AUX] == 0.0


def step_size(sess, z0, beta) -> float:
    """The inner step: beta when given (> 0), else ``1/L`` with ``L = 1.05 lambda_max(H_yy)``
    by power iteration at z0 (the CPU ``_step_size``); -1 when the estimate is not > 0 or not
    finite (indefinite lower level)."""
    if beta > 0.0:
        return beta
    lam, _ = dl.power_iteration_device(_HyyOperator(sess, z0), sess.dy, POWER_ITERS,
                                       counter=sess.counter)
    L = LIPSCHITZ_SAFETY * lam
    if not (L > 0.0) or not math.isfinite(L):
        return -1.0
    return 1.0 / L


def unrolled_core(sess, method, z0, T, K, beta):
    """ITD hypergradient from the joint device vector ``z0 = (x, y_0)`` (not modified).

    Parameters
    ----------
    sess : mlocore.cuda._implicit._Session
        Oracles, counters and sizes of this call.
    method : {"itd-reverse", "itd-forward"}
    z0 : device array, shape (dx + dy,)
    T, K : int
        Steps, and steps differentiated (``0 <= K <= T``, validated by the caller).
    beta : float
        Inner step; ``<= 0`` for the power-iteration default.

    Returns
    -------
    (grad, zT, aux, fun, status, beta)
        Device arrays ``grad`` (dx), ``zT`` (the joint vector ``(x, y_T)``) and ``aux`` (the
        reverse adjoint ``v = beta sum_t a_t``, shape (dy,); or the forward Jacobian
        ``Z_T^T = (dy_T/dx)^T``, shape (dx, dy)); ``fun`` is ``f(x, y_T)`` or NaN; status as
        the CPU kernels (0, NONFINITE, INDEFINITE).
    """
    dx, dy, n = sess.dx, sess.dy, sess.n
    zeros = dl.zeros(n)
    beta = step_size(sess, z0, beta)
    reverse = method == "itd-reverse"
    grad = dl.empty(dx)
    dl.fill(grad, np.nan)
    z = dl.empty(n)
    dl.copy(z0, z)               # x block fixed, y block = the iterate y_t
    aux = dl.zeros(dy) if reverse else _matrix(dx, dy)
    if beta <= 0.0:
        return grad, z, aux, math.nan, _low.INDEFINITE, beta
    y = z[dx:]
    first = T - K
    g = dl.empty(n)
    hv = dl.empty(n)
    w = dl.zeros(n)              # directions of the joint Hessian-vector products
    if reverse:
        Y = _matrix(K, dy)       # the differentiated iterates y_{T-K}..y_{T-1}
    else:
        Zt, Znew = aux, _matrix(dx, dy)
    for t in range(T):
        if t >= first:
            if reverse:
                dl.copy(y, Y[t - first])
            else:                # Z <- Z - beta (H_yx + H_yy Z), column by column
                for j in range(dx):
                    dl.fill(w[j:j + 1], 1.0)
                    dl.copy(Zt[j], w[dx:])
                    sess.lower.hvp(z, w, hv)
                    dl.fill(w[j:j + 1], 0.0)
                    dl.axpy_into(Znew[j], Zt[j], -beta, hv[dx:])
                Zt, Znew = Znew, Zt
        dl.axpy_into(y, y, -beta, sess.lower.grad_y(z, g))
    if not _finite(sess, y, zeros):
        return grad, z, dl.zeros(dy) if reverse else Zt, math.nan, _low.NONFINITE, beta
    gf = dl.empty(n)
    sess.upper.grad(z, gf)
    fun = sess.upper.value(z) if sess.upper.has_value else math.nan
    if reverse:
        dl.copy(gf[:dx], grad)   # h
        a = dl.empty(dy)         # the adjoint a_t
        dl.copy(gf[dx:], a)
        zs = dl.empty(n)
        dl.copy(z0[:dx], zs[:dx])
        hx, hy = hv[:dx], hv[dx:]
        for s in range(K - 1, -1, -1):
            dl.copy(Y[s], zs[dx:])
            sess.lower.cross_pair(zs, a, hx, hy)     # (H_xy a, H_yy a)
            dl.axpy_into(grad, grad, -beta, hx)
            dl.axpy_into(aux, aux, beta, a)
            dl.axpy_into(a, a, -beta, hy)
    else:
        aux = Zt
        zg = dl.empty(dx)
        dl.dense_matvec(gf[dx:], zg, Zt)          # Z^T grad_y f
        dl.axpy_into(grad, gf[:dx], 1.0, zg)
    status = _low.OK if _finite(sess, grad, zeros) else _low.NONFINITE
    return grad, z, aux, fun, status, beta


def unrolled_hypergrad(problem, x, y, method="itd-reverse", *, T=100, K=None, step=None,
                       backend=None, output="numpy"):
    """:func:`mlocore.hypergrad` with ``method="itd-reverse"`` or ``"itd-forward"`` for a
    :class:`~mlocore.cuda.DeviceBilevelProblem`, on the device (docs/mathematics.md section 2).

    Parameters
    ----------
    problem : DeviceBilevelProblem
        ``g(x, .)`` is assumed strongly convex and smooth near the iterates, so that
        ``0 < beta < 2/L`` makes the inner loop contract (not checked; a diverging loop ends
        with status 2, non-finite).
    x, y : ndarray or device array
        The upper point and the start ``y_0`` of the unrolled loop. Host arrays are validated
        and copied once each (counted); device arrays are used in place and never modified.
    method : {"itd-reverse", "itd-forward"}
        Reverse mode stores the last K iterates (device memory ``K dy``) and makes one lower
        cross product (``hvp_xy`` and ``hvp_yy``, or one joint HVP) per step back; forward
        mode carries ``dy_t/dx`` (memory ``2 dx dy``) and makes dx joint HVPs per
        differentiated step.
    T, K : int
        Inner gradient steps, and how many of the last ones are differentiated (default T).
    step : float, optional
        Inner step beta (default ``1/L`` by power iteration at (x, y)).
    output : {"numpy", "device"}
        Type of ``grad``, ``y``, ``v`` / ``jacobian`` (x is returned as given).

    Returns
    -------
    HypergradResult
        As the CPU: ``grad``, ``y`` (= y_T), ``v`` (reverse: ``beta sum_t a_t``, the adjoint
        the loop applies) or ``jacobian`` (forward: ``dy_T/dx``, shape (dy, dx)), ``fun``,
        ``status``, ``nit`` = ``lower_nit`` = T, ``K``, ``step``, ``oracle_calls``, plus
        ``transfers``.
    """
    check_problem_backend(problem, backend, "hypergrad")
    dl.check_output(output, "cuda")
    if method not in UNROLLED_METHODS:
        raise ValueError(f"method must be one of {UNROLLED_METHODS}, got {method!r}")
    if y is None:
        raise TypeError("hypergrad(problem, x, y): y, the lower-level start, is required")
    T, K, beta = unrolled_steps(T, K, step)
    sess = _Session(problem)
    xd, yd = _inputs(sess, x, y, "y")
    z0 = sess.joint(xd, yd)
    sess.check_once(z0)
    grad, zT, aux, fun, status, beta_used = unrolled_core(sess, method, z0, T, K, beta)
    reverse = method == "itd-reverse"
    if not reverse:
        aux = _transposed(aux)
    aux = sess.to_output(aux, output)
    out = HypergradResult(
        grad=sess.to_output(grad, output), x=_host_x(x, xd),
        y=sess.to_output(zT[sess.dx:], output), v=aux if reverse else None,
        jacobian=None if reverse else aux, fun=fun, method=method, success=status == 0,
        status=int(status),
        message=status_message(status, f"Unrolled T={T} steps (K={K}) with step "
                                       f"{beta_used:.3e}."),
        nit=T, K=K, step=beta_used, lower_nit=T, lower_grad_norm=np.nan)
    return sess.finish(out)
