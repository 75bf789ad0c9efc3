"""Lower-level solve and implicit hypergradient on the device ("one large problem" mode).

The same algorithms, options, status codes and results as the CPU entry points
(:func:`mlocore.solve_lower`, :func:`mlocore.hypergrad`; kernels in
:mod:`mlocore._kernels.lower` and :mod:`mlocore._kernels.implicit`), on a
:class:`~mlocore.cuda._problem.DeviceBilevelProblem`. Every vector stays on the device: the
host only reads back the scalars each stopping test needs (counted in ``res.transfers``)
and, with ``output="numpy"`` (the default), the results at the end.

Hypergradient (ALGORITHMS.md section 1): ``grad F = grad_x f - H_xy v`` with
``H_yy v = grad_y f`` at ``(x, y*(x))``; ``H_yy p`` and ``H_xy v`` both come from the lower
objective's joint Hessian-vector product with direction ``(0, p)``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import OptimizeResult

from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .._kernels import implicit as _imp
from .._kernels import lower as _low
from .._kernels.linalg import INFO_BREAKDOWN, INFO_NEGATIVE_CURVATURE
from .._results import (HypergradResult, counts_dict, linear_info_message, new_counts,
                        status_message)
from .._validation import check_backend, check_choice, check_int, check_positive
from . import _linalg as dl
from ._device import Transfers, to_device, to_host
from ._problem import DeviceBilevelProblem, DeviceOracle

__all__ = ["solve_lower", "hypergrad", "HYPERGRAD_METHODS", "LOWER_METHODS"]

LOWER_METHODS = ("newton-cg", "agd", "gd")
HYPERGRAD_METHODS = ("cg", "neumann", "direct")


def check_problem_backend(problem, backend, where):
    """Resolve the backend of a bilevel entry point for ``problem`` (only ever called for a
    DeviceBilevelProblem or backend "cuda"): a DeviceBilevelProblem runs on "cuda" (the
    default when backend is None); mixing device callbacks and the CPU, or CPU callbacks and
    the GPU, is a TypeError."""
    device_problem = isinstance(problem, DeviceBilevelProblem)
    resolved = check_backend("cuda" if backend is None and device_problem else backend, where)
    if device_problem and resolved != "cuda":
        raise TypeError(f"{where}: a DeviceBilevelProblem has device callbacks and runs on the "
                        f"CUDA backend only, got backend={backend!r}; pass backend='cuda' (or "
                        "leave it None), or build an mlocore.BilevelProblem for the CPU")
    if not device_problem:
        from .._problem import BilevelProblem, MultilevelProblem
        if isinstance(problem, BilevelProblem):
            raise TypeError(f"{where}: backend='cuda' needs device callbacks: a "
                            "mlocore.cuda.DeviceBilevelProblem (e.g. from "
                            "mlocore.problems.cuda_callbacks), got an mlocore.BilevelProblem "
                            "(CPU callbacks); use backend='cpu' for it")
        if isinstance(problem, MultilevelProblem):
            raise TypeError(f"{where}: backend='cuda' needs device callbacks: a "
                            "mlocore.cuda.DeviceMultilevelProblem (e.g. from "
                            "mlocore.problems.cuda_multilevel), got an "
                            "mlocore.MultilevelProblem (CPU callbacks); use backend='cpu' "
                            "for it")
        raise TypeError(f"{where}: problem must be a DeviceBilevelProblem for backend='cuda', "
                        f"got {type(problem).__name__}")
    return resolved


class _Session:
    """One call's device state: transfers, oracle counters, the two oracles, sizes."""

    def __init__(self, problem):
        self.problem = problem
        self.dx, self.dy = problem.dx, problem.dy
        self.n = self.dx + self.dy
        self.counter = Transfers()
        self.counts = new_counts()
        # finite-sum objectives (n_samples) are solved on the full batch, as on the CPU
        self.upper = DeviceOracle(problem.upper.full_batch(), "upper", self.counts,
                                  self.counter, self.n)
        self.lower = DeviceOracle(problem.lower.full_batch(), "lower", self.counts,
                                  self.counter, self.n)
        self.scalars = dl.Scalars(self.counter)

    def joint(self, x, y):
        """A new joint device vector ``z = concat(x, y)`` (x, y device vectors)."""
        z = dl.empty(self.n)
        dl.copy(x, z[:self.dx])
        dl.copy(y, z[self.dx:])
        return z

    def check_once(self, z):
        if not self.problem._checked:
            self.upper.check_at(z)
            self.lower.check_at(z)
            self.problem._checked = True

    def norm(self, a) -> float:
        """``|a|`` on the host (one counted read-back)."""
        self.scalars.dot(a, a, dl.S_AUX)
        return math.sqrt(self.scalars.read()[dl.S_AUX])

    def to_output(self, a, output):
        return to_host(a, self.counter) if output == "numpy" else a

    def finish(self, out):
        """Fill a hypergradient result's oracle counts (``oracle_calls``, ``ngrad``,
        ``nhvp``) and ``transfers`` from this session; returns it."""
        calls = counts_dict(self.counts)
        out.oracle_calls = calls
        out.ngrad = calls["upper_grad"] + calls["lower_grad"]
        out.nhvp = calls["upper_hvp"] + calls["lower_hvp"]
        out.transfers = self.counter.as_dict()
        return out


class _HyyOperator(dl.DeviceOperator):
    """``p -> H_yy(z) p``: the lower joint hvp with direction ``(0, p)``, block y."""

    def __init__(self, sess, z):
        super().__init__(None, sess.dy, name="lower.hvp")
        self.sess, self.z = sess, z
        self.w = dl.zeros(sess.n)
        self.h = dl.empty(sess.n)

    def apply(self, p, out):
        self.n_matvec += 1
        dx = self.sess.dx
        dl.copy(p, self.w[dx:])
        self.sess.lower.hvp(self.z, self.w, self.h)
        dl.copy(self.h[dx:], out)


def _lower_gradient(sess, z, g_joint):
    """``grad_y g`` at z into ``g_joint[dx:]``; returns ``(view, norm)``."""
    sess.lower.grad(z, g_joint)
    g = g_joint[sess.dx:]
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
    for k in range(maxiter):
        forcing = min(0.5, math.sqrt(gnorm))
        dl.scale_into(neg_g, -1.0, g)
        d, info, _, _, _ = dl.cg_device(_HyyOperator(sess, z), neg_g, None, forcing, 0.0,
                                        2 * dy + 20, counter=sess.counter)
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
            return z, _low.LINESEARCH, k, gnorm, step
        z, z_try = z_try, z
        gbuf, g_try_buf = g_try_buf, gbuf
        g, gnorm = g_try, gn_try
        if gnorm <= tol:
            return z, _low.OK, k + 1, gnorm, step
    return z, _low.MAXITER, maxiter, gnorm, step


def _inputs(sess, x, y, yname):
    """x and y on the device (host arrays validated and copied once each, counted)."""
    xd = to_device("x", x, sess.counter, sess.dx)
    yd = to_device(yname, y, sess.counter, sess.dy)
    return xd, yd


def _host_x(x, xd):
    """The result's x: a NumPy copy of a host x; a device x as given (no transfer)."""
    return xd if xd is x else np.array(x, dtype=np.float64)


def _lower_options(method, tol, maxiter, step):
    check_choice("lower_method", method, LOWER_METHODS)
    tol = check_positive("lower_tol", tol, allow_zero=True)
    maxiter = check_int("lower_maxiter", maxiter, 0)
    step = -1.0 if step is None else check_positive("lower_step", step)
    return method, tol, maxiter, step


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
    method, tol, maxiter, step = _lower_options(method, tol, maxiter, step)
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
              lower_maxiter=None, lower_step=None, backend=None, output="numpy", **unused):
    """:func:`mlocore.hypergrad` (implicit methods "cg" and "neumann") for a
    :class:`DeviceBilevelProblem`, with every vector on the device.

    Parameters
    ----------
    x, y, v0 : ndarray or device array
        Host arrays are validated and copied once each (counted); device arrays are used in
        place and never modified.
    method : {"cg", "neumann", "itd-reverse", "itd-forward"}
        ALGORITHMS.md sections 1-2 (the unrolled methods, with options T, K and step, run
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
    method = "cg" if method is None else method
    if method in ("itd-reverse", "itd-forward"):  # unrolled: mlocore.cuda._unrolled
        from .._hypergrad import _reject_unused
        from ._unrolled import unrolled_hypergrad
        _reject_unused(method, fd_step=unused.get("fd_step") is not None,
                       v0=v0 is not None, eta=eta is not None, maxiter=maxiter is not None,
                       lower_solved=bool(lower_solved), lower_tol=lower_tol is not None,
                       lower_maxiter=lower_maxiter is not None,
                       lower_step=lower_step is not None,
                       lower_method=lower_method != "newton-cg",
                       **{k: True for k, v in unused.items()
                          if v is not None and k not in ("T", "K", "step", "fd_step")})
        return unrolled_hypergrad(problem, x, y, method, T=unused.get("T", 100),
                                  K=unused.get("K"), step=unused.get("step"),
                                  backend=backend, output=output)
    check_choice("method", method, HYPERGRAD_METHODS)
    given = [k for k, v in unused.items() if v is not None and not (k == "T" and v == 100)]
    if given:
        raise TypeError(f"options {', '.join(sorted(given))} do not apply to method="
                        f"{method!r} (unrolled methods only)")
    if eta is not None and method != "neumann":
        raise TypeError(f"option eta does not apply to method={method!r}")
    if y is None:
        raise TypeError("hypergrad(problem, x, y): y, the lower-level start, is required")
    tol = check_positive("tol", tol, allow_zero=True)
    atol = check_positive("atol", atol, allow_zero=True)
    lower = _lower_options(lower_method, min(tol, 1e-10) if lower_tol is None else lower_tol,
                           1000 if lower_maxiter is None else lower_maxiter, lower_step)
    from .._hypergrad import default_linear_maxiter
    maxiter = default_linear_maxiter(method, problem.dy) if maxiter is None else \
        check_int("maxiter", maxiter, 0)
    eta = -1.0 if eta is None else check_positive("eta", eta)
    sess = _Session(problem)
    xd, yd = _inputs(sess, x, y, "y")
    v0d = None if v0 is None else to_device("v0", v0, sess.counter, problem.dy)
    z = sess.joint(xd, yd)
    sess.check_once(z)
    return _implicit(sess, method, x, xd, z, v0d, not lower_solved, lower, tol, atol, maxiter,
                     eta, output)


def _implicit(sess, method, x, xd, z, v0, solve_lower_flag, lower, tol, atol, maxiter, eta,
              output):
    """The CPU ``implicit_hypergrad`` kernel on the device, and the result."""
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
        b = gf[dx:]
        solved = True
        if method == "cg":
            v, info, nit, res, _ = dl.cg_device(op, b, v0, tol, atol, maxiter,
                                                counter=sess.counter)
        elif method == "direct":  # dense H_yy from dy HVPs, one-block Cholesky
            from ._direct import direct_device
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
        detail += f" Linear solve ({method}): {linear_info_message(info)}, residual {res:.3e}."
    out = HypergradResult(
        grad=sess.to_output(grad, output), x=_host_x(x, xd),
        y=sess.to_output(z[dx:], output), v=sess.to_output(v, output), fun=fun, method=method,
        success=status == 0, status=int(status), message=status_message(status, detail),
        nit=int(nit), lin_info=int(info), lin_residual=float(res), lower_nit=int(lower_nit),
        lower_grad_norm=float(lower_gnorm), lower_status=int(lower_status),
        eta=float(eta) if method == "neumann" else None)
    return sess.finish(out)
