"""Lower-level solvers (CPU, njit): gradient descent, accelerated GD, Newton-CG.

All stop when ``|grad_y g(x, y)| <= max(tol, 1e-13 |grad_y g(x, y0)|)`` (Euclidean norm):
below that relative floor round-off dominates, so the absolute ``tol`` does not make the
solver depend on the scale of g. Status codes are shared with the
hypergradient kernels and explained in :mod:`mlocore._results`.
"""
import numpy as np
from numba import njit

from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .linalg import INFO_BREAKDOWN, INFO_NEGATIVE_CURVATURE, cg_core, power_iteration
from .oracles import joint, lower_grad_y_at

GD = 0
AGD = 1
NEWTON_CG = 2

ROUNDOFF_FLOOR = 1e-13

OK = 0
MAXITER = 1
NONFINITE = 2
INDEFINITE = 3
LINESEARCH = 4


@njit(cache=True)
def newton_cg_budget(dy):
    """CG iterations of a Newton-CG step: ``2 dy + 20`` (dy iterations solve exactly in
    exact arithmetic; round-off delays CG when H_yy is ill-conditioned)."""
    return 2 * dy + 20


@njit(cache=True)
def newton_cg_retry_budget(budget, dy):
    """A step whose CG stopped at its budget and whose direction the line search rejects is
    retried with 4x the budget, up to ``20 (dy + 10)`` (e.g. logistic penalties e^-8..e^8:
    cond(H_yy) ~ 3e6, where 2 dy + 20 iterations leave a residual of 0.3); 0: no retry."""
    cap = 20 * (dy + 10)
    return 0 if budget >= cap else min(4 * budget, cap)


@njit(cache=True)
def lower_grad_y(lfns, largs, flags, x, y, counts):
    """``grad_y g(x, y)`` (the ``grad_y`` callback when given, see :mod:`.oracles`)."""
    return lower_grad_y_at(lfns, largs, flags, joint(x, y), x.shape[0], counts)


@njit(cache=True)
def lower_lipschitz(lfns, largs, flags, x, y, counts):
    """Estimate of lambda_max(H_yy) at (x, y), with the safety factor applied."""
    z = joint(x, y)
    lam, _ = power_iteration((lfns, largs, flags, z, x.shape[0], counts), y.shape[0],
                             POWER_ITERS)
    return LIPSCHITZ_SAFETY * lam


@njit(cache=True)
def solve_lower_kernel(lfns, largs, flags, x, y0, method, tol, maxiter, step, counts):
    """Minimize g(x, .) from y0. Returns ``(y, status, nit, grad_norm, step)``.

    ``step <= 0`` means 1/L with L from power iteration on H_yy at (x, y0) (GD and AGD).
    """
    y = y0.copy()
    g = lower_grad_y(lfns, largs, flags, x, y, counts)
    gnorm = np.sqrt(g @ g)
    if not np.isfinite(gnorm):
        return y, NONFINITE, 0, gnorm, step
    tol = max(tol, ROUNDOFF_FLOOR * gnorm)
    if gnorm <= tol:
        return y, OK, 0, gnorm, step
    if method != NEWTON_CG and step <= 0.0:
        L = lower_lipschitz(lfns, largs, flags, x, y, counts)
        if not (L > 0.0) or not np.isfinite(L):
            return y, INDEFINITE, 0, gnorm, step
        step = 1.0 / L
    if method == GD:
        for k in range(maxiter):
            y -= step * g
            g = lower_grad_y(lfns, largs, flags, x, y, counts)
            gnorm = np.sqrt(g @ g)
            if not np.isfinite(gnorm):
                return y, NONFINITE, k + 1, gnorm, step
            if gnorm <= tol:
                return y, OK, k + 1, gnorm, step
        return y, MAXITER, maxiter, gnorm, step
    if method == AGD:
        # Nesterov's method with gradient-based adaptive restart (O'Donoghue & Candes 2015)
        w = y.copy()
        gw = g
        mom = 0
        for k in range(maxiter):
            y_new = w - step * gw
            mom += 1
            direction = y_new - y
            if gw @ direction > 0.0:  # momentum points uphill: restart
                mom = 0
            w = y_new + (mom / (mom + 3.0)) * direction
            y = y_new
            gw = lower_grad_y(lfns, largs, flags, x, w, counts)
            gnorm = np.sqrt(gw @ gw)
            if not np.isfinite(gnorm):
                return w, NONFINITE, k + 1, gnorm, step
            if gnorm <= tol:
                return w, OK, k + 1, gnorm, step
        return w, MAXITER, maxiter, gnorm, step
    # Newton-CG with a backtracking search on the gradient norm (merit |grad|^2 / 2, for
    # which the Newton direction is a descent direction; no value callback needed)
    dx = x.shape[0]
    dy = y.shape[0]
    budget = newton_cg_budget(dy)
    for k in range(maxiter):
        z = joint(x, y)
        op = (lfns, largs, flags, z, dx, counts)
        forcing = min(0.5, np.sqrt(gnorm))
        d, info, _, _, _ = cg_core(op, -g, np.zeros(dy), forcing, 0.0, budget, (), None)
        if info == INFO_NEGATIVE_CURVATURE:
            return y, INDEFINITE, k, gnorm, step
        if info == INFO_BREAKDOWN and not np.any(d != 0.0):
            d = -g  # zero curvature along g: fall back to steepest descent
        t = 1.0
        accepted = False
        for _ in range(40):
            y_try = y + t * d
            g_try = lower_grad_y(lfns, largs, flags, x, y_try, counts)
            gn_try = np.sqrt(g_try @ g_try)
            if np.isfinite(gn_try) and gn_try <= (1.0 - 1e-4 * t) * gnorm:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            retry = newton_cg_retry_budget(budget, dy) if info > 0 and k + 1 < maxiter else 0
            if retry == 0:
                return y, LINESEARCH, k, gnorm, step
            budget = retry  # a longer CG from the same point (kept for later steps)
            continue
        y = y_try
        g = g_try
        gnorm = gn_try
        if gnorm <= tol:
            return y, OK, k + 1, gnorm, step
    return y, MAXITER, maxiter, gnorm, step
