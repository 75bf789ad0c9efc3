"""SUSTAIN (Khanduri, Zeng, Hong, Wai, Wang & Yang 2021, "A near-optimal algorithm for
stochastic bilevel optimization via double-momentum", NeurIPS): STORM momentum on both
levels with the randomized Neumann estimator.

Iteration k: MRBO's recursion (:mod:`mlocore.stochastic.mrbo`, same loop
``run_double_momentum``) with ``Fhat`` built from ``eta Q prod_{j<=q} (I - eta H_j)
grad_y f``, q uniform on {0..Q-1} (the same q at both points)::

    h_g^k = grad_y g(z_k; xi_k) + (1 - eta_g^k) (h_g^{k-1} - grad_y g(z_{k-1}; xi_k))
    h_f^k = Fhat(z_k; B_k) + (1 - eta_f^k) (h_f^{k-1} - Fhat(z_{k-1}; B_k))
    y_{k+1} = y_k - beta_k h_g^k,    x_{k+1} = P(x_k - alpha_k h_f^k)

Defaults as MRBO's: steps ``~ (100 + k)^(-1/3)`` (but ``s_0 = 0.4 * 0.5 / L_F``, measured:
F 0.105 on the breast cancer problem of ``python -m mlocore``, 0.168 with ``0.5 / L_F``),
momentum weights ``0.02 (s_k / s_0)^2`` (the form from the paper, the constants chosen by
measurement), and the tail average of the last half (``average=0.5``, Polyak & Juditsky
1992; not in the paper). On
``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2;
benchmarks/stochastic_defaults.py) the relative distance to x* was 0.018-0.061 for the last
iterate and 0.013-0.046 for the average.
"""
from .mrbo import double_momentum_spec

#: default initial momentum weights (upper, lower)
SUSTAIN_MOMENTUM = (0.02, 0.02)
#: default alpha0 = SUSTAIN_STEP_SAFETY * STEP_SAFETY / L_F (measured, as MRBO_STEP_SAFETY;
#: the randomized Neumann estimator is noisier than MRBO's sum)
SUSTAIN_STEP_SAFETY = 0.4

SPEC = double_momentum_spec(
    SUSTAIN_MOMENTUM, True,
    "Khanduri et al. 2021: STORM momentum on both levels, randomized Neumann",
    SUSTAIN_STEP_SAFETY)
