"""TTSA (Hong, Wai, Wang & Yang 2023, "A two-timescale stochastic algorithm framework for
bilevel optimization: complexity analysis and application to actor-critic", SIAM J.
Optim.): one lower step per upper step, on two timescales.

Iteration k (lower batches xi, xi'_j, xi''; upper batch zeta; q uniform on {0..Q-1})::

    y <- y - beta_k grad_y g(x, y; xi)
    v  = eta Q prod_{j<=q} (I - eta H_yy(xi'_j)) grad_y f(x, y; zeta)
    x <- P(x - alpha_k (grad_x f(x, y; zeta) - H_xy(xi'') v))

with ``alpha_k << beta_k``: the default schedules are ``alpha ~ k^-3/5``, ``beta ~
k^-2/5``. BSA's loop with T = 1 (:func:`mlocore.stochastic.stocbio.neumann_loop`).

Defaults. From the paper: one lower step per upper step and the powers 3/5, 2/5. Chosen by
measurement: the initial steps ``0.5/L_F``, ``1/L_g``, the offset 100, Q = 10, and the tail
average of the last half (``average=0.5``, Polyak & Juditsky 1992; not in the paper). On
``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2;
benchmarks/stochastic_defaults.py) the relative distance to x* went from 0.08-0.21 (last
iterate) to 0.016-0.044.
"""
from numba import njit

from ._spec import MethodSpec
from .bsa import DeviceRandomizedNeumann
from .stocbio import neumann_loop


@njit(cache=True)
def run_ttsa(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
             samp_l, rng, proj, k0, n_iter, counts):
    """TTSA (Hong et al. 2023): one lower SGD step with ``beta_k``, then one projected upper
    step with ``alpha_k << beta_k`` along the randomized-Neumann hypergradient estimate
    (the default schedules are ``alpha ~ k^-3/5``, ``beta ~ k^-2/5``)."""
    return neumann_loop(ufns, uargs, lfns, largs, uflags, lflags, x, y, fpar, ipar, samp_u,
                        samp_l, rng, proj, k0, n_iter, counts, True)


SPEC = MethodSpec(run_ttsa, alpha_power=0.6, beta_power=0.4, inner_steps=1,
                  doc="Hong et al. 2023: two timescales, alpha ~ k^-3/5, beta ~ k^-2/5",
                  device=DeviceRandomizedNeumann)
