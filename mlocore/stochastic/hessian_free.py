"""Hessian-free bilevel optimization, PZOBO (Sow, Ji & Liang 2022, "On the convergence
theory for Hessian-free bilevel algorithms", NeurIPS): Gaussian finite differences of the
inner SGD trajectory, gradients only.

Iteration k: T lower SGD steps (step ``beta_k``) from the warm start ``y_k`` on T recorded
minibatches give ``y_T(x)``; Q perturbed runs from the same ``y_k`` on the same minibatches
give ``y_T(x + mu u_q)`` with Gaussian ``u_q ~ N(0, I_dx)``; with ``delta_q = (y_T(x + mu
u_q) - y_T(x)) / mu``::

    h = grad_x f(x, y_T; zeta) + (1/Q) sum_q u_q <delta_q, grad_y f(x, y_T; zeta)>
    x <- P(x - alpha_k h),   y_{k+1} = y_T

``work`` is empty. On the device the Gaussian directions are drawn **on the device** from
the CPU's SplitMix64 stream: SplitMix64 is counter based (draw j from state s is ``mix(s +
j golden)``), so one kernel computes all ``Q dx`` normals in parallel from the host's
current state (a kernel argument) and the host only advances its state by ``2 Q dx`` draws
(no transfer, no read-back). The directions are therefore the CPU's (up to the device's
``log`` / ``cos`` rounding), and full-batch or fixed-batch runs reproduce the CPU runs.
"""
import numpy as np
from numba import njit

from .._validation import check_int, check_positive
from ._device import (GOLDEN_INT, DeviceMethod, lower_sgd_kernel, normals_kernel, cuda,
                      dl, launch)
from ._sampling import (ALPHA0, BETA0, DIVERGED, N_FPAR, N_IPAR, OK, T_INNER, draw, finite,
                        joint_into, project, rand_normal, lower_grad_y, step_at,
                        upper_grad)
from ._spec import MethodSpec

HF_DIRECTIONS = N_IPAR      # ipar slot: number of Gaussian directions Q
HF_SMOOTHING = N_FPAR       # fpar slot: smoothing mu
#: the default lower schedule ``beta_0 (1000 / (1000 + k))^0.4`` decays slowly: the unrolled
#: Jacobian's error ``(1 - beta mu_g)^T`` grows as beta shrinks (bias (i) of the setup's notes)
HF_BETA_OFFSET = 1000.0


@njit(cache=True)
def _replay_sgd(lfns, largs, lflags, z, x, y, dx, beta, T, ibuf, lens, bs, counts):
    """T lower SGD steps on y (x fixed) on the recorded batches ``ibuf[t*bs : t*bs+lens[t]]``."""
    for t in range(T):
        joint_into(z, x, y)
        idx = ibuf[t * bs:t * bs + lens[t]]
        g = lower_grad_y(lfns, largs, lflags, z, dx, idx, counts)
        for i in range(y.shape[0]):
            y[i] -= beta * g[i]


@njit(cache=True)
def run_hessian_free(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar,
                     samp_u, samp_l, rng, proj, k0, n_iter, counts):
    """PZOBO (Sow, Ji & Liang 2022a): per iteration, T lower SGD steps from the warm start
    y_k on T recorded minibatches give y_T(x); Q perturbed runs from the same y_k on the same
    minibatches give y_T(x + mu u_q), u_q ~ N(0, I); with
    ``delta_q = (y_T(x + mu u_q) - y_T(x)) / mu`` (about ``J u_q``, J = dy_T/dx)::

        h = grad_x f(x, y_T) + (1/Q) sum_q u_q <delta_q, grad_y f(x, y_T)>
        x <- P(x - alpha_k h),   y <- y_T

    (``E[u u^T] = I`` so h estimates ``grad_x f + J^T grad_y f``). Random numbers per
    iteration: the T lower batches, then Q*dx normals (u_0 first), then the upper batch.
    Gradients only: never calls an hvp."""
    dx = x.shape[0]
    dy = y.shape[0]
    T = ipar[T_INNER]
    Q = ipar[HF_DIRECTIONS]
    mu = fpar[HF_SMOOTHING]
    bs = samp_l[0][1]
    ibuf = np.empty(T * bs, dtype=np.int64)
    lens = np.empty(T, dtype=np.int64)
    z = np.empty(dx + dy)
    y0 = np.empty(dy)
    xp = np.empty(dx)
    dirs = np.empty((Q, dx))
    deltas = np.empty((Q, dy))
    h = np.empty(dx)
    for it in range(n_iter):
        k = k0 + it
        beta = step_at(fpar, BETA0, k)
        alpha = step_at(fpar, ALPHA0, k)
        for t in range(T):
            idx, _ = draw(samp_l, rng)
            m = idx.shape[0]
            lens[t] = m
            ibuf[t * bs:t * bs + m] = idx
        y0[:] = y
        _replay_sgd(lfns, largs, lflags, z, x, y, dx, beta, T, ibuf, lens, bs, counts)  # y = y_T(x)
        for q in range(Q):
            u = dirs[q]
            for p in range(dx):
                u[p] = rand_normal(rng)
                xp[p] = x[p] + mu * u[p]
            d = deltas[q]
            d[:] = y0
            _replay_sgd(lfns, largs, lflags, z, xp, d, dx, beta, T, ibuf, lens, bs, counts)
            for i in range(dy):
                d[i] = (d[i] - y[i]) / mu
        joint_into(z, x, y)
        idx_u, _ = draw(samp_u, rng)
        gf = upper_grad(ufns, uargs, uflags, z, dx, idx_u, counts)
        for p in range(dx):
            h[p] = gf[p]
        for q in range(Q):
            s = 0.0
            for i in range(dy):
                s += deltas[q, i] * gf[dx + i]
            s /= Q
            for p in range(dx):
                h[p] += s * dirs[q, p]
        for p in range(dx):
            x[p] -= alpha * h[p]
        project(x, proj)
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


def _setup_hessian_free(ctx, opts):
    """Hessian-free bilevel optimization, PZOBO (Sow, Ji & Liang, "On the convergence theory
    for Hessian-free bilevel algorithms", NeurIPS 2022).

    Iteration k: T lower SGD steps (step ``beta_k``) from the warm start ``y_k`` on T recorded
    minibatches give ``y_T(x)``; Q perturbed runs from the same ``y_k`` on the same minibatches
    give ``y_T(x + mu u_q)`` with Gaussian ``u_q ~ N(0, I_dx)``; with
    ``delta_q = (y_T(x + mu u_q) - y_T(x)) / mu``::

        h = grad_x f(x, y_T; zeta) + (1/Q) sum_q u_q <delta_q, grad_y f(x, y_T; zeta)>
        x <- P(x - alpha_k h),   y_{k+1} = y_T

    ``delta_q ~ J_T u_q`` with ``J_T = dy_T/dx`` and ``E[u u^T] = I``, so h estimates
    ``grad_x f + J_T^T grad_y f``, the implicit formula with the unrolled Jacobian.

    Parameters
    ----------
    directions : int, default 5
        Number Q of Gaussian directions per iteration.
    smoothing : float, default 1e-3
        Perturbation size mu (absolute, in the units of x).

    Notes
    -----
    Only gradient callbacks are used (no hvp, second-order callbacks may be absent).
    Sources of bias: (i) finite T: ``J_T`` is the Jacobian of T SGD steps from a warm start
    treated as independent of x; for a quadratic lower level
    ``J_T = (I - prod_t (I - beta H_t)) J`` so the error decays like ``(1 - beta mu_g)^T``
    (mu_g: strong convexity of g), and ``y_T`` itself is only close to ``y*(x)``; (ii) the
    smoothing: ``delta_q`` is a one-sided difference, exact when ``y_T`` is affine in x
    (quadratic g), otherwise biased by ``O(mu)`` (rounding errors grow like ``eps / mu``);
    (iii) Q directions: unbiased for ``J_T^T grad_y f`` given the batches, with variance of
    order ``dx |J_T^T grad_y f|^2 / Q``; (iv) minibatch correlation: the same T minibatches
    drive ``y_T`` (hence ``grad_y f(x, y_T)``) and the Jacobian estimate, so their noises
    correlate, a bias of order ``beta * (sample variance)`` (on mlocore's stochastic quadratic
    with constant steps the iterates stall at distance ~8 from x* for beta = 1/L_g, ~3 for
    beta = 0.15/L_g). The default schedules therefore decay (``alpha ~ k^-0.6`` with offset
    100, ``beta ~ k^-0.4`` with offset 1000); a smaller beta enlarges bias (i) unless T
    grows. Per iteration: ``T (Q + 1)`` lower gradients on the lower batch size and one
    upper gradient.

    Defaults: the paper's structure (T warm-started inner steps, Q Gaussian directions,
    decaying steps); T = 20, the beta offset 1000 and Q = 5 were chosen by measurement. On
    ``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2, the returned tail
    average) the relative distance to x* was 0.20-0.25 with T = 10 and beta offset 100, 0.05-0.1
    with T = 20 or 30 at offset 100 (the shrinking beta leaves ``J_T`` short of J), 0.02-0.05
    with offset 1000 and T = 15-20 (T = 20 kept: on ``make_quadratic(5, 10, 200, 200)``,
    batch 32, 5000 iterations, its distance was 3.4 of |x*| = 15.2, against 4.0 with T = 15,
    3.1 for the former defaults, 5.1 with a constant beta).
    """
    q = check_int("directions", opts["directions"], 1)
    mu = check_positive("smoothing", opts["smoothing"])
    return np.zeros(0), [mu], [q]



# Device loop ---------------------------------------------------------------------------
@cuda.jit
def _hf_perturb_kernel(zq, z, y0, dirs, off, dx, mu):
    """``zq = (x + mu u_q, y0)`` with ``u_q = dirs[off:off + dx]``."""
    for i in range(cuda.grid(1), zq.shape[0], cuda.gridsize(1)):
        if i < dx:
            zq[i] = z[i] + mu * dirs[off + i]
        else:
            zq[i] = y0[i - dx]


@cuda.jit
def _hf_delta_kernel(deltas, off, zq, z, dx, mu):
    """``delta_q = (y_T(x + mu u_q) - y_T(x)) / mu`` into ``deltas[off:off + dy]``."""
    for i in range(cuda.grid(1), zq.shape[0] - dx, cuda.gridsize(1)):
        deltas[off + i] = (zq[dx + i] - z[dx + i]) / mu


@cuda.jit
def _hf_upper_kernel(z, gf, dirs, deltas, nq, dx, dy, alpha):
    """``x -= alpha (grad_x f + (1/Q) sum_q u_q <delta_q, grad_y f>)`` (the CPU's order)."""
    for p in range(cuda.grid(1), dx, cuda.gridsize(1)):
        h = gf[p]
        for q in range(nq):
            s = 0.0
            for i in range(dy):
                s += deltas[q * dy + i] * gf[dx + i]
            s /= nq
            h += s * dirs[q * dx + p]
        z[p] -= alpha * h


class DeviceHessianFree(DeviceMethod):
    """:func:`run_hessian_free` on the device: T recorded lower batches (copied on the device
    for the uniform sampler, whose index array is refilled by every draw), the Gaussian
    directions drawn on the device (module docstring), gradients only."""

    def __init__(self, r):
        super().__init__(r)
        dx, dy, n = r.dx, r.dy, r.n
        self.nq, self.mu = int(r.iextra[0]), float(r.fextra[0])
        self.bufs = [cuda.device_array(r.samp_l.bs, dtype=np.int64) for _ in range(r.T)] \
            if r.samp_l.random else None
        self.y0, self.zq = dl.empty(dy), dl.empty(n)
        self.dirs, self.deltas = dl.empty(self.nq * dx), dl.empty(self.nq * dy)

    def _replay(self, zz, batches, beta):
        r = self.r
        for idx in batches:
            r.lower.grad(zz, idx, r.gg)
            launch(lower_sgd_kernel, r.dy, zz, r.gg, r.dx, beta)

    def iteration(self, k):
        r = self.r
        dx, dy, n, z = r.dx, r.dy, r.n, r.z
        beta, alpha = r.beta_at(k), r.alpha_at(k)
        batches = []
        for t in range(r.T):
            idx = r.samp_l.draw()
            if self.bufs is not None:
                dl.copy(idx, self.bufs[t])
                idx = self.bufs[t]
            batches.append(idx)
        dl.copy(z[dx:], self.y0)
        self._replay(z, batches, beta)                      # y = y_T(x)
        m = self.nq * dx
        s0 = np.uint64(r.hrng[0])
        launch(normals_kernel, m, self.dirs, s0)
        r.hrng[0] = np.uint64((int(s0) + 2 * m * GOLDEN_INT) % (1 << 64))
        for q in range(self.nq):
            launch(_hf_perturb_kernel, n, self.zq, z, self.y0, self.dirs, q * dx, dx,
                    self.mu)
            self._replay(self.zq, batches, beta)            # y_T(x + mu u_q)
            launch(_hf_delta_kernel, dy, self.deltas, q * dy, self.zq, z, dx, self.mu)
        r.upper.grad(z, r.samp_u.draw(), r.gf)
        launch(_hf_upper_kernel, dx, z, r.gf, self.dirs, self.deltas, self.nq, dx, dy,
                alpha)
        self.project()

    def state_work(self):
        return np.zeros(0)


SPEC = MethodSpec(run_hessian_free, alpha_power=0.6, beta_power=0.4, inner_steps=20,
                  beta_offset=HF_BETA_OFFSET,
                  uses=("inner_steps",), options={"directions": 5, "smoothing": 1e-3},
                  setup=_setup_hessian_free,
                  doc="Sow, Ji & Liang 2022a (PZOBO): Gaussian finite differences of the "
                      "inner SGD trajectory, gradients only",
                  device=DeviceHessianFree, gradient_only=True)
