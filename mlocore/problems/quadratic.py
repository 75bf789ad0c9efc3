"""Stochastic quadratic bilevel problem with a closed-form solution.

This is the ``simulated`` problem of benchopt's bilevel benchmark (docs/mathematics.md section 4),
written over the joint vector ``z = concat(x, y)`` (x: upper variable, size dx; y: lower
variable, size dy; docs/mathematics.md calls the lower variable z). Each sample ``i`` is the
quadratic

    phi_i(x, y) = y.A_i y / 2 + x.B_i x / 2 + x.C_i y + a_i.y + b_i.x,

    A_i = u_i u_i^T + ridge I_dy,     B_i = w_i w_i^T + ridge I_dx,

(rank-one curvature plus a ridge, so that the mean over samples is strongly convex even when
there are fewer samples than dimensions). The lower objective g is the mean of phi_i over the
``n_inner`` inner samples, the upper objective f the mean over the ``n_outer`` outer samples
(independent draws of the same family). Writing ``A, B, C, a, b`` for the means of g and
``F, G, K, f_y, h_x`` for the means of f (docs/mathematics.md's notation, with F on y and G on x):

    y*(x) = y0 + J x,        J = -A^{-1} C^T,   y0 = -A^{-1} a,
    F(x)  = f(x, y*(x)) = x.Q x / 2 + r.x + const,
    Q = J^T F J + G + K J + (K J)^T,   r = J^T (F y0 + f_y) + K y0 + h_x,   x* = -Q^{-1} r.

benchopt checks positive definiteness on ``(K J + (K J)^T) / 2``, which is not the Hessian of
F; here the check is on Q itself (and on A): when Q is not positive definite and reasonably
conditioned, the ridge is doubled until it is (see :func:`make_quadratic`).

All callbacks are module-level ``@numba.njit(cache=True)`` functions shared by both levels:
the deterministic ones take the mean matrices ``(A, B, C, a, b)`` as ``args`` (the ridge is
already in A and B), the stochastic ones take ``idx`` then the per-sample arrays
``(U, W, C, a, b, ridge)`` with ``U[i] = u_i``, ``W[i] = w_i``, ``C[i] = C_i`` and so on.
"""
from __future__ import annotations

import numbers

import numba
import numpy as np

from .._problem import BilevelProblem, Objective

__all__ = ["QuadraticBilevel", "make_quadratic",
           "quad_grad", "quad_hvp", "quad_value", "quad_tvp",
           "quad_grad_x", "quad_grad_y", "quad_hvp_yy", "quad_hvp_xy",
           "quad_sample_grad", "quad_sample_hvp", "quad_sample_value",
           "quad_sample_grad_x", "quad_sample_grad_y", "quad_sample_hvp_yy",
           "quad_sample_hvp_xy"]

#: Q (the Hessian of F) is accepted when lambda_min(Q) >= Q_MIN_RATIO * lambda_max(Q).
Q_MIN_RATIO = 1e-3
#: The lower mean Hessian A is accepted when lambda_min(A) >= A_MIN_RATIO * lambda_max(A).
A_MIN_RATIO = 1e-4
#: How many times make_quadratic may double the ridge before giving up.
MAX_RIDGE_DOUBLINGS = 40


# ---------------------------------------------------------------------------------------
# Deterministic callbacks (mean matrices). Shared by the upper and the lower level.
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _quad_affine(z, A, B, C, a, b, lin):
    """(B x + C y + lin b, A y + C^T x + lin a) for z = (x, y)."""
    dx = B.shape[0]
    dy = A.shape[0]
    out = np.empty(dx + dy)
    for p in range(dx):
        s = lin * b[p]
        for q in range(dx):
            s += B[p, q] * z[q]
        for q in range(dy):
            s += C[p, q] * z[dx + q]
        out[p] = s
    for q in range(dy):
        s = lin * a[q]
        for r in range(dy):
            s += A[q, r] * z[dx + r]
        out[dx + q] = s
    for p in range(dx):
        xp = z[p]
        for q in range(dy):
            out[dx + q] += C[p, q] * xp
    return out


@numba.njit(cache=True)
def quad_grad(z, A, B, C, a, b):
    """Gradient over z = (x, y) of y.A y/2 + x.B x/2 + x.C y + a.y + b.x."""
    return _quad_affine(z, A, B, C, a, b, 1.0)


@numba.njit(cache=True)
def quad_hvp(z, v, A, B, C, a, b):
    """Hessian [[B, C], [C^T, A]] times v (independent of z)."""
    return _quad_affine(v, A, B, C, a, b, 0.0)


@numba.njit(cache=True)
def quad_value(z, A, B, C, a, b):
    """y.A y/2 + x.B x/2 + x.C y + a.y + b.x for z = (x, y)."""
    dx = B.shape[0]
    dy = A.shape[0]
    s = 0.0
    for p in range(dx):
        xp = z[p]
        t = 0.5 * B[p, p] * xp + b[p]
        for q in range(p + 1, dx):
            t += B[p, q] * z[q]
        for q in range(dy):
            t += C[p, q] * z[dx + q]
        s += xp * t
    for q in range(dy):
        yq = z[dx + q]
        t = 0.5 * A[q, q] * yq + a[q]
        for r in range(q + 1, dy):
            t += A[q, r] * z[dx + r]
        s += yq * t
    return s


@numba.njit(cache=True)
def quad_grad_x(z, A, B, C, a, b):
    """Block oracle ``grad_x = B x + C y + b``."""
    dx = B.shape[0]
    return B @ z[:dx] + C @ z[dx:] + b


@numba.njit(cache=True)
def quad_grad_y(z, A, B, C, a, b):
    """Block oracle ``grad_y = A y + C^T x + a``."""
    dx = B.shape[0]
    return A @ z[dx:] + z[:dx] @ C + a


@numba.njit(cache=True)
def quad_hvp_yy(z, v, A, B, C, a, b):
    """Block oracle ``H_yy v = A v`` (one BLAS matrix-vector product)."""
    return A @ v


@numba.njit(cache=True)
def quad_hvp_xy(z, v, A, B, C, a, b):
    """Block oracle ``H_xy v = C v`` (one BLAS matrix-vector product)."""
    return C @ v


@numba.njit(cache=True)
def quad_tvp(z, u, w, A, B, C, a, b):
    """Third-order product: zero for a quadratic."""
    return np.zeros(z.shape[0])


# ---------------------------------------------------------------------------------------
# Stochastic callbacks (per-sample arrays, mean over the samples in idx).
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _sample_affine(z, idx, U, W, C, a, b, ridge, lin):
    """Mean over i in idx of (B_i x + C_i y + lin b_i, A_i y + C_i^T x + lin a_i)."""
    dx = W.shape[1]
    dy = U.shape[1]
    out = np.zeros(dx + dy)
    m = idx.shape[0]
    for k in range(m):
        i = idx[k]
        wx = 0.0
        for p in range(dx):
            wx += W[i, p] * z[p]
        uy = 0.0
        for q in range(dy):
            uy += U[i, q] * z[dx + q]
        for q in range(dy):
            out[dx + q] += U[i, q] * uy + lin * a[i, q]
        # one pass over the cross matrix C_i for both C_i y and C_i^T x
        for p in range(dx):
            xp = z[p]
            s = W[i, p] * wx + lin * b[i, p]
            if xp != 0.0:
                for q in range(dy):
                    c = C[i, p, q]
                    s += c * z[dx + q]
                    out[dx + q] += c * xp
            else:  # H (0, v): no C^T x term (the lower Hessian-vector products)
                for q in range(dy):
                    s += C[i, p, q] * z[dx + q]
            out[p] += s
    scale = 1.0 / m if m > 0 else 0.0
    for j in range(dx + dy):
        out[j] = out[j] * scale + ridge * z[j]
    return out


@numba.njit(cache=True)
def quad_sample_grad(z, idx, U, W, C, a, b, ridge):
    """Mean over i in idx of grad phi_i(z) (see the module docstring)."""
    return _sample_affine(z, idx, U, W, C, a, b, ridge, 1.0)


@numba.njit(cache=True)
def quad_sample_hvp(z, v, idx, U, W, C, a, b, ridge):
    """Mean over i in idx of Hessian(phi_i) times v."""
    return _sample_affine(v, idx, U, W, C, a, b, ridge, 0.0)


@numba.njit(cache=True)
def _batch_mean(out, m, ridge, zb):
    """``out / m + ridge zb`` in place (the mean over a batch of m samples, plus the ridge
    term of the block; ``ridge = 0`` for a cross block)."""
    scale = 1.0 / m if m > 0 else 0.0
    for j in range(out.shape[0]):
        out[j] = out[j] * scale + ridge * zb[j]
    return out


@numba.njit(cache=True)
def quad_sample_grad_x(z, idx, U, W, C, a, b, ridge):
    """Block oracle: mean over i in idx of ``B_i x + C_i y + b_i`` (length dx)."""
    dx = W.shape[1]
    out = np.zeros(dx)
    for i in idx:
        wx = W[i] @ z[:dx]
        for p in range(dx):
            out[p] += W[i, p] * wx + b[i, p] + C[i, p] @ z[dx:]
    return _batch_mean(out, idx.shape[0], ridge, z[:dx])


@numba.njit(cache=True)
def quad_sample_grad_y(z, idx, U, W, C, a, b, ridge):
    """Block oracle: mean over i in idx of ``A_i y + C_i^T x + a_i`` (length dy); skips the
    cross matrix where x is zero."""
    dx = W.shape[1]
    y = z[dx:]
    out = np.zeros(y.shape[0])
    for i in idx:
        u = U[i]
        uy = 0.0
        for q in range(y.shape[0]):
            uy += u[q] * y[q]
        for q in range(y.shape[0]):
            out[q] += u[q] * uy + a[i, q]
        for p in range(dx):
            xp = z[p]
            if xp != 0.0:
                c = C[i, p]
                for q in range(y.shape[0]):
                    out[q] += c[q] * xp
    return _batch_mean(out, idx.shape[0], ridge, y)


@numba.njit(cache=True)
def quad_sample_hvp_yy(z, v, idx, U, W, C, a, b, ridge):
    """Block oracle: mean over i in idx of ``A_i v = u_i (u_i . v) + ridge v`` (O(dy) per
    sample; the joint product with (0, v) also passes over C_i)."""
    dy = v.shape[0]
    out = np.zeros(dy)
    for i in idx:
        uv = U[i, 0] * v[0]
        for q in range(1, dy):
            uv += U[i, q] * v[q]
        for q in range(dy):
            out[q] += U[i, q] * uv
    return _batch_mean(out, idx.shape[0], ridge, v)


@numba.njit(cache=True)
def quad_sample_hvp_xy(z, v, idx, U, W, C, a, b, ridge):
    """Block oracle: mean over i in idx of ``C_i v`` (length dx)."""
    out = np.zeros(W.shape[1])
    for i in idx:
        out += C[i] @ v
    return _batch_mean(out, idx.shape[0], 0.0, out)


def sample_value_source(z, i, U, W, C, a, b):
    """phi_i(z) without the ridge: plain Python over scalars, compiled for the CPU here
    (``_sample_value``) and as a CUDA device function in
    :mod:`mlocore.problems.cuda_stochastic` (one source)."""
    dx = W.shape[1]
    dy = U.shape[1]
    wx = 0.0
    bx = 0.0
    for p in range(dx):
        wx += W[i, p] * z[p]
        bx += b[i, p] * z[p]
    uy = 0.0
    ay = 0.0
    for q in range(dy):
        uy += U[i, q] * z[dx + q]
        ay += a[i, q] * z[dx + q]
    xcy = 0.0
    for p in range(dx):
        t = 0.0
        for q in range(dy):
            t += C[i, p, q] * z[dx + q]
        xcy += z[p] * t
    return 0.5 * (wx * wx + uy * uy) + xcy + ay + bx


_sample_value = numba.njit(cache=True)(sample_value_source)


@numba.njit(cache=True)
def quad_sample_value(z, idx, U, W, C, a, b, ridge):
    """Mean over i in idx of phi_i(z)."""
    m = idx.shape[0]
    s = 0.0
    for k in range(m):
        s += _sample_value(z, idx[k], U, W, C, a, b)
    scale = 1.0 / m if m > 0 else 0.0
    sq = 0.0
    for j in range(z.shape[0]):
        sq += z[j] * z[j]
    return s * scale + 0.5 * ridge * sq


# ---------------------------------------------------------------------------------------
# Data generation and closed forms.
# ---------------------------------------------------------------------------------------
def _draw_level(rng, n, dx, dy):
    """Per-sample arrays of one level: rank-one factors, cross matrices, linear terms.

    Each family is a common mean plus per-sample noise, so the mean over samples keeps a
    non-trivial coupling while single samples are noisy (as in benchopt's generator).
    """
    U = rng.standard_normal((n, dy))
    W = rng.standard_normal((n, dx))
    C0 = rng.standard_normal((dx, dy)) / np.sqrt(dy)
    C = C0 + rng.standard_normal((n, dx, dy)) / np.sqrt(dy)
    a = rng.standard_normal(dy) + rng.standard_normal((n, dy))
    b = rng.standard_normal(dx) + rng.standard_normal((n, dx))
    return tuple(np.ascontiguousarray(arr, dtype=np.float64) for arr in (U, W, C, a, b))


def _means(samples, ridge):
    """Mean matrices (A, B, C, a, b) of one level, ridge included in A and B."""
    U, W, C, a, b = samples
    n, dy = U.shape
    dx = W.shape[1]
    A = U.T @ U / n + ridge * np.eye(dy)
    B = W.T @ W / n + ridge * np.eye(dx)
    A = 0.5 * (A + A.T)
    B = 0.5 * (B + B.T)
    return tuple(np.ascontiguousarray(arr, dtype=np.float64)
                 for arr in (A, B, C.mean(axis=0), a.mean(axis=0), b.mean(axis=0)))


def _closed_form(lower, upper):
    """(J, y0, Q, r) from the mean matrices of both levels."""
    A, _, C, a, _ = lower
    F, G, K, f_y, h_x = upper
    J = -np.linalg.solve(A, C.T)
    y0 = -np.linalg.solve(A, a)
    KJ = K @ J
    Q = J.T @ F @ J + G + KJ + KJ.T
    Q = 0.5 * (Q + Q.T)
    r = J.T @ (F @ y0 + f_y) + K @ y0 + h_x
    return J, y0, Q, r


def _well_conditioned(M, ratio):
    ev = np.linalg.eigvalsh(M)
    return bool(np.all(np.isfinite(ev)) and ev[0] > 0 and ev[0] >= ratio * ev[-1]), ev


class QuadraticBilevel:
    """A stochastic quadratic bilevel problem with its closed-form solution.

    Built by :func:`make_quadratic`. The variable order is ``z = concat(x, y)``.

    Attributes
    ----------
    problem : BilevelProblem
        Deterministic form over the mean matrices (grad, hvp, value, and a zero tvp).
    stochastic_problem : BilevelProblem
        Same objectives with ``n_samples`` (n_outer for f, n_inner for g): callbacks take an
        int64 index array and average the selected samples.
    dx, dy, n_outer, n_inner : int
    ridge : float
        The ridge actually used (possibly larger than the one requested, see
        :func:`make_quadratic`); ``ridge_requested`` is the one asked for.
    lower_samples, upper_samples : tuple of ndarray
        Per-sample arrays ``(U, W, C, a, b)`` of g and f: shapes (n, dy), (n, dx),
        (n, dx, dy), (n, dy), (n, dx).
    lower_means, upper_means : tuple of ndarray
        Mean matrices ``(A, B, C, a, b)`` (ridge included in A and B): for g, docs/mathematics.md's
        ``(A, -, C, a, -)``; for f, its ``(F, G, K, f_z, h_x)``.
    jacobian : ndarray, shape (dy, dx)
        ``J = dy*/dx = -A^{-1} C^T``.
    y_intercept : ndarray, shape (dy,)
        ``y*(0) = -A^{-1} a``.
    Q : ndarray, shape (dx, dx)
        Hessian of F: ``J^T F J + G + K J + (K J)^T`` (positive definite).
    r : ndarray, shape (dx,)
        ``grad F(0)``.
    x_star : ndarray, shape (dx,)
        The minimizer ``-Q^{-1} r``.
    F_star : float
        ``F(x_star)``.
    """

    def __init__(self, lower_samples, upper_samples, ridge, ridge_requested):
        self.lower_samples = lower_samples
        self.upper_samples = upper_samples
        self.ridge = float(ridge)
        self.ridge_requested = float(ridge_requested)
        self.n_inner, self.dy = lower_samples[0].shape
        self.n_outer = upper_samples[0].shape[0]
        self.dx = lower_samples[1].shape[1]
        self.lower_means = _means(lower_samples, self.ridge)
        self.upper_means = _means(upper_samples, self.ridge)
        J, y0, Q, r = _closed_form(self.lower_means, self.upper_means)
        self.jacobian = np.ascontiguousarray(J)
        self.y_intercept = np.ascontiguousarray(y0)
        self.Q = np.ascontiguousarray(Q)
        self.r = np.ascontiguousarray(r)
        self.x_star = np.ascontiguousarray(-np.linalg.solve(Q, r))
        self.F_star = self.F(self.x_star)
        dims = (self.dx, self.dy)
        self.problem = BilevelProblem(
            upper=Objective(quad_grad, hvp=quad_hvp, value=quad_value, tvp=quad_tvp,
                            args=self.upper_means, grad_x=quad_grad_x, grad_y=quad_grad_y),
            lower=Objective(quad_grad, hvp=quad_hvp, value=quad_value, tvp=quad_tvp,
                            args=self.lower_means, grad_y=quad_grad_y, hvp_yy=quad_hvp_yy,
                            hvp_xy=quad_hvp_xy),
            dims=dims)
        self.stochastic_problem = BilevelProblem(
            upper=Objective(quad_sample_grad, hvp=quad_sample_hvp, value=quad_sample_value,
                            args=upper_samples + (self.ridge,), n_samples=self.n_outer,
                            grad_x=quad_sample_grad_x, grad_y=quad_sample_grad_y),
            lower=Objective(quad_sample_grad, hvp=quad_sample_hvp, value=quad_sample_value,
                            args=lower_samples + (self.ridge,), n_samples=self.n_inner,
                            grad_y=quad_sample_grad_y, hvp_yy=quad_sample_hvp_yy,
                            hvp_xy=quad_sample_hvp_xy),
            dims=dims)

    def __repr__(self):
        return (f"QuadraticBilevel(dx={self.dx}, dy={self.dy}, n_outer={self.n_outer}, "
                f"n_inner={self.n_inner}, ridge={self.ridge:g})")

    def _x(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dx,):
            raise ValueError(f"x must have shape ({self.dx},), got shape={x.shape}")
        return x

    def y_star(self, x):
        """Lower solution ``y*(x) = y0 + J x``."""
        return self.y_intercept + self.jacobian @ self._x(x)

    def z_star(self, x):
        """Joint vector ``concat(x, y*(x))`` (C-contiguous float64)."""
        x = self._x(x)
        return np.ascontiguousarray(np.concatenate([x, self.y_star(x)]))

    def F(self, x):
        """Upper objective at the lower solution, ``f(x, y*(x))``."""
        return float(quad_value(self.z_star(x), *self.upper_means))

    def hypergrad(self, x):
        """Exact hypergradient ``grad_x f + J^T grad_y f`` at ``(x, y*(x))``."""
        g = quad_grad(self.z_star(x), *self.upper_means)
        return g[:self.dx] + self.jacobian.T @ g[self.dx:]


def make_quadratic(dx=5, dy=10, n_outer=50, n_inner=100, seed=0, ridge=0.1, *,
                   adjust_ridge=True):
    """A random stochastic quadratic bilevel problem (benchopt's ``simulated``).

    Parameters
    ----------
    dx, dy : int
        Sizes of the upper variable x and the lower variable y.
    n_outer, n_inner : int
        Number of samples of the upper objective f and of the lower objective g.
    seed : int or numpy.random.Generator
        Seed of ``numpy.random.default_rng``.
    ridge : float
        ``ridge/2 (|x|^2 + |y|^2)`` is added to every sample of both levels: the rank-one
        sample curvatures then average to a strongly convex, reasonably conditioned lower
        problem (also when ``n_inner < dy``), and it pushes the upper Hessian Q towards
        positive definiteness.
    adjust_ridge : bool
        Data are accepted when the lower mean Hessian A has
        ``lambda_min >= A_MIN_RATIO lambda_max`` and the Hessian of F, Q, has
        ``lambda_min >= Q_MIN_RATIO lambda_max`` (module constants). If not, with
        ``adjust_ridge=True`` the ridge is doubled (from 1e-3 if it is 0) until they are (the
        value used is ``.ridge``); with ``adjust_ridge=False`` a ValueError is raised.

    Returns
    -------
    QuadraticBilevel

    Raises
    ------
    ValueError
        Invalid sizes, or ill-conditioned data with ``adjust_ridge=False``.
    RuntimeError
        No ridge up to ``ridge * 2**MAX_RIDGE_DOUBLINGS`` makes Q positive definite.
    """
    for name, val in (("dx", dx), ("dy", dy), ("n_outer", n_outer), ("n_inner", n_inner)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) \
            or not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    rng = np.random.default_rng(seed)
    lower = _draw_level(rng, int(n_inner), int(dx), int(dy))
    upper = _draw_level(rng, int(n_outer), int(dx), int(dy))
    requested = float(ridge)
    lam = requested
    for _ in range(MAX_RIDGE_DOUBLINGS + 1):
        lower_means = _means(lower, lam)
        ok_a, ev_a = _well_conditioned(lower_means[0], A_MIN_RATIO)
        ok_q, ev_q = False, None
        if ok_a:
            _, _, Q, _ = _closed_form(lower_means, _means(upper, lam))
            ok_q, ev_q = _well_conditioned(Q, Q_MIN_RATIO)
        if ok_a and ok_q:
            return QuadraticBilevel(lower, upper, lam, requested)
        if not adjust_ridge:
            if not ok_a:
                what = (f"the lower Hessian A has eigenvalues in [{ev_a[0]:.3g}, {ev_a[-1]:.3g}]"
                        f" (need lambda_min >= {A_MIN_RATIO:g} lambda_max)")
            else:
                what = (f"Q = J^T F J + G + KJ + (KJ)^T has eigenvalues in "
                        f"[{ev_q[0]:.3g}, {ev_q[-1]:.3g}] (need lambda_min >= "
                        f"{Q_MIN_RATIO:g} lambda_max)")
            raise ValueError(f"make_quadratic(seed={seed!r}, ridge={requested:g}): {what}; "
                             "use a larger ridge, another seed, or adjust_ridge=True")
        lam = 2.0 * lam if lam > 0 else 1e-3
    raise RuntimeError(f"make_quadratic(seed={seed!r}): no ridge up to {lam / 2:g} makes the "
                       "lower Hessian and Q = J^T F J + G + KJ + (KJ)^T positive definite and "
                       "well conditioned; the data are degenerate (try another seed)")
