"""Hyperparameter selection for l2-regularized logistic regression, one penalty per feature.

Over the joint vector ``z = concat(lam, w)`` (``lam``: log-penalties, size n_features;
``w``: weights, size n_features), with labels ``t`` in {0, 1} and logits ``m = X w``:

    lower  g(lam, w) = mean_i [softplus(m_i) - t_i m_i]  on the training set
                       + 1/2 sum_j exp(lam_j) w_j^2,
    upper  f(lam, w) = mean_i [softplus(m_i) - t_i m_i]  on the validation set,

with ``softplus(m) = log(1 + exp(m)) = max(m, 0) + log1p(exp(-|m|))`` (stable for any m).
g is strongly convex in w (its Hessian is ``X^T D X / n + diag(exp(lam))``), so w*(lam) is
unique. The Hessians over z, with ``e = exp(lam)`` and ``D = diag(s (1 - s))``,
``s = sigmoid(m)``:

    g:  [[diag(e w^2 / 2), diag(e w)], [diag(e w), X^T D X / n + diag(e)]]
    f:  [[0, 0], [0, X^T D X / n]]

The callbacks are module-level ``@numba.njit(cache=True)`` functions taking ``(X, t)`` as args.
The deterministic ones (``logistic_lower_grad`` ...) average over all rows of X; the
stochastic ones (``logistic_sample_lower_grad(z, idx, X, t)`` ...) take an int64 index array
right after the vectors and average the log-loss over the rows in ``idx`` (any length >= 1,
repeats allowed), the penalty ``1/2 sum_j exp(lam_j) w_j^2`` being added in full on every
call. With ``idx = arange(n)`` they are the deterministic ones (same summation order).

Reference evaluation (no closed form): :class:`LogisticHyperparameter` computes ``F(lam)``,
``hypergrad(lam)`` and ``x_star`` with mlocore's deterministic solvers on the full-batch
problem (see :class:`BilevelReference`).
"""
from __future__ import annotations

import numbers

import numba
import numpy as np

from .._hypergrad import hypergrad, solve_lower
from .._minimize import minimize_bilevel
from .._problem import BilevelProblem, Objective

__all__ = ["LogisticHyperparameter", "BilevelReference", "make_logistic",
           "make_logistic_ijcnn1_like", "load_breast_cancer_logistic",
           "logistic_lower_grad", "logistic_lower_hvp", "logistic_lower_value",
           "logistic_upper_grad", "logistic_upper_hvp", "logistic_upper_value",
           "logistic_lower_grad_y", "logistic_lower_hvp_yy", "logistic_lower_hvp_xy",
           "logistic_upper_grad_x", "logistic_upper_grad_y", "new_curvature_cache",
           "logistic_lower_grad_cached", "logistic_lower_hvp_cached",
           "logistic_lower_value_cached", "logistic_lower_grad_y_cached",
           "logistic_lower_hvp_yy_cached", "logistic_lower_hvp_xy_cached",
           "logistic_sample_lower_grad", "logistic_sample_lower_hvp",
           "logistic_sample_lower_value", "logistic_sample_upper_grad",
           "logistic_sample_upper_hvp", "logistic_sample_upper_value",
           "logistic_sample_lower_grad_y", "logistic_sample_lower_hvp_yy",
           "logistic_sample_lower_hvp_xy", "logistic_sample_upper_grad_x",
           "logistic_sample_upper_grad_y"]


#: Default ``star_bound`` of the x_star search: |lam_j| beyond it means lam_j -> +-infinity.
LAM_BOUND = 20.0


# ---------------------------------------------------------------------------------------
# Data-fit term (shared by both levels). w = z[d:], d = X.shape[1].
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _softplus(m):
    if m > 0.0:
        return m + np.log1p(np.exp(-m))
    return np.log1p(np.exp(m))


@numba.njit(cache=True)
def _sigmoid(m):
    if m >= 0.0:
        return 1.0 / (1.0 + np.exp(-m))
    e = np.exp(m)
    return e / (1.0 + e)


@numba.njit(cache=True)
def _logit(X, z, i, d):
    m = 0.0
    for j in range(d):
        m += X[i, j] * z[d + j]
    return m


@numba.njit(cache=True)
def _loss_value(z, X, t):
    n, d = X.shape
    m = X @ np.ascontiguousarray(z[d:])
    s = 0.0
    for i in range(n):
        s += _softplus(m[i]) - t[i] * m[i]
    return s / n


@numba.njit(cache=True)
def _weights(X, w):
    """``sigmoid(X w)`` row by row (one BLAS mat-vec, then the stable scalar sigmoid)."""
    m = X @ w
    for i in range(m.shape[0]):
        m[i] = _sigmoid(m[i])
    return m


@numba.njit(cache=True)
def _loss_grad_w(z, X, t):
    """Gradient over w of the mean log-loss: ``X^T (sigmoid(X w) - t) / n``."""
    n, d = X.shape
    r = _weights(X, np.ascontiguousarray(z[d:]))
    r -= t
    r /= n
    return X.T @ r


@numba.njit(cache=True)
def _loss_hvp_w(z, vw, X):
    """Hessian over w of the mean log-loss times vw: ``X^T D X vw / n``, D = s(1 - s)."""
    n, d = X.shape
    s = _weights(X, np.ascontiguousarray(z[d:]))
    q = X @ vw
    for i in range(n):
        q[i] *= s[i] * (1.0 - s[i]) / n
    return X.T @ q


@numba.njit(cache=True)
def _loss_grad(z, X, t):
    """Gradient over z of the mean log-loss (zero on the lam block)."""
    d = X.shape[1]
    out = np.zeros(2 * d)
    out[d:] = _loss_grad_w(z, X, t)
    return out


@numba.njit(cache=True)
def _loss_hvp(z, v, X, t):
    """Hessian over z of the mean log-loss times v: (0, X^T D X v_w / n)."""
    d = X.shape[1]
    out = np.zeros(2 * d)
    out[d:] = _loss_hvp_w(z, np.ascontiguousarray(v[d:]), X)
    return out


# ---------------------------------------------------------------------------------------
# Public callbacks.
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def logistic_lower_value(z, X, t):
    """Training log-loss plus 1/2 sum_j exp(lam_j) w_j^2."""
    d = X.shape[1]
    pen = 0.0
    for j in range(d):
        w = z[d + j]
        pen += np.exp(z[j]) * w * w
    return _loss_value(z, X, t) + 0.5 * pen


@numba.njit(cache=True)
def logistic_lower_grad(z, X, t):
    """Gradient of the lower objective over z = (lam, w)."""
    d = X.shape[1]
    out = _loss_grad(z, X, t)
    for j in range(d):
        e = np.exp(z[j])
        w = z[d + j]
        out[j] = 0.5 * e * w * w
        out[d + j] += e * w
    return out


@numba.njit(cache=True)
def logistic_lower_hvp(z, v, X, t):
    """Hessian of the lower objective over z = (lam, w) times v (cross terms included)."""
    out = _loss_hvp(z, v, X, t)
    _add_penalty_hvp(z, v, out, X.shape[1])
    return out


@numba.njit(cache=True)
def _add_penalty_hvp(z, v, out, d):
    """Set the lam block of out and add to its w block the Hessian of the penalty
    ``1/2 sum_j exp(lam_j) w_j^2`` times v."""
    for j in range(d):
        e = np.exp(z[j])
        w = z[d + j]
        out[j] = 0.5 * e * w * w * v[j] + e * w * v[d + j]
        out[d + j] += e * w * v[j] + e * v[d + j]


@numba.njit(cache=True)
def logistic_lower_grad_y(z, X, t):
    """Block oracle: gradient of the lower objective over w."""
    d = X.shape[1]
    out = _loss_grad_w(z, X, t)
    for j in range(d):
        out[j] += np.exp(z[j]) * z[d + j]
    return out


@numba.njit(cache=True)
def logistic_lower_hvp_yy(z, v, X, t):
    """Block oracle: ``H_ww v = X^T D X v / n + exp(lam) * v`` (v of length d)."""
    d = X.shape[1]
    out = _loss_hvp_w(z, v, X)
    for j in range(d):
        out[j] += np.exp(z[j]) * v[j]
    return out


@numba.njit(cache=True)
def logistic_lower_hvp_xy(z, v, X, t):
    """Block oracle: ``H_lam,w v = exp(lam) * w * v`` (diagonal; no pass over the data)."""
    d = X.shape[1]
    out = np.empty(d)
    for j in range(d):
        out[j] = np.exp(z[j]) * z[d + j] * v[j]
    return out


@numba.njit(cache=True)
def logistic_upper_grad_x(z, X, t):
    """Block oracle: the validation loss does not depend on lam (zeros)."""
    return np.zeros(X.shape[1])


@numba.njit(cache=True)
def logistic_upper_grad_y(z, X, t):
    """Block oracle: gradient of the validation log-loss over w."""
    return _loss_grad_w(z, X, t)


@numba.njit(cache=True)
def logistic_upper_value(z, X, t):
    """Validation log-loss (depends on w only)."""
    return _loss_value(z, X, t)


@numba.njit(cache=True)
def logistic_upper_grad(z, X, t):
    """Gradient of the validation log-loss over z = (lam, w) (zero on lam)."""
    return _loss_grad(z, X, t)


@numba.njit(cache=True)
def logistic_upper_hvp(z, v, X, t):
    """Hessian of the validation log-loss over z times v."""
    return _loss_hvp(z, v, X, t)


# ---------------------------------------------------------------------------------------
# The lower objective with its curvature weights kept between calls: args (X, t, cache),
# cache = new_curvature_cache(X). A CG solve multiplies by H_ww(z) many times at one z;
# D = s (1 - s) / n at that z (one mat-vec and n sigmoids) is computed at the first product
# and reused while w is unchanged, so that a product costs the two mat-vecs X v, X^T q.
# Results are bit for bit those of the callbacks above. One cache per problem: the kernels
# hold the GIL, so threads of one process do not interleave their products.
# ---------------------------------------------------------------------------------------
def new_curvature_cache(X):
    """The ``cache`` argument of the ``logistic_lower_*_cached`` callbacks for data X
    (``[valid, w (d), D / n (n)]``, invalid until the first product)."""
    shape = np.shape(X)
    if len(shape) != 2:
        raise ValueError(f"X must be a 2-D data matrix (samples x features), got shape "
                         f"{shape}")
    return np.zeros(1 + shape[0] + shape[1])


@numba.njit(cache=True)
def _curvature_weights(z, X, cache):
    """``s (1 - s) / n`` at the w of z (``s = sigmoid(X w)``), from the cache when it holds
    that w (compared entry by entry), else computed and stored."""
    n, d = X.shape
    if cache.shape[0] != 1 + d + n:
        raise ValueError("the curvature cache does not fit X: make it with "
                         "new_curvature_cache(X)")
    same = cache[0] == 1.0
    if same:
        for j in range(d):
            if cache[1 + j] != z[d + j]:
                same = False
                break
    D = cache[1 + d:]
    if not same:
        s = _weights(X, np.ascontiguousarray(z[d:]))
        for i in range(n):
            D[i] = s[i] * (1.0 - s[i]) / n
        cache[1:1 + d] = z[d:]
        cache[0] = 1.0
    return D


@numba.njit(cache=True)
def _loss_hvp_w_cached(z, vw, X, cache):
    """:func:`_loss_hvp_w` with the weights from the cache."""
    D = _curvature_weights(z, X, cache)
    q = X @ vw
    for i in range(q.shape[0]):
        q[i] *= D[i]
    return X.T @ q


@numba.njit(cache=True)
def logistic_lower_value_cached(z, X, t, cache):
    """:func:`logistic_lower_value` (args ``(X, t, cache)``)."""
    return logistic_lower_value(z, X, t)


@numba.njit(cache=True)
def logistic_lower_grad_cached(z, X, t, cache):
    """:func:`logistic_lower_grad` (args ``(X, t, cache)``)."""
    return logistic_lower_grad(z, X, t)


@numba.njit(cache=True)
def logistic_lower_grad_y_cached(z, X, t, cache):
    """:func:`logistic_lower_grad_y` (args ``(X, t, cache)``)."""
    return logistic_lower_grad_y(z, X, t)


@numba.njit(cache=True)
def logistic_lower_hvp_xy_cached(z, v, X, t, cache):
    """:func:`logistic_lower_hvp_xy` (args ``(X, t, cache)``)."""
    return logistic_lower_hvp_xy(z, v, X, t)


@numba.njit(cache=True)
def logistic_lower_hvp_yy_cached(z, v, X, t, cache):
    """:func:`logistic_lower_hvp_yy` with the curvature weights kept between calls."""
    d = X.shape[1]
    out = _loss_hvp_w_cached(z, v, X, cache)
    for j in range(d):
        out[j] += np.exp(z[j]) * v[j]
    return out


@numba.njit(cache=True)
def logistic_lower_hvp_cached(z, v, X, t, cache):
    """:func:`logistic_lower_hvp` with the curvature weights kept between calls."""
    d = X.shape[1]
    out = np.zeros(2 * d)
    out[d:] = _loss_hvp_w_cached(z, np.ascontiguousarray(v[d:]), X, cache)
    _add_penalty_hvp(z, v, out, d)
    return out


# ---------------------------------------------------------------------------------------
# Stochastic callbacks: mean log-loss over the rows in idx (int64, any length >= 1).
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _sample_loss_value(z, idx, X, t):
    d = X.shape[1]
    m = idx.shape[0]
    s = 0.0
    for k in range(m):
        i = idx[k]
        mi = _logit(X, z, i, d)
        s += _softplus(mi) - t[i] * mi
    return s / m


@numba.njit(cache=True)
def _sample_loss_grad_w(z, idx, X, t):
    """Gradient over w of the mean log-loss over idx (length d)."""
    d = X.shape[1]
    m = idx.shape[0]
    out = np.zeros(d)
    for k in range(m):
        i = idx[k]
        r = (_sigmoid(_logit(X, z, i, d)) - t[i]) / m
        for j in range(d):
            out[j] += r * X[i, j]
    return out


@numba.njit(cache=True)
def _sample_loss_grad(z, idx, X, t):
    """Gradient over z of the mean log-loss over idx (zero on the lam block)."""
    d = X.shape[1]
    out = np.zeros(2 * d)
    out[d:] = _sample_loss_grad_w(z, idx, X, t)
    return out


@numba.njit(cache=True)
def _sample_loss_hvp_ww(z, v_w, idx, X, t):
    """Hessian over w of the mean log-loss over idx times v_w (length d)."""
    d = X.shape[1]
    m = idx.shape[0]
    out = np.zeros(d)
    for k in range(m):
        i = idx[k]
        s = _sigmoid(_logit(X, z, i, d))
        xv = 0.0
        for j in range(d):
            xv += X[i, j] * v_w[j]
        c = s * (1.0 - s) * xv / m
        for j in range(d):
            out[j] += c * X[i, j]
    return out


@numba.njit(cache=True)
def _sample_loss_hvp(z, v, idx, X, t):
    """Hessian over z of the mean log-loss over idx times v."""
    d = X.shape[1]
    out = np.zeros(2 * d)
    out[d:] = _sample_loss_hvp_ww(z, v[d:], idx, X, t)
    return out


@numba.njit(cache=True)
def logistic_sample_lower_value(z, idx, X, t):
    """Mean training log-loss over the rows in idx plus 1/2 sum_j exp(lam_j) w_j^2."""
    d = X.shape[1]
    pen = 0.0
    for j in range(d):
        w = z[d + j]
        pen += np.exp(z[j]) * w * w
    return _sample_loss_value(z, idx, X, t) + 0.5 * pen


@numba.njit(cache=True)
def logistic_sample_lower_grad(z, idx, X, t):
    """Gradient over z = (lam, w) of :func:`logistic_sample_lower_value`."""
    d = X.shape[1]
    out = _sample_loss_grad(z, idx, X, t)
    for j in range(d):
        e = np.exp(z[j])
        w = z[d + j]
        out[j] = 0.5 * e * w * w
        out[d + j] += e * w
    return out


@numba.njit(cache=True)
def logistic_sample_lower_hvp(z, v, idx, X, t):
    """Hessian over z = (lam, w) of :func:`logistic_sample_lower_value` times v."""
    d = X.shape[1]
    out = _sample_loss_hvp(z, v, idx, X, t)
    for j in range(d):
        e = np.exp(z[j])
        w = z[d + j]
        out[j] = 0.5 * e * w * w * v[j] + e * w * v[d + j]
        out[d + j] += e * w * v[j] + e * v[d + j]
    return out


@numba.njit(cache=True)
def logistic_sample_upper_value(z, idx, X, t):
    """Mean validation log-loss over the rows in idx (depends on w only)."""
    return _sample_loss_value(z, idx, X, t)


@numba.njit(cache=True)
def logistic_sample_upper_grad(z, idx, X, t):
    """Gradient over z of :func:`logistic_sample_upper_value` (zero on lam)."""
    return _sample_loss_grad(z, idx, X, t)


@numba.njit(cache=True)
def logistic_sample_upper_hvp(z, v, idx, X, t):
    """Hessian over z of :func:`logistic_sample_upper_value` times v."""
    return _sample_loss_hvp(z, v, idx, X, t)


@numba.njit(cache=True)
def logistic_sample_lower_grad_y(z, idx, X, t):
    """Block oracle: ``grad_w`` of :func:`logistic_sample_lower_value` (length d)."""
    out = _sample_loss_grad_w(z, idx, X, t)
    d = out.shape[0]
    out += np.exp(z[:d]) * z[d:]
    return out


@numba.njit(cache=True)
def logistic_sample_lower_hvp_yy(z, v, idx, X, t):
    """Block oracle: ``H_ww v`` of :func:`logistic_sample_lower_value` (length d)."""
    out = _sample_loss_hvp_ww(z, v, idx, X, t)
    out += np.exp(z[:out.shape[0]]) * v
    return out


@numba.njit(cache=True)
def logistic_sample_lower_hvp_xy(z, v, idx, X, t):
    """Block oracle: ``H_lam,w v = exp(lam) * w * v`` (the penalty only: no sample is read,
    idx is ignored)."""
    return logistic_lower_hvp_xy(z, v, X, t)


@numba.njit(cache=True)
def logistic_sample_upper_grad_x(z, idx, X, t):
    """Block oracle: ``grad_lam`` of :func:`logistic_sample_upper_value` (zero)."""
    return logistic_upper_grad_x(z, X, t)


@numba.njit(cache=True)
def logistic_sample_upper_grad_y(z, idx, X, t):
    """Block oracle: ``grad_w`` of :func:`logistic_sample_upper_value` (length d)."""
    return _sample_loss_grad_w(z, idx, X, t)


# ---------------------------------------------------------------------------------------
# Reference evaluation by mlocore's deterministic solvers (no closed form).
# ---------------------------------------------------------------------------------------
class BilevelReference:
    """``F(x) = f(x, y*(x))``, its exact gradient and a minimizer, by deterministic solvers.

    The reference protocol of the problem classes (``F``, ``hypergrad``, ``x_star``) for
    problems without a closed form: lower solves by :func:`mlocore.solve_lower` (Newton-CG),
    hypergradients by :func:`mlocore.hypergrad` (implicit differentiation, CG), both
    warm-started from the previous call (the last lower solution and adjoint are kept), and
    ``x_star`` by :func:`mlocore.minimize_bilevel` (``method="aid"``, Barzilai-Borwein steps
    with an Armijo search on F), computed at first access and cached.

    Parameters
    ----------
    problem : BilevelProblem
        The full-batch problem. A problem with stochastic objectives (``n_samples`` set) is
        fine: the deterministic solvers pass all the samples.
    y0 : array_like, shape (dy,)
        First warm start of the lower solution.
    x0 : array_like, shape (dx,), optional
        Start of the ``x_star`` search (default zeros).
    lower_tol : float
        ``|grad_y g| <= lower_tol`` for every lower solve (default 1e-10). Newton-CG converges
        quadratically, so the solutions are usually much more accurate than that.
    lin_tol : float
        Relative residual of the adjoint CG solve ``H_yy v = grad_y f`` (default 1e-10).
    find_star : bool
        False: ``x_star`` is None without a search (for problems known to have no finite
        minimizer, or when the search is too costly).
    star_tol : float
        The search stops when ``|grad F| <= star_tol`` (default 1e-8).
    star_maxiter : int
        Iterations of the search (default 500).
    star_bound : float, optional
        Stop the search, and report no minimizer, once a coordinate has stayed beyond
        ``|x_j| > star_bound`` for ``star_patience`` consecutive iterations (default None: no
        bound). For problems where such coordinates mean "running off to infinity"
        (log-penalties beyond ``exp(+-20)``, say), this ends hopeless searches early.
    star_patience : int
        Default 20 (a single Barzilai-Borwein step may overshoot and come back).
    star_curvature, star_xtol : float
        The point found is accepted only if the symmetrized finite-difference Hessian of F
        there (central differences of :meth:`hypergrad`, step ``star_fd_step``) has
        ``lambda_min >= star_curvature * lambda_max > 0`` (default 1e-4) and
        ``|grad F| / lambda_min <= star_xtol`` (default 1e-4; the first-order bound on the
        distance to the exact minimizer): an isolated minimizer located to that accuracy,
        not a point where F has become flat because some coordinates ran off towards
        infinity. The check is skipped (the point is accepted on its gradient alone) when
        ``dx > star_check_max_dx`` (default 64), where it would cost 2 dx hypergradients.
    star_fd_step : float
        Default 1e-4.

    Attributes
    ----------
    x_star_result : OptimizeResult or None
        The result of the search once done (``success``, ``message``, ``x``, ``fun``,
        ``jac``).
    x_star_info : dict or None
        After the search: ``grad_norm`` (``|grad F|`` at the point found), ``fun``,
        ``lambda_min``, ``lambda_max`` (eigenvalues of the finite-difference Hessian, when
        checked), ``error_bound`` (``grad_norm / lambda_min``: first-order bound on the
        distance to the exact minimizer), ``accepted`` and ``reason``.

    Notes
    -----
    ``x_star`` is a stationary point with ``|grad F(x_star)| <= star_tol``; near a
    nondegenerate minimizer its distance to the exact one is about
    ``|grad F| / lambda_min(hess F)`` (``x_star_info["error_bound"]``) and the error in
    ``F(x_star)`` about ``|grad F|^2 / (2 lambda_min)``. Solver round-off limits the
    accuracy too: the hypergradients are exact to about ``lower_tol`` and ``lin_tol``
    (relative). F is not convex in general: the search returns the minimizer reached from
    ``x0``. When the search fails (``star_maxiter`` runs out, typically because F keeps
    decreasing as some coordinates go to +-infinity, so that F has no finite minimizer) or
    the curvature check rejects the point, ``x_star`` is None and ``x_star_info["reason"]``
    says why.
    """

    def __init__(self, problem, y0, x0=None, *, lower_tol=1e-10, lin_tol=1e-10,
                 find_star=True, star_tol=1e-8, star_maxiter=500, star_bound=None,
                 star_patience=20, star_curvature=1e-4, star_xtol=1e-4, star_fd_step=1e-4,
                 star_check_max_dx=64):
        self.problem = problem
        self.dx, self.dy = problem.dims
        self._y = np.array(y0, dtype=np.float64).reshape(self.dy)
        self._y_init = self._y.copy()
        self._v = np.zeros(self.dy)
        self.x0 = np.zeros(self.dx) if x0 is None else \
            np.array(x0, dtype=np.float64).reshape(self.dx)
        self.lower_tol = float(lower_tol)
        self.lin_tol = float(lin_tol)
        self.find_star = bool(find_star)
        self.star_tol = float(star_tol)
        self.star_maxiter = int(star_maxiter)
        self.star_bound = None if star_bound is None else float(star_bound)
        self.star_patience = int(star_patience)
        self.star_curvature = float(star_curvature)
        self.star_xtol = float(star_xtol)
        self.star_fd_step = float(star_fd_step)
        self.star_check_max_dx = int(star_check_max_dx)
        self.x_star_result = None
        self.x_star_info = None
        self._star = None
        self._star_done = False
        self._F_star = None
        self._last = None  # (x, y*(x)) of the last lower solve

    def __repr__(self):
        return (f"BilevelReference(dims={self.problem.dims}, lower_tol={self.lower_tol:g}, "
                f"lin_tol={self.lin_tol:g}, find_star={self.find_star})")

    def _x(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dx,):
            raise ValueError(f"x must have shape ({self.dx},), got shape={x.shape}")
        return np.ascontiguousarray(x)

    def y_star(self, x):
        """Lower solution ``y*(x)`` (Newton-CG to ``|grad_y g| <= lower_tol``).

        Raises
        ------
        RuntimeError
            The lower solver did not converge.
        """
        x = self._x(x)
        if self._last is not None and np.array_equal(self._last[0], x):
            return self._last[1].copy()
        res = solve_lower(self.problem, x, self._y, method="newton-cg", tol=self.lower_tol)
        if not res.success:
            raise RuntimeError(f"reference lower solve failed: {res.message}")
        self._y = res.y
        self._last = (x.copy(), res.y.copy())
        return res.y.copy()

    def F(self, x):
        """``F(x) = f(x, y*(x))`` (upper value at the lower solution)."""
        x = self._x(x)
        y = self.y_star(x)
        up = self.problem.upper.compiled("upper")
        return float(up.value(np.concatenate([x, y]), *up.args))

    def hypergrad(self, x):
        """Exact hypergradient ``grad F(x)`` (implicit differentiation, CG to ``lin_tol``).

        Raises
        ------
        RuntimeError
            The lower solve or the linear solve did not converge.
        """
        x = self._x(x)
        y0 = self._last[1] if self._last is not None and np.array_equal(self._last[0], x) \
            else self._y
        res = hypergrad(self.problem, x, y0, method="cg", tol=self.lin_tol, v0=self._v,
                        lower_tol=self.lower_tol)
        if not res.success:
            raise RuntimeError(f"reference hypergradient failed: {res.message}")
        self._y, self._v = res.y, res.v
        self._last = (x.copy(), res.y.copy())
        return res.grad.copy()

    def fd_hessian(self, x, h=None):
        """Symmetrized Hessian of F at x by central differences of :meth:`hypergrad`
        (2 dx hypergradients; truncation error O(h^2), solver error O(tol / h))."""
        x = self._x(x)
        h = self.star_fd_step if h is None else float(h)
        cols = []
        for j in range(self.dx):
            e = np.zeros(self.dx)
            e[j] = h
            cols.append((self.hypergrad(x + e) - self.hypergrad(x - e)) / (2.0 * h))
        H = np.column_stack(cols)
        return 0.5 * (H + H.T)

    def _search(self):
        escaped = []
        bound = self.star_bound
        outside = np.zeros(self.dx, dtype=np.int64)  # consecutive iterations beyond bound

        def stop_if_escaping(inter):
            far = np.abs(inter.x) > bound
            outside[far] += 1
            outside[~far] = 0
            if outside.max() >= self.star_patience:
                escaped.append(int(np.argmax(outside)))
                raise StopIteration

        res = minimize_bilevel(self.problem, self.x0, self._y_init, method="aid",
                               tol=self.star_tol, maxiter=self.star_maxiter,
                               lower_tol=self.lower_tol, lin_tol=self.lin_tol,
                               callback=None if bound is None else stop_if_escaping)
        self.x_star_result = res
        xs = np.ascontiguousarray(res.x)
        info = {"grad_norm": float(np.linalg.norm(res.jac)) if res.jac is not None else np.nan,
                "fun": float(res.fun), "lambda_min": None, "lambda_max": None,
                "error_bound": None, "accepted": False, "reason": ""}
        self.x_star_info = info
        if escaped:
            j = escaped[0]
            info["reason"] = (f"coordinate {j} stayed beyond |x_j| = {bound:g} for "
                              f"{self.star_patience} iterations (x_j = {res.x[j]:.3g} at "
                              f"iteration {res.nit}): F has no finite minimizer along it, or "
                              "one too far out to matter")
            return None
        if not res.success:
            info["reason"] = f"the search did not converge: {res.message}"
            return None
        if self.dx > self.star_check_max_dx:
            info["accepted"] = True
            info["reason"] = (f"|grad F| <= {self.star_tol:g}; curvature not checked "
                              f"(dx = {self.dx} > star_check_max_dx)")
            return xs
        ev = np.linalg.eigvalsh(self.fd_hessian(xs))
        info["lambda_min"], info["lambda_max"] = float(ev[0]), float(ev[-1])
        err = info["grad_norm"] / float(ev[0]) if ev[0] > 0 else np.inf
        info["error_bound"] = err
        if not (ev[-1] > 0 and ev[0] >= self.star_curvature * ev[-1]
                and err <= self.star_xtol):
            info["reason"] = (f"F is (nearly) flat or not convex at the stationary point "
                              f"found: Hessian eigenvalues in [{ev[0]:.3g}, {ev[-1]:.3g}] "
                              f"and |grad F| / lambda_min = {err:.3g} (need lambda_min >= "
                              f"{self.star_curvature:g} lambda_max and a bound <= "
                              f"{self.star_xtol:g}); some coordinates are likely running "
                              "off to +-infinity")
            return None
        info["accepted"] = True
        info["reason"] = (f"|grad F| = {info['grad_norm']:.2e} and Hessian eigenvalues in "
                          f"[{ev[0]:.3g}, {ev[-1]:.3g}]")
        return xs

    @property
    def x_star(self):
        """A minimizer of F, or None; computed at first access and cached (see Notes)."""
        if not self._star_done:
            if self.find_star:
                self._star = self._search()  # an exception leaves it to be retried
            else:
                self.x_star_info = {"accepted": False, "reason": "find_star=False"}
            self._star_done = True
        return None if self._star is None else self._star.copy()

    @property
    def F_star(self):
        """``F(x_star)``, or None when x_star is None (cached)."""
        if self._F_star is None:
            xs = self.x_star
            if xs is not None:
                self._F_star = self.F(xs)
        return self._F_star


# ---------------------------------------------------------------------------------------
# Problem object and data sets.
# ---------------------------------------------------------------------------------------
def _c64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def _stable_logloss(X, t, w):
    m = X @ w
    return float(np.mean(np.logaddexp(0.0, m) - t * m))


class LogisticHyperparameter:
    """Per-feature l2 penalties of a logistic regression, selected on a validation set.

    Built by :func:`make_logistic`, :func:`make_logistic_ijcnn1_like` or
    :func:`load_breast_cancer_logistic`. The upper variable is ``lam`` (the penalty on
    feature j is ``exp(lam_j)``), the lower one the weights ``w``; ``z = concat(lam, w)``.

    Parameters
    ----------
    X_train, t_train, X_val, t_val : array_like
        Features (n, n_features) and labels in {0, 1} of the training (lower) and
        validation (upper) sets.
    X_test, t_test : array_like, optional
        Held-out split.
    feature_names : list of str, optional
    reference_options : dict, optional
        Keyword options of :class:`BilevelReference` (``x0``, ``lower_tol``, ``lin_tol``,
        ``find_star``, ``star_tol``, ``star_maxiter``, ...). Default ``star_bound`` is
        :data:`LAM_BOUND` (20): for features of unit scale a penalty ``exp(-20) = 2e-9`` is
        no penalty and ``exp(20) = 5e8`` removes the feature, so a search that leaves
        ``|lam_j| <= 20`` is running off to infinity, where F is flat.

    Attributes
    ----------
    problem : BilevelProblem
        ``dims = (n_features, n_features)``; the lower Objective has args
        ``(X_train, t_train)``, the upper one ``(X_val, t_val)`` (full-batch callbacks).
    stochastic_problem : BilevelProblem
        The same objectives with the ``logistic_sample_*`` callbacks, which take an int64
        index array: lower ``n_samples = n_train``, upper ``n_samples = n_val``.
    reference : BilevelReference
        Reference evaluation on ``problem`` (warm starts kept there); :meth:`F`,
        :meth:`hypergrad`, :attr:`x_star` and :attr:`F_star` delegate to it.
    X_train, t_train, X_val, t_val : ndarray
        Features and labels in {0., 1.} (float64, C-contiguous). The loaders standardize the
        features with the training statistics (except a constant bias column, see
        :func:`make_logistic_ijcnn1_like`).
    X_test, t_test : ndarray or None
        Held-out split, when the loader made one.
    n_features, n_train, n_val : int
    feature_names : list of str or None
    """

    def __init__(self, X_train, t_train, X_val, t_val, X_test=None, t_test=None,
                 feature_names=None, reference_options=None):
        self.X_train, self.t_train = _c64(X_train), _c64(t_train)
        self.X_val, self.t_val = _c64(X_val), _c64(t_val)
        self.X_test = None if X_test is None else _c64(X_test)
        self.t_test = None if t_test is None else _c64(t_test)
        self.n_features = int(self.X_train.shape[1])
        self.n_train = int(self.X_train.shape[0])
        self.n_val = int(self.X_val.shape[0])
        self.feature_names = feature_names
        d = self.n_features
        self.problem = BilevelProblem(
            upper=Objective(logistic_upper_grad, hvp=logistic_upper_hvp,
                            value=logistic_upper_value, args=(self.X_val, self.t_val),
                            grad_x=logistic_upper_grad_x, grad_y=logistic_upper_grad_y),
            lower=Objective(logistic_lower_grad_cached, hvp=logistic_lower_hvp_cached,
                            value=logistic_lower_value_cached,
                            args=(self.X_train, self.t_train,
                                  new_curvature_cache(self.X_train)),
                            grad_y=logistic_lower_grad_y_cached,
                            hvp_yy=logistic_lower_hvp_yy_cached,
                            hvp_xy=logistic_lower_hvp_xy_cached),
            dims=(d, d))
        self.stochastic_problem = BilevelProblem(
            upper=Objective(logistic_sample_upper_grad, hvp=logistic_sample_upper_hvp,
                            value=logistic_sample_upper_value, args=(self.X_val, self.t_val),
                            n_samples=self.n_val, grad_x=logistic_sample_upper_grad_x,
                            grad_y=logistic_sample_upper_grad_y),
            lower=Objective(logistic_sample_lower_grad, hvp=logistic_sample_lower_hvp,
                            value=logistic_sample_lower_value,
                            args=(self.X_train, self.t_train), n_samples=self.n_train,
                            grad_y=logistic_sample_lower_grad_y,
                            hvp_yy=logistic_sample_lower_hvp_yy,
                            hvp_xy=logistic_sample_lower_hvp_xy),
            dims=(d, d))
        opts = {"star_bound": LAM_BOUND}
        opts.update(reference_options or {})
        self.reference = BilevelReference(self.problem, np.zeros(d), **opts)

    # -- reference evaluation -------------------------------------------------------------
    def w_star(self, lam):
        """Lower solution ``w*(lam)`` (Newton-CG, see :class:`BilevelReference`)."""
        return self.reference.y_star(lam)

    def F(self, lam):
        """Validation log-loss at the lower solution, ``F(lam) = f(lam, w*(lam))``."""
        return self.reference.F(lam)

    def hypergrad(self, lam):
        """Exact hypergradient ``grad F(lam)`` (implicit differentiation, CG to 1e-10)."""
        return self.reference.hypergrad(lam)

    @property
    def x_star(self):
        """Minimizer of F found by ``minimize_bilevel(method="aid")`` from ``reference.x0``
        (zeros by default) to ``|grad F| <= 1e-8``, checked to be nondegenerate, or None.

        Computed at first access and cached. Often None: the best penalty of a feature is
        frequently ``lam_j -> -infinity`` (no penalty) or ``+infinity`` (feature dropped),
        where F becomes flat, and then F has no finite minimizer; the search stops once a
        coordinate stays beyond ``|lam_j| > 20`` (``reference.star_bound``) for 20
        iterations, ``reference.x_star_info`` says why, and ``reference.x_star_result.fun``
        estimates the infimum. For the default :func:`make_logistic`,
        :func:`load_breast_cancer_logistic` and :func:`make_logistic_ijcnn1_like` problems
        it is None, found so in about 2, 1 and 6 s. Options can be changed on
        ``reference`` before the first access. See :class:`BilevelReference` for the
        accuracy."""
        return self.reference.x_star

    @property
    def F_star(self):
        """``F(x_star)`` or None."""
        return self.reference.F_star

    def __repr__(self):
        test = "" if self.X_test is None else f", n_test={self.X_test.shape[0]}"
        return (f"LogisticHyperparameter(n_features={self.n_features}, "
                f"n_train={self.n_train}, n_val={self.n_val}{test})")

    def _split(self, split):
        if split == "train":
            return self.X_train, self.t_train
        if split == "val":
            return self.X_val, self.t_val
        if split == "test":
            if self.X_test is None:
                raise ValueError("this problem has no test split")
            return self.X_test, self.t_test
        raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")

    def _w(self, w):
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.n_features,):
            raise ValueError(f"w must have shape ({self.n_features},), got shape={w.shape}")
        return w

    def loss(self, w, split="val"):
        """Mean log-loss of the weights w on a split ("train", "val" or "test")."""
        X, t = self._split(split)
        return _stable_logloss(X, t, self._w(w))

    def val_loss(self, w):
        """Mean validation log-loss of the weights w (the upper objective)."""
        return self.loss(w, "val")

    def accuracy(self, w, split="val"):
        """Fraction of correctly classified samples (logit > 0 predicts 1) on a split."""
        X, t = self._split(split)
        pred = (X @ self._w(w) > 0.0).astype(np.float64)
        return float(np.mean(pred == t))


def _standardize(X_train, *others):
    mu = X_train.mean(axis=0)
    sd = X_train.std(axis=0)
    sd[sd == 0] = 1.0
    return tuple((X - mu) / sd for X in (X_train,) + others)


def _check_count(name, val, minimum=1):
    if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {val!r}")
    return int(val)


def make_logistic(n_train=200, n_val=200, n_features=10, seed=0):
    """Synthetic logistic-regression hyperparameter problem.

    Features are standard normal, correlated by a random mixing, then standardized with the
    training statistics; the true weights have decreasing magnitudes and the last third is
    zero, so that the best per-feature penalties differ. Labels are drawn from the logistic
    model. Returns a :class:`LogisticHyperparameter`.
    """
    n_train = _check_count("n_train", n_train, 2)
    n_val = _check_count("n_val", n_val)
    d = _check_count("n_features", n_features)
    rng = np.random.default_rng(seed)
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    X = rng.standard_normal((n_train + n_val, d)) @ mix
    w_true = rng.standard_normal(d) * 2.0 / np.sqrt(1.0 + np.arange(d))
    w_true[d - d // 3:] = 0.0
    prob = 1.0 / (1.0 + np.exp(-(X @ w_true)))
    t = (rng.random(n_train + n_val) < prob).astype(np.float64)
    X_train, X_val = _standardize(X[:n_train], X[n_train:])
    out = LogisticHyperparameter(X_train, t[:n_train], X_val, t[n_train:])
    out.w_true = w_true
    return out


def _sigmoid_np(m):
    return 0.5 * (1.0 + np.tanh(0.5 * m))


def make_logistic_ijcnn1_like(n_train=49990, n_val=91701, n_features=22, pos_fraction=0.1,
                              label_noise=0.02, seed=0, *, bias=True):
    """Synthetic data with the shape of LIBSVM's ijcnn1 (the benchopt bilevel benchmark).

    ijcnn1 has 22 features, 49,990 training and 91,701 test samples and about 9.7% positive
    labels; benchopt selects per-feature penalties on the training set with the test set as
    validation set. The defaults reproduce these sizes and the class imbalance; the data
    themselves are synthetic (no download):

    * ``n_features - 1`` correlated Gaussian features (a random mixing of standard normals),
      standardized with the training statistics, and, with ``bias=True``, a last constant
      column of ones (a penalized intercept with its own penalty: the model has no other
      intercept, and the imbalance needs one);
    * true weights with decreasing magnitudes, the last third of them zero (features that
      only add variance), and an intercept set by bisection so that the mean label
      probability is ``pos_fraction``;
    * labels drawn from the logistic model, then a fraction ``label_noise`` of them
      resampled uniformly in {0, 1}.

    Generation costs about 0.1 s at the default sizes (float64 arrays of 141,691 x 22,
    about 25 MB).

    Parameters
    ----------
    n_train, n_val : int
        Training (lower) and validation (upper) sizes.
    n_features : int
        Number of columns of X, the constant one included when ``bias=True``.
    pos_fraction : float in (0, 1)
        Mean probability of the positive class (the realized fraction is close to it).
    label_noise : float in [0, 1]
    seed : int or numpy.random.Generator
    bias : bool
        Append the constant column (then ``n_features >= 2``).

    Returns
    -------
    LogisticHyperparameter
        With ``w_true`` (raw-feature weights), ``intercept_true`` and ``pos_fraction``
        attributes.
    """
    n_train = _check_count("n_train", n_train, 2)
    n_val = _check_count("n_val", n_val)
    d = _check_count("n_features", n_features, 2 if bias else 1)
    for name, val, lo_open in (("pos_fraction", pos_fraction, True),
                               ("label_noise", label_noise, False)):
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not np.isfinite(val) \
                or (lo_open and not 0.0 < val < 1.0) or (not lo_open and not 0.0 <= val <= 1.0):
            raise ValueError(f"{name} must be in {'(0, 1)' if lo_open else '[0, 1]'}, "
                             f"got {val!r}")
    rng = np.random.default_rng(seed)
    dr = d - 1 if bias else d
    n = n_train + n_val
    mix = np.eye(dr) + 0.3 * rng.standard_normal((dr, dr)) / np.sqrt(dr)
    X = rng.standard_normal((n, dr)) @ mix
    w_true = rng.standard_normal(dr) * 2.0 / np.sqrt(1.0 + np.arange(dr))
    w_true[dr - dr // 3:] = 0.0
    margin = X @ w_true
    lo, hi = -30.0, 30.0  # mean sigmoid(margin + b) is increasing in b
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(_sigmoid_np(margin + mid)) < pos_fraction:
            lo = mid
        else:
            hi = mid
    b = 0.5 * (lo + hi)
    t = (rng.random(n) < _sigmoid_np(margin + b)).astype(np.float64)
    flip = rng.random(n) < label_noise
    t[flip] = (rng.random(int(flip.sum())) < 0.5).astype(np.float64)
    X_train, X_val = _standardize(X[:n_train], X[n_train:])
    if bias:
        X_train = np.hstack([X_train, np.ones((n_train, 1))])
        X_val = np.hstack([X_val, np.ones((n_val, 1))])
    out = LogisticHyperparameter(X_train, t[:n_train], X_val, t[n_train:])
    out.w_true = w_true
    out.intercept_true = float(b)
    out.pos_fraction = float(pos_fraction)
    return out


def load_breast_cancer_logistic(val_fraction=0.25, test_fraction=0.25, seed=0):
    """The Wisconsin breast cancer data set (569 samples, 30 features) shipped with scikit-learn.

    The samples are split at random, stratified by class, into train / validation / test
    (fractions ``1 - val_fraction - test_fraction``, ``val_fraction``, ``test_fraction``;
    ``test_fraction=0`` makes no test split), and the features are standardized with the
    training statistics. Labels: 1 = benign, 0 = malignant (scikit-learn's coding).
    Returns a :class:`LogisticHyperparameter`.

    Raises
    ------
    ImportError
        scikit-learn is not installed (``pip install "mlocore[data]"``).
    """
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise ImportError('load_breast_cancer_logistic needs scikit-learn: '
                          'pip install "mlocore[data]"') from None
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, numbers.Real) \
                or not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    if val_fraction <= 0 or val_fraction + test_fraction >= 1.0:
        raise ValueError("need val_fraction > 0 and val_fraction + test_fraction < 1, got "
                         f"val_fraction={val_fraction!r}, test_fraction={test_fraction!r}")
    data = load_breast_cancer()
    X = np.asarray(data.data, dtype=np.float64)
    t = np.asarray(data.target, dtype=np.float64)
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for label in (0.0, 1.0):
        idx = rng.permutation(np.flatnonzero(t == label))
        n_val = int(round(val_fraction * idx.size))
        n_test = int(round(test_fraction * idx.size))
        n_train = idx.size - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train:n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    tr, va, te = (rng.permutation(np.concatenate(p)) for p in parts)
    if test_fraction > 0:
        X_train, X_val, X_test = _standardize(X[tr], X[va], X[te])
        t_test = t[te]
    else:
        X_train, X_val = _standardize(X[tr], X[va])
        X_test = t_test = None
    return LogisticHyperparameter(X_train, t[tr], X_val, t[va], X_test, t_test,
                                  feature_names=[str(n) for n in data.feature_names])
