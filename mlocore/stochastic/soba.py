"""SOBA (Dagreou, Ablin, Vaiter & Moreau 2022, "A framework for bilevel optimization that
enables stochastic and global variance reduction algorithms", NeurIPS): joint single-loop
steps on y, v and x.

Iteration k (lower batch xi, upper batch zeta)::

    y <- y - rho_k grad_y g(x, y; xi)
    v <- v - rho_k (H_yy(xi) v - grad_y f(x, y; zeta))
    x <- P(x - gamma_k (grad_x f(x, y; zeta) - H_xy(xi) v))

with ``rho = beta`` and ``gamma = alpha`` schedules (mlocore's sign convention: v tends to
``H_yy^{-1} grad_y f``). ``work = v`` (``res.state["work"]``).

Defaults. From the paper: the joint steps and decaying steps ``gamma ~ k^-3/5``, ``rho ~
k^-2/5``. Chosen by measurement: the initial steps ``0.5/L_F``, ``1/L_g``, the offset 100,
and the tail average of the last half (``average=0.5``, Polyak & Juditsky 1992; not in the
paper). On ``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2;
benchmarks/stochastic_defaults.py) the relative distance to x* went from 0.10-0.21 (last
iterate) to 0.012-0.015.
"""
import numpy as np
from numba import njit

from ._device import DeviceMethod, cuda, launch
from ._sampling import (ALPHA0, BETA0, DIVERGED, OK, draw, finite, joint_into, lower_cross,
                        lower_grad_y, step_at, upper_grad, upper_step)
from ._spec import MethodSpec, work_v


@njit(cache=True)
def run_soba(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
             samp_l, rng, proj, k0, n_iter, counts):
    """SOBA (Dagreou et al. 2022): joint single-loop steps on y, v and x::

        y <- y - rho_k grad_y g(xi)
        v <- v - rho_k (H_yy(xi) v - grad_y f(zeta))
        x <- P(x - gamma_k (grad_x f(zeta) - H_xy(xi) v))

    with ``rho = beta`` and ``gamma = alpha`` schedules and ``v = work[:dy]``
    (mlocore's sign convention: v tends to ``H_yy^{-1} grad_y f``)."""
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    v = work[:dy]
    for it in range(n_iter):
        k = k0 + it
        rho = step_at(fpar, BETA0, k)
        gamma = step_at(fpar, ALPHA0, k)
        joint_into(z, x, y)
        idx_l, _ = draw(samp_l, rng)
        idx_u, _ = draw(samp_u, rng)
        gg = lower_grad_y(lfns, largs, lflags, z, dx, idx_l, counts)
        hx, hy = lower_cross(lfns, largs, lflags, z, v, dx, idx_l, counts)
        gf = upper_grad(ufns, uargs, uflags, z, dx, idx_u, counts)
        for i in range(dy):
            y[i] -= rho * gg[i]
            v[i] -= rho * (hy[i] - gf[dx + i])
        upper_step(x, gf[:dx] - hx, gamma, proj)
        if not (finite(x) and finite(y) and finite(v)):
            return DIVERGED, it
    return OK, n_iter


@cuda.jit
def _soba_update_kernel(z, v, gg, h, gf, dx, rho, gamma):
    """SOBA's joint step, with gg = grad g(xi), h = H_g(xi) (0, v), gf = grad f(zeta), all
    over z = (x, y)::

        y <- y - rho grad_y g;  v <- v - rho (H_yy v - grad_y f);
        x <- x - gamma (grad_x f - H_xy v)
    """
    for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        if i < dx:
            z[i] -= gamma * (gf[i] - h[i])
        else:
            z[i] -= rho * gg[i]
            v[i - dx] -= rho * (h[i] - gf[i])


class DeviceSoba(DeviceMethod):
    """:func:`run_soba` on the device (one fused kernel per step)."""

    def __init__(self, r):
        super().__init__(r)
        self.check = r.v

    def iteration(self, k):
        r = self.r
        rho = r.beta_at(k)
        gamma = r.alpha_at(k)
        idx_l = r.samp_l.draw()
        idx_u = r.samp_u.draw()
        r.lower.grad(r.z, idx_l, r.gg)
        r.lower.hvp(r.z, r.wv, idx_l, r.h)
        r.upper.grad(r.z, idx_u, r.gf)
        launch(_soba_update_kernel, r.n, r.z, r.v, r.gg, r.h, r.gf, r.dx, rho, gamma)
        self.project()

    def state_work(self):
        return self.r.v


SPEC = MethodSpec(run_soba, alpha_power=0.6, beta_power=0.4, uses=(), setup=work_v,
                  doc="Dagreou et al. 2022: joint steps on y, v, x", device=DeviceSoba)
