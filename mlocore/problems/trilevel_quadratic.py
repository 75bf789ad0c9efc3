"""The trilevel quadratic of Giovannelli, Kent & Vicente, and its device problem.

``make_trilevel_quadratic(dim=1, seed=42) -> TrilevelQuadratic``: their ``Quadratic``
(arXiv 2505.06805) over ``z = concat(x, y, w)``, with ``w* = x + y``, ``y* = x``,
``grad F = c + 7 x``, ``x* = -c / 7``, ``F* = -|c|^2 / 14``; CPU callbacks ``tq_*`` (grad,
hvp, value, tvp). ``trilevel_quadratic_device_problem(tq)`` is its device version, whose
levels are the quadratic forms of :meth:`TrilevelQuadratic.level_matrices` with the device
callbacks of :mod:`mlocore.problems.nlevel_quadratic`.
"""
from __future__ import annotations

import numba
import numpy as np

from .._problem import MultilevelProblem, Objective
from ._multilevel_base import _c64, _check_int, _TrilevelReference
from .nlevel_quadratic import NLevelQuadratic, _quadratic_levels

__all__ = ["TrilevelQuadratic", "make_trilevel_quadratic", "trilevel_quadratic_device_problem",
           "tq_upper_value", "tq_upper_grad", "tq_upper_hvp", "tq_upper_tvp", "tq_middle_value",
           "tq_middle_grad", "tq_middle_hvp", "tq_lower_value", "tq_lower_grad",
           "tq_lower_hvp", "tq_tvp"]


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

    Over ``z = concat(x, y, w)`` (docs/mathematics.md calls the third block z), each of size dim::

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
    """The worked trilevel quadratic of Giovannelli, Kent & Vicente (docs/mathematics.md,
    section 3).

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


# ---------------------------------------------------------------------------------------
# Device callbacks (CUDA backend)
# ---------------------------------------------------------------------------------------
def trilevel_quadratic_device_problem(tq):
    """The device version of ``tq.problem`` for the trilevel quadratic of Giovannelli, Kent &
    Vicente (docs/mathematics.md section 3).

    Parameters
    ----------
    tq : TrilevelQuadratic
        From :func:`mlocore.problems.make_trilevel_quadratic`.

    Returns
    -------
    DeviceMultilevelProblem
        ``dims = (dim, dim, dim)``; the levels are the quadratic forms of
        ``tq.level_matrices()`` (6 arrays copied to the device once). Closed forms:
        ``grad F(x) = c + 7 x`` (``tq.hypergrad``).
    """
    if not isinstance(tq, TrilevelQuadratic):
        raise TypeError("trilevel_quadratic_device_problem expects a TrilevelQuadratic (from "
                        f"make_trilevel_quadratic), got {type(tq).__name__}")
    mats = tq.level_matrices()
    return _quadratic_levels([m[0] for m in mats], [m[1] for m in mats], (tq.dim,) * 3)
