"""Plain NumPy versions of mlocore's implicit-gradient stochastic loops, on the quadratic.

The baseline of ``benchmarks/stochastic_ratios.py`` (part 3): the same algorithms as
``mlocore/stochastic/`` (alternating, BSA, StocBiO, stochastic AID-BiO, TTSA,
SOBA) written as a competent NumPy user would write them for the per-sample data of
:func:`mlocore.problems.make_quadratic` (``q.lower_samples``, ``q.upper_samples`` =
``(U, W, C, a, b)`` and ``q.ridge``): one Python iteration per step, every oracle vectorized
over the minibatch, and only the blocks an update needs (the lower Hessian-vector product
``H_yy v`` never touches the cross matrices C; mlocore's generic kernels always form the full
``H (0, v)`` through the user's callback). Per sample i (see ``quad_sample_grad``)::

    grad_x phi_i = w_i (w_i . x) + C_i y + b_i + ridge x
    grad_y phi_i = u_i (u_i . y) + C_i^T x + a_i + ridge y
    H_yy v = u_i (u_i . v) + ridge v,      H_xy v = C_i v

Signature of every loop::

    <method>_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, *, inner_steps=...,
                   neumann_terms=..., eta=None) -> (x, y)

``alpha``/``beta`` are the upper/lower steps: a number (constant) or a callable ``k -> step``
(e.g. an ``mlocore.Schedule``, which is what mlocore's result reports in ``res.steps``);
``eta`` is the Neumann step (default ``beta(0)``). Minibatches are drawn uniformly with
replacement (mlocore's default sampler) with ``numpy.random.default_rng(seed)``; with
``batch_size`` equal to the number of samples every draw is ``arange(n)`` in order, which is
what mlocore does for a full batch, so both then compute the same iterates (BSA/TTSA: with
``neumann_terms=1`` the randomized truncation is deterministic). See :func:`validate`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["alternating_numpy", "bsa_numpy", "stocbio_numpy", "aid_numpy", "ttsa_numpy",
           "soba_numpy", "NUMPY_LOOPS", "validate"]


def _schedule(s):
    if callable(s):
        return s
    s = float(s)
    return lambda k: s


class _Sampler:
    def __init__(self, n, batch_size, rng):
        self.n, self.bs, self.rng = n, batch_size, rng
        self.full = np.arange(n) if batch_size >= n else None

    def __call__(self):
        if self.full is not None:
            return self.full
        return self.rng.integers(0, self.n, size=self.bs)


class _Data:
    """One level's per-sample arrays and the minibatch oracles of the quadratic."""

    def __init__(self, samples, ridge):
        self.U, self.W, self.C, self.a, self.b = samples
        self.ridge = float(ridge)
        self.n = self.U.shape[0]

    def grad(self, idx, x, y):
        """(grad_x, grad_y) of the minibatch mean."""
        Ui, Wi = self.U[idx], self.W[idx]
        m = idx.shape[0]
        Cb = self.C[idx].mean(axis=0)
        gx = Wi.T @ (Wi @ x) / m + Cb @ y + self.b[idx].mean(axis=0) + self.ridge * x
        gy = Ui.T @ (Ui @ y) / m + Cb.T @ x + self.a[idx].mean(axis=0) + self.ridge * y
        return gx, gy

    def grad_y(self, idx, x, y):
        Ui = self.U[idx]
        return (Ui.T @ (Ui @ y) / idx.shape[0] + self.C[idx].mean(axis=0).T @ x
                + self.a[idx].mean(axis=0) + self.ridge * y)

    def hyy(self, idx, v):
        Ui = self.U[idx]
        return Ui.T @ (Ui @ v) / idx.shape[0] + self.ridge * v

    def hxy(self, idx, v):
        return self.C[idx].mean(axis=0) @ v


def _setup(q, x0, y0, batch_size, seed):
    rng = np.random.default_rng(seed)
    low = _Data(q.lower_samples, q.ridge)
    up = _Data(q.upper_samples, q.ridge)
    return (np.array(x0, dtype=np.float64), np.array(y0, dtype=np.float64), low, up,
            _Sampler(low.n, batch_size, rng), _Sampler(up.n, batch_size, rng), rng)


def _inner_sgd(low, draw_l, x, y, beta, T):
    for _ in range(T):
        y = y - beta * low.grad_y(draw_l(), x, y)
    return y


def alternating_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, *, inner_steps=1):
    """T lower SGD steps, then ``x -= alpha_k grad_x f`` (no implicit term)."""
    x, y, low, up, draw_l, draw_u, _ = _setup(q, x0, y0, batch_size, seed)
    alpha, beta = _schedule(alpha), _schedule(beta)
    for k in range(n_iter):
        y = _inner_sgd(low, draw_l, x, y, beta(k), inner_steps)
        gx, _ = up.grad(draw_u(), x, y)
        x = x - alpha(k) * gx
    return x, y


def _neumann_loop(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps,
                  neumann_terms, eta, randomized):
    x, y, low, up, draw_l, draw_u, rng = _setup(q, x0, y0, batch_size, seed)
    alpha, beta = _schedule(alpha), _schedule(beta)
    eta = beta(0) if eta is None else float(eta)
    Q = int(neumann_terms)
    for k in range(n_iter):
        y = _inner_sgd(low, draw_l, x, y, beta(k), inner_steps)
        gx, gy = up.grad(draw_u(), x, y)
        if randomized:  # BSA / TTSA: eta Q prod_{j<q} (I - eta H_j) grad_y f, q ~ U{0..Q-1}
            p = gy
            for _ in range(int(rng.integers(Q))):
                p = p - eta * low.hyy(draw_l(), p)
            v = (eta * Q) * p
        else:  # StocBiO: eta sum_{q<Q} prod_{j<=q} (I - eta H_j) grad_y f
            p = gy
            v = gy.copy()
            for _ in range(1, Q):
                p = p - eta * low.hyy(draw_l(), p)
                v += p
            v *= eta
        x = x - alpha(k) * (gx - low.hxy(draw_l(), v))
    return x, y


def bsa_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, *, inner_steps=10,
              neumann_terms=10, eta=None):
    """BSA (Ghadimi & Wang 2018): randomized Neumann estimate, T inner steps."""
    return _neumann_loop(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps,
                         neumann_terms, eta, True)


def ttsa_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, *, inner_steps=1,
               neumann_terms=10, eta=None):
    """TTSA (Hong et al. 2023): BSA's estimator with one inner step and two timescales
    (pass decaying ``alpha``/``beta`` schedules)."""
    return _neumann_loop(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps,
                         neumann_terms, eta, True)


def stocbio_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, *, inner_steps=10,
                  neumann_terms=10, eta=None):
    """StocBiO (Ji, Yang & Liang 2021): Neumann sum with Q - 1 HVPs."""
    return _neumann_loop(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps,
                         neumann_terms, eta, False)


def aid_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, *, inner_steps=10,
              neumann_terms=10, eta=None):
    """Stochastic AID-BiO: Q CG iterations on one minibatch Hessian, warm-started v."""
    x, y, low, up, draw_l, draw_u, _ = _setup(q, x0, y0, batch_size, seed)
    alpha, beta = _schedule(alpha), _schedule(beta)
    v = np.zeros(y.shape[0])
    for k in range(n_iter):
        y = _inner_sgd(low, draw_l, x, y, beta(k), inner_steps)
        gx, gy = up.grad(draw_u(), x, y)
        idx = draw_l()
        Ui = low.U[idx]
        m = idx.shape[0]
        ridge = low.ridge

        def hyy(p):
            return Ui.T @ (Ui @ p) / m + ridge * p

        r = gy - hyy(v)
        p = r.copy()
        rr = r @ r
        for _ in range(neumann_terms):
            if rr == 0.0:
                break
            hp = hyy(p)
            php = p @ hp
            if not php > 0.0:
                break
            a = rr / php
            v = v + a * p
            r = r - a * hp
            rr_new = r @ r
            p = r + (rr_new / rr) * p
            rr = rr_new
        x = x - alpha(k) * (gx - low.hxy(idx, v))
    return x, y


def soba_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, **_):
    """SOBA (Dagreou et al. 2022): joint steps on y, v, x from the same point."""
    x, y, low, up, draw_l, draw_u, _ = _setup(q, x0, y0, batch_size, seed)
    alpha, beta = _schedule(alpha), _schedule(beta)
    v = np.zeros(y.shape[0])
    for k in range(n_iter):
        rho, gamma = beta(k), alpha(k)
        idx = draw_l()
        Ui = low.U[idx]
        m = idx.shape[0]
        Cb = low.C[idx].mean(axis=0)
        gy = Ui.T @ (Ui @ y) / m + Cb.T @ x + low.a[idx].mean(axis=0) + low.ridge * y
        hy = Ui.T @ (Ui @ v) / m + low.ridge * v
        hx = Cb @ v
        fx, fy = up.grad(draw_u(), x, y)
        y = y - rho * gy
        v = v - rho * (hy - fy)
        x = x - gamma * (fx - hx)
    return x, y


#: method name -> (loop, options to pass: name of mlocore's option -> loop keyword)
NUMPY_LOOPS = {
    "alternating": alternating_numpy,
    "bsa": bsa_numpy,
    "stocbio": stocbio_numpy,
    "aid": aid_numpy,
    "ttsa": ttsa_numpy,
    "soba": soba_numpy,
}
#: options of each loop taken from mlocore's result (res.steps / MethodSpec defaults)
LOOP_OPTIONS = {
    "alternating": ("inner_steps",),
    "bsa": ("inner_steps", "neumann_terms", "eta"),
    "stocbio": ("inner_steps", "neumann_terms", "eta"),
    "aid": ("inner_steps", "neumann_terms"),
    "ttsa": ("inner_steps", "neumann_terms", "eta"),
    "soba": (),
}


def validate(q, method, n_iter=5, alpha=None, beta=None, **loop_kw):
    """Max relative difference between mlocore and the NumPy loop over ``n_iter`` full-batch
    iterations (same steps; ``neumann_terms=1`` for the randomized methods)."""
    import mlocore as mlo
    from mlocore.stochastic import METHODS

    spec = METHODS[method]
    x0 = np.linspace(-1.0, 1.0, q.dx)
    y0 = np.linspace(0.5, -0.5, q.dy)
    n = q.n_inner
    if q.n_outer != n:
        raise ValueError("validate needs n_outer == n_inner (one batch_size for both)")
    opts = {}
    T = loop_kw.pop("inner_steps", spec.inner_steps)
    Q = loop_kw.pop("neumann_terms", 1 if method in ("bsa", "ttsa") else spec.neumann_terms)
    if "inner_steps" in spec.uses:
        opts["inner_steps"] = T
    if "neumann_terms" in spec.uses:
        opts["neumann_terms"] = Q
    kw = {}
    if alpha is not None:
        kw["step"] = alpha
    if beta is not None:
        kw["inner_step"] = beta
    res = mlo.minimize_bilevel(q.stochastic_problem, x0, y0, method=method, batch_size=n,
                               seed=0, maxiter=n_iter, average=0.0, **opts, **kw)
    loop_opts = {"inner_steps": T, "neumann_terms": Q, "eta": res.steps["neumann_step"]}
    loop_opts = {k: v for k, v in loop_opts.items() if k in LOOP_OPTIONS[method]}
    x, y = NUMPY_LOOPS[method](q, x0, y0, n_iter, n, 0, res.steps["alpha"],
                               res.steps["beta"], **loop_opts)
    scale = max(1.0, np.abs(res.x).max(), np.abs(res.y).max())
    return float(max(np.abs(x - res.x).max(), np.abs(y - res.y).max()) / scale)
