"""Shared pieces of the multilevel problem families: input checks and the nested reference
solver of the trilevel problems (slow, dense, NumPy), plus the launch helper of their device
callbacks."""
from __future__ import annotations

import numbers

import numpy as np

from ..cuda import _linalg as dl
from ..cuda._multilevel import DeviceMultilevelProblem
from ..cuda._problem import DeviceObjective
from .cuda_callbacks import _reduce_to_host


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


def _spd(rng, d, lo, hi):
    Qm, _ = np.linalg.qr(rng.standard_normal((d, d)))
    M = (Qm * rng.uniform(lo, hi, d)) @ Qm.T
    return 0.5 * (M + M.T)


def _launch(kernel, n, *args):
    """Launch a one-dimensional device kernel over n entries (grid-stride loops)."""
    kernel[dl.grid_for(n), dl.THREADS_PER_BLOCK](*args)


def _device_empty(n):
    return dl.empty(n)


def _device_sum(terms):
    """The sum of a device vector, read back to the host (one uncounted read-back, as every
    value callback of :mod:`mlocore.problems.cuda_callbacks`)."""
    return _reduce_to_host(terms)


def _device_problem(levels, dims):
    return DeviceMultilevelProblem(levels, dims)


def _device_objective(grad, **kw):
    return DeviceObjective(grad, **kw)


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
        """Trilevel implicit differentiation of docs/mathematics.md section 3, dense, at z*(x_1).

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
