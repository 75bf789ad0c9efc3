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
"""
from __future__ import annotations

import numbers

import numba
import numpy as np

from .._problem import BilevelProblem, Objective

__all__ = ["LogisticHyperparameter", "make_logistic", "load_breast_cancer_logistic",
           "logistic_lower_grad", "logistic_lower_hvp", "logistic_lower_value",
           "logistic_upper_grad", "logistic_upper_hvp", "logistic_upper_value"]


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
    s = 0.0
    for i in range(n):
        m = _logit(X, z, i, d)
        s += _softplus(m) - t[i] * m
    return s / n


@numba.njit(cache=True)
def _loss_grad(z, X, t):
    """Gradient over z of the mean log-loss (zero on the lam block)."""
    n, d = X.shape
    out = np.zeros(2 * d)
    for i in range(n):
        r = (_sigmoid(_logit(X, z, i, d)) - t[i]) / n
        for j in range(d):
            out[d + j] += r * X[i, j]
    return out


@numba.njit(cache=True)
def _loss_hvp(z, v, X, t):
    """Hessian over z of the mean log-loss times v: (0, X^T D X v_w / n)."""
    n, d = X.shape
    out = np.zeros(2 * d)
    for i in range(n):
        s = _sigmoid(_logit(X, z, i, d))
        xv = 0.0
        for j in range(d):
            xv += X[i, j] * v[d + j]
        c = s * (1.0 - s) * xv / n
        for j in range(d):
            out[d + j] += c * X[i, j]
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
    d = X.shape[1]
    out = _loss_hvp(z, v, X, t)
    for j in range(d):
        e = np.exp(z[j])
        w = z[d + j]
        out[j] = 0.5 * e * w * w * v[j] + e * w * v[d + j]
        out[d + j] += e * w * v[j] + e * v[d + j]
    return out


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
# Problem object and data sets.
# ---------------------------------------------------------------------------------------
def _c64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def _stable_logloss(X, t, w):
    m = X @ w
    return float(np.mean(np.logaddexp(0.0, m) - t * m))


class LogisticHyperparameter:
    """Per-feature l2 penalties of a logistic regression, selected on a validation set.

    Built by :func:`make_logistic` or :func:`load_breast_cancer_logistic`. The upper variable
    is ``lam`` (the penalty on feature j is ``exp(lam_j)``), the lower one the weights ``w``;
    ``z = concat(lam, w)``.

    Attributes
    ----------
    problem : BilevelProblem
        ``dims = (n_features, n_features)``; the lower Objective has args
        ``(X_train, t_train)``, the upper one ``(X_val, t_val)``.
    X_train, t_train, X_val, t_val : ndarray
        Standardized features (training statistics) and labels in {0., 1.} (float64).
    X_test, t_test : ndarray or None
        Held-out split, when the loader made one.
    n_features : int
    feature_names : list of str or None
    """

    def __init__(self, X_train, t_train, X_val, t_val, X_test=None, t_test=None,
                 feature_names=None):
        self.X_train, self.t_train = _c64(X_train), _c64(t_train)
        self.X_val, self.t_val = _c64(X_val), _c64(t_val)
        self.X_test = None if X_test is None else _c64(X_test)
        self.t_test = None if t_test is None else _c64(t_test)
        self.n_features = int(self.X_train.shape[1])
        self.feature_names = feature_names
        self.problem = BilevelProblem(
            upper=Objective(logistic_upper_grad, hvp=logistic_upper_hvp,
                            value=logistic_upper_value, args=(self.X_val, self.t_val)),
            lower=Objective(logistic_lower_grad, hvp=logistic_lower_hvp,
                            value=logistic_lower_value, args=(self.X_train, self.t_train)),
            dims=(self.n_features, self.n_features))

    def __repr__(self):
        test = "" if self.X_test is None else f", n_test={self.X_test.shape[0]}"
        return (f"LogisticHyperparameter(n_features={self.n_features}, "
                f"n_train={self.X_train.shape[0]}, n_val={self.X_val.shape[0]}{test})")

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
