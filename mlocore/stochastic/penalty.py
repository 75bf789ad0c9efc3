"""Value-function penalty method (the smoothed value function of Sow, Ji, Guan & Liang
2022, "A primal-dual approach to bilevel optimization with multiple inner minima"), and the
loop it shares with the primal-dual method (:mod:`mlocore.stochastic.primal_dual`).

With ``v_a(x) = min_y g(x, y) + a1/2 |y|^2 + a2`` the problem is ``min_{x, y} f(x, y) + rho
max(0, g(x, y) - v_a(x))``. Iteration k: ``yhat`` (the minimizer defining ``v_a``,
warm-started) takes T - 1 SGD steps on ``g(x, .) + a1/2 |.|^2``; then, on one lower batch
xi and one upper batch zeta, ``c = g(x, y; xi) - g(x, yhat; xi) - a1/2 |yhat|^2 - a2`` and,
simultaneously (all at the current point, with the same xi)::

    x    <- P(x - alpha_k (grad_x f + rho [c > 0] (grad_x g(x, y) - grad_x g(x, yhat)))
              / (1 + rho))
    y    <- y - beta_k (grad_y f + rho [c > 0] grad_y g(x, y)) / (1 + rho)
    yhat <- yhat - beta_k (grad_y g(x, yhat) + a1 yhat)         (its T-th step)

``[c > 0]`` is 1 when ``a1 = a2 = 0``: then ``g(x, y) - v_a(x) >= 0`` for every (x, y), so
``max(0, .)`` is the identity and no minibatch test decides it. (Danskin's theorem: ``grad
v_a(x) = grad_x g(x, yhat)``). ``work = [yhat (dy)]``. On the
device the lower ``value`` callback (a host float) is called twice per iteration (each call
reads back; the callback's own read-backs are not counted), and with ``a1 > 0`` ``|yhat|^2``
is read back once per iteration (counted).

Defaults (all chosen by measurement; the penalty formulation is the paper's): rho = 30,
T = 1, constant steps ``0.5/L_F``, ``1/L_g``, and the tail average of the last half
(``average=0.5``). The penalized problem's solution is not x*: on ``make_quadratic(5, 10)``
(full batch, 30000 iterations) it lies 8.8% of |x*| from x* for rho = 10, 4.4% for 20,
2.9% for 30. With batch 16 and 3000 iterations (seeds 0-2) the former loop (the yhat steps
on their own batches before the (x, y) step, the minibatch test of ``c > 0`` also for
``a1 = a2 = 0``, rho = 10, ``alpha ~ k^-3/5``, ``beta ~ k^-2/5``) returned x at 0.22-0.25
|x*| from x*, 0.13-0.20 with rho = 30: the test ``c > 0`` on a minibatch fails on about half
the batches near the solution (halving the effective rho), and ``rho (grad_x g(x, y) -
grad_x g(x, yhat))`` with independent noises in y and yhat has a variance growing with rho.
With the shared batch and no test: 0.065-0.076 for rho = 10, 0.033-0.046 for rho = 20 (the
decaying steps), 0.013-0.020 for rho = 30 with constant steps (0.08-0.10 with the decaying
ones, whose x-rate ``alpha_k / (1 + rho)`` is too slow).
"""
import math

import numpy as np
from numba import njit

from .._kernels.oracles import LOWER_GRAD, LOWER_VALUE
from .._validation import check_positive
from ._device import DeviceMethod, cuda, dl, launch
from ._sampling import (ALPHA0, BETA0, DIVERGED, N_FPAR, OK, T_INNER, draw, finite,
                        joint_into, lower_grad_y, project, sgrad, step_at, svalue,
                        upper_grad)
from ._spec import MethodSpec

#: the penalty method's default weight (see :func:`_setup_penalty`)
PENALTY_RHO = 30.0
VF_A1, VF_A2, VF_RHO, VF_DUAL_STEP, VF_EPS = N_FPAR, N_FPAR + 1, N_FPAR + 2, N_FPAR + 3, \
    N_FPAR + 4
#: the primal-dual method's weight of the running averages of y and yhat
VF_GAMMA = N_FPAR + 5


@njit(cache=True)
def value_function_loop(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar,
                        samp_u, samp_l, rng, proj, k0, n_iter, counts, dual):
    dx = x.shape[0]
    dy = y.shape[0]
    T = ipar[T_INNER]
    a1 = fpar[VF_A1]
    a2 = fpar[VF_A2]
    yhat = work[:dy]
    if dual:  # work = [yhat, ybar, yhatbar, rho]: c at the running averages
        ybar = work[dy:2 * dy]
        hbar = work[2 * dy:3 * dy]
        rho = work[3 * dy]
        dual_step = fpar[VF_DUAL_STEP]
        eps = fpar[VF_EPS]
        gam = fpar[VF_GAMMA]
    else:
        ybar = work[:dy]
        hbar = work[:dy]
        rho = fpar[VF_RHO]
        dual_step = 0.0
        eps = 0.0
        gam = 0.0
    z = np.empty(dx + dy)
    zh = np.empty(dx + dy)
    za = np.empty(dx + dy)
    zb = np.empty(dx + dy)
    for it in range(n_iter):
        k = k0 + it
        beta = step_at(fpar, BETA0, k)
        alpha = step_at(fpar, ALPHA0, k)
        # yhat: T SGD steps on g(x, .) + a1/2 |.|^2 (warm-started)
        for t in range(T - 1):
            joint_into(zh, x, yhat)
            idx, _ = draw(samp_l, rng)
            g = lower_grad_y(lfns, largs, lflags, zh, dx, idx, counts)
            for i in range(dy):
                yhat[i] -= beta * (g[i] + a1 * yhat[i])
        joint_into(z, x, y)
        joint_into(zh, x, yhat)
        idx_l, _ = draw(samp_l, rng)
        idx_u, _ = draw(samp_u, rng)
        gf = upper_grad(ufns, uargs, uflags, z, dx, idx_u, counts)
        if dual:
            joint_into(za, x, ybar)
            joint_into(zb, x, hbar)
            gv = svalue(lfns, largs, za, idx_l, counts, LOWER_VALUE)
            hv = svalue(lfns, largs, zb, idx_l, counts, LOWER_VALUE)
            c = gv - hv - 0.5 * a1 * (hbar @ hbar) - a2
        else:
            gv = svalue(lfns, largs, z, idx_l, counts, LOWER_VALUE)
            hv = svalue(lfns, largs, zh, idx_l, counts, LOWER_VALUE)
            c = gv - hv - 0.5 * a1 * (yhat @ yhat) - a2
        w = rho if (dual or c > 0.0 or (a1 == 0.0 and a2 == 0.0)) else 0.0
        s = 1.0 / (1.0 + rho)
        gh = sgrad(lfns, largs, zh, idx_l, counts, LOWER_GRAD)
        for i in range(dy):
            yhat[i] -= beta * (gh[dx + i] + a1 * yhat[i])
        if w != 0.0:
            gg = sgrad(lfns, largs, z, idx_l, counts, LOWER_GRAD)
            for p in range(dx):
                x[p] -= alpha * s * (gf[p] + w * (gg[p] - gh[p]))
            for i in range(dy):
                y[i] -= beta * s * (gf[dx + i] + w * gg[dx + i])
        else:
            for p in range(dx):
                x[p] -= alpha * s * gf[p]
            for i in range(dy):
                y[i] -= beta * s * gf[dx + i]
        project(x, proj)
        if dual:
            for i in range(dy):
                ybar[i] += gam * (y[i] - ybar[i])
                hbar[i] += gam * (yhat[i] - hbar[i])
            rho = max(0.0, rho + dual_step * (c - eps))
            work[3 * dy] = rho
        if not (finite(x) and finite(y) and finite(yhat) and np.isfinite(rho)):
            return DIVERGED, it
    return OK, n_iter


@njit(cache=True)
def run_penalty(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
                samp_l, rng, proj, k0, n_iter, counts):
    """Value-function penalty (lecture eqs. 26-28): per iteration, T - 1 warm-started SGD
    steps on ``yhat`` for ``g(x, .) + a1/2 |.|^2``; then, with one lower batch xi and one
    upper batch zeta, ``c = g(x, y; xi) - g(x, yhat; xi) - a1/2 |yhat|^2 - a2`` and, at the
    current point and on the same xi, one projected SGD step on the normalized penalty
    ``(f + rho max(0, c)) / (1 + rho)`` and yhat's T-th step::

        x <- P(x - alpha_k (grad_x f + rho [c > 0] (grad_x g(x, y) - grad_x g(x, yhat)))
                / (1 + rho))
        y <- y - beta_k (grad_y f + rho [c > 0] grad_y g(x, y)) / (1 + rho)
        yhat <- yhat - beta_k (grad_y g(x, yhat) + a1 yhat)

    (``[c > 0] = 1`` when ``a1 = a2 = 0``; Danskin: ``grad v_a(x) = grad_x g(x, yhat)``)."""
    return value_function_loop(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar,
                               ipar, samp_u, samp_l, rng, proj, k0, n_iter, counts, False)


def value_function_options(ctx, opts):
    """The value function's smoothing ``a1`` and offset ``a2`` (both >= 0)."""
    a1 = check_positive("a1", opts["a1"], allow_zero=True)
    a2 = check_positive("a2", opts["a2"], allow_zero=True)
    return a1, a2


def _setup_penalty(ctx, opts):
    """Value-function penalty method (lecture eqs. 25-28; the smoothed value function of
    Sow, Ji, Guan & Liang, "A primal-dual approach to bilevel optimization with multiple inner
    minima", 2022).

    With ``v_a(x) = min_y g(x, y) + a1/2 |y|^2 + a2`` the problem is
    ``min_{x, y} f(x, y) + rho max(0, g(x, y) - v_a(x))``. Iteration k: ``yhat`` (the
    minimizer defining ``v_a``, warm-started, in ``work[:dy]``, starting at y0) takes T - 1
    SGD steps on ``g(x, .) + a1/2 |.|^2`` with step ``beta_k``; then, on one lower batch xi and
    one upper batch zeta, ``c = g(x, y; xi) - g(x, yhat; xi) - a1/2 |yhat|^2 - a2`` and, at
    the current point with the same xi (common random numbers: the difference of the two
    lower gradients then carries no sample noise of its own)::

        x <- P(x - alpha_k (grad_x f + rho [c > 0] (grad_x g(x, y) - grad_x g(x, yhat)))
                / (1 + rho))
        y <- y - beta_k (grad_y f + rho [c > 0] grad_y g(x, y)) / (1 + rho)
        yhat <- yhat - beta_k (grad_y g(x, yhat) + a1 yhat)

    ``[c > 0] = 1`` when ``a1 = a2 = 0`` (``g - v_a >= 0`` everywhere).

    (Danskin's theorem: ``grad v_a(x) = grad_x g(x, yhat)``). Dividing by ``1 + rho``
    minimizes the same function scaled by a constant, whose smoothness is bounded
    independently of rho, so the default steps (0.5/L_F, 1/L_g) are stable for every rho.

    Parameters
    ----------
    rho : float, default 30
        Penalty weight. The penalized solution is biased: for a strongly convex g and
        ``a1 = a2 = 0`` its y sits at ``y*(x) - H_yy^{-1} grad_y f / rho`` and the x-bias is
        O(1/rho), while the penalized problem's conditioning (hence the iterations needed)
        grows like rho. rho must also be large enough for ``f + rho (g - v)`` to be bounded
        below in y (``grad^2_yy f + rho H_yy`` positive definite): on mlocore's stochastic
        quadratic rho = 1 diverges. The default 30 is this trade-off for a few thousand
        iterations (module docstring; on ``make_quadratic(5, 10, 200, 200)``, full batch,
        the limit is at distance 6.4 from x* for rho = 10 and about 0.5 for rho = 100, but
        rho = 100 needs about ten times more iterations); raise rho together with maxiter
        for accuracy.
    a1 : float, default 0
        Smoothing of the value function (>= 0). ``a1 > 0`` or ``a2 > 0`` make the constraint
        strictly feasible (useful for the primal-dual method) but enlarge the feasible set
        ``{y: g(x, y) <= v_a(x)}`` around ``y*(x)`` (radius of order ``sqrt(a1 / mu_g) |y*|``
        or ``sqrt(a2 / mu_g)``), a further bias.
    a2 : float, default 0
        Constant offset of the value function (>= 0).

    Notes
    -----
    Assumptions: f, g smooth; the value function differentiable (strongly convex g, or
    ``a1 > 0``); x projected, y unconstrained. With ``a1 > 0`` or ``a2 > 0``, ``max(0, c)`` is
    evaluated on a minibatch (a biased estimate of the constraint's activity). Per
    iteration: T + 1 lower gradients (T when the penalty is inactive), 2 lower values, 1
    upper gradient.
    """
    a1, a2 = value_function_options(ctx, opts)
    rho = check_positive("rho", opts["rho"], allow_zero=True)
    return ctx.y0.copy(), [a1, a2, rho, 0.0, 0.0, 0.0], []



# Device loop ---------------------------------------------------------------------------
@cuda.jit
def _yhat_step_kernel(zh, gg, dx, beta, a1):
    """``yhat -= beta (grad_y g(x, yhat) + a1 yhat)`` (the y block of zh)."""
    for i in range(dx + cuda.grid(1), zh.shape[0], cuda.gridsize(1)):
        zh[i] -= beta * (gg[i] + a1 * zh[i])


@cuda.jit
def _vf_step_kernel(z, gf, gg, gh, dx, alpha, beta, s, w, active):
    """The normalized penalty / Lagrangian step (``active``: the g terms with weight w)::

        x -= alpha s (grad_x f + w (grad_x g(x, y) - grad_x g(x, yhat)))
        y -= beta s (grad_y f + w grad_y g(x, y))
    """
    for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        if i < dx:
            if active != 0:
                z[i] -= alpha * s * (gf[i] + w * (gg[i] - gh[i]))
            else:
                z[i] -= alpha * s * gf[i]
        else:
            if active != 0:
                z[i] -= beta * s * (gf[i] + w * gg[i])
            else:
                z[i] -= beta * s * gf[i]


@cuda.jit
def _average_kernel(zbar, z, dx, gam):
    """``zbar += gam (z - zbar)`` on the y block (the running averages of y and yhat)."""
    for i in range(dx + cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        zbar[i] += gam * (z[i] - zbar[i])


class DeviceValueFunction(DeviceMethod):
    """``value_function_loop`` on the device: yhat is the
    y block of the joint vector zh = (x, yhat) (state), the multiplier a host scalar (the
    host decides the penalty's activity from the value callbacks' host floats anyway); for
    the primal-dual method the running averages ybar, yhatbar are the y blocks of za, zb."""

    dual = False

    def __init__(self, r):
        super().__init__(r)
        self.a1, self.a2, rho, self.dual_step, self.eps, self.gam = \
            (float(a) for a in r.fextra)
        self.exact = self.a1 == 0.0 and self.a2 == 0.0  # g - v >= 0: no activity test
        if self.dual:
            rho = float(r.work_host[3 * r.dy])
        self.rho = np.array([rho])
        self.bad = np.zeros(1, dtype=np.int64)
        self.zh = dl.empty(r.n)
        dl.copy(r.z, self.zh)  # yhat starts at y0 (the CPU's work = y0)
        self.gh = dl.empty(r.n)
        self.check = self.zh
        self.saved = (self.zh, self.rho, self.bad)
        if self.dual:  # (x, ybar), (x, yhatbar): the running averages, starting at y0
            self.za, self.zb = dl.empty(r.n), dl.empty(r.n)
            dl.copy(r.z, self.za)
            dl.copy(r.z, self.zb)
            self.saved += (self.za, self.zb)
        self.sc = dl.Scalars(r.counter) if self.a1 != 0.0 else None

    def iteration(self, k):
        r = self.r
        dx, dy, n, z, zh = r.dx, r.dy, r.n, r.z, self.zh
        beta, alpha = r.beta_at(k), r.alpha_at(k)
        dl.copy(z[:dx], zh[:dx])
        for _ in range(r.T - 1):
            r.lower.grad(zh, r.samp_l.draw(), r.gg)
            launch(_yhat_step_kernel, dy, zh, r.gg, dx, beta, self.a1)
        idx_l = r.samp_l.draw()
        idx_u = r.samp_u.draw()
        r.upper.grad(z, idx_u, r.gf)
        zv, zhv = z, zh
        if self.dual:  # c at the running averages
            zv, zhv = self.za, self.zb
            dl.copy(z[:dx], zv[:dx])
            dl.copy(z[:dx], zhv[:dx])
        gv = r.lower.value(zv, idx_l)
        hv = r.lower.value(zhv, idx_l)
        yy = 0.0
        if self.sc is not None:  # |yhat|^2 (one counted read-back)
            self.sc.dot(zhv[dx:], zhv[dx:], dl.S_AUX)
            yy = float(self.sc.read()[dl.S_AUX])
        c = gv - hv - 0.5 * self.a1 * yy - self.a2
        rho = float(self.rho[0])
        w = rho if (self.dual or c > 0.0 or self.exact) else 0.0
        s = 1.0 / (1.0 + rho)
        r.lower.grad(zh, idx_l, self.gh)
        if w != 0.0:
            r.lower.grad(z, idx_l, r.gg)
        launch(_vf_step_kernel, n, z, r.gf, r.gg, self.gh, dx, alpha, beta, s, w,
                1 if w != 0.0 else 0)
        launch(_yhat_step_kernel, dy, zh, self.gh, dx, beta, self.a1)
        self.project()
        if self.dual:
            launch(_average_kernel, dy, self.za, z, dx, self.gam)
            launch(_average_kernel, dy, self.zb, zh, dx, self.gam)
            new = rho + self.dual_step * (c - self.eps)
            if not math.isfinite(new):
                self.bad[0] = 1
            self.rho[0] = new if new > 0.0 else 0.0

    def host_ok(self):
        return self.bad[0] == 0

    def state_work(self):
        dx, dy = self.r.dx, self.r.dy
        out = dl.empty(3 * dy + 1 if self.dual else dy)
        dl.copy(self.zh[dx:], out[:dy])
        if self.dual:
            dl.copy(self.za[dx:], out[dy:2 * dy])
            dl.copy(self.zb[dx:], out[2 * dy:3 * dy])
            dl.fill(out[3 * dy:], float(self.rho[0]))
        return out

    def result(self):
        return {"multiplier": float(self.rho[0])} if self.dual else {}


SPEC = MethodSpec(run_penalty, alpha_power=0.0, beta_power=0.0, inner_steps=1,
                  uses=("inner_steps",),
                  options={"rho": PENALTY_RHO, "a1": 0.0, "a2": 0.0}, setup=_setup_penalty,
                  needs_value=True,
                  doc="value-function penalty f + rho max(0, g - v_a), lecture eq. 28",
                  device=DeviceValueFunction, gradient_only=True)
