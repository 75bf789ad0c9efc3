"""Variance-reduced and corrected single-loop methods: STABLE, SUSTAIN, MRBO, VRBO.

Each entry is a :class:`mlocore._stochastic.MethodSpec` (see that module); the compiled
loops are in :mod:`mlocore._kernels.stoch_variance`.

Defaults (steps from the driver: ``alpha_0 = 0.5 / L_F``, ``beta_0 = 1 / L_g``):

- ``stable``: constant steps (the paper's ``alpha, beta ~ 1/sqrt(K)`` are constant over a
  horizon K), ``tau = 0.1``, ``hessian_floor = 1e-3 L_g``. Only the Hessians are averaged:
  the upper gradient noise is that of SGD, so with constant steps x ends in an SGD noise
  ball; pass ``step=Schedule(a, 0.5, 100)`` for a decaying step.
- ``sustain`` / ``mrbo``: steps ``s_0 (100 / (100 + k))^(1/3)``, momentum weights
  ``0.02 (s_k / s_0)^2``. On ``make_quadratic(5, 10, 200, 200, seed=0)`` (batch 32, 5000
  iterations, 3 seeds) the mean RMS distance to x* over the last 2000 iterations was 1.5
  (MRBO) / 3.2 (SUSTAIN) with weight 1 (no variance reduction), 1.2 / 2.6 with 0.1,
  0.9 / 1.7 with 0.02 and 0.9 / 1.4 with 0.01; 0.02 keeps a margin for the transient (the
  initial estimate's error decays over about 1/weight iterations).
- ``vrbo``: constant steps (as in the paper), ``period`` = number of lower minibatches.
"""
from __future__ import annotations

import numpy as np

from ._kernels import stoch_variance as _sv
from ._stochastic import MethodSpec
from ._validation import check_int, check_positive

#: STABLE's default Hessian averaging weight (see :func:`_setup_stable`).
STABLE_TAU = 0.1
#: STABLE's default eigenvalue floor, relative to the lower Lipschitz estimate L_g.
STABLE_FLOOR_REL = 1e-3
#: SUSTAIN / MRBO: default initial momentum weights (upper, lower); they decay like
#: ``(alpha_k / alpha_0)**2`` and ``(beta_k / beta_0)**2``.
SUSTAIN_MOMENTUM = (0.02, 0.02)
MRBO_MOMENTUM = (0.02, 0.02)
#: SUSTAIN / MRBO schedules: steps ~ (100 + k)^(-1/3) (the papers' (w + k)^(-1/3))
MOMENTUM_STEP_POWER = 1.0 / 3.0


def _setup_stable(ctx, opts):
    """STABLE: ``work = [started, H_yy, H_xy]``; ``fpar += [tau, hessian_floor]``.

    tau = 0.1 averages the minibatch Hessians over about 1/tau = 10 iterations: the Hessian
    noise (which biases ``H^{-1} grad_y f``, the inverse being nonlinear) drops by a factor
    ``tau / (2 - tau)`` ~ 1/19 in variance, while the lag (about 1/tau iterations) stays far
    below the upper level's time scale ``1 / (alpha mu_F)`` for the default steps.
    """
    tau = check_positive("tau", opts["tau"])
    if tau > 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    floor = opts["hessian_floor"]
    if floor is None:
        floor = STABLE_FLOOR_REL * ctx.lipschitz("lower")
    floor = check_positive("hessian_floor", floor)
    work = np.zeros(1 + ctx.dy * ctx.dy + ctx.dx * ctx.dy)
    return work, [tau, floor], []


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


def _setup_vrbo(ctx, opts):
    """VRBO: ``work = [h_g, h_f, x_prev, y_prev]``; ``ipar += [period]`` (default: the number
    of lower minibatches, one large-batch refresh per epoch of lower samples)."""
    period = opts["period"]
    period = ctx.n_batches_lower if period is None else check_int("period", period, 1)
    return np.zeros(2 * ctx.dy + 2 * ctx.dx), [], [period]


VARIANCE_METHODS = {
    "stable": MethodSpec(
        _sv.run_stable, uses=(), options={"tau": STABLE_TAU, "hessian_floor": None},
        setup=_setup_stable,
        doc="Chen, Sun & Yin 2022: averaged dense Hessians, corrected lower step"),
    "sustain": MethodSpec(
        _sv.run_double_momentum, alpha_power=MOMENTUM_STEP_POWER,
        beta_power=MOMENTUM_STEP_POWER, uses=("neumann_terms", "neumann_step"),
        options={"momentum": SUSTAIN_MOMENTUM[0], "inner_momentum": SUSTAIN_MOMENTUM[1]},
        setup=_momentum_setup(True),
        doc="Khanduri et al. 2021: STORM momentum on both levels, randomized Neumann"),
    "mrbo": MethodSpec(
        _sv.run_double_momentum, alpha_power=MOMENTUM_STEP_POWER,
        beta_power=MOMENTUM_STEP_POWER, uses=("neumann_terms", "neumann_step"),
        options={"momentum": MRBO_MOMENTUM[0], "inner_momentum": MRBO_MOMENTUM[1]},
        setup=_momentum_setup(False),
        doc="Yang, Ji & Liang 2021: STORM momentum on both levels, Neumann sum"),
    "vrbo": MethodSpec(
        _sv.run_vrbo, sampler="batches", uses=("neumann_terms", "neumann_step"),
        options={"period": None}, setup=_setup_vrbo,
        doc="Yang, Ji & Liang 2021: SPIDER recursions with a full-batch refresh every period"),
}
