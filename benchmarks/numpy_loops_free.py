"""Plain NumPy loops of SABA, Hessian-free (PZOBO), penalty and primal-dual on the stochastic
quadratic's per-sample data (``q.lower_samples``, ``q.upper_samples``, ``q.ridge`` of
:func:`mlocore.problems.make_quadratic`), vectorized over the minibatch with ``einsum``.

They follow the recursions of ``mlocore/stochastic/{saba,hessian_free,penalty,primal_dual}.py`` with constant steps
``alpha`` (upper) and ``beta`` (lower) and minibatches from ``numpy.random.default_rng(seed)``
(not the compiled kernels' random stream: the iterates agree in distribution, not bit for
bit). Used to compare the compiled loops' per-iteration cost with what a competent NumPy
user would write. Each function returns the final x.
"""
import numpy as np


class _Level:
    """Minibatch oracles of one level: samples ``phi_i = y.A_i y/2 + x.B_i x/2 + x.C_i y +
    a_i.y + b_i.x`` with ``A_i = u_i u_i^T + ridge I`` and ``B_i = w_i w_i^T + ridge I``."""

    def __init__(self, samples, ridge):
        self.U, self.W, self.C, self.a, self.b = samples
        self.ridge = ridge
        self.n = self.U.shape[0]

    def grad(self, x, y, idx):
        """(grad_x, grad_y) averaged over idx."""
        U, W, C = self.U[idx], self.W[idx], self.C[idx]
        gx = (W.T @ (W @ x) + np.einsum("ipq,q->p", C, y) + self.b[idx].sum(0)) / len(idx)
        gy = (U.T @ (U @ y) + np.einsum("ipq,p->q", C, x) + self.a[idx].sum(0)) / len(idx)
        return gx + self.ridge * x, gy + self.ridge * y

    def cross(self, v, idx):
        """(H_xy v, H_yy v) averaged over idx."""
        U, C = self.U[idx], self.C[idx]
        return (np.einsum("ipq,q->p", C, v) / len(idx),
                U.T @ (U @ v) / len(idx) + self.ridge * v)

    def value(self, x, y, idx):
        U, W, C = self.U[idx], self.W[idx], self.C[idx]
        s = 0.5 * ((W @ x) ** 2 + (U @ y) ** 2) + np.einsum("p,ipq,q->i", x, C, y) \
            + self.a[idx] @ y + self.b[idx] @ x
        return s.mean() + 0.5 * self.ridge * (x @ x + y @ y)


def _levels(q):
    return _Level(q.lower_samples, q.ridge), _Level(q.upper_samples, q.ridge)


def saba_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta):
    """SABA with fixed batches of one random permutation, visited in a reshuffled order each
    epoch; tables filled by one pass at (x0, y0, v = 0)."""
    rng = np.random.default_rng(seed)
    low, up = _levels(q)
    x, y = np.array(x0, float), np.array(y0, float)
    dy = y.size
    v = np.zeros(dy)

    def batches(n):
        perm = rng.permutation(n)
        return [perm[s:s + batch_size] for s in range(0, n, batch_size)]

    bl, bu = batches(low.n), batches(up.n)
    wl = np.array([len(b) / low.n for b in bl])
    wu = np.array([len(b) / up.n for b in bu])

    def lrow(b):
        _, gy = low.grad(x, y, b)
        hx, hy = low.cross(v, b)
        return np.concatenate([gy, hy, hx])

    def urow(b):
        gx, gy = up.grad(x, y, b)
        return np.concatenate([gy, gx])

    tl = np.array([lrow(b) for b in bl])
    tu = np.array([urow(b) for b in bu])
    ml, mu = wl @ tl, wu @ tu
    ol, ou = np.arange(len(bl)), np.arange(len(bu))
    pl = pu = 0
    for _ in range(n_iter):
        if pl == 0:
            rng.shuffle(ol)
        if pu == 0:
            rng.shuffle(ou)
        j, i = ol[pl], ou[pu]
        pl, pu = (pl + 1) % len(bl), (pu + 1) % len(bu)
        nl, nu = lrow(bl[j]), urow(bu[i])
        d_l = len(bl) * wl[j] * (nl - tl[j]) + ml
        d_u = len(bu) * wu[i] * (nu - tu[i]) + mu
        ml += wl[j] * (nl - tl[j])
        mu += wu[i] * (nu - tu[i])
        tl[j], tu[i] = nl, nu
        y = y - beta * d_l[:dy]
        v = v - beta * (d_l[dy:2 * dy] - d_u[:dy])
        x = x - alpha * (d_u[dy:] - d_l[2 * dy:])
    return x


def hessian_free_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps=10,
                       directions=5, smoothing=1e-3):
    """PZOBO: the Q perturbed inner runs are vectorized as one (Q+1, dy) block of iterates."""
    rng = np.random.default_rng(seed)
    low, up = _levels(q)
    x, y = np.array(x0, float), np.array(y0, float)
    dx = x.size
    U, C, a = low.U, low.C, low.a
    for _ in range(n_iter):
        idx = rng.integers(0, low.n, size=(inner_steps, batch_size))
        u = rng.standard_normal((directions, dx))
        X = np.vstack([x, x + smoothing * u])          # (Q+1, dx)
        Y = np.tile(y, (directions + 1, 1))             # (Q+1, dy)
        for t in range(inner_steps):
            b = idx[t]
            Ub, Cb = U[b], C[b]
            gy = ((Y @ Ub.T) @ Ub + np.einsum("kp,ipq->kq", X, Cb) + a[b].sum(0)) \
                / batch_size + low.ridge * Y
            Y = Y - beta * gy
        y = Y[0]
        delta = (Y[1:] - y) / smoothing
        gx, gy = up.grad(x, y, rng.integers(0, up.n, size=batch_size))
        x = x - alpha * (gx + u.T @ (delta @ gy) / directions)
    return x


def _value_function_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps,
                          a1, a2, rho, dual_step, eps, dual, gamma=1.0):
    rng = np.random.default_rng(seed)
    low, up = _levels(q)
    x, y = np.array(x0, float), np.array(y0, float)
    yh, ybar, yhbar = y.copy(), y.copy(), y.copy()
    for _ in range(n_iter):
        for _t in range(inner_steps - 1):
            _, g = low.grad(x, yh, rng.integers(0, low.n, size=batch_size))
            yh = yh - beta * (g + a1 * yh)
        il = rng.integers(0, low.n, size=batch_size)
        fx, fy = up.grad(x, y, rng.integers(0, up.n, size=batch_size))
        yc, yhc = (ybar, yhbar) if dual else (y, yh)   # primal-dual: at the averages
        c = low.value(x, yc, il) - low.value(x, yhc, il) - 0.5 * a1 * yhc @ yhc - a2
        w = rho if (dual or c > 0 or (a1 == 0 and a2 == 0)) else 0.0
        s = 1.0 / (1.0 + rho)
        hx, hy = low.grad(x, yh, il)    # the last yhat step shares the batch il
        if w:
            gx, gy = low.grad(x, y, il)
            fx, fy = fx + w * (gx - hx), fy + w * gy
        yh = yh - beta * (hy + a1 * yh)
        x = x - alpha * s * fx
        y = y - beta * s * fy
        if dual:
            ybar, yhbar = ybar + gamma * (y - ybar), yhbar + gamma * (yh - yhbar)
            rho = max(0.0, rho + dual_step * (c - eps))
    return x


def penalty_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps=1, rho=10.0,
                  a1=0.0, a2=0.0):
    """Value-function penalty: yhat SGD steps, then one step on (f + rho max(0, c))/(1+rho)."""
    return _value_function_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta,
                                 inner_steps, a1, a2, rho, 0.0, 0.0, False)


def primal_dual_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta, inner_steps=1,
                      dual_step=0.5, constraint_tol=1e-3, rho0=1.0, a1=0.0, a2=0.0,
                      constraint_average=0.01):
    """Primal-dual: the penalty step on the Lagrangian, the running averages of y and yhat,
    then projected dual ascent on the constraint at the averages."""
    return _value_function_numpy(q, x0, y0, n_iter, batch_size, seed, alpha, beta,
                                 inner_steps, a1, a2, rho0, dual_step, constraint_tol, True,
                                 constraint_average)
