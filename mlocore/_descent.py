"""The outer loop of the deterministic drivers, shared by both backends.

:func:`descent_loop` steps on the hypergradient with one of :data:`OUTER_METHODS`: projected
L-BFGS (the default), projected gradient with Barzilai-Borwein trial steps, or projected
gradient with Armijo steps, each with a backtracking Armijo search on F; the CPU drivers
(:mod:`mlocore._minimize`) and the CUDA drivers (:mod:`mlocore.cuda._minimize`,
:mod:`mlocore.cuda._drivers`) supply only the hypergradient and F of their backend.
:class:`HyperObjectiveBase` is the common part of :class:`mlocore.HyperObjective` on both
backends.
"""
from __future__ import annotations

import math
import time
from abc import ABCMeta
from collections import deque

import numpy as np
from scipy.optimize import OptimizeResult

from ._callbacks import CallbackError
from ._kernels import linalg as _kl
from ._kernels import lower as _low
from ._multilevel import LevelFailure
from ._results import counts_dict, status_message
from ._options import LowerOptions, default_linear_maxiter
from ._validation import check_choice, check_int, check_positive

__all__ = ["BILEVEL_METHODS", "OUTER_METHODS", "check_outer", "descent_loop",
           "descent_options", "multilevel_descent_options", "driver_closures",
           "multilevel_descent", "HyperObjectiveBase"]

#: deterministic bilevel methods of :func:`mlocore.minimize_bilevel`
BILEVEL_METHODS = ("aid", "itd", "alternating")
#: outer loops of :func:`descent_loop` (``outer=``), the default first
OUTER_METHODS = ("lbfgs", "bb", "gd")
_ARMIJO = 1e-4
_MAX_BACKTRACK = 40
_LBFGS_MEMORY = 10
_HZ_EPS = 1e-6
_HZ_DELTA = 0.1
_EPS2 = np.finfo(float).eps ** 2
_TINY = np.finfo(float).tiny
_EPS4 = 4.0 * np.finfo(float).eps
#: inner tolerances of "aid" under L-BFGS, from the projected-gradient norm pg: the lower
#: solve's ``min(max(lower_tol, min(_FORCING_MAX, _FORCING pg^2)), _FORCING pg)`` (loose far
#: from a stationary point, where its error in F only has to stay below the decrease the
#: line search asks for), the linear solve's residual ``|grad_y f - H_yy v|`` at most
#: ``_FORCING_LIN pg`` (absolute: a relative bound lets the hypergradient's error grow
#: with ``|grad_y f|``, which need not vanish at the solution): near the end both keep the
#: hypergradient's error below the projected gradient that the stopping test measures
#: (measured on random quadratics with cond(Hess F) up to 1e3, where ``0.01 pg`` for the
#: lower solve left it above pg); never below the floors
_FORCING = 1e-3
_FORCING_MAX = 1e-4
_FORCING_LIN = 1e-2
_LOWER_FLOOR = 1e-13
_LIN_FLOOR = 1e-14


def check_outer(outer):
    """Validate ``outer`` (one of :data:`OUTER_METHODS`)."""
    return check_choice("outer", outer, OUTER_METHODS)


class InnerTolerances:
    """Inner tolerances of a bilevel "aid" driver (CPU or CUDA: ``drv.lower``, a
    :class:`LowerOptions`, and the linear solve's ``drv.tol_lin`` (relative) and
    ``drv.atol_lin`` (absolute)) that follow the projected hypergradient: loose far from a
    stationary point, then tighter as it shrinks (see ``_FORCING``)."""

    def __init__(self, drv):
        self.drv = drv
        self.base = (drv.lower, drv.tol_lin, drv.atol_lin)

    def __call__(self, pg_norm):
        lower = self.base[0]
        ltol = min(max(lower.tol, min(_FORCING_MAX, _FORCING * pg_norm ** 2)),
                   _FORCING * pg_norm)
        self.drv.lower = lower._replace(tol=max(ltol, _LOWER_FLOOR))
        self.drv.tol_lin = _LIN_FLOOR
        self.drv.atol_lin = _FORCING_LIN * pg_norm

    def tighten(self):
        """Back to the user's tolerances; True if the current ones were looser."""
        drv, base = self.drv, self.base
        looser = drv.lower.tol > base[0].tol or drv.tol_lin > base[1] or \
            drv.atol_lin > base[2]
        drv.lower, drv.tol_lin, drv.atol_lin = base
        return looser


def driver_closures(drv, method):
    """:func:`descent_loop`'s ``F_eval``, ``commit`` and ``direction`` for a bilevel driver
    (CPU or CUDA) with ``F(x, y) -> (f, y_new, lower_status)``, ``direction(method, x)`` and
    the warm lower iterate ``y``, which an accepted step replaces. ``inner`` (for "aid",
    else None) is the :class:`InnerTolerances` of the driver."""
    def F_eval(x_new):
        f, y_new, lstatus = drv.F(x_new, drv.y)
        ok = lstatus in (_low.OK, _low.MAXITER)
        return f, y_new, 0 if ok else lstatus, "" if ok else status_message(lstatus)

    def commit(y_new):
        drv.y = y_new

    def direction(x_now):
        return drv.direction(method, x_now)

    return F_eval, commit, direction, (InnerTolerances(drv) if method == "aid" else None)


def descent_options(problem, *, maxiter, tol, step, callback, lin_tol, lin_maxiter, T, K,
                    inner_step, outer="lbfgs"):
    """Validate the options of the deterministic bilevel descent (CPU and CUDA drivers);
    returns ``(maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step, outer)``."""
    check_outer(outer)
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
    return maxiter, tol, step, lin_tol, lin_maxiter, T, K, inner_step, outer


def multilevel_descent_options(problem, *, maxiter, tol, step, callback, lin_tol, lower_tol,
                               lower_maxiter, outer="lbfgs"):
    """Validate the options of the multilevel descent (CPU and CUDA drivers); returns
    ``(maxiter, tol, step, lin_tol, lower_tol, lower_maxiter, outer)``."""
    check_outer(outer)
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
    return maxiter, tol, step, lin_tol, lower_tol, lower_maxiter, outer


def descent_loop(project, x, direction, F_eval, commit, step, maxiter, tol, callback,
                 extra, calls=None, outer="bb", inner=None, record=None):
    """The outer loop shared by the bilevel and multilevel drivers (both backends).

    ``direction(x) -> (grad, status, detail, F or nan)`` updates the caller's warm starts;
    ``F_eval(x) -> (F, state, status, detail)`` evaluates F exactly (lower levels solved) and
    ``commit(state)`` keeps the state of an accepted trial point. With a fixed ``step``:
    projected gradient steps. Otherwise ``outer`` picks the steps, all with a backtracking
    Armijo search on F along the projection arc (accepting changes within round-off of F):
    "lbfgs" (projected L-BFGS, see :class:`_LBFGS`), "bb" (Barzilai-Borwein trial steps) or
    "gd" (trial steps from the last accepted one). ``inner(pg_norm)``, if given, sets the
    caller's inner tolerances from the projected-gradient norm (``inner.tighten()`` restores
    the tight ones, and a failed line search retries with them). Stops when
    ``|x - P(x - grad)| <= tol``. ``calls()``, if given, returns the cumulative oracle count
    recorded in the history; ``record()``, if given, a dict of further values recorded
    under its keys at each iteration. Returns ``(x, fun, grad, nit, status, detail,
    history)``.
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
    cache = {}

    def cached_direction(x_now):
        """direction(x), computed once per point (the line search of "lbfgs" may have)."""
        key = x_now.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = direction(x_now)
        return cache[key]

    stepper = None if step is not None else _STEPPERS[outer](project, F_eval,
                                                              cached_direction)
    if outer != "lbfgs":
        inner = None
    status, detail, grad, nit = 10, "", None, 0
    for it in range(maxiter + 1):
        grad, gstatus, gmsg, fun_here = cached_direction(x)
        if step is not None:
            fun = fun_here
        if gstatus != 0 and (gstatus != _low.MAXITER or not np.all(np.isfinite(grad))):
            status, detail = gstatus, gmsg
            break
        pm = x - project(x - grad)
        pg_norm = math.sqrt(pm @ pm)
        _record(history, fun, pg_norm, t0)
        if calls is not None:
            history["oracle_calls"].append(calls())
        if record is not None:
            for key, val in record().items():
                history.setdefault(key, []).append(val)
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
            if inner is not None:
                inner(pg_norm)
            x_try, f_try, state = stepper(x, fun, grad)
            if x_try is None:
                if inner is not None and inner.tighten():
                    # retry from x with the tight inner tolerances: F and the
                    # hypergradient there again, and a fresh quasi-Newton memory
                    fun, state, fstatus, detail = F_eval(x)
                    if fstatus != 0:
                        status = fstatus
                        break
                    commit(state)
                    stepper.reset()
                    cache.clear()
                    inner = None
                    continue
                status = 11
                break
            x, fun = x_try, f_try
            commit(state)
        nit += 1
        if not np.all(np.isfinite(x)):
            status = 12
            break
    if inner is not None:
        inner.tighten()
    return x, fun, grad, nit, status, detail, _arrays(history)


class _Backtracking:
    """Armijo backtracking on F along ``P(x + t d)``: ``try_arc(x, fun, grad, d, t)`` halves
    t until ``F(x_t) <= F(x) + c grad^T (x_t - x)`` (up to the round-off of F), and returns
    ``(x_t, F(x_t), state, t)`` or None. ``descent`` skips trial points with
    ``grad^T (x_t - x) > 0`` without evaluating F (an arc that is not a descent arc)."""

    descent = False

    def __init__(self, project, F_eval, direction=None):
        self.project, self.F_eval, self.direction = project, F_eval, direction

    def reset(self):
        pass

    def try_arc(self, x, fun, grad, d, t):
        slack = _EPS4 * abs(fun)  # F is only known to round-off
        for _ in range(_MAX_BACKTRACK):
            x_try = self.project(x + t * d)
            decrease = grad @ (x_try - x)
            if decrease <= 0 or not self.descent:
                f_try, state, fstatus, _ = self.F_eval(x_try)
                if fstatus == 0 and np.isfinite(f_try) and \
                        f_try <= fun + _ARMIJO * decrease + slack:
                    return x_try, f_try, state, t
                if self.descent and fstatus == 0 and self._approx_wolfe(
                        x, fun, decrease, x_try, f_try):
                    return x_try, f_try, state, t
            t *= 0.5
        return None

    def _approx_wolfe(self, x, fun, decrease, x_try, f_try):
        """The approximate Wolfe test of Hager & Zhang (2005) where the predicted decrease
        is below the accuracy of F (``-grad^T (x_t - x) <= eps |F(x)|``, eps = 1e-6):
        ``F(x_t) <= F(x) + eps |F(x)|`` and the slope at x_t,
        ``grad(x_t)^T (x_t - x)``, at most ``(1 - 2 delta)`` times ``-grad(x)^T (x_t - x)``
        (delta = 0.1): it needs the hypergradient at x_t, which the next iteration reuses."""
        if not np.isfinite(f_try) or f_try > fun + _HZ_EPS * abs(fun) or \
                -decrease > _HZ_EPS * abs(fun):  # a decrease F could resolve: Armijo decides
            return False
        g_try, gstatus, _, _ = self.direction(x_try)
        if gstatus not in (0, _low.MAXITER) or not np.all(np.isfinite(g_try)):
            return False
        return g_try @ (x_try - x) <= -(1.0 - 2.0 * _HZ_DELTA) * decrease


class _BB(_Backtracking):
    """Projected gradient with Barzilai-Borwein trial steps ``s^T s / s^T y`` (the first
    trial 1, doubled after non-positive curvature)."""

    def reset(self):
        self.trial, self.prev = 1.0, None

    def __init__(self, project, F_eval, direction=None):
        super().__init__(project, F_eval, direction)
        self.reset()

    def __call__(self, x, fun, grad):
        if self.prev is not None:  # Barzilai-Borwein trial step from the last two iterates
            s_k, g_k = x - self.prev[0], grad - self.prev[1]
            sy = s_k @ g_k
            self.trial = (s_k @ s_k) / sy if sy > 0 else 2.0 * self.trial
        self.prev = (x.copy(), grad.copy())
        out = self.try_arc(x, fun, grad, -grad, self.trial)
        if out is None:
            return None, None, None
        self.trial = out[3]
        return out[:3]


class _GD(_BB):
    """Projected gradient with Armijo steps: each search starts from twice the last
    accepted step (the first trial 1)."""

    def __call__(self, x, fun, grad):
        out = self.try_arc(x, fun, grad, -grad, self.trial)
        if out is None:
            return None, None, None
        self.trial = 2.0 * out[3]
        return out[:3]


class _LBFGS(_Backtracking):
    """Projected L-BFGS (Nocedal & Wright 2006, Algorithm 7.4, the two-loop recursion, with
    memory m = 10) in the two-metric form of Bertsekas (1982): the variables whose gradient
    step the projection moves (``P(x - g)_i != x_i - g_i``, an epsilon-active set) take
    scaled gradient steps ``-gamma g_i``, the free ones the L-BFGS direction of the free
    components; then an Armijo search on F along ``P(x + t d)`` from t = 1, which also
    accepts the approximate Wolfe points of Hager & Zhang (2005) where the change of F is
    below its accuracy (the inexact lower solves make F noisy there). Curvature pairs
    with ``s^T y <= eps |s| |y|`` (on the free components) are skipped; a failed search
    retries once along ``-gamma g`` with the memory cleared.
    """

    descent = True

    def __init__(self, project, F_eval, direction, memory=_LBFGS_MEMORY):
        super().__init__(project, F_eval, direction)
        self.memory = memory
        self.reset()

    def reset(self):
        # curvature pairs in ring buffers (rows; allocated at the first pair), with
        # whether each is usable on all components
        self.S = self.Y = None
        self.usable = deque(maxlen=self.memory)  # newest last
        self.count, self.newest = 0, -1
        self.prev = None

    def add_pair(self, s, y):
        if self.S is None:
            self.S = np.empty((self.memory, s.shape[0]))
            self.Y = np.empty((self.memory, s.shape[0]))
        self.newest = (self.newest + 1) % self.memory
        self.S[self.newest], self.Y[self.newest] = s, y
        self.count = min(self.count + 1, self.memory)
        sy = float(s @ y)
        self.usable.append((_curvature(s, y, sy), sy, y))

    def _direction(self, grad, free, gamma):
        """The two-loop recursion on the free components (None without a usable pair) and
        its scaling ``s^T y / y^T y`` of the newest usable pair (``gamma`` without one)."""
        if self.count == 0:
            return None, gamma
        r, scale = _kl.lbfgs_two_loop(self.S, self.Y, self.count, self.newest, grad, free,
                                      bool(free.all()), _EPS2)
        if scale < 0.0:
            return None, gamma
        return -r, scale

    def __call__(self, x, fun, grad):
        if self.prev is not None:
            self.add_pair(x - self.prev[0], grad - self.prev[1])
        self.prev = (x.copy(), grad.copy())
        # scaling of the gradient steps: the newest usable pair on all components (a
        # Barzilai-Borwein step), else a first step of length at most 1
        gamma = min(1.0, 1.0 / max(math.sqrt(grad @ grad), _TINY))
        for usable, sy, y in reversed(self.usable):
            if usable:
                gamma = sy / (y @ y)
                break
        step = x - grad
        free = self.project(step) == step
        d, scale = self._direction(grad, free, gamma)
        if d is not None:
            d = np.where(free, d, -scale * grad)
            if grad @ d < 0:
                out = self.try_arc(x, fun, grad, d, 1.0)
                if out is not None:
                    return out[:3]
            self.reset()  # the quasi-Newton step failed: a gradient step, fresh memory
            self.prev = (x.copy(), grad.copy())
        out = self.try_arc(x, fun, grad, -gamma * grad, 1.0)
        if out is None:
            return None, None, None
        return out[:3]


def _curvature(s, y, sy=None):
    """Whether the pair (s, y) has enough positive curvature for a quasi-Newton update:
    ``s^T y > eps |s| |y|``."""
    sy = s @ y if sy is None else sy
    return bool(sy > 0 and sy * sy > _EPS2 * (s @ s) * (y @ y))


_STEPPERS = {"lbfgs": _LBFGS, "bb": _BB, "gd": _GD}


def _arrays(history):
    return {k: np.asarray(v) for k, v in history.items()}


def _record(history, fun, pg_norm, t0):
    history["fun"].append(fun)
    history["grad_norm"].append(pg_norm)
    history["time"].append(time.perf_counter() - t0)


def multilevel_descent(run, z, x1, method, step, maxiter, tol, callback, inner_step,
                       outer="lbfgs"):
    """The multilevel gradient method (Gu & Chen 2024, Algorithm 1) on either backend.

    Each trial point of the line search solves levels n..2 for its x_1, warm-started from
    the last accepted solution; the hypergradient at an accepted point reuses that solution
    (and its F), so that an iteration costs one hypergradient plus the solves of its
    rejected trials. Steps on x_1 with :func:`descent_loop` (``outer``); ``method="itd"``
    steps on the unrolled approximation of F instead (Sato et al. 2021), its inner steps
    fixed at the first call (power iteration there unless ``inner_step`` is given) so that
    F~ stays one function during the run. ``run`` supplies the backend: ``run.eng`` (the
    n-level engine: ``solve_from``, ``value``, ``grad_reduced``), ``run.problem``, and the
    hooks ``with_x(z, x1)`` (a copy of z with block 1 set to x1), ``host(a)``,
    ``blocks(z)`` (host copies of every level's block), ``unrolled(z, steps, value_only)
    -> (grad on the host, z, F~, status, message, steps used)`` and ``calls()`` (the
    cumulative oracle count).

    Returns ``(x1, fun, grad, nit, status, detail, history, z)``.
    """
    eng, problem = run.eng, run.problem
    d1 = problem.dims[0]
    state = {"z": z, "solved": None}  # solved: (x1 bytes, z, F) of the last F evaluation
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
        state["solved"] = None
        try:
            zz = solved(x1)
        except LevelFailure as fail:
            return np.nan, None, fail.status, fail.detail
        fun = eng.value(1, zz)
        state["solved"] = (x1.tobytes(), zz, fun)
        return fun, zz, 0, ""

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
            known = state["solved"]
            if known is not None and known[0] == x1.tobytes():
                # a line-search trial solved levels n..2 at x1: reuse them and F
                _, zz, fun = known
            else:
                zz = solved(x1)
                fun = None
            state["z"] = zz
            grad = run.host(eng.grad_reduced(1, zz)[:d1])
            return grad, 0, "", eng.value(1, zz) if fun is None else fun
        except LevelFailure as fail:
            return np.full(d1, np.nan), fail.status, fail.detail, np.nan

    def extra():
        return {"xs": run.blocks(state["z"])}

    x1, fun, grad, nit, status, detail, history = descent_loop(
        problem.project, x1, direction, F_eval, commit, step, maxiter, tol, callback, extra,
        calls=run.calls, outer=outer)
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

    def _known(self, x):
        """``(F, grad)`` of the last call if it was at x (same bytes), else one call at x."""
        key = np.asarray(x, dtype=float).tobytes()
        known = getattr(self, "_last_call", None)
        if known is None or known[0] != key:
            f, g = self(x)
            known = self._last_call = (key, f, g)
        return known[1], known[2]

    def fun(self, x):
        """F(x); with :meth:`jac` at the same x, one call."""
        return self._known(x)[0]

    def jac(self, x):
        """grad F(x); with :meth:`fun` at the same x, one call."""
        return self._known(x)[1].copy()

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
