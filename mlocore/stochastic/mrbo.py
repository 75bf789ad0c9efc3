"""MRBO (Yang, Ji & Liang 2021, "Provably faster algorithms for bilevel optimization",
NeurIPS) and the STORM double-momentum loop it shares with SUSTAIN
(:mod:`mlocore.stochastic.sustain`).

Iteration k (lower batch xi_k; the hypergradient estimate ``Fhat`` with the Neumann sum of
Q terms, evaluated with the same minibatches at both points)::

    h_g^k = grad_y g(z_k; xi_k) + (1 - eta_g^k) (h_g^{k-1} - grad_y g(z_{k-1}; xi_k))
    h_f^k = Fhat(z_k; B_k) + (1 - eta_f^k) (h_f^{k-1} - Fhat(z_{k-1}; B_k))
    y_{k+1} = y_k - beta_k h_g^k,    x_{k+1} = P(x_k - alpha_k h_f^k)

Defaults: steps ``s_0 (100 / (100 + k))^(1/3)`` with ``s_0 = 0.5 * 0.5 / L_F`` (the factor
measured on the breast cancer problem of ``python -m mlocore``: with ``0.5 / L_F`` the first
steps throw x onto the bounds, F 0.168; with it F 0.098), momentum weights ``eta^k = 0.02 (s_k /
s_0)^2``. On ``make_quadratic(5, 10, 200, 200, seed=0)`` (batch 32, 5000 iterations, 3
seeds) the mean RMS distance to x* over the last 2000 iterations was 1.5 (MRBO) / 3.2
(SUSTAIN) with weight 1 (no variance reduction), 1.2 / 2.6 with 0.1, 0.9 / 1.7 with 0.02
and 0.9 / 1.4 with 0.01; 0.02 keeps a margin for the transient (the initial estimate's
error decays over about 1/weight iterations).

The form of the schedules is the paper's, the constants were chosen by measurement; the
result is the tail average of the last half (``average=0.5``, Polyak & Juditsky 1992; not in
the paper) (on ``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2;
benchmarks/stochastic_defaults.py): 0.016-0.066 for the last iterate, 0.015-0.032 for the
average).

``fpar = [..., momentum, inner_momentum]``, ``ipar = [..., randomized]``; ``work =
[started, h_g (dy), h_f (dx), x_prev (dx), y_prev (dy)]``.
"""
from numba import njit
import numpy as np

from .._validation import check_positive
from ._device import DeviceEstimates, dl
from ._sampling import (ALPHA0, BETA0, DIVERGED, ETA, N_FPAR, N_IPAR, OK, Q_TERMS, draw,
                        joint_into, lower_grad_pair, neumann_pair, step_at,
                        steps_from_estimates)
from ._spec import MethodSpec

#: SUSTAIN / MRBO: default initial momentum weights (upper, lower); they decay like
#: ``(alpha_k / alpha_0)**2`` and ``(beta_k / beta_0)**2``.
MRBO_MOMENTUM = (0.02, 0.02)
#: SUSTAIN / MRBO schedules: steps ~ (100 + k)^(-1/3) (the papers' (w + k)^(-1/3))
MOMENTUM_STEP_POWER = 1.0 / 3.0
#: MRBO: default alpha0 = MRBO_STEP_SAFETY * STEP_SAFETY / L_F (measured: the recursion
#: starts from one minibatch estimate and carries its error for about 1 / weight iterations,
#: so a step fitted to the mean curvature L_F at x0 is too long for it)
MRBO_STEP_SAFETY = 0.5
# method parameter slots
MOM_UPPER, MOM_LOWER = N_FPAR, N_FPAR + 1
MOM_RANDOMIZED = N_IPAR


@njit(cache=True)
def _momentum_weight(fpar, base, slot, k):
    """``min(1, m * (s_k / s_0)**2)``: the STORM weight ``c * s_k**2`` with ``c = m / s_0**2``
    for the schedule at ``fpar[base:base+3]`` and ``m = fpar[slot]``."""
    r = step_at(fpar, base, k) / fpar[base]
    w = fpar[slot] * r * r
    return w if w < 1.0 else 1.0


@njit(cache=True)
def run_double_momentum(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar,
                        samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """STORM double momentum on both levels: SUSTAIN (Khanduri et al. 2021) and MRBO (Yang,
    Ji & Liang 2021) share this structure and differ in their schedules and constants (and
    in the Neumann estimator: randomized for SUSTAIN, summed for MRBO; ``ipar[N_IPAR]``)::

        h_g^k = grad_y g(z_k; xi_k) + (1 - eta_g^k) (h_g^{k-1} - grad_y g(z_{k-1}; xi_k))
        h_f^k = Fhat(z_k; B_k) + (1 - eta_f^k) (h_f^{k-1} - Fhat(z_{k-1}; B_k))
        y_{k+1} = y_k - beta_k h_g^k,    x_{k+1} = P(x_k - alpha_k h_f^k)

    ``Fhat`` is the Neumann hypergradient estimate, evaluated with the same minibatches (and
    the same random truncation) at both points. ``eta_f^k = min(1, m_f (alpha_k/alpha_0)^2)``,
    ``eta_g^k = min(1, m_g (beta_k/beta_0)^2)`` with ``(m_f, m_g) = fpar[N_FPAR:N_FPAR+2]``.
    At the first iteration (``work[0] == 0``) both are plain minibatch estimates.

    Notes
    -----
    Both papers use steps ``~ (w + k)^(-1/3)`` and momentum weights ``c * step_k^2`` and
    assume g strongly convex in y, f and g smooth with Lipschitz Hessians, and per-sample
    (mean-squared) Lipschitz oracles, which is what makes the same-batch differences small.
    Cost per iteration (after the first): 2 lower gradients, 2 upper gradients and, per
    point, the Neumann HVPs (Q - 1 for the sum, q < Q for the randomized estimator) plus one
    cross product ``H_xy v``: about 2 (Q + 1) lower HVPs with the sum.
    """
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    zp = np.empty(dx + dy)
    Q = ipar[Q_TERMS]
    randomized = ipar[MOM_RANDOMIZED] != 0
    eta = fpar[ETA]
    hg = work[1:1 + dy]
    hf = work[1 + dy:1 + dy + dx]
    xp = work[1 + dy + dx:1 + dy + 2 * dx]
    yp = work[1 + dy + 2 * dx:1 + 2 * dy + 2 * dx]
    for it in range(n_iter):
        k = k0 + it
        two = work[0] != 0.0
        joint_into(z, x, y)
        joint_into(zp, xp, yp)
        idx, _ = draw(samp_l, rng)
        g1, g0 = lower_grad_pair(lfns, largs, lflags, z, zp, two, dx, idx, counts)
        f1, f0 = neumann_pair(ufns, uargs, lfns, largs, uflags, lflags, z, zp, two, dx, eta, Q,
                               randomized, False, samp_u, samp_l, rng, counts)
        if two:
            wg = 1.0 - _momentum_weight(fpar, BETA0, MOM_LOWER, k)
            wf = 1.0 - _momentum_weight(fpar, ALPHA0, MOM_UPPER, k)
            for i in range(dy):
                hg[i] = g1[i] + wg * (hg[i] - g0[i])
            for i in range(dx):
                hf[i] = f1[i] + wf * (hf[i] - f0[i])
        else:
            hg[:] = g1
            hf[:] = f1
            work[0] = 1.0
        if not steps_from_estimates(x, y, xp, yp, hg, hf, fpar, k, proj):
            return DIVERGED, it
    return OK, n_iter


def _momentum_setup(randomized):
    def setup(ctx, opts):
        m = []
        for name in ("momentum", "inner_momentum"):
            val = check_positive(name, opts[name])
            if val > 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {val!r}")
            m.append(val)
        work = np.zeros(1 + 2 * ctx.dy + 2 * ctx.dx)
        return work, m, [1 if randomized else 0]
    return setup


class DeviceDoubleMomentum(DeviceEstimates):
    """:func:`run_double_momentum` on the device (``randomized`` for SUSTAIN)."""

    offset = 1

    def __init__(self, r):
        super().__init__(r)
        self.m_upper, self.m_lower = float(r.fextra[0]), float(r.fextra[1])
        self.randomized = int(r.iextra[0]) != 0

    def _weight(self, which, k):
        """``min(1, m (s_k / s_0)^2)`` (the CPU ``_momentum_weight``)."""
        r = self.r
        s0 = r.par[which]
        ratio = (r.alpha_at(k) if which == 0 else r.beta_at(k)) / s0
        w = (self.m_upper if which == 0 else self.m_lower) * ratio * ratio
        return w if w < 1.0 else 1.0

    def iteration(self, k):
        two = self.started[0] != 0
        self.new_estimates(self.r.samp_l.draw(), two, False)
        if two:
            self.update(1, 1.0 - self._weight(1, k), 1.0 - self._weight(0, k))
        else:
            self.update(0)
            dl.fill(self.work[0:1], 1.0)
            self.started[0] = 1
        self.step(k)


def double_momentum_spec(momentum, randomized, doc, step_safety):
    """The specification of a STORM double-momentum method (MRBO, SUSTAIN): default
    momentum weights ``momentum = (upper, lower)``, the randomized Neumann estimator or the
    sum, default ``alpha0 = step_safety * STEP_SAFETY / L_F``."""
    return MethodSpec(
        run_double_momentum, alpha_power=MOMENTUM_STEP_POWER,
        beta_power=MOMENTUM_STEP_POWER, alpha_safety=step_safety,
        uses=("neumann_terms", "neumann_step"),
        options={"momentum": momentum[0], "inner_momentum": momentum[1]},
        setup=_momentum_setup(randomized), doc=doc, device=DeviceDoubleMomentum)


SPEC = double_momentum_spec(
    MRBO_MOMENTUM, False, "Yang, Ji & Liang 2021: STORM momentum on both levels, Neumann sum",
    MRBO_STEP_SAFETY)
