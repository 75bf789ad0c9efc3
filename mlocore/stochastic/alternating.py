"""Alternating SGD: the baseline that ignores the implicit term.

Iteration k (lower batches xi_t, upper batch zeta)::

    y <- y - beta_k grad_y g(x, y; xi_t)        (T times)
    x <- P(x - alpha_k grad_x f(x, y; zeta))

Biased unless ``grad_y f = 0`` at the solution: the hypergradient's implicit term
``-H_xy H_yy^{-1} grad_y f`` is dropped (see e.g. Ghadimi & Wang 2018, "Approximation
methods for bilevel programming", for the corrected double loop).

Defaults (mlocore's): T = 1, ``alpha ~ k^-1/2`` from ``0.5/L_F`` (offset 100), the tail
average of the last half (``average=0.5``). The bias stays: on ``make_quadratic(5, 10)``
the returned x is about 0.6 |x*| from x*.
"""
import numpy as np
from numba import njit

from ._device import DeviceMethod, cuda, launch
from ._sampling import (ALPHA0, BETA0, DIVERGED, OK, T_INNER, draw, finite, inner_sgd,
                        joint_into, step_at, upper_grad, upper_step)
from ._spec import MethodSpec


@njit(cache=True)
def run_alternating(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar,
                    samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """T lower SGD steps, then ``x <- P(x - alpha grad_x f(x, y; zeta))``: the implicit term
    is ignored (the baseline; biased unless grad_y f = 0 at the solution)."""
    dx = x.shape[0]
    z = np.empty(dx + y.shape[0])
    T = ipar[T_INNER]
    for it in range(n_iter):
        k = k0 + it
        inner_sgd(lfns, largs, lflags, z, x, y, dx, step_at(fpar, BETA0, k), T, samp_l, rng, counts)
        joint_into(z, x, y)
        idx, _ = draw(samp_u, rng)
        g = upper_grad(ufns, uargs, uflags, z, dx, idx, counts)
        upper_step(x, g[:dx], step_at(fpar, ALPHA0, k), proj)
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


@cuda.jit
def _upper_grad_step_kernel(z, gf, alpha, dx):
    """``x <- x - alpha grad_x f`` (the alternating baseline's upper step)."""
    for i in range(cuda.grid(1), dx, cuda.gridsize(1)):
        z[i] -= alpha * gf[i]


class DeviceAlternating(DeviceMethod):
    """:func:`run_alternating` on the device."""

    def iteration(self, k):
        r = self.r
        self.inner_sgd(k)
        r.upper.grad(r.z, r.samp_u.draw(), r.gf)
        launch(_upper_grad_step_kernel, r.dx, r.z, r.gf, r.alpha_at(k), r.dx)
        self.project()


SPEC = MethodSpec(run_alternating, alpha_power=0.5, uses=("inner_steps",),
                  doc="T lower SGD steps, then an upper SGD step on grad_x f",
                  device=DeviceAlternating)
