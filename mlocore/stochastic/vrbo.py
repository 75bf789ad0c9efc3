"""VRBO (Yang, Ji & Liang 2021, "Provably faster algorithms for bilevel optimization",
NeurIPS): SPIDER / SARAH recursions with a full-batch refresh every ``period`` iterations.

Iteration k (``Fhat``: the summed Neumann hypergradient estimate, Q terms; B: minibatches
used at both points)::

    if k % period == 0:  h_g = grad_y g(z_k; full),  h_f = Fhat(z_k; full batches)
    else:                h_g += grad_y g(z_k; B) - grad_y g(z_{k-1}; B)
                         h_f += Fhat(z_k; B) - Fhat(z_{k-1}; B)
    y_{k+1} = y_k - beta_k h_g,    x_{k+1} = P(x_k - alpha_k h_f)

Defaults: constant steps (as in the paper), ``period`` = the number of lower minibatches;
the initial steps ``0.5/L_F``, ``1/L_g`` and Q = 10 chosen by measurement. The last iterate
is returned (``average=0``): the iterates converge to the fixed point of the truncated
hypergradient (0.0029 of |x*| on ``make_quadratic(5, 10)``, the Neumann truncation).
``ipar = [..., period]``; ``work = [h_g (dy), h_f (dx), x_prev (dx), y_prev (dy)]``.
"""
import numpy as np
from numba import njit

from .._validation import check_int
from ._device import DeviceEstimates
from ._sampling import (DIVERGED, ETA, N_IPAR, OK, Q_TERMS, draw, full_index, joint_into,
                        lower_grad_pair, neumann_pair, steps_from_estimates)
from ._spec import MethodSpec

VRBO_PERIOD = N_IPAR


@njit(cache=True)
def run_vrbo(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
             samp_l, rng, proj, k0, n_iter, counts):
    """VRBO (Yang, Ji & Liang 2021) with one lower step per upper step::

        if k % period == 0:  h_g = grad_y g(z_k; full),  h_f = Fhat(z_k; full batches)
        else:                h_g += grad_y g(z_k; B) - grad_y g(z_{k-1}; B)
                             h_f += Fhat(z_k; B) - Fhat(z_{k-1}; B)   (same batches)
        y_{k+1} = y_k - beta_k h_g,    x_{k+1} = P(x_k - alpha_k h_f)

    ``Fhat`` is the summed Neumann hypergradient estimate (Q terms); ``period =
    ipar[N_IPAR]``. The paper runs m lower steps (each with its own recursive update) per
    upper step; this is the m = 1 simplification.

    Notes
    -----
    Assumes g strongly convex in y, smooth f and g with Lipschitz Hessians and mean-squared
    Lipschitz per-sample oracles. Between refreshes the estimates are biased only by the
    Neumann truncation, so with constant steps the iterates converge to the fixed point of
    the truncated hypergradient (not a noise ball). Cost: a refresh is one full-batch lower
    gradient, one full-batch upper gradient and Q full-batch lower HVPs; a recursive
    iteration is 2 lower and 2 upper minibatch gradients and 2 Q lower minibatch HVPs.
    """
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    zp = np.empty(dx + dy)
    Q = ipar[Q_TERMS]
    period = ipar[VRBO_PERIOD]
    eta = fpar[ETA]
    hg = work[0:dy]
    hf = work[dy:dy + dx]
    xp = work[dy + dx:dy + 2 * dx]
    yp = work[dy + 2 * dx:2 * dy + 2 * dx]
    for it in range(n_iter):
        k = k0 + it
        joint_into(z, x, y)
        if k % period == 0:
            idx = full_index(largs, samp_l)
            g1, _ = lower_grad_pair(lfns, largs, lflags, z, z, False, dx, idx, counts)
            f1, _ = neumann_pair(ufns, uargs, lfns, largs, uflags, lflags, z, z, False, dx, eta,
                                  Q, False, True, samp_u, samp_l, rng, counts)
            hg[:] = g1
            hf[:] = f1
        else:
            joint_into(zp, xp, yp)
            idx, _ = draw(samp_l, rng)
            g1, g0 = lower_grad_pair(lfns, largs, lflags, z, zp, True, dx, idx, counts)
            f1, f0 = neumann_pair(ufns, uargs, lfns, largs, uflags, lflags, z, zp, True, dx, eta,
                                   Q, False, False, samp_u, samp_l, rng, counts)
            for i in range(dy):
                hg[i] += g1[i] - g0[i]
            for i in range(dx):
                hf[i] += f1[i] - f0[i]
        if not steps_from_estimates(x, y, xp, yp, hg, hf, fpar, k, proj):
            return DIVERGED, it
    return OK, n_iter


def _setup_vrbo(ctx, opts):
    """VRBO: ``work = [h_g, h_f, x_prev, y_prev]``; ``ipar += [period]`` (default: the number
    of lower minibatches, one large-batch refresh per epoch of lower samples)."""
    period = opts["period"]
    period = ctx.n_batches_lower if period is None else check_int("period", period, 1)
    return np.zeros(2 * ctx.dy + 2 * ctx.dx), [], [period]


class DeviceVrbo(DeviceEstimates):
    """:func:`run_vrbo` on the device."""

    offset = 0

    def __init__(self, r):
        super().__init__(r)
        self.period = int(r.iextra[0])

    def iteration(self, k):
        r = self.r
        refresh = k % self.period == 0
        idx = r.samp_l.full_idx() if refresh else r.samp_l.draw()
        self.new_estimates(idx, not refresh, refresh)
        self.update(0 if refresh else 2)
        self.step(k)


SPEC = MethodSpec(
    run_vrbo, sampler="batches", uses=("neumann_terms", "neumann_step"), average=0.0,
    options={"period": None}, setup=_setup_vrbo,
    doc="Yang, Ji & Liang 2021: SPIDER recursions with a full-batch refresh every period",
    device=DeviceVrbo)
