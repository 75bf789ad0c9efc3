"""TTSA (Hong, Wai, Wang & Yang 2023, "A two-timescale stochastic algorithm framework for
bilevel optimization: complexity analysis and application to actor-critic", SIAM J.
Optim.): one lower step per upper step, on two timescales.

Iteration k (lower batches xi, xi'_j, xi''; upper batch zeta; q uniform on {0..Q-1})::

    y <- y - beta_k grad_y g(x, y; xi)
    v  = eta Q prod_{j<=q} (I - eta H_yy(xi'_j)) grad_y f(x, y; zeta)
    x <- P(x - alpha_k (grad_x f(x, y; zeta) - H_xy(xi'') v))

with ``alpha_k << beta_k``: the default schedules are ``alpha ~ k^-3/5``, ``beta ~
k^-2/5``. BSA's loop with T = 1 (:func:`mlocore.stochastic.stocbio.neumann_loop`).
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
