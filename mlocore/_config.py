"""Tunables in one place (tests may patch them). The backend default: :mod:`mlocore._backend`."""
from __future__ import annotations

#: relative step for central-difference Hessian-vector products: eps**(1/3)
FD_REL_STEP = 6.0e-6
#: power-iteration steps used to estimate the largest Hessian eigenvalue
POWER_ITERS = 30
#: safety factor applied to power-iteration estimates (they approach lambda_max from below)
LIPSCHITZ_SAFETY = 1.05
#: joint size up to which the CPU n-level engine (n >= 4) takes the recursion in dense form
#: (one reduced product per variable of the levels below, then Cholesky solves); for n = 3
#: only up to DENSE_LEVELS_SMALL_SIZE, since two nested CG solves of well-conditioned levels
#: take fewer products than forming the blocks
DENSE_LEVELS_MAX_SIZE = 256
DENSE_LEVELS_SMALL_SIZE = 32
