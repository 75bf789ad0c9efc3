"""StocBiO (Ji, Yang & Liang 2021, "Bilevel optimization: convergence analysis and
enhanced design", ICML): warm-started inner SGD and a Neumann-sum hypergradient.

Iteration k (lower batches xi_t, xi'_j, xi''; upper batch zeta)::

    y <- y - beta_k grad_y g(x, y; xi_t)                       (T times)
    v  = eta sum_{q<Q} prod_{j<=q} (I - eta H_yy(xi'_j)) grad_y f(x, y; zeta)
    x <- P(x - alpha_k (grad_x f(x, y; zeta) - H_xy(xi'') v))

(Q - 1 HVPs for v, a fresh lower minibatch per factor). The same loop with the randomized
truncation of :mod:`mlocore.stochastic.bsa` runs BSA and TTSA (:func:`neumann_loop`).

Defaults. From the paper: warm-started T inner steps, the Neumann sum with fresh batches.
Chosen by measurement: T = 10, Q = 10, ``eta = 1/L_g``, ``alpha ~ k^-1/2`` from ``0.5/L_F``
(offset 100), and the tail average of the last half (``average=0.5``, Polyak & Juditsky
1992; not in the paper). On ``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2;
benchmarks/stochastic_defaults.py) the relative distance to x* went from 0.06-0.09 (last
iterate) to 0.019-0.025.
"""
import numpy as np
from numba import njit

from ._device import (DeviceMethod, neumann_factor_kernel, neumann_step_kernel,
                      upper_step_kernel, dl, launch)
from ._sampling import (ALPHA0, BETA0, DIVERGED, ETA, OK, Q_TERMS, T_INNER, finite,
                        hypergrad_estimate, inner_sgd, joint_into, rand_int, step_at,
                        upper_step)
from ._spec import MethodSpec


@njit(cache=True)
def neumann_loop(ufns, uargs, lfns, largs, uflags, lflags, x, y, fpar, ipar, samp_u, samp_l, rng,
                 proj, k0, n_iter, counts, randomized):
    """T lower SGD steps, then the projected upper step along the Neumann hypergradient
    estimate (summed, or randomized with ``randomized``)."""
    dx = x.shape[0]
    z = np.empty(dx + y.shape[0])
    T = ipar[T_INNER]
    Q = ipar[Q_TERMS]
    eta = fpar[ETA]
    for it in range(n_iter):
        k = k0 + it
        inner_sgd(lfns, largs, lflags, z, x, y, dx, step_at(fpar, BETA0, k), T, samp_l, rng, counts)
        joint_into(z, x, y)
        h = hypergrad_estimate(ufns, uargs, lfns, largs, uflags, lflags, z, dx, eta, Q, samp_u,
                               samp_l, rng, counts, randomized)
        upper_step(x, h, step_at(fpar, ALPHA0, k), proj)
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


@njit(cache=True)
def run_stocbio(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar,
                samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """StocBiO (Ji, Yang & Liang 2021): T warm-started lower SGD steps, then the upper step
    with ``v = eta sum_{q<Q} prod_{j<=q} (I - eta H_j) grad_y f`` (Q - 1 HVPs)."""
    return neumann_loop(ufns, uargs, lfns, largs, uflags, lflags, x, y, fpar, ipar, samp_u,
                        samp_l, rng, proj, k0, n_iter, counts, False)


class DeviceNeumann(DeviceMethod):
    """:func:`neumann_loop` on the device: StocBiO (Neumann sum, Q - 1 HVPs) or, with
    ``randomized``, BSA / TTSA (q HVPs, q uniform on {0..Q-1} from the host SplitMix64
    stream, drawn after the upper batch as on the CPU)."""

    randomized = False

    def iteration(self, k):
        r = self.r
        dx, dy, Q, z, eta = r.dx, r.dy, r.Q, r.z, r.par[2]
        self.inner_sgd(k)
        r.upper.grad(z, r.samp_u.draw(), r.gf)
        p = r.wp[dx:]
        dl.copy(r.gf[dx:], p)
        if not self.randomized:
            dl.copy(r.gf[dx:], r.acc)
            for _ in range(1, Q):
                r.lower.hvp(z, r.wp, r.samp_l.draw(), r.h)
                launch(neumann_factor_kernel, dy, p, r.acc, r.h, dx, eta)
            dl.scale_into(r.v, eta, r.acc)
        else:
            for _ in range(rand_int(r.hrng, Q)):
                r.lower.hvp(z, r.wp, r.samp_l.draw(), r.h)
                launch(neumann_step_kernel, dy, p, r.h, dx, eta)
            dl.scale_into(r.v, eta * Q, p)
        r.lower.hvp(z, r.wv, r.samp_l.draw(), r.h)
        launch(upper_step_kernel, dx, z, r.gf, r.h, r.alpha_at(k), dx)
        self.project()


SPEC = MethodSpec(run_stocbio, alpha_power=0.5, inner_steps=10,
                  doc="Ji, Yang & Liang 2021: Neumann sum, warm-started inner SGD",
                  device=DeviceNeumann)
