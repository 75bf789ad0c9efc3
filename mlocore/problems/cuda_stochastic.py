"""Device minibatch callbacks of the stochastic quadratic (CUDA backend, large-problem mode).

The per-sample quadratic of :mod:`mlocore.problems.quadratic` (docs/mathematics.md section 4,
benchopt's ``simulated``),

    phi_i(x, y) = y.A_i y / 2 + x.B_i x / 2 + x.C_i y + a_i.y + b_i.x,
    A_i = u_i u_i^T + ridge I,   B_i = w_i w_i^T + ridge I,

as :class:`mlocore.cuda.DeviceObjective` callbacks with ``n_samples``: they take a device
int64 index array right after the vectors and return the *mean* over the samples in idx plus
the ridge term, exactly as ``quad_sample_grad/hvp/value`` do on the CPU::

    quad_sample_grad_device(z, idx, out, U, W, C, a, b, ridge)
    quad_sample_hvp_device(z, v, idx, out, U, W, C, a, b, ridge)
    quad_sample_value_device(z, idx, U, W, C, a, b, ridge) -> float

One thread per output entry; each thread sums over the samples of idx in the CPU's order
(the same operations in the same order, so results agree with the CPU to rounding of
fused multiply-adds on a GPU, bit for bit under the simulator). Work per thread is
``O(len(idx) (dx + dy))``: meant for moderate batch sizes.

:func:`stochastic_quadratic_device_problem` puts a ``make_quadratic(...)`` problem's
per-sample arrays on the device once.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..cuda import _linalg as dl
from ..cuda._device import Transfers
from ..cuda._problem import DeviceBilevelProblem, DeviceObjective
from .quadratic import sample_value_source

__all__ = ["quad_sample_grad_device", "quad_sample_hvp_device", "quad_sample_value_device",
           "stochastic_quadratic_device_problem"]

_TPB = dl.THREADS_PER_BLOCK


@cuda.jit
def _sample_affine_kernel(z, idx, U, W, C, a, b, ridge, lin, out):
    """``out = mean_{i in idx} (B_i x + C_i y + lin b_i, A_i y + C_i^T x + lin a_i) + ridge z``
    for z = (x, y): the CPU ``_sample_affine`` entry by entry, in its summation order
    (including its skip of ``C_i^T x`` terms where ``x_p == 0``)."""
    dx = W.shape[1]
    dy = U.shape[1]
    m = idx.shape[0]
    for j in range(cuda.grid(1), dx + dy, cuda.gridsize(1)):
        acc = 0.0
        for k in range(m):
            i = idx[k]
            if j < dx:
                wx = 0.0
                for p in range(dx):
                    wx += W[i, p] * z[p]
                s = W[i, j] * wx + lin * b[i, j]
                for q in range(dy):
                    s += C[i, j, q] * z[dx + q]
                acc += s
            else:
                q = j - dx
                uy = 0.0
                for r in range(dy):
                    uy += U[i, r] * z[dx + r]
                acc += U[i, q] * uy + lin * a[i, q]
                for p in range(dx):
                    xp = z[p]
                    if xp != 0.0:
                        acc += C[i, p, q] * xp
        scale = 1.0 / m if m > 0 else 0.0
        out[j] = acc * scale + ridge * z[j]


_sample_value_device = cuda.jit(device=True)(sample_value_source)


@cuda.jit
def _sample_value_terms_kernel(z, idx, U, W, C, a, b, terms):
    """``terms[k] = phi_{idx[k]}(z)`` without the ridge (one thread per sample; the CPU's
    per-sample source, :func:`mlocore.problems.quadratic.sample_value_source`)."""
    for k in range(cuda.grid(1), idx.shape[0], cuda.gridsize(1)):
        terms[k] = _sample_value_device(z, idx[k], U, W, C, a, b)


def _check_idx(idx):
    if idx.dtype != np.int64 or len(idx.shape) != 1:
        raise TypeError(f"idx must be a 1-D int64 device array, got dtype {idx.dtype} and "
                        f"shape {tuple(idx.shape)}")


def quad_sample_grad_device(z, idx, out, U, W, C, a, b, ridge):
    """``out <-`` mean over i in idx of ``grad phi_i(z)``, plus ``ridge z``.

    Parameters
    ----------
    z : device array, shape (dx + dy,)
    idx : device int64 array
        Sample indices in ``[0, n)`` (repetitions allowed; not checked on the device).
    out : device array, shape (dx + dy,)
    U, W, C, a, b : device arrays, shapes (n, dy), (n, dx), (n, dx, dy), (n, dy), (n, dx)
    ridge : float
    """
    _check_idx(idx)
    _sample_affine_kernel[dl.grid_for(out.shape[0]), _TPB](z, idx, U, W, C, a, b,
                                                           float(ridge), 1.0, out)


def quad_sample_hvp_device(z, v, idx, out, U, W, C, a, b, ridge):
    """``out <-`` mean over i in idx of ``Hessian(phi_i) v``, plus ``ridge v`` (independent
    of z)."""
    _check_idx(idx)
    _sample_affine_kernel[dl.grid_for(out.shape[0]), _TPB](v, idx, U, W, C, a, b,
                                                           float(ridge), 0.0, out)


def quad_sample_value_device(z, idx, U, W, C, a, b, ridge):
    """Mean over i in idx of ``phi_i(z)`` (ridge included). Reduces on the device and reads
    back two scalars (not counted: a value callback has no counter); the per-sample terms
    are summed as a tree, not sequentially, so it agrees with the CPU to rounding."""
    _check_idx(idx)
    m = idx.shape[0]
    scalars = dl.Scalars(Transfers())
    if m > 0:
        terms = dl.empty(m)
        _sample_value_terms_kernel[dl.grid_for(m), _TPB](z, idx, U, W, C, a, b, terms)
        scalars.sum(terms, dl.S_AUX)
    scalars.dot(z, z, dl.S_AUX2)
    s = scalars.read()
    mean = s[dl.S_AUX] / m if m > 0 else 0.0
    return float(mean + 0.5 * float(ridge) * s[dl.S_AUX2])


def stochastic_quadratic_device_problem(q):
    """``q.stochastic_problem`` (``q = make_quadratic(...)``) as a
    :class:`~mlocore.cuda.DeviceBilevelProblem` with minibatch callbacks.

    Parameters
    ----------
    q : mlocore.problems.quadratic.QuadraticBilevel

    Returns
    -------
    DeviceBilevelProblem
        Upper objective over the ``n_outer`` outer samples, lower over the ``n_inner`` inner
        samples (``n_samples`` set accordingly); the per-sample arrays ``(U, W, C, a, b)`` of
        both levels are copied to the device once (ten host -> device copies, in
        ``problem.transfers``); the ridge is passed as a scalar. ``q.x_star`` is the
        closed-form solution (pass ``reference=q``).
    """
    if not hasattr(q, "upper_samples") or not hasattr(q, "lower_samples"):
        raise TypeError("q must be a QuadraticBilevel from mlocore.problems.make_quadratic, "
                        f"got {type(q).__name__}")

    def objective(samples, n):
        return DeviceObjective(quad_sample_grad_device, hvp=quad_sample_hvp_device,
                               value=quad_sample_value_device,
                               args=tuple(samples) + (float(q.ridge),), n_samples=n)
    return DeviceBilevelProblem(objective(q.upper_samples, q.n_outer),
                                objective(q.lower_samples, q.n_inner), dims=(q.dx, q.dy))
