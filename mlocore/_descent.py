"""The outer loop of the deterministic drivers, shared by both backends.

:func:`descent_loop` is projected (hyper)gradient descent with Barzilai-Borwein trial steps
and an Armijo backtracking search on F; the CPU drivers (:mod:`mlocore._minimize`) and the
CUDA drivers (:mod:`mlocore.cuda._minimize`, :mod:`mlocore.cuda._drivers`) supply only the
hypergradient and F of their backend. :class:`HyperObjectiveBase` is the common part of
:class:`mlocore.HyperObjective` on both backends.
"""
from __future__ import annotations

import time
from abc import ABCMeta

import numpy as np
from scipy.optimize import OptimizeResult

from ._callbacks import CallbackError
from ._kernels import lower as _low
from ._multilevel import LevelFailure
from ._results import counts_dict, status_message
from ._options import LowerOptions, default_linear_maxiter
from ._validation import check_choice, check_int, check_positive

__all__ = ["BILEVEL_METHODS", "descent_loop", "descent_options", "multilevel_descent_options",
           "driver_closures", "multilevel_descent", "HyperObjectiveBase"]

#: deterministic bilevel methods of :func:`mlocore.minimize_bilevel`
BILEVEL_METHODS = ("aid", "itd", "alternating")
_ARMIJO = 1e-4
_MAX_BACKTRACK = 40


def driver_closures(drv, method):
    """:func:`descent_loop`'s ``F_eval``, ``commit`` and ``direction`` for a bilevel driver
    (CPU or CUDA) with ``F(x, y) -> (f, y_new, lower_status)``, ``direction(method, x)`` and
    the warm lower iterate ``y``, which an accepted step replaces."""
    def F_eval(x_new):
        f, y_new, lstatus = drv.F(x_new, drv.y)
        ok = lstatus in (_low.OK, _low.MAXITER)
        return f, y_new, 0 if ok else lstatus, "" if ok else status_message(lstatus)

    def commit(y_new):
        drv.y = y_new

    def direction(x_now):
        return drv.direction(method, x_now)

    return F_eval, commit, direction


def descent_options(problem, *, maxiter, tol, step, callback, lin_tol, lin_maxiter, T, K,
                    inner_step):
    """Validate the options of the deterministic bilevel descent (CPU and CUDA drivers);
    returns ``(maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step)``."""
    maxiter = check_int("maxiter", maxiter, 0)
    tol = check_positive("tol", tol, allow_zero=True)
    if step is not None:
        step = check_positive("step", step)
    elif problem.upper.value is None:
        raise ValueError("step=None uses a backtracking line search on F, which needs the "
                         "upper objective's value callback; pass a fixed step=... instead")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    lin_tol = check_positive("lin_tol", lin_tol, allow_zero=True)
    lin_maxiter = 10 * problem.dy if lin_maxiter is None else check_int("lin_maxiter",
                                                                         lin_maxiter, 0)
    T = check_int("T", T, 1)
    K = T if K is None else check_int("K", K, 1)
    if K > T:
        raise ValueError(f"K must be <= T = {T}, got K={K}")
    inner_step = -1.0 if inner_step is None else check_positive("inner_step", inner_step)
    return maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step


def multilevel_descent_options(problem, *, maxiter, tol, step, callback, lin_tol, lower_tol,
                               lower_maxiter):
    """Validate the options of the multilevel descent (CPU and CUDA drivers); returns
    ``(maxiter, tol, step, lin_tol, lower_tol, lower_maxiter)``."""
    maxiter = check_int("maxiter", maxiter, 0)
    tol = check_positive("tol", tol, allow_zero=True)
    if step is not None:
        step = check_positive("step", step)
    elif problem.levels[0].value is None:
        raise ValueError("step=None uses a backtracking line search on F, which needs level "
                         "1's value callback; pass a fixed step=... instead")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    lin_tol = check_positive("lin_tol", lin_tol, allow_zero=True)
    lower_tol = check_positive("lower_tol", lower_tol, allow_zero=True)
    lower_maxiter = check_int("lower_maxiter", lower_maxiter, 0)
    return maxiter, tol, step, lin_tol, lower_tol, lower_maxiter


def descent_loop(project, x, direction, F_eval, commit, step, maxiter, tol, callback,
                 extra, calls=None):
    """Projected (hyper)gradient descent shared by the bilevel and multilevel drivers.

    ``direction(x) -> (grad, status, detail, F or nan)`` updates the caller's warm starts;
    ``F_eval(x) -> (F, state, status, detail)`` evaluates F exactly (lower levels solved) and
    ``commit(state)`` keeps the state of an accepted trial point. ``step=None``: Barzilai-
    Borwein trial steps with an Armijo backtracking search on F (accepting changes within
    round-off of F); otherwise fixed steps. Stops when ``|x - P(x - grad)| <= tol``.
    ``calls()``, if given, returns the cumulative oracle count recorded in the history.
    Returns ``(x, fun, grad, nit, status, detail, history)``.
    """
    history = {"fun": [], "grad_norm": [], "time": []}
    if calls is not None:
        history["oracle_calls"] = []
    t0 = time.perf_counter()
    fun = np.nan
    if step is None:  # the line search compares exact values of F
        fun, state, fstatus, detail = F_eval(x)
        if fstatus != 0:
            return x, fun, None, 0, fstatus, "At x0: " + detail, _arrays(history)
        commit(state)
    trial = 1.0 if step is None else step
    prev = None
    status, detail, grad, nit = 10, "", None, 0
    for it in range(maxiter + 1):
        grad, gstatus, gmsg, fun_here = direction(x)
        if step is not None:
            fun = fun_here
        if gstatus != 0 and (gstatus != _low.MAXITER or not np.all(np.isfinite(grad))):
            status, detail = gstatus, gmsg
            break
        pg_norm = float(np.linalg.norm(x - project(x - grad)))
        _record(history, fun, pg_norm, t0)
        if calls is not None:
            history["oracle_calls"].append(calls())
        if it > 0 and callback is not None:
            inter = OptimizeResult(x=x.copy(), fun=fun, jac=grad.copy(), nit=nit, **extra())
            try:
                callback(inter)
            except StopIteration:
                status = 99
                break
        if pg_norm <= tol:
            status = 0
            break
        if it == maxiter:
            break
        if step is not None:
            x = project(x - step * grad)
        else:
            if prev is not None:  # Barzilai-Borwein trial step from the last two iterates
                s_k, g_k = x - prev[0], grad - prev[1]
                sy = s_k @ g_k
                trial = (s_k @ s_k) / sy if sy > 0 else 2.0 * trial
            prev = (x.copy(), grad.copy())
            accepted = False
            slack = 4.0 * np.finfo(float).eps * abs(fun)  # F is only known to round-off
            for _ in range(_MAX_BACKTRACK):
                x_try = project(x - trial * grad)
                f_try, state, fstatus, _ = F_eval(x_try)
                if fstatus == 0 and np.isfinite(f_try) and \
                        f_try <= fun + _ARMIJO * (grad @ (x_try - x)) + slack:
                    accepted = True
                    break
                trial *= 0.5
            if not accepted:
                status = 11
                break
            x, fun = x_try, f_try
            commit(state)
        nit += 1
        if not np.all(np.isfinite(x)):
            status = 12
            break
    return x, fun, grad, nit, status, detail, _arrays(history)


def _arrays(history):
    return {k: np.asarray(v) for k, v in history.items()}


def _record(history, fun, pg_norm, t0):
    history["fun"].append(fun)
    history["grad_norm"].append(pg_norm)
    history["time"].append(time.perf_counter() - t0)


def multilevel_descent(run, z, x1, method, step, maxiter, tol, callback, inner_step):
    """The multilevel gradient method (Gu & Chen 2024, Algorithm 1) on either backend.

    Each iteration re-solves levels n..2 for the current x_1, warm-started from the last
    accepted solution, and steps on x_1 with :func:`descent_loop`; ``method="itd"`` steps on
    the unrolled approximation of F instead (Sato et al. 2021), its inner steps fixed at the
    first call (power iteration there unless ``inner_step`` is given) so that F~ stays one
    function during the run. ``run`` supplies the backend: ``run.eng`` (the n-level engine:
    ``solve_from``, ``value``, ``grad_reduced``), ``run.problem``, and the hooks
    ``with_x(z, x1)`` (a copy of z with block 1 set to x1), ``host(a)``, ``blocks(z)`` (host
    copies of every level's block), ``unrolled(z, steps, value_only) -> (grad on the host,
    z, F~, status, message, steps used)`` and ``calls()`` (the cumulative oracle count).

    Returns ``(x1, fun, grad, nit, status, detail, history, z)``.
    """
    eng, problem = run.eng, run.problem
    d1 = problem.dims[0]
    state = {"z": z}
    inner = {"steps": inner_step}

    def solved(x1):
        return eng.solve_from(run.with_x(state["z"], x1), 1)

    def unrolled(x1, value_only=False):
        grad, zz, fun, status, message, steps = run.unrolled(
            run.with_x(state["z"], x1), inner["steps"], value_only)
        if inner["steps"] is None and status == 0:
            inner["steps"] = steps
        return grad, zz, fun, status, message

    def F_eval(x1):
        if method == "itd":
            _, zz, fun, status, message = unrolled(x1, value_only=True)
            return fun, zz, status, message
        try:
            zz = solved(x1)
        except LevelFailure as fail:
            return np.nan, None, fail.status, fail.detail
        return eng.value(1, zz), zz, 0, ""

    def commit(zz):
        state["z"] = zz

    def direction(x1):
        if method == "itd":
            # the starts of the inner loops stay fixed within an iteration (F~, its gradient
            # and the line search's trial values describe one function); they move to the
            # unrolled outputs when a step is taken (commit, or here for fixed steps)
            grad, zz, fun, status, message = unrolled(x1)
            if status == 0 and step is not None:
                state["z"] = zz
            return grad, status, message, fun
        try:
            zz = solved(x1)
            state["z"] = zz
            return run.host(eng.grad_reduced(1, zz)[:d1]), 0, "", eng.value(1, zz)
        except LevelFailure as fail:
            return np.full(d1, np.nan), fail.status, fail.detail, np.nan

    def extra():
        return {"xs": run.blocks(state["z"])}

    x1, fun, grad, nit, status, detail, history = descent_loop(
        problem.project, x1, direction, F_eval, commit, step, maxiter, tol, callback, extra,
        calls=run.calls)
    if status != 0 or step is not None:
        fun, zz, _, _ = F_eval(x1)  # F at the returned x_1
        if zz is not None:
            state["z"] = zz
    return x1, fun, grad, nit, status, detail, history, state["z"]


class HyperObjectiveBase(metaclass=ABCMeta):
    """What :class:`mlocore.HyperObjective` does on every backend: count the calls, keep the
    last result, and refuse to hand scipy a failed or non-finite hypergradient."""

    METHODS = ("cg", "direct", "neumann")

    def _set_options(self, problem, method, tol, lower_method, lower_tol, lower_maxiter,
                     maxiter):
        """Validate and keep the options (both backends validate them here)."""
        check_choice("method", method, self.METHODS)
        if problem.upper.value is None:
            raise ValueError("HyperObjective needs the upper objective's value callback")
        self.problem = problem
        self.method = method
        self.tol = check_positive("tol", tol, allow_zero=True)
        self.lower = LowerOptions(lower_method,
                                  min(self.tol, 1e-10) if lower_tol is None else lower_tol,
                                  lower_maxiter, None)
        self.maxiter = default_linear_maxiter(method, problem.dy) if maxiter is None else \
            check_int("maxiter", maxiter, 0)
        self.ncalls = 0
        self.last = None

    @property
    def oracle_calls(self):
        return counts_dict(self._counts)

    def _accept(self, res):
        """Record ``res`` (a hypergradient result with ``fun`` and host ``grad``) and return
        ``(F, grad)``; a failed solve is a RuntimeError, a non-finite one a CallbackError."""
        self.ncalls += 1
        self.last = res
        if not res.success and res.status != _low.MAXITER:
            raise RuntimeError(f"hypergradient at x failed: {res.message}")
        if not (np.isfinite(res.fun) and np.all(np.isfinite(res.grad))):
            raise CallbackError(f"F or its hypergradient is not finite at x: {res.message}")
        return float(res.fun), res.grad.copy()
