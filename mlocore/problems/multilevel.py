"""Multilevel (trilevel and n-level) benchmark problems with known or reference solutions.

Levels k = 1..n, x_1 outermost. Every level's objective f_k is written over the joint vector
``z = concat(x_1, ..., x_n)`` with module-level ``@numba.njit(cache=True)`` callbacks
``grad(z, *args)``, ``hvp(z, v, *args)``, ``value(z, *args)`` and the third-order product
``tvp(z, u, w, *args) = d/ds hvp(z + s u, w)`` at s = 0; data go through ``args``. Reduced
objectives (ALGORITHMS.md section 3)::

    phi_n = f_n;   phi_k(x_1..x_k) = f_k(x_1..x_k, x_{k+1}*(.), .., x_n*(.));
    x_k*(x_<k) = argmin_{x_k} phi_k(x_<k, x_k);   F = phi_1.

Problems
--------
make_trilevel_quadratic(dim=1, seed=42) -> TrilevelQuadratic
    The worked trilevel quadratic of Giovannelli, Kent & Vicente (arXiv 2505.06805, their
    ``Quadratic``): z* = x + y, y* = x, grad F = c + 7 x, x* = -c / 7, F* = -|c|^2 / 14.
make_nlevel_quadratic(n=3, dims=None, seed=0, cond=4.0) -> NLevelQuadratic
    Random n-level quadratic f_k = z.P_k z / 2 + q_k.z with P_k symmetric positive definite:
    affine best responses, closed-form hypergradient, x_1*, F*.
make_nonquadratic_trilevel(dims=(2, 2, 2), seed=0, scale=1.0) -> NonquadraticTrilevel
    Log-cosh plus quadratic levels; the innermost best response is nonlinear in (x, y), so the
    best-response curvature terms of ALGORITHMS.md section 3 matter. Nested reference solver.
load_poisoning_trilevel(n_train=8, n_val=40, features=("bmi", "bp", "s5"), seed=0, c=1.0,
                        eps=1e-2, ridge=1e-3) -> PoisoningTrilevel
    Trilevel hyperparameter learning with data poisoning (Sato, Tanaka & Takeda 2021) on
    scikit-learn's diabetes data: regularization weight / poisoning perturbation / smooth-l1
    regression weights. Nested reference solver.
"""
from __future__ import annotations

import numbers

import numba
import numpy as np

from .._problem import BilevelProblem, MultilevelProblem, Objective

__all__ = ["TrilevelQuadratic", "make_trilevel_quadratic",
           "NLevelQuadratic", "make_nlevel_quadratic",
           "NonquadraticTrilevel", "make_nonquadratic_trilevel",
           "PoisoningTrilevel", "load_poisoning_trilevel",
           "quadform_grad", "quadform_hvp", "quadform_value", "quadform_tvp",
           "logcosh_quad_grad", "logcosh_quad_hvp", "logcosh_quad_value", "logcosh_quad_tvp"]


def _c64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def _check_int(name, val, minimum=1):
    if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {val!r}")
    return int(val)


def _check_dims(dims, n=None):
    try:
        dims = tuple(dims)
    except TypeError:
        raise ValueError(f"dims must be a sequence of positive integers, got {dims!r}") from None
    if n is not None and len(dims) != n:
        raise ValueError(f"dims must have {n} entries, got {dims!r}")
    for k, d in enumerate(dims, start=1):
        _check_int(f"dims[{k - 1}] (d_{k})", d)
    return tuple(int(d) for d in dims)


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


# =======================================================================================
# Reference nested solver for trilevel problems (slow, dense, NumPy).
# =======================================================================================
class _TrilevelReference:
    """Nested Newton solves of levels 3 and 2 of a 3-level ``self.problem``, with FD oracles.

    Level 3: damped Newton on ``f_3(x, y, .)`` with the dense Hessian block assembled from
    the hvp callback. Level 2: damped Newton on ``phi_2(y) = f_2(x, y, z*(x, y))`` whose
    gradient ``g_y + Jz_y^T g_z`` is exact (implicit function theorem of level 3 only) and
    whose Hessian is a central difference of that gradient (lower level re-solved at each
    shifted point), so the reference does not rely on third derivatives.
    """

    #: central-difference step of the level-2 Hessian (Newton matrix only: it does not change
    #: the solution, only the convergence rate)
    fd_step = 1e-5
    #: tolerance of the level-3 solves inside the level-2 iteration
    inner_tol = 1e-13

    # -- callback helpers -----------------------------------------------------------------
    def _call(self, k, name, *vecs):
        obj = self.problem.levels[k - 1]
        return getattr(obj, name)(*[_c64(v) for v in vecs], *obj.args)

    def _hessian(self, k, z):
        N = z.shape[0]
        H = np.empty((N, N))
        e = np.zeros(N)
        for j in range(N):
            e[j] = 1.0
            H[:, j] = self._call(k, "hvp", z, e)
            e[j] = 0.0
        return 0.5 * (H + H.T)

    def _slices(self):
        p = self.problem
        return p.block(1), p.block(2), p.block(3)

    def _join(self, x, y, z):
        return _c64(np.concatenate([x, y, z]))

    # -- level 3 --------------------------------------------------------------------------
    def z_star(self, x, y, z0=None, tol=1e-12):
        """Level-3 best response ``z*(x, y)`` (damped Newton, ``|grad_z f_3| <= tol``)."""
        return self._solve3(x, y, z0, tol)

    def y_star(self, x, y0=None, z0=None, tol=1e-12):
        """Level-2 best response: ``(y*(x), z*(x, y*(x)))`` (nested Newton)."""
        return self._solve2(x, y0, z0, tol)

    def _solve3(self, x, y, z0=None, tol=1e-12, maxiter=100):
        sx, sy, sz = self._slices()
        d3 = self.problem.dims[2]
        z = np.zeros(d3) if z0 is None else np.array(z0, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        w = self._join(x, y, z)
        g = self._call(3, "grad", w)[sz]
        for _ in range(maxiter):
            gn = np.linalg.norm(g)
            if gn <= tol:
                break
            Hzz = self._hessian(3, w)[sz, sz]
            step = -np.linalg.solve(Hzz, g)
            f0 = self._call(3, "value", w)
            t = 1.0
            while True:
                wn = self._join(x, y, z + t * step)
                gnew = self._call(3, "grad", wn)[sz]
                ok = (self._call(3, "value", wn) <= f0 + 1e-4 * t * (g @ step)
                      or np.linalg.norm(gnew) < gn)
                if ok or t < 1e-10:
                    break
                t *= 0.5
            if not ok:  # no progress possible (rounding level): keep the current point
                break
            z = z + t * step
            w, g = wn, gnew
            if np.linalg.norm(t * step) <= 1e-16 * (1.0 + np.linalg.norm(z)):
                break
        return z

    def _level3_jacobians(self, w):
        sx, sy, sz = self._slices()
        H = self._hessian(3, w)
        Hzz = H[sz, sz]
        return (-np.linalg.solve(Hzz, H[sz, sx]), -np.linalg.solve(Hzz, H[sz, sy]), H)

    # -- level 2 --------------------------------------------------------------------------
    def phi2(self, x, y, z0=None):
        """``phi_2(x, y) = f_2(x, y, z*(x, y))``."""
        z = self._solve3(x, y, z0, self.inner_tol)
        return float(self._call(2, "value", self._join(x, y, z)))

    def reduced_grad2(self, x, y, z0=None):
        """``(grad_y phi_2, z*)``: ``g_y + Jz_y^T g_z`` at ``(x, y, z*(x, y))``."""
        sx, sy, sz = self._slices()
        z = self._solve3(x, y, z0, self.inner_tol)
        w = self._join(x, y, z)
        _, Jy, _ = self._level3_jacobians(w)
        g = self._call(2, "grad", w)
        return g[sy] + Jy.T @ g[sz], z

    def _solve2(self, x, y0=None, z0=None, tol=1e-12, maxiter=100):
        d2 = self.problem.dims[1]
        x = np.asarray(x, dtype=np.float64)
        y = np.zeros(d2) if y0 is None else np.array(y0, dtype=np.float64)
        r, z = self.reduced_grad2(x, y, z0)
        for _ in range(maxiter):
            rn = np.linalg.norm(r)
            if rn <= tol:
                break
            h = self.fd_step
            H = np.empty((d2, d2))
            for j in range(d2):
                e = np.zeros(d2)
                e[j] = h
                H[:, j] = (self.reduced_grad2(x, y + e, z)[0]
                           - self.reduced_grad2(x, y - e, z)[0]) / (2 * h)
            H = 0.5 * (H + H.T)
            step = -np.linalg.solve(H, r)
            f0 = self.phi2(x, y, z)
            t = 1.0
            while True:
                yn = y + t * step
                rnew, zn = self.reduced_grad2(x, yn, z)
                ok = (np.linalg.norm(rnew) < rn
                      or self.phi2(x, yn, zn) <= f0 + 1e-4 * t * (r @ step))
                if ok or t < 1e-10:
                    break
                t *= 0.5
            if not ok:
                break
            y, r, z = yn, rnew, zn
            if np.linalg.norm(t * step) <= 1e-16 * (1.0 + np.linalg.norm(y)):
                break
        return y, z

    # -- public reference API -------------------------------------------------------------
    def solve_all(self, x1, tol=1e-12, y0=None, z0=None):
        """Joint vector ``concat(x_1, y*(x_1), z*(x_1, y*))``, lower levels solved to ``tol``."""
        x1 = np.asarray(x1, dtype=np.float64)
        if x1.shape != (self.problem.dims[0],):
            raise ValueError(f"x_1 must have shape ({self.problem.dims[0]},), got "
                             f"shape={x1.shape}")
        y, z = self._solve2(x1, y0, z0, tol=tol)
        z = self._solve3(x1, y, z, tol=tol)
        return self._join(x1, y, z)

    def F(self, x1, tol=1e-12):
        """``F(x_1) = f_1`` at ``solve_all(x_1)``."""
        return float(self._call(1, "value", self.solve_all(x1, tol)))

    def hypergrad_fd(self, x1, h=1e-4, tol=1e-13):
        """Central differences of F (lower levels re-solved at each point, warm-started)."""
        x1 = np.asarray(x1, dtype=np.float64)
        d1, d2 = self.problem.dims[:2]
        w0 = self.solve_all(x1, tol)
        y0, z0 = w0[d1:d1 + d2], w0[d1 + d2:]
        out = np.empty(d1)
        for j in range(d1):
            e = np.zeros(d1)
            e[j] = h
            fp = self._call(1, "value", self.solve_all(x1 + e, tol, y0, z0))
            fm = self._call(1, "value", self.solve_all(x1 - e, tol, y0, z0))
            out[j] = (fp - fm) / (2 * h)
        return out

    def dy_dx_fd(self, x1, h=1e-4, tol=1e-13):
        """``d y*/d x_1`` (shape (d_2, d_1)) by central differences of the level-2 solution."""
        x1 = np.asarray(x1, dtype=np.float64)
        d1, d2 = self.problem.dims[:2]
        w0 = self.solve_all(x1, tol)
        y0, z0 = w0[d1:d1 + d2], w0[d1 + d2:]
        out = np.empty((d2, d1))
        for j in range(d1):
            e = np.zeros(d1)
            e[j] = h
            yp = self._solve2(x1 + e, y0, z0, tol=tol)[0]
            ym = self._solve2(x1 - e, y0, z0, tol=tol)[0]
            out[:, j] = (yp - ym) / (2 * h)
        return out

    def implicit_derivatives(self, x1, curvature=True, tol=1e-12):
        """Trilevel implicit differentiation of ALGORITHMS.md section 3, dense, at z*(x_1).

        Returns a dict with ``Jz_x``, ``Jz_y`` (level-3 Jacobians), ``phi_yy``, ``phi_yx``,
        ``dy_dx``, ``dz_dx`` (total) and ``grad_F``. With ``curvature=True`` the best-response
        curvature terms ``sum_k (g_z)_k d2 z*_k`` are included, from the tvp callback of
        level 3: ``sum_k (g_z)_k (z*_ab)_k = -lam.T3[Z_a, Z_b]_z`` with
        ``lam = (h_zz)^{-1} g_z`` and ``Z_a`` the total direction of z when moving along a;
        with ``curvature=False`` they are dropped (the "truncated" mode).
        """
        sx, sy, sz = self._slices()
        w = self.solve_all(np.asarray(x1, dtype=np.float64), tol)
        N = w.shape[0]
        Jx, Jy, H3 = self._level3_jacobians(w)
        H2 = self._hessian(2, w)
        g2 = self._call(2, "grad", w)
        phi_yy = (H2[sy, sy] + H2[sy, sz] @ Jy + Jy.T @ H2[sz, sy] + Jy.T @ H2[sz, sz] @ Jy)
        phi_yx = (H2[sy, sx] + H2[sy, sz] @ Jx + Jy.T @ H2[sz, sx] + Jy.T @ H2[sz, sz] @ Jx)
        if curvature:
            lam = np.linalg.solve(H3[sz, sz], g2[sz])
            d1, d2 = Jx.shape[1], Jy.shape[1]

            def direction(block, j, J):
                v = np.zeros(N)
                v[block.start + j] = 1.0
                v[sz] = J[:, j]
                return v

            Zy = [direction(sy, a, Jy) for a in range(d2)]
            Zx = [direction(sx, b, Jx) for b in range(d1)]
            for a in range(d2):
                for b in range(d2):
                    phi_yy[a, b] -= lam @ self._call(3, "tvp", w, Zy[a], Zy[b])[sz]
                for b in range(d1):
                    phi_yx[a, b] -= lam @ self._call(3, "tvp", w, Zy[a], Zx[b])[sz]
        phi_yy = 0.5 * (phi_yy + phi_yy.T)
        dy_dx = -np.linalg.solve(phi_yy, phi_yx)
        dz_dx = Jx + Jy @ dy_dx
        g1 = self._call(1, "grad", w)
        grad_F = g1[sx] + dy_dx.T @ g1[sy] + dz_dx.T @ g1[sz]
        return {"Jz_x": Jx, "Jz_y": Jy, "phi_yy": phi_yy, "phi_yx": phi_yx,
                "dy_dx": dy_dx, "dz_dx": dz_dx, "grad_F": grad_F, "z": w}


# =======================================================================================
# 1. The trilevel quadratic of Giovannelli, Kent & Vicente.
# =======================================================================================
@numba.njit(cache=True)
def tq_upper_value(z, hx, hy, hz):
    """f1 = hx.x + hy.y + hz.z + x.x/2 + x.y + x.z over z = (x, y, z)."""
    d = hx.shape[0]
    s = 0.0
    for i in range(d):
        x, y, w = z[i], z[d + i], z[2 * d + i]
        s += hx[i] * x + hy[i] * y + hz[i] * w + 0.5 * x * x + x * y + x * w
    return s


@numba.njit(cache=True)
def tq_upper_grad(z, hx, hy, hz):
    d = hx.shape[0]
    out = np.empty(3 * d)
    for i in range(d):
        x, y, w = z[i], z[d + i], z[2 * d + i]
        out[i] = hx[i] + x + y + w
        out[d + i] = hy[i] + x
        out[2 * d + i] = hz[i] + x
    return out


@numba.njit(cache=True)
def tq_upper_hvp(z, v, hx, hy, hz):
    d = hx.shape[0]
    out = np.empty(3 * d)
    for i in range(d):
        out[i] = v[i] + v[d + i] + v[2 * d + i]
        out[d + i] = v[i]
        out[2 * d + i] = v[i]
    return out


@numba.njit(cache=True)
def tq_middle_value(z):
    """f2 = 2 y.y - y.x - y.z."""
    d = z.shape[0] // 3
    s = 0.0
    for i in range(d):
        x, y, w = z[i], z[d + i], z[2 * d + i]
        s += 2.0 * y * y - y * x - y * w
    return s


@numba.njit(cache=True)
def tq_middle_grad(z):
    d = z.shape[0] // 3
    out = np.empty(3 * d)
    for i in range(d):
        x, y, w = z[i], z[d + i], z[2 * d + i]
        out[i] = -y
        out[d + i] = 4.0 * y - x - w
        out[2 * d + i] = -y
    return out


@numba.njit(cache=True)
def tq_middle_hvp(z, v):
    return tq_middle_grad(v)


@numba.njit(cache=True)
def tq_lower_value(z):
    """f3 = z.z/2 - z.x - z.y."""
    d = z.shape[0] // 3
    s = 0.0
    for i in range(d):
        x, y, w = z[i], z[d + i], z[2 * d + i]
        s += 0.5 * w * w - w * x - w * y
    return s


@numba.njit(cache=True)
def tq_lower_grad(z):
    d = z.shape[0] // 3
    out = np.empty(3 * d)
    for i in range(d):
        x, y, w = z[i], z[d + i], z[2 * d + i]
        out[i] = -w
        out[d + i] = -w
        out[2 * d + i] = w - x - y
    return out


@numba.njit(cache=True)
def tq_lower_hvp(z, v):
    return tq_lower_grad(v)


@numba.njit(cache=True)
def tq_tvp(z, u, w):
    return np.zeros(z.shape[0])


@numba.njit(cache=True)
def tq_upper_tvp(z, u, w, hx, hy, hz):
    return np.zeros(z.shape[0])


class TrilevelQuadratic(_TrilevelReference):
    """The trilevel quadratic of Giovannelli, Kent & Vicente (their ``Quadratic``).

    Over ``z = concat(x, y, w)`` (ALGORITHMS.md calls the third block z), each of size dim::

        f1 = hx.x + hy.y + hz.w + x.x/2 + x.y + x.w,
        f2 = 2 y.y - y.x - y.w,
        f3 = w.w/2 - w.x - w.y.

    Closed forms (verified numerically in the tests): level 3 gives ``w*(x, y) = x + y``;
    then ``phi_2(x, y) = y.y - 2 x.y`` (+ const), so ``y*(x) = x`` and ``w* = 2x``;
    ``F(x) = c.x + 7/2 x.x`` with ``c = hx + hy + 2 hz``, ``grad F = c + 7 x``,
    ``x* = -c / 7``, ``F* = -|c|^2 / 14``. The best responses are affine, so every
    best-response curvature term vanishes. The generic nested reference solver
    (:meth:`solve_all`, :meth:`hypergrad_fd`, :meth:`implicit_derivatives`, ...) is available
    too, as a numerical cross-check of the closed forms.

    Attributes
    ----------
    problem : MultilevelProblem
        ``dims = (dim, dim, dim)``; f1 has args ``(hx, hy, hz)``, f2 and f3 none. All levels
        have grad, hvp, value and (zero) tvp callbacks.
    dim : int
    hx, hy, hz, c : ndarray, shape (dim,)
    x_star : ndarray
    F_star : float
    """

    def __init__(self, hx, hy, hz):
        self.hx, self.hy, self.hz = _c64(hx), _c64(hy), _c64(hz)
        self.dim = int(self.hx.shape[0])
        self.c = self.hx + self.hy + 2.0 * self.hz
        self.x_star = -self.c / 7.0
        self.F_star = float(-(self.c @ self.c) / 14.0)
        d = self.dim
        self.problem = MultilevelProblem(
            levels=[Objective(tq_upper_grad, hvp=tq_upper_hvp, value=tq_upper_value,
                              tvp=tq_upper_tvp, args=(self.hx, self.hy, self.hz)),
                    Objective(tq_middle_grad, hvp=tq_middle_hvp, value=tq_middle_value,
                              tvp=tq_tvp),
                    Objective(tq_lower_grad, hvp=tq_lower_hvp, value=tq_lower_value,
                              tvp=tq_tvp)],
            dims=(d, d, d))

    def __repr__(self):
        return f"TrilevelQuadratic(dim={self.dim}, F_star={self.F_star:.8f})"

    def _x(self, x, name="x"):
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"{name} must have shape ({self.dim},), got shape={x.shape}")
        return x

    def z_star(self, x, y):
        """Level-3 best response ``w*(x, y) = x + y``."""
        return self._x(x) + self._x(y, "y")

    def y_star(self, x):
        """Level-2 best response ``y*(x) = x``."""
        return self._x(x).copy()

    def best_response(self, x):
        """Joint vector ``concat(x, y*(x), w*(x, y*(x))) = concat(x, x, 2x)``."""
        x = self._x(x)
        return np.ascontiguousarray(np.concatenate([x, x, 2.0 * x]))

    def F(self, x):
        """``F(x) = f1(x, y*(x), w*) = c.x + 3.5 x.x``, evaluated through the callbacks."""
        return float(tq_upper_value(self.best_response(x), self.hx, self.hy, self.hz))

    def hypergrad(self, x):
        """``grad F(x) = c + 7 x``."""
        return self.c + 7.0 * self._x(x)

    def level_matrices(self):
        """``(P_k, q_k)`` for k = 1, 2, 3 with ``f_k(z) = z.P_k z / 2 + q_k.z``."""
        d = self.dim
        I = np.eye(d)
        O = np.zeros((d, d))
        P1 = np.block([[I, I, I], [I, O, O], [I, O, O]])
        P2 = np.block([[O, -I, O], [-I, 4 * I, -I], [O, -I, O]])
        P3 = np.block([[O, O, -I], [O, O, -I], [-I, -I, I]])
        q1 = np.concatenate([self.hx, self.hy, self.hz])
        zero = np.zeros(3 * d)
        return [(P1, q1), (P2, zero), (P3, zero.copy())]

    def as_nlevel(self):
        """The same problem as an :class:`NLevelQuadratic` (generic linear-algebra solution)."""
        mats = self.level_matrices()
        return NLevelQuadratic([m[0] for m in mats], [m[1] for m in mats], (self.dim,) * 3)


def make_trilevel_quadratic(dim=1, seed=42):
    """The worked trilevel quadratic of ALGORITHMS.md section 3 (Giovannelli, Kent & Vicente).

    ``hx, hy, hz`` are drawn by ``np.random.seed(seed)`` followed by
    ``np.random.uniform(0, 10, dim)`` three times, in that order (the paper's generator; it
    reseeds NumPy's global RandomState). With seed 42: ``F* = -55.57051898`` for dim 1 and
    ``F* = -1446.28489290`` for dim 50. Returns a :class:`TrilevelQuadratic`.
    """
    dim = _check_int("dim", dim)
    np.random.seed(seed)
    hx = np.random.uniform(0, 10, dim)
    hy = np.random.uniform(0, 10, dim)
    hz = np.random.uniform(0, 10, dim)
    return TrilevelQuadratic(hx, hy, hz)


# =======================================================================================
# 2. Random n-level quadratics.
# =======================================================================================
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

    Raises
    ------
    ValueError
        Bad shapes, non-symmetric P_k, or a level k >= 2 whose reduced Hessian block
        ``(H_k)_{kk}`` is not positive definite.

    Attributes
    ----------
    problem : MultilevelProblem
        Every level uses the shared callbacks ``quadform_grad/hvp/value/tvp`` with
        ``args = (P_k, q_k)``.
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

    def __init__(self, P, q, dims):
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
        self.problem = MultilevelProblem(
            levels=[Objective(quadform_grad, hvp=quadform_hvp, value=quadform_value,
                              tvp=quadform_tvp, args=(Pk, qk))
                    for Pk, qk in zip(self.P, self.q)],
            dims=dims)

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


def _spd(rng, d, lo, hi):
    Qm, _ = np.linalg.qr(rng.standard_normal((d, d)))
    M = (Qm * rng.uniform(lo, hi, d)) @ Qm.T
    return 0.5 * (M + M.T)


def make_nlevel_quadratic(n=3, dims=None, seed=0, cond=4.0):
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
    return NLevelQuadratic(P, q, dims)


# =======================================================================================
# 3. A non-quadratic trilevel problem: log-cosh plus quadratic levels.
# =======================================================================================
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

    Over ``z = concat(x, y, w)`` (sizes ``dims = (dx, dy, dw)``; the third block is ALGORITHMS.md's
    z), every level is ``f_k(z) = sum_i c_i log cosh(G_i.z + b_i) + z.P_k z / 2 + q_k.z``
    (shared callbacks ``logcosh_quad_*`` with ``args = (G_k, b_k, c_k, P_k, q_k)``):

    - level 3: ``G_3 = [-A, -B, I]``, ``P_3 = blockdiag(0, 0, S_3)`` (S_3 SPD), so
      ``f_3 = sum_i c3_i log cosh(w_i - (A x + B y + b)_i) + w.S_3 w / 2 + q.w``. Its Hessian
      in w is ``S_3 + diag(c3 sech^2) >= lambda_min(S_3) I``: strongly convex, and the best
      response solves ``S_3 w + q + c3 * tanh(w - A x - B y - b) = 0``, which is
      NONLINEAR in (x, y). Its second derivatives (third derivatives of f_3) enter the
      level-2 reduced Hessian, so the curvature terms of ALGORITHMS.md section 3 matter.
    - level 2: log-cosh terms over all of z (bounded slopes) plus ``y.(S_2 + mu I) y / 2 +
      x.K y``. ``mu`` is set from a bound on ``|g_w| |d2 w*/dy2|`` (with
      ``|l'''| <= 4/(3 sqrt 3)``) so that ``phi_2(x, .)`` is strongly convex (modulus
      ``>= lambda_min(S_2) >= 1``) for every x.
    - level 1: log-cosh terms over all of z plus a positive definite quadratic.

    Nothing is known in closed form: :meth:`solve_all` (nested Newton to 1e-12),
    :meth:`F`, :meth:`hypergrad_fd` (central differences of F) and :meth:`dy_dx_fd` are the
    reference oracles, and :meth:`implicit_derivatives` evaluates the formulas of
    ALGORITHMS.md section 3 densely (with or without curvature terms).

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


# =======================================================================================
# 4. Trilevel hyperparameter learning with data poisoning (Sato, Tanaka & Takeda 2021).
# =======================================================================================
# z = concat(lam (1), P (n*d, row-major: P[i, j] = z[1 + i*d + j]), w (d)).
# Data term D = (1/2n) sum_i r_i^2, r_i = (X_i + P_i).w - t_i.
@numba.njit(cache=True)
def _residuals(z, X):
    n, d = X.shape
    wo = 1 + n * d
    r = np.empty(n)
    for i in range(n):
        s = 0.0
        for j in range(d):
            s += (X[i, j] + z[1 + i * d + j]) * z[wo + j]
        r[i] = s
    return r


@numba.njit(cache=True)
def _data_value(z, X, t):
    r = _residuals(z, X) - t
    return 0.5 * (r @ r) / X.shape[0]


@numba.njit(cache=True)
def _data_grad(z, X, t):
    n, d = X.shape
    wo = 1 + n * d
    r = _residuals(z, X) - t
    out = np.zeros(z.shape[0])
    for i in range(n):
        ri = r[i] / n
        for j in range(d):
            out[1 + i * d + j] = ri * z[wo + j]
            out[wo + j] += ri * (X[i, j] + z[1 + i * d + j])
    return out


@numba.njit(cache=True)
def _dr(z, v, X, i):
    """dr_i[v] = sum_j v_Pij w_j + (X_ij + P_ij) v_wj."""
    n, d = X.shape
    wo = 1 + n * d
    s = 0.0
    for j in range(d):
        s += v[1 + i * d + j] * z[wo + j] + (X[i, j] + z[1 + i * d + j]) * v[wo + j]
    return s


@numba.njit(cache=True)
def _data_hvp(z, v, X, t):
    """(1/n) sum_i [dr_i[v] grad r_i + r_i hess(r_i) v]."""
    n, d = X.shape
    wo = 1 + n * d
    r = _residuals(z, X) - t
    out = np.zeros(z.shape[0])
    for i in range(n):
        a = _dr(z, v, X, i) / n
        ri = r[i] / n
        for j in range(d):
            p = 1 + i * d + j
            out[p] += a * z[wo + j] + ri * v[wo + j]
            out[wo + j] += a * (X[i, j] + z[p]) + ri * v[p]
    return out


@numba.njit(cache=True)
def _data_tvp(z, u, v, X, t):
    """(1/n) sum_i [d2r_i[u, v] grad r_i + dr_i[v] hess(r_i) u + dr_i[u] hess(r_i) v]."""
    n, d = X.shape
    wo = 1 + n * d
    out = np.zeros(z.shape[0])
    for i in range(n):
        d2 = 0.0
        for j in range(d):
            p = 1 + i * d + j
            d2 += u[p] * v[wo + j] + v[p] * u[wo + j]
        d2 /= n
        du = _dr(z, u, X, i) / n
        dv = _dr(z, v, X, i) / n
        for j in range(d):
            p = 1 + i * d + j
            out[p] += d2 * z[wo + j] + dv * u[wo + j] + du * v[wo + j]
            out[wo + j] += d2 * (X[i, j] + z[p]) + dv * u[p] + du * v[p]
    return out


@numba.njit(cache=True)
def poison_lower_value(z, X, t, eps, ridge):
    """``D(P, w) + exp(lam) sum_j sqrt(w_j^2 + eps) + ridge/2 |w|^2``."""
    d = X.shape[1]
    wo = z.shape[0] - d
    e = np.exp(z[0])
    s = 0.0
    for j in range(d):
        w = z[wo + j]
        s += e * np.sqrt(w * w + eps) + 0.5 * ridge * w * w
    return _data_value(z, X, t) + s


@numba.njit(cache=True)
def poison_lower_grad(z, X, t, eps, ridge):
    d = X.shape[1]
    wo = z.shape[0] - d
    e = np.exp(z[0])
    out = _data_grad(z, X, t)
    s = 0.0
    for j in range(d):
        w = z[wo + j]
        psi = np.sqrt(w * w + eps)
        s += psi
        out[wo + j] += e * w / psi + ridge * w
    out[0] = e * s
    return out


@numba.njit(cache=True)
def poison_lower_hvp(z, v, X, t, eps, ridge):
    d = X.shape[1]
    wo = z.shape[0] - d
    e = np.exp(z[0])
    out = _data_hvp(z, v, X, t)
    s = 0.0
    for j in range(d):
        w = z[wo + j]
        psi = np.sqrt(w * w + eps)
        d1 = w / psi
        d2 = eps / (psi * psi * psi)
        s += psi * v[0] + d1 * v[wo + j]
        out[wo + j] += e * (d1 * v[0] + d2 * v[wo + j]) + ridge * v[wo + j]
    out[0] = e * s
    return out


@numba.njit(cache=True)
def poison_lower_tvp(z, u, v, X, t, eps, ridge):
    d = X.shape[1]
    wo = z.shape[0] - d
    e = np.exp(z[0])
    out = _data_tvp(z, u, v, X, t)
    s = 0.0
    for j in range(d):
        w = z[wo + j]
        psi = np.sqrt(w * w + eps)
        d1 = w / psi
        d2 = eps / (psi * psi * psi)
        d3 = -3.0 * eps * w / (psi * psi * psi * psi * psi)
        uw, vw = u[wo + j], v[wo + j]
        s += psi * u[0] * v[0] + d1 * (u[0] * vw + uw * v[0]) + d2 * uw * vw
        out[wo + j] += e * (d1 * u[0] * v[0] + d2 * (u[0] * vw + uw * v[0]) + d3 * uw * vw)
    out[0] = e * s
    return out


@numba.njit(cache=True)
def poison_middle_value(z, X, t, c):
    """``-D(P, w) + c/2 |P|^2`` (the attacker maximizes the training loss)."""
    n, d = X.shape
    s = 0.0
    for p in range(1, 1 + n * d):
        s += z[p] * z[p]
    return -_data_value(z, X, t) + 0.5 * c * s


@numba.njit(cache=True)
def poison_middle_grad(z, X, t, c):
    n, d = X.shape
    out = -_data_grad(z, X, t)
    for p in range(1, 1 + n * d):
        out[p] += c * z[p]
    return out


@numba.njit(cache=True)
def poison_middle_hvp(z, v, X, t, c):
    n, d = X.shape
    out = -_data_hvp(z, v, X, t)
    for p in range(1, 1 + n * d):
        out[p] += c * v[p]
    return out


@numba.njit(cache=True)
def poison_middle_tvp(z, u, v, X, t, c):
    return -_data_tvp(z, u, v, X, t)


@numba.njit(cache=True)
def poison_upper_value(z, Xv, tv):
    """Validation loss ``|Xv w - tv|^2 / (2 m)``."""
    m, d = Xv.shape
    wo = z.shape[0] - d
    s = 0.0
    for i in range(m):
        r = -tv[i]
        for j in range(d):
            r += Xv[i, j] * z[wo + j]
        s += r * r
    return 0.5 * s / m


@numba.njit(cache=True)
def poison_upper_grad(z, Xv, tv):
    m, d = Xv.shape
    wo = z.shape[0] - d
    out = np.zeros(z.shape[0])
    for i in range(m):
        r = -tv[i]
        for j in range(d):
            r += Xv[i, j] * z[wo + j]
        for j in range(d):
            out[wo + j] += r * Xv[i, j] / m
    return out


@numba.njit(cache=True)
def poison_upper_hvp(z, v, Xv, tv):
    m, d = Xv.shape
    wo = z.shape[0] - d
    out = np.zeros(z.shape[0])
    for i in range(m):
        r = 0.0
        for j in range(d):
            r += Xv[i, j] * v[wo + j]
        for j in range(d):
            out[wo + j] += r * Xv[i, j] / m
    return out


@numba.njit(cache=True)
def poison_upper_tvp(z, u, v, Xv, tv):
    return np.zeros(z.shape[0])


class PoisoningTrilevel(_TrilevelReference):
    """Trilevel hyperparameter learning with data poisoning (Sato, Tanaka & Takeda 2021).

    Over ``z = concat(lam, P, w)``: ``lam`` (size 1) the log of the regularization weight,
    ``P`` (size n_train * d, row-major ``P[i, j] = z[1 + i d + j]``) a perturbation of the
    training features, ``w`` (size d) the regression weights. With ``r = (X + P) w - t`` and
    ``D = |r|^2 / (2 n)``:

    - level 3 (learner): ``D + exp(lam) sum_j sqrt(w_j^2 + eps) + ridge/2 |w|^2`` (smooth-l1
      penalty; the small ridge keeps it strongly convex whatever P),
    - level 2 (attacker): ``-D + c/2 |P|^2`` (maximize the training loss of the learned
      model, with a norm penalty on the poison),
    - level 1 (defender): the validation loss ``|X_val w - t_val|^2 / (2 n_val)``.

    All three levels have grad, hvp, value and exact tvp callbacks (``poison_*``). Level 2 is
    not convex in general; with the default ``c`` its reduced problem is strongly convex
    around the solutions checked in the tests. Reference oracles as for
    :class:`NonquadraticTrilevel` (:meth:`solve_all`, :meth:`F`, :meth:`hypergrad_fd`).

    Attributes
    ----------
    problem : MultilevelProblem
        ``dims = (1, n_train * d, d)``.
    X_train, t_train, X_val, t_val : ndarray
        Standardized features (training statistics) and standardized targets.
    eps, ridge, c : float
    feature_names : list of str
    """

    def __init__(self, X_train, t_train, X_val, t_val, eps, ridge, c, feature_names=None):
        self.X_train, self.t_train = _c64(X_train), _c64(t_train)
        self.X_val, self.t_val = _c64(X_val), _c64(t_val)
        self.eps, self.ridge, self.c = float(eps), float(ridge), float(c)
        self.feature_names = feature_names
        n, d = self.X_train.shape
        self.problem = MultilevelProblem(
            levels=[Objective(poison_upper_grad, hvp=poison_upper_hvp, value=poison_upper_value,
                              tvp=poison_upper_tvp, args=(self.X_val, self.t_val)),
                    Objective(poison_middle_grad, hvp=poison_middle_hvp,
                              value=poison_middle_value, tvp=poison_middle_tvp,
                              args=(self.X_train, self.t_train, self.c)),
                    Objective(poison_lower_grad, hvp=poison_lower_hvp, value=poison_lower_value,
                              tvp=poison_lower_tvp,
                              args=(self.X_train, self.t_train, self.eps, self.ridge))],
            dims=(1, n * d, d))

    def __repr__(self):
        n, d = self.X_train.shape
        return (f"PoisoningTrilevel(n_train={n}, n_val={self.X_val.shape[0]}, n_features={d}, "
                f"c={self.c:g})")

    def poison(self, z):
        """The perturbation block of a joint vector, as an (n_train, d) matrix."""
        n, d = self.X_train.shape
        return np.asarray(z)[1:1 + n * d].reshape(n, d)


def load_poisoning_trilevel(n_train=8, n_val=40, features=("bmi", "bp", "s5"), seed=0,
                            c=1.0, eps=1e-2, ridge=1e-3):
    """The poisoning trilevel problem on scikit-learn's diabetes regression data.

    A random subset of ``n_train`` training and ``n_val`` validation samples (of 442) and the
    named ``features`` (of age, sex, bmi, bp, s1..s6) is taken; features and target are
    standardized with the training statistics. Returns a :class:`PoisoningTrilevel`.

    Raises
    ------
    ImportError
        scikit-learn is not installed (``pip install "mlocore[data]"``).
    """
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        raise ImportError('load_poisoning_trilevel needs scikit-learn: '
                          'pip install "mlocore[data]"') from None
    n_train = _check_int("n_train", n_train, 2)
    n_val = _check_int("n_val", n_val)
    for name, val in (("c", c), ("eps", eps), ("ridge", ridge)):
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not val > 0 \
                or not np.isfinite(val):
            raise ValueError(f"{name} must be a finite number > 0, got {val!r}")
    data = load_diabetes()
    names = [str(s) for s in data.feature_names]
    features = list(features)
    unknown = [f for f in features if f not in names]
    if unknown or not features:
        raise ValueError(f"unknown features {unknown}; expected a non-empty subset of {names}")
    cols = [names.index(f) for f in features]
    X = np.asarray(data.data, dtype=np.float64)[:, cols]
    t = np.asarray(data.target, dtype=np.float64)
    if n_train + n_val > X.shape[0]:
        raise ValueError(f"n_train + n_val must be <= {X.shape[0]}, got {n_train + n_val}")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(X.shape[0])
    tr, va = idx[:n_train], idx[n_train:n_train + n_val]
    mu, sd = X[tr].mean(axis=0), X[tr].std(axis=0)
    sd[sd == 0] = 1.0
    tm, ts = t[tr].mean(), t[tr].std() or 1.0
    return PoisoningTrilevel((X[tr] - mu) / sd, (t[tr] - tm) / ts, (X[va] - mu) / sd,
                             (t[va] - tm) / ts, eps, ridge, c, feature_names=features)
