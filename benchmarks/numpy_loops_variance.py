"""Plain NumPy loops of STABLE, SUSTAIN, MRBO and VRBO on the stochastic quadratic's
per-sample data (``make_quadratic(...).lower_samples``, ``.upper_samples``, ``.ridge``).

They are the "competent NumPy user" baseline for the per-iteration cost of mlocore's compiled
loops (``mlocore/stochastic/{stable,sustain,mrbo,vrbo}.py``): the same recursions, minibatches drawn with
``numpy.random.Generator`` (so the iterates are not bit-identical to mlocore's), minibatch
oracles vectorized over the batch. Every function returns the final x.

Per-sample quadratic (see ``mlocore/problems/quadratic.py``)::

    phi_i(x, y) = (u_i.y)^2/2 + (w_i.x)^2/2 + x.C_i y + a_i.y + b_i.x + ridge (|x|^2+|y|^2)/2
"""
from __future__ import annotations

import numpy as np

__all__ = ["stable_numpy", "sustain_numpy", "mrbo_numpy", "vrbo_numpy"]


class _Level:
    """One level's per-sample arrays with vectorized minibatch oracles."""

    def __init__(self, samples, ridge):
        self.U, self.W, self.C, self.a, self.b = samples
        self.ridge = float(ridge)
        self.n = self.U.shape[0]

    def batch(self, idx):
        """Minibatch pieces ``(U_B, W_B, mean C, mean a, mean b)`` (computed once per batch,
        reused at several points)."""
        return (self.U[idx], self.W[idx], self.C[idx].mean(axis=0), self.a[idx].mean(axis=0),
                self.b[idx].mean(axis=0))

    def grad(self, B, x, y):
        U, W, C, a, b = B
        m = U.shape[0]
        gx = W.T @ (W @ x) / m + C @ y + b + self.ridge * x
        gy = U.T @ (U @ y) / m + C.T @ x + a + self.ridge * y
        return gx, gy

    def grad_y(self, B, x, y):
        U, _, C, a, _ = B
        return U.T @ (U @ y) / U.shape[0] + C.T @ x + a + self.ridge * y

    def hyy(self, B, v):
        U = B[0]
        return U.T @ (U @ v) / U.shape[0] + self.ridge * v

    def hyy_matrix(self, B):
        U = B[0]
        return U.T @ U / U.shape[0] + self.ridge * np.eye(U.shape[1])


def _levels(q):
    return _Level(q.lower_samples, q.ridge), _Level(q.upper_samples, q.ridge)


def _uniform(rng, n, bs):
    return rng.integers(0, n, size=bs)


def _neumann_pair(low, up, points, eta, Q, randomized, rng, bs, full=False):
    """Neumann hypergradient estimates at each (x, y) in ``points`` with shared batches."""
    def batch(level):
        return level.batch(np.arange(level.n) if full else _uniform(rng, level.n, bs))

    Bu = batch(up)
    gfs = [up.grad(Bu, x, y) for x, y in points]
    ps = [gy.copy() for _, gy in gfs]
    ss = [p.copy() for p in ps]
    nq = int(rng.integers(0, Q)) if randomized else Q - 1
    for _ in range(nq):
        B = batch(low)
        for j in range(len(points)):
            ps[j] = ps[j] - eta * low.hyy(B, ps[j])
            ss[j] = ss[j] + ps[j]
    Bx = batch(low)
    out = []
    for j in range(len(points)):
        v = (eta * Q) * ps[j] if randomized else eta * ss[j]
        out.append(gfs[j][0] - Bx[2] @ v)
    return out


def stable_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, tau=0.1,
                 hessian_floor=1e-3):
    """STABLE (Chen, Sun & Yin 2022) with dense averaged Hessians (the minibatch Hessian
    blocks are formed directly, ``U_B^T U_B / m + ridge I`` and ``mean C``)."""
    low, up = _levels(q)
    rng = np.random.default_rng(seed)
    x, y = np.array(x0, dtype=float), np.array(y0, dtype=float)
    Hyy = Hxy = None
    for k in range(n_iter):
        Bh = low.batch(_uniform(rng, low.n, batch_size))
        hyy, hxy = low.hyy_matrix(Bh), Bh[2]
        if Hyy is None:
            Hyy, Hxy = hyy, hxy.copy()
        else:
            Hyy = (1 - tau) * Hyy + tau * hyy
            Hxy = (1 - tau) * Hxy + tau * hxy
        lam, V = np.linalg.eigh(0.5 * (Hyy + Hyy.T))
        lam = np.maximum(lam, hessian_floor)
        Hyy = (V * lam) @ V.T
        gx, gy = up.grad(up.batch(_uniform(rng, up.n, batch_size)), x, y)
        x_new = x - alpha * (gx - Hxy @ (V @ ((V.T @ gy) / lam)))
        gg = low.grad_y(low.batch(_uniform(rng, low.n, batch_size)), x, y)
        y = y - beta * gg - V @ ((V.T @ (Hxy.T @ (x_new - x))) / lam)
        x = x_new
    return x


def _double_momentum(q, x0, y0, n_iter, batch_size, seed, alpha, beta, eta, Q, momentum,
                     inner_momentum, randomized, power=1.0 / 3.0, offset=100.0):
    low, up = _levels(q)
    rng = np.random.default_rng(seed)
    x, y = np.array(x0, dtype=float), np.array(y0, dtype=float)
    hg = hf = xp = yp = None
    for k in range(n_iter):
        r = (offset / (offset + k)) ** power
        B = low.batch(_uniform(rng, low.n, batch_size))
        if hg is None:
            hg = low.grad_y(B, x, y)
            hf = _neumann_pair(low, up, [(x, y)], eta, Q, randomized, rng, batch_size)[0]
        else:
            wg = 1.0 - min(1.0, inner_momentum * r * r)
            wf = 1.0 - min(1.0, momentum * r * r)
            hg = low.grad_y(B, x, y) + wg * (hg - low.grad_y(B, xp, yp))
            f1, f0 = _neumann_pair(low, up, [(x, y), (xp, yp)], eta, Q, randomized, rng,
                                   batch_size)
            hf = f1 + wf * (hf - f0)
        xp, yp = x, y
        y = y - beta * r * hg
        x = x - alpha * r * hf
    return x


def sustain_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, eta, Q=10,
                  momentum=0.02, inner_momentum=0.02):
    """SUSTAIN (Khanduri et al. 2021): STORM on both levels, randomized Neumann estimator,
    steps ``~ (100 + k)^(-1/3)``."""
    return _double_momentum(q, x0, y0, n_iter, batch_size, seed, alpha, beta, eta, Q,
                            momentum, inner_momentum, True)


def mrbo_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, eta, Q=10, momentum=0.02,
               inner_momentum=0.02):
    """MRBO (Yang, Ji & Liang 2021): STORM on both levels, summed Neumann estimator."""
    return _double_momentum(q, x0, y0, n_iter, batch_size, seed, alpha, beta, eta, Q,
                            momentum, inner_momentum, False)


def vrbo_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, eta, Q=10, period=None):
    """VRBO (Yang, Ji & Liang 2021), one lower step per upper step: full-batch refresh every
    ``period`` iterations (default: number of lower minibatches), SARAH updates between."""
    low, up = _levels(q)
    rng = np.random.default_rng(seed)
    if period is None:
        period = -(-low.n // batch_size)
    x, y = np.array(x0, dtype=float), np.array(y0, dtype=float)
    full = np.arange(low.n)
    hg = hf = xp = yp = None
    for k in range(n_iter):
        if k % period == 0:
            hg = low.grad_y(low.batch(full), x, y)
            hf = _neumann_pair(low, up, [(x, y)], eta, Q, False, rng, batch_size, full=True)[0]
        else:
            B = low.batch(_uniform(rng, low.n, batch_size))
            hg = hg + low.grad_y(B, x, y) - low.grad_y(B, xp, yp)
            f1, f0 = _neumann_pair(low, up, [(x, y), (xp, yp)], eta, Q, False, rng,
                                   batch_size)
            hf = hf + f1 - f0
        xp, yp = x, y
        y = y - beta * hg
        x = x - alpha * hf
    return x
