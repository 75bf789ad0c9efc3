"""Stochastic AID-BiO (Ji, Yang & Liang 2021, "Bilevel optimization: convergence analysis
and enhanced design", ICML): conjugate gradient on one minibatch Hessian.

Iteration k (lower batches xi_t and xi, upper batch zeta)::

    y <- y - beta_k grad_y g(x, y; xi_t)                       (T times)
    v <- Q CG iterations on H_yy(xi) v = grad_y f(x, y; zeta)   (from the previous v)
    x <- P(x - alpha_k (grad_x f(x, y; zeta) - H_xy(xi) v))

The operator stays fixed (one minibatch xi) during CG; CG stops early when ``r.r == 0`` or
the curvature ``p.H p`` is not positive (v is kept). ``work = v`` (``res.state["work"]``).

Defaults: the paper's T warm-started lower steps and warm-started CG; chosen by measurement:
T = 10, ``alpha ~ k^-1/2`` with offset 100, and Q = 1 CG iteration per step
(``neumann_terms``, :data:`AID_CG_STEPS`). Q CG iterations on a dy-dimensional minibatch
system converge to ``H_yy(xi)^{-1} grad_y f`` when Q >= dy, and ``E[H_yy(xi)^{-1}] !=
H_yy^{-1}``: on ``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2, the tail
average) the relative distance to x* was 0.18-0.20 with Q = 10, 0.11 with Q = 2 and
0.02-0.03 with Q = 1, where the warm start averages v over the minibatches as SOBA's
v-iterate does.

The device loop has its own CG (kernels below) rather than ``mlocore.cuda._linalg``'s
``cg_device``: that solver reads the scalars back every iteration to test a residual
tolerance and stops early (fewer products); this one runs exactly Q iterations with no
read-back, the two breaks decided on the device, from a warm start with ``r = grad_y f - H
v``, so the iterates are the CPU kernel's (and the loop never synchronizes).
"""
import numpy as np
from numba import njit

from ._device import DeviceMethod, upper_step_kernel, cuda, dl, launch
from ._sampling import (ALPHA0, BETA0, DIVERGED, OK, Q_TERMS, T_INNER, draw, finite,
                        inner_sgd, joint_into, lower_xy, lower_yy, step_at, upper_grad,
                        upper_step)
from ._spec import MethodSpec, work_v

#: default CG iterations per step (``neumann_terms``): one, from the warm start
AID_CG_STEPS = 1


@njit(cache=True)
def run_aid(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
            samp_l, rng, proj, k0, n_iter, counts):
    """Stochastic AID-BiO (Ji, Yang & Liang 2021): T lower SGD steps; v by Q conjugate-
    gradient iterations on ``H_yy(xi) v = grad_y f(zeta)`` for one lower minibatch xi (the
    operator must stay fixed during CG), warm-started from the previous v (``work[:dy]``);
    then the projected upper step along ``grad_x f - H_xy(xi) v``."""
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    T = ipar[T_INNER]
    Q = ipar[Q_TERMS]
    v = work[:dy]
    for it in range(n_iter):
        k = k0 + it
        inner_sgd(lfns, largs, lflags, z, x, y, dx, step_at(fpar, BETA0, k), T, samp_l, rng, counts)
        joint_into(z, x, y)
        idx_u, _ = draw(samp_u, rng)
        gf = upper_grad(ufns, uargs, uflags, z, dx, idx_u, counts)
        idx_l, _ = draw(samp_l, rng)
        # CG on the fixed minibatch Hessian, from the warm start
        hv = lower_yy(lfns, largs, lflags, z, v, dx, idx_l, counts)
        r = gf[dx:] - hv
        p = r.copy()
        rr = r @ r
        for q in range(Q):
            if rr == 0.0:
                break
            hp = lower_yy(lfns, largs, lflags, z, p, dx, idx_l, counts)
            php = p @ hp
            if not php > 0.0:
                break  # non-positive curvature on this batch: keep the current v
            a = rr / php
            v += a * p
            r -= a * hp
            rr_new = r @ r
            p = r + (rr_new / rr) * p
            rr = rr_new
        hx = lower_xy(lfns, largs, lflags, z, v, dx, idx_l, counts)
        upper_step(x, gf[:dx] - hx, step_at(fpar, ALPHA0, k), proj)
        if not (finite(x) and finite(y) and finite(v)):
            return DIVERGED, it
    return OK, n_iter


# CG on one minibatch Hessian, breaks decided on the device ------------------------------
_CG_RR, _CG_PAP, _CG_RRNEW, _CG_STEP, _CG_STOP = 0, 1, 2, 3, 4


@cuda.jit
def _aid_residual_kernel(r, p, gf, h, dx):
    """``r = grad_y f - H_yy v`` (from the warm start v), ``p = r``."""
    for i in range(cuda.grid(1), r.shape[0], cuda.gridsize(1)):
        ri = gf[dx + i] - h[dx + i]
        r[i] = ri
        p[i] = ri


@cuda.jit
def _cg_reset_kernel(cg):
    if cuda.grid(1) == 0:
        cg[_CG_STOP] = 0.0


@cuda.jit
def _cg_gate_kernel(cg):
    """One thread: stop once ``r.r == 0`` or the curvature ``p.Hp`` is not > 0 (the CPU's two
    breaks; v is kept), else store the step ``r.r / p.Hp``."""
    if cuda.grid(1) != 0 or cg[_CG_STOP] != 0.0:
        return
    rr = cg[_CG_RR]
    php = cg[_CG_PAP]
    if rr == 0.0 or not php > 0.0:
        cg[_CG_STOP] = 1.0
    else:
        cg[_CG_STEP] = rr / php


@cuda.jit
def _cg_update_kernel(v, r, p, h, dx, cg):
    """``v += a p; r -= a H p`` unless stopped."""
    if cg[_CG_STOP] != 0.0:
        return
    a = cg[_CG_STEP]
    for i in range(cuda.grid(1), v.shape[0], cuda.gridsize(1)):
        v[i] += a * p[i]
        r[i] -= a * h[dx + i]


@cuda.jit
def _cg_direction_kernel(p, r, cg):
    """``p = r + (rr_new / rr) p`` unless stopped."""
    if cg[_CG_STOP] != 0.0:
        return
    beta = cg[_CG_RRNEW] / cg[_CG_RR]
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] = r[i] + beta * p[i]


@cuda.jit
def _cg_commit_kernel(cg):
    if cuda.grid(1) == 0 and cg[_CG_STOP] == 0.0:
        cg[_CG_RR] = cg[_CG_RRNEW]


class DeviceAid(DeviceMethod):
    """:func:`run_aid` on the device. CG's two breaks are decided on the device (no
    read-back): the remaining HVPs of the iteration are still called (and counted) but
    change nothing, so the iterates are the CPU's while the counts exceed the CPU's on a
    break."""

    def __init__(self, r):
        super().__init__(r)
        self.r_cg = dl.empty(r.dy)
        self.cg = dl.Scalars(r.counter)
        self.check = r.v

    def iteration(self, k):
        r = self.r
        dx, dy, z, v, h, cg = r.dx, r.dy, r.z, r.v, r.h, self.cg
        self.inner_sgd(k)
        r.upper.grad(z, r.samp_u.draw(), r.gf)
        idx_l = r.samp_l.draw()
        r.lower.hvp(z, r.wv, idx_l, h)
        p = r.wp[dx:]
        launch(_aid_residual_kernel, dy, self.r_cg, p, r.gf, h, dx)
        launch(_cg_reset_kernel, 1, cg.device)
        cg.dot(self.r_cg, self.r_cg, _CG_RR)
        for _ in range(r.Q):
            r.lower.hvp(z, r.wp, idx_l, h)
            cg.dot(p, h[dx:], _CG_PAP)
            launch(_cg_gate_kernel, 1, cg.device)
            launch(_cg_update_kernel, dy, v, self.r_cg, p, h, dx, cg.device)
            cg.dot(self.r_cg, self.r_cg, _CG_RRNEW)
            launch(_cg_direction_kernel, dy, p, self.r_cg, cg.device)
            launch(_cg_commit_kernel, 1, cg.device)
        r.lower.hvp(z, r.wv, idx_l, h)
        launch(upper_step_kernel, dx, z, r.gf, h, r.alpha_at(k), dx)
        self.project()

    def state_work(self):
        return self.r.v


SPEC = MethodSpec(run_aid, alpha_power=0.5, inner_steps=10, neumann_terms=AID_CG_STEPS,
                  uses=("inner_steps", "neumann_terms"), setup=work_v,
                  doc="stochastic AID-BiO: CG on a minibatch Hessian", device=DeviceAid)
