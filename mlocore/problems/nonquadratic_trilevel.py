"""A non-quadratic trilevel problem (log-cosh plus quadratic levels), and its device problem.

``make_nonquadratic_trilevel(dims=(2, 2, 2), seed=0, scale=1.0) -> NonquadraticTrilevel``:
the innermost best response is nonlinear in (x, y), so the best-response curvature terms of
the n-level recursion matter. Every level is ``sum_m c_m log cosh(G_m.z + b_m) + z.P z / 2 +
q.z`` through the shared callbacks ``logcosh_quad_grad/hvp/value/tvp`` (args
``(G, b, c, P, q)``); nested reference solver (``solve_all``, ``F``, ``hypergrad_fd``, ...).

Device callbacks (CUDA backend, compiled at their first launch; no device ``tvp``: the device
engine takes third-order products by central differences of hvp)::

    logcosh_quad_grad_device(z, out, G, b, c, P, q)   out <- G^T (c tanh(G z + b)) + P z + q
    logcosh_quad_hvp_device(z, v, out, G, b, c, P, q) out <- G^T (c sech^2(G z + b) G v) + P v
    logcosh_quad_value_device(z, G, b, c, P, q)
    nonquadratic_trilevel_device_problem(nt)          # nt = make_nonquadratic_trilevel(...)
"""
from __future__ import annotations

import math
import numbers

import numba
import numpy as np
from numba import cuda

from .._problem import MultilevelProblem, Objective
from ._multilevel_base import (_c64, _check_dims, _device_empty, _device_objective,
                               _device_problem, _device_sum, _launch, _spd,
                               _TrilevelReference)

__all__ = ["NonquadraticTrilevel", "make_nonquadratic_trilevel", "logcosh_quad_grad",
           "logcosh_quad_hvp", "logcosh_quad_value", "logcosh_quad_tvp",
           "logcosh_quad_grad_device", "logcosh_quad_hvp_device", "logcosh_quad_value_device",
           "nonquadratic_trilevel_device_problem"]


@numba.njit(cache=True)
def _logcosh(t):
    a = abs(t)
    return a + np.log1p(np.exp(-2.0 * a)) - np.log(2.0)


@numba.njit(cache=True)
def logcosh_quad_value(z, G, b, c, P, q):
    """``sum_i c_i log cosh(G_i.z + b_i) + z.P z / 2 + q.z``."""
    s = G @ z + b
    out = 0.0
    for i in range(s.shape[0]):
        out += c[i] * _logcosh(s[i])
    return out + 0.5 * (z @ (P @ z)) + q @ z


@numba.njit(cache=True)
def logcosh_quad_grad(z, G, b, c, P, q):
    """``G^T (c * tanh(G z + b)) + P z + q``."""
    s = G @ z + b
    return G.T @ (c * np.tanh(s)) + P @ z + q


@numba.njit(cache=True)
def logcosh_quad_hvp(z, v, G, b, c, P, q):
    """``G^T (c * sech^2(G z + b) * G v) + P v``."""
    s = G @ z + b
    t = np.tanh(s)
    return G.T @ (c * (1.0 - t * t) * (G @ v)) + P @ v


@numba.njit(cache=True)
def logcosh_quad_tvp(z, u, w, G, b, c, P, q):
    """``G^T (c * l'''(G z + b) * G u * G w)`` with ``l''' = -2 tanh sech^2``."""
    s = G @ z + b
    t = np.tanh(s)
    return G.T @ (c * (-2.0 * t * (1.0 - t * t)) * (G @ u) * (G @ w))


#: max |d^3/dt^3 log cosh t| = 4 / (3 sqrt 3), at tanh t = 1 / sqrt 3.
_LOGCOSH_D3_MAX = 4.0 / (3.0 * np.sqrt(3.0))


class NonquadraticTrilevel(_TrilevelReference):
    """A trilevel problem with a nonlinear innermost best response.

    Over ``z = concat(x, y, w)`` (sizes ``dims = (dx, dy, dw)``; the third block is the
    z of docs/mathematics.md), every level is ``f_k(z) = sum_i c_i log cosh(G_i.z + b_i) + z.P_k z / 2 + q_k.z``
    (shared callbacks ``logcosh_quad_*`` with ``args = (G_k, b_k, c_k, P_k, q_k)``):

    - level 3: ``G_3 = [-A, -B, I]``, ``P_3 = blockdiag(0, 0, S_3)`` (S_3 SPD), so
      ``f_3 = sum_i c3_i log cosh(w_i - (A x + B y + b)_i) + w.S_3 w / 2 + q.w``. Its Hessian
      in w is ``S_3 + diag(c3 sech^2) >= lambda_min(S_3) I``: strongly convex, and the best
      response solves ``S_3 w + q + c3 * tanh(w - A x - B y - b) = 0``, which is
      NONLINEAR in (x, y). Its second derivatives (third derivatives of f_3) enter the
      level-2 reduced Hessian, so the curvature terms of docs/mathematics.md section 3 matter.
    - level 2: log-cosh terms over all of z (bounded slopes) plus ``y.(S_2 + mu I) y / 2 +
      x.K y``. ``mu`` is set from a bound on ``|g_w| |d2 w*/dy2|`` (with
      ``|l'''| <= 4/(3 sqrt 3)``) so that ``phi_2(x, .)`` is strongly convex (modulus
      ``>= lambda_min(S_2) >= 1``) for every x.
    - level 1: log-cosh terms over all of z plus a positive definite quadratic.

    Nothing is known in closed form: :meth:`solve_all` (nested Newton to 1e-12),
    :meth:`F`, :meth:`hypergrad_fd` (central differences of F) and :meth:`dy_dx_fd` are the
    reference oracles, and :meth:`implicit_derivatives` evaluates the formulas of
    docs/mathematics.md section 3 densely (with or without curvature terms).

    Attributes
    ----------
    problem : MultilevelProblem
        All levels have grad, hvp, value and tvp.
    dims : tuple (dx, dy, dw)
    params : list of 3 tuples ``(G_k, b_k, c_k, P_k, q_k)``
    mu : float
        The shift added to level 2's y-block.
    """

    def __init__(self, params, dims, mu):
        self.dims = tuple(dims)
        self.params = [tuple(_c64(a) for a in p) for p in params]
        self.mu = float(mu)
        self.problem = MultilevelProblem(
            levels=[Objective(logcosh_quad_grad, hvp=logcosh_quad_hvp, value=logcosh_quad_value,
                              tvp=logcosh_quad_tvp, args=p) for p in self.params],
            dims=self.dims)

    def __repr__(self):
        return f"NonquadraticTrilevel(dims={self.dims})"


def make_nonquadratic_trilevel(dims=(2, 2, 2), seed=0, scale=1.0):
    """A random :class:`NonquadraticTrilevel` (see there for the construction).

    Parameters
    ----------
    dims : (dx, dy, dw)
        Small sizes (the reference solver is dense and nested); 1 to 3 each is typical.
    seed : int or numpy.random.Generator
        Seed of ``numpy.random.default_rng``.
    scale : float > 0
        Scale of the level-3 couplings A, B (larger: more nonlinear best response).
    """
    dx, dy, dw = _check_dims(dims, 3)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0 \
            or not np.isfinite(scale):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    rng = np.random.default_rng(seed)
    N = dx + dy + dw
    sx, sy, sw = slice(0, dx), slice(dx, dx + dy), slice(dx + dy, N)
    # level 3
    A = scale * rng.standard_normal((dw, dx))
    B = scale * rng.standard_normal((dw, dy))
    G3 = np.hstack([-A, -B, np.eye(dw)])
    b3 = 0.5 * rng.standard_normal(dw)
    c3 = rng.uniform(2.0, 4.0, dw)
    S3 = _spd(rng, dw, 1.0, 1.25)
    P3 = np.zeros((N, N))
    P3[sw, sw] = S3
    q3 = np.zeros(N)
    q3[sw] = 0.5 * rng.standard_normal(dw)
    # level 2
    m2 = dw + 1
    G2 = rng.standard_normal((m2, N))
    b2 = 0.5 * rng.standard_normal(m2)
    c2 = rng.uniform(0.5, 1.5, m2)
    q2 = 0.5 * rng.standard_normal(N)
    S2 = _spd(rng, dy, 1.0, 2.0)
    # Strong convexity of phi_2 in y, for every x. Along a direction v in y,
    # u' = (dw*/dy - B) v = -(S3 + D)^{-1} S3 B v with D = diag(c3 sech^2(u)) >= 0, so
    # |u'| <= kappa(S3) |B| |v|; differentiating S3 w + q + c3 tanh(u) = 0 twice gives
    # (S3 + D) w*'' = -c3 l3(u) u'^2 (l3 = third derivative of log cosh), hence
    # |w*''| <= c3_max max|l3| kappa(S3)^2 |B|^2 |v|^2 / lambda_min(S3). With
    # |g_w| <= sum_i c2_i |G2_i,w| + |q2_w| (|tanh| <= 1) the curvature term
    # sum_k (g_w)_k w*_k'' is at least -mu |v|^2, while the rest of d2 phi_2 / dy2 is
    # >= S2 + mu I (the log-cosh composite part is positive semidefinite).
    ev3 = np.linalg.eigvalsh(S3)
    kappa3 = ev3[-1] / ev3[0]
    nB = np.linalg.norm(B, 2)
    d2w = c3.max() * _LOGCOSH_D3_MAX * (kappa3 * nB) ** 2 / ev3[0]
    gw = np.sum(c2 * np.linalg.norm(G2[:, sw], axis=1)) + np.linalg.norm(q2[sw])
    mu = gw * d2w
    # x-y coupling scaled with the y-curvature, so that y* moves with x at rate O(1).
    K = 0.5 * (1.0 + mu) * rng.standard_normal((dx, dy))
    P2 = np.zeros((N, N))
    P2[sy, sy] = S2 + mu * np.eye(dy)
    P2[sx, sy] = K
    P2[sy, sx] = K.T
    # level 1
    m1 = 2
    G1 = rng.standard_normal((m1, N))
    b1 = 0.5 * rng.standard_normal(m1)
    c1 = rng.uniform(0.5, 1.5, m1)
    P1 = _spd(rng, N, 0.5, 1.5)
    q1 = rng.standard_normal(N)
    params = [(G1, b1, c1, P1, q1), (G2, b2, c2, P2, q2), (G3, b3, c3, P3, q3)]
    return NonquadraticTrilevel(params, (dx, dy, dw), mu)


# ---------------------------------------------------------------------------------------
# Device callbacks (CUDA backend)
# ---------------------------------------------------------------------------------------
@cuda.jit
def _logcosh_weights_kernel(z, v, G, b, c, second, r):
    """``r_m = c_m tanh(s_m)`` (second=False) or ``c_m (1 - tanh(s_m)^2) (G v)_m``, with
    ``s = G z + b``; one thread per row of G."""
    N = G.shape[1]
    for m in range(cuda.grid(1), G.shape[0], cuda.gridsize(1)):
        s = b[m]
        for j in range(N):
            s += G[m, j] * z[j]
        t = math.tanh(s)
        if second:
            gv = 0.0
            for j in range(N):
                gv += G[m, j] * v[j]
            r[m] = c[m] * (1.0 - t * t) * gv
        else:
            r[m] = c[m] * t


@cuda.jit
def _logcosh_combine_kernel(z, G, r, P, q, lin, out):
    """``out = G^T r + P z + lin q``, one thread per entry."""
    M = G.shape[0]
    N = P.shape[1]
    for i in range(cuda.grid(1), P.shape[0], cuda.gridsize(1)):
        s = 0.0
        for m in range(M):
            s += G[m, i] * r[m]
        p = 0.0
        for j in range(N):
            p += P[i, j] * z[j]
        out[i] = s + p + lin * q[i]


@cuda.jit
def _logcosh_value_terms_kernel(z, G, b, c, P, q, terms):
    """Per-entry terms whose sum is the value: ``c_i log cosh(s_i)`` for the rows of G
    (``i < M``) plus ``z_i ((P z)_i / 2 + q_i)``; terms has length ``max(M, N)``."""
    M = G.shape[0]
    N = P.shape[1]
    for i in range(cuda.grid(1), terms.shape[0], cuda.gridsize(1)):
        acc = 0.0
        if i < M:
            s = b[i]
            for j in range(N):
                s += G[i, j] * z[j]
            a = abs(s)
            acc += c[i] * (a + math.log1p(math.exp(-2.0 * a)) - math.log(2.0))
        if i < N:
            p = 0.0
            for j in range(N):
                p += P[i, j] * z[j]
            acc += z[i] * (0.5 * p + q[i])
        terms[i] = acc


def logcosh_quad_grad_device(z, out, G, b, c, P, q):
    """Device callback ``out <- G^T (c * tanh(G z + b)) + P z + q``."""
    r = _device_empty(G.shape[0])
    _launch(_logcosh_weights_kernel, G.shape[0], z, z, G, b, c, False, r)
    _launch(_logcosh_combine_kernel, z.shape[0], z, G, r, P, q, 1.0, out)


def logcosh_quad_hvp_device(z, v, out, G, b, c, P, q):
    """Device callback ``out <- G^T (c * sech^2(G z + b) * G v) + P v``."""
    r = _device_empty(G.shape[0])
    _launch(_logcosh_weights_kernel, G.shape[0], z, v, G, b, c, True, r)
    _launch(_logcosh_combine_kernel, v.shape[0], v, G, r, P, q, 0.0, out)


def logcosh_quad_value_device(z, G, b, c, P, q):
    """``sum_m c_m log cosh(G_m.z + b_m) + z.P z / 2 + q.z`` (one uncounted read-back)."""
    n_terms = max(G.shape[0], z.shape[0])
    terms = _device_empty(n_terms)
    _launch(_logcosh_value_terms_kernel, n_terms, z, G, b, c, P, q, terms)
    return _device_sum(terms)


def nonquadratic_trilevel_device_problem(nt):
    """The device version of ``nt.problem`` for the log-cosh trilevel problem.

    Parameters
    ----------
    nt : NonquadraticTrilevel
        From :func:`mlocore.problems.make_nonquadratic_trilevel`; its innermost best response
        is nonlinear, so the curvature terms of docs/mathematics.md section 3 matter.

    Returns
    -------
    DeviceMultilevelProblem
        Levels with grad, hvp and value callbacks (no tvp: the device engine differences
        hvp); the 15 arrays of ``nt.params`` are copied to the device once.
    """
    if not isinstance(nt, NonquadraticTrilevel):
        raise TypeError("nonquadratic_trilevel_device_problem expects a NonquadraticTrilevel "
                        f"(from make_nonquadratic_trilevel), got {type(nt).__name__}")
    levels = [_device_objective(logcosh_quad_grad_device, hvp=logcosh_quad_hvp_device,
                                value=logcosh_quad_value_device, args=params)
              for params in nt.params]
    return _device_problem(levels, nt.dims)
