"""Lower-level solve and implicit hypergradient on the device ("one large problem" mode).

The same algorithms, options, status codes and results as the CPU entry points
(:func:`mlocore.solve_lower`, :func:`mlocore.hypergrad`; kernels in
:mod:`mlocore._kernels.lower` and :mod:`mlocore._kernels.implicit`), on a
:class:`~mlocore.cuda._problem.DeviceBilevelProblem`. Every vector stays on the device: the
host only reads back the scalars each stopping test needs (counted in ``res.transfers``)
and, with ``output="numpy"`` (the default), the results at the end.

Hypergradient (docs/mathematics.md section 1): ``grad F = grad_x f - H_xy v`` with
``H_yy v = grad_y f`` at ``(x, y*(x))``; ``H_yy p`` and ``H_xy v`` are the lower block
oracles ``hvp_yy`` / ``hvp_xy`` when given, else blocks of the lower objective's joint
Hessian-vector product with direction ``(0, p)``; the lower solvers call ``grad_y`` when
given (the CPU kernels' choices, so oracle counts agree call for call).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import OptimizeResult

from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .._kernels import implicit as _imp
from .._kernels import lower as _low
from .._kernels.linalg import INFO_BREAKDOWN, INFO_NEGATIVE_CURVATURE
from .._results import counts_dict, implicit_result, status_message
from .._options import LowerOptions, hypergrad_options
from . import _linalg as dl
from ._device import to_device
from ._direct import direct_device
from ._session import (_HyyOperator, _Session, _host_x, _inputs, check_problem_backend)
from ._unrolled import unrolled_hypergrad

__all__ = ["solve_lower", "hypergrad"]


def _lower_gradient(sess, z, g_joint):
    """``grad_y g`` at z into ``g_joint[dx:]`` (the ``grad_y`` block when given); returns
    ``(view, norm)``."""
    g = sess.lower.grad_y(z, g_joint)
    return g, sess.norm(g)


def lower_core(sess, z, method, tol, maxiter, step):
    """Minimize g(x, .) from the y block of the joint device vector z (x block fixed); the
    CPU ``solve_lower_kernel`` step for step (stopping rule ``|grad_y g| <= max(tol,
    1e-13 |grad_y g(y0)|)``).

    Returns ``(z, status, nit, grad_norm, step)`` with z a joint vector holding the solution
    (z itself, or a work vector: the input is never modified).
    """
    dx, dy, n = sess.dx, sess.dy, sess.n
    z = _copy_joint(z, n)
    gbuf = dl.empty(n)
    g, gnorm = _lower_gradient(sess, z, gbuf)
    if not math.isfinite(gnorm):
        return z, _low.NONFINITE, 0, gnorm, step
    tol = max(tol, _low.ROUNDOFF_FLOOR * gnorm)
    if gnorm <= tol:
        return z, _low.OK, 0, gnorm, step
    if method != "newton-cg" and step <= 0.0:
        lam, _ = dl.power_iteration_device(_HyyOperator(sess, z), dy, POWER_ITERS,
                                           counter=sess.counter)
        L = LIPSCHITZ_SAFETY * lam
        if not (L > 0.0) or not math.isfinite(L):
            return z, _low.INDEFINITE, 0, gnorm, step
        step = 1.0 / L
    y = z[dx:]
    if method == "gd":
        for k in range(maxiter):
            dl.axpy_into(y, y, -step, g)
            g, gnorm = _lower_gradient(sess, z, gbuf)
            if not math.isfinite(gnorm):
                return z, _low.NONFINITE, k + 1, gnorm, step
            if gnorm <= tol:
                return z, _low.OK, k + 1, gnorm, step
        return z, _low.MAXITER, maxiter, gnorm, step
    if method == "agd":
        return _agd(sess, z, g, gbuf, tol, maxiter, step)
    return _newton_cg(sess, z, g, gnorm, gbuf, tol, maxiter, step)


def _copy_joint(z, n):
    out = dl.empty(n)
    dl.copy(z, out)
    return out


def _agd(sess, z, g, gbuf, tol, maxiter, step):
    """Nesterov's method with gradient-based adaptive restart (O'Donoghue & Candes 2015), as
    the CPU kernel: two read-backs per iteration (the restart test and ``|grad|``)."""
    dx, dy = sess.dx, sess.dy
    y = dl.empty(dy)
    dl.copy(z[dx:], y)
    zw = z                     # the extrapolated point w lives in zw[dx:]
    w = zw[dx:]
    y_new = dl.empty(dy)
    direction = dl.empty(dy)
    gw = g
    mom = 0
    gnorm = math.nan
    for k in range(maxiter):
        dl.axpy_into(y_new, w, -step, gw)
        mom += 1
        dl.axpy_into(direction, y_new, -1.0, y)
        sess.scalars.dot(gw, direction, dl.S_AUX)
        if sess.scalars.read()[dl.S_AUX] > 0.0:  # momentum points uphill: restart
            mom = 0
        dl.axpy_into(w, y_new, mom / (mom + 3.0), direction)
        y, y_new = y_new, y
        gw, gnorm = _lower_gradient(sess, zw, gbuf)
        if not math.isfinite(gnorm):
            return zw, _low.NONFINITE, k + 1, gnorm, step
        if gnorm <= tol:
            return zw, _low.OK, k + 1, gnorm, step
    return zw, _low.MAXITER, maxiter, gnorm, step


def _newton_cg(sess, z, g, gnorm, gbuf, tol, maxiter, step):
    """Newton-CG with a backtracking search on ``|grad_y g|`` (the CPU kernel's merit)."""
    dx, dy, n = sess.dx, sess.dy, sess.n
    z_try = _copy_joint(z, n)  # x block set once; the y block is overwritten per trial
    g_try_buf = dl.empty(n)
    neg_g = dl.empty(dy)
    budget = _low.newton_cg_budget(dy)
    for k in range(maxiter):
        forcing = min(0.5, math.sqrt(gnorm))
        dl.scale_into(neg_g, -1.0, g)
        d, info, _, _, _ = dl.cg_device(_HyyOperator(sess, z), neg_g, None, forcing, 0.0,
                                        budget, counter=sess.counter)
        if info == INFO_NEGATIVE_CURVATURE:
            return z, _low.INDEFINITE, k, gnorm, step
        if info == INFO_BREAKDOWN:
            sess.scalars.abs_sum(d, dl.S_AUX)
            if sess.scalars.read()[dl.S_AUX] == 0.0:
                d = neg_g  # zero curvature along g: fall back to steepest descent
        t = 1.0
        accepted = False
        for _ in range(40):
            dl.axpy_into(z_try[dx:], z[dx:], t, d)
            g_try, gn_try = _lower_gradient(sess, z_try, g_try_buf)
            if math.isfinite(gn_try) and gn_try <= (1.0 - 1e-4 * t) * gnorm:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            retry = _low.newton_cg_retry_budget(budget, dy) \
                if info > 0 and k + 1 < maxiter else 0
            if retry == 0:
                return z, _low.LINESEARCH, k, gnorm, step
            budget = retry  # a longer CG from the same point (the CPU kernel's rule)
            continue
        z, z_try = z_try, z
        gbuf, g_try_buf = g_try_buf, gbuf
        g, gnorm = g_try, gn_try
        if gnorm <= tol:
            return z, _low.OK, k + 1, gnorm, step
    return z, _low.MAXITER, maxiter, gnorm, step


def solve_lower(problem, x, y0, *, method="newton-cg", tol=1e-10, maxiter=1000, step=None,
                backend=None, output="numpy"):
    """:func:`mlocore.solve_lower` for a :class:`DeviceBilevelProblem` (same options and
    result), on the device.

    Parameters
    ----------
    x, y0 : ndarray or device array
        Host arrays are validated and copied once each (counted); device arrays are used in
        place and never modified.
    output : {"numpy", "device"}
        Type of ``res.y``.

    Returns
    -------
    OptimizeResult
        As the CPU's, plus ``transfers`` (this call's host <-> device copies, read-backs of
        the stopping tests included).
    """
    check_problem_backend(problem, backend, "solve_lower")
    dl.check_output(output, "cuda")
    method, tol, maxiter, step = LowerOptions(method, tol, maxiter, step)
    sess = _Session(problem)
    xd, yd = _inputs(sess, x, y0, "y0")
    z = sess.joint(xd, yd)
    sess.check_once(z)
    z, status, nit, gnorm, used_step = lower_core(sess, z, method, tol, maxiter, step)
    y = sess.to_output(z[sess.dx:], output)
    detail = f"|grad_y g| = {gnorm:.3e} after {nit} iterations (lower_tol = {tol:.1e})."
    return OptimizeResult(y=y, x=_host_x(x, xd), success=status == 0, status=int(status),
                          message=status_message(status, detail), nit=int(nit),
                          grad_norm=float(gnorm), step=None if used_step <= 0 else used_step,
                          method=method, oracle_calls=counts_dict(sess.counts),
                          transfers=sess.counter.as_dict())


def hypergrad(problem, x, y=None, method=None, *, tol=1e-10, atol=0.0, maxiter=None, v0=None,
              eta=None, lower_solved=False, lower_method="newton-cg", lower_tol=None,
              lower_maxiter=None, lower_step=None, T=100, K=None, step=None, fd_step=None,
              backend=None, output="numpy"):
    """:func:`mlocore.hypergrad` (implicit methods "cg" and "neumann") for a
    :class:`DeviceBilevelProblem`, with every vector on the device.

    Parameters
    ----------
    x, y, v0 : ndarray or device array
        Host arrays are validated and copied once each (counted); device arrays are used in
        place and never modified.
    method : {"cg", "neumann", "itd-reverse", "itd-forward"}
        docs/mathematics.md sections 1-2 (the unrolled methods, with options T, K and step, run
        :func:`mlocore.cuda._unrolled.unrolled_hypergrad`); "direct" assembles H_yy from dy
        device HVPs and runs a one-block Cholesky (:mod:`mlocore.cuda._direct`).
    output : {"numpy", "device"}
        Type of ``grad``, ``y`` and ``v`` (x is returned as given).
    Other parameters as :func:`mlocore.hypergrad`.

    Returns
    -------
    HypergradResult
        The CPU's fields plus ``transfers``: this call's host <-> device copies (inputs, the
        scalars read back by every stopping test, the outputs; the first call on a problem
        also reads back one scalar per callback check).
    """
    check_problem_backend(problem, backend, "hypergrad")
    dl.check_output(output, "cuda")
    opts = hypergrad_options(method, problem.dy, tol=tol, atol=atol, maxiter=maxiter,
                             v0_given=v0 is not None, eta=eta, lower_solved=lower_solved,
                             lower_method=lower_method, lower_tol=lower_tol,
                             lower_maxiter=lower_maxiter, lower_step=lower_step, T=T, K=K,
                             step=step, fd_step=fd_step)
    if opts.unrolled:  # mlocore.cuda._unrolled
        return unrolled_hypergrad(problem, x, y, opts.method, T=opts.T, K=opts.K, step=step,
                                  backend=backend, output=output)
    if y is None:
        raise TypeError("hypergrad(problem, x, y): y, the lower-level start, is required")
    sess = _Session(problem)
    xd, yd = _inputs(sess, x, y, "y")
    v0d = None if v0 is None else to_device("v0", v0, sess.counter, problem.dy)
    z = sess.joint(xd, yd)
    sess.check_once(z)
    return _implicit(sess, opts.method, x, xd, z, v0d, opts.solve_lower, opts.lower, opts.tol,
                     opts.atol, opts.maxiter, opts.eta, output)


def _implicit(sess, method, x, xd, z, v0, solve_lower_flag, lower, tol, atol, maxiter, eta,
              output, value=True):
    """The CPU ``implicit_hypergrad`` kernel on the device, and the result (``value=False``
    leaves out F, ``fun`` is then NaN)."""
    dx, dy, n = sess.dx, sess.dy, sess.n
    lower_nit, lower_gnorm, lower_status = 0, math.nan, _low.OK
    if solve_lower_flag:
        z, lower_status, lower_nit, lower_gnorm, _ = lower_core(sess, z, lower.name, lower.tol, lower.maxiter, lower.step)
    grad = dl.empty(dx)
    dl.fill(grad, np.nan)
    v = v0
    fun, info, nit, res = math.nan, 0, 0, math.nan
    status = lower_status
    if lower_status in (_low.OK, _low.MAXITER):  # maxiter still gives a (less exact) answer
        gf = dl.empty(n)
        sess.upper.grad(z, gf)
        if sess.upper.has_value and value:
            fun = sess.upper.value(z)
        op = _HyyOperator(sess, z)
        b = gf[dx:]
        solved = True
        if method == "cg":
            v, info, nit, res, _ = dl.cg_device(op, b, v0, tol, atol, maxiter,
                                                counter=sess.counter)
        elif method == "direct":  # dense H_yy from dy HVPs, one-block Cholesky
            v, info, nit, res, _ = direct_device(op, b, sess.counter)
        else:
            if eta <= 0.0:
                lam, _ = dl.power_iteration_device(op, dy, POWER_ITERS, counter=sess.counter)
                if not lam > 0.0:
                    status, solved = _low.INDEFINITE, False
                else:
                    eta = 1.0 / (LIPSCHITZ_SAFETY * lam)
            if solved:
                v, info, nit, res, _ = dl.neumann_device(op, b, v0, eta, tol, atol, maxiter,
                                                         counter=sess.counter)
        if solved:
            hx = sess.lower.hvp_xy(z, v, dl.empty(dx))    # H_xy v
            dl.axpy_into(grad, gf[:dx], -1.0, hx)
            if info != 0:
                status = _imp.LINEAR_FAILED
            else:
                sess.scalars.abs_sum(grad, dl.S_AUX)
                if not math.isfinite(sess.scalars.read()[dl.S_AUX]):
                    status = _imp.NONFINITE_RESULT
    if v is None:
        v = dl.zeros(dy)
    out = implicit_result(
        method, grad=sess.to_output(grad, output), x=_host_x(x, xd),
        y=sess.to_output(z[dx:], output), v=sess.to_output(v, output), fun=fun, status=status,
        lower_status=lower_status, lower_nit=lower_nit, lower_grad_norm=lower_gnorm, info=info,
        nit=nit, residual=res, eta=eta, solved_lower=solve_lower_flag)
    return sess.finish(out)
