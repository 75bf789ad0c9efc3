"""Primal-dual value-function method (Sow, Ji, Guan & Liang 2022, "A primal-dual approach
to bilevel optimization with multiple inner minima"): ``max_{rho >= 0} min_{x, y} f(x, y) +
rho (g(x, y) - v_a(x) - eps)``.

Iteration k: the penalty method's yhat update (:mod:`mlocore.stochastic.penalty`, same
loop ``value_function_loop``) and primal step on the normalized Lagrangian::

    x <- P(x - alpha_k (grad_x f + rho_k (grad_x g(x, y) - grad_x g(x, yhat))) / (1 + rho_k))
    y <- y - beta_k (grad_y f + rho_k grad_y g(x, y)) / (1 + rho_k)
    ybar <- ybar + gamma (y - ybar),   yhatbar <- yhatbar + gamma (yhat - yhatbar)
    rho_{k+1} = max(0, rho_k + dual_step (c_k - eps))

where the minibatch estimate of the constraint ``g(x_k, .) - v_a(x_k)`` is taken at the
running averages (on the step's lower batch, before the step): ``c_k = g(x_k, ybar_k) -
g(x_k, yhatbar_k) - a1/2 |yhatbar_k|^2 - a2``. ``work = [yhat, ybar, yhatbar (dy each),
rho]``: the final multiplier is ``res.state["work"][-1]`` (``MULTIPLIER_INDEX``) and
``res.multiplier``.

Why the averages: at the SGD iterates themselves, ``g(x, y) - v_a(x)`` and ``g(x, yhat) -
v_a(x)`` are dominated by the iterates' noise balls (about 0.13 each on ``make_quadratic(5,
10)`` with batch 16, while the penalized solution's own ``g - v_a`` is about 6 / rho^2:
0.015 at rho = 20), so ``c_k`` at (y, yhat) is the small, biased difference of two noise
balls. Its mean reaches ``eps`` at rho of about 20 (decaying steps) whatever ``dual_step``
(1 to 10) or ``constraint_tol``, and falls with constant steps (yhat's noise ball is the
larger: from rho_0 = 30 to about 5 in 10000 iterations). The averages (memory about
``1 / gamma`` iterations) remove most of that noise, so ``c_k`` estimates the constraint
at the mean iterates and the multiplier keeps rising towards the value that meets ``eps``.

Defaults (the formulation and the projected dual ascent are the paper's; the averages of
the constraint's arguments and every constant were chosen by measurement): ``dual_step =
0.5``, ``constraint_average = gamma = 0.01``, ``constraint_tol = 1e-3``, ``rho0 = 1``, the
penalty method's constant steps ``0.5/L_F``, ``1/L_g``, and the tail average of the last
half (``average=0.5``). On ``make_quadratic(5, 10)`` (batch 16, 3000 iterations) the
returned x is 0.015-0.045 |x*| from x* for seeds 0-4 (``step="auto"``: 0.018-0.043; the
multiplier about 31), 0.020-0.036 after 1000 iterations, 0.013-0.028 after 30000 (seeds
0-2; multiplier about 50). Before (c at y and yhat, ``dual_step = 0.1``, decaying steps
``alpha ~ k^-3/5``, ``beta ~ k^-2/5``): 0.069-0.088 (seeds 0-2; auto 0.052-0.069). The
averages with ``dual_step`` 0.1 / 0.3 / 1 gave 0.040-0.072 / 0.022-0.053 / 0.010-0.031
(seeds 0-4); on ``make_quadratic(5, 10, 200, 200)`` (batch 32, 5000 iterations, seeds 0-2,
|x*| = 15.2) larger steps give larger multipliers and a slower x (distance 0.1-1.1 / 1.0-1.8
/ 4.3-4.6; 2.3-2.9 for 0.5; 2.1-3.4 before), hence 0.5.
"""
import numpy as np
from numba import njit

from .._validation import check_positive
from ._spec import MethodSpec
from .penalty import DeviceValueFunction, value_function_options, value_function_loop

__all__ = ["SPEC", "MULTIPLIER_INDEX"]

#: position of the primal-dual multiplier in ``res.state["work"]`` (also ``work[3 dy]``)
MULTIPLIER_INDEX = -1


@njit(cache=True)
def run_primal_dual(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar,
                    samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """Primal-dual value-function method (Sow et al. 2022b; lecture eq. 29): the penalty
    method's primal step on the Lagrangian ``(f + rho (g - v_a)) / (1 + rho)`` with the current
    multiplier ``rho = work[3 dy]`` (no max), the running averages ``ybar, yhatbar`` (weight
    gamma) of y and yhat, then projected dual ascent ``rho <- max(0, rho + dual_step (c -
    eps))`` with the minibatch estimate ``c = g(x, ybar) - g(x, yhatbar) - a1/2 |yhatbar|^2 -
    a2`` (taken before the step, on its lower batch)."""
    return value_function_loop(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar,
                               ipar, samp_u, samp_l, rng, proj, k0, n_iter, counts, True)


def _setup_primal_dual(ctx, opts):
    """Primal-dual value-function method (Sow, Ji, Guan & Liang, "A primal-dual approach to
    bilevel optimization with multiple inner minima", 2022; lecture eq. 29):
    ``max_{rho >= 0} min_{x, y} f(x, y) + rho (g(x, y) - v_a(x) - eps)``.

    Iteration k: the penalty method's yhat update and primal step on the normalized
    Lagrangian ``(f + rho_k (g - v_a)) / (1 + rho_k)`` (no max), the running averages
    ``ybar <- ybar + gamma (y - ybar)`` and ``yhatbar <- yhatbar + gamma (yhat - yhatbar)``,
    then projected dual ascent ``rho_{k+1} = max(0, rho_k + dual_step (c_k - eps))`` with
    the minibatch estimate ``c_k = g(x_k, ybar_k) - g(x_k, yhatbar_k) - a1/2 |yhatbar_k|^2 -
    a2`` of ``g(x_k, .) - v_a(x_k)`` at the averages. ``work = [yhat, ybar, yhatbar (dy
    each), rho]``: the final multiplier is ``res.state["work"][-1]`` (``MULTIPLIER_INDEX``).

    Parameters
    ----------
    dual_step : float, default 0.5
        Dual ascent step (in multiplier units per unit of constraint violation; chosen by
        measurement, module docstring). The constraint value near the solution is quadratic
        in the y-violation (``O(1 / rho^2)``), so the ascent is slow; a larger step raises the
        multiplier sooner, which slows the x-steps ``alpha / (1 + rho)``.
    constraint_average : float, default 0.01
        gamma in (0, 1]: the weight of the running averages of y and yhat at which the
        constraint is estimated (memory about ``1 / gamma`` iterations; chosen by
        measurement). ``1`` evaluates it at the current iterates, where the SGD noise of y
        and yhat dominates it (module docstring).
    constraint_tol : float, default 1e-3
        eps > 0: the relaxed constraint ``g(x, y) - v_a(x) <= eps`` has an interior, so a
        finite multiplier exists (with ``eps = a1 = a2 = 0`` the constraint only holds with
        equality and rho grows without bound). The solution is biased by
        ``O(sqrt(eps / mu_g))`` in y.
    rho0 : float, default 1
        Initial multiplier (>= 0).
    a1, a2 : float, default 0
        As for the penalty method.

    Notes
    -----
    Assumptions as for the penalty method. Per iteration: T + 1 lower gradients, 2 lower
    values (at the averages), 1 upper gradient.
    """
    a1, a2 = value_function_options(ctx, opts)
    ds = check_positive("dual_step", opts["dual_step"])
    eps = check_positive("constraint_tol", opts["constraint_tol"], allow_zero=True)
    rho0 = check_positive("rho0", opts["rho0"], allow_zero=True)
    gam = check_positive("constraint_average", opts["constraint_average"])
    if gam > 1.0:
        raise ValueError(f"constraint_average must be in (0, 1], got {gam!r}")
    dy = ctx.dy
    work = np.empty(3 * dy + 1)
    for b in range(3):   # yhat, ybar, yhatbar start at y0
        work[b * dy:(b + 1) * dy] = ctx.y0
    work[3 * dy] = rho0
    return work, [a1, a2, 0.0, ds, eps, gam], []


class DevicePrimalDual(DeviceValueFunction):
    """:func:`run_primal_dual` on the device (the multiplier a host scalar)."""

    dual = True


SPEC = MethodSpec(run_primal_dual, inner_steps=1, uses=("inner_steps",),
                  options={"dual_step": 0.5, "constraint_tol": 1e-3, "rho0": 1.0,
                           "constraint_average": 0.01,
                           "a1": 0.0, "a2": 0.0},
                  setup=_setup_primal_dual, needs_value=True,
                  result=lambda work: {"multiplier": float(work[-1])},
                  doc="Sow et al. 2022b: primal-dual on the value-function "
                      "constraint, lecture eq. 29",
                  device=DevicePrimalDual, gradient_only=True)
