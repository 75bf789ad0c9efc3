"""Random n-level quadratics with closed-form best responses, and their device callbacks.

Levels k = 1..n over the joint vector ``z = concat(x_1, ..., x_n)``: ``f_k(z) = z.P_k z / 2 +
q_k.z`` with P_k symmetric, through the shared callbacks ``quadform_grad/hvp/value/tvp`` (args
``(P_k, q_k)``); every best response is affine, so the hypergradient, x_1* and F* are closed
forms. Builder: ``make_nlevel_quadratic(n=3, dims=None, seed=0, cond=4.0) -> NLevelQuadratic``.

Device callbacks (CUDA backend, "one large problem" mode, one thread per output entry, a
dense row of P each; compiled at their first launch)::

    quadform_grad_device(z, out, P, q)     out <- P z + q
    quadform_hvp_device(z, v, out, P, q)   out <- P v
    quadform_value_device(z, P, q)         z.P z / 2 + q.z
    nlevel_quadratic_device_problem(q)     # q = make_nlevel_quadratic(...)

The builder puts every ``(P_k, q_k)`` on the device once (counted in the problem's
``transfers``); the closed forms stay on the host object.
"""
from __future__ import annotations

import numbers

import numba
import numpy as np
from numba import cuda

from .._problem import BilevelProblem, MultilevelProblem, Objective
from ._multilevel_base import (_c64, _check_dims, _check_int, _device_empty, _device_objective,
                               _device_problem, _device_sum, _launch, _spd)

__all__ = ["NLevelQuadratic", "make_nlevel_quadratic", "quadform_grad", "quadform_hvp",
           "quadform_value", "quadform_tvp", "quadblock_grad", "quadblock_hvp",
           "quadblock_value", "quadblock_tvp", "quadblock_hvp_block", "quadblock_grad_block",
           "quadform_grad_device", "quadform_hvp_device", "quadform_value_device",
           "nlevel_quadratic_device_problem"]


# =======================================================================================
# Shared quadratic callbacks: f(z) = z.P z / 2 + q.z, P symmetric.
# =======================================================================================
@numba.njit(cache=True)
def quadform_value(z, P, q):
    """``z.P z / 2 + q.z`` (P symmetric)."""
    return 0.5 * (z @ (P @ z)) + q @ z


@numba.njit(cache=True)
def quadform_grad(z, P, q):
    """``P z + q``."""
    return P @ z + q


@numba.njit(cache=True)
def quadform_hvp(z, v, P, q):
    """``P v``."""
    return P @ v


@numba.njit(cache=True)
def quadform_tvp(z, u, w, P, q):
    """Third-order product: zero."""
    return np.zeros(z.shape[0])


# The same quadratic with the multilevel block oracles: args ``(P, q, off)``, ``off`` the
# int64 block offsets (0, d_1, d_1 + d_2, .., N); levels i, j are 1-based.
@numba.njit(cache=True)
def quadblock_value(z, P, q, off):
    """``z.P z / 2 + q.z``."""
    return 0.5 * (z @ (P @ z)) + q @ z


@numba.njit(cache=True)
def quadblock_grad(z, P, q, off):
    """``P z + q``."""
    return P @ z + q


@numba.njit(cache=True)
def quadblock_hvp(z, v, P, q, off):
    """``P v``."""
    return P @ v


@numba.njit(cache=True)
def quadblock_tvp(z, u, w, P, q, off):
    """Third-order product: zero."""
    return np.zeros(z.shape[0])


@numba.njit(cache=True)
def quadblock_hvp_block(z, v, i, j, P, q, off):
    """``P[x_i, x_j] v`` (length d_i)."""
    lo, hi, a = off[i - 1], off[i], off[j - 1]
    out = np.zeros(hi - lo)
    for r in range(lo, hi):
        s = 0.0
        for c in range(v.shape[0]):
            s += P[r, a + c] * v[c]
        out[r - lo] = s
    return out


@numba.njit(cache=True)
def quadblock_grad_block(z, i, P, q, off):
    """``(P z + q)[x_i]`` (length d_i)."""
    lo, hi = off[i - 1], off[i]
    out = np.empty(hi - lo)
    for r in range(lo, hi):
        s = q[r]
        for c in range(z.shape[0]):
            s += P[r, c] * z[c]
        out[r - lo] = s
    return out


class NLevelQuadratic:
    """An n-level quadratic ``f_k(z) = z.P_k z / 2 + q_k.z`` with its closed-form solution.

    Built by :func:`make_nlevel_quadratic` (random) or directly from matrices. The best
    responses are affine and computed backwards (k = n, n-1, .., 2): with the total map
    ``x_>k* = M_k x_<=k + m_k`` of the levels below k, the reduced objective is the quadratic

        phi_k(x_<=k) = x.H_k x / 2 + g_k.x + c_k,
        H_k = E_k^T P_k E_k,  g_k = E_k^T (P_k e_k + q_k),  E_k = [I; M_k],  e_k = [0; m_k],

    and its minimizer over the last block ``x_k`` (with ``x_<k`` fixed) is
    ``x_k* = A_k x_<k + a_k``, ``A_k = -(H_k)_{kk}^{-1} (H_k)_{k,<k}``,
    ``a_k = -(H_k)_{kk}^{-1} (g_k)_k`` (a Schur-complement elimination). Substituting it in
    ``M_k`` gives ``M_{k-1}``. At the top, ``F = phi_1`` has Hessian ``Q = H_1`` and
    ``grad F(x_1) = Q x_1 + r`` with ``r = g_1``; equivalently, by the chain rule through the
    affine best responses, ``grad F(x_1) = E_1^T (P_1 z*(x_1) + q_1)``. When Q is positive
    definite, ``x_1* = -Q^{-1} r``.

    For n = 2 this is the ordinary bilevel quadratic: ``A_2 = -P_yy^{-1} P_yx`` (the lower
    Jacobian J) and ``grad F = grad_x f_1 + J^T grad_y f_1`` (see :meth:`as_bilevel`).

    Parameters
    ----------
    P : sequence of n symmetric (N, N) arrays, N = sum(dims)
    q : sequence of n (N,) arrays
    dims : sequence of n positive ints
    declare_quadratic : bool
        Build the levels with ``Objective(quadratic=True)``: the n-level recursion then
        skips the best-response curvature terms (zero here) instead of evaluating them
        (for n >= 4, nested central differences). Default False.
    block_oracles : bool
        Build the levels with the multilevel block oracles ``hvp_block`` / ``grad_block``
        (``quadblock_*`` callbacks, args ``(P_k, q_k, offsets)``). Default False.

    Raises
    ------
    ValueError
        Bad shapes, non-symmetric P_k, or a level k >= 2 whose reduced Hessian block
        ``(H_k)_{kk}`` is not positive definite.

    Attributes
    ----------
    problem : MultilevelProblem
        Every level uses the shared callbacks ``quadform_grad/hvp/value/tvp`` with
        ``args = (P_k, q_k)``, declared ``quadratic`` when ``declare_quadratic``.
    n, dims, offsets, size : the number of levels, block sizes, block offsets, N
    P, q : tuple of ndarray
    response_maps : dict {k: (A_k, a_k)}, k = 2..n
        Local best response ``x_k*(x_<k) = A_k x_<k + a_k``.
    total_maps : dict {k: (M_k, m_k)}, k = 1..n-1
        Total best response of all lower levels, ``x_>k* = M_k x_<=k + m_k``.
    reduced_quadratics : dict {k: (H_k, g_k, c_k)}, k = 1..n
    jacobian : ndarray, shape (N - d_1, d_1)
        ``d x_>1* / d x_1 = M_1``.
    z_intercept : ndarray, shape (N,)
        ``z*(0)``.
    Q, r : Hessian of F and ``grad F(0)``.
    F_convex : bool
        Whether Q is positive definite.
    x_star : ndarray or None
        ``-Q^{-1} r`` (None when Q is not positive definite).
    F_star : float or None
    """

    def __init__(self, P, q, dims, declare_quadratic=False, block_oracles=False):
        dims = _check_dims(dims)
        n = len(dims)
        if n < 2:
            raise ValueError(f"an n-level quadratic needs at least 2 levels, got dims={dims}")
        P = [np.asarray(Pk, dtype=np.float64) for Pk in P]
        q = [np.asarray(qk, dtype=np.float64) for qk in q]
        if len(P) != n or len(q) != n:
            raise ValueError(f"need {n} matrices P and {n} vectors q, got {len(P)} and {len(q)}")
        N = int(sum(dims))
        for k, (Pk, qk) in enumerate(zip(P, q), start=1):
            if Pk.shape != (N, N) or qk.shape != (N,):
                raise ValueError(f"P_{k} must have shape ({N}, {N}) and q_{k} shape ({N},), got "
                                 f"shape={Pk.shape} and shape={qk.shape}")
            if not np.allclose(Pk, Pk.T, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(Pk).max())):
                raise ValueError(f"P_{k} must be symmetric")
        self.P = tuple(_c64(0.5 * (Pk + Pk.T)) for Pk in P)
        self.q = tuple(_c64(qk) for qk in q)
        self.dims = dims
        self.n = n
        self.offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(dims)]))
        self.size = N
        self._solve()
        if block_oracles:
            off = np.array(self.offsets, dtype=np.int64)
            levels = [Objective(quadblock_grad, hvp=quadblock_hvp, value=quadblock_value,
                                tvp=quadblock_tvp, args=(Pk, qk, off),
                                hvp_block=quadblock_hvp_block, grad_block=quadblock_grad_block,
                                quadratic=bool(declare_quadratic))
                      for Pk, qk in zip(self.P, self.q)]
        else:
            levels = [Objective(quadform_grad, hvp=quadform_hvp, value=quadform_value,
                                tvp=quadform_tvp, args=(Pk, qk),
                                quadratic=bool(declare_quadratic))
                      for Pk, qk in zip(self.P, self.q)]
        self.problem = MultilevelProblem(levels=levels, dims=dims)

    def _solve(self):
        n, N, off = self.n, self.size, self.offsets
        M = np.zeros((0, N))
        m = np.zeros(0)
        self.response_maps, self.total_maps, self.reduced_quadratics = {}, {}, {}
        for k in range(n, 0, -1):
            Dk = off[k]
            E = np.vstack([np.eye(Dk), M])
            e = np.concatenate([np.zeros(Dk), m])
            Pk, qk = self.P[k - 1], self.q[k - 1]
            H = E.T @ Pk @ E
            H = 0.5 * (H + H.T)
            g = E.T @ (Pk @ e + qk)
            c = 0.5 * e @ (Pk @ e) + qk @ e
            self.reduced_quadratics[k] = (_c64(H), _c64(g), float(c))
            if k < n:
                self.total_maps[k] = (_c64(M), _c64(m))
            if k == 1:
                break
            D0 = off[k - 1]
            Hkk = H[D0:, D0:]
            ev = np.linalg.eigvalsh(Hkk)
            if not (np.all(np.isfinite(ev)) and ev[0] > 1e-12 * max(1.0, abs(ev[-1]))):
                raise ValueError(f"level {k}: the reduced Hessian block d2 phi_{k} / dx_{k}^2 "
                                 f"has eigenvalues in [{ev[0]:.3g}, {ev[-1]:.3g}]; it must be "
                                 "positive definite")
            A = -np.linalg.solve(Hkk, H[D0:, :D0])
            a = -np.linalg.solve(Hkk, g[D0:])
            self.response_maps[k] = (_c64(A), _c64(a))
            # x_>=k as a function of x_<k: [A u + a; M[:, :D0] u + M[:, D0:] (A u + a) + m]
            Ml, Mr = M[:, :D0], M[:, D0:]
            M = np.vstack([A, Ml + Mr @ A])
            m = np.concatenate([a, Mr @ a + m])
        H1, g1, _ = self.reduced_quadratics[1]
        self.Q, self.r = H1, g1
        self.jacobian = self.total_maps[1][0]
        self.z_intercept = _c64(np.concatenate([np.zeros(self.dims[0]), self.total_maps[1][1]]))
        ev = np.linalg.eigvalsh(self.Q)
        self.F_convex = bool(ev[0] > 1e-12 * max(1.0, abs(ev[-1])))
        if self.F_convex:
            self.x_star = _c64(-np.linalg.solve(self.Q, self.r))
            self.F_star = self.F(self.x_star)
        else:
            self.x_star = None
            self.F_star = None

    def __repr__(self):
        return f"NLevelQuadratic(n={self.n}, dims={self.dims})"

    def block(self, k):
        """The slice of z holding x_k (k = 1..n)."""
        return slice(self.offsets[k - 1], self.offsets[k])

    def _x1(self, x1):
        x1 = np.asarray(x1, dtype=np.float64)
        if x1.shape != (self.dims[0],):
            raise ValueError(f"x_1 must have shape ({self.dims[0]},), got shape={x1.shape}")
        return x1

    def complete(self, x_upper):
        """Joint vector z with levels below k solved, given ``x_upper = concat(x_1..x_k)``.

        k is read from the length of ``x_upper`` (which must be ``d_1 + .. + d_k``).
        """
        u = np.asarray(x_upper, dtype=np.float64).ravel()
        if u.shape[0] == self.size:
            return _c64(u)
        try:
            k = self.offsets.index(u.shape[0])
        except ValueError:
            raise ValueError(f"x_upper has length {u.shape[0]}; expected one of "
                             f"{self.offsets[1:]}") from None
        if k == 0:
            raise ValueError("x_upper must hold at least x_1")
        M, m = self.total_maps[k]
        return _c64(np.concatenate([u, M @ u + m]))

    def response(self, k, x_above):
        """Local best response ``x_k*(x_<k) = A_k x_<k + a_k`` (k = 2..n)."""
        if k not in self.response_maps:
            raise ValueError(f"k must be in 2..{self.n}, got {k!r}")
        A, a = self.response_maps[k]
        return A @ np.asarray(x_above, dtype=np.float64) + a

    def phi(self, k, x_upper):
        """Reduced objective ``phi_k(x_1..x_k) = f_k`` at the completed joint vector."""
        return float(quadform_value(self.complete(x_upper), self.P[k - 1], self.q[k - 1]))

    def best_response(self, x1):
        """Joint vector ``z*(x_1)`` with every lower level solved."""
        return self.complete(self._x1(x1))

    def F(self, x1):
        """``F(x_1) = f_1(z*(x_1))``."""
        return float(quadform_value(self.best_response(x1), self.P[0], self.q[0]))

    def hypergrad(self, x1):
        """Exact ``grad F(x_1) = E_1^T (P_1 z* + q_1) = grad_x1 f_1 + M_1^T grad_x>1 f_1``."""
        x1 = self._x1(x1)
        g = self.P[0] @ self.best_response(x1) + self.q[0]
        d1 = self.dims[0]
        return g[:d1] + self.jacobian.T @ g[d1:]

    def as_bilevel(self):
        """For n = 2: the same problem as a :class:`mlocore.BilevelProblem`."""
        if self.n != 2:
            raise ValueError(f"as_bilevel needs n = 2 levels, this problem has {self.n}")
        up, lo = self.problem.levels
        return BilevelProblem(upper=up, lower=lo, dims=self.dims)


def make_nlevel_quadratic(n=3, dims=None, seed=0, cond=4.0, declare_quadratic=False,
                          block_oracles=False):
    """A random n-level quadratic with strongly convex levels and a closed-form solution.

    Each ``P_k`` is a random symmetric positive definite matrix over the whole joint vector
    (a random rotation of eigenvalues uniform in ``[1, cond]``) and ``q_k`` is standard
    normal. Since E_k has full column rank, every reduced Hessian ``H_k = E_k^T P_k E_k`` is
    then positive definite (with ``lambda_min >= 1``), so every level's reduced problem and F
    itself are strongly convex.

    Parameters
    ----------
    n : int >= 2
    dims : sequence of n ints, optional
        Default ``(2, 3, 4, 2, 3, 4, ...)`` (``(2, 3, 4)`` for n = 3).
    seed : int or numpy.random.Generator
        Seed of ``numpy.random.default_rng``.
    cond : float >= 1
        Spread of the eigenvalues of each P_k.
    declare_quadratic : bool
        Declare the levels ``Objective(quadratic=True)`` (see :class:`NLevelQuadratic`).
    block_oracles : bool
        Give the levels the block oracles ``hvp_block`` / ``grad_block``.

    Returns
    -------
    NLevelQuadratic
    """
    n = _check_int("n", n, 2)
    if dims is None:
        dims = tuple(2 + (k % 3) for k in range(n))
    dims = _check_dims(dims, n)
    if isinstance(cond, bool) or not isinstance(cond, numbers.Real) or not cond >= 1.0 \
            or not np.isfinite(cond):
        raise ValueError(f"cond must be a finite number >= 1, got {cond!r}")
    rng = np.random.default_rng(seed)
    N = sum(dims)
    P = [_spd(rng, N, 1.0, float(cond)) for _ in range(n)]
    q = [rng.standard_normal(N) for _ in range(n)]
    return NLevelQuadratic(P, q, dims, declare_quadratic, block_oracles)


# ---------------------------------------------------------------------------------------
# Device callbacks (CUDA backend)
# ---------------------------------------------------------------------------------------
@cuda.jit
def _quadform_affine_kernel(z, P, q, lin, out):
    """``out = P z + lin q``, one thread per row (row-order summation)."""
    N = P.shape[1]
    for i in range(cuda.grid(1), P.shape[0], cuda.gridsize(1)):
        s = 0.0
        for j in range(N):
            s += P[i, j] * z[j]
        out[i] = s + lin * q[i]


@cuda.jit
def _quadform_value_terms_kernel(z, P, q, terms):
    """``terms[i] = z_i ((P z)_i / 2 + q_i)``: their sum is ``z.P z / 2 + q.z``."""
    N = P.shape[1]
    for i in range(cuda.grid(1), P.shape[0], cuda.gridsize(1)):
        s = 0.0
        for j in range(N):
            s += P[i, j] * z[j]
        terms[i] = z[i] * (0.5 * s + q[i])

def quadform_grad_device(z, out, P, q):
    """Device callback ``out <- P z + q`` (P symmetric, shape (N, N); q shape (N,))."""
    _launch(_quadform_affine_kernel, z.shape[0], z, P, q, 1.0, out)


def quadform_hvp_device(z, v, out, P, q):
    """Device callback ``out <- P v``."""
    _launch(_quadform_affine_kernel, v.shape[0], v, P, q, 0.0, out)


def quadform_value_device(z, P, q):
    """``z.P z / 2 + q.z``: a device reduction and one scalar read back (not counted, as
    every value callback of :mod:`mlocore.problems.cuda_callbacks`)."""
    terms = _device_empty(z.shape[0])
    _launch(_quadform_value_terms_kernel, z.shape[0], z, P, q, terms)
    return _device_sum(terms)


def _quadratic_levels(P, q, dims, declared=False):
    levels = [_device_objective(quadform_grad_device, hvp=quadform_hvp_device,
                                value=quadform_value_device, args=(Pk, qk),
                                quadratic=declared)
              for Pk, qk in zip(P, q)]
    return _device_problem(levels, dims)


def nlevel_quadratic_device_problem(q):
    """The device version of ``q.problem`` for an n-level quadratic.

    Parameters
    ----------
    q : NLevelQuadratic
        From :func:`mlocore.problems.make_nlevel_quadratic` (or built from matrices).

    Returns
    -------
    DeviceMultilevelProblem
        Levels ``f_k = z.P_k z / 2 + q_k.z`` with grad, hvp and value callbacks (declared
        quadratic when q's levels are); the 2n arrays are copied to the device once
        (``problem.transfers["h2d"] == 2 n``).
    """
    if not isinstance(q, NLevelQuadratic):
        raise TypeError("nlevel_quadratic_device_problem expects an NLevelQuadratic (from "
                        f"make_nlevel_quadratic), got {type(q).__name__}")
    return _quadratic_levels(q.P, q.q, q.dims, q.problem.levels[0].quadratic)
