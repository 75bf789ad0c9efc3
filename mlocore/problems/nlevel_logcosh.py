"""An n-level non-quadratic chain (log-cosh plus quadratic levels), without closed forms.

``make_nlevel_logcosh(n=4, dims=None, seed=1) -> NLevelLogcosh``: every level is
``f_k(z) = sum_m c_m log cosh(G_m.z + b_m) + z.P_k z / 2 + q_k.z`` through the shared
callbacks ``logcosh_quad_grad/hvp/value/tvp`` of :mod:`mlocore.problems.nonquadratic_trilevel`
(args ``(G_k, b_k, c_k, P_k, q_k)``). The log-cosh terms couple all levels, so every best
response is nonlinear and the best-response curvature terms of docs/mathematics.md section 3
matter at every depth. The reference is central differences of F, with F evaluated by
mlocore's nested solves (:meth:`NLevelLogcosh.F`, :meth:`NLevelLogcosh.hypergrad_fd`).
"""
from __future__ import annotations

import numpy as np

from .._multilevel import LevelFailure, MultilevelEngine
from .._problem import MultilevelProblem, Objective
from ._multilevel_base import _c64, _check_dims, _check_int
from .nonquadratic_trilevel import (logcosh_quad_grad, logcosh_quad_hvp, logcosh_quad_tvp,
                                    logcosh_quad_value)

__all__ = ["NLevelLogcosh", "make_nlevel_logcosh"]


class NLevelLogcosh:
    """An n-level chain of log-cosh plus quadratic levels (see :func:`make_nlevel_logcosh`).

    Attributes
    ----------
    problem : MultilevelProblem
        Every level with grad, hvp, value and tvp callbacks.
    n, dims : number of levels and block sizes
    params : list of n tuples ``(G_k, b_k, c_k, P_k, q_k)``
    """

    def __init__(self, params, dims):
        self.dims = _check_dims(dims)
        self.n = len(self.dims)
        self.params = [tuple(_c64(a) for a in p) for p in params]
        self.problem = MultilevelProblem(
            [Objective(logcosh_quad_grad, hvp=logcosh_quad_hvp, value=logcosh_quad_value,
                       tvp=logcosh_quad_tvp, args=p) for p in self.params], self.dims)

    def __repr__(self):
        return f"NLevelLogcosh(n={self.n}, dims={self.dims})"

    def solve_all(self, x1, lower_tol=1e-11):
        """The joint vector with levels 2..n solved for x_1 (mlocore's nested solves, from
        zeros); a ValueError when a level fails."""
        x1 = np.asarray(x1, dtype=np.float64).ravel()
        if x1.shape != (self.dims[0],):
            raise ValueError(f"x_1 must have shape ({self.dims[0]},), got shape={x1.shape}")
        z = np.concatenate([x1, np.zeros(sum(self.dims[1:]))])
        eng = MultilevelEngine(self.problem, "exact", lower_tol=lower_tol)
        try:
            return eng.solve_from(z, 1)
        except LevelFailure as fail:
            raise ValueError(f"the lower levels could not be solved: {fail.detail}") from None

    def F(self, x1, lower_tol=1e-11):
        """``F(x_1) = f_1(z*(x_1))``."""
        return float(logcosh_quad_value(self.solve_all(x1, lower_tol), *self.params[0]))

    def hypergrad_fd(self, x1, h=1e-4, lower_tol=1e-11):
        """Central differences of F (error O(h^2) plus about lower_tol / h)."""
        x1 = np.asarray(x1, dtype=np.float64)
        return np.array([(self.F(x1 + h * e, lower_tol) - self.F(x1 - h * e, lower_tol))
                         / (2.0 * h) for e in np.eye(x1.size)])


def make_nlevel_logcosh(n=4, dims=None, seed=1):
    """A random :class:`NLevelLogcosh`.

    Level k (1-based) has three log-cosh terms ``c_m log cosh(G_m.z + b_m)`` over all of z
    (rows of G standard normal times ``1.5 / sqrt(max(dims))``, ``c ~ U(0.5, 1.5)``), the
    quadratic ``x_k.x_k / 2`` times 0.5 (k = 1) or 3 (k >= 2) with a coupling ``0.5
    x_k.x_{k-1}`` (diagonal), and a linear term ``0.5 N(0, 1)``. The quadratic part makes
    each ``f_k`` strongly convex in ``x_k``; the reduced objectives are not guaranteed
    strongly convex for every x (the solves report a failing level), and are at the
    small sizes used in tests and benchmarks. With ``dims = (1,) * 4`` and seed 1 this is
    the four-level family of the tests.

    Parameters
    ----------
    n : int >= 2
    dims : sequence of n ints, optional
        Default ``(1,) * n``.
    seed : int or numpy.random.Generator
        Seed of ``numpy.random.default_rng``.
    """
    n = _check_int("n", n, 2)
    dims = _check_dims((1,) * n if dims is None else dims, n)
    rng = np.random.default_rng(seed)
    N = sum(dims)
    off = np.concatenate([[0], np.cumsum(dims)])
    scale = 1.5 / np.sqrt(max(dims))
    params = []
    for k in range(n):
        G = rng.standard_normal((3, N)) * scale
        b = rng.standard_normal(3)
        c = rng.uniform(0.5, 1.5, 3)
        P = np.zeros((N, N))
        sk = slice(off[k], off[k + 1])
        P[sk, sk] = (3.0 if k > 0 else 0.5) * np.eye(dims[k])
        if k > 0:
            C = 0.5 * np.eye(dims[k], dims[k - 1])
            P[sk, off[k - 1]:off[k]] = C
            P[off[k - 1]:off[k], sk] = C.T
        q = rng.standard_normal(N) * 0.5
        params.append((G, b, c, P, q))
    return NLevelLogcosh(params, dims)
