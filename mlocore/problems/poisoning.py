"""Trilevel hyperparameter learning with data poisoning (Sato, Tanaka & Takeda 2021).

``load_poisoning_trilevel(n_train=8, n_val=40, features=("bmi", "bp", "s5"), seed=0, c=1.0,
eps=1e-2, ridge=1e-3) -> PoisoningTrilevel`` on scikit-learn's diabetes data: regularization
weight / poisoning perturbation / smooth-l1 regression weights, with grad, hvp, value and
exact tvp callbacks (``poison_*``) and the nested reference solver. CPU only.
"""
from __future__ import annotations

import numbers

import numba
import numpy as np

from .._problem import MultilevelProblem, Objective
from ._multilevel_base import _c64, _check_int, _TrilevelReference

__all__ = ["PoisoningTrilevel", "load_poisoning_trilevel", "poison_lower_value",
           "poison_lower_grad", "poison_lower_hvp", "poison_lower_tvp", "poison_middle_value",
           "poison_middle_grad", "poison_middle_hvp", "poison_middle_tvp", "poison_upper_value",
           "poison_upper_grad", "poison_upper_hvp", "poison_upper_tvp"]


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
