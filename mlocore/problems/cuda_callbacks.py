"""Device callbacks of the problem library (CUDA backend, "one large problem" mode).

The deterministic quadratic of :mod:`mlocore.problems.quadratic` and the logistic
hyperparameter problem of :mod:`mlocore.problems.logistic`, as
:class:`mlocore.cuda.DeviceObjective` callbacks (``grad(z, out, *args)``,
``hvp(z, v, out, *args)``, ``value(z, *args)``) with the same formulas and, where the
summation is sequential on the CPU, the same order of operations (one thread per output
entry). Builders put the data on the device once:

    quadratic_device_problem(q)   # q = make_quadratic(...): the means of q.problem
    logistic_device_problem(lh)   # lh = make_logistic(...): the data of lh.problem

Value callbacks reduce on the device and read back one scalar (not counted in any
``transfers``: a value callback has no counter; the solvers call it once per hypergradient).
"""
from __future__ import annotations

import math

import numpy as _np
from numba import cuda
from numba import float64 as _float64

from ..cuda import _linalg as dl
from ..cuda._device import Transfers
from ..cuda._problem import DeviceBilevelProblem, DeviceObjective
from .cleaning import probs_source, project_row_source

__all__ = ["quad_grad_device", "quad_hvp_device", "quad_value_device",
           "quad_grad_x_device", "quad_grad_y_device", "quad_hvp_yy_device",
           "quad_hvp_xy_device",
           "logistic_lower_grad_device", "logistic_lower_hvp_device",
           "logistic_lower_value_device", "logistic_upper_grad_device",
           "logistic_upper_hvp_device", "logistic_upper_value_device",
           "logistic_lower_grad_y_device", "logistic_lower_hvp_yy_device",
           "logistic_lower_hvp_xy_device", "logistic_upper_grad_x_device",
           "logistic_upper_grad_y_device",
           "quadratic_device_problem", "logistic_device_problem"]

_TPB = dl.THREADS_PER_BLOCK


def _launch(kernel, n, *args):
    kernel[dl.grid_for(n), _TPB](*args)


def _reduce_to_host(terms) -> float:
    scalars = dl.Scalars(Transfers())
    scalars.sum(terms, dl.S_AUX)
    return float(scalars.read()[dl.S_AUX])


# ---------------------------------------------------------------------------------------
# Quadratic: phi(x, y) = y.A y/2 + x.B x/2 + x.C y + a.y + b.x, z = (x, y); args (A,B,C,a,b)
# ---------------------------------------------------------------------------------------
@cuda.jit
def _quad_affine_kernel(z, A, B, C, a, b, lin, first, out):
    """Entries ``first .. first + len(out)`` of ``(B x + C y + lin b, A y + C^T x + lin a)``
    for z = (x, y) (all of them with first = 0 and out of size dx + dy; the x block or the
    y block for the block oracles): the CPU ``_quad_affine`` with its summation order, one
    thread per entry.

    A and B are Hessian blocks, symmetric (the quadratic family builds them so): thread q
    reads column q of A (``A[r, q]`` = ``A[q, r]``), so that the threads of a warp read
    consecutive addresses (coalesced) instead of rows dy apart."""
    dx = B.shape[0]
    dy = A.shape[0]
    for e in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        i = first + e
        if i < dx:
            s = lin * b[i]
            for q in range(dx):
                s += B[i, q] * z[q]
            for q in range(dy):
                s += C[i, q] * z[dx + q]
        else:
            q = i - dx
            s = lin * a[q]
            for r in range(dy):
                s += A[r, q] * z[dx + r]
            for p in range(dx):
                s += C[p, q] * z[p]
        out[e] = s


@cuda.jit
def _quad_block_kernel(M, v, by_column, out):
    """``out = M^T v`` (by_column; ``= A v`` for the symmetric A, thread q reading column q,
    coalesced) or ``out = M v``: one mat-vec, the y-block (``A v``) or the x-block
    (``C v``) of the joint product with direction (0, v) in its summation order."""
    for p in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        s = 0.0
        for q in range(v.shape[0]):
            if by_column:
                s += M[q, p] * v[q]
            else:
                s += M[p, q] * v[q]
        out[p] = s


@cuda.jit
def _quad_value_terms_kernel(z, A, B, C, a, b, terms):
    """Per-entry terms of the CPU ``quad_value`` (their sum is the value)."""
    dx = B.shape[0]
    dy = A.shape[0]
    for i in range(cuda.grid(1), dx + dy, cuda.gridsize(1)):
        if i < dx:
            xp = z[i]
            t = 0.5 * B[i, i] * xp + b[i]
            for q in range(i + 1, dx):
                t += B[i, q] * z[q]
            for q in range(dy):
                t += C[i, q] * z[dx + q]
            terms[i] = xp * t
        else:
            q = i - dx
            yq = z[i]
            t = 0.5 * A[q, q] * yq + a[q]
            for r in range(q + 1, dy):
                t += A[r, q] * z[dx + r]
            terms[i] = yq * t


def quad_grad_device(z, out, A, B, C, a, b):
    """Gradient over z = (x, y) of y.A y/2 + x.B x/2 + x.C y + a.y + b.x, into out."""
    _launch(_quad_affine_kernel, out.shape[0], z, A, B, C, a, b, 1.0, 0, out)


def quad_hvp_device(z, v, out, A, B, C, a, b):
    """Hessian [[B, C], [C^T, A]] times v, into out (independent of z)."""
    _launch(_quad_affine_kernel, out.shape[0], v, A, B, C, a, b, 0.0, 0, out)


def quad_grad_x_device(z, out, A, B, C, a, b):
    """Block oracle ``grad_x = B x + C y + b`` (dx threads), into out."""
    _launch(_quad_affine_kernel, out.shape[0], z, A, B, C, a, b, 1.0, 0, out)


def quad_grad_y_device(z, out, A, B, C, a, b):
    """Block oracle ``grad_y = A y + C^T x + a`` (dy threads), into out."""
    _launch(_quad_affine_kernel, out.shape[0], z, A, B, C, a, b, 1.0, B.shape[0], out)


def quad_hvp_yy_device(z, v, out, A, B, C, a, b):
    """Block oracle ``H_yy v = A v``: one mat-vec (the joint product makes all of
    ``[[B, C], [C^T, A]] (0, v)``)."""
    _launch(_quad_block_kernel, out.shape[0], A, v, True, out)


def quad_hvp_xy_device(z, v, out, A, B, C, a, b):
    """Block oracle ``H_xy v = C v``: one mat-vec."""
    _launch(_quad_block_kernel, out.shape[0], C, v, False, out)


def quad_value_device(z, A, B, C, a, b):
    """y.A y/2 + x.B x/2 + x.C y + a.y + b.x (one scalar read back)."""
    terms = dl.empty(z.shape[0])
    _launch(_quad_value_terms_kernel, z.shape[0], z, A, B, C, a, b, terms)
    return _reduce_to_host(terms)


def quadratic_device_problem(q):
    """The deterministic :class:`~mlocore.problems.quadratic.QuadraticBilevel` ``q.problem``
    as a :class:`~mlocore.cuda.DeviceBilevelProblem` (its mean matrices copied to the device
    once: ten host -> device copies, in ``problem.transfers``), with the block oracles of
    the CPU problem: upper ``grad_x``, ``grad_y``; lower ``grad_y``, ``hvp_yy``, ``hvp_xy``."""
    def objective(means, **blocks):
        return DeviceObjective(quad_grad_device, hvp=quad_hvp_device, value=quad_value_device,
                               args=tuple(means), **blocks)
    return DeviceBilevelProblem(
        objective(q.upper_means, grad_x=quad_grad_x_device, grad_y=quad_grad_y_device),
        objective(q.lower_means, grad_y=quad_grad_y_device, hvp_yy=quad_hvp_yy_device,
                  hvp_xy=quad_hvp_xy_device),
        dims=(q.dx, q.dy))


# ---------------------------------------------------------------------------------------
# Logistic: z = (lam, w); args (X, t, work) with work a device vector of length n_samples
# ---------------------------------------------------------------------------------------
_GRAD, _HVP, _VALUE = 0, 1, 2          # per-sample quantity
_HVP_YY, _HVP_XY = 3, 4               # block products (direction v_y of size dy)
_NO_PENALTY, _PENALTY_GRAD, _PENALTY_HVP, _PENALTY_HVP_YY = 0, 1, 2, 3


@cuda.jit(device=True)
def _sigmoid(m):
    if m >= 0.0:
        return 1.0 / (1.0 + math.exp(-m))
    e = math.exp(m)
    return e / (1.0 + e)


@cuda.jit(device=True)
def _softplus(m):
    if m > 0.0:
        return m + math.log1p(math.exp(-m))
    return math.log1p(math.exp(m))


@cuda.jit
def _logistic_samples_kernel(X, t, z, v, voff, quantity, work):
    """Per sample i, with m_i = X_i . w: ``(s_i - t_i) / n`` (gradient), ``s_i (1 - s_i)
    (X_i . v_w) / n`` (Hessian product; ``v_w = v[voff:voff + d]``) or ``softplus(m_i) -
    t_i m_i`` (value)."""
    n, d = X.shape
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        m = 0.0
        for j in range(d):
            m += X[i, j] * z[d + j]
        if quantity == _GRAD:
            work[i] = (_sigmoid(m) - t[i]) / n
        elif quantity == _HVP:
            s = _sigmoid(m)
            xv = 0.0
            for j in range(d):
                xv += X[i, j] * v[voff + j]
            work[i] = s * (1.0 - s) * xv / n
        else:
            work[i] = _softplus(m) - t[i] * m


@cuda.jit
def _logistic_features_kernel(X, z, v, work, penalty, first, out):
    """Entries ``first .. first + len(out)`` of z = (lam, w) (all, or the w block with
    first = d): ``X^T work`` on the w block, plus the penalty ``1/2 sum_j exp(lam_j)
    w_j^2``'s gradient, Hessian product, H_ww product (v = v_w of size d) or nothing."""
    n, d = X.shape
    for o in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        k = first + o
        j = k % d
        e = math.exp(z[j]) if penalty != _NO_PENALTY else 0.0
        w = z[d + j]
        if k < d:
            if penalty == _PENALTY_GRAD:
                out[o] = 0.5 * e * w * w
            elif penalty == _PENALTY_HVP:
                out[o] = 0.5 * e * w * w * v[j] + e * w * v[d + j]
            else:
                out[o] = 0.0
        else:
            s = 0.0
            for i in range(n):
                s += work[i] * X[i, j]
            if penalty == _PENALTY_GRAD:
                s += e * w
            elif penalty == _PENALTY_HVP:
                s += e * w * v[j] + e * v[d + j]
            elif penalty == _PENALTY_HVP_YY:
                s += e * v[j]
            out[o] = s


@cuda.jit
def _logistic_xy_kernel(z, v, d, out):
    """``out = exp(lam) * w * v`` (H_lam,w v: diagonal, no pass over the data)."""
    for j in range(cuda.grid(1), d, cuda.gridsize(1)):
        out[j] = math.exp(z[j]) * z[d + j] * v[j]


def _logistic_apply(z, v, out, X, t, work, quantity, penalty, first=0):
    """Per-sample pass, then the entries of out (from entry ``first`` of z on); a direction
    v of size dy (block products, ``first = d``) is read from 0, a joint one from d."""
    d = X.shape[1]
    voff = 0 if v.shape[0] == d else d
    _launch(_logistic_samples_kernel, X.shape[0], X, t, z, v, voff, quantity, work)
    _launch(_logistic_features_kernel, out.shape[0], X, z, v, work, penalty, first, out)


def logistic_lower_grad_device(z, out, X, t, work):
    """Gradient over z = (lam, w) of the training log-loss + 1/2 sum_j exp(lam_j) w_j^2."""
    _logistic_apply(z, z, out, X, t, work, _GRAD, _PENALTY_GRAD)


def logistic_lower_hvp_device(z, v, out, X, t, work):
    """Hessian of the lower objective over z = (lam, w) times v (cross terms included)."""
    _logistic_apply(z, v, out, X, t, work, _HVP, _PENALTY_HVP)


def logistic_lower_grad_y_device(z, out, X, t, work):
    """Block oracle: the w-block of :func:`logistic_lower_grad_device` (d threads after the
    per-sample pass)."""
    _logistic_apply(z, z, out, X, t, work, _GRAD, _PENALTY_GRAD, X.shape[1])


def logistic_lower_hvp_yy_device(z, v, out, X, t, work):
    """Block oracle: ``H_ww v = X^T D X v / n + exp(lam) * v`` (v of size d)."""
    _logistic_apply(z, v, out, X, t, work, _HVP, _PENALTY_HVP_YY, X.shape[1])


def logistic_lower_hvp_xy_device(z, v, out, X, t, work):
    """Block oracle: ``H_lam,w v = exp(lam) * w * v`` (one pass over d entries, no data)."""
    _launch(_logistic_xy_kernel, out.shape[0], z, v, X.shape[1], out)


def logistic_upper_grad_x_device(z, out, X, t, work):
    """Block oracle: the validation loss does not depend on lam (zeros)."""
    dl.fill(out, 0.0)


def logistic_upper_grad_y_device(z, out, X, t, work):
    """Block oracle: gradient of the validation log-loss over w."""
    _logistic_apply(z, z, out, X, t, work, _GRAD, _NO_PENALTY, X.shape[1])


def logistic_upper_grad_device(z, out, X, t, work):
    """Gradient over z of the validation log-loss (zero on lam)."""
    _logistic_apply(z, z, out, X, t, work, _GRAD, _NO_PENALTY)


def logistic_upper_hvp_device(z, v, out, X, t, work):
    """Hessian of the validation log-loss over z times v."""
    _logistic_apply(z, v, out, X, t, work, _HVP, _NO_PENALTY)


def _mean_log_loss(z, X, t, work):
    _launch(_logistic_samples_kernel, X.shape[0], X, t, z, z, 0, _VALUE, work)
    return _reduce_to_host(work) / X.shape[0]


@cuda.jit
def _penalty_terms_kernel(z, d, terms):
    for j in range(cuda.grid(1), d, cuda.gridsize(1)):
        w = z[d + j]
        terms[j] = math.exp(z[j]) * w * w


def logistic_upper_value_device(z, X, t, work):
    """Validation log-loss (one scalar read back)."""
    return _mean_log_loss(z, X, t, work)


def logistic_lower_value_device(z, X, t, work):
    """Training log-loss plus 1/2 sum_j exp(lam_j) w_j^2 (two scalars read back)."""
    d = X.shape[1]
    terms = dl.empty(d)
    _launch(_penalty_terms_kernel, d, z, d, terms)
    return _mean_log_loss(z, X, t, work) + 0.5 * _reduce_to_host(terms)


def logistic_device_problem(lh):
    """The deterministic :class:`~mlocore.problems.logistic.LogisticHyperparameter`
    ``lh.problem`` as a :class:`~mlocore.cuda.DeviceBilevelProblem` (training and validation
    data copied to the device once: four host -> device copies, in ``problem.transfers``;
    plus one work vector per level, allocated on the device), with the block oracles of the
    CPU problem: upper ``grad_x``, ``grad_y``; lower ``grad_y``, ``hvp_yy``, ``hvp_xy``."""
    def objective(grad, hvp, value, X, t, **blocks):
        return DeviceObjective(grad, hvp=hvp, value=value,
                               args=(X, t, dl.empty(X.shape[0])), **blocks)
    d = lh.n_features
    return DeviceBilevelProblem(
        upper=objective(logistic_upper_grad_device, logistic_upper_hvp_device,
                        logistic_upper_value_device, lh.X_val, lh.t_val,
                        grad_x=logistic_upper_grad_x_device,
                        grad_y=logistic_upper_grad_y_device),
        lower=objective(logistic_lower_grad_device, logistic_lower_hvp_device,
                        logistic_lower_value_device, lh.X_train, lh.t_train,
                        grad_y=logistic_lower_grad_y_device,
                        hvp_yy=logistic_lower_hvp_yy_device,
                        hvp_xy=logistic_lower_hvp_xy_device),
        dims=(d, d))


# ---------------------------------------------------------------------------------------
# Data cleaning (mlocore.problems.cleaning): z = (x, W), x one logit per training sample,
# W (p, K) row-major; args (A, t, n_classes, ridge, C, work) with C an (m, K) device matrix
# and work a device vector of length m (m samples of the level), both scratch space.
# ---------------------------------------------------------------------------------------
__all__ += ["cleaning_lower_grad_device", "cleaning_lower_hvp_device",
            "cleaning_lower_grad_y_device", "cleaning_lower_hvp_yy_device",
            "cleaning_lower_hvp_xy_device",
            "cleaning_lower_value_device", "cleaning_upper_grad_device",
            "cleaning_upper_hvp_device", "cleaning_upper_value_device",
            "cleaning_device_problem", "CLEANING_MAX_CLASSES"]

#: most classes the data-cleaning kernels support (size of their per-thread local arrays)
CLEANING_MAX_CLASSES = 64
_LOWER, _UPPER = 0, 1


# the CPU's per-sample operations, compiled from the same source as device functions
_softmax_ce = cuda.jit(device=True)(probs_source)
_project_row_device = cuda.jit(device=True)(project_row_source)


@cuda.jit
def _cleaning_samples_kernel(z, v, A, t, K, off, level, quantity, C, work):
    """One thread per sample i of the level: the per-sample part of the CPU callbacks.

    ``C[i, :]`` gets the coefficient vector c_i whose outer product with a_i the CPU adds to
    the W block (gradient: ``s_i (p_i - e_t)``, Hessian product: ``s_i S_i u_i`` plus the
    cross term); ``work[i]`` the sample's x-block term (lower level) or value term. Upper
    level: ``s_i = 1`` and no x-block term. The lower block products take a direction
    ``v = v_W`` of size dy: ``_HVP_YY`` fills C only (``s_i S_i u_i``), ``_HVP_XY`` work
    only (``s'_i <g_i, u_i>``).
    """
    m = A.shape[0]
    p = cuda.local.array(CLEANING_MAX_CLASSES, _float64)
    u = cuda.local.array(CLEANING_MAX_CLASSES, _float64)
    for i in range(cuda.grid(1), m, cuda.gridsize(1)):
        ti = int(t[i])
        ce = _softmax_ce(z, off, A, i, ti, K, p)
        s = _sigmoid(z[i]) if level == _LOWER else 1.0
        if quantity == _VALUE:
            work[i] = s * ce if level == _LOWER else ce
        elif quantity == _GRAD:
            p[ti] -= 1.0
            if level == _LOWER:
                work[i] = s * (1.0 - s) * ce
                for k in range(K):
                    C[i, k] = p[k] * s
            else:
                for k in range(K):
                    C[i, k] = p[k]
        elif quantity == _HVP_YY or quantity == _HVP_XY:
            _project_row_device(v, 0, A, i, K, u)
            pu = 0.0
            for k in range(K):
                pu += p[k] * u[k]
            if quantity == _HVP_XY:
                work[i] = s * (1.0 - s) * (pu - u[ti])
            else:
                for k in range(K):
                    C[i, k] = s * p[k] * (u[k] - pu)
        else:
            _project_row_device(v, off, A, i, K, u)
            pu = 0.0
            for k in range(K):
                pu += p[k] * u[k]
            if level == _LOWER:
                s1 = s * (1.0 - s)
                s2 = s1 * (1.0 - 2.0 * s)
                gu = pu - u[ti]
                vi = v[i]
                work[i] = s2 * ce * vi + s1 * gu
                for k in range(K):
                    C[i, k] = s * p[k] * (u[k] - pu) + s1 * vi * p[k]
                C[i, ti] -= s1 * vi
            else:
                for k in range(K):
                    C[i, k] = p[k] * (u[k] - pu)


@cuda.jit
def _cleaning_features_kernel(A, K, off, level, vec, vbase, C, work, ridge, first, out):
    """One thread per entry ``first .. first + len(out)`` of z = (x, W) (all of them, the x
    block or the W block): ``W block = (sum_i a_i c_i^T) / m`` (samples in order, as the
    CPU) plus, on the lower level, ``ridge * vec``; x block = ``work / m`` (lower) or
    ``ridge * vec`` (upper; vec is z for the gradient, v for the product; entry e of z
    reads ``vec[e - vbase]``: vbase = off for a direction v_W of size dy)."""
    m = A.shape[0]
    scale = 1.0 / m
    for o in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        e = first + o
        if e < off:
            if level == _LOWER:
                out[o] = work[e] * scale
            else:
                out[o] = ridge * vec[e - vbase]
        else:
            q = e - off
            j = q // K
            k = q - j * K
            s = 0.0
            for i in range(m):
                a = A[i, j]
                if a != 0.0:
                    s += a * C[i, k]
            if level == _LOWER:
                out[o] = s * scale + ridge * vec[e - vbase]
            else:
                out[o] = s * scale


def _cleaning_offset(z, A, n_classes):
    return z.shape[0] - A.shape[1] * n_classes


def _cleaning_apply(z, v, out, A, t, n_classes, ridge, C, work, level, quantity, first=0):
    """Per-sample pass, then the entries of out from entry ``first`` of z on (0: all; off:
    the W block); block products take a direction of size dy."""
    off = _cleaning_offset(z, A, n_classes)
    _launch(_cleaning_samples_kernel, A.shape[0], z, v, A, t, n_classes, off, level,
            quantity, C, work)
    block = quantity in (_HVP_YY, _HVP_XY)
    _launch(_cleaning_features_kernel, out.shape[0], A, n_classes, off, level,
            z if quantity == _GRAD else v, off if block else 0, C, work, float(ridge),
            first, out)


def cleaning_lower_grad_device(z, out, A, t, n_classes, reg, C, work):
    """Gradient over z = (x, W) of mean_i sigmoid(x_i) CE(W; a_i, t_i) + reg/2 |W|^2 (the
    CPU :func:`~mlocore.problems.cleaning.cleaning_lower_grad` over all samples)."""
    _cleaning_apply(z, z, out, A, t, n_classes, reg, C, work, _LOWER, _GRAD)


def cleaning_lower_hvp_device(z, v, out, A, t, n_classes, reg, C, work):
    """Hessian of the lower data-cleaning objective over z times v (all blocks)."""
    _cleaning_apply(z, v, out, A, t, n_classes, reg, C, work, _LOWER, _HVP)


def cleaning_lower_grad_y_device(z, out, A, t, n_classes, reg, C, work):
    """Block oracle: the W-block of :func:`cleaning_lower_grad_device` (no x-block pass)."""
    _cleaning_apply(z, z, out, A, t, n_classes, reg, C, work, _LOWER, _GRAD,
                    _cleaning_offset(z, A, n_classes))


def cleaning_lower_hvp_yy_device(z, v, out, A, t, n_classes, reg, C, work):
    """Block oracle: ``H_WW v = sum_i s_i (a_i a_i^T kron S_i) v / m + reg v`` (v of size
    d K; no cross terms, no x-block pass)."""
    _cleaning_apply(z, v, out, A, t, n_classes, reg, C, work, _LOWER, _HVP_YY,
                    _cleaning_offset(z, A, n_classes))


def cleaning_lower_hvp_xy_device(z, v, out, A, t, n_classes, reg, C, work):
    """Block oracle: ``(H_xW v)_i = s'_i <g_i, V^T a_i> / m`` (one thread per sample, then
    the x block only: no pass over the W block)."""
    _cleaning_apply(z, v, out, A, t, n_classes, reg, C, work, _LOWER, _HVP_XY)


def cleaning_upper_grad_device(z, out, A, t, n_classes, upper_reg, C, work):
    """Gradient over z of the validation cross-entropy + upper_reg/2 |x|^2."""
    _cleaning_apply(z, z, out, A, t, n_classes, upper_reg, C, work, _UPPER, _GRAD)


def cleaning_upper_hvp_device(z, v, out, A, t, n_classes, upper_reg, C, work):
    """Hessian of the upper data-cleaning objective over z times v."""
    _cleaning_apply(z, v, out, A, t, n_classes, upper_reg, C, work, _UPPER, _HVP)


def _sq_norm_to_host(a) -> float:
    scalars = dl.Scalars(Transfers())
    scalars.dot(a, a, dl.S_AUX)
    return float(scalars.read()[dl.S_AUX])


def _cleaning_value(z, A, t, n_classes, ridge, C, work, level):
    off = _cleaning_offset(z, A, n_classes)
    _launch(_cleaning_samples_kernel, A.shape[0], z, z, A, t, n_classes, off, level, _VALUE,
            C, work)
    ridged = z[off:] if level == _LOWER else z[:off]
    return _reduce_to_host(work) / A.shape[0] + 0.5 * ridge * _sq_norm_to_host(ridged)


def cleaning_lower_value_device(z, A, t, n_classes, reg, C, work):
    """mean_i sigmoid(x_i) CE(W; a_i, t_i) + reg/2 |W|^2 (two scalars read back)."""
    return _cleaning_value(z, A, t, n_classes, reg, C, work, _LOWER)


def cleaning_upper_value_device(z, A, t, n_classes, upper_reg, C, work):
    """mean_j CE(W; a_j, t_j) over the validation set + upper_reg/2 |x|^2 (two scalars read
    back)."""
    return _cleaning_value(z, A, t, n_classes, upper_reg, C, work, _UPPER)


def cleaning_device_problem(dc):
    """The full-batch :class:`~mlocore.problems.cleaning.DataCleaning` ``dc.problem`` as a
    :class:`~mlocore.cuda.DeviceBilevelProblem` (docs/mathematics.md section 1 applies: the ridge
    ``reg > 0`` makes the lower level strongly convex in W).

    Training and validation features and labels are copied to the device once (four host ->
    device copies, in ``problem.transfers``; labels travel as float64 and are read back to
    integers in the kernels); each level also gets its scratch space (an ``(m, K)`` matrix
    and a length-m vector, m its number of samples), allocated on the device. The callbacks
    reproduce the CPU ones over all samples, in the same order of operations per entry
    (values: the sample sum is a tree reduction). The lower objective has the CPU problem's
    block oracles (``grad_y``, ``hvp_yy``, ``hvp_xy``).

    Raises
    ------
    ValueError
        When ``dc.n_classes`` exceeds :data:`CLEANING_MAX_CLASSES` (the kernels' per-thread
        arrays have a fixed size).
    """
    K = int(dc.n_classes)
    if K > CLEANING_MAX_CLASSES:
        raise ValueError(f"cleaning_device_problem supports at most {CLEANING_MAX_CLASSES} "
                         f"classes (per-thread arrays of fixed size), got n_classes={K}")

    def objective(grad, hvp, value, A, t, ridge, **blocks):
        m = A.shape[0]
        C = cuda.device_array((m, K), dtype=_np.float64)
        return DeviceObjective(grad, hvp=hvp, value=value,
                               args=(A, t, K, float(ridge), C, dl.empty(m)), **blocks)
    return DeviceBilevelProblem(
        upper=objective(cleaning_upper_grad_device, cleaning_upper_hvp_device,
                        cleaning_upper_value_device, dc.A_val, dc.t_val, dc.upper_reg),
        lower=objective(cleaning_lower_grad_device, cleaning_lower_hvp_device,
                        cleaning_lower_value_device, dc.A_train, dc.t_train, dc.reg,
                        grad_y=cleaning_lower_grad_y_device,
                        hvp_yy=cleaning_lower_hvp_yy_device,
                        hvp_xy=cleaning_lower_hvp_xy_device),
        dims=(dc.dx, dc.dy))
