"""STABLE (Chen, Sun & Yin 2022, "A single-timescale method for stochastic bilevel
optimization", AISTATS): single-timescale steps with averaged dense Hessian estimates and
a corrected lower step.

At ``z_k = (x_k, y_k)`` (Hessian batch phi_k, upper batch zeta, lower batch xi)::

    H^k    = (1 - tau) H^{k-1} + tau Hhat(z_k; phi_k)    (H^0 = Hhat(z_0; phi_0))
    H_yy^k <- projection of H_yy^k onto {H >= mu I}       (eigenvalue clipping)
    h_k    = grad_x f(z_k; zeta) - H_xy^k (H_yy^k)^{-1} grad_y f(z_k; zeta)
    x_{k+1} = P(x_k - alpha_k h_k)
    y_{k+1} = y_k - beta_k grad_y g(z_k; xi) - (H_yy^k)^{-1} H_yx^k (x_{k+1} - x_k)

Defaults: constant steps (the paper's ``alpha, beta ~ 1/sqrt(K)`` are constant over a
horizon K), ``tau = 0.1``, ``hessian_floor = 1e-3 L_g``. Only the Hessians are averaged:
the upper gradient noise is that of SGD, so with constant steps x ends in an SGD noise
ball; pass ``step=Schedule(a, 0.5, 100)`` for a decaying step.

From the paper: the update and constant steps; chosen by measurement: ``0.5/L_F``,
``1/L_g``, tau, the floor, and the tail average of the last half (``average=0.5``, Polyak &
Juditsky 1992; not in the paper), which removes most of that noise ball: on
``make_quadratic(5, 10)`` (batch 16, 3000 iterations, seeds 0-2;
benchmarks/stochastic_defaults.py) the relative distance to x* went from 0.09-0.27 (last
iterate) to 0.014-0.025.

``fpar = [..., tau, hessian_floor]``; ``work = [started, H_yy (dy*dy, row major), H_xy
(dx*dy, row major)]``. On the device the eigendecomposition runs in one thread (cyclic
Jacobi, ``O(dy^3)`` per sweep: meant for moderate dy, as STABLE itself is).
"""
import math

import numpy as np
from numba import njit

from .._validation import check_positive
from ._device import DeviceMethod, cuda, dl, launch
from ._sampling import (ALPHA0, BETA0, DIVERGED, N_FPAR, OK, draw, finite, joint_into,
                        lower_cross, lower_grad_y, step_at, upper_grad, upper_step)
from ._spec import MethodSpec

#: STABLE's default Hessian averaging weight (see :func:`_setup_stable`).
STABLE_TAU = 0.1
#: STABLE's default eigenvalue floor, relative to the lower Lipschitz estimate L_g.
STABLE_FLOOR_REL = 1e-3
# method parameter slots
STABLE_TAU_SLOT, STABLE_FLOOR_SLOT = N_FPAR, N_FPAR + 1

_JACOBI_SWEEPS = 60


@njit(cache=True)
def run_stable(ufns, uargs, lfns, largs, uflags, lflags, x, y, work, fpar, ipar, samp_u,
               samp_l, rng, proj, k0, n_iter, counts):
    """STABLE (Chen, Sun & Yin 2022): single-timescale steps with dense Hessian estimates.

    At ``z_k = (x_k, y_k)``::

        H^k    = (1 - tau) H^{k-1} + tau Hhat(z_k; phi_k)    (H^0 = Hhat(z_0; phi_0))
        H_yy^k <- projection of H_yy^k onto {H >= mu I}       (eigenvalue clipping)
        h_k    = grad_x f(z_k; zeta) - H_xy^k (H_yy^k)^{-1} grad_y f(z_k; zeta)
        x_{k+1} = P(x_k - alpha_k h_k)
        y_{k+1} = y_k - beta_k grad_y g(z_k; xi) - (H_yy^k)^{-1} H_yx^k (x_{k+1} - x_k)

    ``Hhat`` is built column by column from dy lower HVPs with directions ``(0, e_j)`` on
    one minibatch phi_k; ``H_yx = H_xy^T``. ``tau = fpar[N_FPAR]``, ``mu = fpar[N_FPAR+1]``.

    Notes
    -----
    The correction is the first-order change of the lower solution, ``dy* = -H_yy^{-1}
    H_yx dx``, and is not multiplied by beta (the lecture's Algorithm 6 writes it inside
    the beta bracket; Algorithm 5 and the paper do not scale it). The paper updates the
    Hessian estimates with a STORM-type correction ``(1 - tau)(H^{k-1} - Hhat(z_{k-1};
    phi_k)) + Hhat(z_k; phi_k)``; this is the plain moving average (the two coincide when
    the Hessians do not depend on z, e.g. on quadratics). Assumes a lower objective that is
    strongly convex in y near the iterates (the floor mu keeps the estimate invertible) and
    Lipschitz second derivatives. Cost per iteration: dy lower HVPs on one minibatch (so
    STABLE is meant for moderate dy), one lower and one upper minibatch gradient, one
    dy x dy symmetric eigendecomposition, O(dy^2 + dx dy) memory.
    """
    dx = x.shape[0]
    dy = y.shape[0]
    z = np.empty(dx + dy)
    tau = fpar[STABLE_TAU_SLOT]
    mu = fpar[STABLE_FLOOR_SLOT]
    Hyy = work[1:1 + dy * dy].reshape((dy, dy))
    Hxy = work[1 + dy * dy:1 + dy * dy + dx * dy].reshape((dx, dy))
    e = np.zeros(dy)
    hy_col = np.empty((dy, dy))
    hx_col = np.empty((dx, dy))
    xold = np.empty(dx)
    for it in range(n_iter):
        k = k0 + it
        joint_into(z, x, y)
        # minibatch Hessian blocks, one column per HVP
        idx_h, _ = draw(samp_l, rng)
        for j in range(dy):
            e[j] = 1.0
            hx, hy = lower_cross(lfns, largs, lflags, z, e, dx, idx_h, counts)
            e[j] = 0.0
            hy_col[:, j] = hy
            hx_col[:, j] = hx
        if work[0] == 0.0:
            Hyy[:, :] = hy_col
            Hxy[:, :] = hx_col
            work[0] = 1.0
        else:
            for i in range(dy):
                for j in range(dy):
                    Hyy[i, j] = (1.0 - tau) * Hyy[i, j] + tau * hy_col[i, j]
            for i in range(dx):
                for j in range(dy):
                    Hxy[i, j] = (1.0 - tau) * Hxy[i, j] + tau * hx_col[i, j]
        # symmetrize and clip the spectrum of H_yy at mu
        S = 0.5 * (Hyy + Hyy.T)
        if not finite(S.ravel()):
            return DIVERGED, it
        lam, V = np.linalg.eigh(S)
        for i in range(dy):
            if lam[i] < mu:
                lam[i] = mu
        Hyy[:, :] = (V * lam) @ V.T
        # upper step
        idx_u, _ = draw(samp_u, rng)
        gf = upper_grad(ufns, uargs, uflags, z, dx, idx_u, counts)
        v = V @ ((V.T @ gf[dx:]) / lam)
        h = gf[:dx] - Hxy @ v
        xold[:] = x
        upper_step(x, h, step_at(fpar, ALPHA0, k), proj)
        # lower step with the correction -(H_yy)^{-1} H_yx (x_{k+1} - x_k)
        idx_g, _ = draw(samp_l, rng)
        gg = lower_grad_y(lfns, largs, lflags, z, dx, idx_g, counts)
        c = V @ ((V.T @ (Hxy.T @ (x - xold))) / lam)
        beta = step_at(fpar, BETA0, k)
        for i in range(dy):
            y[i] -= beta * gg[i] + c[i]
        if not (finite(x) and finite(y)):
            return DIVERGED, it
    return OK, n_iter


def _setup_stable(ctx, opts):
    """STABLE: ``work = [started, H_yy, H_xy]``; ``fpar += [tau, hessian_floor]``.

    tau = 0.1 averages the minibatch Hessians over about 1/tau = 10 iterations: the Hessian
    noise (which biases ``H^{-1} grad_y f``, the inverse being nonlinear) drops by a factor
    ``tau / (2 - tau)`` ~ 1/19 in variance, while the lag (about 1/tau iterations) stays far
    below the upper level's time scale ``1 / (alpha mu_F)`` for the default steps.
    """
    tau = check_positive("tau", opts["tau"])
    if tau > 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    floor = opts["hessian_floor"]
    if floor is None:
        floor = STABLE_FLOOR_REL * ctx.lipschitz("lower")
    floor = check_positive("hessian_floor", floor)
    work = np.zeros(1 + ctx.dy * ctx.dy + ctx.dx * ctx.dy)
    return work, [tau, floor], []



# Device loop ---------------------------------------------------------------------------
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


class DeviceStable(DeviceMethod):
    """:func:`run_stable` on the device: ``work = [started, H_yy (dy x dy), H_xy (dx x
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
            launch(_unit_kernel, n, self.we, dx + j)
            r.lower.hvp(zs, self.we, idx_h, r.h)
            launch(_stable_column_kernel, n, self.cols, r.h, dx, dy, j)
        first = self.started[0] == 0
        launch(_stable_average_kernel, self.cols.shape[0], self.work, self.cols, self.tau,
                1 if first else 0)
        if first:
            dl.fill(self.work[0:1], 1.0)
            self.started[0] = 1
        _stable_eig_kernel[1, 1](self.work, self.A, self.V, self.lam, dy, self.floor)
        r.upper.grad(zs, r.samp_u.draw(), r.gf)
        launch(_vt_solve_kernel, dy, self.t, self.V, r.gf, dx, self.lam)
        launch(_v_apply_kernel, dy, self.v, self.V, self.t)
        launch(_stable_upper_kernel, dx, z, r.gf, self.work, self.v, dx, dy, r.alpha_at(k))
        self.project()  # before the correction, which uses x_{k+1} - x_k
        r.lower.grad(zs, r.samp_l.draw(), r.gg)
        launch(_stable_dx_kernel, dy, self.d, self.work, z, zs, dx, dy)
        launch(_vt_solve_kernel, dy, self.t, self.V, self.d, 0, self.lam)
        launch(_v_apply_kernel, dy, self.c, self.V, self.t)
        launch(_stable_lower_kernel, dy, z, r.gg, self.c, dx, r.beta_at(k))

    def state_work(self):
        return self.work


SPEC = MethodSpec(
    run_stable, uses=(), options={"tau": STABLE_TAU, "hessian_floor": None},
    setup=_setup_stable,
    doc="Chen, Sun & Yin 2022: averaged dense Hessians, corrected lower step",
    device=DeviceStable)
