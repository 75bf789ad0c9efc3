"""Deterministic bilevel minimization on the device ("one large problem" mode).

:func:`minimize_bilevel` is the CPU :func:`mlocore._minimize.minimize_deterministic` (same
options, iterations, outer loop (L-BFGS by default, ``outer=``) and result fields; the upper
loop itself is the CPU's :func:`mlocore._descent.descent_loop`) for a
:class:`~mlocore.cuda.DeviceBilevelProblem`:

* the upper iterate x lives on the host (dx is assumed small: it is copied to the device once
  per new point, and the hypergradient, of size dx, is read back once per iteration);
* the lower iterate y and the adjoint v stay on the device and are warm-started from one
  iteration (and one line-search trial) to the next, as on the CPU;
* hypergradients are the device kernels of :mod:`mlocore.cuda._implicit` ("aid": lower solve
  then CG, docs/mathematics.md section 1) and :mod:`mlocore.cuda._unrolled` ("itd": reverse-mode
  unrolled differentiation, section 2);
* bounds or a projection on x (``DeviceBilevelProblem(..., bounds=..., project=...)``) are
  applied on the host, to x0 and after every step, exactly as on the CPU (projected steps;
  the stopping test and ``history["grad_norm"]`` use the projected-gradient mapping).

Every copy, the scalars read back by the stopping tests included, is counted in
``res.transfers``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import OptimizeResult

from .._kernels import lower as _low
from .._descent import BILEVEL_METHODS, descent_loop, descent_options, driver_closures
from .._options import LowerOptions
from .._results import counts_dict, status_message
from .._validation import as_vector, check_choice
from . import _linalg as dl
from ._device import to_device, to_host
from ._implicit import (_Session, _implicit, check_problem_backend,
                        lower_core)
from ._unrolled import unrolled_core

__all__ = ["minimize_bilevel"]


class _DeviceDriver:
    """The CPU ``_Driver`` on the device: one session (counters, transfers, oracles) for
    the whole run; warm starts ``y`` (a device vector) and ``v`` (device, or None = zeros)."""

    def __init__(self, problem, y0, lower, tol_lin, lin_maxiter, T, K, inner_step):
        self.sess = _Session(problem)
        self.lower = lower                      # (method, tol, maxiter, step)
        self.tol_lin, self.lin_maxiter = tol_lin, lin_maxiter
        self.atol_lin = 0.0
        self.T, self.K, self.inner_step = T, K, inner_step
        self.y = to_device("y0", y0, self.sess.counter, problem.dy)
        self.v = None
        self.nfev = 0
        self._xh = self._xd = None
        self.solved = None  # (x bytes, y, F, lower options) of the last F evaluation

    def x_device(self, x):
        """x on the device: copied (and counted) once per new point."""
        if self._xh is None or not np.array_equal(x, self._xh):
            self._xh = np.array(x, dtype=np.float64)
            self._xd = to_device("x", self._xh, self.sess.counter, self.sess.dx)
        return self._xd

    def joint(self, x, y):
        return self.sess.joint(self.x_device(x), y)

    def solve_lower(self, x, y0, method=None, maxiter=None, tol=None, step=None):
        m, ltol, lmaxiter, lstep = self.lower
        z, status, _, gnorm, _ = lower_core(
            self.sess, self.joint(x, y0), m if method is None else method,
            ltol if tol is None else tol, lmaxiter if maxiter is None else maxiter,
            lstep if step is None else step)
        return z, int(status), gnorm

    def F(self, x, y0):
        """``(F(x), y, status)`` with a warm-started lower solve (y a device vector)."""
        z, status, _ = self.solve_lower(x, y0)
        y = z[self.sess.dx:]
        if status not in (_low.OK, _low.MAXITER):
            return math.nan, y, status
        self.nfev += 1
        f = self.sess.upper.value(z)
        self.solved = (x.tobytes(), y, f, self.lower) if status == _low.OK else None
        return f, y, status

    def solved_at(self, x):
        """The CPU driver's ``solved_at``: ``(y, F)`` of the last F evaluation if it was at
        x, converged, and used the current lower options, else None."""
        known = self.solved
        if known is None or known[3] != self.lower or known[0] != x.tobytes():
            return None
        return known[1], known[2]

    def direction(self, method, x):
        """The (hyper)gradient at x (on the host); updates the warm starts."""
        sess = self.sess
        if method == "aid":
            known = self.solved_at(x)
            if known is None:
                res = _implicit(sess, "cg", x, self.x_device(x), self.joint(x, self.y),
                                self.v, True, self.lower, self.tol_lin, self.atol_lin,
                                self.lin_maxiter, -1.0, "device")
                fun = res.fun
            else:  # a line-search trial solved the lower level at x: reuse y and F
                y, fun = known
                res = _implicit(sess, "cg", x, self.x_device(x), self.joint(x, y), self.v,
                                False, self.lower, self.tol_lin, self.atol_lin,
                                self.lin_maxiter, -1.0, "device", value=False)
            self.y, self.v = res.y, res.v
            return to_host(res.grad, sess.counter), res.status, res.message, fun
        if method == "itd":
            grad, zT, _, fun, status, beta = unrolled_core(
                sess, "itd-reverse", self.joint(x, self.y), self.T, self.K, self.inner_step)
            self.y = zT[sess.dx:]
            msg = status_message(status, f"Unrolled T={self.T} steps (K={self.K}) with step "
                                         f"{beta:.3e}.")
            return to_host(grad, sess.counter), int(status), msg, fun
        # alternating: T inner gradient steps, then grad_x f only (the CPU baseline)
        z, status, _ = self.solve_lower(x, self.y, method="gd", maxiter=self.T, tol=0.0,
                                        step=self.inner_step)
        self.y = z[sess.dx:]
        if status not in (_low.OK, _low.MAXITER):
            return np.full(sess.dx, np.nan), status, status_message(status), math.nan
        gf = dl.empty(sess.n)
        sess.upper.grad(z, gf)
        g = to_host(gf[:sess.dx], sess.counter)
        return g, 0 if np.all(np.isfinite(g)) else 6, "", math.nan


def minimize_bilevel(problem, x0, y0, method="aid", *, step=None, maxiter=100, tol=1e-6,
                     callback=None, lower_method="newton-cg", lower_tol=1e-10,
                     lower_maxiter=1000, lower_step=None, lin_tol=1e-10, lin_maxiter=None,
                     T=100, K=None, inner_step=None, outer="lbfgs", backend=None,
                     output="numpy"):
    """Minimize ``F(x) = f(x, y*(x))`` for a :class:`~mlocore.cuda.DeviceBilevelProblem` by
    (hyper)gradient steps: :func:`mlocore.minimize_bilevel`'s deterministic methods on the
    device.

    Parameters
    ----------
    problem : DeviceBilevelProblem
        ``g(x, .)`` strongly convex (docs/mathematics.md section 1). Its bounds,
        :class:`mlocore.Ball` or projection on x are honoured by projected steps
        ``x <- P(x - step grad)``, computed on the host (a user ``project`` is a host
        function of x), as on the CPU.
    x0 : array_like, shape (dx,)
        Upper start (host; the upper loop runs on the host); projected first, as on the CPU.
    y0 : array_like or device array, shape (dy,)
        Lower start: a host array is copied once (counted), a device array is used in place
        and never modified.
    method : {"aid", "itd", "alternating"}
        As the CPU: "aid" (lower solve warm-started to ``lower_tol``, adjoint by CG
        warm-started from the previous v; docs/mathematics.md section 1), "itd" (reverse-mode
        unrolled differentiation through T steps, truncated to the last K, warm-started from
        the previous y_T; section 2), "alternating" (T inner gradient steps, then a step along
        ``grad_x f`` only).
    step : float, optional
        Fixed upper step; default the steps of ``outer`` with an Armijo backtracking search
        on F (needs ``upper.value``; each trial solves the lower level, warm-started).
    outer : {"lbfgs", "bb", "gd"}
        The CPU's outer loop (:func:`mlocore._descent.descent_loop`, run on the host):
        projected L-BFGS by default, Barzilai-Borwein or Armijo gradient steps.
    maxiter, tol, callback
        Upper iterations; stop when the projected-gradient mapping ``|x - P(x - grad)|``
        (``|grad|`` without constraints) is at most tol; ``callback(intermediate_result)``
        after each iteration (its ``y`` is a host copy, counted), ``StopIteration`` stops
        (status 99).
    lower_method, lower_tol, lower_maxiter, lower_step, lin_tol, lin_maxiter, T, K,
    inner_step
        As :func:`mlocore._minimize.minimize_deterministic`.
    backend : {None, "cuda"}
    output : {"numpy", "device"}
        Type of ``res.y`` and ``res.v`` (x and jac are host arrays).

    Returns
    -------
    scipy.optimize.OptimizeResult
        The CPU's fields (``x``, ``fun``, ``jac``, ``nit``, ``nfev``, ``success``,
        ``status``, ``message``, ``y``, ``v``, ``oracle_calls``, ``method``, ``history``)
        plus ``transfers``: every host <-> device copy of the run (y0, each new x, each
        hypergradient, the scalars of every stopping test, the outputs).
    """
    check_problem_backend(problem, backend, "minimize_bilevel")
    dl.check_output(output, "cuda")
    check_choice("method", method, BILEVEL_METHODS)
    x = problem.project(as_vector("x0", x0, problem.dx))
    maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step, outer = descent_options(
        problem, maxiter=maxiter, tol=tol, step=step, callback=callback, lin_tol=lin_tol,
        lin_maxiter=lin_maxiter, T=T, K=K, inner_step=inner_step, outer=outer)
    lower = LowerOptions(lower_method, lower_tol, lower_maxiter, lower_step)

    drv = _DeviceDriver(problem, y0, lower, lin_tol, lin_maxiter, T, K, inner_step)
    sess = drv.sess
    sess.check_once(drv.joint(x, drv.y))
    F_eval, commit, direction, inner = driver_closures(drv, method)

    def extra():
        return {"y": to_host(drv.y, sess.counter)}

    x, fun, grad, nit, status, detail, history = descent_loop(
        problem.project, x, direction, F_eval, commit, step, maxiter, tol, callback, extra,
        calls=lambda: int(sess.counts.sum()), outer=outer, inner=inner)
    if problem.upper.value is not None and (step is not None or status != 0):
        fun, drv.y, _ = drv.F(x, drv.y)  # F at the returned x, lower level solved
    v = None
    if method == "aid":
        v = drv.v if drv.v is not None else dl.zeros(problem.dy)
        v = sess.to_output(v, output)
    return OptimizeResult(
        x=x, fun=fun, jac=grad, nit=nit, nfev=drv.nfev, success=status == 0, status=status,
        message=status_message(status, detail), y=sess.to_output(drv.y, output), v=v,
        oracle_calls=counts_dict(sess.counts), method=method, history=history,
        transfers=sess.counter.as_dict())
