"""Implicit hypergradient kernel (docs/mathematics.md section 1).

    grad F = grad_x f - H_xy v,   H_yy v = grad_y f,   at (x, y*(x))

One lower solve (optional, warm-started), one linear solve (direct / CG / Neumann, warm-started
from v0) with products ``H_yy p``, and one cross product ``H_xy v``: the block callbacks
``hvp_yy`` / ``hvp_xy`` when given, else blocks of joint Hessian-vector products with
direction (0, p).
"""
import numpy as np
from numba import njit

from .._config import LIPSCHITZ_SAFETY, POWER_ITERS
from .linalg import cg_core, direct_core, neumann_core, power_iteration
from .lower import INDEFINITE, OK, solve_lower_kernel
from .oracles import (UPPER_GRAD, UPPER_VALUE, all_finite, grad_of, joint, lower_xy_matvec,
                      value_of)

DIRECT = 0
CG = 1
NEUMANN = 2

LINEAR_FAILED = 5  #: status: the linear solve failed (info in the result)
NONFINITE_RESULT = 6


@njit(cache=True)
def implicit_hypergrad(ufns, uargs, u_has_value, lfns, largs, lflags, x, y0, v0,
                       solve_lower, lower_method, lower_tol, lower_maxiter, lower_step,
                       solver, rtol, atol, maxiter, eta, counts):
    """Returns ``(grad, y, v, fun, status, lower_status, lower_nit, lower_gnorm,
    lin_info, lin_nit, lin_residual, eta)``.

    ``eta <= 0`` with the Neumann solver means ``1 / L`` from power iteration on H_yy.
    """
    dx = x.shape[0]
    dy = y0.shape[0]
    lower_nit = 0
    lower_gnorm = np.nan
    lower_status = OK
    if solve_lower:
        y, lower_status, lower_nit, lower_gnorm, _ = solve_lower_kernel(
            lfns, largs, lflags, x, y0, lower_method, lower_tol, lower_maxiter, lower_step,
            counts)
    else:
        y = y0.copy()
    if lower_status != OK and lower_status != 1:  # maxiter still gives a (less exact) answer
        return np.full(dx, np.nan), y, v0.copy(), np.nan, lower_status, lower_status, \
            lower_nit, lower_gnorm, 0, 0, np.nan, eta
    z = joint(x, y)
    gf = grad_of(ufns, uargs, z, counts, UPPER_GRAD)
    fun = value_of(ufns, uargs, z, counts, UPPER_VALUE) if u_has_value else np.nan
    b = gf[dx:].copy()
    op = (lfns, largs, lflags, z, dx, counts)
    if solver == DIRECT:
        v, info, nit, res, _ = direct_core(op, b)
    elif solver == CG:
        v, info, nit, res, _ = cg_core(op, b, v0, rtol, atol, maxiter, (), None)
    else:
        if eta <= 0.0:
            lam, _ = power_iteration(op, dy, POWER_ITERS)
            if not (lam > 0.0):
                return np.full(dx, np.nan), y, v0.copy(), fun, INDEFINITE, lower_status, \
                    lower_nit, lower_gnorm, 0, 0, np.nan, eta
            eta = 1.0 / (LIPSCHITZ_SAFETY * lam)
        v, info, nit, res, _ = neumann_core(op, b, v0, eta, rtol, atol, maxiter, None)
    grad = gf[:dx] - lower_xy_matvec(v, lfns, largs, lflags, z, dx, counts)
    status = lower_status
    if info != 0:
        status = LINEAR_FAILED
    elif not all_finite(grad):
        status = NONFINITE_RESULT
    return grad, y, v, fun, status, lower_status, lower_nit, lower_gnorm, info, nit, res, eta
