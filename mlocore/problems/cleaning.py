"""Data cleaning: per-sample weights of a training set with corrupted labels.

A multinomial logistic regression (softmax, K classes) is trained on a training set whose
labels were partly corrupted, each training sample i being weighted by ``sigmoid(x_i)``; the
weights are selected on a clean validation set (Franceschi et al. 2017; the "datacleaning"
problem of benchopt's bilevel benchmark, there with MNIST and a CNN). Over the joint vector
``z = concat(x, W)`` (x: one logit per training sample, size n_train; W: weights of shape
(p, K) flattened row-major, ``W[j, k] = z[n_train + j K + k]``, with p features, the last one
a constant column of ones, so that the last row of W is the intercept), with
``CE(W; a, t) = logsumexp(W^T a) - (W^T a)_t`` the cross-entropy of a sample with features a
and label t:

    lower  g(x, W) = mean_i sigmoid(x_i) CE(W; a_i, t_i)  over the training set
                     + c/2 |W|^2,
    upper  f(x, W) = mean_j CE(W; a_j, t_j)  over the validation set
                     + r/2 |x|^2   (r = upper_reg, 0 by default).

The ridge c > 0 (the intercept row included) makes g strongly convex in W, with modulus at
least c, for every x. With ``s_i = sigmoid(x_i)``, ``s'_i = s_i (1 - s_i)``,
``s''_i = s'_i (1 - 2 s_i)``, ``p_i = softmax(W^T a_i)``, ``g_i = p_i - e_{t_i}`` and
``S_i = diag(p_i) - p_i p_i^T``, the Hessian of g over z has the blocks

    x-x: diag(s''_i CE_i) / n,     x_i-W: s'_i a_i g_i^T / n,
    W-W: sum_i s_i (a_i a_i^T) kron S_i / n + c I,

and that of f is ``[[r I, 0], [0, sum_j (a_j a_j^T) kron S_j / m]]``.

The callbacks are module-level ``@numba.njit(cache=True)`` functions in the stochastic
form: ``grad(z, idx, A, t, n_classes, reg)`` and so on, ``idx`` an int64 index array (any
length >= 1, repeats allowed) over the samples of the level, the mean being over the samples
in idx and the ridge term added in full on every call. With ``idx = arange(n)`` they are the
full-batch objectives: :class:`DataCleaning` uses them for both ``problem`` and
``stochastic_problem``.
"""
from __future__ import annotations

import math
import numbers

import numba
import numpy as np

from .._problem import BilevelProblem, Objective
from .logistic import BilevelReference

__all__ = ["DataCleaning", "load_digits_cleaning", "make_cleaning", "corrupt_labels",
           "cleaning_lower_grad", "cleaning_lower_hvp", "cleaning_lower_value",
           "cleaning_lower_grad_y", "cleaning_lower_hvp_yy", "cleaning_lower_hvp_xy",
           "cleaning_upper_grad", "cleaning_upper_hvp", "cleaning_upper_value"]


# ---------------------------------------------------------------------------------------
# Per-sample softmax quantities.
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _sigmoid(m):
    if m >= 0.0:
        return 1.0 / (1.0 + np.exp(-m))
    e = np.exp(m)
    return e / (1.0 + e)


def probs_source(z, off, A, i, label, K, p):
    """Fill p with softmax(W^T a_i) (W = z[off:] as (d, K)) and return CE(W; a_i, label).

    Plain Python over scalars and ``math``: compiled for the CPU here (``_probs``) and for
    the GPU as a device function in :mod:`mlocore.problems.cuda_callbacks`, one source."""
    d = A.shape[1]
    for k in range(K):
        p[k] = 0.0
    for j in range(d):
        a = A[i, j]
        if a != 0.0:
            base = off + j * K
            for k in range(K):
                p[k] += a * z[base + k]
    mx = p[0]
    for k in range(1, K):
        if p[k] > mx:
            mx = p[k]
    s = 0.0
    for k in range(K):
        s += math.exp(p[k] - mx)
    lse = mx + math.log(s)
    ce = lse - p[label]
    for k in range(K):
        p[k] = math.exp(p[k] - lse)
    return ce


def project_row_source(v, off, A, i, K, u):
    """u = V^T a_i for V = v[off:] as (d, K) (one source for the CPU and the GPU)."""
    d = A.shape[1]
    for k in range(K):
        u[k] = 0.0
    for j in range(d):
        a = A[i, j]
        if a != 0.0:
            base = off + j * K
            for k in range(K):
                u[k] += a * v[base + k]


_probs = numba.njit(cache=True)(probs_source)
_project_row = numba.njit(cache=True)(project_row_source)


@numba.njit(cache=True)
def _add_outer(out, off, A, i, K, c):
    """out[off:] (as (d, K)) += a_i c^T."""
    d = A.shape[1]
    for j in range(d):
        a = A[i, j]
        if a != 0.0:
            base = off + j * K
            for k in range(K):
                out[base + k] += a * c[k]


# ---------------------------------------------------------------------------------------
# Lower level: weighted training cross-entropy plus ridge on W.
# args = (A, t, n_classes, reg): A (n_train, d) features, t (n_train,) int64 labels.
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def cleaning_lower_value(z, idx, A, t, n_classes, reg):
    """Mean over i in idx of sigmoid(x_i) CE(W; a_i, t_i), plus reg/2 |W|^2."""
    n = A.shape[0]
    K = n_classes
    p = np.empty(K)
    m = idx.shape[0]
    s = 0.0
    for kk in range(m):
        i = idx[kk]
        ce = _probs(z, n, A, i, t[i], K, p)
        s += _sigmoid(z[i]) * ce
    sq = 0.0
    for j in range(n, z.shape[0]):
        sq += z[j] * z[j]
    return s / m + 0.5 * reg * sq


@numba.njit(cache=True)
def cleaning_lower_grad(z, idx, A, t, n_classes, reg):
    """Gradient over z = (x, W) of :func:`cleaning_lower_value`."""
    n = A.shape[0]
    K = n_classes
    p = np.empty(K)
    out = np.zeros(z.shape[0])
    m = idx.shape[0]
    for kk in range(m):
        i = idx[kk]
        ce = _probs(z, n, A, i, t[i], K, p)
        s = _sigmoid(z[i])
        out[i] += s * (1.0 - s) * ce
        p[t[i]] -= 1.0
        for k in range(K):
            p[k] *= s
        _add_outer(out, n, A, i, K, p)
    scale = 1.0 / m
    for j in range(n):
        out[j] *= scale
    for j in range(n, z.shape[0]):
        out[j] = out[j] * scale + reg * z[j]
    return out


@numba.njit(cache=True)
def cleaning_lower_hvp(z, v, idx, A, t, n_classes, reg):
    """Hessian over z = (x, W) of :func:`cleaning_lower_value` times v (all blocks)."""
    n = A.shape[0]
    K = n_classes
    p = np.empty(K)
    u = np.empty(K)
    c = np.empty(K)
    out = np.zeros(z.shape[0])
    m = idx.shape[0]
    for kk in range(m):
        i = idx[kk]
        ti = t[i]
        ce = _probs(z, n, A, i, ti, K, p)
        s = _sigmoid(z[i])
        s1 = s * (1.0 - s)
        s2 = s1 * (1.0 - 2.0 * s)
        _project_row(v, n, A, i, K, u)  # u = V^T a_i
        pu = 0.0
        for k in range(K):
            pu += p[k] * u[k]
        gu = pu - u[ti]  # <g_i, u> with g_i = p_i - e_t
        vi = v[i]
        out[i] += s2 * ce * vi + s1 * gu
        for k in range(K):
            c[k] = s * p[k] * (u[k] - pu) + s1 * vi * p[k]
        c[ti] -= s1 * vi
        _add_outer(out, n, A, i, K, c)
    scale = 1.0 / m
    for j in range(n):
        out[j] *= scale
    for j in range(n, z.shape[0]):
        out[j] = out[j] * scale + reg * v[j]
    return out


@numba.njit(cache=True)
def cleaning_lower_grad_y(z, idx, A, t, n_classes, reg):
    """Block oracle: the W-block of :func:`cleaning_lower_grad` (length d K)."""
    n = A.shape[0]
    K = n_classes
    p = np.empty(K)
    out = np.zeros(z.shape[0] - n)
    m = idx.shape[0]
    for kk in range(m):
        i = idx[kk]
        _probs(z, n, A, i, t[i], K, p)
        s = _sigmoid(z[i])
        p[t[i]] -= 1.0
        for k in range(K):
            p[k] *= s
        _add_outer(out, 0, A, i, K, p)
    scale = 1.0 / m
    for j in range(out.shape[0]):
        out[j] = out[j] * scale + reg * z[n + j]
    return out


@numba.njit(cache=True)
def cleaning_lower_hvp_yy(z, v, idx, A, t, n_classes, reg):
    """Block oracle: ``H_WW v = sum_i s_i (a_i a_i^T kron S_i) v / m + reg v`` (v of
    length d K)."""
    n = A.shape[0]
    K = n_classes
    p = np.empty(K)
    u = np.empty(K)
    c = np.empty(K)
    out = np.zeros(v.shape[0])
    m = idx.shape[0]
    for kk in range(m):
        i = idx[kk]
        _probs(z, n, A, i, t[i], K, p)
        s = _sigmoid(z[i])
        _project_row(v, 0, A, i, K, u)  # u = V^T a_i
        pu = 0.0
        for k in range(K):
            pu += p[k] * u[k]
        for k in range(K):
            c[k] = s * p[k] * (u[k] - pu)
        _add_outer(out, 0, A, i, K, c)
    scale = 1.0 / m
    for j in range(out.shape[0]):
        out[j] = out[j] * scale + reg * v[j]
    return out


@numba.njit(cache=True)
def cleaning_lower_hvp_xy(z, v, idx, A, t, n_classes, reg):
    """Block oracle: ``(H_xW v)_i = s'_i <g_i, V^T a_i> / m`` (length n_train)."""
    n = A.shape[0]
    K = n_classes
    p = np.empty(K)
    u = np.empty(K)
    out = np.zeros(n)
    m = idx.shape[0]
    for kk in range(m):
        i = idx[kk]
        ti = t[i]
        _probs(z, n, A, i, ti, K, p)
        s = _sigmoid(z[i])
        _project_row(v, 0, A, i, K, u)
        pu = 0.0
        for k in range(K):
            pu += p[k] * u[k]
        out[i] += s * (1.0 - s) * (pu - u[ti])
    scale = 1.0 / m
    for j in range(n):
        out[j] *= scale
    return out


# ---------------------------------------------------------------------------------------
# Upper level: validation cross-entropy (plus an optional ridge on x).
# args = (A, t, n_classes, upper_reg): A (n_val, d), t (n_val,) int64.
# ---------------------------------------------------------------------------------------
@numba.njit(cache=True)
def cleaning_upper_value(z, idx, A, t, n_classes, upper_reg):
    """Mean over j in idx of CE(W; a_j, t_j), plus upper_reg/2 |x|^2."""
    K = n_classes
    off = z.shape[0] - A.shape[1] * K
    p = np.empty(K)
    m = idx.shape[0]
    s = 0.0
    for kk in range(m):
        i = idx[kk]
        s += _probs(z, off, A, i, t[i], K, p)
    sq = 0.0
    for j in range(off):
        sq += z[j] * z[j]
    return s / m + 0.5 * upper_reg * sq


@numba.njit(cache=True)
def cleaning_upper_grad(z, idx, A, t, n_classes, upper_reg):
    """Gradient over z = (x, W) of :func:`cleaning_upper_value`."""
    K = n_classes
    off = z.shape[0] - A.shape[1] * K
    p = np.empty(K)
    out = np.zeros(z.shape[0])
    m = idx.shape[0]
    for kk in range(m):
        i = idx[kk]
        _probs(z, off, A, i, t[i], K, p)
        p[t[i]] -= 1.0
        _add_outer(out, off, A, i, K, p)
    scale = 1.0 / m
    for j in range(off):
        out[j] = upper_reg * z[j]
    for j in range(off, z.shape[0]):
        out[j] *= scale
    return out


@numba.njit(cache=True)
def cleaning_upper_hvp(z, v, idx, A, t, n_classes, upper_reg):
    """Hessian over z = (x, W) of :func:`cleaning_upper_value` times v."""
    K = n_classes
    off = z.shape[0] - A.shape[1] * K
    p = np.empty(K)
    u = np.empty(K)
    out = np.zeros(z.shape[0])
    m = idx.shape[0]
    for kk in range(m):
        i = idx[kk]
        _probs(z, off, A, i, t[i], K, p)
        _project_row(v, off, A, i, K, u)
        pu = 0.0
        for k in range(K):
            pu += p[k] * u[k]
        for k in range(K):
            u[k] = p[k] * (u[k] - pu)
        _add_outer(out, off, A, i, K, u)
    scale = 1.0 / m
    for j in range(off):
        out[j] = upper_reg * v[j]
    for j in range(off, z.shape[0]):
        out[j] *= scale
    return out


# ---------------------------------------------------------------------------------------
# Problem object.
# ---------------------------------------------------------------------------------------
def _log_softmax_np(M):
    M = M - M.max(axis=1, keepdims=True)
    return M - np.log(np.exp(M).sum(axis=1, keepdims=True))


class DataCleaning:
    """Per-sample weights ``sigmoid(x_i)`` of a corrupted training set (see the module
    docstring), selected on a clean validation set.

    Built by :func:`load_digits_cleaning` or :func:`make_cleaning`. ``z = concat(x, W)``,
    ``dims = (n_train, n_features * n_classes)``.

    Parameters
    ----------
    A_train, t_train : array_like
        Training features (n_train, n_features) and (corrupted) integer labels in
        ``[0, n_classes)``. The loaders append a constant column of ones to the features.
    A_val, t_val : array_like
        Clean validation set.
    n_classes : int
    reg : float
        Ridge c > 0 on W in the lower objective.
    upper_reg : float
        Ridge r >= 0 on x in the upper objective (default 0).
    corrupted : array_like of bool, shape (n_train,)
        Which training labels were corrupted.
    t_train_clean : array_like, optional
        The training labels before corruption.
    A_test, t_test : array_like, optional
        Held-out split.
    reference_options : dict, optional
        Keyword options of :class:`~mlocore.problems.logistic.BilevelReference`. By default
        ``find_star = upper_reg > 0``: with ``upper_reg = 0``, F has no finite minimizer in
        general (the best weight of a corrupted sample is 0, reached as ``x_i -> -infinity``)
        and ``x_star`` is None.

    Attributes
    ----------
    problem : BilevelProblem
        Full-batch form: the ``cleaning_*`` callbacks with ``n_samples`` set (mlocore's
        deterministic methods pass all the samples).
    stochastic_problem : BilevelProblem
        The same objectives (separate instances): lower ``n_samples = n_train``, upper
        ``n_samples = n_val``.
    reference : BilevelReference
        :meth:`F`, :meth:`hypergrad`, :attr:`x_star`, :meth:`W_star` delegate to it.
    corrupted : ndarray of bool
        The corruption mask (``t_train != t_train_clean`` for the loaders here).
    n_train, n_val, n_features, n_classes : int
        ``n_features`` counts the constant column.
    """

    def __init__(self, A_train, t_train, A_val, t_val, n_classes, reg, upper_reg=0.0, *,
                 corrupted, t_train_clean=None, A_test=None, t_test=None,
                 reference_options=None):
        self.A_train = np.ascontiguousarray(A_train, dtype=np.float64)
        self.t_train = np.ascontiguousarray(t_train, dtype=np.int64)
        self.A_val = np.ascontiguousarray(A_val, dtype=np.float64)
        self.t_val = np.ascontiguousarray(t_val, dtype=np.int64)
        self.A_test = None if A_test is None else np.ascontiguousarray(A_test, dtype=np.float64)
        self.t_test = None if t_test is None else np.ascontiguousarray(t_test, dtype=np.int64)
        self.t_train_clean = None if t_train_clean is None else \
            np.ascontiguousarray(t_train_clean, dtype=np.int64)
        self.corrupted = np.asarray(corrupted, dtype=bool).copy()
        self.n_classes = int(n_classes)
        self.n_train, self.n_features = self.A_train.shape
        self.n_val = int(self.A_val.shape[0])
        if not (np.isfinite(reg) and reg > 0):
            raise ValueError(f"reg must be a finite number > 0 (it makes the lower level "
                             f"strongly convex), got {reg!r}")
        if not (np.isfinite(upper_reg) and upper_reg >= 0):
            raise ValueError(f"upper_reg must be a finite number >= 0, got {upper_reg!r}")
        for name, t in (("t_train", self.t_train), ("t_val", self.t_val)):
            if t.size and (t.min() < 0 or t.max() >= self.n_classes):
                raise ValueError(f"{name} must hold labels in [0, {self.n_classes})")
        if self.corrupted.shape != (self.n_train,):
            raise ValueError(f"corrupted must have shape ({self.n_train},)")
        self.reg = float(reg)
        self.upper_reg = float(upper_reg)
        self.dx = self.n_train
        self.dy = self.n_features * self.n_classes
        self.problem = self._build()
        self.stochastic_problem = self._build()
        opts = {"find_star": self.upper_reg > 0}
        opts.update(reference_options or {})
        self.reference = BilevelReference(self.problem, np.zeros(self.dy), **opts)

    def _build(self):
        return BilevelProblem(
            upper=Objective(cleaning_upper_grad, hvp=cleaning_upper_hvp,
                            value=cleaning_upper_value,
                            args=(self.A_val, self.t_val, self.n_classes, self.upper_reg),
                            n_samples=self.n_val),
            lower=Objective(cleaning_lower_grad, hvp=cleaning_lower_hvp,
                            value=cleaning_lower_value,
                            args=(self.A_train, self.t_train, self.n_classes, self.reg),
                            n_samples=self.n_train, grad_y=cleaning_lower_grad_y,
                            hvp_yy=cleaning_lower_hvp_yy, hvp_xy=cleaning_lower_hvp_xy),
            dims=(self.dx, self.dy))

    def __repr__(self):
        test = "" if self.A_test is None else f", n_test={self.A_test.shape[0]}"
        return (f"DataCleaning(n_train={self.n_train}, n_val={self.n_val}{test}, "
                f"n_features={self.n_features}, n_classes={self.n_classes}, reg={self.reg:g}, "
                f"corrupted={self.corrupted.mean():.2f})")

    # -- reference evaluation -------------------------------------------------------------
    def W_star(self, x):
        """Lower solution ``W*(x)`` as a flat vector of size ``n_features * n_classes``."""
        return self.reference.y_star(x)

    def F(self, x):
        """``F(x) = f(x, W*(x))``: validation cross-entropy (plus ``upper_reg/2 |x|^2``)."""
        return self.reference.F(x)

    def hypergrad(self, x):
        """Exact hypergradient ``grad F(x)`` (implicit differentiation, CG to 1e-10)."""
        return self.reference.hypergrad(x)

    @property
    def x_star(self):
        """A minimizer of F, or None. None by default (``upper_reg = 0``: no finite
        minimizer in general); with ``upper_reg > 0``, searched at first access by
        ``minimize_bilevel(method="aid")`` from x = 0 to ``|grad F| <= 1e-8`` (the curvature
        check of :class:`BilevelReference` is skipped for n_train > 64) and cached; each
        iteration costs one hypergradient and one or more lower solves, so at the digits
        defaults the search can take minutes. F is not convex in x: it is the minimizer
        reached from x = 0."""
        return self.reference.x_star

    @property
    def F_star(self):
        """``F(x_star)`` or None."""
        return self.reference.F_star

    # -- helpers ------------------------------------------------------------------------------
    def weights(self, x):
        """Sample weights ``sigmoid(x)``."""
        x = np.asarray(x, dtype=np.float64)
        return 0.5 * (1.0 + np.tanh(0.5 * x))

    def ideal_x(self, scale=10.0):
        """Logits whose weights are ~1 on clean and ~0 on corrupted samples
        (``+-scale``)."""
        return np.where(self.corrupted, -float(scale), float(scale))

    def _split(self, split):
        if split == "train":
            return self.A_train, self.t_train
        if split == "train_clean":
            if self.t_train_clean is None:
                raise ValueError("this problem has no clean training labels")
            return self.A_train, self.t_train_clean
        if split == "val":
            return self.A_val, self.t_val
        if split == "test":
            if self.A_test is None:
                raise ValueError("this problem has no test split")
            return self.A_test, self.t_test
        raise ValueError(f"unknown split {split!r}; expected 'train', 'train_clean', 'val' or "
                         "'test'")

    def _W(self, W):
        W = np.asarray(W, dtype=np.float64)
        if W.shape == (self.dy,):
            W = W.reshape(self.n_features, self.n_classes)
        if W.shape != (self.n_features, self.n_classes):
            raise ValueError(f"W must have shape ({self.dy},) or ({self.n_features}, "
                             f"{self.n_classes}), got shape={W.shape}")
        return W

    def loss(self, W, split="val"):
        """Mean cross-entropy of W on a split ("train" (corrupted labels), "train_clean",
        "val" or "test")."""
        A, t = self._split(split)
        logp = _log_softmax_np(A @ self._W(W))
        return float(-np.mean(logp[np.arange(t.size), t]))

    def accuracy(self, W, split="val"):
        """Fraction of samples whose largest logit is their label, on a split."""
        A, t = self._split(split)
        return float(np.mean(np.argmax(A @ self._W(W), axis=1) == t))

    def detection_auc(self, x):
        """How well low weights flag the corrupted samples: the probability that a random
        corrupted sample has a smaller x than a random clean one (ROC AUC; ties count 1/2;
        0.5 is chance, 1 perfect)."""
        x = np.asarray(x, dtype=np.float64).reshape(self.n_train)
        bad, good = x[self.corrupted], x[~self.corrupted]
        if bad.size == 0 or good.size == 0:
            return np.nan
        order = np.sort(good)
        less = np.searchsorted(order, bad, side="left")   # clean samples with x < bad
        leq = np.searchsorted(order, bad, side="right")
        greater = good.size - leq                           # clean samples with x > bad
        ties = leq - less
        return float((greater.sum() + 0.5 * ties.sum()) / (bad.size * good.size))


# ---------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------
def _check_count(name, val, minimum=1):
    if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {val!r}")
    return int(val)


def _check_real(name, val, lo, hi, lo_open=False):
    if isinstance(val, bool) or not isinstance(val, numbers.Real) or not np.isfinite(val) \
            or val > hi or val < lo or (lo_open and val == lo):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], "
                         f"got {val!r}")
    return float(val)


def corrupt_labels(t, n_classes, fraction, rng):
    """Replace the labels of ``round(fraction * len(t))`` samples, chosen uniformly without
    replacement, by a label drawn uniformly among the *other* ``n_classes - 1`` classes.

    Returns
    -------
    (labels, mask) : (ndarray of int64, ndarray of bool)
        The corrupted labels and the mask of the changed ones (exactly the requested
        number, every one of them wrong).
    """
    t = np.asarray(t, dtype=np.int64)
    n = t.size
    k = int(round(float(fraction) * n))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    out = t.copy()
    shift = rng.integers(1, n_classes, size=k)  # 1 .. K-1: never the true label
    out[mask] = (t[mask] + shift) % n_classes
    return out, mask


def _finish(A_tr, t_tr, A_va, t_va, A_te, t_te, n_classes, corruption, reg, upper_reg, rng,
            reference_options):
    ones = lambda A: np.hstack([A, np.ones((A.shape[0], 1))])  # noqa: E731
    t_bad, mask = corrupt_labels(t_tr, n_classes, corruption, rng)
    return DataCleaning(ones(A_tr), t_bad, ones(A_va), t_va, n_classes, reg, upper_reg,
                        corrupted=mask, t_train_clean=t_tr,
                        A_test=None if A_te is None else ones(A_te), t_test=t_te,
                        reference_options=reference_options)


def load_digits_cleaning(n_train=500, n_val=500, corruption=0.5, reg=1e-2, seed=0, *,
                         upper_reg=0.0, pool=1, reference_options=None):
    """Data cleaning on scikit-learn's digits data set (1,797 8x8 images, 10 classes).

    The images are shuffled (``seed``) and split into n_train training, n_val validation
    and the remaining test samples; pixel values are scaled to [0, 1] (divided by 16) and a
    constant column is appended (the intercept). A fraction ``corruption`` of the training
    labels is replaced by a uniformly drawn wrong label (see :func:`corrupt_labels`); the
    validation and test labels are clean.

    Defaults: 500 / 500 / 797 samples, 65 features, so ``dims = (500, 650)``; half of the
    training labels corrupted (as in Franceschi et al. 2017 and benchopt's datacleaning
    problem); ridge ``c = 1e-2``. A full-batch hypergradient to 1e-10 costs about 50 ms
    from a cold start (measured at x = 0 on one core: 6 Newton-CG steps on W, then about
    40 CG iterations for the adjoint, about 95 Hessian-vector products of 0.5 ms);
    ``pool=2`` (17 features) makes it several times cheaper. With uniform weights the
    lower solution has a validation cross-entropy of about 1.4, with the ideal weights
    (clean samples only) about 0.6.

    Parameters
    ----------
    n_train, n_val : int
        ``n_train + n_val <= 1797``.
    corruption : float in [0, 1]
        Fraction of corrupted training labels (exactly ``round(corruption * n_train)``).
    reg : float > 0
        Ridge c on W (lower level).
    seed : int or numpy.random.Generator
        Split and corruption.
    upper_reg : float >= 0
        Ridge on x (upper level); > 0 gives F a minimizer (``x_star`` is then searched).
    pool : {1, 2, 4}
        Average-pool the 8x8 images by pool x pool blocks (64, 16 or 4 pixels) to make the
        problem cheaper.
    reference_options : dict, optional
        Options of :class:`~mlocore.problems.logistic.BilevelReference`.

    Returns
    -------
    DataCleaning

    Raises
    ------
    ImportError
        scikit-learn is not installed (``pip install "mlocore[data]"``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError('load_digits_cleaning needs scikit-learn: '
                          'pip install "mlocore[data]"') from None
    n_train = _check_count("n_train", n_train, 1)
    n_val = _check_count("n_val", n_val, 1)
    corruption = _check_real("corruption", corruption, 0.0, 1.0)
    reg = _check_real("reg", reg, 0.0, np.inf, lo_open=True)
    upper_reg = _check_real("upper_reg", upper_reg, 0.0, np.inf)
    if pool not in (1, 2, 4):
        raise ValueError(f"pool must be 1, 2 or 4, got {pool!r}")
    data = load_digits()
    X = np.asarray(data.images, dtype=np.float64) / 16.0
    if pool > 1:
        X = X.reshape(-1, 8 // pool, pool, 8 // pool, pool).mean(axis=(2, 4))
    X = X.reshape(X.shape[0], -1)
    t = np.asarray(data.target, dtype=np.int64)
    if n_train + n_val > X.shape[0]:
        raise ValueError(f"n_train + n_val must be <= {X.shape[0]}, got {n_train + n_val}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(X.shape[0])
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    A_te, t_te = (X[te], t[te]) if te.size else (None, None)
    return _finish(X[tr], t[tr], X[va], t[va], A_te, t_te, 10, corruption, reg, upper_reg,
                   rng, reference_options)


def make_cleaning(n_train=200, n_val=100, n_features=5, n_classes=3, corruption=0.5,
                  reg=1e-2, seed=0, *, n_test=0, separation=2.0, upper_reg=0.0,
                  reference_options=None):
    """Synthetic data cleaning problem (Gaussian classes), cheap at any size.

    Class k has mean ``separation * mu_k / sqrt(n_features)`` with ``mu_k`` a standard
    normal vector (so class means are about ``separation`` from the origin) and identity
    covariance; labels are drawn uniformly. A constant column is appended
    (``n_features + 1`` columns in ``A_*``), and ``round(corruption * n_train)`` training
    labels are replaced by wrong ones (:func:`corrupt_labels`).

    Parameters
    ----------
    n_train, n_val, n_test : int
    n_features : int
        Number of random features (the constant column comes on top).
    n_classes : int >= 2
    corruption, reg, upper_reg, seed, reference_options
        As :func:`load_digits_cleaning`.
    separation : float > 0
        Scale of the class means (larger: easier classification).

    Returns
    -------
    DataCleaning
    """
    n_train = _check_count("n_train", n_train, 1)
    n_val = _check_count("n_val", n_val, 1)
    n_test = _check_count("n_test", n_test, 0)
    d = _check_count("n_features", n_features, 1)
    K = _check_count("n_classes", n_classes, 2)
    corruption = _check_real("corruption", corruption, 0.0, 1.0)
    reg = _check_real("reg", reg, 0.0, np.inf, lo_open=True)
    upper_reg = _check_real("upper_reg", upper_reg, 0.0, np.inf)
    separation = _check_real("separation", separation, 0.0, np.inf, lo_open=True)
    rng = np.random.default_rng(seed)
    means = separation * rng.standard_normal((K, d)) / np.sqrt(d)
    n = n_train + n_val + n_test
    t = rng.integers(0, K, size=n)
    X = means[t] + rng.standard_normal((n, d))
    sl = slice(n_train + n_val, n)
    A_te, t_te = (X[sl], t[sl]) if n_test else (None, None)
    out = _finish(X[:n_train], t[:n_train], X[n_train:n_train + n_val],
                  t[n_train:n_train + n_val], A_te, t_te, K, corruption, reg, upper_reg, rng,
                  reference_options)
    out.class_means = means
    return out
