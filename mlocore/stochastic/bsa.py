"""BSA (Ghadimi & Wang 2018, "Approximation methods for bilevel programming"): a double
loop with the randomized Neumann estimator.

Iteration k (lower batches xi_t, xi'_j, xi''; upper batch zeta; q uniform on {0..Q-1})::

    y <- y - beta_k grad_y g(x, y; xi_t)                       (T times)
    v  = eta Q prod_{j<=q} (I - eta H_yy(xi'_j)) grad_y f(x, y; zeta)
    x <- P(x - alpha_k (grad_x f(x, y; zeta) - H_xy(xi'') v))

v is unbiased for the truncated series ``eta sum_{q<Q} (I - eta H_yy)^q grad_y f`` (q HVPs).
The loop is StocBiO's (:func:`mlocore.stochastic.stocbio.neumann_loop`).

Defaults. From the paper: T lower steps per upper step, the randomized Neumann estimator,
steps of order ``1/sqrt(k)``. Chosen by measurement: T = 10, Q = 10, ``eta = 1/L_g``,
``alpha_0 = 0.5/L_F`` with ``alpha ~ (100/(100 + k))^(1/2)``, and the tail average of the
last half (``average=0.5``, Polyak & Juditsky 1992; not in the paper). On
``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2;
benchmarks/stochastic_defaults.py) the relative distance to x* went from 0.09-0.20 (last
iterate) to 0.017-0.040.
"""
from numba import njit

from ._spec import MethodSpec
from .stocbio import DeviceNeumann, neumann_loop


@njit(cache=True)
def run_bsa(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
            samp_l, rng, proj, k0, n_iter, counts):
    """BSA (Ghadimi & Wang 2018): T lower SGD steps, then a projected upper step along
    ``grad_x f - H_xy v`` with v from the randomized Neumann estimator
    (``eta Q prod_{j<=q}(I - eta H_j) grad_y f``, q uniform on {0..Q-1})."""
    return neumann_loop(ufns, uargs, lfns, largs, uflags, lflags, x, y, fpar, ipar, samp_u,
                        samp_l, rng, proj, k0, n_iter, counts, True)


class DeviceRandomizedNeumann(DeviceNeumann):
    """:func:`run_bsa` (and TTSA's loop) on the device."""

    randomized = True


SPEC = MethodSpec(run_bsa, alpha_power=0.5, inner_steps=10,
                  doc="Ghadimi & Wang 2018: randomized Neumann, double loop",
                  device=DeviceRandomizedNeumann)
