"""Device loops of the variance-reduced, corrected and Hessian-free stochastic methods:
SUSTAIN / MRBO (STORM double momentum), VRBO (SPIDER), STABLE (averaged dense Hessians),
Hessian-free (PZOBO), the value-function penalty method and its primal-dual form.

The CPU kernels :mod:`mlocore._kernels.stoch_variance` and :mod:`mlocore._kernels.stoch_free`
step for step, on device vectors, for :func:`mlocore.cuda._stochastic.minimize_stochastic`
(which validates the options with the CPU method specs' ``setup`` functions, computes the
default steps, samples, checkpoints and rewinds; see that module's docstring). Each method
is a small class built by :func:`build` with

* ``iteration(k)``: one iteration (kernels and callbacks, no read-back except where noted);
* ``saved``: the arrays a rewind saves and restores (device state, host flags);
* ``check``: a device vector whose ``sum |.|`` the checkpoint reads back with ``|(x, y)|``
  (the method's state: a non-finite entry is a divergence, as on the CPU), or None;
* ``host_ok()``: False once a host-side scalar (the primal-dual multiplier) is non-finite;
* ``state_work()`` / ``result()``: ``res.state["work"]`` in the CPU layout and extra
  result fields.

Randomness: minibatches come from the driver's samplers (device xoroshiro128p for
``sampler="uniform"``; the CPU's permutation and batch orders for ``"batches"``). SUSTAIN's
random number of Neumann terms is drawn on the host from the CPU's SplitMix64 stream
(as BSA's). The Hessian-free method's Gaussian directions are drawn **on the device** from
that same SplitMix64 stream: SplitMix64 is counter based (draw j from state s is
``mix(s + j golden)``), so one kernel computes all ``Q dx`` normals in parallel from the
host's current state (a kernel argument) and the host only advances its state by
``2 Q dx`` draws (no transfer, no read-back). The directions are therefore the CPU's (up
to the device's ``log`` / ``cos`` rounding), and full-batch or fixed-batch runs reproduce
the CPU runs.

Where a step synchronizes: STABLE's eigendecomposition runs in one device thread (cyclic
Jacobi, ``O(dy^3)`` per sweep: meant for moderate dy, as STABLE itself is); the penalty
methods call the lower ``value`` callback twice per iteration, which returns a host float
(each call reads back; the callback's own read-backs are not counted), and with ``a1 > 0``
read back ``|yhat|^2`` once per iteration (counted).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .._kernels import stochastic as _sk
from . import _linalg as dl
from ._stochastic import _launch, _lower_sgd_kernel, _neumann_factor_kernel

__all__ = ["VARIANCE_DEVICE_METHODS", "build"]

#: methods implemented here (appended to DEVICE_STOCHASTIC_METHODS by the driver)
VARIANCE_DEVICE_METHODS = ("sustain", "mrbo", "vrbo", "stable", "hessian-free", "penalty",
                           "primal-dual")
#: methods that call only gradients (and values): no lower hvp needed when steps are given
GRADIENT_ONLY = ("hessian-free", "penalty", "primal-dual")

_JACOBI_SWEEPS = 60

# SplitMix64 constants (mlocore._kernels.stochastic), as module constants for the kernels
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_ONE = np.uint64(1)
_INV_2_53 = 1.0 / 9007199254740992.0
_GOLDEN_INT = 0x9E3779B97F4A7C15
_TWO_PI = 2.0 * math.pi


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
@cuda.jit
def _pair_start_kernel(p1, s1, gf1, p0, s0, gf0, dx, two):
    """Neumann recursions' start at both points: ``p = s = grad_y f`` (the y blocks)."""
    for i in range(cuda.grid(1), p1.shape[0], cuda.gridsize(1)):
        a = gf1[dx + i]
        p1[i] = a
        s1[i] = a
        if two != 0:
            b = gf0[dx + i]
            p0[i] = b
            s0[i] = b


@cuda.jit
def _hyper_kernel(f, gf, h):
    """``f = grad_x f - H_xy v`` (the x blocks of gf and of the cross product h)."""
    for i in range(cuda.grid(1), f.shape[0], cuda.gridsize(1)):
        f[i] = gf[i] - h[i]


@cuda.jit
def _estimate_kernel(work, o_hg, o_hf, gg1, gg0, f1, f0, dx, dy, mode, wg, wf):
    """The estimates ``h_g`` (``work[o_hg:o_hg + dy]``) and ``h_f`` (``work[o_hf:o_hf +
    dx]``) from the lower gradients gg1 / gg0 (joint vectors at the current / previous
    point) and the hypergradient estimates f1 / f0: mode 0 ``h = new``; mode 1 (STORM)
    ``h = new + w (h - old)``; mode 2 (SPIDER) ``h += new - old``."""
    for t in range(cuda.grid(1), dy + dx, cuda.gridsize(1)):
        if t < dy:
            new = gg1[dx + t]
            old = gg0[dx + t]
            o = o_hg + t
            w = wg
        else:
            new = f1[t - dy]
            old = f0[t - dy]
            o = o_hf + t - dy
            w = wf
        if mode == 0:
            work[o] = new
        elif mode == 1:
            work[o] = new + w * (work[o] - old)
        else:
            work[o] += new - old


@cuda.jit
def _estimate_step_kernel(z, work, o_hg, o_hf, o_zp, dx, alpha, beta):
    """Remember z as the previous point (``work[o_zp:]``), then ``x -= alpha h_f`` and
    ``y -= beta h_g``."""
    for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        work[o_zp + i] = z[i]
        if i < dx:
            z[i] -= alpha * work[o_hf + i]
        else:
            z[i] -= beta * work[o_hg + i - dx]


# STABLE --------------------------------------------------------------------------------
@cuda.jit
def _unit_kernel(w, pos):
    """``w = e_pos``."""
    for i in range(cuda.grid(1), w.shape[0], cuda.gridsize(1)):
        w[i] = 1.0 if i == pos else 0.0


@cuda.jit
def _stable_column_kernel(cols, h, dx, dy, j):
    """Column j of the minibatch Hessian blocks from ``h = H (0, e_j)``: ``cols = [H_yy
    (dy x dy), H_xy (dx x dy)]``, row major."""
    for i in range(cuda.grid(1), dx + dy, cuda.gridsize(1)):
        if i < dy:
            cols[i * dy + j] = h[dx + i]
        else:
            cols[dy * dy + (i - dy) * dy + j] = h[i - dy]


@cuda.jit
def _stable_average_kernel(work, cols, tau, first):
    """``H = cols`` (first) or ``H = (1 - tau) H + tau cols`` over ``work[1:]``."""
    for i in range(cuda.grid(1), cols.shape[0], cuda.gridsize(1)):
        if first != 0:
            work[1 + i] = cols[i]
        else:
            work[1 + i] = (1.0 - tau) * work[1 + i] + tau * cols[i]


@cuda.jit(device=True)
def _jacobi(A, V, n):
    """Cyclic Jacobi on the symmetric row-major n x n matrix A (diagonalized in place),
    accumulating the rotations in V: afterwards ``A_in = V diag(A) V^T``. Stops when the
    off-diagonal mass is below ``1e-30`` times the diagonal one (or is not finite)."""
    for _ in range(_JACOBI_SWEEPS):
        off = 0.0
        diag = 0.0
        for p in range(n):
            diag += A[p * n + p] * A[p * n + p]
            for q in range(p + 1, n):
                off += A[p * n + q] * A[p * n + q]
        if not off > 1e-30 * diag:
            return
        for p in range(n - 1):
            for q in range(p + 1, n):
                apq = A[p * n + q]
                if apq == 0.0:
                    continue
                theta = (A[q * n + q] - A[p * n + p]) / (2.0 * apq)
                t = 1.0 / (math.fabs(theta) + math.sqrt(theta * theta + 1.0))
                if theta < 0.0:
                    t = -t
                c = 1.0 / math.sqrt(t * t + 1.0)
                s = t * c
                for k in range(n):
                    akp = A[k * n + p]
                    akq = A[k * n + q]
                    A[k * n + p] = c * akp - s * akq
                    A[k * n + q] = s * akp + c * akq
                for k in range(n):
                    apk = A[p * n + k]
                    aqk = A[q * n + k]
                    A[p * n + k] = c * apk - s * aqk
                    A[q * n + k] = s * apk + c * aqk
                for k in range(n):
                    vkp = V[k * n + p]
                    vkq = V[k * n + q]
                    V[k * n + p] = c * vkp - s * vkq
                    V[k * n + q] = s * vkp + c * vkq


@cuda.jit
def _stable_eig_kernel(work, A, V, lam, dy, floor):
    """One thread: ``S = (H_yy + H_yy^T) / 2`` (``H_yy = work[1:1 + dy^2]``), ``S = V
    diag(lam) V^T`` (Jacobi), ``lam <- max(lam, floor)``, ``H_yy <- V diag(lam) V^T`` (the
    CPU's eigenvalue clipping; a non-finite S propagates NaN to the iterates)."""
    if cuda.grid(1) != 0:
        return
    for i in range(dy):
        for j in range(dy):
            A[i * dy + j] = 0.5 * (work[1 + i * dy + j] + work[1 + j * dy + i])
            V[i * dy + j] = 1.0 if i == j else 0.0
    _jacobi(A, V, dy)
    for i in range(dy):
        li = A[i * dy + i]
        if li < floor:
            li = floor
        lam[i] = li
    for i in range(dy):
        for j in range(dy):
            s = 0.0
            for m in range(dy):
                s += V[i * dy + m] * lam[m] * V[j * dy + m]
            work[1 + i * dy + j] = s


@cuda.jit
def _vt_solve_kernel(t, V, b, off, lam):
    """``t = (V^T b[off:off + dy]) / lam``."""
    dy = t.shape[0]
    for j in range(cuda.grid(1), dy, cuda.gridsize(1)):
        s = 0.0
        for i in range(dy):
            s += V[i * dy + j] * b[off + i]
        t[j] = s / lam[j]


@cuda.jit
def _v_apply_kernel(out, V, t):
    """``out = V t``."""
    dy = t.shape[0]
    for i in range(cuda.grid(1), dy, cuda.gridsize(1)):
        s = 0.0
        for j in range(dy):
            s += V[i * dy + j] * t[j]
        out[i] = s


@cuda.jit
def _stable_upper_kernel(z, gf, work, v, dx, dy, alpha):
    """``x -= alpha (grad_x f - H_xy v)`` with ``H_xy = work[1 + dy^2:]`` (row major)."""
    o = 1 + dy * dy
    for i in range(cuda.grid(1), dx, cuda.gridsize(1)):
        s = 0.0
        for j in range(dy):
            s += work[o + i * dy + j] * v[j]
        z[i] -= alpha * (gf[i] - s)


@cuda.jit
def _stable_dx_kernel(d, work, z, zs, dx, dy):
    """``d = H_xy^T (x_new - x_old)`` (x_old = the x block of zs)."""
    o = 1 + dy * dy
    for j in range(cuda.grid(1), dy, cuda.gridsize(1)):
        s = 0.0
        for i in range(dx):
            s += work[o + i * dy + j] * (z[i] - zs[i])
        d[j] = s


@cuda.jit
def _stable_lower_kernel(z, gg, c, dx, beta):
    """``y -= beta grad_y g + c`` (c: the correction ``H_yy^{-1} H_yx (x_new - x_old)``)."""
    for i in range(cuda.grid(1), c.shape[0], cuda.gridsize(1)):
        z[dx + i] -= beta * gg[dx + i] + c[i]


# Hessian-free --------------------------------------------------------------------------
@cuda.jit(device=True)
def _splitmix_mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@cuda.jit
def _normals_kernel(out, s0):
    """``out[m]``: the m-th standard normal of the CPU's ``rand_normal`` stream from the
    SplitMix64 state s0 (Box-Muller on draws 2m + 1 and 2m + 2: ``u = 1 - U``, ``v = U``,
    ``sqrt(-2 log u) cos(2 pi v)``)."""
    for m in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        k = np.uint64(2 * m + 1)
        a = _splitmix_mix(s0 + k * _GOLDEN)
        b = _splitmix_mix(s0 + (k + _ONE) * _GOLDEN)
        u = 1.0 - float(a >> _S11) * _INV_2_53
        v = float(b >> _S11) * _INV_2_53
        out[m] = math.sqrt(-2.0 * math.log(u)) * math.cos(_TWO_PI * v)


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


# value-function penalty / primal-dual ---------------------------------------------------
@cuda.jit
def _yhat_step_kernel(zh, gg, dx, beta, a1):
    """``yhat -= beta (grad_y g(x, yhat) + a1 yhat)`` (the y block of zh)."""
    for i in range(dx + cuda.grid(1), zh.shape[0], cuda.gridsize(1)):
        zh[i] -= beta * (gg[i] + a1 * zh[i])


@cuda.jit
def _vf_step_kernel(z, gf, gg, gh, dx, alpha, beta, s, w, active):
    """The normalized penalty / Lagrangian step (``active``: the g terms with weight w)::

        x -= alpha s (grad_x f + w (grad_x g(x, y) - grad_x g(x, yhat)))
        y -= beta s (grad_y f + w grad_y g(x, y))
    """
    for i in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
        if i < dx:
            if active != 0:
                z[i] -= alpha * s * (gf[i] + w * (gg[i] - gh[i]))
            else:
                z[i] -= alpha * s * gf[i]
        else:
            if active != 0:
                z[i] -= beta * s * (gf[i] + w * gg[i])
            else:
                z[i] -= beta * s * gf[i]


# ---------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------
class _Method:
    check = None
    saved = ()

    def __init__(self, r):
        self.r = r

    def host_ok(self):
        return True

    def result(self):
        return {}

    def project(self):
        """``x <- P(x)`` after the upper step (where the CPU kernels project), if
        constrained."""
        if self.r.project is not None:
            self.r.project(self.r.z)


class _Estimates(_Method):
    """SUSTAIN / MRBO (``vrbo`` False: STORM momentum, ``work = [started, h_g, h_f, x_prev,
    y_prev]``) and VRBO (SPIDER with full-batch refreshes every ``period`` iterations,
    ``work = [h_g, h_f, x_prev, y_prev]``): the CPU ``run_double_momentum`` / ``run_vrbo``.
    (x_prev, y_prev) is the joint previous point, a view of work."""

    def __init__(self, r, method):
        super().__init__(r)
        dx, dy, n = r.dx, r.dy, r.n
        self.vrbo = method == "vrbo"
        off = 0 if self.vrbo else 1
        self.work = dl.zeros(off + 2 * dy + 2 * dx)
        self.o_hg, self.o_hf, self.o_zp = off, off + dy, off + dy + dx
        self.zp = self.work[self.o_zp:]
        self.started = np.zeros(1, dtype=np.int64)
        if self.vrbo:
            self.period, self.randomized = int(r.iextra[0]), False
        else:
            self.m_upper, self.m_lower = float(r.fextra[0]), float(r.fextra[1])
            self.randomized = int(r.iextra[0]) != 0
        self.gg0, self.gf0, self.h = dl.empty(n), dl.empty(n), r.h
        self.w1, self.w0 = dl.zeros(n), dl.zeros(n)      # (0, p) at both points
        self.u1, self.u0 = dl.zeros(n), dl.zeros(n)      # (0, v) at both points
        self.s1, self.s0 = dl.empty(dy), dl.empty(dy)
        self.f1, self.f0 = dl.empty(dx), dl.empty(dx)
        self.check = self.work
        self.saved = (self.work, self.started)

    def _weight(self, which, k):
        """``min(1, m (s_k / s_0)^2)`` (the CPU ``_momentum_weight``)."""
        r = self.r
        s0 = r.par[which]
        ratio = (r.alpha_at(k) if which == 0 else r.beta_at(k)) / s0
        w = (self.m_upper if which == 0 else self.m_lower) * ratio * ratio
        return w if w < 1.0 else 1.0

    def _neumann_pair(self, zc, two, full):
        """The CPU ``_neumann_pair``: ``f1`` (at zc) and, if two, ``f0`` (at the previous
        point), every minibatch drawn once and used at both points."""
        r = self.r
        dx, dy, Q = r.dx, r.dy, r.Q
        zp = self.zp
        idx_u = r.samp_u.full_idx() if full else r.samp_u.draw()
        r.upper.grad(zc, idx_u, r.gf)
        if two:
            r.upper.grad(zp, idx_u, self.gf0)
        p1, p0 = self.w1[dx:], self.w0[dx:]
        _launch(_pair_start_kernel, dy, p1, self.s1, r.gf, p0, self.s0, self.gf0, dx,
                1 if two else 0)
        eta = r.par[2]
        nq = _sk.rand_int(r.hrng, Q) if self.randomized else Q - 1
        for _ in range(nq):
            idx = r.samp_l.full_idx() if full else r.samp_l.draw()
            r.lower.hvp(zc, self.w1, idx, self.h)
            _launch(_neumann_factor_kernel, dy, p1, self.s1, self.h, dx, eta)
            if two:
                r.lower.hvp(zp, self.w0, idx, self.h)
                _launch(_neumann_factor_kernel, dy, p0, self.s0, self.h, dx, eta)
        v1, v0 = self.u1[dx:], self.u0[dx:]
        if self.randomized:
            dl.scale_into(v1, eta * Q, p1)
            if two:
                dl.scale_into(v0, eta * Q, p0)
        else:
            dl.scale_into(v1, eta, self.s1)
            if two:
                dl.scale_into(v0, eta, self.s0)
        idx_l = r.samp_l.full_idx() if full else r.samp_l.draw()
        r.lower.hvp(zc, self.u1, idx_l, self.h)
        _launch(_hyper_kernel, dx, self.f1, r.gf, self.h)
        if two:
            r.lower.hvp(zp, self.u0, idx_l, self.h)
            _launch(_hyper_kernel, dx, self.f0, self.gf0, self.h)

    def iteration(self, k):
        r = self.r
        z = r.z
        wg = wf = 0.0
        if self.vrbo:
            refresh = k % self.period == 0
            two = not refresh
            idx = r.samp_l.full_idx() if refresh else r.samp_l.draw()
            mode = 0 if refresh else 2
        else:
            refresh = False
            two = self.started[0] != 0
            idx = r.samp_l.draw()
            mode = 1 if two else 0
        r.lower.grad(z, idx, r.gg)
        if two:
            r.lower.grad(self.zp, idx, self.gg0)
        self._neumann_pair(z, two, refresh)
        if mode == 1:
            wg = 1.0 - self._weight(1, k)
            wf = 1.0 - self._weight(0, k)
        _launch(_estimate_kernel, r.dy + r.dx, self.work, self.o_hg, self.o_hf, r.gg,
                self.gg0, self.f1, self.f0, r.dx, r.dy, mode, wg, wf)
        if not self.vrbo and not two:
            dl.fill(self.work[0:1], 1.0)
            self.started[0] = 1
        _launch(_estimate_step_kernel, r.n, z, self.work, self.o_hg, self.o_hf, self.o_zp,
                r.dx, r.alpha_at(k), r.beta_at(k))
        self.project()

    def state_work(self):
        return self.work


class _Stable(_Method):
    """STABLE (the CPU ``run_stable``): ``work = [started, H_yy (dy x dy), H_xy (dx x
    dy)]`` (row major), the clipped H_yy's eigenvectors V and eigenvalues lam kept for the
    two solves."""

    def __init__(self, r):
        super().__init__(r)
        dx, dy, n = r.dx, r.dy, r.n
        self.tau, self.floor = float(r.fextra[0]), float(r.fextra[1])
        self.work = dl.zeros(1 + dy * dy + dx * dy)
        self.cols = dl.empty(dy * dy + dx * dy)
        self.A, self.V, self.lam = dl.empty(dy * dy), dl.empty(dy * dy), dl.empty(dy)
        self.we, self.zs = dl.zeros(n), dl.empty(n)
        self.t, self.v, self.d, self.c = (dl.empty(dy) for _ in range(4))
        self.started = np.zeros(1, dtype=np.int64)
        self.check = self.work
        self.saved = (self.work, self.started)

    def iteration(self, k):
        r = self.r
        dx, dy, n, z = r.dx, r.dy, r.n, r.z
        zs = self.zs
        dl.copy(z, zs)  # z_k: every oracle of the iteration is called there
        idx_h = r.samp_l.draw()
        for j in range(dy):
            _launch(_unit_kernel, n, self.we, dx + j)
            r.lower.hvp(zs, self.we, idx_h, r.h)
            _launch(_stable_column_kernel, n, self.cols, r.h, dx, dy, j)
        first = self.started[0] == 0
        _launch(_stable_average_kernel, self.cols.shape[0], self.work, self.cols, self.tau,
                1 if first else 0)
        if first:
            dl.fill(self.work[0:1], 1.0)
            self.started[0] = 1
        _stable_eig_kernel[1, 1](self.work, self.A, self.V, self.lam, dy, self.floor)
        r.upper.grad(zs, r.samp_u.draw(), r.gf)
        _launch(_vt_solve_kernel, dy, self.t, self.V, r.gf, dx, self.lam)
        _launch(_v_apply_kernel, dy, self.v, self.V, self.t)
        _launch(_stable_upper_kernel, dx, z, r.gf, self.work, self.v, dx, dy, r.alpha_at(k))
        self.project()  # before the correction, which uses x_{k+1} - x_k
        r.lower.grad(zs, r.samp_l.draw(), r.gg)
        _launch(_stable_dx_kernel, dy, self.d, self.work, z, zs, dx, dy)
        _launch(_vt_solve_kernel, dy, self.t, self.V, self.d, 0, self.lam)
        _launch(_v_apply_kernel, dy, self.c, self.V, self.t)
        _launch(_stable_lower_kernel, dy, z, r.gg, self.c, dx, r.beta_at(k))

    def state_work(self):
        return self.work


class _HessianFree(_Method):
    """PZOBO (the CPU ``run_hessian_free``): T recorded lower batches (copied on the device
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
            _launch(_lower_sgd_kernel, r.dy, zz, r.gg, r.dx, beta)

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
        _launch(_normals_kernel, m, self.dirs, s0)
        r.hrng[0] = np.uint64((int(s0) + 2 * m * _GOLDEN_INT) % (1 << 64))
        for q in range(self.nq):
            _launch(_hf_perturb_kernel, n, self.zq, z, self.y0, self.dirs, q * dx, dx,
                    self.mu)
            self._replay(self.zq, batches, beta)            # y_T(x + mu u_q)
            _launch(_hf_delta_kernel, dy, self.deltas, q * dy, self.zq, z, dx, self.mu)
        r.upper.grad(z, r.samp_u.draw(), r.gf)
        _launch(_hf_upper_kernel, dx, z, r.gf, self.dirs, self.deltas, self.nq, dx, dy,
                alpha)
        self.project()

    def state_work(self):
        return np.zeros(0)


class _ValueFunction(_Method):
    """Value-function penalty / primal-dual (the CPU ``_value_function_loop``): yhat is the
    y block of the joint vector zh = (x, yhat) (state), the multiplier a host scalar (the
    host decides the penalty's activity from the value callbacks' host floats anyway)."""

    def __init__(self, r, method):
        super().__init__(r)
        self.dual = method == "primal-dual"
        self.a1, self.a2, rho, self.dual_step, self.eps = (float(a) for a in r.fextra)
        if self.dual:
            rho = float(r.work_host[r.dy])
        self.rho = np.array([rho])
        self.bad = np.zeros(1, dtype=np.int64)
        self.zh = dl.empty(r.n)
        dl.copy(r.z, self.zh)  # yhat starts at y0 (the CPU's work = y0)
        self.gh = dl.empty(r.n)
        self.check = self.zh
        self.saved = (self.zh, self.rho, self.bad)
        self.sc = dl.Scalars(r.counter) if self.a1 != 0.0 else None

    def iteration(self, k):
        r = self.r
        dx, dy, n, z, zh = r.dx, r.dy, r.n, r.z, self.zh
        beta, alpha = r.beta_at(k), r.alpha_at(k)
        dl.copy(z[:dx], zh[:dx])
        for _ in range(r.T):
            r.lower.grad(zh, r.samp_l.draw(), r.gg)
            _launch(_yhat_step_kernel, dy, zh, r.gg, dx, beta, self.a1)
        idx_l = r.samp_l.draw()
        idx_u = r.samp_u.draw()
        r.upper.grad(z, idx_u, r.gf)
        gv = r.lower.value(z, idx_l)
        hv = r.lower.value(zh, idx_l)
        yy = 0.0
        if self.sc is not None:  # |yhat|^2 (one counted read-back)
            self.sc.dot(zh[dx:], zh[dx:], dl.S_AUX)
            yy = float(self.sc.read()[dl.S_AUX])
        c = gv - hv - 0.5 * self.a1 * yy - self.a2
        rho = float(self.rho[0])
        w = rho if (self.dual or c > 0.0) else 0.0
        s = 1.0 / (1.0 + rho)
        if w != 0.0:
            r.lower.grad(z, idx_l, r.gg)
            r.lower.grad(zh, idx_l, self.gh)
        _launch(_vf_step_kernel, n, z, r.gf, r.gg, self.gh, dx, alpha, beta, s, w,
                1 if w != 0.0 else 0)
        self.project()
        if self.dual:
            new = rho + self.dual_step * (c - self.eps)
            if not math.isfinite(new):
                self.bad[0] = 1
            self.rho[0] = new if new > 0.0 else 0.0

    def host_ok(self):
        return self.bad[0] == 0

    def state_work(self):
        out = dl.empty(self.r.dy + (1 if self.dual else 0))
        dl.copy(self.zh[self.r.dx:], out[:self.r.dy])
        if self.dual:
            dl.fill(out[self.r.dy:], float(self.rho[0]))
        return out

    def result(self):
        return {"multiplier": float(self.rho[0])} if self.dual else {}


def build(method, r):
    """The method object for one run; ``r`` holds the driver's run state (z, sizes,
    oracles, samplers, the host SplitMix64 state, the halvable parameters ``par``, the
    schedules ``alpha_at`` / ``beta_at``, T, Q, the CPU setup's ``fextra`` / ``iextra`` /
    ``work_host``, shared work vectors gf, gg, h, the transfer counter)."""
    if method in ("sustain", "mrbo", "vrbo"):
        return _Estimates(r, method)
    if method == "stable":
        return _Stable(r)
    if method == "hessian-free":
        return _HessianFree(r)
    return _ValueFunction(r, method)
